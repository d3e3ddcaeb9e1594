"""ParaTAA Sampler node in real ComfyUI: SamplerCustomAdvanced with CFG, against ComfyUI's own samplers.

ComfyUI's `euler` is exactly the DDIM (eta = 0) recurrence in sigma space and `euler_ancestral` is the
ancestral one with the noises default_noise_sampler draws for the seed, so those are the references.
Tolerance: with the one-step tolerance at 1e-4 the result is within 5e-4 x max|reference| (5e-3 with the
default 1e-3; fp32 model, float64 solver state; the tiny random UNet ends at values of a few hundred, and
its large random steps leave little to gain at few steps, so the round-count check uses 20 steps).
Through the Patch-Parallel Guider, 2 CPU ranks (exact and batch modes) equal 1 rank within 1e-4 x max|ref|.
Measured values are printed.
"""
from __future__ import annotations

import pickle

import pytest
import torch

from support.tiny_models import make_conds

STEPS = 10
TIGHT = dict(tolerance=1e-4, tolerance_noise=1e-4)
REL_TOL = 5e-4


@pytest.fixture(autouse=True)
def _fresh_cache():
    from hires_parallel.nodes.parataa import clear_warm_cache

    clear_warm_cache()
    yield
    clear_warm_cache()


def _sigmas(model, steps=STEPS):
    from comfy_extras.nodes_custom_sampler import BasicScheduler

    return BasicScheduler().get_sigmas(model, "karras", steps, 1.0)[0]


def _run(model, conds, sampler, sigmas, latent, seed=3, cfg=5.0, guider=None):
    from comfy_extras.nodes_custom_sampler import CFGGuider, RandomNoise, SamplerCustomAdvanced

    guider = guider or CFGGuider().get_guider(model, conds[0], conds[1], cfg)[0]
    out, denoised = SamplerCustomAdvanced().sample(RandomNoise().get_noise(seed)[0], guider, sampler, sigmas, latent)
    return out["samples"], denoised["samples"]


def _comfy(name):
    from comfy_extras.nodes_custom_sampler import KSamplerSelect

    return KSamplerSelect().get_sampler(name)[0]


def _parataa(**kw):
    from hires_parallel.nodes.parataa import HiResParallelParaTAASampler

    return HiResParallelParaTAASampler.execute(**kw).result[0]


def _compare(label, a, ref, tol=REL_TOL):
    err, scale = (a - ref).abs().max().item(), ref.abs().max().item()
    print(f"\n[parataa] {label}: max abs diff {err:.3g} (max|ref| {scale:.3g}, relative {err / scale:.2g})")
    assert a.shape == ref.shape and err <= tol * scale, label
    return err / scale


def _latent(h=8, w=8, batch=1):
    return {"samples": torch.zeros(batch, 4, h, w)}


def test_ddim_with_cfg_matches_comfy_euler(sd15):
    from hires_parallel.nodes.parataa import LAST_REPORT

    conds = make_conds(sd15, seed=1)
    sigmas = _sigmas(sd15, 20)
    latent = _latent(8, 8, batch=2)
    ref, ref_x0 = _run(sd15, conds, _comfy("euler"), sigmas, latent)
    out, x0 = _run(sd15, conds, _parataa(**TIGHT), sigmas, latent)
    print(f"\n[parataa] 20 steps, batch 2, cfg 5: {LAST_REPORT['rounds']} rounds")
    _compare("ddim vs euler", out, ref)
    _compare("denoised output vs euler's", x0, ref_x0)
    assert LAST_REPORT["converged"] and LAST_REPORT["rounds"] < 20


def test_ancestral_matches_comfy_euler_ancestral_for_the_same_seed(sd15):
    conds = make_conds(sd15, seed=1)
    sigmas = _sigmas(sd15)
    ref, _ = _run(sd15, conds, _comfy("euler_ancestral"), sigmas, _latent(), seed=9)
    out, _ = _run(sd15, conds, _parataa(variant="ancestral", **TIGHT), sigmas, _latent(), seed=9)
    _compare("ancestral vs euler_ancestral", out, ref)
    other, _ = _run(sd15, conds, _parataa(variant="ancestral", **TIGHT), sigmas, _latent(), seed=10)
    assert (other - ref).abs().max() > 0.05 * ref.abs().max()  # the seed's noises really matter


