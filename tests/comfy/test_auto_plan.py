"""mode auto / auto_approximate: the planner at run time (parallel/runtime/auto_plan.py), through the node and
the real worker pool.

The plan's inputs are measured (one in-process step of the model at the latent size; the link probed when
the pool starts) or forced here: a slow link must give 1 device, a fast one a split. Whatever the plan, an
auto run gives the single-device result of ComfyUI's KSampler within the tolerance of test_parallel_nodes
(measured float noise of the reference path); the chosen plan and its reason reach LAST_RUN, Pool Status and
the panel's summary.
"""
from __future__ import annotations

import json

import pytest
import torch

from support.references import comfy_reference
from support.tiny_models import make_conds


@pytest.fixture()
def fresh_measurements(monkeypatch):
    from hires_parallel.parallel.runtime import auto_plan

    monkeypatch.setattr(auto_plan, "_LINKS", {})
    monkeypatch.setattr(auto_plan, "_CALLS", {})
    return auto_plan


def _force_link(auto_plan, monkeypatch, gbps: float, latency_us: float, sync_us: float, overhead_s: float) -> None:
    monkeypatch.setattr(auto_plan, "_LINKS", {"cpu": {"bandwidth_gbps": gbps, "latency_us": latency_us,
                                                      "step_overhead_s": overhead_s, "sync_wait_us": sync_us}})
    monkeypatch.setattr(auto_plan, "probe_pool", lambda pool, kind: None)  # keep the forced figures


def _choose(auto_plan, model, h: int, w: int, setting: str = "auto", devices: int = 2):
    import comfy.samplers

    conds = make_conds(model, seed=1)
    latent = torch.zeros(1, 4, h, w)
    sigmas = comfy.samplers.KSampler(model, 4, "cpu", "euler", "karras", 1.0).sigmas
    return auto_plan.choose(model, conds[0], conds[1], 5.0, latent, sigmas, ["cpu"] * devices, setting, "cpu")


def test_slow_link_gives_one_device_fast_link_a_split(sd15, fresh_measurements, monkeypatch):
    ap = fresh_measurements
    _force_link(ap, monkeypatch, 0.001, 50_000.0, 0.0, 0.05)  # a link no split survives
    slow = _choose(ap, sd15, 64, 64)
    assert len(slow.devices) == 1 and slow.mode == "exact", slow.reason
    assert "no plan is predicted faster" in slow.reason
    _force_link(ap, monkeypatch, 100.0, 1.0, 0.0, 0.0)  # NVLink-like, no overhead
    monkeypatch.setattr(ap, "cpu_thread_speedup", lambda *args, **kwargs: 1.0)  # as separate devices: no core sharing
    fast = _choose(ap, sd15, 64, 64)
    assert len(fast.devices) == 2, fast.reason
    assert fast.inputs["link_measured"] and fast.inputs["one_device_step_s"] > 0
    print(f"\nslow link: {slow.reason}\nfast link: {fast.reason}")


def test_approximate_modes_only_when_allowed(sd15, fresh_measurements, monkeypatch):
    ap = fresh_measurements
    _force_link(ap, monkeypatch, 0.05, 5_000.0, 0.0, 0.0)  # exchanges dear: stale modes would hide them
    monkeypatch.setattr(ap, "cpu_thread_speedup", lambda *args, **kwargs: 1.0)
    exact_only = _choose(ap, sd15, 64, 64, "auto")
    assert exact_only.mode in ("exact", "batch"), exact_only.reason
    ranked = _choose(ap, sd15, 64, 64, "auto_approximate")
    assert any("displaced" in r or "partial" in r for r in ranked.ranked), ranked.ranked
    assert not any("displaced" in r or "partial" in r for r in exact_only.ranked), exact_only.ranked


def test_auto_run_through_the_node_equals_comfy_ksampler(sd15, fresh_measurements):
    from hires_parallel.nodes.parallel_sampler import HiResParallelPatchParallelKSampler, pool_status_text
    from hires_parallel.parallel.runtime import monitor, submit
    from hires_parallel.parallel.runtime.pool import current_pool

    conds = make_conds(sd15, seed=1)
    latent = {"samples": torch.zeros(1, 4, 48, 40)}
    for _ in range(2):  # the first run measures the link when its pool starts; the second plans with it
        out = HiResParallelPatchParallelKSampler.execute(sd15, 5, 3, 5.0, "euler", "karras", conds[0], conds[1], latent,
                                                         1.0, 2, "cpu", "auto", "auto").result[0]["samples"]
        plan = submit.LAST_RUN["plan"]
        assert plan["reason"] and plan["inputs"]["one_device_step_s"] > 0, plan
        assert submit.LAST_RUN["world_size"] == plan["devices"] and submit.LAST_RUN["mode"] == plan["mode"]
        ref = comfy_reference(sd15, conds, latent, seed=5, steps=3, cfg=5.0, sampler="euler", scheduler="karras")
        ref.noise_tolerance.check(f"auto plan: {plan['mode']} on {plan['devices']}", out, ref)
    pool = current_pool()
    if plan["devices"] > 1:
        assert pool is not None and pool.link_probe["bandwidth_gbps"] > 0 and pool.link_probe["sync_wait_us"] >= 0
        assert plan["inputs"]["link_measured"]
    status = json.loads(pool_status_text())
    assert status["last_run"]["plan"]["reason"] == plan["reason"]
    assert monitor.snapshot()["last_run"]["plan"]["reason"] == plan["reason"]
    print(f"\nplan: {plan['reason']}")


