"""Small REAL ComfyUI model objects with seeded random weights, for tests and benchmarks.

No weights can be downloaded where these tests run, so every object here is built from ComfyUI's own
classes (``comfy.supported_models``, ``comfy.model_base``, ``comfy.model_patcher``, ``comfy.sd``,
``comfy.sd1_clip``, ``comfy.sdxl_clip``, ``comfy.lora``) with a small config, and every parameter is
filled deterministically from a seed (one generator per parameter, seeded from the seed and the
parameter's name, so the values do not depend on construction order or device).

Weight scale: matrices and conv kernels ~ N(0, 1/fan_in), biases ~ N(0, 0.02^2), norm weights
~ 1 + N(0, 0.05^2), norm biases ~ N(0, 0.02^2). The convolutions/projections that real checkpoints
zero-initialise (ResBlock ``out_layers.3``, transformer ``proj_out``, the UNet's ``out.2``) get the
same random weights, so the output depends on the input; activations stay finite and O(1).

Facts the rest of the test suite may rely on (checked by tests/comfy/test_tiny_models.py):

* ``build_sd15``: SD1.5 family (``comfy.supported_models.SD15``, EPS, ``latent_formats.SD15``),
  4 latent channels, ``context_dim`` 64, model_channels 32, channel_mult (1, 2, 2),
  num_res_blocks 1, ``use_linear_in_transformer`` False, ``num_heads`` 2 (SD15 says 8; 2 keeps
  several heads but is much faster with ComfyUI's CPU attention). Attention (one transformer block
  per SpatialTransformer) at 1/2 and 1/4 latent resolution and in the middle block, NONE at full
  resolution. Total downsampling 4 (two downsamples): latent sides must be multiples of 4.
  attn1 keys (``attention_blocks``): input 3 and 5, middle 0, output 0, 1, 2 and 3, every
  ``transformer_index`` 0. About 1.7M parameters.
* ``build_sdxl``: SDXL family (``comfy.supported_models.SDXL`` -> ``comfy.model_base.SDXL``, EPS,
  ``latent_formats.SDXL``), ``adm_in_channels`` 2816 (1280 pooled + 6 * 256 size embeddings, as
  ``SDXL.encode_adm`` builds it), ``context_dim`` 64, model_channels 32, channel_mult (1, 2, 4),
  num_res_blocks 1, linear in transformer, SDXL's ``num_head_channels`` 64 (1 head at 64 channels,
  2 heads at 128). transformer_depth per level (0, 1, 2): no attention at full resolution, depth 2
  at 1/4 and in the middle block (so ``transformer_index`` 1 occurs: input 5, middle 0, output 0
  and 1). Total downsampling 4. About 5.8M parameters.
* ``build_sd15_real_layout``: SD1.5 family with SD1.5's REAL level structure at a small width:
  channel_mult (1, 2, 4, 4) (TOTAL DOWNSAMPLING 8), num_res_blocks 2, attention at 1/1, 1/2 and 1/4
  and in the middle block, none in the 1/8 level (SD1.5's attention_resolutions [4, 2, 1]),
  model_channels 32, context_dim 64, num_head_channels 32. About 8.6M parameters.
* ``build_sd15_full_size``: ComfyUI's full SD15 unet_config (320 channels, 859.5M parameters, 3.4 GB
  in fp32), seeded; not cached.
* ``build_tiny_clip``: SD1 text encoder (``sd1_clip.SD1ClipModel`` + ComfyUI's shipped SD1
  tokenizer), hidden 64, 2 layers, 2 heads; conditioning (1, 77, 64), pooled_output (1, 64).
* ``build_tiny_sdxl_clip``: SDXL dual text encoder (``sdxl_clip.SDXLClipModel`` with clip_l and clip_g
  of hidden 32 each, 3 layers, ``sdxl_clip.SDXLTokenizer``) whose conditioning is (1, 77, 64)
  (32 + 32, concatenated as real SDXL does) and whose pooled_output is projected by one extra seeded
  linear layer from 32 to 1280 dims, so ``SDXL.encode_adm`` gets the 1280-dim pooled vector it expects.
* ``build_tiny_vae``: ``comfy.sd.VAE`` around an ``AutoencoderKL`` (ch 32, ch_mult (1, 2, 2, 2),
  num_res_blocks 1, 4 latent channels, downscale 8). ``attn_resolutions`` is empty; the
  Encoder/Decoder middle block always has one attention layer (at 1/8 resolution).
* ``make_lora_patches``: a kohya-format LoRA (``lora_unet_<diffusers name>.lora_up.weight`` /
  ``.lora_down.weight`` / ``.alpha``) on every self-attention ``attn1.to_q/to_k/to_v/to_out.0`` and on
  the 3x3 conv ``input_blocks.1.0.in_layers.2`` (full resolution), loaded with
  ``comfy.lora.load_lora`` and applied with ``ModelPatcher.add_patches`` on a clone.

Builders cache what they build per (function, arguments) in this process. Model builders return a
fresh ``ModelPatcher.clone()`` (shared weights, own patches/options) and CLIP builders a
``CLIP.clone()``, so callers may add patches freely; ``build_tiny_vae`` returns the cached VAE itself.
``clear_cache()`` forgets everything (to check that a rebuild is identical).

ComfyUI is imported lazily inside the functions, so importing this module is cheap.
"""
from __future__ import annotations

