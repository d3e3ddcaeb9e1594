"""Coop-Diffusion and the time-decoupled model switch (PanGu-Draw) as GUIDERs for SamplerCustomAdvanced.

Both guiders are CFGGuiders of model A, so SamplerCustomAdvanced runs them with ComfyUI's own sampler
loop (progress bar, previews, Cancel). Model B is prepared by its own CFGGuider (conds, hooks, patches,
loading): the Coop guider runs A's sampler loop *inside* B's prepared sampling, so every B evaluation
is B's ordinary CFG prediction; the time-decoupled guider runs A's part of the schedule and then B's.
The bridge maths lives in algorithms/coop.py; VAEs run through vae.decode / vae.encode, which load
them with ComfyUI's model management.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

import torch

import comfy.model_management
import comfy.sampler_helpers
import comfy.samplers
import latent_preview
from comfy_api.v0_0_2 import io

from ..algorithms import coop as alg
from . import model_info

CATEGORY = "sampling/custom_sampling/guiders"
BRIDGES = ["auto", "vae"]
NOISE_MODES = list(alg.NOISE_MODES)
MIN_SCALE, MAX_SCALE = 0.25, 4.0


class CoopInputError(ValueError):
    """Bad input to a Coop or Time-Decoupled guider; the message says what to change."""

    user_facing = True


# ---------------------------------------------------------------------------------------------
# checks and geometry (all before any model runs)


def model_kind(model) -> str:
    """'flow' for models that mix x = (1 - s) x0 + s eps, 'eps' for EPS/V models."""
    return "flow" if model_info.is_flow(model) else "eps"


def _format(model):
    return model.get_model_object("latent_format")


def _format_name(model) -> str:
    return type(_format(model)).__name__


def check_vae(vae, model, name: str) -> None:
    """A VAE that can carry this model's latents to pixels and back."""
    if getattr(vae, "first_stage_model", None) is None:
        raise CoopInputError(f"{name} holds no VAE weights: connect a loaded VAE (a checkpoint's VAE output or Load VAE).")
    if getattr(vae, "latent_dim", 2) != 2:
        raise CoopInputError(f"{name} is a video or audio VAE; the bridge needs an image VAE (2-D latents).")
    channels = _format(model).latent_channels
    if vae.latent_channels != channels:
        raise CoopInputError(
            f"{name} makes {vae.latent_channels}-channel latents but its model works on {channels} channels "
            f"({_format_name(model)} latents): connect the VAE that belongs to that model."
        )


def check_conds(model, conds, name: str, model_name: str) -> None:
    """Prompts encoded by another model's text encoder fail deep inside the UNet: say so up front."""
    unet_config = getattr(getattr(model.model, "model_config", None), "unet_config", {}) or {}
    width = unet_config.get("context_dim")
    if not width:
        return
    for entry in conds or []:
        cond = entry[0] if isinstance(entry, (list, tuple)) and entry else None
        if getattr(cond, "ndim", 0) == 3 and cond.shape[-1] != width:
            raise CoopInputError(
                f"{name} holds {cond.shape[-1]}-wide text embeddings but {model_name} takes {width}: encode "
                f"{model_name}'s prompts with {model_name}'s own CLIP."
            )


def uses_vae_bridge(model_a, model_b, b_scale: float, bridge: str) -> bool:
    """auto: straight through the latent when both models share one latent format and size."""
    same = type(_format(model_a)) is type(_format(model_b)) and b_scale == 1.0
    return bridge == "vae" or not same


