"""The pack's embedded model: the small shapes model trained by tools/train_shapes_model.py, as real ComfyUI
objects. It lives inside the pack (``hires_parallel.embedded``) so an installed pack (Registry, which ships
neither tools/ nor benchmarks/) can load it; ``benchmarks/shapes_model.py`` is the same module under its old name.

``load_shapes_model()`` -> (ModelPatcher, CLIP, VAE), like CheckpointLoaderSimple:

* MODEL: an SD1.5-family UNet (``comfy.supported_models.SD15``, EPS prediction, SD1.x discrete schedule,
  ``latent_formats.SD15``) with a small unet_config (stored in the file), trained at a 32x32 latent
  (256x256 pixels) on ``shapes_data`` images. Every ComfyUI sampler, scheduler and node takes it.
* CLIP: a tiny SD1-style text encoder (``sd1_clip.SD1ClipModel``, ComfyUI's SD1 tokenizer, hidden 64)
  whose seeded weights were frozen during training and saved with the UNet, so CLIPTextEncode gives
  exactly the conditioning the UNet was trained on. Prompts: "a <color> <shape>", or "" (unconditional).
* VAE: a real ``comfy.sd.VAE`` whose autoencoder is a FIXED linear map (nothing trained):
  encode = 8x8 average pooling of the RGB image in [-1, 1], then ``z = LATENT_MATRIX @ rgb / 0.18215``;
  decode = the pseudo-inverse (``LATENT_MATRIX`` is 3 x a 4x3 matrix with orthonormal columns, so it is
  ``LATENT_MATRIX.T / 9``) times 0.18215, then bilinear x8 upsampling. The UNet sees
  ``0.18215 * z = LATENT_MATRIX @ rgb`` (SD15's latent scale): standard deviation about 1 on the data
  set, values within [-4.5, 4.5]. VAEEncode / VAEDecode work on it.

The file lives at ``models/hires_shapes.safetensors`` (UNet and CLIP weights in fp16, config in the
safetensors metadata). Objects are cached per file; callers get clones (add patches freely).
"""
from __future__ import annotations

import json
import logging
import pathlib
import sys
import threading
from typing import Any

import torch

REPO = pathlib.Path(__file__).resolve().parents[1]  # the pack root (embedded/ sits in it)
MODEL_PATH = REPO / "models" / "hires_shapes.safetensors"
TRAIN_COMMAND = "python tools/train_shapes_model.py"
NATIVE_PX = 256  # the side the model was trained at (latent 32x32)
LATENT_RATIO = 8
SD15_SCALE = 0.18215  # comfy.latent_formats.SD15().scale_factor: the UNet sees scale * z
CONFIG_KEY = "hires_shapes_config"
UNET_PREFIX = "model.diffusion_model."
CLIP_PREFIX = "cond_stage_model."

# 4x3 with orthonormal columns (three columns of the 4x4 Hadamard matrix / 2), times a gain of 3 so the
# model-space latent has a standard deviation near 1 on the data set (0.33 without it), like SD's latents:
# channels 1.5 * (r+g+b), 1.5 * (r-g+b), 1.5 * (r+g-b), 1.5 * (r-g-b) of the pooled RGB in [-1, 1].
LATENT_BASIS = torch.tensor([[1.0, 1.0, 1.0], [1.0, -1.0, 1.0], [1.0, 1.0, -1.0], [1.0, -1.0, -1.0]]) / 2.0
LATENT_GAIN = 3.0
LATENT_MATRIX = LATENT_GAIN * LATENT_BASIS

DEFAULT_UNET = {"model_channels": 32, "channel_mult": [1, 2, 2], "num_res_blocks": 1, "context_dim": 64, "num_heads": 2}
DEFAULT_CLIP = {"hidden_size": 64, "num_layers": 2, "num_heads": 2, "intermediate_size": 128}

__all__ = [
    "DEFAULT_CLIP", "DEFAULT_UNET", "LATENT_BASIS", "LATENT_GAIN", "LATENT_MATRIX", "MODEL_PATH", "NATIVE_PX", "ShapesModelMissing", "build_clip",
    "build_unet", "load_shapes_model", "make_vae", "read_config", "read_weights", "save_shapes_model", "unet_config",
]


