"""The tiny real ComfyUI DiTs of tests/support/tiny_dits.py work with ComfyUI's own code paths."""
from __future__ import annotations

import pytest
import torch

from support import tiny_dits as td
from support import tiny_models as tm

FAMILIES = list(td.DIT_FAMILIES)
SIDE = 32  # latent rows/cols: 16 x 16 = 256 image tokens at patch 2
FRAMES = 3  # latent frames of the video families

# family -> (diffusion model class path, model_base class name, latent channels, latent dims the model gets)
EXPECTED = {
    "flux": ("comfy.ldm.flux.model.Flux", "Flux", 16, 4),
    "flux_schnell": ("comfy.ldm.flux.model.Flux", "Flux", 16, 4),
    "sd3": ("comfy.ldm.modules.diffusionmodules.mmdit.OpenAISignatureMMDITWrapper", "SD3", 16, 4),
    "qwen_image": ("comfy.ldm.qwen_image.model.QwenImageTransformer2DModel", "QwenImage", 16, 5),
    "wan21": ("comfy.ldm.wan.model.WanModel", "WAN21", 16, 5),
    "wan22": ("comfy.ldm.wan.model.WanModel", "WAN22", 48, 5),
}


@pytest.fixture(autouse=True)
def _single_thread(one_thread):
    """1 torch thread: these models are too small to gain from more, and it keeps the file fast on a busy CPU."""


def _class(path: str):
    import importlib

    module, name = path.rsplit(".", 1)
    return getattr(importlib.import_module(module), name)


def _latent(family: str) -> torch.Tensor:
    return td.empty_latent(family, SIDE, SIDE, frames=FRAMES)


def _sampled_shape(family: str) -> tuple:
    """What KSampler hands back: Qwen-Image's 4-D empty latent comes back 5-D (T = 1)."""
    shape = tuple(_latent(family).shape)
    if family == "qwen_image":
        return shape[:2] + (1,) + shape[2:]
    return shape


def _ksample(model, family: str, seed: int = 0, cond_seed: int = 1, cfg: float = 2.0) -> torch.Tensor:
    import nodes

    positive, negative = td.make_dit_conds(model, cond_seed)
    latent = {"samples": _latent(family)}
    return nodes.common_ksampler(model, seed, 3, cfg, "euler", "simple", positive, negative, latent)[0]["samples"]


@pytest.mark.parametrize("family", FAMILIES)
def test_builds_real_comfy_classes(family):
    import comfy.model_base

    model = td.build_tiny_dit(family, 0)
    cls_path, base_name, channels, _ = EXPECTED[family]
    assert type(model.model.diffusion_model) is _class(cls_path)
    assert type(model.model) is getattr(comfy.model_base, base_name)
    assert td.dit_family(model) == family
    assert model.model.latent_format.latent_channels == channels
    assert all(p.dtype == torch.float32 for p in model.model.diffusion_model.parameters())
    if family.startswith("flux"):
        assert model.model.model_config.unet_config["guidance_embed"] is (family == "flux")
        assert hasattr(model.model.diffusion_model.guidance_in, "in_layer") is (family == "flux")


@pytest.mark.parametrize("family", FAMILIES)
def test_conds_and_empty_latents(family):
    model = td.build_tiny_dit(family, 0)
    pos, neg = td.make_dit_conds(model, seed=4)
    ctx = {"sd3": 64}.get(family, 32)
    assert pos[0][0].shape == neg[0][0].shape == (1, 16, ctx)
    assert not torch.equal(pos[0][0], neg[0][0])
    extras = set(pos[0][1])
    if family == "flux":
        assert extras == {"pooled_output", "guidance"} and pos[0][1]["guidance"] == 3.5
    elif family in ("flux_schnell", "sd3"):
        assert extras == {"pooled_output"}
    else:
        assert extras == set()
    if "pooled_output" in extras:
        assert pos[0][1]["pooled_output"].shape == (1, ctx)
    again, _ = td.make_dit_conds(model, seed=4)
    assert torch.equal(again[0][0], pos[0][0]) and again[0][0] is not pos[0][0]
    assert td.make_dit_conds(model, seed=4, prompt_len=7)[0][0][0].shape == (1, 7, ctx)

    latent = td.empty_latent(family, 12, 20, frames=5, batch=2)
    channels = EXPECTED[family][2]
    if family.startswith("wan"):
        assert latent.shape == (2, channels, 5, 12, 20)
    else:
        assert latent.shape == (2, channels, 12, 20)
    assert latent.abs().sum() == 0


