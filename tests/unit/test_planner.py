"""choose_plan: slow links never get bands, fast links at 4096^2 get bands on every device, never below 1.0x,
approximate modes only when allowed, the fidelity gate honoured, measured CPU inputs."""
from __future__ import annotations

import pytest

from hires_parallel.parallel.planning.exchange_pattern import (FLUX_DEV_CONFIG, SDXL_CONFIG, flux_description,
                                                                unet_description)
from hires_parallel.parallel.planning.planner import Link, candidate_plans, choose_plan
from hires_parallel.parallel.planning.rig import cpu_rig, preset

SDXL_4096 = unet_description(SDXL_CONFIG, (512, 512))
SDXL_2048 = unet_description(SDXL_CONFIG, (256, 256))


@pytest.mark.parametrize("approx", [False, True])
def test_slow_link_never_bands(approx):
    c = choose_plan(SDXL_2048, preset("A100"), 4, link=Link(0.1, 1000.0), allow_approximate=approx)
    assert c.bands == 1 and (c.world == 1 or c.cfg_parallel or c.mode == "batch"), c.reason
    assert c.prediction.speedup >= 1.0


def test_fast_link_bands_on_all_devices_at_4096():
    c = choose_plan(SDXL_4096, preset("H100"), 8, link=Link(400.0, 10.0))
    assert c.world == 8 and c.bands >= 4 and c.mode == "exact", c.reason
    assert c.prediction.speedup > 4 and "predicted" in c.reason
    assert [p.total_s for p in c.ranked] == sorted(p.total_s for p in c.ranked)


def test_never_slower_than_one_device():
    tiny = unet_description(SDXL_CONFIG, (16, 16))  # 128^2: exchanges and launches dominate
    c = choose_plan(tiny, preset("8x RTX 4090"), 8, link=Link(0.05, 5000.0), allow_approximate=True)
    assert c.prediction.speedup >= 1.0
    for p in c.ranked:
        if p.total_s < c.prediction.total_s:
            pytest.fail(f"{p.label} faster than the choice")


def test_approximate_only_when_allowed_and_gate_honoured():
    rig = preset("8x RTX 4090")
    exact_only = choose_plan(SDXL_4096, rig, allow_approximate=False)
    assert all(p.mode not in ("displaced", "partial") for p in exact_only.ranked)
    free = choose_plan(SDXL_4096, rig, allow_approximate=True)
    assert free.mode in ("displaced", "partial")
    gated = choose_plan(SDXL_4096, rig, allow_approximate=True, fidelity_gate={"partial"})
    assert all(p.mode != "partial" for p in gated.ranked) and any("fidelity" in r for r in gated.refused)
    psnr = {"displaced": 34.0, "partial": 27.0}
    by_call = choose_plan(SDXL_4096, rig, allow_approximate=True, fidelity_gate=lambda m: psnr[m] >= 30)
    assert by_call.mode != "partial"


def test_candidates_respect_batch_and_alignment():
    flux = flux_description(FLUX_DEV_CONFIG, (128, 128))
    plans = candidate_plans(flux, 4, batch=1)
    assert not any(cfg for _, _, cfg in plans) and not any(m == "batch" for _, m, _ in plans)
    small = unet_description(SDXL_CONFIG, (8, 8))  # 2 aligned rows of 4: at most 2 bands
    assert max(n for n, m, cfg in candidate_plans(small, 8, 2) if m == "exact" and not cfg) == 2


def test_measured_cpu_inputs():
    # this 2-core machine: 1 rank x 2 threads is 1.59x faster than 1 x 1 (benchmarks/results/exact_scaling.json);
    # two ranks of 1 thread each compute at 1 / 1.59 of the 2-thread rank
    rig = cpu_rig(2, 1.59)
    assert rig.rank_rate(1) == 1.0 and rig.rank_rate(2) == pytest.approx(1 / 1.59)
    assert cpu_rig(2, 1.59).rank_rate(4) == pytest.approx(0.5 / 1.59)
    desc = unet_description(SDXL_CONFIG, (128, 128))
    c = choose_plan(desc, rig, 2, single_call_s=1.476, link=Link(1.0, 200.0))
    one = next(p for p in c.ranked if p.world == 1)
    assert one.total_s == pytest.approx(1.476, rel=1e-6)
    cfg = next(p for p in c.ranked if p.cfg_parallel)
    # half the work at 1/1.59 of the speed: 0.795 of one device before exchanges
    assert cfg.compute_s == pytest.approx(1.476 * 0.5 * 1.59, rel=0.01)
    assert c.prediction.speedup >= 1.0