def check_pair(model_a, model_b, vae_a, vae_b, b_scale: float, bridge: str, noise_b: str, what: str) -> bool:
    """Validate the inputs shared by both guiders; returns whether the VAE bridge is used."""
    if bridge not in BRIDGES:
        raise CoopInputError(f"bridge must be one of {BRIDGES}; got {bridge!r}.")
    if noise_b not in NOISE_MODES:
        raise CoopInputError(f"noise_b must be one of {NOISE_MODES}; got {noise_b!r}.")
    if not MIN_SCALE <= b_scale <= MAX_SCALE:
        raise CoopInputError(f"b_scale must be between {MIN_SCALE} and {MAX_SCALE} (2.0 for SD1.5 512 px + SDXL 1024 px); got {b_scale}.")
    use_vae = uses_vae_bridge(model_a, model_b, b_scale, bridge)
    if not use_vae:
        return False
    missing = [name for name, vae in (("vae_a", vae_a), ("vae_b", vae_b)) if vae is None]
    if missing:
        if bridge == "vae":
            reason = "bridge is 'vae'"
        elif b_scale != 1.0:
            reason = f"model B runs at {b_scale}x model A's image size"
        else:
            reason = f"model A ({_format_name(model_a)} latents) and model B ({_format_name(model_b)} latents) use different latent spaces"
        raise CoopInputError(f"{what}: {reason}, so the images travel through the VAEs: connect {' and '.join(missing)} "
                             "(each model's own VAE).")
    check_vae(vae_a, model_a, "vae_a")
    check_vae(vae_b, model_b, "vae_b")
    return True


@dataclass
class Geometry:
    """B's latent shape and the pixel sizes the bridge resizes to (None without the VAE bridge)."""

    shape_b: tuple
    pixel_a: tuple | None = None
    pixel_b: tuple | None = None


def geometry(shape_a: tuple, model_b, vae_a, vae_b, b_scale: float, use_vae: bool) -> Geometry:
    if len(shape_a) != 4:
        raise CoopInputError(f"The guider needs an image latent (batch, channels, height, width); got shape {tuple(shape_a)}.")
    if not use_vae:
        return Geometry(tuple(shape_a))
    ra, rb = int(vae_a.spacial_compression_decode()), int(vae_b.spacial_compression_encode())
    h, w = shape_a[-2:]
    hb, wb = max(1, round(h * ra * b_scale / rb)), max(1, round(w * ra * b_scale / rb))
    down = model_info.total_downsampling(model_b)
    if hb % down or wb % down:
        raise CoopInputError(
            f"Model B would work on a {hb}x{wb} latent ({hb * rb}x{wb * rb} px) but needs sides that are multiples of "
            f"{down} latent pixels ({down * rb} px): change b_scale or the image size."
        )
    channels_b = _format(model_b).latent_channels
    return Geometry((shape_a[0], channels_b, hb, wb), (h * ra, w * ra), (hb * rb, wb * rb))


class VaeBridge:
    """Clean latents between A's and B's spaces through the two VAEs (vae.decode / vae.encode load them
    through ComfyUI's model management). Model-space maps for the sampler, raw-space maps for latents."""

    def __init__(self, model_a, vae_a, model_b, vae_b, geo: Geometry, on_use: Callable[[], None] = lambda: None):
        self.base_a, self.base_b = model_a.model, model_b.model
        self.vae_a, self.vae_b, self.geo, self.on_use = vae_a, vae_b, geo, on_use
        self.device_a, self.device_b = model_a.load_device, model_b.load_device

    @staticmethod
    def _decode(vae, z: torch.Tensor) -> torch.Tensor:
        return vae.decode(z).movedim(-1, 1)[:, :3].float()

    @staticmethod
    def _encode(vae, images: torch.Tensor) -> torch.Tensor:
        return vae.encode(images.movedim(1, -1)).float()

    def raw_to_b(self, z: torch.Tensor) -> torch.Tensor:
        self.on_use()
        return alg.bridge_x0(z, lambda t: self._decode(self.vae_a, t), lambda t: self._encode(self.vae_b, t), self.geo.pixel_b)

    def raw_to_a(self, z: torch.Tensor) -> torch.Tensor:
        self.on_use()
        return alg.bridge_x0(z, lambda t: self._decode(self.vae_b, t), lambda t: self._encode(self.vae_a, t), self.geo.pixel_a)

    def to_b(self, d: torch.Tensor) -> torch.Tensor:
        raw = self.raw_to_b(self.base_a.process_latent_out(d))
        return self.base_b.process_latent_in(raw.to(self.device_b))

    def to_a(self, d: torch.Tensor) -> torch.Tensor:
        raw = self.raw_to_a(self.base_b.process_latent_out(d))
        return self.base_a.process_latent_in(raw.to(self.device_a))


