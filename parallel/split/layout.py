"""Who holds which rows: the row-band split of a latent and the rank layout of a parallel run.

Pure Python (no torch.distributed): the runtime, the nodes and the tests share these rules.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

__all__ = ["LayoutError", "split_rows", "ParallelPlan", "band_alignment"]


class LayoutError(ValueError):
    """A split or rank layout that cannot be made; the message says what to change."""


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def split_rows(
    rows: int,
    n: int,
    align: int = 1,
    weights: Sequence[float] | None = None,
    *,
    pixel_scale: int = 8,
) -> list[tuple[int, int]]:
    """Split ``rows`` latent rows into ``n`` contiguous bands ``[start, end)``.

    Every start is a multiple of ``align`` (the model's total downsampling), so band
    boundaries stay integers at every UNet level; only the last band may end off the
    alignment grid. Sizes follow ``weights`` (default: equal) as closely as the alignment
    allows: each boundary is the ideal cumulative share rounded to the nearest multiple of
    ``align``, then pushed apart so every band is non-empty. ``pixel_scale`` (pixels per
    latent row) is only used to phrase error messages.
    """
    if int(rows) != rows or rows < 1:
        raise LayoutError(f"the latent needs at least 1 row to split, got rows={rows!r}")
    if int(n) != n or n < 1:
        raise LayoutError(f"the number of bands must be a positive integer, got n={n!r}")
    if int(align) != align or align < 1:
        raise LayoutError(f"the alignment must be a positive integer, got align={align!r}")
    rows, n, align = int(rows), int(n), int(align)
    if weights is None:
        weights = [1.0] * n
    weights = [float(w) for w in weights]
    if len(weights) != n:
        raise LayoutError(f"got {len(weights)} device weights for {_plural(n, 'band')}; give one weight per device")
    if any(not math.isfinite(w) or w <= 0 for w in weights):
        raise LayoutError(f"device weights must be finite and positive, got {weights}")

    units = -(-rows // align)  # aligned slots; the last one may be partial
    if n > units:
        need = n * align
        pixels = f" = {need * pixel_scale} pixels" if pixel_scale else ""
        raise LayoutError(
            f"{rows} latent rows at alignment {align} give only {_plural(units, 'band')}; "
            f"use at most {_plural(units, 'device')} or a taller image "
            f"(at least {need} latent rows{pixels} for {n} devices)"
        )

    total = sum(weights)
    bounds = [0] * (n + 1)
    acc = 0.0
    for i in range(1, n):
        acc += weights[i - 1]
        bounds[i] = math.floor(rows * acc / total / align + 0.5) * align  # half up, not banker's
    bounds[n] = units * align  # the aligned ceiling; clipped to rows below
    # Forward then backward pass: every band at least one aligned slot, last band non-empty.
    for i in range(1, n):
        bounds[i] = max(bounds[i], bounds[i - 1] + align)
    for i in range(n - 1, 0, -1):
        bounds[i] = min(bounds[i], bounds[i + 1] - align)
    bounds[n] = rows
    return [(bounds[i], bounds[i + 1]) for i in range(n)]


@dataclass(frozen=True)
class ParallelPlan:
    """Rank layout: ``batch_groups`` copies of a band split (CFG parallel puts cond and
    uncond on different groups), ``rank = batch_group * bands_per_group + band_index``.

    ``batch_split`` > 0 sets the number of batch groups directly (it must divide the world size):
    each UNet call's batch is cut into that many chunks, e.g. ``batch_split = world_size`` spreads a
    batch of views or of time steps over all ranks with no bands at all.
    """

    world_size: int
    cfg_parallel: bool = False
    batch_split: int = 0

    def __post_init__(self) -> None:
        if int(self.world_size) != self.world_size or self.world_size < 1:
            raise LayoutError(f"world_size must be a positive integer, got {self.world_size!r}")
        if self.batch_split:
            if self.batch_split < 1 or self.world_size % self.batch_split:
                raise LayoutError(f"batch_split {self.batch_split} must divide the {self.world_size} devices")
            return
        if self.cfg_parallel and self.world_size > 1 and self.world_size % 2:
            raise LayoutError(
                f"CFG parallel splits the devices into a cond half and an uncond half, "
                f"but {self.world_size} devices cannot be halved; use an even number of devices "
                f"or turn CFG parallel off"
            )

    @property
    def batch_groups(self) -> int:
        if self.batch_split:
            return self.batch_split
        return 2 if self.cfg_parallel and self.world_size >= 2 else 1

    @property
    def bands_per_group(self) -> int:
        return self.world_size // self.batch_groups

    def _check_rank(self, rank: int) -> None:
        if not 0 <= rank < self.world_size:
            raise LayoutError(f"rank {rank} is outside 0..{self.world_size - 1}")

    def coords(self, rank: int) -> tuple[int, int]:
        """(batch_group, band_index) of a global rank."""
        self._check_rank(rank)
        return divmod(rank, self.bands_per_group)

    def band_ranks(self, batch_group: int) -> list[int]:
        """Global ranks holding the bands of one batch group, in band order."""
        if not 0 <= batch_group < self.batch_groups:
            raise LayoutError(f"batch group {batch_group} is outside 0..{self.batch_groups - 1}")
        start = batch_group * self.bands_per_group
        return list(range(start, start + self.bands_per_group))

    def peer_ranks(self, band_index: int) -> list[int]:
        """Global ranks holding the same band in each batch group, in batch-group order."""
        if not 0 <= band_index < self.bands_per_group:
            raise LayoutError(f"band index {band_index} is outside 0..{self.bands_per_group - 1}")
        return [g * self.bands_per_group + band_index for g in range(self.batch_groups)]


def band_alignment(model_or_family) -> int:
    """The one band rule: every band start is a multiple of the UNet's total downsampling,
    ``2 ** (len(channel_mult) - 1)`` latent rows (SD1.x/2.x: 8, SDXL: 4); for a DiT, of its patch size (one
    token row; video may split frames instead, see tokens.py).

    The run (``submit.preflight`` splits with it) and the web overlay (``web_routes.layout_for``) both use this
    function. Accepts a ComfyUI ``ModelPatcher`` (or anything with ``get_model_object``), a UNet (anything with
    ``channel_mult``), a family name (``"sd15"``, ``"sd1"``, ``"sd2"``, ``"sd21"``, ``"sdxl"``), an int (an
    alignment already known), or the tensor names of a UNet state dict (``input_blocks.N.0.op.weight`` marks
    each downsampling; a checkpoint's ``model.diffusion_model.`` prefix is fine). Raises LayoutError when the
    alignment cannot be told (e.g. a state dict of no UNet).
    """
    families = {"sd1": 3, "sd15": 3, "sd1.5": 3, "sd2": 3, "sd21": 3, "sd2.1": 3, "sdxl": 2,  # downsamplings
                "flux": 1, "sd3": 1, "sd35": 1, "qwenimage": 1, "wan": 1}  # DiTs: one token row of patch 2
    if isinstance(model_or_family, bool):
        raise LayoutError(f"no band alignment for {model_or_family!r}")
    if isinstance(model_or_family, int):
        if model_or_family < 1:
            raise LayoutError(f"the alignment must be a positive integer, got {model_or_family}")
        return model_or_family
    if isinstance(model_or_family, str):
        key = model_or_family.strip().lower().replace("_", "").replace("-", "")
        if key not in families:
            raise LayoutError(f"unknown model family {model_or_family!r}; known: sd15, sd2, sdxl, flux, sd3, "
                              f"qwen_image, wan")
        return 2 ** families[key]
    unet = model_or_family
    if hasattr(unet, "get_model_object"):
        unet = unet.get_model_object("diffusion_model")
    channel_mult = getattr(unet, "channel_mult", None)
    if channel_mult is not None:
        return 2 ** (len(channel_mult) - 1)
    patch = getattr(getattr(unet, "x_embedder", unet), "patch_size", None)  # a DiT: one token row
    if patch is not None:
        return int(patch[-1]) if isinstance(patch, (tuple, list)) else int(patch)
    if isinstance(unet, (list, tuple, set, frozenset)) or hasattr(unet, "keys"):
        names = list(unet.keys()) if hasattr(unet, "keys") else list(unet)
        blocks = {n.split("input_blocks.", 1)[1].split(".", 1)[0] for n in names
                  if isinstance(n, str) and "input_blocks." in n}
        if blocks:
            downs = {n.split("input_blocks.", 1)[1].split(".", 1)[0] for n in names
                     if isinstance(n, str) and "input_blocks." in n and ".op." in n}
            return 2 ** len(downs)
    raise LayoutError(f"cannot tell the band alignment of {type(model_or_family).__name__}: not a UNet")
