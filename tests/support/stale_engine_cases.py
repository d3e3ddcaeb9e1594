"""Rank side of tests/unit/test_stale_engine.py: the displaced / partial machinery (parallel/split/displaced.py)
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
    from hires_parallel.parallel.split.band_ops import band_conv_geometry
    from hires_parallel.parallel.split.comm import BandGroup, CommStats
    from hires_parallel.parallel.split.displaced import StaleEngine, StaleOptions
    from hires_parallel.parallel.split.layout import split_rows

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


# ------------------------------------------------------------------------------------ kept bytes
def _tensors(obj: Any, out: list[torch.Tensor], depth: int = 0) -> None:
    if isinstance(obj, torch.Tensor):
        out.append(obj)
    elif isinstance(obj, (list, tuple)) and depth < 4:
        for o in obj:
            _tensors(o, out, depth + 1)


def kept_bytes(engine: Any) -> dict[str, int]:
    """Bytes of memory the stale engine keeps alive: every distinct storage reachable from its slots
    (layers' recorded data, buckets' buffers), whole storages (a view keeps its whole base alive).
    Independent of the engine's internals beyond "slots hold layers and buckets": it measures the
    old and the new engine alike. Keys: "saved" (recorded by an exact call, not yet in a bucket),
    "buckets" (exchange buffers), "total"."""
    seen: dict[int, int] = {}
    parts = {"saved": 0, "buckets": 0}
    for slot in engine.slots.values():
        groups = {"saved": [], "buckets": []}
        for lay in slot.layers:
            _tensors(lay.saved, groups["saved"])
        for b in slot.buckets or []:
            for v in vars(b).values():
                _tensors(v, groups["buckets"])
        for name, ts in groups.items():
            for t in ts:
                st = t.untyped_storage()
                if st.data_ptr() not in seen:
                    seen[st.data_ptr()] = st.nbytes()
                    parts[name] += st.nbytes()
    parts["total"] = sum(seen.values())
    return parts


def kept_world(rank: int, world: int) -> dict[str, Any]:
    """Kept bytes of one rank through warmup (step 0, exact and recorded) and two stale steps, for an
    engine whose calls hold ONE self-attention layer (K/V only) and for one whose calls hold one conv
    and one GroupNorm (halo / GroupNorm state only). Points: "record" (after the exact step 0),
    "switch" (inside step 1 after begin_call, before the layer ran: the warmup switch), "switch read"
    (step 1 after its layer ran), "stale" (after step 1), "stale 2" (after step 2)."""
    from hires_parallel.parallel.split.band_ops import band_conv_geometry
    from hires_parallel.parallel.split.comm import BandGroup
    from hires_parallel.parallel.split.displaced import StaleEngine, StaleOptions
    from hires_parallel.parallel.split.layout import split_rows

    bands = split_rows(ROWS, world, 2)
    heights = [e - s for s, e in bands]
    out: dict[str, Any] = {"bands": bands}
    weight = torch.zeros(2, 1, 3, 3, dtype=torch.float64)
    weight[0, 0, 0, 1] = weight[1, 0, 2, 1] = 1.0
    for mode in ("displaced", "partial"):
        for what in ("kv", "state"):
            band = BandGroup(list(range(world)), rank, bands)
            engine = StaleEngine(StaleOptions(mode, warmup=1, groupnorm="corrected", fraction=FRACTION, buckets=2),
                                 band.stats)
            points: dict[str, dict[str, int]] = {}
            results = []
            for step in range(STEPS):
                call = engine.begin_call(step, 0, 10.0 - step, ("kept",), band, "cpu")
                if step == 1:
                    points["switch"] = kept_bytes(engine)
                if what == "kv":
                    k = tokens(step, band.rows)
                    kk, _ = call.kv(k, -k, WIDTH, heights)
                    results.append(kk)
                else:
                    x = values(step, band.rows)
                    geo = band_conv_geometry(x, weight, 1, 1, 1, 1, band)
                    results.append(call.conv(x, weight, None, geo))
                    results.append(call.group_norm(x + 0.5 * x * x, 1, None, None, 0.0))
                if step == 1:
                    points["switch read"] = kept_bytes(engine)
                engine.end_call(call)
                points[("record", "stale", "stale 2")[step]] = kept_bytes(engine)
            engine.drain()
            out[(mode, what)] = {"points": points, "results": results}
    return out


def kv_formula(world: int, rank: int, bands: list[tuple[int, int]], mode: str, fraction: float = FRACTION,
               batch: int = 1, d: int = D, itemsize: int = 8) -> dict[str, int]:
    """What a rank must keep per self-attention layer between steps (bytes): "stale" = the other bands'
    K/V it will read next step (displaced: every other band; partial: the window of each neighbour),
    "send" = its own fresh K/V in flight to the others (displaced: its band; partial: its two edge
    windows, one per neighbour)."""
    from hires_parallel.parallel.split.displaced import window_rows

    per_row = batch * WIDTH * 2 * d * itemsize
    heights = [e - s for s, e in bands]
    first, last = rank == 0, rank == world - 1
    if mode == "displaced":
        stale = sum(h for j, h in enumerate(heights) if j != rank) * per_row
        send = heights[rank] * per_row
    else:
        win = [window_rows(fraction, h) for h in heights]
        stale = ((0 if first else win[rank - 1]) + (0 if last else win[rank + 1])) * per_row
        send = win[rank] * ((not first) + (not last)) * per_row
    return {"stale": stale, "send": send, "total": stale + send, "full": sum(heights) * per_row}
