"""Block-noise relay upscaling (Relay Diffusion / CogView3 relay) as ComfyUI nodes.

The relay is ordinary ComfyUI sampling with three changed inputs: the latent is the upsampled
low-resolution result, the schedule starts at an intermediate sigma (the relay point), and the noise
is mixed with block noise. SamplerCustomAdvanced adds `sigma0 * noise` to the latent when sigma0 is
below the model's maximum, which is exactly the relay start `z_L + sigma * n`. The convenience node
runs the same pieces in one place.
"""
from __future__ import annotations

import torch

import comfy.model_management
import comfy.sample
import comfy.samplers
import comfy.utils
import latent_preview
from comfy_api.v0_0_2 import io

from ..algorithms.block_noise import relay_noise
from ..algorithms.relay import denoise_schedule, relay_schedule, sample_linear_relay, upsample_latent
from . import model_info

CATEGORY_NOISE = "sampling/custom_sampling/noise"
CATEGORY_SIGMAS = "sampling/custom_sampling/schedulers"
CATEGORY_SAMPLERS = "sampling/custom_sampling/samplers"

UPSCALE_METHODS = ["nearest (latent)", "bilinear (latent)", "bicubic (latent)", "pixel (VAE decode, bicubic, encode)"]
RELAY_POINTS = ["timestep", "denoise", "sigma"]
NOISE_VARIANTS = ["box", "constant"]

MIN_SCALE, MAX_SCALE = 1.0, 4.0


class RelayInputError(ValueError):
    """Bad input to a relay node; the message says what to change."""


# ---------------------------------------------------------------------------------------------
# Shared logic (each node below is a thin wrapper; the convenience node calls the same functions)


class BlockNoise:
    """A NOISE object for SamplerCustomAdvanced: Gaussian noise mixed with box-filtered block noise."""

    def __init__(self, seed: int, block_size: int, strength: float, normalize: bool = True, variant: str = "box"):
        self.seed = seed
        self.block_size = block_size
        self.strength = strength
        self.normalize = normalize
        self.variant = variant

    def generate_noise(self, input_latent: dict) -> torch.Tensor:
        samples = input_latent["samples"]
        if samples.numel() == 0:
            raise RelayInputError("Block Noise got an empty latent: connect a latent with at least one pixel.")
        noise = relay_noise(tuple(samples.shape), self.seed, self.block_size, self.strength, self.normalize, self.variant)
        return noise.to(dtype=samples.dtype)


def check_latent(samples: torch.Tensor, what: str) -> None:
    if samples.numel() == 0 or samples.ndim not in (4, 5):
        raise RelayInputError(
            f"{what} needs a non-empty image latent (batch, channels, height, width); got shape {tuple(samples.shape)}."
        )


def target_size(samples: torch.Tensor, scale: float, multiple: int) -> tuple[int, int]:
    """Upscaled latent height and width, rounded to a multiple the model takes without padding."""
    if not (MIN_SCALE <= scale <= MAX_SCALE):
        raise RelayInputError(f"scale_by must be between {MIN_SCALE} and {MAX_SCALE}; got {scale}.")
    h, w = samples.shape[-2:]
    th = max(multiple, int(round(h * scale / multiple)) * multiple)
    tw = max(multiple, int(round(w * scale / multiple)) * multiple)
    return th, tw


