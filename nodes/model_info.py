"""What our nodes need to know about a ComfyUI model: family, sampling kind, size constraints."""
from __future__ import annotations

import comfy.model_sampling


def diffusion_model(model):
    """The torch module inside a ModelPatcher (UNetModel, Flux, ...)."""
    return model.get_model_object("diffusion_model")


def is_flow(model) -> bool:
    """Flow models mix as x = (1 - sigma) x0 + sigma eps; EPS/V models as x = x0 + sigma eps."""
    return isinstance(model.get_model_object("model_sampling"), comfy.model_sampling.CONST)


def total_downsampling(model) -> int:
    """How many latent pixels one position of the model's coarsest feature map covers per side.

    UNets: 2 ** (levels - 1); patchified transformers: their patch size; otherwise 1.
    """
    dm = diffusion_model(model)
    mult = getattr(dm, "channel_mult", None)
    if mult is not None:
        return 2 ** (len(mult) - 1)
    patch = getattr(dm, "patch_size", None)
    if isinstance(patch, int):
        return patch
    if isinstance(patch, (tuple, list)) and patch:
        return int(patch[-1])
    return 1


def timestep_to_sigma(model, timestep: float) -> float:
    """Sigma at a timestep on the 0..999 scale, for any model family (via percent_to_sigma)."""
    ms = model.get_model_object("model_sampling")
    return float(ms.percent_to_sigma(1.0 - float(timestep) / 999.0))


def sigma_max(model) -> float:
    return float(model.get_model_object("model_sampling").sigma_max)
