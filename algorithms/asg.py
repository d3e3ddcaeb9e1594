"""Structure-guided high-resolution sampling (ASGDiffusion, arXiv 2412.06163; builds on CutDiffusion).

The sampler only ever sees the high-resolution latent x (G, C, H, W). Each model call is replaced by
``asg_denoise(x, sigma, denoise, plan, step, total)``, which returns D for the whole latent from
native-size model calls:

* stage 1 (the first ``structure_fraction`` of the steps): the latent is cut into N = n_h * n_w strided
  views ``x[..., a::n_h, b::n_w]`` (each a full field-of-view low-resolution image). Optionally each
  location's pixels are shuffled across views 1.. before the model call and put back after it (pixel
  interaction; view 0, the key view, keeps its own: see ``step_permutations``). Every other view's noise
  prediction is pulled towards the key view's:
  ``eps_i' = eps_i + w_t * M_i * (eps_0 - eps_i)``, with M_i a cross-attention mask in [0, 1] (or 1) and
  eps_0 the key view's prediction written for view i's own latent, i.e. ``D_i' = D_i + w_t M_i (D_0 - D_i)``
  (see ``guide_denoised``). In asynchronous mode D_0 and M come from the previous step, so no view waits
  for the key view.
* stage 2: overlapping windows of the native size (stride half a window, seeded jitter of the
  interior windows) are denoised and their D averaged (MultiDiffusion) with weights tapered towards
  each window's edges, so window borders leave no seams.

Everything is a function of tensors and a batched ``denoise(x_batch, sigma_batch, pieces) -> D``
callable; ``pieces`` says what each sample is (its group, view or window) so a caller can pick the
conditioning (SDXL crop coordinates per window, say). Pure torch: nothing here imports ComfyUI.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Hashable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "SCHEDULES",
    "ASGInputError",
    "Piece",
    "ASGPlan",
    "ASGState",
    "view_grid",
    "scatter_views",
    "gather_views",
    "interaction_permutation",
    "step_permutations",
    "permute_views",
    "unpermute_views",
    "guidance_weight",
    "structure_steps",
    "guide_denoised",
    "normalize_maps",
    "shape_mask",
    "combine_level_maps",
    "prompt_token_mask",
    "window_offsets",
    "window_grid",
    "window_taper",
    "asg_denoise",
]

SCHEDULES = ("cosine", "constant")
# Attention at or above this share of a map's peak gets full structure guidance. The raw min-max map (1.0)
# is near 1 only at the subject's core and falls off over its edges, so the views' edges go unguided, drift
# apart and average out: on the shapes model (repetition seeds 0-7) the subject came out at 0.82x (2x) and
# 0.75x (3x) of its native share of the canvas; at 0.1, 0.96x and 0.93x, one subject in every image.
MASK_SATURATION = 0.1
TOKENS_PER_CHUNK = 77  # CLIP's context: [start] + up to 75 prompt tokens + [end], padded to 77


class ASGInputError(ValueError):
    """A size or setting structure-guided sampling cannot take; the message says what to change."""

    user_facing = True


@dataclass(frozen=True)
class Piece:
    """What one sample of a denoise batch is: a strided view or a window of group ``group`` of x."""

    group: int
    view: tuple[int, int] | None = None  # lattice offset (a, b) of x[..., a::n_h, b::n_w]
    window: tuple[int, int] | None = None  # (top, left) of a window, in latent pixels


Denoise = Callable[[Tensor, Tensor, Sequence[Piece]], Tensor]


@dataclass
class ASGPlan:
    """The settings of one structure-guided run; view_h x view_w is the model's native latent size."""

    view_h: int
    view_w: int
    guidance: float = 1.0  # w: 0 = independent views, 1 = views follow the key view fully (where M = 1)
    schedule: str = "cosine"  # how w decays over stage 1
    structure_fraction: float = 0.5  # share of the steps run as stage 1
    pixel_interaction: bool = True
    asynchronous: bool = False  # key-view D and mask one step stale
    use_mask: bool = True
    mask_saturation: float = MASK_SATURATION  # see shape_mask; 1 = the raw min-max map
    jitter: int = 0  # stage-2 window jitter in latent pixels (clamped so windows still cover everything)
    seed: int = 0
    batch: int = 0  # samples per denoise call; 0 = all at once

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULES:
            raise ASGInputError(f"guidance schedule must be one of {', '.join(SCHEDULES)}; got {self.schedule!r}.")
        if not 0.0 <= self.structure_fraction <= 1.0:
            raise ASGInputError(f"structure_fraction must be in [0, 1]; got {self.structure_fraction}.")
        if not 0.0 <= self.guidance <= 1.0:
            raise ASGInputError(f"guidance must be in [0, 1]; got {self.guidance}.")
        if not 0.0 < self.mask_saturation <= 1.0:
            raise ASGInputError(f"mask_saturation must be in (0, 1]; got {self.mask_saturation}.")
        if self.view_h < 1 or self.view_w < 1:
            raise ASGInputError(f"the native latent size must be positive; got {self.view_h}x{self.view_w}.")


