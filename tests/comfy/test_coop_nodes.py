"""Coop Guider and Time-Decoupled Guider against the real ComfyUI: real ModelPatchers (SD1.5, SDXL and SD3
families), real VAEs loaded through model management, SamplerCustomAdvanced running the guiders.

The VAE is ``build_linear_vae``: a real comfy.sd.VAE whose linear autoencoder has an exact round trip, so
"equal up to the VAE round trip" is a measurable statement here.
"""
from __future__ import annotations

import pytest
import torch

from support.tiny_models import (build_linear_vae, build_sd15, build_sdxl, build_tiny_sd3, make_conds, make_lora_patches,
                                 make_sd3_conds)

STEPS = 4


@pytest.fixture(scope="module")
def sd15():
    model = build_sd15(seed=0)
    return model, make_conds(model, seed=1)


@pytest.fixture(scope="module")
def sd15_lora(sd15):
    model, _ = sd15
    return make_lora_patches(model, seed=7)  # a clone: same BaseModel, other weights once patched


@pytest.fixture(scope="module")
def sd3():
    return build_tiny_sd3(seed=0), make_sd3_conds(seed=2)


@pytest.fixture(scope="module")
def sdxl():
    model = build_sdxl(seed=0)
    return model, make_conds(model, seed=3)


def _sample(guider, model, steps=STEPS, latent=None, seed=5, sigmas=None):
    from comfy_extras.nodes_custom_sampler import BasicScheduler, KSamplerSelect, RandomNoise, SamplerCustomAdvanced

    if sigmas is None:
        sigmas = BasicScheduler().get_sigmas(model, "karras", steps, 1.0)[0]
    latent = latent if latent is not None else {"samples": torch.zeros(1, 4, 8, 8)}
    sampler = KSamplerSelect().get_sampler("euler")[0]
    return SamplerCustomAdvanced().sample(RandomNoise().get_noise(seed)[0], guider, sampler, sigmas, latent)[0]["samples"]


def _plain(model, conds, cfg=5.0):
    from comfy_extras.nodes_custom_sampler import CFGGuider

    return CFGGuider().get_guider(model, conds[0], conds[1], cfg)[0]


def _coop(a, ca, b, cb, weight=0.5, *, weight_end=None, schedule="constant", start=0.0, end=1.0, every_k=1,
          b_scale=1.0, bridge="auto", noise_b="transfer", vae_a=None, vae_b=None, cfg_b=4.0):
    from hires_parallel.nodes.coop import HiResParallelCoopGuider

    weight_end = weight if weight_end is None else weight_end
    return HiResParallelCoopGuider.execute(a, ca[0], ca[1], 5.0, b, cb[0], cb[1], cfg_b, weight, weight_end, schedule, start,
                                           end, every_k, b_scale, bridge, noise_b, vae_a, vae_b).result[0]


def _switch(a, ca, b, cb, *, timestep=500.0, b_scale=1.0, bridge="auto", noise_b="transfer", vae_a=None, vae_b=None):
    from hires_parallel.nodes.coop import HiResParallelTimeDecoupledGuider

    return HiResParallelTimeDecoupledGuider.execute(a, ca[0], ca[1], 5.0, b, cb[0], cb[1], 4.0, timestep, b_scale, bridge,
                                                    noise_b, vae_a, vae_b).result[0]


def _spy(model):
    """A clone of ``model`` that records (input shape, sigmas) of every UNet call."""
    calls = []

    def wrapper(apply_model, args):
        calls.append((tuple(args["input"].shape), float(args["c"]["transformer_options"]["sigmas"][0])))
        return apply_model(args["input"], args["timestep"], **args["c"])

    spy = model.clone()
    spy.set_model_unet_function_wrapper(wrapper)
    return spy, calls


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


# ---------------------------------------------------------------------------------------------
# Coop Guider