def relay_upscale(samples: torch.Tensor, scale: float, method: str, vae=None, multiple: int = 8) -> torch.Tensor:
    """Upsample a low-resolution latent for the relay: in latent space, or through the VAE's pixels."""
    check_latent(samples, "Relay Upscale Latent")
    th, tw = target_size(samples, scale, multiple)
    if method.startswith("pixel"):
        if vae is None:
            raise RelayInputError("The pixel upscale method needs a VAE: connect the model's VAE to the vae input.")
        ratio = vae.downscale_ratio if isinstance(vae.downscale_ratio, int) else vae.downscale_ratio[-1]
        images = vae.decode(samples)
        if images.ndim == 5:  # video VAEs decode (B, T, H, W, C)
            images = images.reshape(-1, *images.shape[-3:])
        images = comfy.utils.common_upscale(images.movedim(-1, 1), tw * ratio, th * ratio, "bicubic", "disabled")
        return vae.encode(images.movedim(1, -1).clamp(0.0, 1.0)[..., :3])
    mode = method.split(" ")[0]
    up = upsample_latent(samples.float(), th / samples.shape[-2], mode=mode)
    if up.shape[-2:] != (th, tw):  # non-square rounding: resize to the exact target
        up = torch.nn.functional.interpolate(up.reshape(-1, *up.shape[-3:]), size=(th, tw), mode="nearest-exact").reshape(
            *up.shape[:-2], th, tw
        )
    return up.to(samples.dtype)


def relay_sigma(model, relay_point: str, relay_value: float) -> float | None:
    """The sigma where the relay starts, or None for the denoise mode (BasicScheduler semantics)."""
    if relay_point == "timestep":
        if not 0 < relay_value < 1000:
            raise RelayInputError(f"A timestep relay point must be between 1 and 999 (500 is CogView3's); got {relay_value}.")
        return model_info.timestep_to_sigma(model, relay_value)
    if relay_point == "denoise":
        if not 0 < relay_value <= 1:
            raise RelayInputError(f"A denoise relay point must be in (0, 1], e.g. 0.5; got {relay_value}.")
        return None
    if relay_point == "sigma":
        if relay_value <= 0:
            raise RelayInputError(f"A sigma relay point must be positive (about 1.6 for 2x on SD models); got {relay_value}.")
        return float(relay_value)
    raise RelayInputError(f"relay_point must be one of {RELAY_POINTS}; got {relay_point!r}.")


def relay_sigmas(model, scheduler: str, steps: int, relay_point: str, relay_value: float) -> torch.Tensor:
    """A schedule of `steps` steps that starts at the relay point and ends at 0."""
    if steps < 1:
        raise RelayInputError("steps must be at least 1.")
    ms = model.get_model_object("model_sampling")

    def schedule(n: int) -> torch.Tensor:
        return comfy.samplers.calculate_sigmas(ms, scheduler, n).cpu().float()

    sigma = relay_sigma(model, relay_point, relay_value)
    if sigma is None:
        return denoise_schedule(schedule, steps, relay_value)
    top = float(schedule(steps)[0])
    if sigma >= top:
        raise RelayInputError(
            f"The relay point (sigma {sigma:.3f}) is at or above the start of the full schedule (sigma {top:.3f}): "
            "lower the relay point (a smaller timestep or denoise)."
        )
    return relay_schedule(schedule, steps, sigma)


def sample_relay(model, positive, negative, latent: dict, z_up: torch.Tensor, sigmas: torch.Tensor, noise, cfg: float,
                 sampler) -> dict:
    """ComfyUI's own CFG sampling from the upscaled latent along a relay schedule (as SamplerCustomAdvanced)."""
    z_up = comfy.sample.fix_empty_latent_channels(model, z_up)
    guider = comfy.samplers.CFGGuider(model)
    guider.set_conds(positive, negative)
    guider.set_cfg(cfg)
    callback = latent_preview.prepare_callback(model, sigmas.shape[-1] - 1)
    out_latent = {k: v for k, v in latent.items() if k not in ("noise_mask", "batch_index")}
    out_latent["samples"] = z_up
    samples = guider.sample(noise.generate_noise(out_latent), z_up, sampler, sigmas, callback=callback,
                            disable_pbar=not comfy.utils.PROGRESS_BAR_ENABLED, seed=noise.seed)
    out_latent["samples"] = samples.to(comfy.model_management.intermediate_device())
    return out_latent


