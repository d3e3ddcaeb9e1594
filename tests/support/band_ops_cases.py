"""Cases for tests/unit/test_band_ops.py that run inside spawned gloo ranks (importable by children)."""
from __future__ import annotations

from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F

from hires_parallel.parallel.split.band_ops import band_conv2d, band_group_norm, band_kv, band_slice
from hires_parallel.parallel.split.comm import BandGroup, CommStats, gather_batch
from hires_parallel.parallel.split.layout import ParallelPlan, split_rows

TOL = 1e-5
SPAWN_TIMEOUT_S = 120
B, C, GROUPS = 2, 4, 2

# (rows, width, align, weights) per world size: even bands, uneven bands, ragged last bands.
CASES: dict[int, list[tuple[int, int, int, list[float] | None]]] = {
    2: [(16, 10, 4, None), (13, 9, 4, None)],
    3: [(22, 10, 4, None), (21, 7, 2, [1.0, 2.0, 1.5])],
}
# name -> (kernel, stride, padding, dilation)
CONVS = {
    "3x3s1": (3, 1, 1, 1),
    "3x3s2": (3, 2, 1, 1),
    "1x1": (1, 1, 0, 1),
    "1x1s2": (1, 2, 0, 1),
    "5x5s1": (5, 1, 2, 1),
    "3x3d2": (3, 1, 2, 2),
}