# ------------------------------------------------------------------------------------------- sizes


def view_grid(height: int, width: int, view_h: int, view_w: int) -> tuple[int, int]:
    """(n_h, n_w): how many native-size views tile a height x width latent per side."""
    if height < view_h or width < view_w:
        raise ASGInputError(
            f"The latent is {height}x{width} (latent pixels) but the model's native size is {view_h}x{view_w}: "
            f"structure-guided sampling makes images larger than native ({view_h * 8}x{view_w * 8} pixels or more). "
            "Use a larger empty latent, or lower native_resolution."
        )
    if height % view_h or width % view_w:
        raise ASGInputError(
            f"The latent {height}x{width} is not a whole multiple of the native size {view_h}x{view_w} per side "
            f"(image sides must be multiples of {view_h * 8} and {view_w * 8} pixels, e.g. {2 * view_h * 8}x"
            f"{2 * view_w * 8}). Change the latent size, or set native_resolution to a divisor of both sides."
        )
    return height // view_h, width // view_w


# ------------------------------------------------------------------------------------ stage 1: views


def scatter_views(x: Tensor, n_h: int, n_w: int) -> Tensor:
    """(G, C, H, W) -> (G, N, C, H/n_h, W/n_w); view a * n_w + b is x[..., a::n_h, b::n_w]."""
    g, c, hh, ww = x.shape
    h, w = hh // n_h, ww // n_w
    return x.reshape(g, c, h, n_h, w, n_w).permute(0, 3, 5, 1, 2, 4).reshape(g, n_h * n_w, c, h, w)


def gather_views(v: Tensor, n_h: int, n_w: int) -> Tensor:
    """Exact inverse of scatter_views: (G, N, C, h, w) -> (G, C, h * n_h, w * n_w)."""
    g, _, c, h, w = v.shape
    return v.reshape(g, n_h, n_w, c, h, w).permute(0, 3, 4, 1, 5, 2).reshape(g, c, h * n_h, w * n_w)


def interaction_permutation(groups: int, views: int, h: int, w: int, generator: torch.Generator,
                            keep_key: bool = False) -> Tensor:
    """A random permutation of the views at every location: (G, N, h, w) long, CPU, from ``generator``.
    ``keep_key``: view 0 (the key view) keeps its own pixels; only views 1.. are shuffled among themselves."""
    if keep_key and views > 1:
        rest = torch.rand(groups, views - 1, h, w, generator=generator).argsort(dim=1) + 1
        return torch.cat([torch.zeros(groups, 1, h, w, dtype=rest.dtype), rest], dim=1)
    return torch.rand(groups, views, h, w, generator=generator).argsort(dim=1)


def permute_views(v: Tensor, perm: Tensor) -> Tensor:
    """out[g, n, :, i, j] = v[g, perm[g, n, i, j], :, i, j] (pixel interaction before the model call)."""
    index = perm.to(v.device).unsqueeze(2).expand(-1, -1, v.shape[2], -1, -1)
    return torch.gather(v, 1, index)


