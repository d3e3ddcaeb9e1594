"""Patch-Parallel KSampler / Guider against ComfyUI's own KSampler, through the real worker pool.

Tolerance (fp32, CPU, whole sampling loop of a few steps) against the single-process ComfyUI result of the
same seed: 32 x the measured float noise of that reference path (support/float_noise.py: the reference again
with cfg one float32 ulp up and down), so it holds at any load and thread count; where no reference noise is
measured (the guider's SamplerCustomAdvanced pair) 1e-5 x max|reference|. The measured values are printed.
"""
from __future__ import annotations

import json
import os
import signal
import time

import pytest
import torch

from support.references import comfy_reference
from support.tiny_models import build_sd15, build_sdxl, make_conds, make_lora_patches

REL_TOL = 1e-5


def _latent(h=40, w=32):
    return {"samples": torch.zeros(1, 4, h, w)}


_reference = comfy_reference


def _parallel(model, conds, latent, devices=2, cfg_parallel="off", seed=5, steps=3, cfg=5.0, sampler="euler",
              scheduler="karras", device_weights="", mode="exact", **mode_options):
    from hires_parallel.nodes.parallel_sampler import HiResParallelPatchParallelKSampler

    out = HiResParallelPatchParallelKSampler.execute(model, seed, steps, cfg, sampler, scheduler, conds[0], conds[1],
                                                     latent, 1.0, devices, "cpu", mode, cfg_parallel,
                                                     device_weights, **mode_options)
    return out.result[0]["samples"]


def _compare(label, a, b):
    tol = getattr(b, "noise_tolerance", None)  # measured for references made by _reference
    if tol is not None:
        tol.check(label, a, b)
        return
    assert a.shape == b.shape
    err, scale = (a - b).abs().max().item(), b.abs().max().item()
    print(f"\n[exact] {label}: max abs error {err:.3g} (max|ref| {scale:.3g}, relative {err / scale:.2g})")
    assert err <= REL_TOL * scale, f"{label}: {err}"


@pytest.mark.parametrize("sampler", ["euler", "euler_ancestral", "dpmpp_2m", "dpmpp_sde"])
def test_ksampler_two_cpu_devices_equals_comfy_ksampler(sd15, sampler):
    conds = make_conds(sd15, seed=1)
    latent = _latent(44, 32)  # 44 rows over 2 bands aligned to 4: uneven split
    _compare(f"sd15 {sampler} 2 ranks", _parallel(sd15, conds, latent, sampler=sampler), _reference(sd15, conds, latent, sampler=sampler))


def test_lora_and_cfg_parallel_and_sdxl():
    lora = make_lora_patches(build_sd15(seed=0), seed=3)
    conds = make_conds(lora, seed=1)
    latent = _latent(36, 28)
    _compare("sd15+lora cfg_parallel 2 ranks", _parallel(lora, conds, latent, cfg_parallel="on"),
             _reference(lora, conds, latent))
    xl = build_sdxl(seed=0)
    xconds = make_conds(xl, seed=2)
    _compare("sdxl 2 ranks", _parallel(xl, xconds, latent), _reference(xl, xconds, latent))


def test_three_cpu_devices_with_device_weights(sd15):
    from hires_parallel.parallel.runtime import submit

    conds = make_conds(sd15, seed=1)
    latent = _latent(52, 24)
    _compare("sd15 3 ranks, weights 1,2,1", _parallel(sd15, conds, latent, devices=3, device_weights="1,2,1"),
             _reference(sd15, conds, latent))
    assert submit.LAST_RUN["band_weights"] == [1.0, 2.0, 1.0]
    with pytest.raises(submit.ParallelInputError, match="one positive number per device"):
        _parallel(sd15, conds, latent, devices=3, device_weights="1,2")


