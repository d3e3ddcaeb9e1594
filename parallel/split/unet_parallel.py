"""Exact patch parallelism for ComfyUI UNets (SD1.x / SD2.x / SDXL), through ComfyUI's own seams.

``apply_band_parallel(model, runtime)`` returns a CLONE of a ModelPatcher that, on every rank of a
parallel run, evaluates the UNet on this rank's row band only and hands ComfyUI the full output:

* a ``WrappersMP.DIFFUSION_MODEL`` wrapper (key "hires_parallel") slices the batch (CFG parallel),
  the rows of ``x`` and of ControlNet residuals, marks the band as active for the duration of the
  call, and gathers the output rows (and batch halves) at the end;
* object patches swap every Conv2d that looks across rows (kernel height > 1 or stride > 1) and every
  GroupNorm for a band-aware twin of the SAME module (same ``__dict__``, so ComfyUI's weight loading
  and LoRA patches keyed by parameter name land in it), which uses ``band_conv2d`` /
  ``band_group_norm`` while a band is active and the original forward otherwise;
* ``attn1`` replace patches (q, k, v already projected, so LoRA on to_k / to_v is honoured) attend
  with the keys and values of all bands, through ComfyUI's own ``optimized_attention``.

Cross-attention, 1x1 convolutions, linear layers and LayerNorm are local to a band and untouched
(cross-attention gets the current call's conditioning, so there is no text K/V cache to invalidate).
Every rank runs ComfyUI's sampler loop on the full latent with the same noise; only the model
evaluation is split, so the result equals the single-device one up to float rounding. World size 1
goes through the same code without torch.distributed. The UNet's input conv takes its halo rows from
the full latent every rank holds (no exchange).

With ``StaleOptions`` (modes displaced / partial, see displaced.py) the same hooks reuse the other
bands' data of the previous step after ``warmup`` exact steps instead of waiting for fresh data.
"""
from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
import torch.distributed as dist

from .band_ops import (band_conv2d, band_conv_geometry, band_group_norm, band_kv, conv_band_rows,
                       conv_band_rows_overlapped)
from .comm import BandGroup, CommStats, gather_batch
from .displaced import StaleCall, StaleEngine, StaleOptions, StepClock
from .layout import LayoutError, ParallelPlan, split_rows
from .ring_attention import lse_attention_available, overlapped_kv_attention
from .trace import ExchangeTrace, note_layer
from .twins import twin

__all__ = [
    "WRAPPER_KEY",
    "UNSPLITTABLE_PATCHES",
    "UnsupportedModel",
    "check_band_parallel_support",
    "BandParallelRuntime",
    "apply_band_parallel",
    "active_band",
    "band_rows",
    "slice_control",
]

WRAPPER_KEY = "hires_parallel"
# transformer_options["patches"] entries that see or change whole feature maps (Deep Shrink, FreeU,
# HyperTile, ToMe, hypernetworks, GLIGEN, ...): a band cannot compute them alone.
UNSPLITTABLE_PATCHES = (
    "input_block_patch",
    "input_block_patch_after_skip",
    "output_block_patch",
    "middle_patch",
    "attn1_patch",
    "attn1_output_patch",
    "forward_timestep_embed_patch",
)
_TO_KEY = "hires_parallel_band"  # transformer_options entry telling patches which rows they see


class UnsupportedModel(ValueError):
    """The model (or a patch on it) cannot be sampled patch-parallel; the message says what to change."""

    user_facing = True


# ------------------------------------------------------------------------------------ active band
_ACTIVE = threading.local()


def active_band() -> BandGroup | None:
    """The band the UNet call running on this thread computes, or None outside a band-parallel call."""
    return getattr(_ACTIVE, "band", None)


class _CallState:
    """What the layers of one band-parallel UNet call need besides the band: the band's input (to
    recognise the UNet's input conv), the full input it was cut from, and the stale call, if any."""

    __slots__ = ("x_band", "x_full", "call", "overlap")

    def __init__(self, x_band: torch.Tensor | None, x_full: torch.Tensor | None, call: StaleCall | None,
                 overlap: bool = False) -> None:
        self.x_band, self.x_full, self.call, self.overlap = x_band, x_full, call, overlap


def _call_state() -> _CallState | None:
    return getattr(_ACTIVE, "state", None)