def _noise_rule(seed, noise_b: str) -> Callable:
    fresh = alg.PersistentNoise(seed or 0)
    return lambda eps, shape: alg.transfer_noise(eps, shape, fresh, noise_b)


def _partner(model_b, positive_b, negative_b, cfg_b: float) -> comfy.samplers.CFGGuider:
    guider = comfy.samplers.CFGGuider(model_b)
    guider.set_conds(positive_b, negative_b)
    guider.set_cfg(cfg_b)
    return guider


def _last_nonzero(sigmas: list[float]) -> float:
    nonzero = [s for s in sigmas if s > 0]
    return nonzero[-1] if nonzero else 0.0


# ---------------------------------------------------------------------------------------------
# Coop guider


@dataclass
class CoopSettings:
    vae_a: object
    vae_b: object
    use_vae: bool
    b_scale: float
    weight: float
    weight_end: float
    schedule: str
    start_percent: float
    end_percent: float
    every_k: int
    noise_b: str


@dataclass
class _Load:
    """What (re)loading one model for an evaluation needs, as prepare_sampling computed it."""

    patcher: object
    extra: list
    memory: float
    minimum: float

    def __call__(self) -> None:
        comfy.model_management.load_models_gpu([self.patcher] + list(self.extra), memory_required=self.memory,
                                               minimum_memory_required=self.minimum)
        if hasattr(self.patcher.model, "current_patcher"):  # shared BaseModel (clones): hooks follow the patcher
            self.patcher.model.current_patcher = self.patcher


class _RunInside(comfy.samplers.Sampler):
    """A 'sampler' for B's guider: inside B's prepared sampling it runs A's real sampler loop."""

    def __init__(self, run: Callable):
        self.run = run

    def sample(self, model_wrap, sigmas, extra_args, callback, noise, latent_image=None, denoise_mask=None,
               disable_pbar=False):
        self.run(model_wrap, extra_args)
        return torch.zeros_like(noise)


class _CoopRun:
    """State of one Coop sampling run: B's prepared guider, which model is loaded, when B takes part."""

    def __init__(self, guider: "CoopGuider", b_wrap, b_options: dict, loads: dict, sigmas: list[float], steps: frozenset,
                 bridge: alg.CoopBridge):
        self.s = guider.settings
        self.b_wrap, self.b_options, self.loads, self.bridge = b_wrap, b_options, loads, bridge
        self.sigmas, self.steps = sigmas, steps
        self.first, self.last = sigmas[0], _last_nonzero(sigmas)
        self.kind_a, self.kind_b = model_kind(guider.model_patcher), model_kind(guider.partner.model_patcher)
        self.sigma_max_b = model_info.sigma_max(guider.partner.model_patcher)
        self.active = "b"  # B's guider loaded B last

    def weight(self, sigma: float) -> float:
        if alg.step_index(sigma, self.sigmas) not in self.steps:
            return 0.0
        return alg.fusion_weight(sigma, self.first, self.last, self.s.weight, self.s.weight_end, self.s.schedule)

    def activate(self, which: str) -> None:
        # The other model (or a VAE) may have displaced this one: same checkpoint with other LoRAs, low VRAM.
        if self.active != which:
            self.loads[which]()
            self.active = which

    def vae_used(self) -> None:
        self.active = None


