"""The displaced / partial machinery (parallel/split/displaced.py) on synthetic tensors, 2 and 3 gloo ranks.

Every value encodes (step, global row or token), so each check says exactly which rows of which band
from which step a result was built from: the halo rows (previous band's last row, next band's first
row), the GroupNorm statistics (other bands stale, own band fresh), the K/V (displaced: every other
band of the previous step; partial: only the window of each neighbour nearest to this band).
Step 0 is exact, step 1 reads what the exact step recorded, step 2 what the async buckets carried.
"""
from __future__ import annotations

import time

import pytest
import torch

from hires_parallel.parallel.split.displaced import (
    COMPOSITION_NOISE_LEVEL,
    StaleOptions,
    StepClock,
    noise_levels,
    resolve_groupnorm,
    resolve_warmup,
    window_rows,
)
from support import stale_engine_cases as sc
from support.gloo import spawn_run


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[int, list[dict]]:
    out = {}
    for world in (2, 3):
        t0 = time.monotonic()
        out[world] = spawn_run(sc.engine_world, world, tmp_path_factory.mktemp(f"stale{world}"), 120)
        print(f"\n[spawn] {world} gloo ranks: {time.monotonic() - t0:.1f} s")
    return out


def _source_step(step: int, stale: bool, own: bool) -> int:
    return step if own or not stale else step - 1


@pytest.mark.parametrize("world", [2, 3])
def test_halo_rows_come_from_the_right_band_and_step(runs, world: int) -> None:
    for rank, res in enumerate(runs[world]):
        bands = res["bands"]
        s, e = bands[rank]
        for mode in ("displaced", "partial"):
            for step, got in enumerate(res[mode]["steps"]):
                assert got["stale"] == (step > 0)
                conv = got["conv"][0]
                src = _source_step(step, got["stale"], own=False)
                # Inside the band: fresh own rows; at the band's edges: the neighbour's row of `src`.
                want_above = [1000.0 * step + r - 1 for r in range(s, e)]
                want_below = [1000.0 * step + r + 1 for r in range(s, e)]
                want_above[0] = 0.0 if rank == 0 else 1000.0 * src + s - 1
                want_below[-1] = 0.0 if rank == world - 1 else 1000.0 * src + e
                assert conv[0, :, 0].tolist() == want_above, (mode, rank, step)
                assert conv[1, :, 0].tolist() == want_below, (mode, rank, step)


@pytest.mark.parametrize("world", [2, 3])
def test_groupnorm_uses_stale_others_and_fresh_own(runs, world: int) -> None:
    for rank, res in enumerate(runs[world]):
        bands = res["bands"]
        for mode in ("displaced", "partial"):
            for step, got in enumerate(res[mode]["steps"]):
                parts = []
                for j, rows in enumerate(bands):
                    x = sc.values(_source_step(step, got["stale"], own=j == rank), rows)
                    parts.append(x + 0.5 * x * x)
                full = torch.cat(parts, dim=-2)
                mean, var = full.mean(), full.var(unbiased=False)
                x = sc.values(step, bands[rank])
                want = (x + 0.5 * x * x - mean) / var.sqrt()
                err = (got["gn"] - want).abs().max().item()
                assert err < 1e-9, (mode, rank, step, err)


@pytest.mark.parametrize("world", [2, 3])
def test_kv_displaced_all_bands_partial_neighbour_windows(runs, world: int) -> None:
    for rank, res in enumerate(runs[world]):
        bands = res["bands"]
        heights = [e - s for s, e in bands]
        for mode in ("displaced", "partial"):
            for step, got in enumerate(res[mode]["steps"]):
                stale = got["stale"]
                if mode == "displaced" or not stale:  # exact steps attend to everything, fresh
                    want = [sc.tokens(_source_step(step, stale, own=j == rank), rows) for j, rows in enumerate(bands)]
                else:
                    want = []
                    if rank > 0:
                        s, e = bands[rank - 1]
                        want.append(sc.tokens(step - 1, (e - window_rows(sc.FRACTION, heights[rank - 1]), e)))
                    want.append(sc.tokens(step, bands[rank]))
                    if rank < world - 1:
                        s, e = bands[rank + 1]
                        want.append(sc.tokens(step - 1, (s, s + window_rows(sc.FRACTION, heights[rank + 1]))))
                want_k = torch.cat(want, dim=1)
                assert torch.equal(got["k"], want_k), (mode, rank, step, got["k"][0, :, 0].tolist())
                assert torch.equal(got["v"], -want_k)