def _stale_call() -> StaleCall | None:
    """The displaced / partial call running here when it reads or records stale data, else None
    (exact mode, or an early warmup step: the plain exact ops)."""
    state = _call_state()
    call = None if state is None else state.call
    return call if call is not None and (call.stale or call.record) else None


@contextmanager
def _band_active(band: BandGroup, state: _CallState | None = None) -> Iterator[None]:
    prev, prev_state = active_band(), _call_state()
    _ACTIVE.band, _ACTIVE.state = band, state
    try:
        yield
    finally:
        _ACTIVE.band, _ACTIVE.state = prev, prev_state


# ------------------------------------------------------------------------------------ geometry
def band_rows(bands: Sequence[tuple[int, int]], index: int, factor: int = 1) -> tuple[int, int]:
    """Rows ``[start, end)`` of band ``index`` at a UNet level downsampled by ``factor``.

    Band starts are multiples of the alignment, so they divide exactly; the last band runs to the
    level's full height ``ceil(H / factor)`` (stride-2 convolutions round up).
    """
    f = int(factor)
    s, e = bands[index]
    if index == len(bands) - 1:
        return s // f, -(-bands[-1][1] // f)
    return s // f, e // f


def _level_factor(height: int, full_height: int, max_factor: int) -> int:
    """The power-of-two downsampling factor f <= max_factor with ceil(full_height / f) == height."""
    f = 1
    while f <= max_factor:
        if -(-full_height // f) == height:
            return f
        f *= 2
    raise ValueError(
        f"a tensor of {height} rows is at no UNet level of a {full_height}-row latent "
        f"(downsampling factors 1..{max_factor}); it cannot be split into row bands"
    )


def slice_control(
    control: Mapping[str, Any] | None,
    bands: Sequence[tuple[int, int]],
    index: int,
    max_factor: int,
    batch: tuple[int, int, int] | None = None,
) -> dict[str, list] | None:
    """ControlNet residuals (``{"input": [...], "middle": [...], "output": [...]}``) cut to one band.

    Each tensor keeps the rows of band ``index`` at its own resolution (found from its height; levels
    are powers of two up to ``max_factor``); None entries stay None. ``batch`` = (lo, hi, B) keeps
    samples lo..hi of tensors whose batch is B (CFG parallel). Returns new lists: ComfyUI pops them.
    """
    if control is None:
        return None
    full = bands[-1][1]
    out: dict[str, list] = {}
    for key, items in control.items():
        if not isinstance(items, (list, tuple)):
            out[key] = items
            continue
        cut = []
        for t in items:
            if isinstance(t, torch.Tensor) and t.dim() >= 2:
                if batch is not None and t.shape[0] == batch[2]:
                    t = t[batch[0] : batch[1]]
                f = _level_factor(t.shape[-2], full, max_factor)
                s, e = band_rows(bands, index, f)
                t = t[..., s:e, :]
            cut.append(t)
        out[key] = cut
    return out


def _chunk_slice(items: list, batch: int, lo: int, hi: int) -> list:
    """Entries of a per-chunk list (cond_or_uncond, uuids) whose chunk overlaps samples [lo, hi)."""
    n = len(items)
    if n == 0 or batch % n:
        return list(items)
    per = batch // n
    return [v for i, v in enumerate(items) if i * per < hi and (i + 1) * per > lo]


# ------------------------------------------------------------------------------------ support check
def _diffusion_model(model: Any) -> Any:
    if hasattr(model, "get_model_object"):
        return model.get_model_object("diffusion_model")
    return getattr(getattr(model, "model", model), "diffusion_model", None)


def _unet_classes() -> tuple[type, type, type, tuple[type, ...]]:
    """(UNetModel, Downsample, Upsample, video layer classes) of ComfyUI's openaimodel."""
    from comfy.ldm.modules.attention import SpatialVideoTransformer
    from comfy.ldm.modules.diffusionmodules import openaimodel

    video = (openaimodel.VideoResBlock, SpatialVideoTransformer)
    return openaimodel.UNetModel, openaimodel.Downsample, openaimodel.Upsample, video


def _foreign_patch_names(transformer_options: Mapping[str, Any]) -> list[str]:
    names = []
    patches = transformer_options.get("patches", {}) or {}
    for name in UNSPLITTABLE_PATCHES:
        if patches.get(name):
            names.append(name)
    for key, patch in (transformer_options.get("patches_replace", {}) or {}).get("attn1", {}).items():
        if not isinstance(patch, _BandSelfAttention):
            names.append(f"attn1 replace {key}")
    return names


# Methods a layer class may define without changing what the band layer computes in its place.
_HARMLESS_LAYER_METHODS = frozenset({"__init__", "reset_parameters", "extra_repr", "__repr__", "__str__",
                                     "__getstate__", "__setstate__", "__init_subclass__"})


def _layer_owner(cls: type) -> str:
    """'the node pack "X"' for a class of a custom node folder, else its module."""
    import os
    import sys

    module = getattr(cls, "__module__", "") or ""
    f = getattr(sys.modules.get(module), "__file__", None) or ""
    parts = os.path.normpath(f).split(os.sep) if f else []
    if "custom_nodes" in parts[:-1]:
        i = len(parts) - 1 - parts[::-1].index("custom_nodes")
        return f'the node pack "{os.path.splitext(parts[i + 1])[0]}" (module {module})'
    return f"module {module}"


def _foreign_layer(m: torch.nn.Module) -> str | None:
    """Why the band layers would bypass or mishandle layer ``m`` (None when they handle it).

    A swapped layer (see _needs_band_module) keeps its weights but runs the band forward, which does what
    torch's and comfy.ops' own Conv2d / GroupNorm do: any class of another origin in its ancestry that
    defines forward code (GGUF's dequantizing layers, a subclass with its own forward) would be skipped.
    A convolution over rows that is no Conv2d (its own F.conv2d, a transposed conv) would see one band
    without halos.
    """
    cls = getattr(type(m), "_hp_base", type(m))  # a band twin: judge the original class
    if _needs_band_module(m):
        for klass in cls.__mro__:
            module = getattr(klass, "__module__", "") or ""
            if klass is object or module.startswith("torch.") or module == "comfy.ops" or module == __name__:
                continue
            own = sorted(k for k, v in vars(klass).items()
                         if k not in _HARMLESS_LAYER_METHODS and (callable(v) or isinstance(v, (staticmethod,
                                                                                               classmethod, property))))
            if own:
                return (f"its class {cls.__qualname__} of {_layer_owner(cls)} has its own "
                        f"{', '.join(own[:3])} (in {klass.__qualname__}), which the band layer would bypass")
        for pname in ("weight", "bias"):
            t = m.__dict__.get("_parameters", {}).get(pname)
            if t is not None and type(t) not in (torch.Tensor, torch.nn.Parameter):
                return (f"its {pname} is stored as {type(t).__qualname__} of {_layer_owner(type(t))} (a quantized "
                        f"or custom format), which the band layer cannot read")
        return None
    if isinstance(m, torch.nn.Conv2d):
        return None  # a pointwise conv: each band computes its own rows
    if isinstance(m, torch.nn.modules.conv._ConvNd):
        k = m.kernel_size[0] if len(m.kernel_size) else 1
        if k > 1 or (m.stride[0] if len(m.stride) else 1) > 1:
            return f"it is a {type(m).__qualname__} (only Conv2d layers are split into row bands)"
        return None
    for pname, t in m.named_parameters(recurse=False):
        if t.dim() == 4 and t.shape[-2] > 1:
            return (f"its class {type(m).__qualname__} of {_layer_owner(type(m))} holds a {tuple(t.shape[-2:])} "
                    f"convolution weight ({pname}) but is no Conv2d, so it would see one band without halos")
    if "groupnorm" in type(m).__name__.lower() and not isinstance(m, torch.nn.GroupNorm):
        return (f"its class {type(m).__qualname__} of {_layer_owner(type(m))} normalizes over the whole image but is "
                f"no torch GroupNorm, so each band would use its own statistics")
    return None


def check_band_parallel_support(model: Any) -> None:
    """Raise UnsupportedModel when ``model`` (a ModelPatcher) cannot be sampled patch-parallel.

    Supported: ComfyUI's openaimodel UNet (SD1.x, SD2.x, SDXL families) with weight patches (LoRA),
    attn2 (cross-attention) patches and wrappers, built from torch / comfy.ops layers (fp8 casting too).
    Not supported: DiT families, video UNets, patches that see whole feature maps (``UNSPLITTABLE_PATCHES``,
    attn1 replace patches), wrap-around padding, layers of other classes (GGUF, custom ops; see _foreign_layer).
    """
    unet_cls, _, _, video_kinds = _unet_classes()
    dm = _diffusion_model(model)
    if not isinstance(dm, unet_cls):
        raise UnsupportedModel(
            f"patch-parallel sampling needs a UNet model (SD1.x, SD2.x, SDXL), but this model's diffusion model "
            f"is {type(dm).__name__}. DiT families (Flux, SD3) are not supported by patch-parallel sampling yet: "
            f"use 1 device"
        )
    video = [type(m).__name__ for m in dm.modules() if isinstance(m, video_kinds)]
    if video:
        raise UnsupportedModel(
            f"video UNets ({video[0]} layers, e.g. SVD) are not supported by patch-parallel sampling yet: use 1 device"
        )
    options = getattr(model, "model_options", {}) or {}
    names = _foreign_patch_names(options.get("transformer_options", {}) or {})
    if names:
        raise UnsupportedModel(
            f"the model carries patches that cannot be split into row bands: {', '.join(names)} "
            f"(added by nodes such as PatchModelAddDownscale / Kohya Deep Shrink, FreeU, HyperTile, Tomepatch or a "
            f"hypernetwork); remove it or use 1 device"
        )
    for name, m in dm.named_modules():
        if isinstance(m, torch.nn.Conv2d) and m.padding_mode != "zeros":
            raise UnsupportedModel(
                f"convolution diffusion_model.{name} pads with padding_mode={m.padding_mode!r} (e.g. a seamless-tiling "
                f"patch), which cannot be split into row bands; remove it or use 1 device"
            )
        problem = _foreign_layer(m)
        if problem:
            raise UnsupportedModel(
                f"layer diffusion_model.{name} cannot be split into row bands: {problem}. Load the model with "
                f"ComfyUI's own loaders (a GGUF or other quantized loader is not supported yet), or use 1 device"
            )


# ------------------------------------------------------------------------------------ band modules
def _cast_weights(m: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Weight and bias as the module's own forward would use them (ComfyUI casting / lowvram patches)."""
    if getattr(m, "weight", None) is None:
        return None, getattr(m, "bias", None)
    if (
        getattr(m, "comfy_cast_weights", False)
        or len(getattr(m, "weight_function", ())) > 0
        or len(getattr(m, "bias_function", ())) > 0
    ):
        import comfy.ops

        return comfy.ops.cast_bias_weight(m, x)
    return m.weight, m.bias


def _conv_forward(self: torch.nn.Conv2d, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    band = active_band()
    if band is None:
        return self._hp_base.forward(self, x, *args, **kwargs)
    note_layer(band.stats, self)
    weight, bias = _cast_weights(self, x)
    state = _call_state()
    if band.size > 1 and state is not None:
        geo = band_conv_geometry(x, weight, self.stride, self.padding, self.dilation, self.groups, band,
                                 padding_mode=self.padding_mode)
        if x is state.x_band and state.x_full is not None:
            # The UNet's input conv: every rank holds the full latent, so its halo is fresh and free.
            s, e = band.rows
            above = state.x_full[..., s - geo.top : s, :] if geo.top and not band.is_first else None
            below = state.x_full[..., e : e + geo.bottom, :] if geo.bottom and not band.is_last else None
            return conv_band_rows(x, above, below, weight, bias, geo, band)
        call = _stale_call()
        if call is not None:
            return call.conv(x, weight, bias, geo)
        if state.overlap:  # exact, overlapped: interior rows while the halo travels
            return conv_band_rows_overlapped(x, band.start_halo(x, geo.top, geo.bottom), weight, bias, geo, band)
        above, below = band.halo_parts(x, geo.top, geo.bottom)
        return conv_band_rows(x, above, below, weight, bias, geo, band)
    return band_conv2d(
        x, weight, bias, self.stride, self.padding, self.dilation, self.groups, band, padding_mode=self.padding_mode
    )


def _group_norm_forward(self: torch.nn.GroupNorm, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    band = active_band()
    if band is None:
        return self._hp_base.forward(self, x, *args, **kwargs)
    note_layer(band.stats, self)
    weight, bias = _cast_weights(self, x)
    call = _stale_call() if band.size > 1 else None
    if call is not None and call.options.groupnorm == "corrected":
        return call.group_norm(x, self.num_groups, weight, bias, self.eps)
    return band_group_norm(x, self.num_groups, weight, bias, self.eps, band)  # exact, also policy "sync"


def _band_module(module: torch.nn.Module) -> torch.nn.Module:
    """A band-aware twin of a Conv2d or GroupNorm (see twins.py: it shares the module's ``__dict__``)."""
    base = getattr(type(module), "_hp_base", type(module))
    forward = _conv_forward if issubclass(base, torch.nn.Conv2d) else _group_norm_forward
    return twin(module, "Band", forward)


def _needs_band_module(m: torch.nn.Module) -> bool:
    if isinstance(m, torch.nn.GroupNorm):
        return True
    if isinstance(m, torch.nn.Conv2d):
        return m.kernel_size[0] > 1 or m.stride[0] > 1
    return False


# ------------------------------------------------------------------------------------ attention
class _BandSelfAttention:
    """attn1 replace patch: this band's queries against the keys / values of all bands."""

    def __init__(self, factor: int) -> None:
        self.factor = int(factor)  # the block's downsampling level, known from the UNet's structure

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, extra_options: dict) -> torch.Tensor:
        from comfy.ldm.modules import attention

        band = active_band()
        if band is not None and band.size > 1:
            if band.stats.trace is not None:
                block = extra_options.get("block") or ("", "")
                note_layer(band.stats, label=f"{block[0]}.{block[1]}.{extra_options.get('block_index', 0)}.attn1")
            # Token counts from the geometry, identical on every rank (no size exchange needed).
            width = int(extra_options["activations_shape"][-1])
            heights = [e - s for s, e in (band_rows(band.bands, j, self.factor) for j in range(band.size))]
            if heights[band.index] * width != k.shape[1]:
                raise RuntimeError(
                    f"self-attention at {extra_options.get('block')} got {k.shape[1]} tokens, expected "
                    f"{heights[band.index]} x {width} for band {band.index} of {band.bands} at factor {self.factor}"
                )
            call = _stale_call()
            state = _call_state()
            if call is not None:
                k, v = call.kv(k, v, width, heights)
            elif state is not None and state.overlap and lse_attention_available(q, extra_options):
                return overlapped_kv_attention(q, k, v, int(extra_options["n_heads"]), band,
                                               [h * width for h in heights])
            else:
                k, v = band_kv(k, v, band, sizes=[h * width for h in heights])
        return attention.optimized_attention(
            q, k, v, extra_options["n_heads"], attn_precision=extra_options.get("attn_precision"),
            transformer_options=extra_options,
        )

    def __deepcopy__(self, memo: dict) -> "_BandSelfAttention":
        return self  # ModelPatcher.clone deep-copies model_options; the patch is stateless per job

    def __repr__(self) -> str:
        return f"_BandSelfAttention(factor={self.factor})"


def _unet_levels(unet: Any) -> tuple[int, dict[tuple[str, int, int], int]]:
    """(number of downsamplings, {attn1 key: downsampling factor}) of an openaimodel UNet."""
    from comfy.ldm.modules.attention import SpatialTransformer

    _, down_cls, up_cls, _ = _unet_classes()
    keys: dict[tuple[str, int, int], int] = {}

    def visit(name: str, number: int, block: Any, level: int) -> None:
        for layer in block:
            if isinstance(layer, SpatialTransformer):
                for i, tb in enumerate(layer.transformer_blocks):
                    if not getattr(tb, "disable_self_attn", False):  # attn1 on the text: local
                        keys[(name, number, i)] = 2**level

    level = 0
    for i, block in enumerate(unet.input_blocks):
        visit("input", i, block, level)
        if any(isinstance(m, down_cls) for m in block.modules()):
            level += 1
    n_down = level
    if unet.middle_block is not None:
        visit("middle", 0, unet.middle_block, level)
    for i, block in enumerate(unet.output_blocks):
        visit("output", i, block, level)
        if any(isinstance(m, up_cls) for m in block.modules()):
            level -= 1
    return n_down, keys


# ------------------------------------------------------------------------------------ runtime
class BandParallelRuntime:
    """One worker's share of one job: its place in the plan, its process groups, its comm counts.

    Every rank constructs it with the same plan (SPMD); the constructor creates the subgroups in the
    same order on every rank: one band group per batch group, then one peer group per band index
    (groups of one rank are not created). With world size 1 nothing touches torch.distributed.
    ``align`` is the row alignment of band starts (the UNet's total downsampling or a multiple of it);
    ``weights`` are relative band heights, one per band of a batch group. ``stale``: the displaced /
    partial options (None: exact mode).
    """

    def __init__(
        self,
        plan: ParallelPlan,
        rank: int,
        align: int,
        weights: Sequence[float] | None = None,
        stats: CommStats | None = None,
        stale: StaleOptions | None = None,
        trace: bool = False,
        overlap: bool = True,
    ) -> None:
        self.plan = plan
        self.overlap = bool(overlap)  # exact mode: overlap halos and K/V with compute (band_ops, ring_attention)
        self.rank = int(rank)
        self.batch_group, self.band_index = plan.coords(self.rank)
        if int(align) != align or align < 1:
            raise LayoutError(f"the band alignment must be a positive integer, got {align!r}")
        self.align = int(align)
        self.weights = None if weights is None else [float(w) for w in weights]
        if self.weights is not None and len(self.weights) != plan.bands_per_group:
            raise LayoutError(
                f"got {len(self.weights)} device weights for {plan.bands_per_group} bands; give one weight per band"
            )
        self.stats = stats if stats is not None else CommStats()
        if trace:
            self.stats.trace = ExchangeTrace(self.rank)
        self.calls: list[dict[str, Any]] = []  # one entry per UNet call: sigma, step, shapes, bytes by kind
        self.clock = StepClock()  # steps by distinct sigma, slots within a step
        self.stale = None if stale is None else StaleEngine(stale, self.stats)
        self._bands: dict[int, BandGroup] = {}
        self._created: list[Any] = []
        self._closed = False
        self.band_group: Any = None
        self.peer_group: Any = None
        if plan.world_size > 1:
            if not (dist.is_available() and dist.is_initialized()):
                raise RuntimeError(
                    f"a parallel plan of {plan.world_size} ranks needs torch.distributed to be initialised"
                )
            if dist.get_world_size() != plan.world_size or dist.get_rank() != self.rank:
                raise ValueError(
                    f"the process group has rank {dist.get_rank()} of {dist.get_world_size()}, "
                    f"the plan says rank {self.rank} of {plan.world_size}"
                )
            for g in range(plan.batch_groups):
                pg = self._new_group(plan.band_ranks(g))
                if g == self.batch_group:
                    self.band_group = pg
            for b in range(plan.bands_per_group):
                pg = self._new_group(plan.peer_ranks(b))
                if b == self.band_index:
                    self.peer_group = pg

    def _new_group(self, ranks: list[int]) -> Any:
        if len(ranks) == 1:
            return None
        if len(ranks) == self.plan.world_size:
            return None  # the default group already is exactly these ranks
        pg = dist.new_group(ranks)
        self._created.append(pg)
        return pg

    def finish(self) -> None:
        """Wait for the exchanges still in flight (displaced / partial: the last step's sends). Every
        rank calls it at the end of a job that ran to completion; the wait counts towards the last call."""
        if self.stale is None:
            return
        before = dict(self.stats.seconds)
        self.stale.drain()
        if self.calls:
            secs = self.calls[-1].setdefault("seconds", {})
            for k, v in self.stats.seconds.items():
                if v != before.get(k, 0.0):
                    secs[k] = secs.get(k, 0.0) + v - before.get(k, 0.0)

    def step_summary(self) -> list[dict[str, Any]]:
        """Per step (distinct sigma): calls, stale calls, bytes sent / received and seconds waited by kind."""
        steps: dict[int, dict[str, Any]] = {}
        for c in self.calls:
            st = steps.setdefault(c["step"], {"step": c["step"], "sigma": c["sigma"], "calls": 0, "stale_calls": 0,
                                              "sent": {}, "received": {}, "wait_s": {}})
            st["calls"] += 1
            st["stale_calls"] += int(c["stale"])
            for src, dst in (("sent", "sent"), ("received", "received"), ("seconds", "wait_s")):
                for k, v in c.get(src, {}).items():
                    st[dst][k] = st[dst].get(k, 0) + v
        out = [steps[k] for k in sorted(steps)]
        for st in out:
            st["wait_s"] = {k: round(v, 6) for k, v in st["wait_s"].items()}
        return out

    def close(self) -> None:
        """Destroy the subgroups this runtime created (every rank calls it at the end of the job)."""
        for pg in self._created:
            if pg is not None and dist.is_initialized():
                dist.destroy_process_group(pg)
        self._created.clear()
        self._bands.clear()
        self.band_group = self.peer_group = None
        self._closed = True

    def band_for(self, height: int, align: int | None = None) -> BandGroup:
        """This rank's band of ``height`` rows at ``align`` (default: the runtime's; DiTs split token rows
        or frames at 1), cached per (height, align)."""
        if self._closed:
            raise RuntimeError("this BandParallelRuntime was closed; make a new one for the next job")
        align = self.align if align is None else int(align)
        band = self._bands.get((height, align))
        if band is None:
            bands = split_rows(height, self.plan.bands_per_group, align, self.weights)
            band = BandGroup(
                self.plan.band_ranks(self.batch_group), self.rank, bands, group=self.band_group, stats=self.stats
            )
            self._bands[(height, align)] = band
        return band

    def cut_batch(self, batch: int, values: dict[str, Any], transformer_options: dict) -> tuple[int, int] | None:
        """Cut, in place in ``values`` and ``transformer_options``, every batch-sized entry to this batch
        group's samples; returns ``(lo, hi)``, or None when this group computes the whole batch."""
        cut = self.batch_slice(batch)
        if cut is None:
            return None
        lo, hi = cut

        def part(t: Any) -> Any:
            if isinstance(t, torch.Tensor) and t.dim() >= 1 and t.shape[0] == batch:
                return t[lo:hi]
            if isinstance(t, list):
                return [part(i) for i in t]
            return t

        for key in list(values):
            values[key] = part(values[key])
        for key in ("cond_or_uncond", "uuids"):
            if isinstance(transformer_options.get(key), list):
                transformer_options[key] = _chunk_slice(transformer_options[key], batch, lo, hi)
        return cut

    def snapshot(self) -> tuple[dict, dict, dict]:
        """The byte and wait counters before a call (``record_call`` reports the difference)."""
        if self.stats.trace is not None:
            self.stats.trace.begin_call()
        return dict(self.stats.sent), dict(self.stats.received), dict(self.stats.seconds)

    def step_of(self, transformer_options: Mapping[str, Any]) -> tuple[float | None, int, int]:
        """(sigma, step, slot) of a model call: a step starts when sigma changes (displaced.StepClock)."""
        sigma_t = transformer_options.get("sigmas")
        sigma = float(sigma_t.flatten()[0]) if isinstance(sigma_t, torch.Tensor) and sigma_t.numel() else None
        step, slot = self.clock.tick(sigma)
        return sigma, step, slot

    def record_call(self, sigma: float | None, step: int, slot: int, call: StaleCall | None, batch: int,
                    computed: int, rows: tuple[int, int], before: tuple[dict, dict, dict], **extra: Any) -> None:
        """One entry of ``calls``: what a model call computed, its bytes and waits by kind."""
        sent0, recv0, secs0 = before
        if self.stats.trace is not None:
            self.stats.trace.end_call(step, slot)
        self.calls.append({
            "sigma": sigma, "step": step, "slot": slot, "stale": bool(call is not None and call.stale),
            "batch": batch, "computed_batch": computed, "rows": rows,
            "sent": {k: v - sent0.get(k, 0) for k, v in self.stats.sent.items()},
            "received": {k: v - recv0.get(k, 0) for k, v in self.stats.received.items()},
            "seconds": {k: v - secs0.get(k, 0.0) for k, v in self.stats.seconds.items() if v != secs0.get(k, 0.0)},
            **extra,
        })

    def batch_sizes(self, batch: int) -> list[int] | None:
        """How many samples each batch group computes (as equal as possible), or None when every
        group computes the whole batch (one group, or fewer samples than groups, e.g. cfg 1 with CFG
        parallel)."""
        groups = self.plan.batch_groups
        if groups == 1 or batch < groups:
            return None
        return [batch // groups + (1 if g < batch % groups else 0) for g in range(groups)]

    def batch_slice(self, batch: int) -> tuple[int, int] | None:
        """Samples ``[lo, hi)`` this rank's batch group computes, or None for the whole batch."""
        sizes = self.batch_sizes(batch)
        if sizes is None:
            return None
        lo = sum(sizes[: self.batch_group])
        return lo, lo + sizes[self.batch_group]

    # -------------------------------------------------------------- the DIFFUSION_MODEL wrapper
    def diffusion_model_wrapper(
        self,
        executor: Callable,
        x: torch.Tensor,
        timesteps: torch.Tensor,
        context: Any,
        y: Any,
        control: Any,
        transformer_options: dict,
        **kwargs: Any,
    ) -> torch.Tensor:
        names = _foreign_patch_names(transformer_options)  # patches can also arrive with conds (GLIGEN)
        if names:
            raise UnsupportedModel(
                f"this sampling run carries patches that cannot be split into row bands: {', '.join(names)}; "
                f"remove it or use 1 device"
            )
        if x.dim() != 4:
            raise UnsupportedModel(
                f"patch-parallel sampling needs 4-d latents (B, C, H, W), got {tuple(x.shape)}: use 1 device"
            )
        batch, height = x.shape[0], x.shape[-2]
        band = self.band_for(height)
        before = self.snapshot()
        sigma, step, slot = self.step_of(transformer_options)
        to = dict(transformer_options)
        values = {"x": x, "timesteps": timesteps, "context": context, "y": y, **kwargs}
        cut = self.cut_batch(batch, values, to)
        x, timesteps, context, y = (values.pop(k) for k in ("x", "timesteps", "context", "y"))
        kwargs = values
        s, e = band.rows
        to[_TO_KEY] = {"rows": (s, e), "full_height": height, "bands": list(band.bands), "index": band.index}
        control = slice_control(
            control, band.bands, band.index, self.align, None if cut is None else (cut[0], cut[1], batch)
        )
        call = None
        if self.stale is not None and band.size > 1:
            call = self.stale.begin_call(step, slot, sigma, (tuple(x.shape), tuple(band.bands)), band, x.device)
        x_band = x[..., s:e, :]
        with _band_active(band, _CallState(x_band, x, call, self.overlap and call is None)):
            out = executor(x_band, timesteps, context, y, control, to, **kwargs)
        if call is not None:
            self.stale.end_call(call)  # type: ignore[union-attr]
        note_layer(self.stats, label="output")
        out = band.gather_rows(out, sizes=band.heights)
        if cut is not None:
            note_layer(self.stats, label="cfg_batch")
            out = gather_batch(out, self.peer_group, self.stats, sizes=self.batch_sizes(batch))

        self.record_call(sigma, step, slot, call, batch, out.shape[0] if cut is None else cut[1] - cut[0], (s, e),
                         before)
        return out

    def __deepcopy__(self, memo: dict) -> "BandParallelRuntime":
        return self  # holds process groups; clones of the patched model share it

    def __repr__(self) -> str:
        return (
            f"BandParallelRuntime(rank={self.rank}/{self.plan.world_size}, batch_group={self.batch_group}, "
            f"band={self.band_index}/{self.plan.bands_per_group}, align={self.align})"
        )


# ------------------------------------------------------------------------------------ apply
def apply_band_parallel(model: Any, runtime: BandParallelRuntime) -> Any:
    """A clone of ``model`` (a ModelPatcher) that evaluates its UNet on ``runtime``'s band.

    Only the clone's own object patches, model_options and wrappers change; ``model`` is untouched.
    Raises UnsupportedModel (see ``check_band_parallel_support``) before any change.
    """
    import comfy.patcher_extension

    check_band_parallel_support(model)
    if model.get_wrappers(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, WRAPPER_KEY):
        raise ValueError("this model is already patched for patch-parallel sampling; apply it to the original model")
    unet = _diffusion_model(model)
    n_down, attn_keys = _unet_levels(unet)
    if runtime.align % (2**n_down):
        raise LayoutError(
            f"band alignment {runtime.align} does not cover the UNet's total downsampling {2**n_down}; "
            f"use a multiple of {2**n_down}"
        )
    clone = model.clone()
    for name, _ in unet.named_modules():
        if not name:
            continue
        key = f"diffusion_model.{name}"
        module = clone.get_model_object(key)  # respects object patches already on the model
        if _needs_band_module(module):
            band_module = _band_module(module)
            if runtime.stats.trace is not None:
                runtime.stats.trace.names[id(band_module)] = name
            clone.add_object_patch(key, band_module)
    for (block, number, index), factor in attn_keys.items():
        clone.set_model_attn1_replace(_BandSelfAttention(factor), block, number, index)
    clone.add_wrapper_with_key(
        comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, WRAPPER_KEY, runtime.diffusion_model_wrapper
    )
    return clone
