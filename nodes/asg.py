"""Structure-Guided HiRes (ASGDiffusion) as a MODEL patch for any KSampler.

The node clones the model and installs a model function wrapper (``set_model_unet_function_wrapper``):
ComfyUI's sampler keeps working on the high-resolution latent, and every model call on it becomes
native-size model calls on strided views (stage 1, with key-view guidance) or overlapping windows
(stage 2), through ``algorithms.asg.asg_denoise``. Views and windows are batched in chunks of
``view_batch`` samples per UNet call, so memory is bounded.

The cross-attention mask comes from ``attn2`` replace patches on the decoder (output) blocks: while a
stage-1 call is recorded, those layers compute their attention probabilities explicitly (every other
layer keeps ComfyUI's optimized attention), sum them over the prompt tokens, average heads and layers
and hand the map back at the view size.

Everything installed is a module-level class holding plain data, so the patched model can be shipped
to the Patch-Parallel KSampler's workers: with its mode "batch" each UNet call's batch (views x
cond/uncond) is shared out over the devices, and the attention maps of the rows and samples each rank
computed are summed over the process group after the call.
"""
from __future__ import annotations

import logging
import math
from typing import Any, Callable

import torch

import comfy.latent_formats
import comfy.model_base
from comfy_api.v0_0_2 import io

from ..algorithms.asg import (
    MASK_SATURATION,
    SCHEDULES,
    ASGInputError,
    ASGPlan,
    ASGState,
    Piece,
    asg_denoise,
    combine_level_maps,
    prompt_token_mask,
    view_grid,
)
from . import model_info

log = logging.getLogger("hires_parallel")

RECORDER_KEY = "hires_parallel_asg_recorder"  # transformer_options entry of a call whose maps are recorded
BAND_KEY = "hires_parallel_band"  # set by parallel.unet_parallel in exact mode: the rows this rank sees
LATENT_TO_PIXELS = 8  # SD1.x / SD2.x / SDXL / SD3 / Flux VAEs
MASK_LAYERS = ["decoder, coarsest level", "decoder, all levels"]
SDXL_SIZE_EMBEDDINGS = 6 * 256  # height, width, crop_h, crop_w, target_height, target_width


# ------------------------------------------------------------------------------------- model facts


def native_resolution(model) -> int | None:
    """The side in pixels a model family was trained at, or None when we do not know it."""
    fmt = model.get_model_object("latent_format")
    if isinstance(fmt, (comfy.latent_formats.SDXL, comfy.latent_formats.SDXL_Playground_2_5, comfy.latent_formats.SD3)):
        return 1024  # SDXL family, SD3, Flux (a subclass of SD3's format)
    if isinstance(fmt, comfy.latent_formats.SD15):  # SD1.x 512; SD2.x 768-v is the v-prediction one
        return 768 if model.model.model_type == comfy.model_base.ModelType.V_PREDICTION else 512
    return None


def native_latent_side(model, override_px: int) -> int:
    """The native size in latent pixels, checked against the model's total downsampling."""
    px = int(override_px) if override_px else native_resolution(model)
    if px is None:
        raise ASGInputError("This model family's native resolution is not known: set native_resolution "
                            "(e.g. 1024 for SDXL-like models, 512 for SD1.x-like models).")
    side = px // LATENT_TO_PIXELS
    down = model_info.total_downsampling(model)
    if px % LATENT_TO_PIXELS or side < down or side % down:
        raise ASGInputError(f"native_resolution {px} must be a multiple of {down * LATENT_TO_PIXELS} pixels for this "
                            f"model (its latent sides must divide by {down}).")
    return side


def decoder_attention_layers(model) -> dict[int, list[tuple[str, int, int]]]:
    """attn2 keys ("output", block number, transformer index) of the UNet decoder, by downsampling factor."""
    import comfy.ldm.modules.attention as attention
    from comfy.ldm.modules.diffusionmodules import openaimodel

    unet = model_info.diffusion_model(model)
    blocks = getattr(unet, "output_blocks", None)
    if blocks is None or not hasattr(unet, "channel_mult"):
        return {}
    factor = 2 ** (len(unet.channel_mult) - 1)
    levels: dict[int, list[tuple[str, int, int]]] = {}
    for number, block in enumerate(blocks):
        for layer in block:
            if isinstance(layer, attention.SpatialTransformer):
                for index in range(len(layer.transformer_blocks)):
                    levels.setdefault(factor, []).append(("output", number, index))
        if any(isinstance(layer, openaimodel.Upsample) for layer in block):
            factor //= 2  # the upsample closes the block: its attention ran at the coarser level
    return levels


