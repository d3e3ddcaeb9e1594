"""Peak memory per device of a patch-parallel plan, estimated before any work, and the refusal of a plan
that cannot fit.

Pure functions of sizes (no ComfyUI import; torch only for dtypes and the CUDA free-memory query). The
estimate has four parts, in bytes, for ONE device:

* ``weights``: the whole diffusion model (every rank holds it; on CPU the ranks share it).
* ``activations``: one UNet call on this device's band: the skip features of the input blocks (alive
  until the output blocks read them), the largest transient of one layer (a ResBlock: about four feature
  maps; a self-attention layer: its queries, the keys / values it attends to and its output), the full
  latent and the model's output. Assumes a memory-efficient attention backend (PyTorch SDPA, xformers,
  ComfyUI's split attention), which never holds a whole score matrix.
* ``exchange``: the largest transient exchange of one layer: the exact K/V all_gather (the padded
  per-rank buffers plus the concatenated K/V; exact steps, and the warmup steps of displaced / partial)
  or the final gather of the model output, whichever is larger.
* ``stale``: what the displaced / partial engine (displaced.py) keeps alive between steps, for every
  self-attention layer, conv halo and GroupNorm of a call: displaced, one image's K/V per layer (the
  other bands' (N-1)/N read next step plus this band's 1/N in flight); partial, the neighbour windows
  received plus this band's edge windows sent (sized for the larger of the early / late fractions: the
  window changes at an exact step that drops the old buffers first). Times ``calls_per_step`` (call
  slots: 2 for samplers that evaluate the model twice per step, like heun, or when ComfyUI splits cond
  and uncond into separate calls).

``kv_kept_bytes`` is the formula that tests/unit/test_stale_engine.py checks against the engine's
buffers. ``check_plan_fits`` raises ``MemoryPlanError`` (a ValueError with ``user_facing = True``, like
``submit.ParallelInputError``) with the estimate, the free memory and what to change.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

log = logging.getLogger("hires_parallel")

__all__ = [
    "MemoryPlanError",
    "UNetLayout",
    "unet_layout",
    "kv_kept_bytes",
    "estimate_plan",
    "check_plan_fits",
    "free_bytes",
    "check_preflight_memory",
    "SKIP_ENV",
    "HEADROOM",
]

SKIP_ENV = "HIRES_PARALLEL_SKIP_MEMORY_CHECK"  # "1": no memory check in preflight (trust the rig)
HEADROOM = 1.0  # refuse only when the estimate itself exceeds the free memory (it is approximate)
_MIB = 1024 * 1024


class MemoryPlanError(ValueError):
    """A parallel plan that cannot fit in the devices' free memory; the message says what to change."""

    user_facing = True


def _gib(n: float) -> str:
    return f"{n / 1024 ** 3:.2f} GiB" if n >= 1024 ** 3 else f"{n / _MIB:.1f} MiB"