import atexit
import copy
import gc
import math
import sys
import threading
import zlib
from typing import Any, Callable

__all__ = [
    "SD15_CONTEXT_DIM",
    "SDXL_CONTEXT_DIM",
    "SDXL_POOLED_DIM",
    "attention_blocks",
    "build_checkpoint",
    "build_lora_state_dict",
    "build_sd15",
    "build_sd15_full_size",
    "build_sd15_real_layout",
    "build_sdxl",
    "build_tiny_clip",
    "build_tiny_sdxl_clip",
    "build_tiny_vae",
    "clear_cache",
    "denoise_once",
    "family_for_checkpoint_name",
    "lora_target_keys",
    "make_conds",
    "make_lora_patches",
    "seed_module_",
    "sd15_real_layout_unet_config",
    "sd15_unet_config",
    "sdxl_unet_config",
    "total_downsampling",
]

SD15_CONTEXT_DIM = 64
SDXL_CONTEXT_DIM = 64
SDXL_POOLED_DIM = 1280  # adm_in_channels 2816 = 1280 + 6 * 256

_CACHE: dict[tuple, Any] = {}
_LOCK = threading.RLock()


def _ensure_comfy() -> None:
    """``hires_parallel.comfy_host.ensure_comfy()`` unless ComfyUI is already imported (inside a server)."""
    if "comfy.model_management" in sys.modules:
        return
    from hires_parallel.comfy_host import ensure_comfy

    ensure_comfy()


def _cached(key: tuple, build: Callable[[], Any]) -> Any:
    with _LOCK:
        if key not in _CACHE:
            _CACHE[key] = build()
        return _CACHE[key]


def clear_cache() -> None:
    """Forget every cached object (the next builder call rebuilds from the seed)."""
    with _LOCK:
        _CACHE.clear()


@atexit.register
def _release_at_exit() -> None:
    # Drop our ModelPatchers while ComfyUI's modules still exist: ModelPatcher.__del__ run during
    # interpreter teardown prints "'NoneType' object has no attribute 'ON_DETACH'".
    clear_cache()
    gc.collect()


# ---------------------------------------------------------------------------------------------
# seeded weights


def _param_seed(seed: int, name: str) -> int:
    return zlib.crc32("{}/{}".format(int(seed), name).encode("ascii"))


def seed_module_(module, seed: int) -> Any:
    """Fill every floating parameter of ``module`` in place, deterministically from ``seed``.

    One CPU generator per parameter, seeded from (seed, parameter name): the result does not
    depend on construction order, device or dtype. 0-dim parameters (e.g. CLIP's logit_scale)
    are left as constructed. Returns the module.
    """
    import torch

    norm_params = set()
    for mname, m in module.named_modules():
        if isinstance(m, (torch.nn.GroupNorm, torch.nn.LayerNorm)):
            for pname, _ in m.named_parameters(recurse=False):
                norm_params.add("{}.{}".format(mname, pname) if mname else pname)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim == 0 or not p.is_floating_point():
                continue
            g = torch.Generator().manual_seed(_param_seed(seed, name))
            r = torch.randn(p.shape, generator=g, dtype=torch.float32)
            if name in norm_params:
                t = 1.0 + 0.05 * r if name.endswith("weight") else 0.02 * r
            elif p.ndim == 1:
                t = 0.02 * r
            else:
                fan_in = p[0].numel()
                t = r / math.sqrt(fan_in)
            p.copy_(t.to(device=p.device, dtype=p.dtype))
    return module


# ---------------------------------------------------------------------------------------------
# UNets


def sd15_unet_config(
    model_channels: int = 32,
    channel_mult: tuple = (1, 2, 2),
    num_res_blocks: int = 1,
    context_dim: int = SD15_CONTEXT_DIM,
) -> dict:
    """The SD1.5 unet_config of the tiny model (same keys as model_detection's SD15 entry).

    One transformer block per attention level, at every level except the first (full resolution).
    """
    levels = len(channel_mult)
    depth = [0] * num_res_blocks + [1] * num_res_blocks * (levels - 1)
    depth_out = [0] * (num_res_blocks + 1) + [1] * (num_res_blocks + 1) * (levels - 1)
    return {
        "use_checkpoint": False,
        "image_size": 32,
        "out_channels": 4,
        "use_spatial_transformer": True,
        "legacy": False,
        "adm_in_channels": None,
        "in_channels": 4,
        "model_channels": model_channels,
        "num_res_blocks": [num_res_blocks] * levels,
        "transformer_depth": depth,
        "channel_mult": list(channel_mult),
        "transformer_depth_middle": 1,
        "use_linear_in_transformer": False,
        "context_dim": context_dim,
        "transformer_depth_output": depth_out,
        "use_temporal_attention": False,
        "use_temporal_resblock": False,
    }


