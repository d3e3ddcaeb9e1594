"""Test-only ComfyUI node pack: loaders that need no model file (checkpoint, DiT, text encoder, VAE).

``HiResTestCheckpointLoader`` ("HiRes Test Checkpoint Loader", category hires_parallel/testing) takes
``ckpt_name`` as a free STRING, so the widget value of a CheckpointLoaderSimple node (for example
"sd_xl_base_1.0.safetensors") can be passed through unchanged, and returns MODEL, CLIP, VAE like
CheckpointLoaderSimple, built by tests/support/tiny_models.py with seeded random weights:

* a name containing "xl" (any case): tiny SDXL UNet (adm 2816, context 64) + tiny SDXL dual CLIP
  (conditioning (1, 77, 64), pooled_output projected to (1, 1280)) + tiny VAE;
* a name containing "shapes" (any case): the TRAINED shapes model of benchmarks/shapes_model.py
  (models/hires_shapes.safetensors; SD1.5 family, its CLIP and its fixed linear VAE; weight_seed unused);
* any other name: tiny SD1.5 UNet (context 64) + tiny SD1 CLIP (conditioning (1, 77, 64)) + tiny VAE.

Apart from "shapes", the name chooses nothing but the family; the optional ``weight_seed`` chooses the weights.

The DiT loaders stand in for ComfyUI's split loaders (UNETLoader, CLIPLoader / DualCLIPLoader, VAELoader),
so the Flux and Wan example workflows run with the original loaders swapped by ``ui_to_api(...,
replace_types=...)``. They take the original loaders' widget values as free STRINGs (file names and
combo values pass through unchanged); the optional ``weight_seed`` chooses the weights (default 0):

* ``HiResTestUNETLoader`` (unet_name, optional weight_dtype, ignored) -> MODEL: the tiny DiT of
  tests/support/tiny_dits.py chosen by the lower-cased name: "flux" and "schnell" -> flux_schnell,
  "flux" -> flux (dev, guidance embedder), "wan2.2" / "wan22" / "wan2_2" -> wan22 (48 channels),
  "wan" -> wan21, "qwen" -> qwen_image, "sd3" -> sd3; any other name is refused (ValueError).
* ``HiResTestTextEncoderLoader`` (all optional STRINGs: clip_name, clip_name1, clip_name2, type,
  device; replaces both CLIPLoader and DualCLIPLoader) -> CLIP: a ``TinyTextEncoder`` for the family
  named by ``type``: "flux" (cond (1, 16, 32) + pooled_output (1, 32)), "wan" (cond (1, 16, 32)),
  "qwen_image" (cond (1, 16, 32)), "sd3" (cond (1, 16, 64) + pooled_output (1, 64)); other types are
  refused. It has what ComfyUI's CLIPTextEncode calls (``tokenize``, ``encode_from_tokens_scheduled``)
  plus ``encode_from_tokens``, ``clone`` and a no-op ``clip_layer``; the conditioning is
  ``[[cond, {"pooled_output": ...}]]`` like comfy.sd.CLIP's, so FluxGuidance and ConditioningZeroOut
  work on it. The text is split into lower-case words, one token per word (crc32 of the word), cut or
  padded to 16 tokens; each token's embedding is N(0, 1) seeded from (weight_seed, token, position)
  and the pooled vector N(0, 1) seeded from (weight_seed, all tokens): deterministic from the text.
* ``HiResTestVAELoader`` (vae_name) -> VAE: for names containing "wan" or "qwen" (Qwen-Image's VAE is
  Wan 2.1's; its sampled latents are (B, 16, 1, H, W)), a 16-channel video VAE that
  decodes (B, 16, T, H, W) latents as ComfyUI's Wan 2.1 VAE does for VAEDecode (latent_dim 3,
  upscale_ratio (lambda t: max(0, 4 t - 3), 8, 8), so T latent frames give 1 + 4 (T - 1) frames; names
  with "wan2.2" / "wan22" / "wan2_2": 48 channels and spatial ratio 16, like Wan 2.2's VAE):
  each latent frame decoded by ``tiny_models.build_linear_vae``'s exact linear patch decoder (16 or
  48 channels, ratio 8 or 16); frame 4 k is latent frame k, the 3 frames before it move linearly from latent
  frame k - 1 to k (no two frames repeat: an animated WEBP would merge repeated frames). Its encode
  takes frames 0, 4, 8, ...: an exact round trip. Otherwise (Flux, SD3 names, "ae")
  the 16-channel image ``build_linear_vae`` (ratio 8). All use gain 0.1: the tiny DiTs' sampled latents
  have std about 4 (peaks about 18), so decoded images stay inside [0, 1] (std about 0.05 around 0.5).

The server tests copy or link this folder into a temporary custom_nodes folder, where tests/ is not
on sys.path, so the tests folder is found from this file's own (symlink-resolved) location, else
next to the installed ``hires_parallel`` package, and put on sys.path to import ``support``.
"""
from __future__ import annotations