def test_batch_mode_shares_a_batch_of_images_over_devices(sd15):
    from hires_parallel.parallel.runtime import submit

    conds = make_conds(sd15, seed=1)
    latent = {"samples": torch.zeros(3, 4, 24, 24)}  # 3 images x (cond, uncond) = 6 per call over 2 devices
    _compare("batch mode, 3 images, 2 ranks", _parallel(sd15, conds, latent, mode="batch"),
             _reference(sd15, conds, latent))
    sent = submit.LAST_RUN["ranks"][0]["comm"]["bytes_sent"]
    assert sent.get("batch", 0) > 0 and not sent.get("halo") and not sent.get("kv")


def test_guider_in_sampler_custom_advanced_with_block_noise(sd15):
    from comfy_extras.nodes_custom_sampler import CFGGuider, KSamplerSelect, SamplerCustomAdvanced
    from hires_parallel.nodes.parallel_sampler import HiResParallelPatchParallelGuider
    from hires_parallel.nodes.relay import HiResParallelBlockNoise, HiResParallelRelaySigmas

    conds = make_conds(sd15, seed=1)
    latent = {"samples": torch.randn(1, 4, 32, 32, generator=torch.Generator().manual_seed(0))}
    sigmas = HiResParallelRelaySigmas.execute(sd15, "karras", 3, "timestep", 500.0).result[0]
    noise = HiResParallelBlockNoise.execute(3, 4, 0.3, True, "box").result[0]
    sampler = KSamplerSelect().get_sampler("dpmpp_2m")[0]
    guider = HiResParallelPatchParallelGuider.execute(sd15, conds[0], conds[1], 5.0, 2, "cpu", "exact", "auto").result[0]
    out, denoised = SamplerCustomAdvanced().sample(noise, guider, sampler, sigmas, latent)
    ref, ref_denoised = SamplerCustomAdvanced().sample(noise, CFGGuider().get_guider(sd15, *conds, 5.0)[0], sampler,
                                                       sigmas, latent)
    _compare("guider + block noise, cfg_parallel auto", out["samples"], ref["samples"])
    _compare("guider denoised output", denoised["samples"], ref_denoised["samples"])


def test_second_job_reuses_the_cached_model_and_pool(sd15):
    from hires_parallel.parallel.runtime import submit
    from hires_parallel.parallel.runtime.pool import current_pool

    conds = make_conds(sd15, seed=1)
    t0 = time.perf_counter()
    _parallel(sd15, conds, _latent(32, 32), seed=1)
    t1 = time.perf_counter()
    pids = current_pool().status()["pids"]
    loads = [r["base_model_loads"] for r in submit.LAST_RUN["ranks"]]
    _parallel(sd15, conds, _latent(32, 32), seed=2)
    t2 = time.perf_counter()
    print(f"\n[pool] first job {t1 - t0:.2f} s, second job {t2 - t1:.2f} s")
    assert current_pool().status()["pids"] == pids
    assert [r["base_model_loads"] for r in submit.LAST_RUN["ranks"]] == loads, "the second job loaded the model again"
    comm = submit.LAST_RUN["ranks"][0]["comm"]
    print(f"[pool] rank 0 comm: {comm}")


def _interrupt_at_step(n):
    import comfy.model_management
    import comfy.utils

    def hook(value, total, preview, node_id=None):
        if value >= n:
            comfy.model_management.interrupt_current_processing(True)
        comfy.model_management.throw_exception_if_processing_interrupted()

    return hook


def test_cancel_stops_the_workers_and_the_next_job_runs(sd15):
    import comfy.model_management
    import comfy.utils

    conds = make_conds(sd15, seed=1)
    old = comfy.utils.PROGRESS_BAR_HOOK
    comfy.utils.set_progress_bar_global_hook(_interrupt_at_step(2))
    t0 = time.perf_counter()
    try:
        with pytest.raises(comfy.model_management.InterruptProcessingException):
            _parallel(sd15, conds, _latent(), steps=30)
    finally:
        comfy.utils.set_progress_bar_global_hook(old)
        comfy.model_management.interrupt_current_processing(False)
    print(f"\n[cancel] raised after {time.perf_counter() - t0:.2f} s")
    _compare("after cancel", _parallel(sd15, conds, _latent()), _reference(sd15, conds, _latent()))