def sdxl_unet_config(
    model_channels: int = 32,
    channel_mult: tuple = (1, 2, 4),
    num_res_blocks: int = 1,
    transformer_depth: tuple = (0, 1, 2),
    context_dim: int = SDXL_CONTEXT_DIM,
) -> dict:
    """The SDXL unet_config of the tiny model (same keys as model_detection's SDXL entry).

    ``transformer_depth`` is per level; the middle block gets the last level's depth.
    """
    if len(transformer_depth) != len(channel_mult):
        raise ValueError("transformer_depth needs one entry per level of channel_mult")
    depth = [d for d in transformer_depth for _ in range(num_res_blocks)]
    depth_out = [d for d in transformer_depth for _ in range(num_res_blocks + 1)]
    return {
        "use_checkpoint": False,
        "image_size": 32,
        "out_channels": 4,
        "use_spatial_transformer": True,
        "legacy": False,
        "num_classes": "sequential",
        "adm_in_channels": 2816,
        "in_channels": 4,
        "model_channels": model_channels,
        "num_res_blocks": [num_res_blocks] * len(channel_mult),
        "transformer_depth": depth,
        "channel_mult": list(channel_mult),
        "transformer_depth_middle": int(transformer_depth[-1]),
        "use_linear_in_transformer": True,
        "context_dim": context_dim,
        "transformer_depth_output": depth_out,
        "use_temporal_attention": False,
        "use_temporal_resblock": False,
    }


def _build_unet(config_cls_name: str, unet_config: dict, overrides: dict, seed: int, dtype):
    import torch

    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.supported_models

    config = getattr(comfy.supported_models, config_cls_name)(unet_config)
    config.unet_config.update(overrides)  # after unet_extra_config was merged in __init__
    dtype = torch.float32 if dtype is None else dtype
    load_device = mm.get_torch_device()
    manual_cast = mm.unet_manual_cast(dtype, load_device, config.supported_inference_dtypes)
    config.set_inference_dtype(dtype, manual_cast)
    model = config.get_model({}, "model.diffusion_model.", device=torch.device("cpu"))
    model.eval()
    seed_module_(model.diffusion_model, seed)
    return comfy.model_patcher.ModelPatcher(model, load_device=load_device, offload_device=mm.unet_offload_device())


def build_sd15(
    seed: int = 0,
    model_channels: int = 32,
    channel_mult: tuple = (1, 2, 2),
    num_res_blocks: int = 1,
    context_dim: int = SD15_CONTEXT_DIM,
    num_heads: int = 2,
    dtype=None,
):
    """A tiny SD1.5-family UNet (``comfy.supported_models.SD15``) in a real ModelPatcher.

    Defaults: model_channels 32, channel_mult (1, 2, 2) -> TOTAL DOWNSAMPLING 4 (two downsamples;
    ``2 ** (len(channel_mult) - 1)`` in general), num_res_blocks 1, context_dim 64, num_heads 2
    (head dim 32 at 64 channels; SD15 itself says 8, which is 5x slower here on CPU),
    use_linear_in_transformer False. Attention only at 1/2 and 1/4 resolution and in
    the middle block, never at full latent resolution; every transformer_index is 0.
    dtype defaults to float32 (weights and compute). Weights seeded from ``seed``.
    Returns a clone of the cached patcher. About 1.7M parameters at the defaults.
    """
    _ensure_comfy()
    key = ("sd15", int(seed), int(model_channels), tuple(channel_mult), int(num_res_blocks), int(context_dim), int(num_heads), str(dtype))
    cfg = sd15_unet_config(model_channels, tuple(channel_mult), num_res_blocks, context_dim)
    base = _cached(key, lambda: _build_unet("SD15", cfg, {"num_heads": int(num_heads), "num_head_channels": -1}, seed, dtype))
    return base.clone()


def build_sdxl(
    seed: int = 0,
    model_channels: int = 32,
    channel_mult: tuple = (1, 2, 4),
    num_res_blocks: int = 1,
    transformer_depth: tuple = (0, 1, 2),
    context_dim: int = SDXL_CONTEXT_DIM,
    num_head_channels: int = 64,
    dtype=None,
):
    """A tiny SDXL-family UNet (``comfy.supported_models.SDXL`` -> ``model_base.SDXL``) in a ModelPatcher.

    Defaults: model_channels 32, channel_mult (1, 2, 4) -> TOTAL DOWNSAMPLING 4, num_res_blocks 1,
    transformer_depth per level (0, 1, 2) (middle block 2, so transformer_index 1 occurs),
    adm_in_channels 2816 (1280 pooled + 6 * 256 size embeddings), context_dim 64, linear in
    transformer, num_head_channels 64 (SDXL's own). No attention at full latent resolution.
    dtype defaults to float32. Weights seeded from ``seed``. Returns a clone of the cached patcher.
    """
    _ensure_comfy()
    key = ("sdxl", int(seed), int(model_channels), tuple(channel_mult), int(num_res_blocks), tuple(transformer_depth), int(context_dim), int(num_head_channels), str(dtype))
    cfg = sdxl_unet_config(model_channels, tuple(channel_mult), num_res_blocks, tuple(transformer_depth), context_dim)
    base = _cached(key, lambda: _build_unet("SDXL", cfg, {"num_heads": -1, "num_head_channels": int(num_head_channels)}, seed, dtype))
    return base.clone()


