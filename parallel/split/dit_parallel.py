"""Sequence (patch) parallelism for ComfyUI's DiTs: Flux, SD3 / SD3.5, Qwen-Image, Wan, through ComfyUI's seams.

``apply_dit_parallel(model, runtime)`` returns a CLONE of a ModelPatcher that, on every rank of a
parallel run, computes the transformer on this rank's band of image tokens and hands ComfyUI the full
output. The model's own ``forward`` runs unchanged on the FULL latent up to its first block, so
patchifying, padding and positions (rotary ids, SD3's position table) are ComfyUI's own; then:

* an ``APPLY_MODEL`` wrapper (every family calls it, SD3's MMDiT has no diffusion-model wrapper) cuts the
  batch for CFG parallel, works out the token grid and this rank's band (tokens.py), cuts ControlNet
  residuals to the band, adds the attention override to ``transformer_options`` and marks the call active;
* ``patches_replace["dit"]`` block patches: the first block to run cuts the image tokens to the band
  (text tokens stay whole), and every block gets the rotary embedding cut the same way;
* the output module (``head`` in dit_families.py) is swapped for a twin that gathers every band's
  output tokens, so the model's unpatchify sees the whole image;
* ``transformer_options["optimized_attention_override"]``: inside the attention scope (joint blocks, or
  Wan's self-attention), this band's queries attend to every band's keys / values: gathered, or Ulysses
  all-to-all over heads, or the stale engine's K/V of the previous step (displaced, partial).
  Text cross-attention, MLPs, norms and modulation are token-wise and run on the band alone.

LoRA on any weight works (the modules keep their weights; twins share ``__dict__``). Every rank runs
ComfyUI's sampler on the full latent with the same noise, so exact modes equal one device up to float
rounding.
"""
from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import torch

from .comm import BandGroup, gather_batch
from .displaced import StaleCall
from .dit_families import DitFamily, dit_family, is_dit
from .ring_attention import lse_attention_available
from .seq_attention import gathered_kv_attention, ring_kv_attention, ulysses_applies, ulysses_attention
from .tokens import TokenGrid, assemble, cut_tokens, token_grid
from .trace import note_layer
from .twins import twin
from .unet_parallel import WRAPPER_KEY, BandParallelRuntime, UnsupportedModel

__all__ = ["ATTENTION_MODES", "check_dit_support", "resolve_attention", "apply_dit_parallel", "dit_split_info"]

ATTENTION_MODES = ("auto", "gathered_kv", "ulysses")
# kwargs of a model call that carry more image tokens than the latent's (the cut assumes the image
# tokens are the last ones in the sequence, after the text).
_REFERENCE_KWARGS = {"ref_latents": "reference latents (Flux Kontext, Qwen-Image Edit)",
                     "reference_latent": "a reference latent (Wan)", "time_dim_concat": "time-concatenated latents",
                     "vace_context": "VACE context"}


def _diffusion_model(model: Any) -> Any:
    return model.get_model_object("diffusion_model")


def _foreign_patches(transformer_options: dict, ours: type) -> list[str]:
    names = [f'"{k}" patches' for k, v in (transformer_options.get("patches", {}) or {}).items() if v]
    for kind, reps in (transformer_options.get("patches_replace", {}) or {}).items():
        for key, rep in (reps or {}).items():
            if not isinstance(rep, ours):
                names.append(f"{kind} replace {key}")
    return names


def check_dit_support(model: Any) -> DitFamily:
    """The DiT family of ``model`` (a ModelPatcher), or UnsupportedModel saying what to change."""
    dm = _diffusion_model(model)
    fam = dit_family(dm)
    if fam is None:
        known = ", ".join(f.name for f in _families())
        raise UnsupportedModel(
            f"patch-parallel sampling splits UNets (SD1.x, SD2.x, SDXL) and the DiT families {known}; this model's "
            f"diffusion model is {type(dm).__module__}.{type(dm).__qualname__}, which is not split yet: use 1 device"
        )
    to = (getattr(model, "model_options", {}) or {}).get("transformer_options", {}) or {}
    names = _foreign_patches(to, _BlockCut)
    if names:
        raise UnsupportedModel(
            f"the {fam.name} model carries patches that see every image token: {', '.join(names)} (added by nodes "
            f"such as model-patch ControlNets, PuLID, caching or block-swap nodes); remove it or use 1 device"
        )
    return fam


