"""DiT graphs through the Patch-Parallel KSampler and Guider nodes and the real worker pool (2 CPU workers).

Each run is compared with ComfyUI's own KSampler / SamplerCustomAdvanced for the same seed: within 32 x the
measured float noise of the reference path (support/float_noise.py) for the KSampler, and 1e-5 x max|ref|
for the guider pair. Bad input is refused before any worker starts.
"""
from __future__ import annotations

import pytest

from support.references import comfy_reference
from support.tiny_dits import build_tiny_dit, empty_latent, make_attention_lora, make_dit_conds

REL_TOL = 1e-5


def _ksampler(model, conds, latent, devices=2, seed=5, steps=3, cfg=4.0, sampler="euler", scheduler="simple",
              mode="exact", cfg_parallel="off", **options):
    from hires_parallel.nodes.parallel_sampler import HiResParallelPatchParallelKSampler

    out = HiResParallelPatchParallelKSampler.execute(model, seed, steps, cfg, sampler, scheduler, conds[0], conds[1],
                                                     {"samples": latent}, 1.0, devices, "cpu", mode, cfg_parallel,
                                                     **options)
    return out.result[0]["samples"]


def _last_run() -> dict:
    from hires_parallel.parallel.runtime import submit

    return submit.LAST_RUN


@pytest.mark.parametrize("family,h,w", [("flux", 22, 16), ("qwen_image", 22, 16), ("sd3", 26, 16)])
def test_ksampler_on_two_cpu_workers_equals_comfy(family, h, w):
    model = build_tiny_dit(family)
    if family == "flux":
        model, _ = make_attention_lora(model, 7)
    conds = make_dit_conds(model, 3)
    latent = empty_latent(family, h, w)
    ref = comfy_reference(model, conds, {"samples": latent}, steps=3, cfg=4.0, sampler="euler", scheduler="simple")
    out = _ksampler(model, conds, latent, sequence_attention="gathered_kv")
    ref.noise_tolerance.check(f"{family} 2 CPU workers, exact", out, ref)
    ranks = _last_run()["ranks"]
    assert all(r["attention"] == ["gathered_kv"] for r in ranks), [r.get("attention") for r in ranks]
    assert ranks[1]["comm"]["bytes_sent"]["kv"] > 0


def test_wan_video_through_the_guider_with_cfg_parallel():
    from comfy_extras.nodes_custom_sampler import BasicScheduler, CFGGuider, KSamplerSelect, RandomNoise, \
        SamplerCustomAdvanced
    from hires_parallel.nodes.parallel_sampler import HiResParallelPatchParallelGuider

    model = build_tiny_dit("wan21")
    conds = make_dit_conds(model, 3)
    latent = {"samples": empty_latent("wan21", 14, 12, frames=3)}
    sigmas = BasicScheduler().get_sigmas(model, "simple", 3, 1.0)[0]
    noise = RandomNoise().get_noise(4)[0]
    sampler = KSamplerSelect().get_sampler("euler_ancestral")[0]
    results = {}
    for cfg_parallel in ("on", "off"):
        guider = HiResParallelPatchParallelGuider.execute(model, conds[0], conds[1], 5.0, 2, "cpu", "exact",
                                                          cfg_parallel).result[0]
        results[cfg_parallel] = SamplerCustomAdvanced().sample(noise, guider, sampler, sigmas, latent)[0]["samples"]
        assert _last_run()["cfg_parallel"] is (cfg_parallel == "on")
    ref = SamplerCustomAdvanced().sample(noise, CFGGuider().get_guider(model, *conds, 5.0)[0], sampler, sigmas,
                                         latent)[0]["samples"]
    scale = ref.abs().max().item()
    for k, out in results.items():
        err = (out - ref).abs().max().item()
        print(f"  wan21 video (3 frames) 2 CPU workers, cfg_parallel {k}: max abs err {err:.2e} (rel {err / scale:.1e})")
        assert out.shape == ref.shape and err <= REL_TOL * scale


def test_bad_dit_input_is_refused_before_any_work():
    from hires_parallel.parallel.runtime.pool import current_pool, shutdown_pool
    from hires_parallel.parallel.runtime.submit import ParallelInputError
    from hires_parallel.parallel.split.unet_parallel import UnsupportedModel

    shutdown_pool()
    flux = build_tiny_dit("flux")
    conds = make_dit_conds(flux, 3)
    with pytest.raises(ParallelInputError, match="2 token rows.*use at most 2 devices"):
        _ksampler(flux, conds, empty_latent("flux", 4, 16), devices=3)
    with pytest.raises(UnsupportedModel, match="4 attention heads.*does not divide by 3"):
        _ksampler(flux, conds, empty_latent("flux", 22, 16), devices=3, sequence_attention="ulysses")
    wan = build_tiny_dit("wan21")
    with pytest.raises(ParallelInputError, match="2 latent frames and 2 token rows cannot be split over 3"):
        _ksampler(wan, make_dit_conds(wan, 3), empty_latent("wan21", 4, 12, frames=2), devices=3)
    patched = flux.clone()
    patched.set_model_patch_replace(lambda args, extra: extra["original_block"](args), "dit", "double_block", 0)
    with pytest.raises(UnsupportedModel, match="dit replace"):
        _ksampler(patched, conds, empty_latent("flux", 22, 16))
    assert current_pool() is None, "a refused run must not start workers"


def test_batch_mode_shares_a_dit_batch_over_devices():
    model = build_tiny_dit("sd3")
    conds = make_dit_conds(model, 3)
    latent = empty_latent("sd3", 16, 16, batch=3)  # 3 images x (cond, uncond) = 6 per call over 2 devices
    ref = comfy_reference(model, conds, {"samples": latent}, steps=3, cfg=4.0, sampler="euler", scheduler="simple")
    out = _ksampler(model, conds, latent, mode="batch")
    ref.noise_tolerance.check("sd3 batch mode, 2 CPU workers", out, ref)
    assert _last_run()["ranks"][1]["comm"]["bytes_sent"]["batch"] > 0