def test_weight_zero_equals_model_a_alone_exactly(sd15, sd15_lora):
    a, ca = sd15
    vae = build_linear_vae(0)
    ref = _sample(_plain(a, ca), a)
    assert torch.equal(_sample(_coop(a, ca, sd15_lora, ca, 0.0, bridge="vae", vae_a=vae, vae_b=vae), a), ref)
    # a positive weight outside the window (nothing after 100 %) is model A alone too
    out = _sample(_coop(a, ca, sd15_lora, ca, 0.7, start=1.0, end=1.0, bridge="vae", vae_a=vae, vae_b=vae), a)
    assert torch.equal(out, ref)
    # so is a linear share that ends at 0, on its last step: B takes part before, not after
    spy, calls = _spy(sd15_lora)
    _sample(_coop(a, ca, spy, ca, 0.6, weight_end=0.0, schedule="linear"), a)
    assert len(calls) == STEPS - 1


def test_identical_models_and_vaes_with_half_weight_equal_model_a_up_to_the_vae_round_trip(sd15):
    a, ca = sd15
    vae = build_linear_vae(0)
    ref = _sample(_plain(a, ca), a)
    through_vae = _sample(_coop(a, ca, a.clone(), ca, 0.5, bridge="vae", vae_a=vae, vae_b=vae, cfg_b=5.0), a)
    round_trip = vae.encode(vae.decode(ref))
    rel, rel_rt = _rel(through_vae, ref), _rel(round_trip, ref)
    print(f"\nidentical models + VAEs, w = 0.5, bridge 'vae': relative L2 difference to model A alone {rel:.2e} "
          f"(the VAE's own round trip on that latent: {rel_rt:.2e})")
    assert rel < 1e-4
    # sharing the latent space, no VAE work: exactly model A
    assert torch.equal(_sample(_coop(a, ca, a, ca, 0.5, cfg_b=5.0), a), ref)


def test_same_checkpoint_with_another_lora_as_b_matches_an_independent_copy(sd15, sd15_lora):
    """B shares A's BaseModel: every switch re-applies the right weights (A unpatched, B with its LoRA)."""
    import copy

    import comfy.model_patcher

    a, ca = sd15
    copy_of_a = comfy.model_patcher.ModelPatcher(copy.deepcopy(a.model), load_device=a.load_device,
                                                 offload_device=a.offload_device)
    independent = make_lora_patches(copy_of_a, seed=7)
    assert not independent.is_clone(a)
    shared = _sample(_coop(a, ca, sd15_lora, ca, 0.5), a)
    separate = _sample(_coop(a, ca, independent, ca, 0.5), a)
    assert torch.equal(shared, separate)
    assert _rel(shared, _sample(_plain(a, ca), a)) > 1e-3  # B took part
    # w = 1 on a shared latent is model B alone
    assert torch.equal(_sample(_coop(a, ca, sd15_lora, ca, 1.0), a), _sample(_plain(sd15_lora, ca, cfg=4.0), a))


def test_four_and_sixteen_channel_pair_with_a_flow_partner(sd15, sd3):
    from hires_parallel.algorithms.coop import map_sigma
    from hires_parallel.nodes import model_info

    a, ca = sd15
    (b, cb) = sd3
    spy, calls = _spy(b)
    guider = _coop(a, ca, spy, cb, 0.5, every_k=2, noise_b="persistent", vae_a=build_linear_vae(0),
                   vae_b=build_linear_vae(0, 16))
    out = _sample(guider, a)
    ref = _sample(_plain(a, ca), a)
    assert out.shape == (1, 4, 8, 8) and torch.isfinite(out).all()
    assert _rel(out, ref) > 1e-3
    from comfy_extras.nodes_custom_sampler import BasicScheduler

    sigmas = BasicScheduler().get_sigmas(a, "karras", STEPS, 1.0)[0].tolist()
    expected = [map_sigma(sigmas[i], "eps", "flow") for i in (0, 2)]  # every_k = 2: steps 0 and 2
    assert [c[0] for c in calls] == [(2, 16, 8, 8)] * 2  # cond + uncond of 16-channel latents
    assert [c[1] for c in calls] == pytest.approx(expected, rel=1e-5)
    assert all(s < 1 for s in expected) and model_info.is_flow(b)