def check_model_takes(model, samples: torch.Tensor) -> None:
    """Clear error before sampling when the latent does not fit the model."""
    down = model_info.total_downsampling(model)
    h, w = samples.shape[-2:]
    if h < down or w < down or h % down or w % down:
        raise RelayInputError(
            f"This model needs latent sides that are multiples of {down} (that is {down * 8} pixels); "
            f"the upscaled latent is {h}x{w}. Change scale_by or the low-resolution size."
        )
    channels = model.get_model_object("latent_format").latent_channels
    if samples.shape[1] != channels and torch.count_nonzero(samples) != 0:
        raise RelayInputError(
            f"The latent has {samples.shape[1]} channels but this model works on {channels}: "
            "use a latent made by the same model family (or its VAE)."
        )


# ---------------------------------------------------------------------------------------------
# Nodes

_SEED = dict(default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
             tooltip="Seed of the noise. With strength 0 the noise equals ComfyUI's own noise for this seed.")


def _block_inputs() -> list:
    return [
        io.Int.Input("block_size", default=4, min=1, max=64,
                     tooltip="Side of the noise blocks in latent pixels (8 image pixels each). About the upscale factor x 2 "
                             "works well: 4 for 2x."),
        io.Float.Input("strength", default=0.3, min=0.0, max=2.0, step=0.01,
                       tooltip="Weight s of the block noise: n = (eps + s * block) / sqrt(1 + s^2). 0 gives plain noise; "
                               "0.15 to 0.5 suits SD-family hires work."),
    ]


class HiResParallelBlockNoise(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="HiResParallelBlockNoise",
            display_name="Block Noise (Relay)",
            category=CATEGORY_NOISE,
            description="Noise for SamplerCustomAdvanced mixed with box-filtered block noise (Relay Diffusion). "
                        "Correlated noise restores the low-frequency noise level that a higher resolution loses.",
            inputs=[
                io.Int.Input("noise_seed", **_SEED),
                *_block_inputs(),
                io.Boolean.Input("normalize", default=True,
                                 tooltip="Divide by sqrt(1 + s^2) so the noise keeps unit variance, as a stock model expects."),
                io.Combo.Input("variant", options=NOISE_VARIANTS, default="box",
                               tooltip="box: moving sum of Gaussian noise over k x k (RDM). constant: one value per block."),
            ],
            outputs=[io.Noise.Output()],
        )

    @classmethod
    def execute(cls, noise_seed: int, block_size: int, strength: float, normalize: bool, variant: str) -> io.NodeOutput:
        if block_size < 1 or strength < 0 or variant not in NOISE_VARIANTS:
            raise RelayInputError("block_size must be >= 1, strength >= 0 and variant one of " + ", ".join(NOISE_VARIANTS))
        return io.NodeOutput(BlockNoise(noise_seed, block_size, strength, normalize, variant))


class HiResParallelRelayUpscaleLatent(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="HiResParallelRelayUpscaleLatent",
            display_name="Relay Upscale Latent",
            category="latent/upscale",
            description="Upsample a low-resolution latent as the start of a relay: sides rounded to multiples of 8 "
                        "latent pixels (64 image pixels).",
            inputs=[
                io.Latent.Input("samples", tooltip="The low-resolution latent (any channel count)."),
                io.Float.Input("scale_by", default=2.0, min=MIN_SCALE, max=MAX_SCALE, step=0.05,
                               tooltip="Upscale factor per side, 1.5x to 4x."),
                io.Combo.Input("method", options=UPSCALE_METHODS, default=UPSCALE_METHODS[0],
                               tooltip="nearest (latent) is the relay's own choice and is fastest; the pixel method "
                                       "decodes, resizes bicubically and encodes again (needs the VAE)."),
                io.Vae.Input("vae", optional=True, tooltip="Only for the pixel method."),
            ],
            outputs=[io.Latent.Output()],
        )

    @classmethod
    def execute(cls, samples: dict, scale_by: float, method: str, vae=None) -> io.NodeOutput:
        out = {k: v for k, v in samples.items() if k not in ("noise_mask",)}
        out["samples"] = relay_upscale(samples["samples"], scale_by, method, vae)
        return io.NodeOutput(out)