@pytest.mark.parametrize("world", [2, 3])
def test_partial_late_fraction_switches_window_after_one_exact_step(runs, world: int) -> None:
    for rank, res in enumerate(runs[world]):
        bands = res["bands"]
        heights = [e - s for s, e in bands]
        got = res["partial late"]
        assert [g["stale"] for g in got] == [False, True, False, True]
        for step, fraction in ((1, sc.FRACTION), (3, sc.LATE_FRACTION)):
            n_prev = window_rows(fraction, heights[rank - 1]) if rank > 0 else 0
            n_next = window_rows(fraction, heights[rank + 1]) if rank < world - 1 else 0
            assert got[step]["k"].shape[1] == (n_prev + heights[rank] + n_next) * sc.WIDTH, (rank, step)
        assert got[2]["k"].shape[1] == sc.ROWS * sc.WIDTH  # the switch step attends to everything, fresh
        assert window_rows(sc.LATE_FRACTION, max(heights)) < window_rows(sc.FRACTION, max(heights))


@pytest.mark.parametrize("world", [2, 3])
def test_stale_exchanges_are_counted_per_kind(runs, world: int) -> None:
    """Byte counts of the engine against the geometry: 2 K/V + GroupNorm exchanges and 1 halo per step."""
    for rank, res in enumerate(runs[world]):
        bands = res["bands"]
        heights = [e - s for s, e in bands]
        n, w, f8 = world, sc.WIDTH, 8
        first, last = rank == 0, rank == world - 1
        neighbours = (not first) + (not last)
        halo = (neighbours * w * f8) * sc.STEPS  # one row each way per neighbour, every step
        gn_exact = 2 * (n - 1) * 3 * f8 // n  # ring all_reduce of [sum, sum of squares, count]
        gn_stale = (n - 1) * 3 * f8  # the same to and from every other band
        kv_full = (n - 1) * max(heights) * w * 2 * sc.D * f8  # exact: padded all_gather of k|v
        win = [window_rows(sc.FRACTION, h) * w * 2 * sc.D * f8 for h in heights]
        row = w * 2 * sc.D * f8
        # stale displaced: this band's k|v to every other band, every other band's from it (no padding)
        kv_sent = {"displaced": (n - 1) * heights[rank] * row, "partial": win[rank] * neighbours}
        kv_recv = {"displaced": (sum(heights) - heights[rank]) * row,
                   "partial": (0 if first else win[rank - 1]) + (0 if last else win[rank + 1])}
        for mode in ("displaced", "partial"):
            st = res[mode]["stats"]
            assert st["bytes_sent"]["halo"] == halo and st["bytes_received"]["halo"] == halo, (mode, st)
            assert st["bytes_sent"]["groupnorm"] == gn_exact + 2 * gn_stale, (mode, st)
            assert st["bytes_sent"]["kv"] == kv_full + 2 * kv_sent[mode], (mode, rank, st)
            assert st["bytes_received"]["kv"] == kv_full + 2 * kv_recv[mode], (mode, rank, st)


# ---------------------------------------------------------------------------------------- kept memory
@pytest.fixture(scope="module")
def kept(tmp_path_factory: pytest.TempPathFactory) -> dict[int, list[dict]]:
    return {world: spawn_run(sc.kept_world, world, tmp_path_factory.mktemp(f"kept{world}"), 120) for world in (2, 3)}


@pytest.mark.parametrize("world", [2, 3])
def test_kept_kv_bytes_per_layer_match_the_formula(kept, world: int) -> None:
    """Per self-attention layer a rank keeps, between steps and at the warmup switch, exactly the other
    bands' K/V it reads next (displaced: every other band, (N-1)/N of the image's K/V with even bands;
    partial: one window per neighbour) plus its own K/V in flight, nothing more: no gathered copy, no
    padding, and the step that switches from exact to stale holds no second copy."""
    for rank, res in enumerate(kept[world]):
        for mode in ("displaced", "partial"):
            f = sc.kv_formula(world, rank, res["bands"], mode)
            pts = res[(mode, "kv")]["points"]
            print(f"  N={world} rank {rank} {mode:9s}: full K/V {f['full']} B, kept "
                  f"{ {k: v['total'] for k, v in pts.items()} } (stale {f['stale']} + send {f['send']})")
            assert pts["record"] == {"saved": f["stale"], "buckets": 0, "total": f["stale"]}, (mode, rank, pts)
            for point in ("switch", "switch read", "stale", "stale 2"):
                assert pts[point] == {"saved": 0, "buckets": f["total"], "total": f["total"]}, (mode, rank, point)
            if mode == "displaced":
                assert f["total"] == f["full"]  # (N-1)/N read + 1/N in flight: one image's K/V, not (N+1)/N
            else:
                tallest = max(e - s for s, e in res["bands"])
                assert f["stale"] <= 2 * window_rows(sc.FRACTION, tallest) * sc.WIDTH * 2 * sc.D * 8