def test_killed_worker_gives_a_clear_error_and_the_pool_recovers(sd15):
    import comfy.utils
    from hires_parallel.parallel.runtime.pool import current_pool
    from hires_parallel.parallel.runtime.protocol import WorkerDied

    conds = make_conds(sd15, seed=1)
    _parallel(sd15, conds, _latent(32, 32))  # warm
    victim = current_pool().status()["pids"][1]
    old_pids = set(current_pool().status()["pids"])
    old = comfy.utils.PROGRESS_BAR_HOOK

    def hook(value, total, preview, node_id=None):
        if value == 1:
            os.kill(victim, signal.SIGKILL)

    comfy.utils.set_progress_bar_global_hook(hook)
    try:
        with pytest.raises(WorkerDied, match="rank 1"):
            _parallel(sd15, conds, _latent(), steps=30)
    finally:
        comfy.utils.set_progress_bar_global_hook(old)
    for pid in old_pids:
        assert not os.path.exists(f"/proc/{pid}") or open(f"/proc/{pid}/stat").read().split()[2] == "Z"
    _compare("after a dead worker", _parallel(sd15, conds, _latent()), _reference(sd15, conds, _latent()))
    assert not old_pids & set(current_pool().status()["pids"])


def test_bad_input_is_refused_before_any_work(sd15):
    from hires_parallel.parallel.runtime.payload import UnshippablePatch
    from hires_parallel.parallel.runtime.submit import ParallelInputError
    from hires_parallel.parallel.split.unet_parallel import UnsupportedModel
    from comfy_extras.nodes_model_downscale import PatchModelAddDownscale

    conds = make_conds(sd15, seed=1)
    with pytest.raises(ParallelInputError, match="use at most 2 devices|at most"):
        _parallel(sd15, conds, _latent(8, 32), devices=3)
    with pytest.raises(ParallelInputError, match="even number of devices"):
        _parallel(sd15, conds, _latent(48, 32), devices=3, cfg_parallel="on")
    shrink = PatchModelAddDownscale.execute(sd15, 3, 2.0, 0.0, 0.35, True, "bicubic", "bicubic").result[0]
    with pytest.raises(UnsupportedModel, match="use 1 device"):
        _parallel(shrink, conds, _latent())
    lam = sd15.clone()
    lam.set_model_sampler_cfg_function(lambda args: args["cond"])  # a closure: cannot be pickled
    with pytest.raises(UnshippablePatch, match="sampler_cfg_function"):
        _parallel(lam, conds, _latent())
    from hires_parallel.parallel.runtime.pool import current_pool

    pool = current_pool()
    assert pool is None or pool.status().get("last_error") in (None, "")


def _psnr(out, ref):
    import math

    mse = ((out - ref) ** 2).mean().item()
    return 10 * math.log10(ref.abs().max().item() ** 2 / mse)


def test_displaced_and_partial_modes_through_the_pool_with_per_step_accounting(sd15):
    """The node's mode inputs reach the workers; LAST_RUN (what Parallel Pool Status shows) has bytes and wait
    seconds per step and rank by kind, for exact warmup steps and stale steps apart. Fidelity floor as in
    tests/comfy/test_displaced_modes.py (latent PSNR against the single-device KSampler)."""
    from hires_parallel.nodes.parallel_sampler import pool_status_text

    conds = make_conds(sd15, seed=1)
    latent = _latent(40, 32)
    ref = _reference(sd15, conds, latent, steps=6)
    per_step = {}
    for mode in ("displaced", "partial"):
        out = _parallel(sd15, conds, latent, steps=6, mode=mode, warmup=2, groupnorm="auto")
        p = _psnr(out, ref)
        print(f"\n[{mode}] 2 ranks, 6 steps, warmup 2: PSNR {p:.2f} dB, max abs err {(out - ref).abs().max().item():.3f}")
        assert p >= 40.0
        status = json.loads(pool_status_text())["last_run"]
        assert status["mode"] == mode
        assert status["stale"]["warmup"] == 2 and status["stale"]["groupnorm"] == "sync"  # auto: small latent
        for rank, row in enumerate(status["comm_per_step"]):
            assert row["rank"] == rank and row["steps"] == 6
            assert row["exact"]["steps"] == 2 and row["stale"]["steps"] == 4
            for part in ("exact", "stale"):
                assert set(row[part]["bytes_sent"]) >= {"halo", "groupnorm", "kv", "output"}
                assert row[part]["bytes_received"]["kv"] > 0 and "kv" in row[part]["wait_s"]
        steps = status["ranks"][0]["comm_steps"]
        assert [s["stale_calls"] for s in steps] == [0, 0, 1, 1, 1, 1]
        per_step[mode] = status["comm_per_step"][0]
    kv = {m: per_step[m]["stale"]["bytes_sent"]["kv"] for m in per_step}
    assert kv["partial"] < 0.5 * kv["displaced"], kv
    assert per_step["partial"]["exact"]["bytes_sent"]["kv"] == per_step["displaced"]["exact"]["bytes_sent"]["kv"]