def test_inpainting_mask_and_timestep_ranges_match_euler(sd15):
    import node_helpers

    model = sd15.clone()
    calls = []

    def record(apply_model, args):
        calls.append(args["timestep"].tolist())
        return apply_model(args["input"], args["timestep"], **args["c"])

    model.set_model_unet_function_wrapper(record)
    pos, neg = make_conds(sd15, seed=1)
    pos2, _ = make_conds(sd15, seed=4)
    # Two prompts switching at 40% of the schedule: ComfyUI picks conds by the first sigma of a batch.
    early = node_helpers.conditioning_set_values(pos, {"start_percent": 0.0, "end_percent": 0.4})
    late = node_helpers.conditioning_set_values(pos2, {"start_percent": 0.4, "end_percent": 1.0})
    conds = (early + late, neg)
    sigmas = _sigmas(sd15)
    g = torch.Generator().manual_seed(0)
    latent = {"samples": torch.randn(1, 4, 8, 8, generator=g), "noise_mask": (torch.rand(1, 1, 8, 8, generator=g) > 0.5).float()}
    ref, _ = _run(model, conds, _comfy("euler"), sigmas, latent)
    calls.clear()
    out, _ = _run(model, conds, _parataa(batch_chunk=4, **TIGHT), sigmas, latent)
    _compare("inpainting + timestep ranges vs euler", out, ref)
    # No model call mixes noise levels on both sides of the switch, and none holds more than 4 steps.
    switch = sd15.get_model_object("model_sampling").percent_to_sigma(0.4)
    assert any(len(set(c)) > 1 for c in calls)  # batched over steps
    assert all(all(t > switch for t in c) or all(t < switch for t in c) for c in calls), (switch, calls)
    assert max(len(set(c)) for c in calls) <= 4


def test_warm_start_reuses_the_trajectory(sd15):
    from hires_parallel.nodes.parataa import LAST_REPORT

    conds = make_conds(sd15, seed=1)
    sigmas = _sigmas(sd15)
    first, _ = _run(sd15, conds, _parataa(), sigmas, _latent())
    cold = LAST_REPORT["rounds"]
    euler, _ = _run(sd15, conds, _comfy("euler"), sigmas, _latent())
    _compare(f"default tolerance 1e-3 ({cold} rounds) vs euler", first, euler, tol=5e-3)
    again, _ = _run(sd15, conds, _parataa(), sigmas, _latent())
    print(f"\n[parataa] cold {cold} rounds, unchanged prompt warm {LAST_REPORT['rounds']} rounds")
    assert LAST_REPORT["warm_start"] and LAST_REPORT["rounds"] <= 2
    _compare("warm unchanged vs cold", again, first, tol=1e-5)
    # A changed prompt starts from the old trajectory and still lands on its own sequential result.
    changed = ([[conds[0][0][0] + 0.05 * torch.randn_like(conds[0][0][0]), conds[0][0][1]]], conds[1])
    ref, _ = _run(sd15, changed, _comfy("euler"), sigmas, _latent())
    warm, _ = _run(sd15, changed, _parataa(**TIGHT), sigmas, _latent())
    assert LAST_REPORT["warm_start"]
    _compare(f"changed prompt, warm start ({LAST_REPORT['rounds']} rounds) vs euler", warm, ref)
    # Another seed is another problem: no warm start.
    _run(sd15, conds, _parataa(max_rounds=1), sigmas, _latent(), seed=4)
    assert not LAST_REPORT["warm_start"] and not LAST_REPORT["converged"]


