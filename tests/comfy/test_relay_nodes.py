"""Relay nodes against the real ComfyUI: real ModelPatcher, real samplers, real SamplerCustomAdvanced."""
from __future__ import annotations

import pytest
import torch

from support.tiny_models import build_tiny_vae, make_conds


@pytest.fixture(scope="module")
def conds(sd15):
    return make_conds(sd15, seed=1)


def _low_res(seed=3, shape=(1, 4, 16, 16)):
    return {"samples": torch.randn(shape, generator=torch.Generator().manual_seed(seed))}


def _relay_args(**over):
    args = dict(scale_by=2.0, seed=42, steps=3, cfg=5.0, sampler_name="euler", scheduler="karras", block_size=4,
                strength=0.3, relay_point="timestep", relay_value=500.0, upscale_method="nearest (latent)")
    args.update(over)
    return args


def _run_convenience(model, conds, latent, **over):
    from hires_parallel.nodes.relay import HiResParallelRelayUpscaleSampler

    pos, neg = conds
    return HiResParallelRelayUpscaleSampler.execute(model, pos, neg, latent, **_relay_args(**over)).result[0]


def _run_separate_nodes(model, conds, latent, **over):
    """The same relay built from the separate nodes, wired as a user would in SamplerCustomAdvanced."""
    from comfy_extras.nodes_custom_sampler import CFGGuider, KSamplerSelect, SamplerCustomAdvanced
    from hires_parallel.nodes.relay import (HiResParallelBlockNoise, HiResParallelRelaySigmas,
                                            HiResParallelRelayUpscaleLatent)

    a = _relay_args(**over)
    pos, neg = conds
    up = HiResParallelRelayUpscaleLatent.execute(latent, a["scale_by"], a["upscale_method"]).result[0]
    sigmas = HiResParallelRelaySigmas.execute(model, a["scheduler"], a["steps"], a["relay_point"], a["relay_value"]).result[0]
    noise = HiResParallelBlockNoise.execute(a["seed"], a["block_size"], a["strength"], True, "box").result[0]
    guider = CFGGuider().get_guider(model, pos, neg, a["cfg"])[0]
    sampler = KSamplerSelect().get_sampler(a["sampler_name"])[0]
    return SamplerCustomAdvanced().sample(noise, guider, sampler, sigmas, up)[0]


@pytest.mark.parametrize("sampler_name", ["euler", "dpmpp_2m", "euler_ancestral"])
def test_convenience_node_equals_separate_nodes(sd15, conds, sampler_name):
    latent = _low_res()
    one = _run_convenience(sd15, conds, latent, sampler_name=sampler_name)["samples"]
    graph = _run_separate_nodes(sd15, conds, latent, sampler_name=sampler_name)["samples"]
    assert one.shape == (1, 4, 32, 32)
    assert torch.isfinite(one).all()
    assert torch.equal(one, graph), f"max diff {(one - graph).abs().max()}"


def test_relay_start_is_upsampled_latent_plus_sigma_times_block_noise(sd15, conds):
    from hires_parallel.algorithms.block_noise import relay_noise
    from hires_parallel.algorithms.relay import relay_start, upsample_latent
    from hires_parallel.nodes import model_info

    seen = []

    def spy(apply_model, args):
        seen.append(args["input"].clone())
        return apply_model(args["input"], args["timestep"], **args["c"])

    model = sd15.clone()
    model.set_model_unet_function_wrapper(spy)
    latent = _low_res()
    _run_convenience(model, conds, latent, steps=2, strength=0.5)
    sigma0 = model_info.timestep_to_sigma(sd15, 500)
    z_up = upsample_latent(latent["samples"], 2.0)
    noise = relay_noise(tuple(z_up.shape), 42, 4, 0.5)
    # The sampler works in the model's latent space (SD: scaled by 0.18215).
    expected = relay_start(sd15.model.process_latent_in(z_up), noise, sigma0)
    first = seen[0][:1]  # cond and uncond are batched: both rows hold the same x
    assert torch.allclose(first, expected, atol=1e-5), (first - expected).abs().max()
    assert abs(sigma0 - 1.62) < 0.01  # SD1.x schedule, t = 500 (METHODS.md)


def test_relay_sigmas_start_at_relay_point_and_match_basic_scheduler_in_denoise_mode(sd15):
    import comfy.samplers
    from comfy_extras.nodes_custom_sampler import BasicScheduler
    from hires_parallel.nodes import model_info
    from hires_parallel.nodes.relay import HiResParallelRelaySigmas

    s = HiResParallelRelaySigmas.execute(sd15, "karras", 10, "timestep", 600.0).result[0]
    assert len(s) == 11 and s[-1] == 0 and torch.all(s[1:] < s[:-1])
    assert s[0].item() == pytest.approx(model_info.timestep_to_sigma(sd15, 600), rel=1e-6)
    d = HiResParallelRelaySigmas.execute(sd15, "normal", 8, "denoise", 0.4).result[0]
    ref = BasicScheduler().get_sigmas(sd15, "normal", 8, 0.4)[0]
    assert torch.allclose(d, ref.float())
    sg = HiResParallelRelaySigmas.execute(sd15, "simple", 5, "sigma", 2.0).result[0]
    assert sg[0].item() == pytest.approx(2.0) and len(sg) == 6
    assert "karras" in comfy.samplers.SCHEDULER_NAMES