# ---------------------------------------------------------------------------- shared inputs
def make_data(rows: int, width: int, align: int, seed: int = 0) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed * 1000 + rows * 10 + width)

    def rnd(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * scale

    d: dict[str, Any] = {"x": rnd(B, C, rows, width), "tok": rnd(B, rows * width, C)}
    for name, (k, _, _, _) in CONVS.items():
        d[f"w_{name}"], d[f"b_{name}"] = rnd(C, C, k, k, scale=0.3), rnd(C)
    levels = align.bit_length() - 1
    for lvl in range(levels):
        for part in ("down", "mid", "up"):
            d[f"w_{part}{lvl}"], d[f"b_{part}{lvl}"] = rnd(C, C, 3, 3, scale=0.3), rnd(C)
    d["gn_w"], d["gn_b"] = rnd(C) + 1, rnd(C)
    d["wq"], d["wk"], d["wv"] = rnd(C, 8, scale=0.5), rnd(C, 8, scale=0.5), rnd(C, 6, scale=0.5)
    d["levels"] = levels
    return d


def chain(x: torch.Tensor, d: dict[str, Any], conv: Callable, gn: Callable, kv: Callable) -> torch.Tensor:
    """A tiny UNet path: (conv s2, conv s1) per level, GroupNorm + self-attention at the bottom,
    then (nearest x2, conv) back up. Band and full runs share this code."""
    h = x
    for lvl in range(d["levels"]):
        h = conv(h, d[f"w_down{lvl}"], d[f"b_down{lvl}"], 2, 1)
        h = F.silu(conv(h, d[f"w_mid{lvl}"], d[f"b_mid{lvl}"], 1, 1))
    h = gn(h, GROUPS, d["gn_w"], d["gn_b"], 1e-5)
    b, c, hh, ww = h.shape
    t = h.flatten(2).transpose(1, 2)  # (B, tokens, C), tokens row-major so a band is contiguous
    k, v = kv(t @ d["wk"], t @ d["wv"])
    a = F.scaled_dot_product_attention(t @ d["wq"], k, v)  # (B, tokens, 6)
    h = h + (a[..., :c]).transpose(1, 2).reshape(b, c, hh, ww)
    for lvl in reversed(range(d["levels"])):
        h = F.interpolate(h, scale_factor=2.0, mode="nearest")
        h = conv(h, d[f"w_up{lvl}"], d[f"b_up{lvl}"], 1, 1)
    return h


def full_chain(x: torch.Tensor, d: dict[str, Any]) -> torch.Tensor:
    return chain(
        x,
        d,
        lambda h, w, b, s, p: F.conv2d(h, w, b, s, p),
        lambda h, g, w, b, e: F.group_norm(h, g, w, b, e),
        lambda k, v: (k, v),
    )


def band_chain(x: torch.Tensor, d: dict[str, Any], band: BandGroup) -> torch.Tensor:
    return chain(
        x,
        d,
        lambda h, w, b, s, p: band_conv2d(h, w, b, s, p, 1, 1, band),
        lambda h, g, w, b, e: band_group_norm(h, g, w, b, e, band),
        lambda k, v: band_kv(k, v, band),
    )


def token_slice(tok: torch.Tensor, band: BandGroup, width: int) -> torch.Tensor:
    s, e = band.rows
    return tok[:, s * width : e * width]


# ---------------------------------------------------------------------------- spawned side
def _case_results(rank: int, world: int, case: tuple, group: Any = None, ranks: list[int] | None = None) -> dict:
    rows, width, align, weights = case
    ranks = ranks or list(range(world))
    bands = split_rows(rows, len(ranks), align, weights)
    band = BandGroup(ranks, rank, bands, group=group)
    d = make_data(rows, width, align)
    x = band_slice(d["x"], band)
    out: dict[str, Any] = {"bands": bands, "index": band.index}
    for name, (k, s, p, dil) in CONVS.items():
        out[f"conv_{name}"] = band_conv2d(x, d[f"w_{name}"], d[f"b_{name}"], s, p, dil, 1, band)
    out["chain"] = band_chain(x, d, band)
    out["gn"] = band_group_norm(x, GROUPS, d["gn_w"], d["gn_b"], 1e-5, band)
    tok = token_slice(d["tok"], band, width)
    q = tok @ d["wq"]
    k_all, v_all = band_kv(tok @ d["wk"], tok @ d["wv"], band)
    out["attn"] = F.scaled_dot_product_attention(q, k_all, v_all)
    out["gather_rows"] = band.gather_rows(x)
    out["gather_rows_sizes"] = band.gather_rows(x, sizes=band.heights)
    out["gather_tokens"] = band.gather_tokens(tok)
    for top, bottom in ((1, 1), (2, 2), (2, 0), (0, 1)):
        out[f"halo_{top}{bottom}"] = band.halo(x, top, bottom)

    # Byte accounting, one fresh CommStats per operation.
    def measured(fn: Callable[[BandGroup], Any]) -> dict:
        stats = CommStats()
        fn(BandGroup(ranks, rank, bands, group=group, stats=stats))
        return stats.as_dict()

    out["stats_conv_s1"] = measured(lambda bg: band_conv2d(x, d["w_3x3s1"], None, 1, 1, 1, 1, bg))
    out["stats_conv_s2"] = measured(lambda bg: band_conv2d(x, d["w_3x3s2"], None, 2, 1, 1, 1, bg))
    out["stats_gather"] = measured(lambda bg: bg.gather_rows(x))
    out["stats_reduce"] = measured(lambda bg: bg.all_reduce_sum(torch.ones(5, dtype=torch.float64), kind="groupnorm"))
    out["x_shape"] = tuple(x.shape)
    return out


def _worker_2(rank: int, world: int) -> dict:
    out = {"cases": [_case_results(rank, world, case) for case in CASES[world]]}
    # CFG parallel layout: one band per batch group, cond / uncond gathered across groups.
    plan = ParallelPlan(world, cfg_parallel=True)
    g, b = plan.coords(rank)
    solo = BandGroup(plan.band_ranks(g), rank, [(0, 8)])
    xb = torch.full((1, 2, 8, 3), float(rank + 1))
    out["solo_conv"] = band_conv2d(xb, torch.ones(2, 2, 3, 3), None, 1, 1, 1, 1, solo)
    stats = CommStats()
    out["batch"] = gather_batch(xb, None, stats=stats)
    out["batch_stats"] = stats.as_dict()
    return out


def _worker_3(rank: int, world: int) -> dict:
    out = {"cases": [_case_results(rank, world, case) for case in CASES[world]]}
    # A band group over a subgroup whose global ranks are not consecutive.
    sub = dist.new_group([0, 2])
    if rank in (0, 2):
        out["sub"] = _case_results(rank, world, (16, 6, 4, None), group=sub, ranks=[0, 2])
    # A halo deeper than the first band: every rank must refuse before communicating.
    band = BandGroup([0, 1, 2], rank, split_rows(21, 3, 2, [1.0, 2.0, 1.5]))
    x = band_slice(make_data(21, 7, 2)["x"], band)
    try:
        band.halo(x, 5, 0)
        out["deep_halo"] = "no error"
    except ValueError as e:
        out["deep_halo"] = str(e)
    dist.barrier()
    return out