def sd15_real_layout_unet_config(
    model_channels: int = 32,
    num_res_blocks: int = 2,
    context_dim: int = SD15_CONTEXT_DIM,
) -> dict:
    """SD1.5's own level structure (model_detection's SD15 entry) at a small width.

    channel_mult (1, 2, 4, 4) (four levels, total downsampling 8), ``num_res_blocks`` per level,
    one transformer block after every ResBlock of levels 1/1, 1/2 and 1/4 (SD1.5's
    attention_resolutions [4, 2, 1]) and none at 1/8, one in the middle block.
    """
    levels = 4
    depth = [1] * num_res_blocks * (levels - 1) + [0] * num_res_blocks
    depth_out = [1] * (num_res_blocks + 1) * (levels - 1) + [0] * (num_res_blocks + 1)
    cfg = sd15_unet_config(model_channels, (1, 2, 4, 4), num_res_blocks, context_dim)
    cfg.update(transformer_depth=depth, transformer_depth_output=depth_out)
    return cfg


def build_sd15_real_layout(
    seed: int = 0,
    model_channels: int = 32,
    num_res_blocks: int = 2,
    context_dim: int = SD15_CONTEXT_DIM,
    num_head_channels: int = 32,
    dtype=None,
):
    """A small SD1.5-family UNet (``comfy.supported_models.SD15``) with SD1.5's REAL level structure.

    channel_mult (1, 2, 4, 4) -> TOTAL DOWNSAMPLING 8 (latent sides must be multiples of 8 to
    split), num_res_blocks 2, attention (one transformer block per SpatialTransformer) at 1/1, 1/2
    and 1/4 latent resolution and in the middle block (at 1/8), none in the 1/8 level's own blocks:
    attn1 keys input 1, 2, 4, 5, 7, 8, middle 0, output 3 to 11. Unlike ``build_sd15`` this HAS
    attention at full latent resolution (slow on CPU: keep latents small, e.g. 40x40).
    model_channels 32 (channels 32, 64, 128, 128), context_dim 64, heads from
    ``num_head_channels`` 32 (1, 2 and 4 heads), use_linear_in_transformer False as SD1.5.
    dtype defaults to float32. Weights seeded from ``seed`` (``seed_module_``). About 8.6M
    parameters at the defaults. Returns a clone of the cached patcher.
    """
    _ensure_comfy()
    key = ("sd15_real", int(seed), int(model_channels), int(num_res_blocks), int(context_dim), int(num_head_channels), str(dtype))
    cfg = sd15_real_layout_unet_config(model_channels, num_res_blocks, context_dim)
    overrides = {"num_heads": -1, "num_head_channels": int(num_head_channels)}
    base = _cached(key, lambda: _build_unet("SD15", cfg, overrides, seed, dtype))
    return base.clone()


def build_sd15_full_size(seed: int = 0, dtype=None):
    """A FULL-SIZE SD1.5 UNet: ``comfy.supported_models.SD15`` with model_detection's SD15 unet_config
    (model_channels 320, channel_mult (1, 2, 4, 4), num_res_blocks 2, attention at 1/1, 1/2, 1/4 and in
    the middle block, context_dim 768, 8 heads), 859.5M parameters, seeded random weights
    (``seed_module_``, about 15 s here), float32 by default: 3.4 GB.

    NOT cached (the caller owns the memory: drop the patcher and ``gc.collect()`` when done). Returns a
    fresh ModelPatcher. Conditioning from ``make_conds`` is (1, 77, 768).
    """
    _ensure_comfy()
    return _build_unet("SD15", sd15_real_layout_unet_config(320, 2, 768), {}, seed, dtype)


def total_downsampling(model) -> int:
    """Total spatial downsampling of a UNet-family ModelPatcher: 2 ** (levels - 1)."""
    return 2 ** (len(model.model.model_config.unet_config["channel_mult"]) - 1)


def attention_blocks(model) -> list[tuple[str, int, int]]:
    """The attn1 patch keys ``(block, number, transformer_index)`` the UNet will use, in forward order.

    ``block`` is "input", "middle" or "output", ``number`` the index ComfyUI puts in
    ``transformer_options["block"]`` (middle is 0), as in ``patches_replace["attn1"]`` keys.
    """
    import comfy.ldm.modules.attention as attention

    unet = model.model.diffusion_model
    out = []
    groups = [("input", list(enumerate(unet.input_blocks))), ("middle", [(0, unet.middle_block)]), ("output", list(enumerate(unet.output_blocks)))]
    for name, blocks in groups:
        for number, block in blocks:
            for layer in block:
                if isinstance(layer, attention.SpatialTransformer):
                    for index in range(len(layer.transformer_blocks)):
                        out.append((name, number, index))
    return out