class CoopGuider(comfy.samplers.CFGGuider):
    """CFGGuider of model A whose predictions fuse in model B's through the bridge (Coop-Diffusion)."""

    def __init__(self, model_a, partner: comfy.samplers.CFGGuider, settings: CoopSettings):
        super().__init__(model_a)
        self.partner, self.settings = partner, settings
        self._run: _CoopRun | None = None
        self._geo: Geometry | None = None

    def _bridge_steps(self, sigmas: list[float]) -> frozenset:
        ms = self.model_patcher.get_model_object("model_sampling")
        hi = float(ms.percent_to_sigma(self.settings.start_percent))
        lo = float(ms.percent_to_sigma(self.settings.end_percent))
        steps = alg.bridge_steps(sigmas, hi, lo, self.settings.every_k)
        first, last = sigmas[0], _last_nonzero(sigmas)
        s = self.settings
        return frozenset(i for i in steps if alg.fusion_weight(sigmas[i], first, last, s.weight, s.weight_end, s.schedule) != 0.0)

    def sample(self, noise, latent_image, sampler, sigmas, denoise_mask=None, callback=None, disable_pbar=False, seed=None):
        s = self.settings
        self._geo = geometry(tuple(noise.shape), self.partner.model_patcher, s.vae_a, s.vae_b, s.b_scale, s.use_vae)
        return super().sample(noise, latent_image, sampler, sigmas, denoise_mask, callback, disable_pbar, seed)

    def inner_sample(self, noise, latent_image, device, sampler, sigmas, denoise_mask, callback, disable_pbar, seed):
        sig = [float(v) for v in sigmas.cpu()]
        steps = self._bridge_steps(sig)
        parent = comfy.samplers.CFGGuider.inner_sample
        if not steps:  # B never takes part: it is not even loaded
            return parent(self, noise, latent_image, device, sampler, sigmas, denoise_mask, callback, disable_pbar, seed)
        s, geo, b = self.settings, self._geo, self.partner.model_patcher
        kind_a, kind_b = model_kind(self.model_patcher), model_kind(b)
        sigmas_b = torch.tensor([alg.map_sigma(v, kind_a, kind_b, model_info.sigma_max(b)) for v in sig])
        b_conds = {k: [c.copy() for c in v] for k, v in self.partner.original_conds.items()}
        a_load = _Load(self.model_patcher, self.loaded_models,
                       *comfy.sampler_helpers.estimate_memory(self.model_patcher, noise.shape, self.conds))
        b_memory = comfy.sampler_helpers.estimate_memory(b, geo.shape_b, b_conds)
        out = {}

        def run_a(b_wrap, b_extra_args):
            run = _CoopRun(self, b_wrap, b_extra_args["model_options"],
                           {"a": a_load, "b": _Load(b, b_wrap.loaded_models, *b_memory)}, sig, steps, alg.CoopBridge())
            if s.use_vae:
                vb = VaeBridge(self.model_patcher, s.vae_a, b, s.vae_b, geo, on_use=run.vae_used)
                run.bridge = alg.CoopBridge(vb.to_b, vb.to_a, _noise_rule(seed, s.noise_b))
            self._run = run
            try:
                out["x"] = parent(self, noise, latent_image, device, sampler, sigmas, denoise_mask, callback,
                                  disable_pbar, seed)
            finally:
                self._run = None

        zeros = torch.zeros(geo.shape_b)
        self.partner.sample(zeros, zeros, _RunInside(run_a), sigmas_b, disable_pbar=True, seed=seed)
        return out["x"]

    def outer_predict_noise(self, x, timestep, model_options={}, seed=None):
        run = self._run
        if run is None:
            return super().outer_predict_noise(x, timestep, model_options, seed)
        sigma = float(timestep.reshape(-1)[0])
        w = run.weight(sigma)

        def denoise_a(xa: torch.Tensor, _sigma: float) -> torch.Tensor:
            run.activate("a")
            return comfy.samplers.CFGGuider.outer_predict_noise(self, xa, timestep, model_options, seed)

        def denoise_b(xb: torch.Tensor, sigma_b: float) -> torch.Tensor:
            comfy.model_management.throw_exception_if_processing_interrupted()
            run.activate("b")
            device = self.partner.model_patcher.load_device
            t = torch.full((xb.shape[0],), sigma_b, device=device, dtype=timestep.dtype)
            d = run.b_wrap(xb.to(device), t, model_options=run.b_options, seed=seed)
            return d.to(device=x.device, dtype=x.dtype)

        if w == 0.0:
            return denoise_a(x, sigma)
        comfy.model_management.throw_exception_if_processing_interrupted()
        d = alg.coop_denoise(x, sigma, denoise_a, denoise_b, w, run.kind_a, run.kind_b, run.bridge, run.sigma_max_b)
        return d.to(device=x.device, dtype=x.dtype)