class ShapesModelMissing(FileNotFoundError):
    """The trained file is not there; the message says how to make it."""


def _ensure_comfy() -> None:
    if "comfy.model_management" in sys.modules:  # inside a running ComfyUI
        return
    from hires_parallel.comfy_host import ensure_comfy

    ensure_comfy()


# ------------------------------------------------------------------------------------------ VAE


class LatentMap(torch.nn.Module):
    """The fixed latent mapping in ComfyUI's first_stage_model conventions (pixels in [-1, 1], BCHW)."""

    def __init__(self) -> None:
        super().__init__()
        # A (frozen) parameter, not a buffer: ComfyUI's model management sizes and moves parameters.
        self.matrix = torch.nn.Parameter(LATENT_MATRIX / SD15_SCALE, requires_grad=False)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        pooled = torch.nn.functional.avg_pool2d(x[:, :3], LATENT_RATIO)
        return torch.einsum("lc,bchw->blhw", self.matrix.to(x.dtype), pooled)

    def decode(self, z: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        inverse = torch.linalg.pinv(self.matrix.float()).to(z.dtype)  # = matrix.T * (scale / gain) ** 2
        rgb = torch.einsum("cl,blhw->bchw", inverse, z)
        return torch.nn.functional.interpolate(rgb, scale_factor=LATENT_RATIO, mode="bilinear", align_corners=False)


def make_vae():
    """A real ``comfy.sd.VAE`` around ``LatentMap`` (encode: IMAGE BHWC [0, 1] -> latent; decode: back)."""
    _ensure_comfy()
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.sd

    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)  # VAE(sd={}) warns "no VAE weights" before we give it its module
    try:
        vae = comfy.sd.VAE(sd={})  # ComfyUI's defaults: process_input/output, ratios 8, 4 channels
    finally:
        logging.disable(previous)
    vae.working_dtypes = [torch.float32]
    vae.device = mm.vae_device()
    vae.vae_dtype = mm.vae_dtype(vae.device, vae.working_dtypes)
    vae.first_stage_model = LatentMap().eval().to(vae.vae_dtype)
    vae.output_device = mm.intermediate_device()
    size = lambda dtype: mm.dtype_size(dtype)  # noqa: E731
    vae.memory_used_encode = lambda shape, dtype: 4 * shape[-2] * shape[-1] * size(dtype)  # pixel-sized buffers
    vae.memory_used_decode = lambda shape, dtype: 8 * 64 * shape[-2] * shape[-1] * size(dtype)
    vae.patcher = comfy.model_patcher.ModelPatcher(vae.first_stage_model, load_device=vae.device,
                                                   offload_device=mm.vae_offload_device())
    return vae


# ----------------------------------------------------------------------------------- UNet, CLIP


def unet_config(unet: dict) -> dict:
    """The SD15 unet_config for our small UNet: one transformer block per level except full resolution."""
    levels = len(unet["channel_mult"])
    blocks = int(unet["num_res_blocks"])
    return {
        "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
        "legacy": False, "adm_in_channels": None, "in_channels": 4,
        "model_channels": int(unet["model_channels"]), "num_res_blocks": [blocks] * levels,
        "transformer_depth": [0] * blocks + [1] * blocks * (levels - 1),
        "channel_mult": list(unet["channel_mult"]), "transformer_depth_middle": 1,
        "use_linear_in_transformer": False, "context_dim": int(unet["context_dim"]),
        "transformer_depth_output": [0] * (blocks + 1) + [1] * (blocks + 1) * (levels - 1),
        "use_temporal_attention": False, "use_temporal_resblock": False,
    }


def build_unet(unet: dict, dtype: torch.dtype = torch.float32):
    """An SD15 BaseModel with our config (weights NOT initialised: load or initialise them), float32, CPU."""
    _ensure_comfy()
    import comfy.supported_models

    config = comfy.supported_models.SD15(unet_config(unet))
    config.unet_config.update({"num_heads": int(unet["num_heads"]), "num_head_channels": -1})  # after extra config
    config.set_inference_dtype(dtype, None)
    model = config.get_model({}, UNET_PREFIX, device=torch.device("cpu"))
    return model.eval()