def _families():
    from .dit_families import FAMILIES

    return FAMILIES


def resolve_attention(attention: str, heads: int, bands: int) -> str:
    """"gathered_kv" or "ulysses" for a run; "auto" takes Ulysses where it applies and moves fewer bytes
    (heads divisible by the bands, and more than 2 bands: at 2 the two move the same bytes)."""
    if attention not in ATTENTION_MODES:
        raise ValueError(f"sequence attention must be one of {ATTENTION_MODES}; got {attention!r}")
    if attention == "ulysses":
        if not ulysses_applies(heads, bands):
            raise UnsupportedModel(
                f"Ulysses attention splits the model's {heads} attention heads over the {bands} bands, and {heads} "
                f"does not divide by {bands}: use a device count that divides {heads}, or sequence attention "
                f"gathered_kv / auto"
            )
        return "ulysses"
    if attention == "auto" and bands > 2 and ulysses_applies(heads, bands):
        return "ulysses"
    return "gathered_kv"


def dit_split_info(model: Any, latent_shape, bands: int, weights=None) -> dict[str, Any]:
    """The family, token grid and band split a run of ``model`` on ``latent_shape`` would use (preflight);
    raises LayoutError when the latent cannot be split into ``bands``."""
    fam = check_dit_support(model)
    dm = _diffusion_model(model)
    if fam.video != (len(latent_shape) == 5) and not (fam.name == "Qwen-Image" and len(latent_shape) in (4, 5)):
        raise UnsupportedModel(f"a {fam.name} model takes {'5' if fam.video else '4'}-D latents; got shape "
                               f"{tuple(latent_shape)}")
    grid = token_grid(latent_shape, fam.patch(dm), bands, weights)
    return {"family": fam.name, "grid": grid, "heads": fam.heads(dm)}


# ------------------------------------------------------------------------------------ the active call
_ACTIVE = threading.local()


class _DitCall:
    """What the hooks of one model call on this rank need: the band, its tokens, the mode."""

    def __init__(self, fam: DitFamily, band: BandGroup, grid: TokenGrid, attention: str,
                 call: StaleCall | None, overlap: bool = False) -> None:
        self.fam, self.band, self.grid, self.attention, self.call = fam, band, grid, attention, call
        self.overlap = overlap  # exact gathered K/V: overlap the exchange with attention (ring_kv_attention)
        self.start, self.end = band.rows  # in units of the split axis
        self.sizes = [(e - s) * grid.width for s, e in band.bands]  # image tokens per band
        self.local = self.sizes[band.index]
        self.cut_done = False
        self.scope = 0
        self.attention_calls = 0
        self._pe: tuple[Any, torch.Tensor] | None = None

    def cut(self, t: torch.Tensor, dim: int) -> torch.Tensor:
        """``t`` (text prefix + every image token along ``dim``) cut to prefix + this band's tokens."""
        prefix = t.shape[dim] - self.grid.tokens
        if prefix < 0:
            raise RuntimeError(f"{self.fam.name}: expected at least {self.grid.tokens} tokens along dim {dim}, "
                               f"got {t.shape[dim]}")
        return cut_tokens(t, dim, self.grid, self.start, self.end, prefix)

    def cut_pe(self, pe: torch.Tensor) -> torch.Tensor:
        if self._pe is None or self._pe[0] is not pe:  # the same embedding goes to every block: cut once
            self._pe = (pe, self.cut(pe, self.fam.pe_dim))  # type: ignore[arg-type]
        return self._pe[1]

    def gather(self, out: torch.Tensor) -> torch.Tensor:
        """Every band's output tokens (dim 1), in the model's token order."""
        if out.shape[1] != self.local:
            raise RuntimeError(f"{self.fam.name}: the output module got {out.shape[1]} tokens, expected this band's "
                               f"{self.local}")
        note_layer(self.band.stats, label="output")
        full = self.band.gather_tokens(out.contiguous(), dim=1, kind="output", sizes=self.sizes)
        if self.grid.contiguous:
            return full
        return assemble(list(full.split(self.sizes, dim=1)), 1, self.grid)