def _ceil_div(a: int, b: int) -> int:
    return -(-int(a) // int(b))


def _window_rows(fraction: float, rows: int) -> int:
    from .displaced import window_rows  # torch only; same rule as the engine

    return window_rows(fraction, rows)


# ------------------------------------------------------------------------------------ UNet structure
@dataclass
class UNetLayout:
    """Layers of an openaimodel UNet that matter for memory, each with its downsampling factor:
    ``attn``: (factor, K/V channels) of every self-attention (attn1) layer; ``convs``: (factor, input
    channels) of every conv with a halo (kernel > 1); ``groupnorms``: (factor, groups) of every GroupNorm;
    ``skips``: (factor, channels) of every input block's output (kept for the output blocks);
    ``levels``: number of downsamplings (alignment of the bands: 2 ** levels)."""

    attn: list[tuple[int, int]] = field(default_factory=list)
    convs: list[tuple[int, int]] = field(default_factory=list)
    groupnorms: list[tuple[int, int]] = field(default_factory=list)
    skips: list[tuple[int, int]] = field(default_factory=list)
    levels: int = 0


def unet_layout(unet: Any) -> UNetLayout:
    """Walk an openaimodel.UNetModel (input_blocks, middle_block, output_blocks) the way the band hooks
    do (unet_parallel._unet_levels): a block holding a Downsample halves the level after it, one holding
    an Upsample doubles it. Duck-typed by class name and attributes, so no ComfyUI import is needed."""
    out = UNetLayout()

    def visit(block: Any, level: int) -> None:
        f = 2 ** level
        for m in block.modules():
            if hasattr(m, "transformer_blocks"):
                for tb in m.transformer_blocks:
                    if not getattr(tb, "disable_self_attn", False):  # attn1 on the text: local, nothing kept
                        out.attn.append((f, int(tb.attn1.to_k.out_features)))
            elif isinstance(m, torch.nn.Conv2d) and (m.kernel_size[0] > 1 or m.stride[0] > 1):
                # a stride-2 conv reads its input at this level; its output is at the next one
                out.convs.append((f, int(m.in_channels)))
            elif isinstance(m, torch.nn.GroupNorm):
                out.groupnorms.append((f, int(m.num_groups)))

    def has(block: Any, name: str) -> bool:
        return any(type(m).__name__ == name for m in block.modules())

    def block_channels(block: Any, default: int) -> int:
        ch = default
        for m in block.children() if hasattr(block, "children") else []:
            if hasattr(m, "out_channels"):
                ch = int(m.out_channels)
        return ch

    level, ch = 0, int(getattr(unet, "model_channels", 0) or 0)
    for block in unet.input_blocks:
        visit(block, level)
        down = has(block, "Downsample")
        ch = block_channels(block, ch)
        out.skips.append((2 ** (level + down), ch))
        level += down
    out.levels = level
    if getattr(unet, "middle_block", None) is not None:
        visit(unet.middle_block, level)
    for block in unet.output_blocks:
        visit(block, level)
        if has(block, "Upsample"):
            level -= 1
    return out


# ------------------------------------------------------------------------------------ formulas
def _band_heights(height: int, bands: int, align: int, weights: Sequence[float] | None) -> list[int]:
    if bands <= 1:
        return [int(height)]
    try:
        from .layout import split_rows

        return [e - s for s, e in split_rows(int(height), int(bands), int(align), weights)]
    except ValueError:  # the layout check reports that one; estimate with even bands
        return [_ceil_div(height, bands)] * bands


def _level_heights(heights: Sequence[int], f: int) -> list[int]:
    """Band heights at factor ``f`` (band starts are aligned; the last band rounds up)."""
    starts = [sum(heights[:j]) for j in range(len(heights))]
    total = sum(heights)
    out = [starts[j + 1] // f - starts[j] // f for j in range(len(heights) - 1)]
    return out + [_ceil_div(total, f) - starts[-1] // f]


def kv_kept_bytes(mode: str, level_heights: Sequence[int], index: int, width: int, channels: int, batch: int,
                  itemsize: int, fraction: float = 0.3) -> dict[str, int]:
    """Bytes the stale engine keeps for ONE self-attention layer on band ``index`` between steps:
    ``stale`` (what it reads next step) and ``send`` (its own fresh data in flight). ``level_heights``:
    every band's rows at the layer's level; ``width``: tokens per row; ``channels``: K (= V) channels."""
    per_row = int(batch) * int(width) * 2 * int(channels) * int(itemsize)
    hs = [int(h) for h in level_heights]
    n, me = len(hs), int(index)
    if n < 2 or mode not in ("displaced", "partial"):
        return {"stale": 0, "send": 0, "total": 0}
    if mode == "displaced":
        stale, send = (sum(hs) - hs[me]) * per_row, hs[me] * per_row
    else:
        win = [_window_rows(fraction, h) for h in hs]
        stale = ((win[me - 1] if me > 0 else 0) + (win[me + 1] if me < n - 1 else 0)) * per_row
        send = win[me] * ((me > 0) + (me < n - 1)) * per_row
    return {"stale": stale, "send": send, "total": stale + send}


def estimate_plan(*, weights_bytes: int, latent_shape: Sequence[int], dtype: torch.dtype | int, world: int,
                  bands: int, cfg_parallel: bool, mode: str, layout: UNetLayout, fraction: float = 0.3,
                  fraction_late: float | None = None, has_negative: bool = True, calls_per_step: int = 1,
                  band_weights: Sequence[float] | None = None) -> dict[str, Any]:
    """Peak bytes on the busiest device of a plan, by category, and their ``total``.

    ``latent_shape``: (B, C, H, W) of the latent; ``dtype``: the UNet's compute dtype (or its item size);
    ``world``: devices; ``bands``: bands per batch group (world, or world / 2 with CFG parallel; 1 for the
    batch mode); ``mode``: exact, displaced, partial or batch; ``has_negative``: cond and uncond are
    evaluated (in one batched call unless CFG parallel puts them on different devices)."""
    itemsize = dtype if isinstance(dtype, int) else torch.empty((), dtype=dtype).element_size()
    b, c, h, w = (int(x) for x in latent_shape)
    branches = 2 if has_negative else 1
    call_batch = b * branches
    if cfg_parallel and has_negative:
        call_batch = b
    if mode == "batch":
        call_batch = _ceil_div(call_batch, max(1, world))
        bands = 1
    bands = max(1, int(bands))
    align = 2 ** layout.levels
    heights = _band_heights(h, bands, align, band_weights)
    me = max(range(bands), key=lambda j: (heights[j], 0 < j < bands - 1))  # tallest, interior first
    frac = max(fraction, fraction_late if fraction_late is not None else fraction)

    def rows_at(f: int) -> list[int]:
        return _level_heights(heights, f)

    # activations: skip features + the largest single-layer transient + latent in / out
    skips = sum(call_batch * ch * rows_at(f)[me] * _ceil_div(w, f) * itemsize for f, ch in layout.skips)
    conv_peak = max((4 * call_batch * ch * rows_at(f)[me] * _ceil_div(w, f) * itemsize for f, ch in layout.skips),
                    default=0)
    attn_peak = 0
    exch_peak = 0
    for f, ch in layout.attn:
        hs, wl = rows_at(f), _ceil_div(w, f)
        own, full = hs[me] * wl, sum(hs) * wl
        per_token = call_batch * ch * itemsize
        # q and output of the band, the K/V attended (exact / warmup: every band)
        attn_peak = max(attn_peak, (2 * own + 2 * full) * per_token)
        if bands > 1:  # exact gather: own k|v, N padded buffers, the concatenated k|v
            exch_peak = max(exch_peak, (2 * own + 2 * bands * max(hs) * wl + 2 * full) * per_token)
    latent = 3 * call_batch * c * h * w * 4  # input, output and the sampler's float32 copies
    activations = skips + max(conv_peak, attn_peak) + latent
    if world > 1:
        if bands > 1:  # the output's padded all_gather and the concatenated result
            out_gather = (bands * max(heights) + h) * call_batch * c * w * itemsize
        else:  # batch mode / CFG parallel: the batches of every group gathered
            out_gather = 2 * b * branches * c * h * w * itemsize
        exch_peak = max(exch_peak, out_gather)

    stale = 0
    if mode in ("displaced", "partial") and bands > 1:
        for f, ch in layout.attn:
            stale += kv_kept_bytes(mode, rows_at(f), me, _ceil_div(w, f), ch, call_batch, itemsize, frac)["total"]
        neighbours = (me > 0) + (me < bands - 1)
        for f, ch in layout.convs:  # one halo row each way per neighbour (3x3 convs), sent and received
            stale += 2 * neighbours * call_batch * ch * _ceil_div(w, f) * itemsize
        for _f, groups in layout.groupnorms:  # float64 (sum, sum of squares) per group + count, every band
            stale += bands * (2 * call_batch * groups + 1) * 8
        stale *= max(1, int(calls_per_step))
    parts = {"weights": int(weights_bytes), "activations": int(activations), "exchange": int(exch_peak),
             "stale": int(stale)}
    return {**parts, "total": sum(parts.values()), "mode": mode, "world": int(world), "bands": bands,
            "band_rows": heights[me], "call_batch": call_batch, "itemsize": itemsize}


@dataclass(frozen=True)
class DitLayout:
    """What a DiT's memory estimate needs: width, attention layers over image tokens, MLP ratio, patch."""

    hidden: int
    attn_layers: int
    mlp_ratio: float
    out_per_token: int
    patch: tuple[int, int, int]


def dit_layout(dm: Any) -> DitLayout:
    """The DitLayout of a diffusion model of a family dit_families knows (AttributeError otherwise)."""
    from .dit_families import dit_family

    fam = dit_family(dm)
    if fam is None:
        raise AttributeError(f"{type(dm).__name__} is no DiT family this pack splits")
    layers = sum(len(getattr(dm, attr)) for _, attr in fam.blocks)
    hidden = int(getattr(dm, "hidden_size", 0) or getattr(dm, "inner_dim", 0) or getattr(dm, "dim", 0))
    ffn = getattr(dm, "ffn_dim", None)
    ratio = float(ffn) / hidden if ffn else float(getattr(getattr(dm, "params", None), "mlp_ratio", 4.0))
    patch = fam.patch(dm)
    out_ch = int(getattr(dm, "out_channels", 0) or getattr(dm, "out_dim", 16))
    return DitLayout(hidden, layers, ratio, out_ch * patch[0] * patch[1] * patch[2], patch)


def estimate_dit_plan(*, weights_bytes: int, latent_shape: Sequence[int], dtype: torch.dtype | int, world: int,
                      bands: int, cfg_parallel: bool, mode: str, layout: DitLayout, fraction: float = 0.3,
                      fraction_late: float | None = None, has_negative: bool = True, text_tokens: int = 512,
                      band_weights: Sequence[float] | None = None) -> dict[str, Any]:
    """Peak bytes on the busiest device of a DiT plan, by category (as ``estimate_plan`` for UNets).

    Activations: the band's tokens through one block (hidden states, q/k/v, the MLP's widest layer) plus the
    keys/values attended (every band's: the gathered copy); exchange: the gathered K/V buffers and the output
    gather; stale (displaced / partial): per attention layer and call slot, one image's K/V (displaced) or
    four windows (partial), see displaced.py."""
    from .tokens import split_units, token_grid

    itemsize = dtype if isinstance(dtype, int) else torch.empty((), dtype=dtype).element_size()
    b = int(latent_shape[0])
    branches = 2 if has_negative else 1
    call_batch = b if cfg_parallel and has_negative else b * branches
    if mode == "batch":
        call_batch, bands = _ceil_div(call_batch, max(1, world)), 1
    bands = max(1, int(bands))
    grid = token_grid(latent_shape, layout.patch, bands, band_weights)
    units = [e - s for s, e in split_units(grid, bands, band_weights)]
    own = max(units) * grid.width
    full, h = grid.tokens, layout.hidden
    per_tok = call_batch * h * itemsize
    local = own + text_tokens
    activations = int(local * per_tok * (6 + layout.mlp_ratio) + 2 * (full + text_tokens) * per_tok)
    latent = 3 * call_batch * full * layout.out_per_token * 4
    exchange = 0
    if bands > 1:
        exchange = int(2 * bands * own * per_tok + full * call_batch * layout.out_per_token * itemsize * 2)
    stale = 0
    if mode in ("displaced", "partial") and bands > 1:
        frac = max(fraction, fraction_late if fraction_late is not None else fraction)
        neighbours = min(2, bands - 1)  # the busiest band: received and sent windows, each way it has a neighbour
        kept = full if mode == "displaced" else 2 * neighbours * _window_rows(frac, max(units)) * grid.width
        stale = int(layout.attn_layers * 2 * kept * per_tok)
    parts = {"weights": int(weights_bytes), "activations": activations + latent, "exchange": exchange,
             "stale": stale}
    return {**parts, "total": sum(parts.values()), "mode": mode, "world": int(world), "bands": bands,
            "band_tokens": own, "call_batch": call_batch, "itemsize": itemsize}


def _advice(estimate: dict[str, Any]) -> str:
    mode, tips = estimate.get("mode"), []
    if estimate.get("stale", 0) > 0:
        if mode == "displaced":
            tips.append("mode partial (keeps only windows of the neighbour bands) or exact (keeps nothing "
                        "between steps)")
        else:
            tips.append("a smaller partial_fraction, or mode exact (keeps nothing between steps)")
    tips.append("more devices (smaller bands)")
    tips.append("a smaller image or batch")
    if estimate.get("weights", 0) > estimate.get("total", 0) // 2:
        tips.append("a smaller or fp16 model")
    return "; ".join(tips)


def check_plan_fits(estimate: dict[str, Any], free_bytes_per_device: dict[str, int] | Sequence[int]) -> None:
    """Raise MemoryPlanError when the estimated peak exceeds a device's free memory."""
    items = (free_bytes_per_device.items() if isinstance(free_bytes_per_device, dict)
             else enumerate(free_bytes_per_device))
    need = int(estimate["total"] * HEADROOM)
    short = [(dev, int(free)) for dev, free in items if free is not None and need > int(free)]
    if not short:
        return
    dev, free = min(short, key=lambda t: t[1])
    parts = ", ".join(f"{k} {_gib(estimate[k])}" for k in ("weights", "activations", "exchange", "stale"))
    raise MemoryPlanError(
        f"This {estimate['mode']} run needs about {_gib(need)} per device ({parts}) but {dev} has only "
        f"{_gib(free)} free ({len(short)} device(s) short). To fit, use: {_advice(estimate)}. "
        f"Set {SKIP_ENV}=1 to skip this check if the estimate is wrong for your setup."
    )


# ------------------------------------------------------------------------------------ preflight
def free_bytes(devices: Sequence[str]) -> dict[str, int]:
    """Free memory per distinct device: CUDA from torch.cuda.mem_get_info plus what submit.run_sampling
    frees before the workers start (ComfyUI's loaded models on its main device, this process's cached
    blocks); CPU devices share the host's available RAM (psutil, else os.sysconf), reported once as
    "cpu". A device that cannot be queried is left out (no check for it)."""
    out: dict[str, int] = {}
    for dev in dict.fromkeys(devices):
        if str(dev).startswith("cuda"):
            try:
                out[dev] = int(torch.cuda.mem_get_info(torch.device(dev))[0]) + _reclaimable(dev)
            except Exception as e:  # noqa: BLE001 - no driver, no such device: nothing to check
                log.debug("HiRes Parallel: no free-memory reading for %s (%s)", dev, e)
        elif "cpu" not in out:
            avail = _host_available()
            if avail is not None:
                out["cpu"] = avail
    return out


def _reclaimable(dev: str) -> int:
    """Bytes on ``dev`` that run_sampling frees before the workers load (unload_all_models and
    soft_empty_cache): the loaded size of ComfyUI's models there, and this process's cached blocks."""
    total = 0
    try:
        d = torch.device(dev)
        total += int(torch.cuda.memory_reserved(d) - torch.cuda.memory_allocated(d))
    except Exception:  # noqa: BLE001
        pass
    try:
        import sys

        mm = sys.modules.get("comfy.model_management")  # only when ComfyUI is running here
        if mm is not None and torch.device(dev) == torch.device(mm.get_torch_device()):
            for lm in list(getattr(mm, "current_loaded_models", [])):
                total += int(lm.model_loaded_memory())
    except Exception:  # noqa: BLE001
        pass
    return max(0, total)


def _host_available() -> int | None:
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except Exception:  # noqa: BLE001
        try:
            return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
        except (ValueError, OSError, AttributeError):
            return None


def _weights_bytes(model: Any) -> int:
    size = getattr(model, "model_size", None)
    if callable(size):
        try:
            return int(size())
        except Exception:  # noqa: BLE001
            pass
    inner = getattr(model, "model", model)
    return int(sum(t.numel() * t.element_size() for t in inner.state_dict().values()))


def _compute_dtype(model: Any) -> torch.dtype:
    inner = getattr(model, "model", None)
    for name in ("manual_cast_dtype",):
        dt = getattr(inner, name, None)
        if isinstance(dt, torch.dtype):
            return dt
    get = getattr(inner, "get_dtype", None)
    if callable(get):
        try:
            dt = get()
            if isinstance(dt, torch.dtype):
                return dt
        except Exception:  # noqa: BLE001
            pass
    return torch.float32


def check_preflight_memory(model: Any, latent_image: torch.Tensor, devices: Sequence[str], spec: Any, plan: Any,
                           has_negative: bool) -> dict[str, Any] | None:
    """submit.preflight's memory check: estimate the plan and refuse it when it cannot fit.

    CUDA: each device's estimate against its own free memory. CPU: the ranks share the host's RAM and
    the base weights (shared memory), so weights once plus every rank's working memory against the
    available RAM; only a plan over that is refused. Skipped with HIRES_PARALLEL_SKIP_MEMORY_CHECK=1.
    Returns the estimate (None when skipped)."""
    if os.environ.get(SKIP_ENV, "").strip() not in ("", "0"):
        return None
    dm = model.get_model_object("diffusion_model")
    late = getattr(spec, "partial_fraction_late", None)
    common = dict(weights_bytes=_weights_bytes(model), latent_shape=tuple(latent_image.shape),
                  dtype=_compute_dtype(model), world=len(devices), bands=plan.bands_per_group,
                  cfg_parallel=bool(spec.cfg_parallel), mode=spec.mode,
                  fraction=float(getattr(spec, "partial_fraction", 0.3)), fraction_late=late,
                  has_negative=has_negative, band_weights=getattr(spec, "weights", None))
    try:
        est = estimate_dit_plan(layout=dit_layout(dm), **common)
    except (AttributeError, TypeError):  # not a DiT family: a UNet, or a model the support check refuses
        try:
            est = estimate_plan(layout=unet_layout(dm), **common)
        except (AttributeError, TypeError) as e:
            log.debug("HiRes Parallel: no memory estimate for this model (%s)", e)
            return None
    free = free_bytes(devices)
    cuda = {d: f for d, f in free.items() if d != "cpu"}
    try:
        if cuda:
            check_plan_fits(est, cuda)
        if "cpu" in free:
            n_cpu = sum(1 for d in devices if not str(d).startswith("cuda"))
            host = dict(est, total=est["weights"] + n_cpu * (est["total"] - est["weights"]))
            check_plan_fits(host, {"the host (RAM shared by %d CPU ranks)" % n_cpu: free["cpu"]})
    except MemoryPlanError as e:
        from ..runtime.submit import ParallelInputError  # lazily: submit imports this module

        raise ParallelInputError(str(e)) from None
    return est