import os
import sys


def _tests_dir() -> str:
    candidates = [os.path.dirname(os.path.dirname(os.path.realpath(__file__)))]
    try:
        import hires_parallel

        candidates.append(os.path.join(os.path.dirname(os.path.realpath(hires_parallel.__file__)), "tests"))
    except ImportError:
        pass
    for path in candidates:
        if os.path.isfile(os.path.join(path, "support", "tiny_models.py")):
            return path
    raise ImportError("HiRes test pack: cannot find tests/support/tiny_models.py (looked in {})".format(candidates))


_TESTS = _tests_dir()
if _TESTS not in sys.path:
    sys.path.insert(0, _TESTS)

from support import tiny_models  # noqa: E402  (cheap: ComfyUI models are built on first use)


class HiResTestCheckpointLoader:
    DESCRIPTION = (
        "Test stand-in for Load Checkpoint: builds tiny real ComfyUI models with seeded random weights. "
        "Names containing 'xl' give the SDXL family, others SD1.5."
    )
    CATEGORY = "hires_parallel/testing"
    RETURN_TYPES = ("MODEL", "CLIP", "VAE")
    OUTPUT_TOOLTIPS = (
        "The tiny diffusion model (SD1.5 or SDXL family).",
        "The tiny text encoder matching the model (context dim 64).",
        "The tiny VAE (4 latent channels, downscale 8).",
    )
    FUNCTION = "load_checkpoint"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "ckpt_name": ("STRING", {
                    "default": "tiny_sd15.safetensors",
                    "tooltip": "Any checkpoint file name; names containing 'xl' give the SDXL family, 'shapes' the "
                               "trained shapes model, others SD1.5.",
                }),
            },
            "optional": {
                "weight_seed": ("INT", {
                    "default": 0, "min": 0, "max": 2**31 - 1,
                    "tooltip": "Seed of the random weights.",
                }),
            },
        }

    def load_checkpoint(self, ckpt_name, weight_seed=0):
        if "shapes" in str(ckpt_name).lower():
            benchmarks = os.path.join(os.path.dirname(_TESTS), "benchmarks")
            if benchmarks not in sys.path:
                sys.path.insert(0, benchmarks)
            import shapes_model

            return shapes_model.load_shapes_model()
        return tiny_models.build_checkpoint(ckpt_name, int(weight_seed))


# ---------------------------------------------------------------------------------------------
# DiT stand-ins for UNETLoader, CLIPLoader / DualCLIPLoader and VAELoader

_WEIGHT_SEED = ("INT", {"default": 0, "min": 0, "max": 2**31 - 1, "tooltip": "Seed of the random weights."})
_PROMPT_LEN = 16