def test_progress_once_per_round_and_cancel(sd15):
    import comfy.model_management
    import comfy.utils

    from hires_parallel.nodes.parataa import LAST_REPORT

    conds = make_conds(sd15, seed=1)
    sigmas = _sigmas(sd15)
    calls = []
    comfy.utils.set_progress_bar_global_hook(lambda value, total, preview, node_id=None: calls.append((value, total)))
    try:
        _run(sd15, conds, _parataa(warm_start=False), sigmas, _latent())
        assert len(calls) == LAST_REPORT["rounds"] and all(t == STEPS for _, t in calls)
        assert [v for v, _ in calls] == LAST_REPORT["finished"] and calls[-1][0] == STEPS

        def cancel(value, total, preview, node_id=None):
            calls.append((value, total))
            if len(calls) == 2:
                raise comfy.model_management.InterruptProcessingException()

        calls.clear()
        comfy.utils.set_progress_bar_global_hook(cancel)
        with pytest.raises(comfy.model_management.InterruptProcessingException):
            _run(sd15, conds, _parataa(warm_start=False), sigmas, _latent(), seed=5)
        assert len(calls) == 2  # stopped at the second round
    finally:
        comfy.utils.set_progress_bar_global_hook(None)
    from hires_parallel.nodes import parataa

    assert len(parataa._warm_cache) == 1  # the cancelled solve (seed 5) left nothing to warm-start from


def test_sampler_pickles_and_bad_inputs_are_refused():
    from hires_parallel.nodes.parataa import ParaTAAInputError, sample_parataa

    sampler = _parataa(window=8, memory=3)
    back = pickle.loads(pickle.dumps(sampler))
    assert back.sampler_function is sample_parataa and back.extra_options == sampler.extra_options
    with pytest.raises(ParaTAAInputError, match="memory"):
        _parataa(memory=0)
    with pytest.raises(ParaTAAInputError, match="variant"):
        _parataa(variant="dpm")


def test_scheduled_hook_keyframes_are_refused_and_plain_hooks_pass():
    import types

    import comfy.hooks

    from hires_parallel.nodes.parataa import ParaTAAInputError, _check_hooks

    plain, scheduled = comfy.hooks.HookGroup(), comfy.hooks.HookGroup()
    plain.add(comfy.hooks.WeightHook())
    hook = comfy.hooks.WeightHook()
    hook.hook_keyframe.add(comfy.hooks.HookKeyframe(strength=0.5, start_percent=0.3))
    scheduled.add(hook)
    _check_hooks(types.SimpleNamespace(conds={"positive": [{"hooks": plain}], "negative": [{}]}))
    with pytest.raises(ParaTAAInputError, match="keyframes"):
        _check_hooks(types.SimpleNamespace(conds={"positive": [{}], "negative": [{"hooks": scheduled}]}))


@pytest.fixture(scope="module")
def _pool_cleanup():
    yield
    from hires_parallel.parallel.runtime.pool import shutdown_pool

    shutdown_pool()


def test_through_the_patch_parallel_guider_two_cpu_ranks_equal_one(sd15, _pool_cleanup):
    from hires_parallel.nodes.parallel_sampler import HiResParallelPatchParallelGuider
    from hires_parallel.parallel.runtime import submit

    conds = make_conds(sd15, seed=1)
    sigmas = _sigmas(sd15)
    latent = _latent(16, 8)
    sampler = _parataa(tolerance=1e-4, tolerance_noise=1e-4, warm_start=False)
    one = HiResParallelPatchParallelGuider.execute(sd15, conds[0], conds[1], 5.0, 1, "cpu", "exact", "off").result[0]
    ref, _ = _run(sd15, conds, sampler, sigmas, latent, guider=one)
    modes = [m for m in ("exact", "batch") if m in submit.MODES]
    assert "exact" in modes
    for mode in modes:
        two = HiResParallelPatchParallelGuider.execute(sd15, conds[0], conds[1], 5.0, 2, "cpu", mode, "auto").result[0]
        out, _ = _run(sd15, conds, sampler, sigmas, latent, guider=two)
        assert submit.LAST_RUN["world_size"] == 2 and submit.LAST_RUN["mode"] == mode
        steps = submit.LAST_RUN["ranks"][0]["steps"]  # callbacks on rank 0: one per round
        print(f"\n[parataa] 2 ranks, mode {mode}: {steps} rounds")
        assert 1 <= steps <= STEPS
        _compare(f"2 cpu ranks ({mode}) vs 1", out, ref, tol=1e-4)