def test_flow_model_as_a_with_an_eps_partner(sd15, sd3):
    (a, ca), (b, cb) = sd3, sd15
    spy, calls = _spy(b)
    guider = _coop(a, ca, spy, cb, 0.3, vae_a=build_linear_vae(0, 16), vae_b=build_linear_vae(0))
    out = _sample(guider, a, latent={"samples": torch.zeros(1, 16, 8, 8)})
    assert out.shape == (1, 16, 8, 8) and torch.isfinite(out).all()
    # the flow schedule starts at s = 1 (pure noise): B gets its own sigma_max, then s / (1 - s)
    assert calls[0][1] == pytest.approx(float(b.get_model_object("model_sampling").sigma_max), rel=1e-5)
    assert all(torch.isfinite(torch.tensor(c[1])) for c in calls)


def test_native_resolution_pair_sd15_with_sdxl_at_twice_the_size(sd15, sdxl):
    """SD1.5 at its size and SDXL at twice it (512 + 1024 px in real use; 64 + 128 px here, for the CPU)."""
    a, ca = sd15
    b, cb = sdxl
    spy, calls = _spy(b)
    vae = build_linear_vae(0)
    out = _sample(_coop(a, ca, spy, cb, 0.5, b_scale=2.0, vae_a=vae, vae_b=vae), a)
    assert out.shape == (1, 4, 8, 8) and torch.isfinite(out).all()
    assert calls and all(c[0] == (2, 4, 16, 16) for c in calls)
    spy2, calls2 = _spy(b)
    out = _sample(_switch(a, ca, spy2, cb, b_scale=2.0, vae_a=vae, vae_b=vae), a)
    assert out.shape == (1, 4, 16, 16) and torch.isfinite(out).all()  # the result is in B's space and size
    assert calls2 and all(c[0] == (2, 4, 16, 16) for c in calls2)


def test_window_gates_the_partner(sd15, sd15_lora):
    a, ca = sd15
    spy, calls = _spy(sd15_lora)
    from comfy_extras.nodes_custom_sampler import BasicScheduler

    sigmas = BasicScheduler().get_sigmas(a, "karras", 6, 1.0)[0]
    ms = a.get_model_object("model_sampling")
    _sample(_coop(a, ca, spy, ca, 0.5, start=0.2, end=0.8), a, steps=6)
    hi, lo = float(ms.percent_to_sigma(0.2)), float(ms.percent_to_sigma(0.8))
    inside = [float(s) for s in sigmas[:-1] if lo <= float(s) <= hi]
    assert 0 < len(inside) < 6
    assert [c[1] for c in calls] == pytest.approx(inside, rel=1e-5)


# ---------------------------------------------------------------------------------------------
# Time-Decoupled Guider


def _split_reference(a, ca, b, cb, steps, sigma_switch):
    """ComfyUI's own split sampling: A on the first part, then B from A's noisy latent with no new noise."""
    from comfy_extras.nodes_custom_sampler import (BasicScheduler, DisableNoise, KSamplerSelect, RandomNoise,
                                                   SamplerCustomAdvanced)

    from hires_parallel.algorithms.coop import split_at_sigma

    sigmas = BasicScheduler().get_sigmas(a, "karras", steps, 1.0)[0]
    first, second = split_at_sigma(sigmas, sigma_switch)
    assert first.numel() > 1 and second.numel() > 1
    sampler = KSamplerSelect().get_sampler("euler")[0]
    latent = {"samples": torch.zeros(1, 4, 8, 8)}
    mid = SamplerCustomAdvanced().sample(RandomNoise().get_noise(5)[0], _plain(a, ca), sampler, first, latent)[0]
    return SamplerCustomAdvanced().sample(DisableNoise().get_noise()[0], _plain(b, cb, cfg=4.0), sampler, second, mid)[0]["samples"]