def dit_family_for_unet_name(unet_name: str) -> str:
    """The tests/support/tiny_dits.py family a diffusion-model file name stands for (see the module docstring)."""
    name = str(unet_name).lower()
    if "flux" in name:
        return "flux_schnell" if "schnell" in name else "flux"
    if "wan2.2" in name or "wan22" in name or "wan2_2" in name:
        return "wan22"
    if "wan" in name:
        return "wan21"
    if "qwen" in name:
        return "qwen_image"
    if "sd3" in name:
        return "sd3"
    raise ValueError("HiResTestUNETLoader: no tiny DiT for {!r}; the name must contain flux (schnell), wan (2.2), "
                     "qwen or sd3".format(unet_name))


def _text_dims(clip_type: str) -> tuple[int, int | None]:
    """(context dim, pooled dim or None) of the conditioning the tiny DiT of a CLIPLoader ``type`` takes."""
    from support import tiny_dits

    dims = {
        "flux": (tiny_dits.FLUX_CONTEXT_DIM, tiny_dits.FLUX_POOLED_DIM),
        "wan": (tiny_dits.WAN_TEXT_DIM, None),
        "qwen_image": (tiny_dits.QWEN_CONTEXT_DIM, None),
        "sd3": (tiny_dits.SD3_CONTEXT_DIM, tiny_dits.SD3_POOLED_DIM),
    }
    key = str(clip_type).lower()
    if key not in dims:
        raise ValueError("HiResTestTextEncoderLoader: type {!r} is not supported; use one of {}".format(
            clip_type, sorted(dims)))
    return dims[key]


class TinyTextEncoder:
    """What ComfyUI's text nodes use of a ``comfy.sd.CLIP``, for the tiny DiTs: seeded word embeddings.

    ``tokenize(text)`` -> ``{"tiny": [[(token, 1.0), ...]]}`` (16 tokens: one per lower-case word, crc32
    of the word, cut or padded with token 0); ``encode_from_tokens_scheduled(tokens)`` ->
    ``[[cond (1, 16, context_dim), {"pooled_output": (1, pooled_dim)}]]`` (no pooled_output for families
    without one). Deterministic from the text and ``seed``.
    """

    def __init__(self, clip_type: str, seed: int = 0):
        self.clip_type = str(clip_type).lower()
        self.context_dim, self.pooled_dim = _text_dims(self.clip_type)
        self.seed = int(seed)

    def clone(self):
        return TinyTextEncoder(self.clip_type, self.seed)

    def clip_layer(self, layer_idx):  # CLIPSetLastLayer: nothing to skip in a table of embeddings
        pass

    def tokenize(self, text, return_word_ids=False, **kwargs):
        import re
        import zlib

        words = re.findall(r"\w+", str(text).lower())
        ids = [zlib.crc32(w.encode("utf-8")) & 0x7FFFFFFF or 1 for w in words][:_PROMPT_LEN]
        ids += [0] * (_PROMPT_LEN - len(ids))
        return {"tiny": [[(i, 1.0) for i in ids]]}

    def _generator(self, *parts):
        import zlib

        import torch

        key = "tiny_text/{}/{}".format(self.seed, "/".join(str(p) for p in parts))
        return torch.Generator().manual_seed(zlib.crc32(key.encode("ascii")))

    def encode_from_tokens(self, tokens, return_pooled=False, return_dict=False):
        import torch

        ids = [int(t[0]) for t in tokens["tiny"][0]]
        cond = torch.stack([torch.randn(self.context_dim, generator=self._generator(self.clip_type, pos, tok))
                            for pos, tok in enumerate(ids)]).unsqueeze(0)
        pooled = None
        if self.pooled_dim is not None:
            pooled = torch.randn(1, self.pooled_dim, generator=self._generator(self.clip_type, "pooled", *ids))
        if return_dict:
            out = {"cond": cond}
            if pooled is not None:
                out["pooled_output"] = pooled
            return out
        if return_pooled:
            return cond, pooled
        return cond

    def encode_from_tokens_scheduled(self, tokens, unprojected=False, add_dict=None, show_pbar=True):
        out = self.encode_from_tokens(tokens, return_dict=True)
        cond = out.pop("cond")
        out.update(add_dict or {})
        return [[cond, out]]


