"""A small REAL ComfyUI ControlNet with seeded weights, matching a tiny UNet of tiny_models.

``build_tiny_controlnet(model, seed)`` builds ``comfy.cldm.cldm.ControlNet`` from the UNet's own
unet_config (without ``out_channels``, with ``hint_channels`` 3), exactly as
``comfy.controlnet.load_controlnet_state_dict`` configures one for a checkpoint of that family
(operations from ``comfy.ops.pick_operations``, the offload device, the UNet's dtype), fills every
parameter from ``seed`` (``tiny_models.seed_module_``: the zero convolutions of real checkpoints get
random weights too, so the control visibly changes the output), and wraps it in
``comfy.controlnet.ControlNet`` as that loader does (no latent_format: the hint is an image whose
pixel size is the latent size x 8).

The ControlNet is cached per (model config, seed) and returned itself, like ComfyUI's loader output:
apply nodes copy it, and the copies share the control model (so its cache key stays the same).
"""
from __future__ import annotations

from typing import Any

from .tiny_models import _cached, _ensure_comfy, seed_module_

__all__ = ["build_tiny_controlnet", "hint_image"]


def build_tiny_controlnet(model, seed: int = 11) -> Any:
    """A comfy.controlnet.ControlNet for ``model`` (an SD-family tiny ModelPatcher), weights from ``seed``."""
    _ensure_comfy()
    unet_config = dict(model.model.model_config.unet_config)
    key = ("controlnet", repr(sorted((k, repr(v)) for k, v in unet_config.items())), int(seed))
    return _cached(key, lambda: _build(unet_config, seed))


def _build(unet_config: dict, seed: int) -> Any:
    import torch

    import comfy.cldm.cldm
    import comfy.controlnet
    import comfy.model_management as mm
    import comfy.ops

    dtype = unet_config.pop("dtype", None) or torch.float32
    load_device = mm.get_torch_device()
    manual_cast_dtype = mm.unet_manual_cast(dtype, load_device)
    config = dict(unet_config)
    config.pop("out_channels")
    config.update(hint_channels=3, operations=comfy.ops.pick_operations(dtype, manual_cast_dtype), dtype=dtype,
                  device=mm.unet_offload_device())
    control_model = comfy.cldm.cldm.ControlNet(**config)
    seed_module_(control_model, seed)
    return comfy.controlnet.ControlNet(control_model, load_device=load_device, manual_cast_dtype=manual_cast_dtype)


def hint_image(latent_height: int, latent_width: int, seed: int = 0):
    """A random IMAGE (1, H*8, W*8, 3) in [0, 1] for a latent of the given size."""
    import torch

    g = torch.Generator().manual_seed(int(seed))
    return torch.rand(1, latent_height * 8, latent_width * 8, 3, generator=g)