def test_auto_warmup_covers_the_steps_that_form_the_composition(sd15):
    """warmup 0 from noise: the workers keep exact steps while the noise level is above 0.6 of the model's
    schedule (more than 10% of the steps here), as displaced.resolve_warmup says for these sigmas."""
    import comfy.samplers
    from hires_parallel.nodes.parallel_sampler import pool_status_text
    from hires_parallel.parallel.split.displaced import noise_levels, resolve_warmup

    conds = make_conds(sd15, seed=1)
    _parallel(sd15, conds, _latent(40, 32), steps=8, mode="displaced", warmup=0)
    status = json.loads(pool_status_text())["last_run"]
    sigmas = comfy.samplers.KSampler(sd15, 8, "cpu", "euler", "karras", 1.0).sigmas
    expected = resolve_warmup(0, 8, noise_levels(sd15.get_model_object("model_sampling"), sigmas[:8]))
    print(f"\n[auto warmup] 8 karras steps from noise: {status['stale']['warmup']} exact steps")
    assert status["stale"]["warmup"] == expected > resolve_warmup(0, 8)
    assert [s["stale_calls"] > 0 for s in status["ranks"][0]["comm_steps"]] == [False] * expected + [True] * (8 - expected)


def test_mode_options_are_checked_before_any_work(sd15):
    from hires_parallel.parallel.runtime.submit import ParallelInputError

    conds = make_conds(sd15, seed=1)
    for bad, match in ((dict(partial_fraction=1.5), "partial_fraction must be between 0 and 1"),
                       (dict(partial_fraction_late=-0.5), "partial_fraction_late must be between 0 and 1, or -1"),
                       (dict(groupnorm="fast"), "groupnorm must be one of"),
                       (dict(warmup=-1), "warmup must be a whole number")):
        with pytest.raises(ParallelInputError, match=match):
            _parallel(sd15, conds, _latent(), mode="partial", **bad)
    with pytest.raises(ParallelInputError, match="mode must be one of"):
        _parallel(sd15, conds, _latent(), mode="async")


def test_mode_inputs_are_optional_and_appended_so_saved_workflows_load():
    """Workflows saved before the mode settings existed hold widget values up to device_weights only: the new
    inputs come after every older one and are optional, and execute() defaults them (the runs above pass none)."""
    from hires_parallel.nodes.parallel_sampler import HiResParallelPatchParallelGuider, HiResParallelPatchParallelKSampler

    new = ["warmup", "partial_fraction", "partial_fraction_late", "groupnorm", "comfy_gpu", "sequence_attention"]
    for node in (HiResParallelPatchParallelKSampler, HiResParallelPatchParallelGuider):
        inputs = node.define_schema().inputs
        names = [i.id for i in inputs]
        assert names[-7:] == ["device_weights", *new], names
        assert all(i.optional for i in inputs[-6:])
        assert names.index("mode") < names.index("device_weights")