def _video_vae(image_vae):
    """A copy of the linear image VAE ``image_vae`` that works on (B, C, T, H, W) like the Wan 2.1 VAE."""
    import copy
    import math

    import torch

    import comfy.model_management as mm
    import comfy.model_patcher

    frames_vae = image_vae.first_stage_model

    class LinearVideoAutoencoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.frames = frames_vae  # shares the image VAE's weight

        def decode(self, z, **kwargs):
            b, c, t, h, w = z.shape
            img = self.frames.decode(z.movedim(2, 1).reshape(b * t, c, h, w))
            img = img.reshape(b, t, *img.shape[1:]).movedim(1, 2)  # (B, 3, T, 8H, 8W)
            # 1 + 4 (T - 1) frames: frame 0, then for each later latent frame k, 4 frames moving linearly
            # from frame k - 1 to frame k (so frame 4 k is latent frame k decoded; no two frames repeat,
            # which an animated WEBP would merge into one)
            frames = [img[:, :, :1]]
            for k in range(1, t):
                for j in range(1, 5):
                    frames.append(img[:, :, k - 1:k] * (1 - j / 4) + img[:, :, k:k + 1] * (j / 4))
            return torch.cat(frames, dim=2)

        def encode(self, x):
            b, c, n, h, w = x.shape
            frames = x[:, :, 0:n:4]  # frames 0, 4, 8, ...: latent frames 0, 1, 2, ... (floor((n + 3) / 4))
            t = frames.shape[2]
            z = self.frames.encode(frames.movedim(2, 1).reshape(b * t, c, h, w))
            return z.reshape(b, t, *z.shape[1:]).movedim(1, 2)

    vae = copy.copy(image_vae)
    module = LinearVideoAutoencoder().eval()
    vae.first_stage_model = module
    vae.patcher = comfy.model_patcher.ModelPatcher(module, load_device=vae.device, offload_device=mm.vae_offload_device())
    ratio = int(image_vae.upscale_ratio)
    vae.latent_dim = 3
    vae.upscale_ratio = (lambda a: max(0, a * 4 - 3), ratio, ratio)
    vae.upscale_index_formula = (4, ratio, ratio)
    vae.downscale_ratio = (lambda a: max(0, math.floor((a + 3) / 4)), ratio, ratio)
    vae.downscale_index_formula = (4, ratio, ratio)
    vae.memory_used_decode = lambda shape, dtype: 64 * 3 * 4 * shape[2] * shape[3] * shape[4] * ratio * ratio
    vae.memory_used_encode = lambda shape, dtype: 64 * 3 * shape[2] * shape[3] * shape[4]
    return vae


_VIDEO_VAES: dict = {}

VAE_GAIN = 0.1


def build_test_vae(vae_name: str, seed: int = 0):
    """The VAE ``HiResTestVAELoader`` returns for ``vae_name`` (see the module docstring); cached per (kind, seed)."""
    name = str(vae_name).lower()
    if "wan" not in name and "qwen" not in name:  # Qwen-Image's VAE is Wan 2.1's
        return tiny_models.build_linear_vae(int(seed), 16, 8, VAE_GAIN)
    wan22 = "wan2.2" in name or "wan22" in name or "wan2_2" in name
    channels, ratio = (48, 16) if wan22 else (16, 8)
    key = (int(seed), channels, ratio)
    if key not in _VIDEO_VAES:
        _VIDEO_VAES[key] = _video_vae(tiny_models.build_linear_vae(int(seed), channels, ratio, VAE_GAIN))
    return _VIDEO_VAES[key]