# ---------------------------------------------------------------------------------------------
# Time-decoupled guider


@dataclass
class SwitchSettings:
    vae_a: object
    vae_b: object
    use_vae: bool
    b_scale: float
    sigma_switch: float
    noise_b: str


class _ThenDenoise(comfy.samplers.Sampler):
    """Runs a sampler, keeps the state it ends in and (optionally) A's clean estimate there."""

    def __init__(self, sampler, evaluate: bool):
        self.sampler, self.evaluate = sampler, evaluate
        self.x = self.denoised = None

    def sample(self, model_wrap, sigmas, extra_args, callback, noise, latent_image=None, denoise_mask=None,
               disable_pbar=False):
        out = self.sampler.sample(model_wrap, sigmas, extra_args, callback, noise, latent_image, denoise_mask, disable_pbar)
        # Samplers return inverse_noise_scaling(sigma, x) (x / (1 - s) for flow): undo it for the true state.
        self.x = out / model_wrap.inner_model.model_sampling.inverse_noise_scaling(sigmas[-1], torch.ones_like(out))
        if self.evaluate:
            s_in = self.x.new_ones([self.x.shape[0]])
            self.denoised = model_wrap(self.x, sigmas[-1] * s_in, model_options=extra_args["model_options"],
                                       seed=extra_args.get("seed"))
        return out


def _offset_callback(callback, offset: int, total: int):
    if callback is None:
        return None
    return lambda step, x0, x, _steps: callback(step + offset, x0, x, total)