def build_clip(clip: dict):
    """The tiny SD1 text encoder (weights NOT initialised), ComfyUI's SD1 tokenizer, float32."""
    _ensure_comfy()
    import comfy.sd
    import comfy.sd1_clip
    import comfy.supported_models_base

    text_config = {
        "hidden_size": int(clip["hidden_size"]), "intermediate_size": int(clip["intermediate_size"]),
        "num_attention_heads": int(clip["num_heads"]), "num_hidden_layers": int(clip["num_layers"]),
        "max_position_embeddings": 77, "vocab_size": 49408, "projection_dim": int(clip["hidden_size"]),
    }
    target = comfy.supported_models_base.ClipTarget(comfy.sd1_clip.SD1Tokenizer, comfy.sd1_clip.SD1ClipModel)
    return comfy.sd.CLIP(target, embedding_directory=None,
                         model_options={"clip_l_model_config": text_config, "dtype": torch.float32})


# ----------------------------------------------------------------------------------- save / load


def save_shapes_model(path: str | pathlib.Path, unet_state: dict, clip_state: dict, config: dict) -> pathlib.Path:
    """UNet and CLIP weights in fp16 (0-dim and integer tensors as they are), config as metadata."""
    from safetensors.torch import save_file

    def half(t: torch.Tensor) -> torch.Tensor:
        t = t.detach().cpu()
        return t.half().contiguous() if t.is_floating_point() and t.ndim > 0 else t.contiguous()

    tensors = {UNET_PREFIX + k: half(v) for k, v in unet_state.items()}
    tensors.update({CLIP_PREFIX + k: half(v) for k, v in clip_state.items()})
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={CONFIG_KEY: json.dumps(config, sort_keys=True)})
    tmp.replace(path)
    return path


def read_config(path: str | pathlib.Path = MODEL_PATH) -> dict:
    """The config stored in the file's metadata."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return json.loads(f.metadata()[CONFIG_KEY])


_CACHE: dict[tuple, tuple] = {}
_LOCK = threading.Lock()


def _missing_message(path: pathlib.Path) -> str:
    return (f"The shapes model file {path} is missing. Train it on this machine's CPU (about 25 minutes on 2 cores; "
            f"resumable): cd {REPO} && {TRAIN_COMMAND}")


def load_shapes_model(path: str | pathlib.Path | None = None) -> tuple:
    """(MODEL, CLIP, VAE) from the trained file; cached per file (path, size, mtime); returns clones."""
    path = pathlib.Path(path) if path is not None else MODEL_PATH
    if not path.is_file():
        raise ShapesModelMissing(_missing_message(path))
    _ensure_comfy()
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    with _LOCK:
        if key not in _CACHE:
            _CACHE[key] = _load(path)
        model, clip, vae = _CACHE[key]
    return model.clone(), clip.clone(), vae


def read_weights(path: str | pathlib.Path) -> tuple[dict, dict]:
    """(UNet state dict, CLIP state dict) of a saved shapes model, floats as float32."""
    from safetensors.torch import load_file

    sd = load_file(str(path))
    unet_sd = {k[len(UNET_PREFIX):]: v.float() for k, v in sd.items() if k.startswith(UNET_PREFIX)}
    clip_sd = {k[len(CLIP_PREFIX):]: (v.float() if v.is_floating_point() else v)
               for k, v in sd.items() if k.startswith(CLIP_PREFIX)}
    return unet_sd, clip_sd


def _load(path: pathlib.Path) -> tuple:
    import comfy.model_management as mm
    import comfy.model_patcher

    config = read_config(path)
    unet_sd, clip_sd = read_weights(path)
    base = build_unet(config["unet"])
    base.diffusion_model.load_state_dict(unet_sd, strict=True)
    model = comfy.model_patcher.ModelPatcher(base, load_device=mm.get_torch_device(), offload_device=mm.unet_offload_device())
    clip = build_clip(config["clip"])
    missing, unexpected = clip.cond_stage_model.load_state_dict(clip_sd, strict=False)
    if unexpected or [k for k in missing if "logit_scale" not in k]:
        raise RuntimeError(f"{path}: CLIP weights do not match the config (missing {missing[:3]}, unexpected {unexpected[:3]})")
    return model, clip, make_vae()