@pytest.mark.parametrize("world", [2, 3])
def test_kept_halo_and_groupnorm_state(kept, world: int) -> None:
    """Conv halo rows (one row of each neighbour, one row to each) and GroupNorm sums (3 float64 to and
    from every other band) are all that the state layers keep."""
    for rank, res in enumerate(kept[world]):
        first, last = rank == 0, rank == world - 1
        halo = 2 * ((not first) + (not last)) * sc.WIDTH * 8
        gn = world * 3 * 8  # (N-1) received + 1 sent
        for mode in ("displaced", "partial"):
            pts = res[(mode, "state")]["points"]
            assert pts["stale 2"]["total"] == halo + gn and pts["switch"]["total"] == halo + gn, (mode, rank, pts)


@pytest.mark.parametrize("world", [2, 3])
def test_kept_runs_give_the_engine_results(kept, runs, world: int) -> None:
    for rank in range(world):
        for mode in ("displaced", "partial"):
            got = kept[world][rank][(mode, "kv")]["results"]
            want = [s["k"] for s in runs[world][rank][mode]["steps"]]
            assert all(torch.equal(a, b) for a, b in zip(got, want)), (mode, rank)


# ---------------------------------------------------------------------------------------- pure rules
def test_step_clock_counts_distinct_sigmas_and_call_slots() -> None:
    clock = StepClock()
    # heun: s0 | s1 (2nd eval of step 0), s1 (1st eval of step 1) | s2, s2 | ...; cond/uncond split: repeats
    got = [clock.tick(s) for s in (14.6, 7.0, 7.0, 3.0, 3.0, 3.0, 0.5)]
    assert got == [(0, 0), (1, 0), (1, 1), (2, 0), (2, 1), (2, 2), (3, 0)]


class _Sampling:
    """A stand-in for ComfyUI's ModelSamplingDiscrete: timestep = index of the nearest sigma of a table."""

    def __init__(self, table: list[float]) -> None:
        self.sigmas = torch.tensor(table)
        self.sigma_min, self.sigma_max = self.sigmas[0], self.sigmas[-1]

    def timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        return (self.sigmas - sigma).abs().argmin().float()


def test_noise_levels_follow_the_model_timestep_scale() -> None:
    ms = _Sampling([0.1, 0.5, 1.0, 2.0, 5.0, 10.0])  # timesteps 0..5
    assert noise_levels(ms, torch.tensor([10.0, 5.0, 2.0, 0.1])) == pytest.approx([1.0, 0.8, 0.6, 0.0])
    assert noise_levels(ms, [20.0]) == [1.0]


def test_option_rules() -> None:
    assert resolve_warmup(0, 20) == 2 and resolve_warmup(0, 3) == 1 and resolve_warmup(0, 50) == 5
    assert resolve_warmup(7, 20) == 7
    assert resolve_groupnorm("auto", 128, 128) == "sync" and resolve_groupnorm("auto", 256, 256) == "corrected"
    assert resolve_groupnorm("sync", 512, 512) == "sync"
    with pytest.raises(ValueError, match="groupnorm"):
        resolve_groupnorm("fast", 8, 8)
    assert [window_rows(0.3, h) for h in (1, 3, 4, 10, 16)] == [1, 1, 2, 3, 5]
    # auto warmup also covers the leading steps above COMPOSITION_NOISE_LEVEL (a run from noise)
    karras16 = [1.0, 0.952, 0.899, 0.838, 0.769, 0.688, 0.595, 0.487, 0.367, 0.249, 0.146, 0.072, 0.03, 0.01, 0.003, 0.0]
    assert COMPOSITION_NOISE_LEVEL == 0.6 and resolve_warmup(0, 16, karras16) == 6
    assert resolve_warmup(0, 16) == 2 and resolve_warmup(3, 16, karras16) == 3  # no levels; explicit warmup wins
    relay = [0.6006, 0.486, 0.367, 0.249, 0.146, 0.072, 0.03, 0.01, 0.003, 0.0]  # relay pass from timestep 600
    assert resolve_warmup(0, 10, relay) == 1 and resolve_warmup(0, 10, [0.5] * 10) == 1
    assert resolve_warmup(0, 4, [1.0] * 4) == 4 and resolve_warmup(0, 50, [0.9, 0.5] + [0.9] * 48) == 5
    assert window_rows(0.0, 10) == 0 and window_rows(1.0, 10) == 10
    opts = StaleOptions("partial", fraction=0.3, fraction_late=0.1, late_sigma=2.0)
    assert opts.fraction_at(5.0) == 0.3 and opts.fraction_at(2.0) == 0.1 and opts.fraction_at(None) == 0.3
    for bad in (dict(mode="fast"), dict(mode="partial", fraction=1.5), dict(mode="displaced", warmup=0),
                dict(mode="displaced", groupnorm="auto"), dict(mode="displaced", debug="x")):
        with pytest.raises(ValueError):
            StaleOptions(**bad)
