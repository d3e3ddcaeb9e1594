"""Tiny REAL ComfyUI diffusion transformers (DiTs) with seeded random weights, for tests and benchmarks.

Same approach as ``support.tiny_models`` (whose helpers this module reuses): every model is built from
ComfyUI's own classes through ``comfy.supported_models.<Config>(unet_config).get_model(...)`` with a small
unet_config, float32, in a real ``ModelPatcher``; every parameter is filled by ``tiny_models.seed_module_``
(one generator per parameter, seeded from the seed and the parameter's name). One deviation: the scales of
RMS norms (Flux's QK ``RMSNorm.scale``, Qwen-Image's ``txt_norm`` / ``norm_q`` / ``norm_k``, Wan's
``norm_q`` / ``norm_k``), which ``seed_module_`` would treat as biases (~0.02, which flattens attention and
kills the text stream), get ``1 + N(0, 0.05^2)`` like the other norm weights, from the same generator.

Facts the rest of the test suite may rely on (checked by tests/comfy/test_tiny_dits.py). "Latent" sizes
are in latent units; all families have a 2x2 spatial patch, so latent sides should be even.

* ``build_tiny_flux(seed, variant="dev")``: ``supported_models.Flux`` -> ``model_base.Flux`` (ModelType
  FLUX, ``latent_formats.Flux``), ``comfy.ldm.flux.model.Flux``: 16 latent channels (img_in takes
  16 * 2 * 2 = 64), hidden 64, 4 heads of 16 (axes_dim [4, 6, 6]), mlp_ratio 4, 2 double + 2 single
  blocks, qkv_bias, context_in_dim 32, vec_in_dim 32, guidance_embed True. ``variant="schnell"``:
  ``supported_models.FluxSchnell`` (ModelType FLOW, shift 1.0), guidance_embed False. Input rank 4
  (B, 16, H, W). At 32x32: 256 image tokens (+ prompt_len text tokens, joint attention in every
  block: 272 tokens at prompt_len 16). About 0.49M parameters (schnell 0.47M).
* ``build_tiny_dit("sd3")`` = ``tiny_models.build_tiny_sd3`` (``mmdit.OpenAISignatureMMDITWrapper``,
  depth 2: hidden 128, 2 heads of 64, context 64, pooled 64). Input rank 4. 256 image tokens at 32x32
  (+ prompt_len text tokens, joint attention). About 1.1M parameters.
* ``build_tiny_qwen_image(seed)``: ``supported_models.QwenImage`` -> ``model_base.QwenImage`` (ModelType
  FLUX, shift 1.15, ``latent_formats.Wan21``: 16 channels, latent_dimensions 3),
  ``comfy.ldm.qwen_image.model.QwenImageTransformer2DModel``: 2 layers, 4 heads of 16 (inner 64),
  axes_dims_rope (4, 6, 6), joint_attention_dim 32, in_channels 64 (16 * 2 * 2), out_channels 16.
  Its empty latent (EmptySD3LatentImage) is 4-D (B, 16, H, W), but ``nodes.common_ksampler`` ->
  ``comfy.sample.fix_empty_latent_channels`` unsqueezes it to (B, 16, 1, H, W) because the latent format
  is 3-D: the model RECEIVES 5-D input (its ``process_img`` unpacks ``b, c, t, h, w``; 4-D input fails)
  and the SAMPLED LATENT COMES BACK 5-D (B, 16, 1, H, W). 256 image tokens at 32x32 (+ prompt_len text
  tokens, joint attention). About 0.34M parameters.
* ``build_tiny_wan(seed, version="2.1")``: ``supported_models.WAN21_T2V`` -> ``model_base.WAN21``
  (FLOW, shift 8, ``latent_formats.Wan21``: 16 channels), ``comfy.ldm.wan.model.WanModel`` t2v, patch
  (1, 2, 2), dim 64, 4 heads of 16 (RoPE axes [8, 4, 4]), ffn_dim 128, 2 layers, text_dim 32,
  freq_dim 256, qk_norm, cross_attn_norm. ``version="2.2"``: ``supported_models.WAN22_T2V`` ->
  ``model_base.WAN22`` (the 5B TI2V layout: ``latent_formats.Wan22``, 48 channels, in_dim = out_dim =
  48). Input rank 5 (B, C, T, H, W); at 3 x 32 x 32: 3 * 256 = 768 image tokens (self-attention over
  all of them; cross-attention to the prompt_len text tokens). About 0.16M parameters (2.2: 0.18M).
* ``make_dit_conds(model, seed, prompt_len=16)``: ``[[cond, extras]]`` positive and negative. Flux: cond
  (1, L, 32), pooled_output (1, 32) (``model_base.Flux.encode_adm`` REQUIRES pooled_output), dev also
  ``guidance`` 3.5 (as FluxGuidance sets; ``model_base.Flux`` would default to 3.5 anyway). SD3: as
  ``make_sd3_conds`` (cond (1, L, 64), pooled_output (1, 64)). Qwen-Image: cond (1, L, 32), no extras.
  Wan: cond (1, L, 32), no extras.
* ``empty_latent(family, height, width, frames=3, batch=1)``: zeros as the family's empty-latent node
  makes them: EmptySD3LatentImage (B, 16, H, W) for flux / flux_schnell / sd3 / qwen_image,
  EmptyHunyuanLatentVideo (B, 16, T, H, W) for wan21, Wan22ImageToVideoLatent (B, 48, T, H, W) for wan22.
* ``make_attention_lora(model, seed, rank=4, strength=1.0)``: a clone carrying a LoRA
  (``diffusion_model.<module>.lora_up.weight`` / ``.lora_down.weight`` / ``.alpha``, the generic format
  ``comfy.lora.model_lora_keys_unet`` maps for every family) on the attention projections listed in
  ``attention_lora_keys`` (Flux 12 keys, SD3 7, Qwen-Image 16, Wan 16); loaded with
  ``comfy.lora.load_lora`` and applied with ``add_patches``. It changes one model evaluation by a relative
  1e-2..1e-1 (measured 0.025..0.06 on the denoised output at sigma 0.7, seed 0 models, LoRA seed 3).

Builders cache what they build per (function, arguments) in this process (``tiny_models``' cache, so
``tiny_models.clear_cache()`` forgets these too) and return ``ModelPatcher.clone()``.
ComfyUI is imported lazily inside the functions, so importing this module is cheap.
"""
from __future__ import annotations