def _parallel_runtime(transformer_options: dict) -> Any:
    """The patch-parallel runtime of this rank (parallel.unet_parallel.BandParallelRuntime), if any."""
    for fns in transformer_options.get("wrappers", {}).get("diffusion_model", {}).values():
        for fn in fns:
            rt = getattr(fn, "__self__", None)
            if rt is not None and hasattr(rt, "batch_slice") and getattr(rt, "plan", None) is not None:
                return rt if rt.plan.world_size > 1 else None
    return None


# --------------------------------------------------------------------------------- attention mask


class _MapRecorder:
    """Collects one UNet call's maps: for every recorded layer, the attention probability on the prompt
    tokens per location (heads averaged), summed per downsampling level into full-size buffers.

    On a rank of a parallel run only its samples (batch mode) or rows (exact mode) are filled; finish()
    sums the buffers and coverage over the process group, so every rank gets the single-device maps.
    """

    def __init__(self, n: int, size: tuple[int, int], tokens: torch.Tensor, runtime: Any = None) -> None:
        self.n, self.size, self.tokens, self.runtime = n, size, tokens, runtime
        cut = runtime.batch_slice(n) if runtime is not None else None
        self.lo, self.hi = cut if cut is not None else (0, n)
        self.levels: dict[int, list] = {}  # factor -> [sum (n, h_l, w_l), layers, coverage (n, h_l)]

    def add(self, probs: torch.Tensor, extra_options: dict) -> None:
        b, _, t, tokens = probs.shape
        if b != self.hi - self.lo or tokens != self.tokens.shape[-1]:  # not the call / context we were made for
            return
        h, w = self.size
        band = extra_options.get(BAND_KEY)
        s, e = band["rows"] if band is not None and band.get("full_height") == h else (0, h)
        factor = int(round(math.sqrt((e - s) * w / t)))
        if factor < 1 or w % factor or (e - s) % factor or ((e - s) // factor) * (w // factor) != t:
            return  # a token count that is not a grid of this view: not ours to map
        tok = self.tokens[self.lo:self.hi].to(device=probs.device, dtype=probs.dtype)
        m = (probs * tok[:, None, None, :]).sum(-1).mean(1)  # (b, t): attention on prompt tokens
        rows, cols = (e - s) // factor, w // factor
        entry = self.levels.get(factor)
        if entry is None:
            entry = self.levels[factor] = [probs.new_zeros(self.n, h // factor, cols), 0,
                                           probs.new_zeros(self.n, h // factor)]
        r0 = s // factor
        entry[0][self.lo:self.hi, r0:r0 + rows] += m.reshape(b, rows, cols)
        entry[1] += 1
        entry[2][self.lo:self.hi, r0:r0 + rows] = 1.0

    def finish(self) -> torch.Tensor | None:
        """(n, h, w) maps of the call, or None when no layer was recorded."""
        if self.runtime is not None:
            self._share()
        if not self.levels:
            return None
        levels = {f: (acc / cover.clamp_min(1.0).unsqueeze(-1), layers)
                  for f, (acc, layers, cover) in self.levels.items()}
        return combine_level_maps(levels, self.size)

    def _share(self) -> None:
        import torch.distributed as dist

        from ..parallel.split.comm import all_reduce

        factors = sorted(self.levels)  # every rank records the same layers, so the same levels
        if not factors:
            return
        parts = [self.levels[f][0] for f in factors] + [self.levels[f][2] for f in factors]
        flat = torch.cat([p.reshape(-1).float() for p in parts])
        stats = getattr(self.runtime, "stats", None)
        if stats is None or not hasattr(stats, "time"):
            all_reduce(flat)
        else:
            with stats.time("asg_mask"):
                all_reduce(flat)
            world = dist.get_world_size()
            nbytes = 2 * (world - 1) * flat.numel() * flat.element_size() // world  # a ring all-reduce's traffic
            stats.add("asg_mask", nbytes, nbytes)
        self._unflatten(flat, parts)

    @staticmethod
    def _unflatten(flat: torch.Tensor, parts: list[torch.Tensor]) -> None:
        offset = 0
        for p in parts:
            p.copy_(flat[offset:offset + p.numel()].reshape(p.shape))
            offset += p.numel()


class AttentionMaskCapture:
    """attn2 replace patch on a decoder layer: ComfyUI's attention, or, while a call is recorded, the same
    attention with explicit probabilities whose prompt-token mass goes to the recorder."""

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, extra_options: dict) -> torch.Tensor:
        import comfy.ldm.modules.attention as attention

        heads = extra_options["n_heads"]
        recorder = extra_options.get(RECORDER_KEY)
        if recorder is None:
            return attention.optimized_attention(q, k, v, heads, attn_precision=extra_options.get("attn_precision"),
                                                 transformer_options=extra_options)
        b, t, inner = q.shape
        d = inner // heads
        qh = q.float().reshape(b, t, heads, d).transpose(1, 2)
        kh = k.float().reshape(b, -1, heads, d).transpose(1, 2)
        vh = v.float().reshape(b, -1, heads, d).transpose(1, 2)
        probs = (qh @ kh.transpose(-1, -2) * d ** -0.5).softmax(dim=-1)  # (b, heads, t, tokens)
        recorder.add(probs, extra_options)
        return (probs @ vh).transpose(1, 2).reshape(b, t, inner).to(q.dtype)

    def __repr__(self) -> str:
        return "AttentionMaskCapture()"


# -------------------------------------------------------------------------------------- the wrapper


def _take(value: Any, index: torch.Tensor, groups: int) -> Any:
    """value's rows for the samples of a chunk (tensors batched per group); other values as they are."""
    if isinstance(value, torch.Tensor) and value.dim() >= 1 and value.shape[0] == groups:
        return value.index_select(0, index.to(value.device))
    if isinstance(value, list):
        return [_take(v, index, groups) for v in value]
    return value


class StructureGuidedWrapper:
    """The model function wrapper: ComfyUI's model call on the high-resolution latent -> asg_denoise."""

    def __init__(self, plan: ASGPlan, record_masks: bool, crop_conditioning: bool, previous: Any = None) -> None:
        self.plan = plan
        self.record_masks = record_masks
        self.crop_conditioning = crop_conditioning
        self.previous = previous  # a model function wrapper that was there before ours; it runs per chunk
        self._reset()

    def _reset(self) -> None:
        self.state = ASGState()
        self.last_step = -1
        self.run_key: tuple | None = None
        self.last_masks: dict[int, torch.Tensor] = {}  # mask key -> (N, 1, h, w): for tests and the panel

    def __getstate__(self) -> dict:  # what a worker needs: the settings, not this process's run state
        return {k: self.__dict__[k] for k in ("plan", "record_masks", "crop_conditioning", "previous")}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._reset()

    def __repr__(self) -> str:
        return f"StructureGuidedWrapper({self.plan})"

    def _step(self, sigma: torch.Tensor, to: dict, base: Any) -> tuple[int, int]:
        sigmas = to.get("sample_sigmas")
        s = float(sigma.reshape(-1)[0])
        if isinstance(sigmas, torch.Tensor) and sigmas.numel() > 1:
            schedule = sigmas.detach().float().cpu()
            index = int((schedule >= s * (1 - 1e-4)).sum()) - 1
            key = (tuple(round(v, 6) for v in schedule.tolist()),)
            total = schedule.numel() - 1
        else:  # no schedule known (a custom caller): progress from the model's own timestep scale
            t = 999.0 if base is None else float(base.model_sampling.timestep(sigma.reshape(-1)[:1]).reshape(-1)[0])
            index, total, key = int(round((1.0 - t / 999.0) * 1000)), 1000, None
        index = max(0, min(index, total - 1))
        if key != self.run_key or index < self.last_step:
            self._reset()
            self.run_key = key
        self.last_step = index
        return index, total

    def __call__(self, apply_model: Callable, args: dict) -> torch.Tensor:
        x, sigma, c = args["input"], args["timestep"], args["c"]
        cond_or_uncond = list(args.get("cond_or_uncond") or [0])
        if x.dim() != 4:
            raise ASGInputError(f"Structure-Guided HiRes works on image latents (batch, channels, height, width); "
                                f"got shape {tuple(x.shape)}.")
        view_grid(x.shape[-2], x.shape[-1], self.plan.view_h, self.plan.view_w)  # clear size errors first
        if c.get("control") is not None:
            raise ASGInputError("Structure-Guided HiRes cannot use a ControlNet (its hint covers the whole image, "
                                "the model sees views and windows): remove the ControlNet or the patch.")
        if isinstance(c.get("c_concat"), torch.Tensor):
            raise ASGInputError("Structure-Guided HiRes does not support models with image conditioning "
                                "(inpainting, instruct-pix2pix): use a plain text-to-image model.")
        to = c.get("transformer_options", {})
        base = getattr(apply_model, "__self__", None)
        step, total = self._step(sigma, to, base)
        groups = x.shape[0]
        chunks = len(cond_or_uncond)
        per = max(1, groups // chunks)
        branch = [cond_or_uncond[min(g // per, chunks - 1)] for g in range(groups)]
        occurrence = [cond_or_uncond[:min(g // per, chunks - 1)].count(branch[g]) for g in range(groups)]
        key_ids = [(branch[g], occurrence[g], g % per) for g in range(groups)]
        image_ids = [g % per for g in range(groups)]
        # the maps of a latent come from its first conditional chunk (the cond branch), for both branches
        first = next((k for k in range(chunks) if cond_or_uncond[k] == 0), None)
        source = {g: None if first is None else first * per + g % per for g in range(groups)}
        uuids = to.get("uuids")
        tokens = None
        if self.record_masks and isinstance(c.get("c_crossattn"), torch.Tensor):
            tokens = prompt_token_mask(c["c_crossattn"])
        runtime = _parallel_runtime(to)
        maps: dict[int, dict[int, torch.Tensor]] = {}
        crop_cache: dict[int, torch.Tensor] = {}
        sources = {s for s in source.values() if s is not None}

        def denoise(xb: torch.Tensor, sb: torch.Tensor, pieces: list[Piece]) -> torch.Tensor:
            index = torch.tensor([p.group for p in pieces], dtype=torch.long)
            sub = {k: _take(v, index, groups) for k, v in c.items() if k != "transformer_options"}
            opts = dict(to)
            opts["cond_or_uncond"] = [branch[p.group] for p in pieces]  # one entry per sample
            if isinstance(uuids, list) and len(uuids) == chunks:
                opts["uuids"] = [uuids[min(p.group // per, chunks - 1)] for p in pieces]
            if self.crop_conditioning and pieces[0].window is not None:
                sub["y"] = self._crop_y(base, sub.get("y"), pieces, crop_cache)
            recorder = None
            if tokens is not None and pieces[0].view is not None and any(p.group in sources for p in pieces):
                picked = tokens.index_select(0, index.to(tokens.device))
                recorder = _MapRecorder(len(pieces), tuple(xb.shape[-2:]), picked, runtime)
                opts[RECORDER_KEY] = recorder
            sub["transformer_options"] = opts
            if self.previous is not None:
                out = self.previous(apply_model, {"input": xb, "timestep": sb, "c": sub,
                                                  "cond_or_uncond": opts["cond_or_uncond"]})
            else:
                out = apply_model(xb, sb, **sub)
            if recorder is not None:
                found = recorder.finish()
                if found is not None:
                    n_w = x.shape[-1] // self.plan.view_w
                    for i, p in enumerate(pieces):
                        maps.setdefault(p.group, {})[p.view[0] * n_w + p.view[1]] = found[i]
            return out

        def attention() -> list[torch.Tensor | None]:
            n = (x.shape[-2] // self.plan.view_h) * (x.shape[-1] // self.plan.view_w)
            out: list[torch.Tensor | None] = []
            for g in range(groups):
                got = maps.get(source[g]) if source[g] is not None else None
                out.append(torch.stack([got[v] for v in range(n)]) if got is not None and len(got) == n else None)
            return out

        d = asg_denoise(x, sigma, denoise, self.plan, step, total, self.state, key_ids, image_ids,
                        attention if tokens is not None else None)
        for key, entries in self.state.masks.items():
            self.last_masks[key] = entries[-1][1]
        return d

    @staticmethod
    def _crop_y(base: Any, y: Any, pieces: list[Piece], cache: dict) -> Any:
        """SDXL: the crop coordinates of each window (in pixels) written into its size embedding."""
        if not isinstance(base, comfy.model_base.SDXL) or not isinstance(y, torch.Tensor):
            return y
        start = y.shape[1] - SDXL_SIZE_EMBEDDINGS
        if start < 0:
            return y
        y = y.clone()
        for i, p in enumerate(pieces):
            top, left = p.window
            for offset, value in ((512, top), (768, left)):  # slots 2 and 3: crop_h, crop_w
                px = value * LATENT_TO_PIXELS
                if px not in cache:
                    cache[px] = base.embedder(torch.Tensor([px])).reshape(-1)
                y[i, start + offset:start + offset + 256] = cache[px].to(device=y.device, dtype=y.dtype)
        return y


def patch_model(model, native_resolution_px: int = 0, guidance: float = 1.0, guidance_schedule: str = "cosine",
                structure_fraction: float = 0.5, attention_mask: bool = True, mask_layers: str = MASK_LAYERS[0],
                pixel_interaction: bool = True, asynchronous: bool = False, window_jitter: int = 4, seed: int = 0,
                view_batch: int = 8, crop_conditioning: bool = True, mask_saturation: float = MASK_SATURATION):
    """A clone of ``model`` that samples structure-guided (see the module docstring)."""
    if mask_layers not in MASK_LAYERS:
        raise ASGInputError(f"mask_layers must be one of {MASK_LAYERS}; got {mask_layers!r}.")
    side = native_latent_side(model, native_resolution_px)
    plan = ASGPlan(side, side, guidance=float(guidance), schedule=guidance_schedule,
                   structure_fraction=float(structure_fraction), pixel_interaction=bool(pixel_interaction),
                   asynchronous=bool(asynchronous), use_mask=bool(attention_mask), jitter=int(window_jitter),
                   seed=int(seed), batch=int(view_batch), mask_saturation=float(mask_saturation))
    m = model.clone()
    keys: list[tuple[str, int, int]] = []
    if attention_mask:
        levels = decoder_attention_layers(m)
        if levels:
            chosen = [max(levels)] if mask_layers == MASK_LAYERS[0] else sorted(levels)
            existing = m.model_options.get("transformer_options", {}).get("patches_replace", {}).get("attn2", {})
            keys = [k for f in chosen for k in levels[f] if k not in existing]  # another node's patch stays
        if not keys:
            log.warning("Structure-Guided HiRes: no decoder cross-attention layer to read a mask from; "
                        "guidance runs without the mask (M = 1).")
    previous = m.model_options.get("model_function_wrapper")
    m.set_model_unet_function_wrapper(StructureGuidedWrapper(plan, bool(keys), bool(crop_conditioning), previous))
    capture = AttentionMaskCapture()
    for block, number, index in keys:
        m.set_model_attn2_replace(capture, block, number, index)
    return m


# ------------------------------------------------------------------------------------------- node


class HiResParallelStructureGuidedHiRes(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="HiResParallelStructureGuidedHiRes",
            display_name="Structure-Guided HiRes",
            category="model_patches/unet",
            description="ASGDiffusion: sample far above the model's native size without repeated subjects. Use the "
                        "patched model with any KSampler on an empty high-resolution latent (a whole multiple of the "
                        "native size per side). First the image is denoised as strided low-resolution views that "
                        "follow one key view (weighted by a cross-attention mask), then as overlapping native-size "
                        "windows. Runs on one device, or over several with the Patch-Parallel KSampler in batch mode.",
            inputs=[
                io.Model.Input("model", tooltip="The model to patch (SD1.x, SD2.x, SDXL; LoRAs apply)."),
                io.Int.Input("native_resolution", default=0, min=0, max=8192, step=8,
                             tooltip="Side in pixels the model was trained at. 0 = from the model family (SD1.x 512, "
                                     "SD2.x 768-v 768, SDXL 1024). The latent must be a whole multiple of it per side."),
                io.Float.Input("guidance", default=1.0, min=0.0, max=1.0, step=0.05,
                               tooltip="Structure guidance w: how far every view's prediction of the clean image is pulled "
                                       "to the key view's. 1 = fully (one shared layout), 0 = independent views."),
                io.Combo.Input("guidance_schedule", options=list(SCHEDULES), default="cosine",
                               tooltip="cosine: w decays from its value to 0 over the structure steps (layout first, "
                                       "then room for detail). constant: w throughout the structure steps."),
                io.Float.Input("structure_steps", default=0.5, min=0.0, max=1.0, step=0.05,
                               tooltip="Share of the steps run as guided views (stage 1); the rest run as overlapping "
                                       "native-size windows (stage 2). 0.5 is the paper's."),
                io.Boolean.Input("attention_mask", default=True,
                                 tooltip="Weight the guidance by where the image attends to the prompt (cross-attention "
                                         "of the decoder), so backgrounds are not blurred by it. Off = guide everywhere."),
                io.Combo.Input("mask_layers", options=MASK_LAYERS, default=MASK_LAYERS[0],
                               tooltip="Decoder layers the mask is read from: the coarsest attention level (cheaper, "
                                       "more semantic) or every decoder level."),
                io.Boolean.Input("pixel_interaction", default=True,
                                 tooltip="Shuffle each location's pixels across the views before every structure step "
                                         "and put them back after it (CutDiffusion), so views exchange information. "
                                         "The key view keeps its own pixels, so the layout is the one a native run from its noise draws."),
                io.Boolean.Input("asynchronous", default=False,
                                 tooltip="Use the key view's prediction and mask from the previous step (ASGDiffusion's "
                                         "asynchronous mode): no view waits for the key view. Off = same step (exact)."),
                io.Int.Input("window_jitter", default=4, min=0, max=256,
                             tooltip="Random shift of the inner stage-2 windows each step, in latent pixels (8 image "
                                     "pixels each; capped at a quarter window), so window seams do not stay in place."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF,
                             tooltip="Seed of the pixel shuffles and window jitter (the noise comes from the sampler)."),
                io.Int.Input("view_batch", default=8, min=0, max=1024,
                             tooltip="Views or windows per model call (each counts once per prompt branch); lower it "
                                     "to save memory. 0 = all at once."),
                io.Boolean.Input("crop_conditioning", default=True,
                                 tooltip="SDXL: tell the model each window's crop position (its crop_h/crop_w "
                                         "conditioning), as in SDXL training. No effect on other families."),
                io.Float.Input("mask_saturation", default=MASK_SATURATION, min=0.01, max=1.0, step=0.01,
                               optional=True,
                               tooltip="attention_mask: attention at or above this share of its peak gets full "
                                       "guidance, less is guided proportionally less. Low values guide the whole "
                                       "subject, edges included, and keep its size; 1 = the raw attention map, "
                                       "which guides only the subject's core and shrinks it at 2x-3x."),
            ],
            outputs=[io.Model.Output()],
        )

    @classmethod
    def execute(cls, model, native_resolution: int, guidance: float, guidance_schedule: str, structure_steps: float,
                attention_mask: bool, mask_layers: str, pixel_interaction: bool, asynchronous: bool,
                window_jitter: int, seed: int, view_batch: int, crop_conditioning: bool,
                mask_saturation: float = MASK_SATURATION) -> io.NodeOutput:
        return io.NodeOutput(patch_model(model, native_resolution, guidance, guidance_schedule, structure_steps,
                                         attention_mask, mask_layers, pixel_interaction, asynchronous, window_jitter,
                                         seed, view_batch, crop_conditioning, mask_saturation))


ASG_NODES = [HiResParallelStructureGuidedHiRes]