class TimeDecoupledGuider(comfy.samplers.CFGGuider):
    """CFGGuider of the structure model A for sigma >= the switch; the texture model B samples the rest.

    Across latent spaces the state is bridged once at the switch and the result is in B's latent space.
    """

    def __init__(self, model_a, partner: comfy.samplers.CFGGuider, settings: SwitchSettings):
        super().__init__(model_a)
        self.partner, self.settings = partner, settings

    def sample(self, noise, latent_image, sampler, sigmas, denoise_mask=None, callback=None, disable_pbar=False, seed=None):
        s = self.settings
        if sigmas.shape[-1] == 0:
            return latent_image
        a, b = self.model_patcher, self.partner.model_patcher
        geo = geometry(tuple(noise.shape), b, s.vae_a, s.vae_b, s.b_scale, s.use_vae)
        if s.use_vae and denoise_mask is not None:
            raise CoopInputError("An inpainting mask works when both models share one latent space and size; "
                                 "here the state moves through the VAEs. Remove the noise mask or use bridge 'auto' "
                                 "with two models of one latent format.")
        first, second = alg.split_at_sigma(sigmas.cpu().float(), s.sigma_switch)
        if second.numel() == 0 and s.use_vae and float(sigmas[-1]) > 0:
            raise CoopInputError(f"The schedule ends at sigma {float(sigmas[-1]):.3f}, above the switch (sigma "
                                 f"{s.sigma_switch:.3f}): model B never runs and a noisy latent cannot cross the VAEs. "
                                 "Lower switch_timestep or run the schedule further.")
        kind_a, kind_b, sigma_max_b = model_kind(a), model_kind(b), model_info.sigma_max(b)
        total = sigmas.shape[-1] - 1
        bridge = VaeBridge(a, s.vae_a, b, s.vae_b, geo) if s.use_vae else None
        fresh_noise = _noise_rule(seed, s.noise_b)

        if second.numel() == 0:  # model A runs the whole schedule
            out = super().sample(noise, latent_image, sampler, sigmas, denoise_mask, callback, disable_pbar, seed)
            return bridge.raw_to_b(out) if bridge is not None else out

        def sigmas_for_b(part: torch.Tensor) -> torch.Tensor:
            return torch.tensor([alg.map_sigma(float(v), kind_a, kind_b, sigma_max_b) for v in part])

        start = 0 if first.numel() == 0 else first.shape[-1] - 1
        if type(_format(a)) is type(_format(b)) or callback is None:
            callback_b = _offset_callback(callback, start, total)
        else:  # previews decode B's latents with B's latent format, on the same progress bar
            callback_b = _offset_callback(latent_preview.prepare_callback(b, total), start, total)

        if first.numel() == 0:  # model B runs the whole schedule
            if bridge is None:
                return self.partner.sample(noise, latent_image, sampler, sigmas_for_b(second), denoise_mask, callback_b,
                                           disable_pbar, seed)
            latent_b = (bridge.raw_to_b(latent_image) if torch.count_nonzero(latent_image) else torch.zeros(geo.shape_b))
            noise_b = fresh_noise(noise.float(), geo.shape_b)
            return self.partner.sample(noise_b, latent_b, sampler, sigmas_for_b(second), None, callback_b, disable_pbar, seed)

        chain = _ThenDenoise(sampler, evaluate=bridge is not None)
        super().sample(noise, latent_image, chain, first.to(sigmas.device), denoise_mask,
                       _offset_callback(callback, 0, total), disable_pbar, seed)
        sigma_s = float(first[-1])
        if bridge is None:
            # Same latent space: B starts exactly where A stopped. Keep the original latent (inpainting blends
            # with it) and choose the noise so that B's own noise scaling rebuilds A's state.
            x_b, sigma_b = alg.convert_noisy(chain.x, sigma_s, kind_a, kind_b, sigma_max_b)
            latent_in = (b.model.process_latent_in(latent_image.to(x_b.device)) if torch.count_nonzero(latent_image)
                         else torch.zeros_like(x_b))
            noise_b = alg.noise_estimate(x_b, latent_in.to(x_b.dtype), sigma_b, kind_b)
            return self.partner.sample(noise_b, latent_image, sampler, sigmas_for_b(second), denoise_mask, callback_b,
                                       disable_pbar, seed)
        cross = alg.CoopBridge(bridge.to_b, bridge.to_a, fresh_noise)
        z_b0, noise_b, _sigma_b = alg.bridge_state(chain.x, chain.denoised, sigma_s, kind_a, kind_b, cross, sigma_max_b)
        latent_b = b.model.process_latent_out(z_b0)  # B's guider applies process_latent_in again
        return self.partner.sample(noise_b, latent_b, sampler, sigmas_for_b(second), None, callback_b, disable_pbar, seed)


# ---------------------------------------------------------------------------------------------
# Nodes


def _pair_inputs(a_role: str, b_role: str) -> list:
    return [
        io.Model.Input("model_a", tooltip=f"Model A, {a_role}"),
        io.Conditioning.Input("positive_a", tooltip="Model A's positive prompt (encoded with model A's text encoder)."),
        io.Conditioning.Input("negative_a", tooltip="Model A's negative prompt."),
        io.Float.Input("cfg_a", default=7.0, min=0.0, max=100.0, step=0.1, round=0.01,
                       tooltip="Classifier-free guidance scale of model A."),
        io.Model.Input("model_b", tooltip=f"Model B, {b_role}"),
        io.Conditioning.Input("positive_b", tooltip="Model B's positive prompt (encoded with model B's text encoder)."),
        io.Conditioning.Input("negative_b", tooltip="Model B's negative prompt."),
        io.Float.Input("cfg_b", default=7.0, min=0.0, max=100.0, step=0.1, round=0.01,
                       tooltip="Classifier-free guidance scale of model B."),
    ]


