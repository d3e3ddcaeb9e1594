"""The tiny real ComfyUI models of tests/support/tiny_models.py work with ComfyUI's own code paths."""
from __future__ import annotations

import pytest
import torch

from support import tiny_models as tm


def _sample(model, positive, negative, shape=(1, 4, 64, 64), seed=0, steps=3, cfg=5.0):
    import comfy.sample

    latent = torch.zeros(shape)
    noise = comfy.sample.prepare_noise(latent, seed)
    return comfy.sample.sample(model, noise, steps, cfg, "euler", "normal", positive, negative, latent, disable_pbar=True, seed=seed)


def _eps(model, positive, x, sigma=10.0):
    """One denoiser evaluation (cond only, cfg 1) through ComfyUI's sampling machinery."""
    return tm.denoise_once(model, positive, positive, x, sigma)


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_unet_runs_through_comfy_sampler(family):
    import comfy.latent_formats
    import comfy.model_base

    model = tm.build_sd15(0) if family == "sd15" else tm.build_sdxl(0)
    base = model.model
    if family == "sdxl":
        assert isinstance(base, comfy.model_base.SDXL)
        assert isinstance(base.latent_format, comfy.latent_formats.SDXL)
        assert base.adm_channels == 2816
    else:
        assert type(base) is comfy.model_base.BaseModel
        assert isinstance(base.latent_format, comfy.latent_formats.SD15)
        assert base.model_config.unet_config["use_linear_in_transformer"] is False
    assert base.model_config.unet_config["context_dim"] == 64
    assert tm.total_downsampling(model) == 4

    pos, neg = tm.make_conds(model, seed=1)
    assert pos[0][0].shape == (1, 77, 64)
    assert pos[0][1]["pooled_output"].shape == ((1, 1280) if family == "sdxl" else (1, 64))

    out = _sample(model, pos, neg)
    assert out.shape == (1, 4, 64, 64)
    assert torch.isfinite(out).all()
    assert out.abs().max() > 0
    # Same objects, same seeds: identical result.
    again = _sample(tm.build_sd15(0) if family == "sd15" else tm.build_sdxl(0), *tm.make_conds(model, seed=1))
    assert torch.equal(out, again)


def test_attention_layout():
    sd15 = tm.attention_blocks(tm.build_sd15(0))
    assert sd15 == [("input", 3, 0), ("input", 5, 0), ("middle", 0, 0), ("output", 0, 0), ("output", 1, 0), ("output", 2, 0), ("output", 3, 0)]
    sdxl = tm.attention_blocks(tm.build_sdxl(0))
    assert ("middle", 0, 1) in sdxl and ("input", 5, 1) in sdxl
    assert not any(block == "input" and number < 3 for block, number, _ in sdxl)  # none at full resolution


def test_attention_never_at_full_resolution():
    """attn1 replace patches see only 1/2 and 1/4 resolution token counts on a 64x64 latent."""
    model = tm.build_sd15(0).clone()
    seen = []

    def attn1(q, k, v, extra_options):
        import comfy.ldm.modules.attention as attention

        seen.append(q.shape[1])
        return attention.optimized_attention(q, k, v, extra_options["n_heads"])

    for key in tm.attention_blocks(model):
        model.set_model_attn1_replace(attn1, key[0], key[1], key[2])
    pos, _ = tm.make_conds(model, seed=1)
    _eps(model, pos, torch.randn(1, 4, 64, 64))
    assert sorted(set(seen)) == [16 * 16, 32 * 32]
    assert len(seen) == 7


def test_weights_are_seeded():
    pos, _ = tm.make_conds(tm.build_sd15(0), seed=1)
    x = torch.randn(1, 4, 32, 32, generator=torch.Generator().manual_seed(3))
    a = _eps(tm.build_sd15(0), pos, x)
    tm.clear_cache()
    rebuilt = _eps(tm.build_sd15(0), pos, x)  # a fresh build from the same seed
    other = _eps(tm.build_sd15(1), pos, x)
    assert torch.isfinite(a).all()
    assert torch.equal(a, rebuilt)
    assert (a - other).abs().max() > 1e-2
    # The output depends on the input and on the conditioning (no zero-initialised output layers).
    pos2, _ = tm.make_conds(tm.build_sd15(0), seed=2)
    assert (a - _eps(tm.build_sd15(0), pos2, x)).abs().max() > 1e-3
    assert (a - _eps(tm.build_sd15(0), pos, x * 0.5)).abs().max() > 1e-2
    a_xl = _eps(tm.build_sdxl(0), tm.make_conds(tm.build_sdxl(0), 1)[0], x)
    b_xl = _eps(tm.build_sdxl(1), tm.make_conds(tm.build_sdxl(0), 1)[0], x)
    assert (a_xl - b_xl).abs().max() > 1e-2