# ---------------------------------------------------------------------------------------------
# conditioning


def make_conds(model, seed: int, prompt_len: int = 77) -> tuple[list, list]:
    """Positive and negative conditioning in ComfyUI's format, deterministic from ``seed``.

    Each is ``[[cond (1, prompt_len, context_dim), {"pooled_output": ...}]]``. SD1.5: pooled_output
    (1, context_dim), as CLIPTextEncode gives. SDXL: pooled_output (1, adm_in_channels - 1536) =
    (1, 1280) plus the keys CLIPTextEncodeSDXL adds for ``SDXL.encode_adm``: width = height =
    target_width = target_height = 1024, crop_w = crop_h = 0. Fresh tensors and dicts on every call.
    """
    _ensure_comfy()
    import torch

    import comfy.model_base

    base = model.model
    unet_config = base.model_config.unet_config
    ctx = int(unet_config["context_dim"])
    is_sdxl = isinstance(base, comfy.model_base.SDXL)
    pooled_dim = int(unet_config["adm_in_channels"]) - 6 * 256 if is_sdxl else ctx
    g = torch.Generator().manual_seed(int(seed))

    def one() -> list:
        cond = torch.randn(1, prompt_len, ctx, generator=g)
        extra = {"pooled_output": torch.randn(1, pooled_dim, generator=g)}
        if is_sdxl:
            extra.update(width=1024, height=1024, crop_w=0, crop_h=0, target_width=1024, target_height=1024)
        return [[cond, extra]]

    positive = one()
    negative = one()
    return positive, negative


def denoise_once(model, positive, negative, x, sigma: float = 10.0, cfg: float = 1.0):
    """One evaluation of the denoiser D(x_sigma, sigma) through ComfyUI's full sampling machinery.

    Runs ``comfy.sample.sample_custom`` with a one-call KSAMPLER on sigmas [sigma, 0], noise ``x`` and
    an empty latent: the model sees ``model_sampling.noise_scaling(sigma, x, 0)`` (``sigma * x`` for EPS
    when sigma < sigma_max), conds are processed as in real sampling (SDXL's adm included) and
    ``model_options`` patches (attn1/attn2 replace, wrappers, LoRA weight patches) apply. cfg 1.0 skips
    the negative (ComfyUI's cfg=1 shortcut). Returns D on the CPU as float32, shape of ``x``.
    """
    _ensure_comfy()
    import torch

    import comfy.sample
    import comfy.samplers

    result = {}

    def one_call(model_k, noise, sigmas, extra_args=None, callback=None, disable=None):
        s_in = noise.new_ones([noise.shape[0]])
        denoised = model_k(noise, sigmas[0] * s_in, **(extra_args or {}))
        result["denoised"] = denoised
        return denoised

    sampler = comfy.samplers.KSAMPLER(one_call)
    sigmas = torch.tensor([float(sigma), 0.0])
    latent = torch.zeros_like(x)
    comfy.sample.sample_custom(model, x, cfg, sampler, sigmas, positive, negative, latent, disable_pbar=True, seed=0)
    return result["denoised"].float().cpu()


# ---------------------------------------------------------------------------------------------
# LoRA

_LORA_CONV_KEY = "diffusion_model.input_blocks.1.0.in_layers.2.weight"
_ATTN1_SUFFIXES = (".attn1.to_q.weight", ".attn1.to_k.weight", ".attn1.to_v.weight", ".attn1.to_out.0.weight")


def lora_target_keys(model) -> list[str]:
    """Model state-dict keys the test LoRA patches: every self-attention to_q/to_k/to_v/to_out.0
    weight, plus the full-resolution 3x3 conv ``input_blocks.1.0.in_layers.2`` (sorted)."""
    keys = [k for k in model.model.state_dict().keys() if k.startswith("diffusion_model.") and k.endswith(_ATTN1_SUFFIXES)]
    keys.append(_LORA_CONV_KEY)
    return sorted(keys)


def _kohya_names(model, targets: list[str]) -> dict[str, str]:
    import comfy.lora

    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    by_target: dict[str, list[str]] = {}
    for lora_key, model_key in key_map.items():
        if lora_key.startswith("lora_unet_"):
            by_target.setdefault(model_key, []).append(lora_key)
    names = {}
    for k in targets:
        ldm_name = "lora_unet_" + k[len("diffusion_model."):-len(".weight")].replace(".", "_")
        cands = by_target.get(k, [])
        if not cands:
            raise KeyError("comfy.lora.model_lora_keys_unet maps no lora_unet_ key to {}".format(k))
        diffusers = [c for c in cands if c != ldm_name]  # kohya names trained LoRAs use
        names[k] = sorted(diffusers or cands)[0]
    return names


