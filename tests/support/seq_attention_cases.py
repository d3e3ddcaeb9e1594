"""Rank workers for tests/unit/test_seq_attention.py: sequence-parallel attention on gloo ranks against the
full attention computed in the parent. Data is a function of the seed only, so every rank and the parent
build the same tensors."""
from __future__ import annotations

from typing import Any

import torch

HEADS, DIM, PREFIX = 6, 8, 5


def data(world: int, seed: int = 0) -> dict[str, Any]:
    """q, k, v (B, prefix + tokens, H, D) of a 3-frame x 5-row x 4-col grid (uneven bands for 2 and 3 ranks)."""
    g = torch.Generator().manual_seed(seed + world)
    tokens = 3 * 5 * 4
    q, k, v = (torch.randn(2, PREFIX + tokens, HEADS, DIM, generator=g, dtype=torch.float64) for _ in range(3))
    return {"q": q, "k": k, "v": v}


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    out = torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)


def worker(rank: int, world: int) -> dict[str, Any]:
    from hires_parallel.parallel.split.comm import BandGroup, CommStats
    from hires_parallel.parallel.split.seq_attention import gathered_kv_attention, ulysses_attention
    from hires_parallel.parallel.split.tokens import TokenGrid, cut_tokens, split_units

    d = data(world)
    out: dict[str, Any] = {}
    for axis in ("rows", "frames"):
        grid = TokenGrid(3, 5, 4, axis)
        bands = split_units(grid, world)
        s, e = bands[rank]
        q, k, v = (cut_tokens(d[n], 1, grid, s, e, PREFIX) for n in ("q", "k", "v"))
        sizes = [(b - a) * grid.width for a, b in bands]
        res: dict[str, Any] = {"bands": bands, "bytes": {}}
        for name, fn, pre in (("gathered", gathered_kv_attention, PREFIX), ("ulysses", ulysses_attention, PREFIX),
                              ("ulysses_no_prefix", ulysses_attention, 0)):
            stats = CommStats()  # one per method: its bytes alone
            band = BandGroup(list(range(world)), rank, bands, stats=stats)
            cut = PREFIX - pre
            res[name] = fn(attend, q[:, cut:], k[:, cut:], v[:, cut:], pre, band, sizes)
            res["bytes"][name] = stats.total_sent
        out[axis] = res
    return out