def test_lora_patches_change_the_model():
    base = tm.build_sd15(0)
    lora_sd = tm.build_lora_state_dict(base, seed=5)
    targets = tm.lora_target_keys(base)
    n_attn1 = len(tm.attention_blocks(base))
    assert len(targets) == 4 * n_attn1 + 1
    assert sum(k.endswith(".lora_up.weight") for k in lora_sd) == len(targets)
    assert all(k.startswith("lora_unet_") for k in lora_sd)
    assert "lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight" in lora_sd
    assert lora_sd["lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight"].ndim == 4

    lora = tm.make_lora_patches(base, seed=5)
    added = set(lora.patches) - set(base.patches)
    assert added == set(targets)
    assert not base.patches  # the base patcher is untouched

    pos, neg = tm.make_conds(base, seed=1)
    x = torch.randn(1, 4, 32, 32, generator=torch.Generator().manual_seed(4))
    e_base = _eps(base, pos, x)
    e_lora = _eps(lora, pos, x)
    e_base_again = _eps(base, pos, x)  # patches are removed again when the base is loaded
    assert (e_base - e_lora).abs().max() > 1e-2
    assert torch.equal(e_base, e_base_again)

    sdxl = tm.build_sdxl(0)
    sdxl_lora = tm.make_lora_patches(sdxl, seed=5)
    assert set(sdxl_lora.patches) == set(tm.lora_target_keys(sdxl))


def test_tiny_clip_encodes_for_the_unets():
    clip = tm.build_tiny_clip(0)
    cond = clip.encode_from_tokens_scheduled(clip.tokenize("a red ball"))
    assert cond[0][0].shape == (1, 77, 64)
    assert cond[0][1]["pooled_output"].shape == (1, 64)
    assert torch.isfinite(cond[0][0]).all()
    other = clip.encode_from_tokens_scheduled(clip.tokenize("a blue cube"))
    assert (cond[0][0] - other[0][0]).abs().max() > 1e-3

    xl = tm.build_tiny_sdxl_clip(0)
    cond_xl = xl.encode_from_tokens_scheduled(xl.tokenize("a red ball"))
    assert cond_xl[0][0].shape == (1, 77, 64)
    assert cond_xl[0][1]["pooled_output"].shape == (1, 1280)

    # The encoded conditioning drives the matching UNet.
    x = torch.randn(1, 4, 32, 32)
    assert torch.isfinite(_eps(tm.build_sd15(0), cond, x)).all()
    model_xl = tm.build_sdxl(0)
    import comfy.sample

    latent = torch.zeros(1, 4, 32, 32)
    out = comfy.sample.sample(model_xl, comfy.sample.prepare_noise(latent, 0), 2, 5.0, "euler", "normal", cond_xl, cond_xl, latent, disable_pbar=True, seed=0)
    assert torch.isfinite(out).all()


def test_tiny_vae_round_trip():
    vae = tm.build_tiny_vae(0)
    assert vae.latent_channels == 4 and vae.downscale_ratio == 8
    image = torch.rand(2, 64, 96, 3, generator=torch.Generator().manual_seed(0))
    latent = vae.encode(image)
    assert latent.shape == (2, 4, 8, 12)
    assert torch.isfinite(latent).all()
    decoded = vae.decode(latent)
    assert decoded.shape == (2, 64, 96, 3)
    assert decoded.min() >= 0 and decoded.max() <= 1
    assert tm.build_tiny_vae(0) is vae


def test_checkpoint_stand_in_families():
    import comfy.model_base

    model, clip, vae = tm.build_checkpoint("sd_xl_base_1.0.safetensors")
    assert isinstance(model.model, comfy.model_base.SDXL)
    assert clip.encode_from_tokens_scheduled(clip.tokenize("x"))[0][1]["pooled_output"].shape == (1, 1280)
    model, clip, vae = tm.build_checkpoint("v1-5-pruned-emaonly.safetensors")
    assert not isinstance(model.model, comfy.model_base.SDXL)
    assert tm.family_for_checkpoint_name("juggernautXL_v9.safetensors") == "sdxl"