def build_lora_state_dict(model, seed: int, rank: int = 4) -> dict:
    """A kohya-format LoRA state dict for ``lora_target_keys(model)``, seeded from ``seed``.

    Keys ``lora_unet_<diffusers module name>.lora_down.weight`` (rank, in[, kh, kw]),
    ``.lora_up.weight`` (out, rank[, 1, 1]) and ``.alpha`` (= rank / 2, so scale 0.5). The
    weight change has about half the standard deviation of the weight it patches.
    """
    _ensure_comfy()
    import torch

    sd_model = model.model.state_dict()
    targets = lora_target_keys(model)
    names = _kohya_names(model, targets)
    lora = {}
    for k in targets:
        w = sd_model[k]
        name = names[k]
        g = torch.Generator().manual_seed(_param_seed(seed, "lora/" + name))
        out_dim = w.shape[0]
        fan_in = w[0].numel()
        down_shape = (rank,) + tuple(w.shape[1:])
        up_shape = (out_dim, rank) + (1,) * (w.ndim - 2)
        lora[name + ".lora_down.weight"] = torch.randn(down_shape, generator=g) / math.sqrt(fan_in)
        lora[name + ".lora_up.weight"] = torch.randn(up_shape, generator=g) / math.sqrt(rank)
        lora[name + ".alpha"] = torch.tensor(rank / 2.0)
    return lora


def make_lora_patches(model, seed: int, rank: int = 4, strength: float = 1.0):
    """A clone of ``model`` with a real LoRA applied the way LoraLoader does.

    The state dict of ``build_lora_state_dict`` goes through ``comfy.lora_convert.convert_lora``,
    ``comfy.lora.load_lora(lora_sd, comfy.lora.model_lora_keys_unet(...))`` and
    ``clone.add_patches(patches, strength)``. Raises if not every target key was patched.
    """
    _ensure_comfy()
    import comfy.lora
    import comfy.lora_convert

    lora_sd = comfy.lora_convert.convert_lora(build_lora_state_dict(model, seed, rank))
    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    loaded = comfy.lora.load_lora(lora_sd, key_map)
    clone = model.clone()
    patched = clone.add_patches(loaded, strength)
    expected = set(lora_target_keys(model))
    if set(patched) != expected:
        raise RuntimeError("LoRA patched {} keys, expected {}".format(len(set(patched)), len(expected)))
    return clone


# ---------------------------------------------------------------------------------------------
# text encoders


def _tiny_text_config(hidden_size: int, num_layers: int, num_heads: int, intermediate_size: int) -> dict:
    return {
        "hidden_size": int(hidden_size),
        "intermediate_size": int(intermediate_size),
        "num_attention_heads": int(num_heads),
        "num_hidden_layers": int(num_layers),
        "max_position_embeddings": 77,
        "vocab_size": 49408,
        "projection_dim": int(hidden_size),
    }


def build_tiny_clip(seed: int = 0, hidden_size: int = SD15_CONTEXT_DIM, num_layers: int = 2, num_heads: int = 2, intermediate_size: int = 128):
    """A tiny SD1-style ``comfy.sd.CLIP``: ``sd1_clip.SD1ClipModel`` with a small text model config
    (given through ComfyUI's ``clip_l_model_config`` model option: hidden 64, 2 layers, 2 heads,
    intermediate 128, vocab 49408, 77 positions) and ComfyUI's shipped SD1 tokenizer; float32;
    seeded weights. ``clip.encode_from_tokens_scheduled(clip.tokenize("a red ball"))`` gives
    conditioning (1, 77, 64) with pooled_output (1, 64). Returns a clone of the cached CLIP.
    """
    _ensure_comfy()
    key = ("clip_sd1", int(seed), int(hidden_size), int(num_layers), int(num_heads), int(intermediate_size))

    def build():
        import torch

        import comfy.sd
        import comfy.sd1_clip
        import comfy.supported_models_base

        target = comfy.supported_models_base.ClipTarget(comfy.sd1_clip.SD1Tokenizer, comfy.sd1_clip.SD1ClipModel)
        options = {"clip_l_model_config": _tiny_text_config(hidden_size, num_layers, num_heads, intermediate_size), "dtype": torch.float32}
        clip = comfy.sd.CLIP(target, embedding_directory=None, model_options=options)
        seed_module_(clip.cond_stage_model, seed)
        return clip

    return _cached(key, build).clone()


_SDXL_CLIP_CLASS = None


def _tiny_sdxl_clip_class():
    global _SDXL_CLIP_CLASS
    if _SDXL_CLIP_CLASS is None:
        import comfy.ops
        import comfy.sdxl_clip

        class TinySDXLClipModel(comfy.sdxl_clip.SDXLClipModel):
            """SDXLClipModel whose clip_g pooled output is projected to the 1280 dims SDXL's adm wants."""

            def __init__(self, device="cpu", dtype=None, model_options={}):
                super().__init__(device=device, dtype=dtype, model_options=model_options)
                g_hidden = model_options["clip_g_model_config"]["hidden_size"]
                self.pooled_projection = comfy.ops.manual_cast.Linear(g_hidden, SDXL_POOLED_DIM, bias=False, device=device, dtype=dtype)

            def encode_token_weights(self, token_weight_pairs):
                cond, pooled = super().encode_token_weights(token_weight_pairs)
                return cond, self.pooled_projection(pooled)

        _SDXL_CLIP_CLASS = TinySDXLClipModel
    return _SDXL_CLIP_CLASS