class HiResTestUNETLoader:
    DESCRIPTION = ("Test stand-in for Load Diffusion Model: a tiny real ComfyUI DiT (Flux, SD3, Qwen-Image, Wan 2.1 / "
                   "2.2) with seeded random weights, chosen by the file name.")
    CATEGORY = "hires_parallel/testing"
    RETURN_TYPES = ("MODEL",)
    OUTPUT_TOOLTIPS = ("The tiny diffusion transformer.",)
    FUNCTION = "load_unet"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "unet_name": ("STRING", {
                    "default": "flux1-dev.safetensors",
                    "tooltip": "Any diffusion model file name containing flux (schnell), wan (2.2), qwen or sd3.",
                }),
            },
            "optional": {
                "weight_dtype": ("STRING", {"default": "default", "tooltip": "Ignored (the tiny models are float32)."}),
                "weight_seed": _WEIGHT_SEED,
            },
        }

    def load_unet(self, unet_name, weight_dtype="default", weight_seed=0):
        from support import tiny_dits

        return (tiny_dits.build_tiny_dit(dit_family_for_unet_name(unet_name), int(weight_seed)),)


class HiResTestTextEncoderLoader:
    DESCRIPTION = ("Test stand-in for Load CLIP and DualCLIPLoader: seeded word embeddings shaped like the tiny DiT's "
                   "text conditioning of the family named by type (flux, wan, qwen_image, sd3).")
    CATEGORY = "hires_parallel/testing"
    RETURN_TYPES = ("CLIP",)
    OUTPUT_TOOLTIPS = ("A text encoder that CLIPTextEncode accepts.",)
    FUNCTION = "load_clip"

    @classmethod
    def INPUT_TYPES(cls):
        text = lambda tip: ("STRING", {"default": "", "tooltip": tip})  # noqa: E731
        return {
            "required": {},
            "optional": {
                "clip_name": text("Ignored (CLIPLoader's file name)."),
                "clip_name1": text("Ignored (DualCLIPLoader's first file name)."),
                "clip_name2": text("Ignored (DualCLIPLoader's second file name)."),
                "type": ("STRING", {"default": "flux", "tooltip": "The model family: flux, wan, qwen_image or sd3."}),
                "device": text("Ignored."),
                "weight_seed": _WEIGHT_SEED,
            },
        }

    def load_clip(self, clip_name="", clip_name1="", clip_name2="", type="flux", device="", weight_seed=0):
        return (TinyTextEncoder(type or "flux", int(weight_seed)),)


class HiResTestVAELoader:
    DESCRIPTION = ("Test stand-in for Load VAE: an exact linear 16-channel VAE; names containing 'wan' give a video "
                   "VAE that decodes (B, 16, T, H, W) latents into 1 + 4 (T - 1) frames like Wan 2.1's (also for 'qwen').")
    CATEGORY = "hires_parallel/testing"
    RETURN_TYPES = ("VAE",)
    OUTPUT_TOOLTIPS = ("The tiny VAE (16 latent channels, downscale 8; Wan 2.2: 48 channels, downscale 16).",)
    FUNCTION = "load_vae"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "vae_name": ("STRING", {"default": "ae.safetensors",
                                        "tooltip": "Any VAE file name; names containing 'wan' or 'qwen' give the video VAE."}),
            },
            "optional": {"weight_seed": _WEIGHT_SEED},
        }

    def load_vae(self, vae_name, weight_seed=0):
        return (build_test_vae(vae_name, int(weight_seed)),)


NODE_CLASS_MAPPINGS = {
    "HiResTestCheckpointLoader": HiResTestCheckpointLoader,
    "HiResTestUNETLoader": HiResTestUNETLoader,
    "HiResTestTextEncoderLoader": HiResTestTextEncoderLoader,
    "HiResTestVAELoader": HiResTestVAELoader,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "HiResTestCheckpointLoader": "HiRes Test Checkpoint Loader",
    "HiResTestUNETLoader": "HiRes Test Diffusion Model Loader",
    "HiResTestTextEncoderLoader": "HiRes Test Text Encoder Loader",
    "HiResTestVAELoader": "HiRes Test VAE Loader",
}

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