import math
import re

from support.tiny_models import (
    _build_unet,
    _cached,
    _ensure_comfy,
    _param_seed,
    build_tiny_sd3,
    clear_cache,
    make_sd3_conds,
)

__all__ = [
    "DIT_FAMILIES",
    "FLUX_CONTEXT_DIM",
    "FLUX_POOLED_DIM",
    "QWEN_CONTEXT_DIM",
    "WAN_TEXT_DIM",
    "attention_lora_keys",
    "build_attention_lora_state_dict",
    "build_tiny_dit",
    "build_tiny_flux",
    "build_tiny_qwen_image",
    "build_tiny_wan",
    "clear_cache",
    "dit_family",
    "empty_latent",
    "flux_unet_config",
    "make_attention_lora",
    "make_dit_conds",
    "qwen_image_unet_config",
    "wan_unet_config",
]

DIT_FAMILIES = ("flux", "flux_schnell", "sd3", "qwen_image", "wan21", "wan22")
FLUX_CONTEXT_DIM = 32
FLUX_POOLED_DIM = 32
QWEN_CONTEXT_DIM = 32
WAN_TEXT_DIM = 32
SD3_CONTEXT_DIM = 64  # tiny_models.sd3_unet_config's defaults
SD3_POOLED_DIM = 64

# ---------------------------------------------------------------------------------------------
# seeded weights: tiny_models.seed_module_ plus RMS-norm scales around 1


def _seed_norm_scales_(module, seed: int) -> None:
    """Give every 1-D weight/scale of a norm module (class name ending in "Norm", RMS norms included)
    ``1 + 0.05 * r``, r from the same per-parameter generator ``seed_module_`` uses."""
    import torch

    with torch.no_grad():
        for mname, m in module.named_modules():
            if not type(m).__name__.endswith("Norm"):
                continue
            for pname, p in m.named_parameters(recurse=False):
                if p.ndim != 1 or pname not in ("weight", "scale"):
                    continue
                name = "{}.{}".format(mname, pname) if mname else pname
                g = torch.Generator().manual_seed(_param_seed(seed, name))
                r = torch.randn(p.shape, generator=g, dtype=torch.float32)
                p.copy_((1.0 + 0.05 * r).to(device=p.device, dtype=p.dtype))