def test_a_split_plan_runs_on_the_pool_and_equals_comfy_ksampler(sd15, fresh_measurements, monkeypatch):
    """A link forced fast makes the plan split over both CPU workers: the run follows the plan (devices, mode,
    CFG parallel) and still gives ComfyUI's KSampler result."""
    from hires_parallel.nodes.parallel_sampler import HiResParallelPatchParallelKSampler
    from hires_parallel.parallel.runtime import submit

    ap = fresh_measurements
    _force_link(ap, monkeypatch, 100.0, 1.0, 0.0, 0.0)
    monkeypatch.setattr(ap, "cpu_thread_speedup", lambda *args, **kwargs: 1.0)
    conds = make_conds(sd15, seed=1)
    latent = {"samples": torch.zeros(1, 4, 48, 40)}
    out = HiResParallelPatchParallelKSampler.execute(sd15, 5, 3, 5.0, "euler", "karras", conds[0], conds[1], latent,
                                                     1.0, 2, "cpu", "auto", "auto").result[0]["samples"]
    plan = submit.LAST_RUN["plan"]
    assert plan["devices"] == 2 and submit.LAST_RUN["world_size"] == 2, plan
    assert submit.LAST_RUN["mode"] == plan["mode"] and submit.LAST_RUN["cfg_parallel"] == (plan["cfg_parallel"] == "on")
    ref = comfy_reference(sd15, conds, latent, seed=5, steps=3, cfg=5.0, sampler="euler", scheduler="karras")
    ref.noise_tolerance.check(f"auto plan: {plan['mode']} on 2, CFG parallel {plan['cfg_parallel']}", out, ref)


def test_auto_layout_preview_and_cpu_devices():
    from hires_parallel import web_routes
    from hires_parallel.parallel.runtime import submit

    assert len(submit.resolve_devices(0, "cpu", auto=True)) == min(__import__("os").cpu_count() or 1,
                                                                    submit.max_cpu_ranks())
    assert len(submit.resolve_devices(0, "cpu")) == 1
    lay = web_routes.layout_for({"height": "512", "width": "512", "devices": "2", "device_kind": "cpu",
                                 "mode": "auto"})
    assert lay["auto"] and lay["mode"] == "exact" and lay["world_size"] == 2
    with pytest.raises(ValueError, match="auto_approximate"):
        web_routes.layout_for({"height": "512", "width": "512", "devices": "2", "device_kind": "cpu", "mode": "x"})


def test_link_probe_measures_a_fresh_pool_once(fresh_measurements):
    """LinkProbeJob on a 2-rank CPU pool: bandwidth, latency, the wait of computing ranks and the per-step
    overhead come back positive, are kept on the pool and per device kind, and the next call reuses them."""
    from hires_parallel.parallel.runtime.pool import get_pool

    ap = fresh_measurements
    pool = get_pool(["cpu", "cpu"])
    first = ap.probe_pool(pool, "cpu")
    assert first is not None and pool.link_probe is first, first
    assert first["bandwidth_gbps"] > 0 and first["latency_us"] > 0 and first["step_overhead_s"] > 0
    assert first["sync_wait_us"] >= 0
    link, measured = ap.link_for("cpu")
    assert measured and link == first
    assert ap.probe_pool(pool, "cpu") is first  # cached: no second probe
    print(f"\nlink probe, 2 CPU ranks (gloo): {first}")


def test_one_device_out_of_memory_plans_exact_bands_on_every_device(sd15, fresh_measurements, monkeypatch):
    """When one device cannot run a step at this size (a fake CUDA out-of-memory in the in-process measurement),
    auto takes exact bands on every device instead of failing; the reason says so."""
    ap = fresh_measurements

    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(ap, "measure_step", oom)
    plan = _choose(ap, sd15, 64, 64, devices=3)
    assert len(plan.devices) == 3 and plan.mode == "exact" and plan.cfg_parallel == "auto", plan
    assert "ran out of memory" in plan.reason and plan.inputs["out_of_memory"]