def _active() -> _DitCall | None:
    return getattr(_ACTIVE, "call", None)


@contextmanager
def _call_active(state: _DitCall) -> Iterator[None]:
    prev = _active()
    _ACTIVE.call = state
    try:
        yield
    finally:
        _ACTIVE.call = prev


# ------------------------------------------------------------------------------------ seams
class _BlockCut:
    """``patches_replace["dit"]`` entry: the block on this band's image tokens, with the rotary embedding
    cut the same way. The first block of a call cuts the image tokens; later blocks get them cut."""

    def __call__(self, args: dict, extra: dict) -> dict:
        st = _active()
        if st is None:
            return extra["original_block"](args)
        args = dict(args)
        if st.band.stats.trace is not None:
            note_layer(st.band.stats, label=f"{extra.get('block_type', 'block')}.{extra.get('block_index', '')}")
        if not st.cut_done:
            args["img"] = st.cut(args["img"], 1)
            st.cut_done = True
        if st.fam.pe_dim is not None and isinstance(args.get("pe"), torch.Tensor):
            args["pe"] = st.cut_pe(args["pe"])
        if st.fam.scope != "block":
            return extra["original_block"](args)
        st.scope += 1
        try:
            return extra["original_block"](args)
        finally:
            st.scope -= 1

    def __deepcopy__(self, memo: dict) -> "_BlockCut":
        return self  # stateless: ModelPatcher.clone deep-copies model_options