def _bridge_inputs() -> list:
    return [
        io.Float.Input("b_scale", default=1.0, min=MIN_SCALE, max=MAX_SCALE, step=0.05,
                       tooltip="Model B's image size relative to model A's, to run each at its native size: 2.0 for "
                               "SD1.5 (512 px) as A with SDXL (1024 px) as B, 0.5 the other way round."),
        io.Combo.Input("bridge", options=BRIDGES, default="auto",
                       tooltip="auto: straight through the latent when both models use one latent format at one size "
                               "(exact, no VAE work), otherwise through the VAEs. vae: always decode, resize and "
                               "encode."),
        io.Combo.Input("noise_b", options=NOISE_MODES, default="transfer",
                       tooltip="Noise B's latent is re-noised with. transfer: model A's current noise, resized with "
                               "unit variance, when the channel counts match (else as persistent). persistent: one "
                               "seeded noise in B's latent shape for the whole run."),
        io.Vae.Input("vae_a", optional=True,
                     tooltip="Model A's VAE. Needed when the estimates go through the VAEs (different latent spaces or "
                             "sizes, or bridge 'vae')."),
        io.Vae.Input("vae_b", optional=True, tooltip="Model B's VAE, needed with vae_a."),
    ]


def _check_all_conds(model_a, positive_a, negative_a, model_b, positive_b, negative_b) -> None:
    for model, conds, name, model_name in ((model_a, positive_a, "positive_a", "model A"),
                                           (model_a, negative_a, "negative_a", "model A"),
                                           (model_b, positive_b, "positive_b", "model B"),
                                           (model_b, negative_b, "negative_b", "model B")):
        check_conds(model, conds, name, model_name)


class HiResParallelCoopGuider(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="HiResParallelCoopGuider",
            display_name="Coop Guider (PanGu-Draw)",
            category=CATEGORY,
            description="Two models denoise one image together (PanGu-Draw's Coop-Diffusion): each step, model A's "
                        "clean estimate is carried into model B's latent space and size through the VAEs, re-noised, "
                        "denoised by B and carried back; the guider returns (1 - w) A + w B. Works across latent "
                        "spaces (4 and 16 channels), EPS and flow models, and native resolutions. The sampler runs "
                        "in model A's latent space: decode the result with vae_a.",
            inputs=[
                *_pair_inputs("drives the sampler: the image is in its latent space, at its size and schedule.",
                              "joins in through the bridge (any latent space, EPS or flow)."),
                io.Float.Input("weight", default=0.5, min=0.0, max=1.0, step=0.01,
                               tooltip="Model B's share w in (1 - w) A + w B; with linear/cosine the share at the first "
                                       "step. 0 gives model A alone."),
                io.Float.Input("weight_end", default=0.5, min=0.0, max=1.0, step=0.01,
                               tooltip="Model B's share at the last step for the linear and cosine schedules."),
                io.Combo.Input("weight_schedule", options=list(alg.WEIGHT_SCHEDULES), default="constant",
                               tooltip="How B's share moves from weight to weight_end over the noise levels (log sigma): "
                                       "constant keeps weight."),
                io.Float.Input("start_percent", default=0.0, min=0.0, max=1.0, step=0.01,
                               tooltip="B joins from this point of the schedule (0 = the first, noisiest step), as in "
                                       "ConditioningSetTimestepRange."),
                io.Float.Input("end_percent", default=1.0, min=0.0, max=1.0, step=0.01,
                               tooltip="B leaves after this point of the schedule (1 = the last step)."),
                io.Int.Input("every_k", default=1, min=1, max=100,
                             tooltip="Run the bridge on every k-th step inside the window to bound the cost; the other "
                                     "steps use model A alone."),
                *_bridge_inputs(),
            ],
            outputs=[io.Guider.Output()],
        )

    @classmethod
    def execute(cls, model_a, positive_a, negative_a, cfg_a: float, model_b, positive_b, negative_b, cfg_b: float,
                weight: float, weight_end: float, weight_schedule: str, start_percent: float, end_percent: float,
                every_k: int, b_scale: float, bridge: str, noise_b: str, vae_a=None, vae_b=None) -> io.NodeOutput:
        if not (0.0 <= weight <= 1.0 and 0.0 <= weight_end <= 1.0):
            raise CoopInputError(f"weight and weight_end must be between 0 and 1; got {weight} and {weight_end}.")
        if weight_schedule not in alg.WEIGHT_SCHEDULES:
            raise CoopInputError(f"weight_schedule must be one of {list(alg.WEIGHT_SCHEDULES)}; got {weight_schedule!r}.")
        if not 0.0 <= start_percent <= end_percent <= 1.0:
            raise CoopInputError(f"Need 0 <= start_percent <= end_percent <= 1; got {start_percent} and {end_percent}.")
        if every_k < 1:
            raise CoopInputError(f"every_k must be at least 1; got {every_k}.")
        _check_all_conds(model_a, positive_a, negative_a, model_b, positive_b, negative_b)
        use_vae = check_pair(model_a, model_b, vae_a, vae_b, b_scale, bridge, noise_b, "Coop Guider")
        settings = CoopSettings(vae_a, vae_b, use_vae, float(b_scale), float(weight), float(weight_end), weight_schedule,
                                float(start_percent), float(end_percent), int(every_k), noise_b)
        guider = CoopGuider(model_a, _partner(model_b, positive_b, negative_b, cfg_b), settings)
        guider.set_conds(positive_a, negative_a)
        guider.set_cfg(cfg_a)
        return io.NodeOutput(guider)