def _build_dit(config_cls_name: str, unet_config: dict, seed: int):
    patcher = _build_unet(config_cls_name, unet_config, {}, seed, None)
    _seed_norm_scales_(patcher.model.diffusion_model, seed)
    return patcher


# ---------------------------------------------------------------------------------------------
# configs and builders


def flux_unet_config(guidance_embed: bool = True) -> dict:
    """unet_config of the tiny Flux: every ``FluxParams`` field plus image_model "flux"."""
    return {
        "image_model": "flux",
        "in_channels": 16,
        "out_channels": 16,
        "vec_in_dim": FLUX_POOLED_DIM,
        "context_in_dim": FLUX_CONTEXT_DIM,
        "hidden_size": 64,
        "mlp_ratio": 4.0,
        "num_heads": 4,
        "depth": 2,
        "depth_single_blocks": 2,
        "axes_dim": [4, 6, 6],
        "theta": 10000,
        "patch_size": 2,
        "qkv_bias": True,
        "guidance_embed": bool(guidance_embed),
    }


def build_tiny_flux(seed: int = 0, variant: str = "dev"):
    """A tiny Flux (``supported_models.Flux`` for "dev", ``FluxSchnell`` for "schnell") in a ModelPatcher.

    hidden 64, 4 heads (head dim 16, axes_dim [4, 6, 6]), 2 double + 2 single blocks, 16 latent channels,
    patch 2, context 32, pooled 32; dev has a guidance embedder, schnell none. Returns a clone.
    """
    if variant not in ("dev", "schnell"):
        raise ValueError("variant must be 'dev' or 'schnell'")
    _ensure_comfy()
    key = ("dit_flux", int(seed), variant)
    cls_name = "Flux" if variant == "dev" else "FluxSchnell"
    cfg = flux_unet_config(guidance_embed=(variant == "dev"))
    return _cached(key, lambda: _build_dit(cls_name, cfg, seed)).clone()


def qwen_image_unet_config() -> dict:
    """unet_config of the tiny Qwen-Image (keyword arguments of ``QwenImageTransformer2DModel``)."""
    return {
        "image_model": "qwen_image",
        "patch_size": 2,
        "in_channels": 64,
        "out_channels": 16,
        "num_layers": 2,
        "attention_head_dim": 16,
        "num_attention_heads": 4,
        "joint_attention_dim": QWEN_CONTEXT_DIM,
        "axes_dims_rope": (4, 6, 6),
    }


def build_tiny_qwen_image(seed: int = 0):
    """A tiny Qwen-Image (``supported_models.QwenImage``) in a ModelPatcher: 2 layers, 4 heads of 16,
    joint_attention_dim 32, 16 latent channels patchified 2x2 (in_channels 64). The model receives
    5-D (B, 16, 1, H, W) latents (see the module docstring). Returns a clone."""
    _ensure_comfy()
    key = ("dit_qwen_image", int(seed))
    return _cached(key, lambda: _build_dit("QwenImage", qwen_image_unet_config(), seed)).clone()


def wan_unet_config(version: str = "2.1") -> dict:
    """unet_config of the tiny Wan t2v (the keys model_detection writes for Wan, plus text_dim)."""
    channels = 16 if version == "2.1" else 48
    return {
        "image_model": "wan2.1",
        "model_type": "t2v",
        "patch_size": (1, 2, 2),
        "in_dim": channels,
        "out_dim": channels,
        "dim": 64,
        "ffn_dim": 128,
        "freq_dim": 256,
        "text_dim": WAN_TEXT_DIM,
        "num_heads": 4,
        "num_layers": 2,
        "window_size": (-1, -1),
        "qk_norm": True,
        "cross_attn_norm": True,
        "eps": 1e-6,
    }


def build_tiny_wan(seed: int = 0, version: str = "2.1"):
    """A tiny Wan t2v (``supported_models.WAN21_T2V`` for "2.1": 16 channels; ``WAN22_T2V`` for "2.2":
    the 5B layout with 48 channels) in a ModelPatcher: dim 64, 4 heads of 16, ffn 128, 2 layers,
    text_dim 32, patch (1, 2, 2). Latents are 5-D (B, C, T, H, W). Returns a clone."""
    if version not in ("2.1", "2.2"):
        raise ValueError("version must be '2.1' or '2.2'")
    _ensure_comfy()
    key = ("dit_wan", int(seed), version)
    cls_name = "WAN21_T2V" if version == "2.1" else "WAN22_T2V"
    return _cached(key, lambda: _build_dit(cls_name, wan_unet_config(version), seed)).clone()


