"""Rank side of tests/unit/test_stale_engine.py: the displaced / partial machinery (parallel/displaced.py)
driven directly with synthetic tensors whose values say where they came from.

Every value is ``1000 * step + global row`` (conv, GroupNorm inputs) or ``1000 * step + global token``
(K/V), so the parent can tell from a result which band, which rows and which step each piece is from.
Three steps per mode: step 0 exact (recorded), steps 1 and 2 stale (step 1 reads what the exact step
recorded, step 2 what the async buckets of step 1 carried).
"""
from __future__ import annotations

from typing import Any

import torch

ROWS = 14  # rows of the test level, split as evenly as the alignment allows (ragged with 3 bands)
WIDTH = 3
D = 2  # K/V feature size
FRACTION = 0.5
LATE_FRACTION = 0.25
STEPS = 3


def values(step: int, rows: tuple[int, int], width: int = WIDTH) -> torch.Tensor:
    """(1, 1, h, width) with 1000 * step + global row."""
    r = torch.arange(rows[0], rows[1], dtype=torch.float64).view(1, 1, -1, 1)
    return (1000.0 * step + r).expand(1, 1, rows[1] - rows[0], width).contiguous()


def tokens(step: int, rows: tuple[int, int], width: int = WIDTH) -> torch.Tensor:
    """(1, h * width, D) with 1000 * step + global token index (the same in every feature)."""
    t = torch.arange(rows[0] * width, rows[1] * width, dtype=torch.float64).view(1, -1, 1)
    return (1000.0 * step + t).expand(1, t.shape[1], D).contiguous()


def engine_world(rank: int, world: int) -> dict[str, Any]:
    from hires_parallel.parallel.band_ops import band_conv_geometry
    from hires_parallel.parallel.comm import BandGroup, CommStats
    from hires_parallel.parallel.displaced import StaleEngine, StaleOptions
    from hires_parallel.parallel.layout import split_rows

    bands = split_rows(ROWS, world, 2)
    out: dict[str, Any] = {"bands": bands}
    # Output channel 0 reads the row above, channel 1 the row below (3x3, padding 1).
    weight = torch.zeros(2, 1, 3, 3, dtype=torch.float64)
    weight[0, 0, 0, 1] = 1.0
    weight[1, 0, 2, 1] = 1.0
    for mode in ("displaced", "partial"):
        stats = CommStats()
        band = BandGroup(list(range(world)), rank, bands, stats=stats)
        heights = [e - s for s, e in bands]
        engine = StaleEngine(StaleOptions(mode, warmup=1, groupnorm="corrected", fraction=FRACTION, buckets=2), stats)
        steps = []
        for step in range(STEPS):
            call = engine.begin_call(step, 0, 10.0 - step, ("synthetic",), band, "cpu")
            x = values(step, band.rows)
            geo = band_conv_geometry(x, weight, 1, 1, 1, 1, band)
            conv = call.conv(x, weight, None, geo)
            # GroupNorm of x + 0.5 * x^2 so that mean and variance both depend on the step.
            gn = call.group_norm(x + 0.5 * x * x, 1, None, None, 0.0)
            k = tokens(step, band.rows)
            kk, vv = call.kv(k, -k, WIDTH, heights)
            engine.end_call(call)
            steps.append({"stale": call.stale, "conv": conv, "gn": gn, "k": kk, "v": vv})
        engine.drain()
        out[mode] = {"steps": steps, "stats": stats.as_dict()}
    # partial with a smaller late window from sigma 8.5 on: the step where the window changes runs exact.
    band = BandGroup(list(range(world)), rank, bands)
    engine = StaleEngine(StaleOptions("partial", warmup=1, fraction=FRACTION, fraction_late=LATE_FRACTION,
                                      late_sigma=8.5), band.stats)
    late = []
    for step, sigma in enumerate((10.0, 9.0, 8.0, 7.0)):
        call = engine.begin_call(step, 0, sigma, ("synthetic",), band, "cpu")
        k = tokens(step, band.rows)
        kk, _ = call.kv(k, -k, WIDTH, [e - s for s, e in bands])
        engine.end_call(call)
        late.append({"stale": call.stale, "k": kk})
    engine.drain()
    out["partial late"] = late
    return out