@pytest.mark.parametrize("family", FAMILIES)
def test_ksampler_runs_and_depends_on_seed(family):
    model = td.build_tiny_dit(family, 0).clone()
    seen = []

    def record(apply_model, args):
        seen.append((tuple(args["input"].shape), tuple(args["c"]["c_crossattn"].shape)))
        return apply_model(args["input"], args["timestep"], **args["c"])

    model.set_model_unet_function_wrapper(record)
    out = _ksample(model, family, seed=0)
    assert tuple(out.shape) == _sampled_shape(family)
    assert torch.isfinite(out).all() and out.abs().max() > 0
    # 3 euler steps, cond and uncond batched together (cfg 2): the model gets the latent's rank.
    assert len(seen) == 3
    batch_shape = (2,) + _sampled_shape(family)[1:]
    assert {s[0] for s in seen} == {batch_shape}
    assert len(batch_shape) == EXPECTED[family][3]
    assert {s[1] for s in seen} == {(2, 16, {"sd3": 64}.get(family, 32))}

    other = _ksample(model, family, seed=1)
    assert not torch.allclose(out, other)


@pytest.mark.parametrize("family", FAMILIES)
def test_same_seed_same_output_after_rebuild(family):
    first = _ksample(td.build_tiny_dit(family, 0), family, seed=3)
    td.clear_cache()
    second = _ksample(td.build_tiny_dit(family, 0), family, seed=3)
    assert torch.equal(first, second)
    other_weights = _ksample(td.build_tiny_dit(family, 1), family, seed=3)
    assert not torch.allclose(first, other_weights)


_LORA_MODULES = {
    "flux": {"img_attn.qkv", "img_attn.proj", "txt_attn.qkv", "txt_attn.proj", "linear1", "linear2"},
    "sd3": {"x_block.attn.qkv", "x_block.attn.proj", "context_block.attn.qkv", "context_block.attn.proj"},
    "qwen_image": {"attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out"},
    "wan": {"self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o", "cross_attn.q", "cross_attn.k", "cross_attn.v", "cross_attn.o"},
}


@pytest.mark.parametrize("family", FAMILIES)
def test_attention_lora_changes_output(family):
    base = td.build_tiny_dit(family, 0)
    lora, keys = td.make_attention_lora(base, seed=3)
    assert keys == td.attention_lora_keys(base) and keys
    assert set(lora.patches) == set(keys) and not base.patches
    suffixes = _LORA_MODULES["flux" if family.startswith("flux") else "wan" if family.startswith("wan") else family]
    assert {k.split(".", 3)[3][: -len(".weight")] for k in keys} == suffixes

    # One evaluation through ComfyUI's machinery moves by a relative 1e-2..1e-1.
    pos, neg = td.make_dit_conds(base, 1)
    shape = _sampled_shape(family)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(5))
    d0 = tm.denoise_once(base, pos, neg, x, sigma=0.7)
    d1 = tm.denoise_once(lora, pos, neg, x, sigma=0.7)
    rel = ((d1 - d0).norm() / d0.norm()).item()
    assert 1e-2 <= rel <= 1e-1, rel

    ref = _ksample(base, family, seed=2)
    with_lora = _ksample(lora, family, seed=2)
    assert torch.isfinite(with_lora).all()
    assert not torch.allclose(ref, with_lora, rtol=1e-3, atol=1e-3)
    # The LoRA stays on its clone: the base model samples as before.
    assert torch.equal(_ksample(base, family, seed=2), ref)
    # Strength 0 is the base model.
    zero, _ = td.make_attention_lora(base, seed=3, strength=0.0)
    assert torch.allclose(tm.denoise_once(zero, pos, neg, x, sigma=0.7), d0, rtol=1e-5, atol=1e-5)