def build_tiny_dit(family: str, seed: int = 0):
    """The tiny model of ``family`` (one of ``DIT_FAMILIES``)."""
    if family == "flux":
        return build_tiny_flux(seed, "dev")
    if family == "flux_schnell":
        return build_tiny_flux(seed, "schnell")
    if family == "sd3":
        return build_tiny_sd3(seed)
    if family == "qwen_image":
        return build_tiny_qwen_image(seed)
    if family == "wan21":
        return build_tiny_wan(seed, "2.1")
    if family == "wan22":
        return build_tiny_wan(seed, "2.2")
    raise ValueError("unknown DiT family {!r}; expected one of {}".format(family, DIT_FAMILIES))


def dit_family(model) -> str:
    """The ``DIT_FAMILIES`` name of a ModelPatcher (from its ``model_base`` class and config)."""
    import comfy.model_base as mb

    base = model.model
    if isinstance(base, mb.WAN22):  # before WAN21: WAN22 subclasses it
        return "wan22"
    if isinstance(base, mb.WAN21):
        return "wan21"
    if isinstance(base, mb.QwenImage):
        return "qwen_image"
    if isinstance(base, mb.SD3):
        return "sd3"
    if isinstance(base, mb.Flux):
        return "flux" if base.model_config.unet_config.get("guidance_embed") else "flux_schnell"
    raise ValueError("not a tiny DiT family: {}".format(type(base).__name__))


# ---------------------------------------------------------------------------------------------
# conditioning and latents


def make_dit_conds(model, seed: int, prompt_len: int = 16) -> tuple[list, list]:
    """Positive and negative conditioning ``[[cond (1, prompt_len, context_dim), extras]]`` for the
    family of ``model``, deterministic from ``seed``; fresh tensors and dicts on every call.

    Flux: context 32, extras pooled_output (1, 32) (+ guidance 3.5 for dev). SD3: ``make_sd3_conds``.
    Qwen-Image: context 32, no extras. Wan: context 32 (text_dim), no extras.
    """
    _ensure_comfy()
    import torch

    family = dit_family(model)
    if family == "sd3":
        return make_sd3_conds(seed, prompt_len, SD3_CONTEXT_DIM, SD3_POOLED_DIM)
    g = torch.Generator().manual_seed(int(seed))
    ctx = {"flux": FLUX_CONTEXT_DIM, "flux_schnell": FLUX_CONTEXT_DIM, "qwen_image": QWEN_CONTEXT_DIM}.get(family, WAN_TEXT_DIM)

    def one() -> list:
        cond = torch.randn(1, prompt_len, ctx, generator=g)
        extra = {}
        if family in ("flux", "flux_schnell"):
            extra["pooled_output"] = torch.randn(1, FLUX_POOLED_DIM, generator=g)
            if family == "flux":
                extra["guidance"] = 3.5
        return [[cond, extra]]

    positive = one()
    negative = one()
    return positive, negative


def empty_latent(family: str, height: int, width: int, frames: int = 3, batch: int = 1):
    """Zeros shaped like the family's empty-latent node output; ``height`` / ``width`` / ``frames`` are in
    LATENT units. Image families: (batch, 16, height, width) (EmptySD3LatentImage; Qwen-Image included,
    ComfyUI makes it 5-D when sampling). wan21: (batch, 16, frames, height, width)
    (EmptyHunyuanLatentVideo); wan22: (batch, 48, frames, height, width) (Wan22ImageToVideoLatent)."""
    import torch

    if family in ("flux", "flux_schnell", "sd3", "qwen_image"):
        return torch.zeros(batch, 16, height, width)
    if family == "wan21":
        return torch.zeros(batch, 16, frames, height, width)
    if family == "wan22":
        return torch.zeros(batch, 48, frames, height, width)
    raise ValueError("unknown DiT family {!r}; expected one of {}".format(family, DIT_FAMILIES))


# ---------------------------------------------------------------------------------------------
# attention LoRA