def _scope_forward(self: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
    """Self-attention module twin (Wan): attention inside it is over image tokens."""
    st = _active()
    if st is None:
        return self._hp_base.forward(self, *args, **kwargs)
    st.scope += 1
    try:
        return self._hp_base.forward(self, *args, **kwargs)
    finally:
        st.scope -= 1


def _head_forward(self: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
    """Output module twin: its band's output, then every band's tokens gathered in the model's order."""
    out = self._hp_base.forward(self, *args, **kwargs)
    st = _active()
    if st is None or not st.cut_done or st.band.size == 1:
        return out
    return st.gather(out)


class _SequenceAttention:
    """``optimized_attention_override``: image attention over every band's tokens (any other attention,
    and everything outside a band-parallel call, goes to the model's attention function as is)."""

    def __init__(self, state: _DitCall, inner: Callable | None) -> None:
        self.state, self.inner = state, inner

    def _run(self, func: Callable, *args: Any, **kwargs: Any) -> Any:
        return self.inner(func, *args, **kwargs) if self.inner is not None else func(*args, **kwargs)

    def __call__(self, func: Callable, *args: Any, **kwargs: Any) -> Any:
        st = self.state
        if st.scope <= 0 or not st.cut_done or st.band.size == 1:
            return self._run(func, *args, **kwargs)
        q, k, v, *rest = args
        kw = dict(kwargs)
        heads = rest.pop(0) if rest else kw.pop("heads")
        mask = rest.pop(0) if rest else kw.pop("mask", None)
        if mask is not None:
            raise UnsupportedModel(f"{st.fam.name}: an attention mask over image tokens (e.g. masked text padding) "
                                   f"is not split yet; use 1 device")
        if rest:
            raise RuntimeError(f"{st.fam.name}: unexpected positional attention arguments {len(rest)}")
        skip = bool(kw.pop("skip_reshape", False))
        skip_out = bool(kw.pop("skip_output_reshape", False))
        # (B, L, H, D) views of the model's layout
        if skip:
            qn, kn, vn = (t.transpose(1, 2) for t in (q, k, v))
        else:
            # (B, L, H * D), or (B, L, H, D) as SD3 passes v: the attention functions view them alike
            qn, kn, vn = (t.reshape(t.shape[0], t.shape[1], heads, -1) for t in (q, k, v))
        if kn.shape[1] != qn.shape[1]:  # a cross-attention inside the scope: nothing to split
            return self._run(func, *args, **kwargs)
        prefix = qn.shape[1] - st.local
        if prefix < 0:
            raise RuntimeError(f"{st.fam.name}: attention over {qn.shape[1]} tokens inside a band of {st.local}")

        def attend(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
            out = self._run(func, a.transpose(1, 2), b.transpose(1, 2), c.transpose(1, 2), a.shape[2], mask=None,
                            skip_reshape=True, skip_output_reshape=True, **kw)
            return out.transpose(1, 2)

        st.attention_calls += 1
        if st.call is not None and (st.call.stale or st.call.record):
            call, width = st.call, st.grid.width
            heights = [e - s for s, e in st.band.bands]
            out = gathered_kv_attention(attend, qn, kn, vn, prefix, st.band, st.sizes,
                                        exchange=lambda a, b: call.kv(a, b, width, heights))
        elif st.attention == "ulysses":
            out = ulysses_attention(attend, qn, kn, vn, prefix, st.band, st.sizes)
        elif st.overlap and self.inner is None and lse_attention_available(qn, None, func):
            out = ring_kv_attention(qn, kn, vn, prefix, st.band, st.sizes)
        else:
            out = gathered_kv_attention(attend, qn, kn, vn, prefix, st.band, st.sizes)
        if skip_out:
            return out.transpose(1, 2)
        return out.reshape(out.shape[0], out.shape[1], -1)


# ------------------------------------------------------------------------------------ the wrapper
class DitParallel:
    """The APPLY_MODEL wrapper of one job on one rank (shares the runtime's plan, groups and counters)."""

    def __init__(self, runtime: BandParallelRuntime, fam: DitFamily, patch: tuple[int, int, int], heads: int,
                 attention: str) -> None:
        self.runtime, self.fam, self.patch, self.heads = runtime, fam, patch, heads
        self.attention = resolve_attention(attention, heads, runtime.plan.bands_per_group)

    def __call__(self, executor: Callable, x: torch.Tensor, t: torch.Tensor, c_concat: Any, c_crossattn: Any,
                 control: Any, transformer_options: dict, **kwargs: Any) -> torch.Tensor:
        rt, fam = self.runtime, self.fam
        names = _foreign_patches(transformer_options, _BlockCut)
        if names:
            raise UnsupportedModel(f"this sampling run carries patches that see every image token: {', '.join(names)}; "
                                   f"remove it or use 1 device")
        for key, what in _REFERENCE_KWARGS.items():
            if kwargs.get(key) is not None:
                raise UnsupportedModel(f"{fam.name}: {what} add image tokens beside the latent's and are not split "
                                       f"yet; remove them or use 1 device")
        batch = x.shape[0]
        before = rt.snapshot()
        sigma, step, slot = rt.step_of(transformer_options)
        to = dict(transformer_options)
        if fam.video and kwargs.get("denoise_mask") is not None:
            raise UnsupportedModel(f"{fam.name}: a denoise mask gives every frame its own timestep (Wan 2.2 "
                                   f"image-to-video), which is not split yet; use 1 device")
        values = {"x": x, "t": t, "c_concat": c_concat, "c_crossattn": c_crossattn, **kwargs}
        cut = rt.cut_batch(batch, values, to)
        x, t, c_concat, c_crossattn = (values.pop(k) for k in ("x", "t", "c_concat", "c_crossattn"))
        grid = token_grid(tuple(x.shape), self.patch, rt.plan.bands_per_group, rt.weights)
        band = rt.band_for(grid.units, 1)
        call = None
        if rt.stale is not None and band.size > 1:
            call = rt.stale.begin_call(step, slot, sigma, (tuple(x.shape), tuple(band.bands), grid.axis), band,
                                       x.device)
        state = _DitCall(fam, band, grid, self.attention, call, rt.overlap and call is None)
        if band.size > 1:
            to["optimized_attention_override"] = _SequenceAttention(state, to.get("optimized_attention_override"))
        control = _cut_control(control, state, cut, batch)
        with _call_active(state):
            out = executor(x, t, c_concat, c_crossattn, control, to, **values)
        if call is not None:
            rt.stale.end_call(call)  # type: ignore[union-attr]
        if band.size > 1 and not (state.cut_done and state.attention_calls):
            raise RuntimeError(f"{fam.name}: the model ran without its blocks' patch-parallel hooks "
                               f"(cut {state.cut_done}, attention calls {state.attention_calls})")
        if cut is not None:
            note_layer(rt.stats, label="cfg_batch")
            out = gather_batch(out, rt.peer_group, rt.stats, sizes=rt.batch_sizes(batch))
        rt.record_call(sigma, step, slot, call, batch, out.shape[0] if cut is None else cut[1] - cut[0], band.rows,
                       before, axis=grid.axis, attention="stale_kv" if call is not None and call.stale else
                       self.attention)
        return out

    def __deepcopy__(self, memo: dict) -> "DitParallel":
        return self


def _cut_control(control: Any, state: _DitCall, cut: tuple[int, int] | None, batch: int) -> Any:
    """ControlNet residuals (B, image tokens, C) cut to this batch group's samples and this band's tokens."""
    if not control:
        return control

    def one(c: Any) -> Any:
        if c is None:
            return c
        if not isinstance(c, torch.Tensor) or c.dim() != 3 or c.shape[1] != state.grid.tokens:
            shape = tuple(c.shape) if isinstance(c, torch.Tensor) else type(c).__name__
            raise UnsupportedModel(f"{state.fam.name}: a ControlNet residual of shape {shape} is not one entry per "
                                   f"image token ({state.grid.tokens}), so it cannot be cut into bands; use 1 device")
        if cut is not None and c.shape[0] == batch:
            c = c[cut[0]:cut[1]]
        return state.cut(c, 1)

    return {key: [one(c) for c in items] if isinstance(items, (list, tuple)) else items
            for key, items in control.items()}


# ------------------------------------------------------------------------------------ apply
def apply_dit_parallel(model: Any, runtime: BandParallelRuntime, attention: str = "auto") -> Any:
    """A clone of ``model`` (a ModelPatcher) whose DiT evaluates this rank's band of image tokens.

    Only the clone's own object patches, model_options and wrappers change. Raises UnsupportedModel (see
    ``check_dit_support``) before any change."""
    import comfy.patcher_extension

    fam = check_dit_support(model)
    if model.get_wrappers(comfy.patcher_extension.WrappersMP.APPLY_MODEL, WRAPPER_KEY):
        raise ValueError("this model is already patched for patch-parallel sampling; apply it to the original model")
    dm = _diffusion_model(model)
    clone = model.clone()
    cut = _BlockCut()
    for kind, attr in fam.blocks:
        for i, block in enumerate(getattr(dm, attr)):
            clone.set_model_patch_replace(cut, "dit", kind, i)
            if fam.scope != "block":
                key = f"diffusion_model.{attr}.{i}.{fam.scope}"
                clone.add_object_patch(key, twin(clone.get_model_object(key), "Scope", _scope_forward))
    key = f"diffusion_model.{fam.head}"
    clone.add_object_patch(key, twin(clone.get_model_object(key), "Gather", _head_forward))
    wrapper = DitParallel(runtime, fam, fam.patch(dm), fam.heads(dm), attention)
    clone.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, WRAPPER_KEY, wrapper)
    return clone


def is_dit_model(model: Any) -> bool:
    """True when ``model`` (a ModelPatcher) holds a patchified transformer rather than a UNet."""
    return is_dit(_diffusion_model(model))