def test_time_decoupled_in_one_latent_space_equals_comfyui_split_sampling(sd15, sd15_lora):
    from hires_parallel.nodes import model_info

    a, ca = sd15
    sigma_switch = model_info.timestep_to_sigma(a, 500)
    assert sigma_switch == pytest.approx(1.62, abs=0.01)
    ref = _split_reference(a, ca, sd15_lora, ca, 6, sigma_switch)
    out = _sample(_switch(a, ca, sd15_lora, ca), a, steps=6)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    # a switch above the first sigma is model B alone; a schedule that stops above the switch is model A alone
    assert torch.equal(_sample(_switch(a, ca, sd15_lora, ca, timestep=999.0), a), _sample(_plain(sd15_lora, ca, 4.0), a))
    from comfy_extras.nodes_custom_sampler import BasicScheduler

    early = BasicScheduler().get_sigmas(a, "karras", 6, 1.0)[0][:3]
    assert float(early[-1]) > sigma_switch
    assert torch.equal(_sample(_switch(a, ca, sd15_lora, ca), a, sigmas=early), _sample(_plain(a, ca), a, sigmas=early))


def test_time_decoupled_bridges_once_into_a_sixteen_channel_flow_model(sd15, sd3):
    from hires_parallel.algorithms.coop import map_sigma, split_at_sigma
    from hires_parallel.nodes import model_info

    a, ca = sd15
    b, cb = sd3
    spy_a, calls_a = _spy(a)
    spy_b, calls_b = _spy(b)
    out = _sample(_switch(spy_a, ca, spy_b, cb, vae_a=build_linear_vae(0), vae_b=build_linear_vae(0, 16)), a, steps=6)
    assert out.shape == (1, 16, 8, 8) and torch.isfinite(out).all()
    from comfy_extras.nodes_custom_sampler import BasicScheduler

    sigmas = BasicScheduler().get_sigmas(a, "karras", 6, 1.0)[0]
    first, second = split_at_sigma(sigmas, model_info.timestep_to_sigma(a, 500))
    # A: its steps, plus one estimate at the switch for the bridge; B: the rest at flow sigmas
    assert [c[1] for c in calls_a] == pytest.approx(first.tolist(), rel=1e-5)
    assert [c[1] for c in calls_b] == pytest.approx([map_sigma(float(s), "eps", "flow") for s in second[:-1]], rel=1e-5)
    assert all(c[0] == (2, 16, 8, 8) for c in calls_b)


# ---------------------------------------------------------------------------------------------
# progress, previews, Cancel, model management


@pytest.fixture
def progress_hook():
    import comfy.utils

    events = []
    before = comfy.utils.PROGRESS_BAR_HOOK
    comfy.utils.set_progress_bar_global_hook(lambda value, total, preview, node_id=None: events.append((value, total, preview)))
    yield events
    comfy.utils.set_progress_bar_global_hook(before)


def test_progress_and_previews_follow_both_models(sd15, sd3, progress_hook, monkeypatch):
    import latent_preview

    a, ca = sd15
    b, cb = sd3
    monkeypatch.setattr(latent_preview.args, "preview_method", latent_preview.LatentPreviewMethod.Latent2RGB)
    _sample(_switch(a, ca, b, cb, vae_a=build_linear_vae(0), vae_b=build_linear_vae(0, 16)), a, steps=6)
    assert [e[0] for e in progress_hook] == list(range(1, 7)) and {e[1] for e in progress_hook} == {6}
    assert all(e[2] is not None for e in progress_hook)  # B's 16-channel previews decode with B's format
    progress_hook.clear()
    _sample(_coop(a, ca, b, cb, 0.5, vae_a=build_linear_vae(0), vae_b=build_linear_vae(0, 16)), a)
    assert [e[0] for e in progress_hook] == list(range(1, STEPS + 1))


def test_cancel_stops_the_coop_run_and_leaves_the_models_usable(sd15, sd15_lora, progress_hook):
    import comfy.model_management
    import comfy.utils

    a, ca = sd15

    def interrupt_after_first_step(value, total, preview, node_id=None):
        if value == 1:
            comfy.model_management.interrupt_current_processing(True)

    comfy.utils.set_progress_bar_global_hook(interrupt_after_first_step)
    try:
        with pytest.raises(comfy.model_management.InterruptProcessingException):
            _sample(_coop(a, ca, sd15_lora, ca, 0.5, bridge="vae", vae_a=build_linear_vae(0), vae_b=build_linear_vae(0)), a)
    finally:
        comfy.model_management.interrupt_current_processing(False)
    comfy.utils.set_progress_bar_global_hook(None)
    ref = _sample(_plain(a, ca), a)
    assert torch.equal(_sample(_plain(a, ca), a), ref)
    assert torch.equal(_sample(_coop(a, ca, sd15_lora, ca, 1.0), a), _sample(_plain(sd15_lora, ca, 4.0), a))