def unpermute_views(v: Tensor, perm: Tensor) -> Tensor:
    """Exact inverse of permute_views (puts every pixel back into the view it came from)."""
    index = perm.to(v.device).unsqueeze(2).expand(-1, -1, v.shape[2], -1, -1)
    return torch.empty_like(v).scatter_(1, index, v)


# ------------------------------------------------------------------------------------------ guidance


def structure_steps(total: int, fraction: float) -> int:
    """How many of ``total`` steps run as stage 1."""
    return max(0, min(total, int(round(total * fraction))))


def guidance_weight(step: int, stage1: int, guidance: float, schedule: str) -> float:
    """w_t for stage-1 step ``step`` of ``stage1``: constant, or cosine decay from w to 0 over stage 1."""
    if schedule not in SCHEDULES:
        raise ASGInputError(f"guidance schedule must be one of {', '.join(SCHEDULES)}; got {schedule!r}.")
    if stage1 <= 0 or step >= stage1:
        return 0.0
    if schedule == "constant":
        return float(guidance)
    return float(guidance) * 0.5 * (1.0 + math.cos(math.pi * step / stage1))


def guide_denoised(d: Tensor, key_d: Tensor, w: float, mask: Tensor | None = None) -> Tensor:
    """D of every view after structure guidance towards the key view; view 0 (the key view) unchanged.

    d: (G, N, C, h, w) view predictions; key_d: (G, C, h, w) the key view's D (this step's, or the previous
    step's in asynchronous mode); mask: (G, N, 1, h, w) in [0, 1] or None (M = 1).
    D_i' = D_i + w * M_i * (D_key - D_i). In noise terms this is the paper's
    eps_i' = eps_i + w * M_i * (eps_key - eps_i) with eps_key = (x_i - D_key) / sigma, the key view's
    prediction written for view i's own latent. Pulling eps_i towards the key view's raw eps instead would
    make view i remove the key view's starting noise rather than its own, and the difference stays in the
    latent until the end (the shapes benchmark drew pure noise that way).
    """
    if w == 0.0 or d.shape[1] < 2:
        return d
    delta = (key_d.unsqueeze(1).to(d.dtype) - d[:, 1:]) * w
    if mask is not None:
        delta = delta * mask[:, 1:].to(delta.dtype)
    return torch.cat([d[:, :1], d[:, 1:] + delta], dim=1)


# ------------------------------------------------------------------------------- attention mask


def normalize_maps(maps: Tensor) -> Tensor:
    """Min-max normalise every map (over its last two dims) to [0, 1]; a flat map becomes all ones."""
    flat = maps.flatten(-2).float()
    lo, hi = flat.min(-1, keepdim=True).values, flat.max(-1, keepdim=True).values
    span = hi - lo
    out = torch.where(span > 1e-12, (flat - lo) / span.clamp_min(1e-12), torch.ones_like(flat))
    return out.reshape(maps.shape)


def shape_mask(maps: Tensor, saturation: float = MASK_SATURATION) -> Tensor:
    """The guidance mask M of attention maps: min-max normalised, then every value at or above
    ``saturation`` of the peak set to 1 and the rest scaled linearly (``saturation`` 1: the normalised map)."""
    return (normalize_maps(maps) / float(saturation)).clamp_(max=1.0)


def combine_level_maps(levels: dict[int, tuple[Tensor, int]], size: tuple[int, int]) -> Tensor:
    """Average per-level attention maps over layers, upsampled to ``size``.

    levels: downsampling factor -> (sum over that level's layers of (n, h_l, w_l) maps, layer count).
    Returns (n, *size): the mean over all layers (each layer weighs the same).
    """
    total, layers = None, 0
    for factor in sorted(levels):
        maps, count = levels[factor]
        up = maps.float() if tuple(maps.shape[-2:]) == tuple(size) else F.interpolate(
            maps.float().unsqueeze(1), size=size, mode="bilinear", align_corners=False).squeeze(1)
        total = up if total is None else total + up
        layers += count
    if total is None:
        raise ValueError("no attention maps were recorded")
    return total / max(layers, 1)