_ATTENTION_PATTERNS = {
    "flux": r"(double_blocks\.\d+\.(img|txt)_attn\.(qkv|proj)|single_blocks\.\d+\.linear[12])",
    "sd3": r"joint_blocks\.\d+\.(x_block|context_block)\.attn\.(qkv|proj)",
    "qwen_image": r"transformer_blocks\.\d+\.attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)",
    "wan": r"blocks\.\d+\.(self_attn|cross_attn)\.[qkvo]",
}

# Gain of the LoRA weight change relative to the weight it patches (std ratio); per family so that one
# model evaluation moves by a relative 1e-2..1e-1 (measured with the tiny models' defaults).
_LORA_GAIN = {"flux": 0.1, "sd3": 0.1, "qwen_image": 0.2, "wan": 0.1}


def _pattern_family(family: str) -> str:
    if family.startswith("flux"):
        return "flux"
    if family.startswith("wan"):
        return "wan"
    return family


def attention_lora_keys(model) -> list[str]:
    """Sorted model state-dict keys of the attention projection weights the test LoRA patches.

    Flux: double_blocks.*.img_attn/txt_attn.qkv/proj and single_blocks.*.linear1/linear2 (the fused
    qkv+mlp in / proj+mlp out). SD3: joint_blocks.*.x_block/context_block.attn.qkv/proj (the last
    context block is pre_only: qkv only). Qwen-Image: transformer_blocks.*.attn.to_q/to_k/to_v/to_out.0/
    add_q_proj/add_k_proj/add_v_proj/to_add_out. Wan: blocks.*.self_attn/cross_attn.q/k/v/o.
    """
    fam = _pattern_family(dit_family(model))
    pat = re.compile(r"^diffusion_model\.{}\.weight$".format(_ATTENTION_PATTERNS[fam]))
    return sorted(k for k in model.model.state_dict().keys() if pat.match(k))


def build_attention_lora_state_dict(model, seed: int, rank: int = 4) -> dict:
    """A LoRA state dict for ``attention_lora_keys(model)``, seeded from ``seed``: for each key
    ``diffusion_model.<module>.weight``, ``diffusion_model.<module>.lora_down.weight`` (rank, in) ~
    N(0, 1/in), ``.lora_up.weight`` (out, rank) ~ N(0, 1/rank) and ``.alpha`` = rank * gain, so the
    weight change has ``gain`` (per family, ~0.1) times the std of the weight it patches."""
    _ensure_comfy()
    import torch

    fam = _pattern_family(dit_family(model))
    gain = _LORA_GAIN[fam]
    sd_model = model.model.state_dict()
    lora = {}
    for k in attention_lora_keys(model):
        w = sd_model[k]
        prefix = k[: -len(".weight")]
        g = torch.Generator().manual_seed(_param_seed(seed, "dit_lora/" + prefix))
        fan_in = w[0].numel()
        lora[prefix + ".lora_down.weight"] = torch.randn((rank,) + tuple(w.shape[1:]), generator=g) / math.sqrt(fan_in)
        lora[prefix + ".lora_up.weight"] = torch.randn((w.shape[0], rank) + (1,) * (w.ndim - 2), generator=g) / math.sqrt(rank)
        lora[prefix + ".alpha"] = torch.tensor(float(rank) * gain)
    return lora


def make_attention_lora(model, seed: int, rank: int = 4, strength: float = 1.0):
    """``(clone, patched_keys)``: a clone of ``model`` carrying the attention LoRA of
    ``build_attention_lora_state_dict``, loaded with ``comfy.lora.load_lora(lora_sd,
    comfy.lora.model_lora_keys_unet(model.model, {}))`` and applied with ``clone.add_patches(patches,
    strength)``. ``patched_keys`` is the sorted list of patched weight keys (= ``attention_lora_keys``);
    raises if load_lora did not map every target."""
    _ensure_comfy()
    import comfy.lora

    lora_sd = build_attention_lora_state_dict(model, seed, rank)
    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    loaded = comfy.lora.load_lora(lora_sd, key_map)
    clone = model.clone()
    patched = sorted(clone.add_patches(loaded, strength))
    expected = attention_lora_keys(model)
    if patched != expected:
        raise RuntimeError("attention LoRA patched {} keys, expected {}".format(len(patched), len(expected)))
    return clone, patched
