"""Who holds which image tokens of a DiT: the token grid of a latent and its bands.

A patchified latent is a grid of ``frames x rows x cols`` tokens in that (row-major) order. Patch
parallelism cuts one axis into contiguous bands, one per rank: token rows for images, latent frames
or token rows for video (whichever splits more evenly). A band keeps its tokens in SPLIT-AXIS-MAJOR
order, so that each band is ``units x width`` tokens with ``width`` tokens per unit of the split axis:

* images, or video split by frames: the band is a contiguous slice of the sequence (no copy);
* video split by rows: the band holds rows ``[s, e)`` of every frame, reordered (rows, frames, cols).

Attention does not care about the order of its keys, and queries only permute its outputs, so
bands of either order attend correctly as long as positions (rotary embeddings) are cut the same way;
``assemble`` puts the model's output back in the model's own order. Pure tensor code, no
torch.distributed.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from .layout import LayoutError, split_rows

__all__ = ["TokenGrid", "token_grid", "choose_axis", "split_units", "cut_tokens", "assemble"]

AXES = ("rows", "frames")


@dataclass(frozen=True)
class TokenGrid:
    """``frames x rows x cols`` tokens, split along ``axis`` ("rows" or "frames")."""

    frames: int
    rows: int
    cols: int
    axis: str = "rows"

    def __post_init__(self) -> None:
        if self.axis not in AXES:
            raise ValueError(f"axis must be one of {AXES}; got {self.axis!r}")

    @property
    def tokens(self) -> int:
        return self.frames * self.rows * self.cols

    @property
    def units(self) -> int:
        """Length of the split axis."""
        return self.frames if self.axis == "frames" else self.rows

    @property
    def width(self) -> int:
        """Tokens per unit of the split axis."""
        return self.rows * self.cols if self.axis == "frames" else self.frames * self.cols

    @property
    def contiguous(self) -> bool:
        """True when every band is a contiguous slice of the model's sequence."""
        return self.axis == "frames" or self.frames == 1


def _balance(units: int, n: int, weights: Sequence[float] | None) -> float:
    """Largest band over its ideal share (1.0 = perfect), inf when the axis has too few units."""
    if units < n:
        return float("inf")
    heights = [e - s for s, e in split_rows(units, n, 1, weights)]
    w = [1.0] * n if weights is None else [float(x) for x in weights]
    return max(h / (units * wi / sum(w)) for h, wi in zip(heights, w))


def choose_axis(frames: int, rows: int, n: int, weights: Sequence[float] | None = None) -> str:
    """"frames" or "rows": the axis whose split into ``n`` bands is most even (frames on a tie:
    contiguous bands, no reordering). Images (one frame) always split rows."""
    if frames <= 1:
        return "rows"
    by_frames, by_rows = _balance(frames, n, weights), _balance(rows, n, weights)
    if by_frames == by_rows == float("inf"):
        raise LayoutError(
            f"a video of {frames} latent frames and {rows} token rows cannot be split over {n} devices "
            f"(each device needs at least one frame or one token row); use at most {max(frames, rows)} devices "
            f"or a longer / taller video"
        )
    return "frames" if by_frames <= by_rows else "rows"


def token_grid(latent_shape: Sequence[int], patch: Sequence[int], n: int,
               weights: Sequence[float] | None = None) -> TokenGrid:
    """The token grid of a latent ``(B, C, H, W)`` or ``(B, C, T, H, W)`` patchified by ``patch``
    = ``(pt, ph, pw)`` (sides rounded up, as ComfyUI pads to the patch size), with the split axis for
    ``n`` bands. Raises LayoutError when no axis has ``n`` units."""
    shape = [int(s) for s in latent_shape]
    pt, ph, pw = (int(p) for p in patch)
    if len(shape) == 4:
        frames, h, w = 1, shape[2], shape[3]
    elif len(shape) == 5:
        frames, h, w = -(-shape[2] // pt), shape[3], shape[4]
    else:
        raise LayoutError(f"a DiT latent is (B, C, H, W) or (B, C, T, H, W); got shape {tuple(shape)}")
    rows, cols = -(-h // ph), -(-w // pw)
    if frames <= 1 and rows < n:
        raise LayoutError(
            f"{h} latent rows make {rows} token rows at patch size {ph}; {n} devices need at least {n} token rows "
            f"({n * ph} latent rows = {n * ph * 8} pixels): use at most {rows} devices or a taller image"
        )
    return TokenGrid(frames, rows, cols, choose_axis(frames, rows, n, weights))


def split_units(grid: TokenGrid, n: int, weights: Sequence[float] | None = None) -> list[tuple[int, int]]:
    """The bands ``[start, end)`` of the split axis, in units (token rows or frames)."""
    return split_rows(grid.units, n, 1, weights, pixel_scale=0)


def cut_tokens(t: torch.Tensor, dim: int, grid: TokenGrid, start: int, end: int, prefix: int = 0) -> torch.Tensor:
    """``t`` with, along ``dim``, its first ``prefix`` entries (text tokens, kept) followed by the band
    ``[start, end)`` of the grid's tokens in split-axis-major order. ``t`` holds ``prefix + grid.tokens``
    entries along ``dim``; anything after them (none expected) is refused."""
    dim = dim % t.dim()
    if t.shape[dim] != prefix + grid.tokens:
        raise RuntimeError(f"expected {prefix} + {grid.tokens} tokens along dim {dim}, got {t.shape[dim]}")
    if grid.contiguous:
        band = t.narrow(dim, prefix + start * grid.width, (end - start) * grid.width)
    else:  # rows of every frame, reordered (rows, frames, cols)
        img = t.narrow(dim, prefix, grid.tokens).unflatten(dim, (grid.frames, grid.rows, grid.cols))
        band = img.narrow(dim + 1, start, end - start).transpose(dim, dim + 1).flatten(dim, dim + 2)
    if prefix == 0:
        return band
    return torch.cat([t.narrow(dim, 0, prefix), band], dim=dim)


def assemble(parts: Sequence[torch.Tensor], dim: int, grid: TokenGrid) -> torch.Tensor:
    """Every band's tokens (band order, split-axis-major) back in the model's (frames, rows, cols) order."""
    dim = dim % parts[0].dim()
    full = torch.cat(list(parts), dim=dim)
    if grid.contiguous:
        return full
    return full.unflatten(dim, (grid.rows, grid.frames, grid.cols)).transpose(dim, dim + 1).flatten(dim, dim + 2)