class HiResParallelRelaySigmas(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="HiResParallelRelaySigmas",
            display_name="Relay Sigmas",
            category=CATEGORY_SIGMAS,
            description="A schedule of `steps` steps that starts at the relay point (an intermediate noise level) "
                        "and ends at 0, following the chosen scheduler.",
            inputs=[
                io.Model.Input("model", tooltip="The model whose noise levels the schedule follows."),
                io.Combo.Input("scheduler", options=comfy.samplers.SCHEDULER_NAMES, default="karras",
                               tooltip="Shape of the schedule, as in BasicScheduler."),
                io.Int.Input("steps", default=12, min=1, max=1000, tooltip="Steps after the relay point."),
                io.Combo.Input("relay_point", options=RELAY_POINTS, default="timestep",
                               tooltip="How relay_value is read: a timestep 1..999 (500 is CogView3's relay point, "
                                       "600 for larger jumps), a denoise fraction like KSampler's, or a sigma."),
                io.Float.Input("relay_value", default=500.0, min=0.0, max=1000.0, step=0.01,
                               tooltip="Timestep (e.g. 500), denoise (e.g. 0.5) or sigma (e.g. 1.6), per relay_point."),
            ],
            outputs=[io.Sigmas.Output()],
        )

    @classmethod
    def execute(cls, model, scheduler: str, steps: int, relay_point: str, relay_value: float) -> io.NodeOutput:
        return io.NodeOutput(relay_sigmas(model, scheduler, steps, relay_point, relay_value))


class HiResParallelLinearRelaySampler(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="HiResParallelLinearRelaySampler",
            display_name="Linear Relay Sampler (CogView3, experimental)",
            category=CATEGORY_SAMPLERS,
            is_experimental=True,
            description="CogView3's linear relay step: each step also removes a shrinking share of the upsampled "
                        "low-resolution latent. Made for a fine-tuned relay model; with stock models it is experimental.",
            inputs=[
                io.Latent.Input("upscaled_latent", tooltip="The same upscaled latent that feeds the sampler (z_L)."),
                io.Int.Input("relay_steps", default=0, min=0, max=1000,
                             tooltip="How many final steps use the relay update; 0 means all steps. Earlier steps are DDIM."),
            ],
            outputs=[io.Sampler.Output()],
        )

    @classmethod
    def execute(cls, upscaled_latent: dict, relay_steps: int) -> io.NodeOutput:
        check_latent(upscaled_latent["samples"], "Linear Relay Sampler")
        options = {"z_low": upscaled_latent["samples"], "relay_steps": relay_steps or None}
        return io.NodeOutput(comfy.samplers.KSAMPLER(_linear_relay_sampler, extra_options=options))


@torch.no_grad()
def _linear_relay_sampler(model, x, sigmas, extra_args=None, callback=None, disable=None, z_low=None, relay_steps=None):
    """k-diffusion-style sampler function for KSAMPLER; z_low arrives unprocessed and is moved into model space."""
    extra_args = extra_args or {}
    base_model = model.inner_model.inner_model  # KSamplerX0Inpaint -> CFGGuider -> BaseModel
    z = base_model.process_latent_in(comfy.sample.fix_empty_latent_channels(model.inner_model.model_patcher, z_low))
    z = z.to(device=x.device, dtype=x.dtype)
    if z.shape != x.shape:
        raise RelayInputError(
            f"upscaled_latent is {tuple(z.shape)} but the sampler runs on {tuple(x.shape)}: connect the same upscaled "
            "latent that feeds the sampler."
        )
    if relay_steps is not None and not 1 <= relay_steps <= len(sigmas) - 1:
        relay_steps = None

    def denoise(xt, s):
        return model(xt, s, **extra_args)

    return sample_linear_relay(denoise, x, sigmas, z, callback=callback, relay_steps=relay_steps)


class HiResParallelRelayUpscaleSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="HiResParallelRelayUpscaleSampler",
            display_name="Relay Upscale Sampler",
            category="sampling",
            description="One-node block-noise relay upscale: upsample the low-resolution latent, add block noise at the "
                        "relay point, and sample the rest of the schedule with ComfyUI's sampler. Same result as Relay "
                        "Upscale Latent + Relay Sigmas + Block Noise + SamplerCustomAdvanced.",
            inputs=[
                io.Model.Input("model", tooltip="The model that denoises, as in KSampler (LoRAs and patches apply)."),
                io.Conditioning.Input("positive", tooltip="What the image should contain."),
                io.Conditioning.Input("negative", tooltip="What the image should not contain."),
                io.Latent.Input("latent_image", tooltip="The low-resolution result to upscale."),
                io.Float.Input("scale_by", default=2.0, min=MIN_SCALE, max=MAX_SCALE, step=0.05,
                               tooltip="Upscale factor per side, 1.5x to 4x."),
                io.Int.Input("seed", **_SEED),
                io.Int.Input("steps", default=12, min=1, max=1000, tooltip="Steps after the relay point."),
                io.Float.Input("cfg", default=7.0, min=0.0, max=100.0, step=0.1, round=0.01,
                               tooltip="Classifier-free guidance scale, as in KSampler."),
                io.Combo.Input("sampler_name", options=comfy.samplers.SAMPLER_NAMES, default="euler",
                               tooltip="Any ComfyUI sampler."),
                io.Combo.Input("scheduler", options=comfy.samplers.SCHEDULER_NAMES, default="karras",
                               tooltip="Any ComfyUI scheduler; the schedule is cut at the relay point."),
                *_block_inputs(),
                io.Combo.Input("relay_point", options=RELAY_POINTS, default="timestep",
                               tooltip="timestep 1..999 (500 for 2x, 600 for larger jumps), denoise fraction, or sigma."),
                io.Float.Input("relay_value", default=500.0, min=0.0, max=1000.0, step=0.01,
                               tooltip="Timestep (e.g. 500), denoise (e.g. 0.5) or sigma (e.g. 1.6), per relay_point."),
                io.Combo.Input("upscale_method", options=UPSCALE_METHODS, default=UPSCALE_METHODS[0],
                               tooltip="How the low-resolution latent is upsampled; the pixel method needs the VAE."),
                io.Vae.Input("vae", optional=True, tooltip="Only for the pixel upscale method."),
            ],
            outputs=[io.Latent.Output()],
        )

    @classmethod
    def execute(cls, model, positive, negative, latent_image: dict, scale_by: float, seed: int, steps: int, cfg: float,
                sampler_name: str, scheduler: str, block_size: int, strength: float, relay_point: str,
                relay_value: float, upscale_method: str, vae=None) -> io.NodeOutput:
        # Everything that can be wrong is checked before the model runs.
        noise = BlockNoise(seed, block_size, strength)
        sigmas = relay_sigmas(model, scheduler, steps, relay_point, relay_value)
        z_up = relay_upscale(latent_image["samples"], scale_by, upscale_method, vae)
        check_model_takes(model, z_up)
        sampler = comfy.samplers.sampler_object(sampler_name)
        return io.NodeOutput(sample_relay(model, positive, negative, latent_image, z_up, sigmas, noise, cfg, sampler))


RELAY_NODES = [
    HiResParallelBlockNoise,
    HiResParallelRelayUpscaleLatent,
    HiResParallelRelaySigmas,
    HiResParallelLinearRelaySampler,
    HiResParallelRelayUpscaleSampler,
]

__all__ = ["RELAY_NODES", "BlockNoise", "RelayInputError", "relay_upscale", "relay_sigmas", "sample_relay"]