def test_vaes_and_both_models_are_loaded_through_model_management(sd15, sd3, monkeypatch):
    import comfy.model_management

    a, ca = sd15
    b, cb = sd3
    vae_a, vae_b = build_linear_vae(0), build_linear_vae(0, 16)
    loaded = []
    real = comfy.model_management.load_models_gpu

    def record(models, *args, **kwargs):
        loaded.append(list(models))
        return real(models, *args, **kwargs)

    monkeypatch.setattr(comfy.model_management, "load_models_gpu", record)
    _sample(_coop(a, ca, b, cb, 0.5, every_k=2, vae_a=vae_a, vae_b=vae_b), a)
    flat = [m for call in loaded for m in call]
    assert any(m is vae_a.patcher for m in flat) and any(m is vae_b.patcher for m in flat)
    assert any(m.is_clone(a) for m in flat) and any(m.is_clone(b) for m in flat)
    loaded.clear()
    _sample(_switch(a, ca, b, cb, vae_a=vae_a, vae_b=vae_b), a)
    flat = [m for call in loaded for m in call]
    assert any(m is vae_a.patcher for m in flat) and any(m is vae_b.patcher for m in flat)


# ---------------------------------------------------------------------------------------------
# clear errors before heavy work


def test_missing_vaes_and_mismatched_vaes_are_clear_errors(sd15, sd3, sdxl):
    from hires_parallel.nodes.coop import CoopInputError

    a, ca = sd15
    b, cb = sd3
    with pytest.raises(CoopInputError, match=r"different latent spaces.*vae_a and vae_b") as err:
        _coop(a, ca, b, cb)
    assert err.value.user_facing is True and isinstance(err.value, ValueError)
    with pytest.raises(CoopInputError, match=r"different latent spaces.*connect vae_b"):
        _switch(a, ca, b, cb, vae_a=build_linear_vae(0))
    with pytest.raises(CoopInputError, match=r"2.0x.*vae_a and vae_b"):
        _coop(a, ca, sdxl[0], sdxl[1], b_scale=2.0)
    with pytest.raises(CoopInputError, match=r"vae_b makes 4-channel latents but its model works on 16"):
        _coop(a, ca, b, cb, vae_a=build_linear_vae(0), vae_b=build_linear_vae(0))
    wide = ([[torch.zeros(1, 77, 2048), {}]], ca[1])
    with pytest.raises(CoopInputError, match=r"positive_b holds 2048-wide text embeddings but model B takes 64"):
        _coop(a, ca, a, wide)
    with pytest.raises(CoopInputError, match="start_percent"):
        _coop(a, ca, a, ca, start=0.8, end=0.2)
    with pytest.raises(CoopInputError, match="weight"):
        _coop(a, ca, a, ca, weight=1.5)
    with pytest.raises(CoopInputError, match="switch_timestep"):
        _switch(a, ca, a, ca, timestep=0.0)


def test_size_and_mask_errors_come_before_any_model_runs(sd15, sdxl):
    from hires_parallel.nodes.coop import CoopInputError

    a, ca = sd15
    spy_a, calls_a = _spy(a)
    spy_b, calls_b = _spy(sdxl[0])
    vae = build_linear_vae(0)
    with pytest.raises(CoopInputError, match=r"10x10 latent.*multiples of 4"):
        _sample(_coop(spy_a, ca, spy_b, sdxl[1], b_scale=1.25, vae_a=vae, vae_b=vae), a)
    masked = {"samples": torch.zeros(1, 4, 8, 8), "noise_mask": torch.ones(1, 1, 64, 64)}
    with pytest.raises(CoopInputError, match="inpainting mask"):
        _sample(_switch(spy_a, ca, spy_b, sdxl[1], b_scale=2.0, vae_a=vae, vae_b=vae), a, latent=masked)
    assert calls_a == [] and calls_b == []