def build_tiny_sdxl_clip(seed: int = 0, hidden_size: int = SDXL_CONTEXT_DIM // 2, num_layers: int = 3, num_heads: int = 2, intermediate_size: int = 64):
    """A tiny SDXL-style ``comfy.sd.CLIP``: ``sdxl_clip.SDXLClipModel`` (clip_l and clip_g, each hidden 32,
    3 layers because SDXL reads the penultimate layer, 2 heads) with ``sdxl_clip.SDXLTokenizer``, plus one
    seeded linear layer mapping clip_g's pooled output (32) to 1280 dims. Conditioning (1, 77, 64)
    (= 32 + 32, concatenated like real SDXL), pooled_output (1, 1280). float32. Returns a clone.
    """
    _ensure_comfy()
    key = ("clip_sdxl", int(seed), int(hidden_size), int(num_layers), int(num_heads), int(intermediate_size))

    def build():
        import torch

        import comfy.sd
        import comfy.sdxl_clip
        import comfy.supported_models_base

        target = comfy.supported_models_base.ClipTarget(comfy.sdxl_clip.SDXLTokenizer, _tiny_sdxl_clip_class())
        cfg = _tiny_text_config(hidden_size, num_layers, num_heads, intermediate_size)
        options = {"clip_l_model_config": dict(cfg), "clip_g_model_config": dict(cfg), "dtype": torch.float32}
        clip = comfy.sd.CLIP(target, embedding_directory=None, model_options=options)
        seed_module_(clip.cond_stage_model, seed)
        return clip

    return _cached(key, build).clone()


# ---------------------------------------------------------------------------------------------
# VAE


def build_tiny_vae(seed: int = 0, ch: int = 32, ch_mult: tuple = (1, 2, 2, 2), num_res_blocks: int = 1):
    """A tiny ``comfy.sd.VAE`` around ``comfy.ldm.models.autoencoder.AutoencoderKL``.

    ddconfig like SD's VAE but small: ch 32, ch_mult (1, 2, 2, 2) (downscale 8), num_res_blocks 1,
    z_channels 4, embed_dim 4, attn_resolutions [] (the Encoder/Decoder middle blocks keep their one
    attention layer, at 1/8 resolution). Built through ``comfy.sd.VAE(sd=..., config=...)`` with a
    seeded state dict; dtype is ComfyUI's choice (float32 on CPU). ``vae.encode(image BHWC in [0, 1])``
    -> (B, 4, H/8, W/8); ``vae.decode(latent)`` -> (B, 8h, 8w, 3) in [0, 1]. Cached; the same VAE
    object is returned on every call.
    """
    _ensure_comfy()
    key = ("vae", int(seed), int(ch), tuple(ch_mult), int(num_res_blocks))

    def build():
        import comfy.sd
        from comfy.ldm.models.autoencoder import AutoencoderKL

        ddconfig = {
            "double_z": True,
            "z_channels": 4,
            "resolution": 256,
            "in_channels": 3,
            "out_ch": 3,
            "ch": int(ch),
            "ch_mult": list(ch_mult),
            "num_res_blocks": int(num_res_blocks),
            "attn_resolutions": [],
            "dropout": 0.0,
        }
        params = {"embed_dim": 4, "ddconfig": ddconfig}
        reference = AutoencoderKL(**copy.deepcopy(params))
        seed_module_(reference, seed)
        sd = {k: v.detach().clone() for k, v in reference.state_dict().items()}
        del reference
        return comfy.sd.VAE(sd=sd, config={"params": params})

    return _cached(key, build)


# ---------------------------------------------------------------------------------------------
# checkpoint stand-in


def family_for_checkpoint_name(ckpt_name: str) -> str:
    """"sdxl" when the checkpoint file name contains "xl" (any case), else "sd15"."""
    return "sdxl" if "xl" in str(ckpt_name).lower() else "sd15"


def build_checkpoint(ckpt_name: str, seed: int = 0) -> tuple:
    """(MODEL, CLIP, VAE) like CheckpointLoaderSimple, for a checkpoint file name.

    Names containing "xl" give ``build_sdxl`` + ``build_tiny_sdxl_clip`` (pooled 1280), others
    ``build_sd15`` + ``build_tiny_clip``; both with ``build_tiny_vae``. The weights come from
    ``seed`` only; the name chooses nothing but the family.
    """
    if family_for_checkpoint_name(ckpt_name) == "sdxl":
        return build_sdxl(seed), build_tiny_sdxl_clip(seed), build_tiny_vae(seed)
    return build_sd15(seed), build_tiny_clip(seed), build_tiny_vae(seed)


# ---------------------------------------------------------------------------------------------
# a second latent space: a tiny SD3-family flow model (16 channels) and exact linear VAEs


def sd3_unet_config(depth: int = 2, context_dim: int = SD15_CONTEXT_DIM, pooled_dim: int = SD15_CONTEXT_DIM) -> dict:
    """unet_config of the tiny SD3-family MMDiT: 16 channels in and out, patch 2, hidden 64 * depth,
    ``depth`` heads, a linear context embedder from ``context_dim``, pooled vector of ``pooled_dim``;
    positions from the 2-D sin-cos table computed per size (no learned pos_embed)."""
    return {
        "in_channels": 16,
        "out_channels": 16,
        "patch_size": 2,
        "depth": int(depth),
        "adm_in_channels": int(pooled_dim),
        "context_embedder_config": {"target": "torch.nn.Linear", "params": {"in_features": int(context_dim), "out_features": 64 * int(depth)}},
        "pos_embed_max_size": 96,
        "num_patches": None,
        "pos_embed_scaling_factor": None,
        "input_size": None,
        "qk_norm": None,
        "x_block_self_attn_layers": [],
    }


def build_tiny_sd3(seed: int = 0, depth: int = 2, dtype=None):
    """A tiny SD3-family model (``comfy.supported_models.SD3`` -> ``model_base.SD3``, FLOW, shift 3,
    ``latent_formats.SD3``: 16 latent channels) in a real ModelPatcher. MMDiT with depth 2 (hidden 128,
    2 heads), patch 2 (latent sides must be even), context 64, pooled 64 (see ``make_sd3_conds``).
    About 1.1M parameters. Returns a clone of the cached patcher."""
    _ensure_comfy()
    key = ("sd3", int(seed), int(depth), str(dtype))
    base = _cached(key, lambda: _build_unet("SD3", sd3_unet_config(depth), {}, seed, dtype))
    return base.clone()


def make_sd3_conds(seed: int, prompt_len: int = 77, context_dim: int = SD15_CONTEXT_DIM, pooled_dim: int = SD15_CONTEXT_DIM) -> tuple[list, list]:
    """Positive and negative conditioning for ``build_tiny_sd3``: cond (1, prompt_len, 64) and
    pooled_output (1, 64), deterministic from ``seed``; fresh tensors on every call."""
    _ensure_comfy()
    import torch

    g = torch.Generator().manual_seed(int(seed))

    def one() -> list:
        return [[torch.randn(1, prompt_len, context_dim, generator=g), {"pooled_output": torch.randn(1, pooled_dim, generator=g)}]]

    positive = one()
    negative = one()
    return positive, negative


def build_linear_vae(seed: int = 0, latent_channels: int = 4, ratio: int = 8, gain: float = 0.002):
    """A real ``comfy.sd.VAE`` (own ModelPatcher, loaded by ``vae.decode`` / ``vae.encode`` through ComfyUI's
    model management) whose autoencoder is linear with an EXACT round trip.

    decode: each latent pixel becomes a ratio x ratio x 3 patch, ``gain * W^T z`` (W has orthonormal rows,
    seeded); encode: ``W x / gain`` per patch. So ``encode(decode(z)) == z`` up to float rounding as long as
    the decoded values stay inside [-1, 1] (ComfyUI clamps images to [0, 1]); ``latent_channels`` may be
    4 or 16 (at most 3 * ratio ** 2). The small default gain keeps the raw latents of the tiny random UNets
    (std about 90, peaks about 350 after SD1.5's 1 / 0.18215) inside that range. Cached per arguments; the
    same VAE object is returned on every call.
    """
    _ensure_comfy()
    key = ("linear_vae", int(seed), int(latent_channels), int(ratio), float(gain))

    def build():
        import torch

        import comfy.model_management as mm
        import comfy.model_patcher

        patch = 3 * ratio * ratio
        if latent_channels > patch:
            raise ValueError("latent_channels must be at most 3 * ratio ** 2")
        g = torch.Generator().manual_seed(_param_seed(seed, "linear_vae/{}".format(latent_channels)))
        q, _ = torch.linalg.qr(torch.randn(patch, latent_channels, generator=g, dtype=torch.float64))
        weight = q.T.contiguous().float().reshape(latent_channels, 3, ratio, ratio)

        class LinearPatchAutoencoder(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.weight = torch.nn.Parameter(weight.clone(), requires_grad=False)

            def decode(self, z, **kwargs):
                return torch.nn.functional.conv_transpose2d(z, self.weight.to(z.dtype), stride=ratio) * gain

            def encode(self, x):
                return torch.nn.functional.conv2d(x, self.weight.to(x.dtype), stride=ratio) / gain

        vae = copy.copy(build_tiny_vae(seed))  # a real VAE's attributes (devices, dtype, memory estimates)
        module = LinearPatchAutoencoder().eval().to(vae.vae_dtype)
        vae.first_stage_model = module
        vae.patcher = comfy.model_patcher.ModelPatcher(module, load_device=vae.device, offload_device=mm.vae_offload_device())
        vae.latent_channels = int(latent_channels)
        vae.downscale_ratio = vae.upscale_ratio = int(ratio)
        return vae

    return _cached(key, build)