class HiResParallelTimeDecoupledGuider(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="HiResParallelTimeDecoupledGuider",
            display_name="Time-Decoupled Guider (PanGu-Draw)",
            category=CATEGORY,
            description="A structure model for the noisy steps and a texture model for the rest (PanGu-Draw): model A "
                        "samples while the timestep is at or above the switch, model B from there on. When the two "
                        "use different latent spaces or sizes, the state crosses through the VAEs once, at the switch, "
                        "and the result is in model B's latent space: decode it with vae_b.",
            inputs=[
                *_pair_inputs("the structure model for the noisy steps (composition, layout, ControlNet).",
                              "the texture model for the rest; the output is in its latent space."),
                io.Float.Input("switch_timestep", default=500.0, min=1.0, max=999.0, step=1.0,
                               tooltip="Model A runs the steps that start at this timestep or above (500 is PanGu-Draw's, "
                                       "sigma 1.62 on SD models); model B runs the rest."),
                *_bridge_inputs(),
            ],
            outputs=[io.Guider.Output()],
        )

    @classmethod
    def execute(cls, model_a, positive_a, negative_a, cfg_a: float, model_b, positive_b, negative_b, cfg_b: float,
                switch_timestep: float, b_scale: float, bridge: str, noise_b: str, vae_a=None,
                vae_b=None) -> io.NodeOutput:
        if not 0.0 < switch_timestep < 1000.0:
            raise CoopInputError(f"switch_timestep must be between 1 and 999 (500 is PanGu-Draw's); got {switch_timestep}.")
        _check_all_conds(model_a, positive_a, negative_a, model_b, positive_b, negative_b)
        use_vae = check_pair(model_a, model_b, vae_a, vae_b, b_scale, bridge, noise_b, "Time-Decoupled Guider")
        sigma_switch = model_info.timestep_to_sigma(model_a, switch_timestep)
        settings = SwitchSettings(vae_a, vae_b, use_vae, float(b_scale), sigma_switch, noise_b)
        guider = TimeDecoupledGuider(model_a, _partner(model_b, positive_b, negative_b, cfg_b), settings)
        guider.set_conds(positive_a, negative_a)
        guider.set_cfg(cfg_a)
        logging.debug("Time-Decoupled Guider: switch at sigma %.4f, VAE bridge %s", sigma_switch, use_vae)
        return io.NodeOutput(guider)


COOP_NODES = [HiResParallelCoopGuider, HiResParallelTimeDecoupledGuider]

__all__ = ["COOP_NODES", "CoopGuider", "CoopInputError", "TimeDecoupledGuider", "VaeBridge"]