def prompt_token_mask(context: Tensor, chunk: int = TOKENS_PER_CHUNK, similarity: float = 0.9) -> Tensor:
    """Which context tokens are prompt tokens: (G, T, D) -> (G, T) bool.

    ComfyUI's CLIP tokenizers emit chunks of 77: [start] + up to 75 prompt tokens + [end] + padding.
    Per chunk, position 0 (start) and position 76 (always end or padding) are special, and so is the
    trailing run of padding: padding repeats one token, so its embeddings are near-duplicates of the
    chunk's last one (cosine >= ``similarity``); where the end token is the padding token (SD1.x, SDXL's
    CLIP-L) it joins that run. Contexts that are not made of 77-token chunks count every token.
    """
    g, t, _ = context.shape
    keep = torch.ones(g, t, dtype=torch.bool, device=context.device)
    if t % chunk:
        return keep
    c = context.float().reshape(g, t // chunk, chunk, -1)
    cos = F.cosine_similarity(c, c[:, :, -1:], dim=-1)  # (G, chunks, 77)
    near = cos >= similarity
    # the trailing run: positions from which every later position is a near-duplicate of the last one
    run = near.flip(-1).cumprod(-1).flip(-1).bool()
    special = run.clone()
    special[..., 0] = True
    special[..., -1] = True
    return (~special).reshape(g, t)


# ----------------------------------------------------------------------------- stage 2: windows


def window_offsets(size: int, window: int, jitter: int = 0, generator: torch.Generator | None = None) -> list[int]:
    """Start offsets of windows of ``window`` along a side of ``size``: stride window // 2, the first at 0
    and the last at size - window; interior ones move by up to ``jitter`` (clamped to window // 4, which
    keeps neighbours overlapping, so every pixel stays covered)."""
    if size < window:
        raise ASGInputError(f"a window of {window} does not fit in {size}")
    if size == window:
        return [0]
    stride = max(1, window // 2)
    n = math.ceil((size - window) / stride) + 1
    offsets = [min(i * stride, size - window) for i in range(n)]
    jitter = max(0, min(int(jitter), window // 4))
    if jitter and generator is not None and n > 2:
        shifts = torch.randint(-jitter, jitter + 1, (n - 2,), generator=generator).tolist()
        for i, s in enumerate(shifts, start=1):
            offsets[i] = max(0, min(size - window, offsets[i] + s))
    return sorted(set(offsets))


def window_grid(height: int, width: int, view_h: int, view_w: int, jitter: int = 0,
                generator: torch.Generator | None = None) -> list[tuple[int, int]]:
    """(top, left) of every stage-2 window, row-major."""
    rows = window_offsets(height, view_h, jitter, generator)
    cols = window_offsets(width, view_w, jitter, generator)
    return [(t, left) for t in rows for left in cols]


def window_taper(view_h: int, view_w: int) -> Tensor:
    """(view_h, view_w) blending weights of a window: 1 inside, falling linearly over the outer quarter of
    each side to 1 / (ramp + 1) at the edge. With a plain average the set of windows covering a pixel
    changes abruptly where a window ends, and that edge shows as a seam; tapered weights blend across it.
    Every weight stays positive, so pixels that only one window covers (the image border) keep its value."""
    def ramp(n: int) -> Tensor:
        r = max(1, n // 4)
        i = torch.arange(n, dtype=torch.float32)
        return torch.minimum(torch.minimum(i + 1, n - i) / (r + 1), torch.ones(n))
    return ramp(view_h)[:, None] * ramp(view_w)[None, :]


# ------------------------------------------------------------------------------------- the method


class ASGState:
    """The one-step-stale key-view predictions (D) and masks of a run, kept per key for the last two steps."""

    def __init__(self) -> None:
        self.key: dict[Hashable, list[tuple[int, Tensor]]] = {}
        self.masks: dict[Hashable, list[tuple[int, Tensor]]] = {}

    def reset(self) -> None:
        self.key.clear()
        self.masks.clear()

    @staticmethod
    def put(table: dict, key: Hashable, step: int, value: Tensor) -> None:
        entries = [e for e in table.get(key, []) if e[0] != step]
        entries.append((step, value))
        table[key] = sorted(entries, key=lambda e: e[0])[-2:]

    @staticmethod
    def get(table: dict, key: Hashable, before: int | None = None) -> Tensor | None:
        """The newest value for key (from a step < before, when given)."""
        entries = [e for e in table.get(key, []) if before is None or e[0] < before]
        return entries[-1][1] if entries else None


def _seed(seed: int, step: int, salt: int) -> int:
    return (int(seed) * 1_000_003 + int(step) * 7919 + salt) % (2**63 - 1)


def step_permutations(image_ids: Sequence[int], views: int, h: int, w: int, seed: int, step: int) -> Tensor:
    """The pixel-interaction permutations of one step, (G, N, h, w): one per image, so the conditional and
    unconditional groups of an image are shuffled alike (CFG then combines predictions of the same
    inputs) and an image's shuffles do not depend on what else is in the batch.

    The key view keeps its own pixels, so the layout every view is pulled to is the one a native run from
    the key view's noise draws. Shuffled with the others, its input became a new per-pixel mix of the views'
    noise at every step and the layout followed no native run: on the shapes model (32 seeds) the subject's
    size differed per image from such a run's by a mean |log ratio| of 0.23 at 2x and 0.38 at 3x, against
    0.06 and 0.07 with the key view kept (the mean size was the same either way)."""
    def draw(image: int) -> Tensor:
        generator = torch.Generator().manual_seed(_seed(seed, step, 1 + 104_729 * image))
        return interaction_permutation(1, views, h, w, generator, keep_key=True)

    drawn = {i: draw(i) for i in dict.fromkeys(int(i) for i in image_ids)}  # once per image, not per branch
    return torch.cat([drawn[int(i)] for i in image_ids])


def run_batched(denoise: Denoise, x: Tensor, sigma: Tensor, pieces: Sequence[Piece], batch: int) -> Tensor:
    """denoise over x in chunks of ``batch`` samples (0 = one call); memory grows with the chunk, not N."""
    n = x.shape[0]
    step = n if batch <= 0 else batch
    outs = [denoise(x[i:i + step], sigma[i:i + step], pieces[i:i + step]) for i in range(0, n, step)]
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=0)


def asg_denoise(
    x: Tensor,
    sigma: Tensor,
    denoise: Denoise,
    plan: ASGPlan,
    step: int,
    total: int,
    state: ASGState | None = None,
    key_ids: Sequence[Hashable] | None = None,
    image_ids: Sequence[int] | None = None,
    attention: Callable[[], Sequence[Tensor | None] | None] | None = None,
) -> Tensor:
    """D for the high-resolution latent x (G, C, H, W) at noise level sigma (G,) or scalar, step ``step`` of ``total``.

    ``attention`` (stage 1, optional) is called after the view calls and returns per group the
    cross-attention maps (N, h, w) of those calls (in the order the views were given to the model,
    i.e. shuffled when pixel interaction is on), or None for a group without maps. ``key_ids`` name
    each group's key-view D in ``state``; ``image_ids`` (ints) say which image of the batch a group is: the
    conditional and unconditional groups of one image share its mask and its pixel shuffles (defaults:
    the group index).
    """
    g, c, hh, ww = x.shape
    n_h, n_w = view_grid(hh, ww, plan.view_h, plan.view_w)
    sig = sigma.reshape(-1).to(x.device)
    sig = sig.expand(g) if sig.numel() == 1 else sig
    if n_h == n_w == 1:  # native size: nothing to structure
        return run_batched(denoise, x, sig, [Piece(i) for i in range(g)], plan.batch)
    if step < structure_steps(total, plan.structure_fraction):
        return _stage1(x, sig, denoise, plan, step, total, n_h, n_w, state, key_ids, image_ids, attention)
    return _stage2(x, sig, denoise, plan, step)


def _stage1(x: Tensor, sig: Tensor, denoise: Denoise, plan: ASGPlan, step: int, total: int, n_h: int, n_w: int,
            state: ASGState | None, key_ids, image_ids, attention) -> Tensor:
    g, c = x.shape[:2]
    n = n_h * n_w
    image_ids = [int(i) for i in image_ids] if image_ids is not None else list(range(g))
    views = scatter_views(x, n_h, n_w)
    h, w = views.shape[-2:]
    perm = None
    model_in = views
    if plan.pixel_interaction:
        perm = step_permutations(image_ids, n, h, w, plan.seed, step)
        model_in = permute_views(views, perm)
    pieces = [Piece(i, view=(v // n_w, v % n_w)) for i in range(g) for v in range(n)]
    d = run_batched(denoise, model_in.reshape(g * n, c, h, w), sig.repeat_interleave(n), pieces, plan.batch)
    # Guidance works in model order: slot 0 is one coherent model output. (Un-shuffled first, "view 0" would
    # be a per-pixel patchwork of all N outputs, and pulling every view to it draws that patchwork as grain.)
    d = d.reshape(g, n, c, h, w)

    wt = guidance_weight(step, structure_steps(total, plan.structure_fraction), plan.guidance, plan.schedule)
    state = state if state is not None else ASGState()
    key_ids = list(key_ids) if key_ids is not None else list(range(g))

    mask = None
    if plan.use_mask:
        current = attention() if attention is not None else None
        per_group = []
        for i in range(g):
            m = None if current is None else current[i]
            if m is not None:
                m = shape_mask(m.to(x.device).float().unsqueeze(1), plan.mask_saturation)  # (N, 1, h, w)
                ASGState.put(state.masks, image_ids[i], step, m)
            stale = ASGState.get(state.masks, image_ids[i], before=step)
            use = (stale if stale is not None else m) if plan.asynchronous else (
                m if m is not None else ASGState.get(state.masks, image_ids[i]))
            per_group.append(use if use is not None else torch.ones(n, 1, h, w, device=x.device))
        mask = torch.stack(per_group).to(d.dtype)

    key = d[:, 0]
    if plan.asynchronous:  # the previous step's key view; this step's is kept for the next (even while w_t is 0)
        stale = [ASGState.get(state.key, key_ids[i], before=step) for i in range(g)]
        for i in range(g):
            ASGState.put(state.key, key_ids[i], step, d[i, 0])
        key = torch.stack([s if s is not None else d[i, 0] for i, s in enumerate(stale)])
    if wt > 0:
        d = guide_denoised(d, key, wt, mask)
    if perm is not None:
        d = unpermute_views(d, perm)
    return gather_views(d, n_h, n_w)


def _stage2(x: Tensor, sig: Tensor, denoise: Denoise, plan: ASGPlan, step: int) -> Tensor:
    g, c, hh, ww = x.shape
    h, w = plan.view_h, plan.view_w
    wins = window_grid(hh, ww, h, w, plan.jitter, torch.Generator().manual_seed(_seed(plan.seed, step, 2)))
    crops = torch.stack([x[i, :, t:t + h, left:left + w] for i in range(g) for t, left in wins])
    pieces = [Piece(i, window=(t, left)) for i in range(g) for t, left in wins]
    d = run_batched(denoise, crops, sig.repeat_interleave(len(wins)), pieces, plan.batch)
    taper = window_taper(h, w).to(device=d.device, dtype=d.dtype)
    out = torch.zeros_like(x, dtype=d.dtype)
    weight = torch.zeros(hh, ww, device=d.device, dtype=d.dtype)
    for t, left in wins:
        weight[t:t + h, left:left + w] += taper
    k = 0
    for i in range(g):
        for t, left in wins:
            out[i, :, t:t + h, left:left + w] += d[k] * taper
            k += 1
    return out / weight