def test_block_noise_with_strength_zero_is_comfy_noise():
    from comfy_extras.nodes_custom_sampler import Noise_RandomNoise
    from hires_parallel.nodes.relay import HiResParallelBlockNoise

    latent = {"samples": torch.zeros(2, 16, 12, 20)}
    ours = HiResParallelBlockNoise.execute(7, 4, 0.0, True, "box").result[0].generate_noise(latent)
    assert torch.equal(ours, Noise_RandomNoise(7).generate_noise(latent))
    mixed = HiResParallelBlockNoise.execute(7, 4, 0.3, True, "box").result[0].generate_noise(latent)
    assert mixed.shape == (2, 16, 12, 20) and not torch.equal(mixed, ours)


def test_upscale_latent_any_channels_and_pixel_method():
    from hires_parallel.nodes.relay import HiResParallelRelayUpscaleLatent

    for c in (4, 16):
        out = HiResParallelRelayUpscaleLatent.execute({"samples": torch.randn(1, c, 16, 24)}, 1.5, "bilinear (latent)")
        assert out.result[0]["samples"].shape == (1, c, 24, 32)  # 24 -> 24, 36 -> 32 (multiples of 8)
    vae = build_tiny_vae(seed=0)
    out = HiResParallelRelayUpscaleLatent.execute({"samples": torch.randn(1, 4, 8, 8)}, 2.0,
                                                  "pixel (VAE decode, bicubic, encode)", vae)
    assert out.result[0]["samples"].shape == (1, 4, 16, 16)


def test_progress_is_reported_every_step_and_cancel_stops_sampling(sd15, conds):
    import comfy.model_management
    import comfy.utils

    calls = []

    def hook(value, total, preview, node_id=None):
        calls.append((value, total))
        if value == 2:
            comfy.model_management.interrupt_current_processing(True)
        comfy.model_management.throw_exception_if_processing_interrupted()

    old = comfy.utils.PROGRESS_BAR_HOOK
    comfy.utils.set_progress_bar_global_hook(hook)
    try:
        with pytest.raises(comfy.model_management.InterruptProcessingException):
            _run_convenience(sd15, conds, _low_res(), steps=5)
    finally:
        comfy.utils.set_progress_bar_global_hook(old)
        comfy.model_management.interrupt_current_processing(False)
    assert calls == [(1, 5), (2, 5)]


def test_linear_relay_sampler_runs_in_sampler_custom_advanced(sd15, conds):
    from comfy_extras.nodes_custom_sampler import CFGGuider, SamplerCustomAdvanced
    from hires_parallel.nodes.relay import (HiResParallelBlockNoise, HiResParallelLinearRelaySampler,
                                            HiResParallelRelaySigmas, HiResParallelRelayUpscaleLatent)

    up = HiResParallelRelayUpscaleLatent.execute(_low_res(), 2.0, "nearest (latent)").result[0]
    sigmas = HiResParallelRelaySigmas.execute(sd15, "karras", 4, "timestep", 500.0).result[0]
    noise = HiResParallelBlockNoise.execute(1, 4, 0.3, True, "box").result[0]
    guider = CFGGuider().get_guider(sd15, *conds, 5.0)[0]
    sampler = HiResParallelLinearRelaySampler.execute(up, 2).result[0]
    out = SamplerCustomAdvanced().sample(noise, guider, sampler, sigmas, up)[0]["samples"]
    assert out.shape == up["samples"].shape and torch.isfinite(out).all()
    wrong = HiResParallelLinearRelaySampler.execute(_low_res(), 0).result[0]
    with pytest.raises(ValueError, match="same upscaled latent"):
        SamplerCustomAdvanced().sample(noise, guider, wrong, sigmas, up)


@pytest.mark.parametrize(
    "over, match",
    [
        (dict(scale_by=0.5), "scale_by must be between"),
        (dict(relay_point="timestep", relay_value=1500.0), "timestep relay point"),
        (dict(relay_point="denoise", relay_value=2.0), "denoise relay point"),
        (dict(relay_point="sigma", relay_value=100.0), "lower the relay point"),
        (dict(upscale_method="pixel (VAE decode, bicubic, encode)"), "needs a VAE"),
    ],
)
def test_bad_input_gives_a_clear_error_before_sampling(sd15, conds, over, match):
    from hires_parallel.nodes.relay import RelayInputError

    calls = []
    model = sd15.clone()
    model.set_model_unet_function_wrapper(lambda f, a: calls.append(1) or f(a["input"], a["timestep"], **a["c"]))
    with pytest.raises(RelayInputError, match=match):
        _run_convenience(model, conds, _low_res(), **over)
    assert calls == [], "the model ran before the input was checked"


def test_empty_latent_and_wrong_family_are_refused(sd15, conds):
    from hires_parallel.nodes.relay import RelayInputError, check_model_takes

    with pytest.raises(RelayInputError, match="non-empty"):
        _run_convenience(sd15, conds, {"samples": torch.zeros(1, 4, 0, 0)})
    with pytest.raises(RelayInputError, match="16 channels but this model works on 4"):
        _run_convenience(sd15, conds, _low_res(shape=(1, 16, 16, 16)))
    with pytest.raises(RelayInputError, match="multiples of 4"):
        check_model_takes(sd15, torch.randn(1, 4, 10, 12))
