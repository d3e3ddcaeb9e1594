"""Sequence-parallel attention (parallel/split/seq_attention.py) on 2 and 3 gloo ranks against full attention.

Float64 data, so the only difference from the full computation is the order of float operations:
tolerance 1e-12 (measured errors are ~1e-16). A band that attends to its own keys only is off by O(1).
"""
from __future__ import annotations

import pytest

from hires_parallel.parallel.split.tokens import TokenGrid, cut_tokens
from support import seq_attention_cases as sc
from support.gloo import spawn_run

TOL = 1e-12


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[int, list[dict]]:
    return {w: spawn_run(sc.worker, w, tmp_path_factory.mktemp(f"seq{w}")) for w in (2, 3)}


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("axis", ["rows", "frames"])
@pytest.mark.parametrize("kind", ["gathered", "ulysses", "ulysses_no_prefix"])
def test_band_attention_equals_full_attention(runs, world: int, axis: str, kind: str) -> None:
    d = sc.data(world)
    prefix = 0 if kind == "ulysses_no_prefix" else sc.PREFIX
    q, k, v = (d[n][:, sc.PREFIX - prefix:] for n in ("q", "k", "v"))
    full = sc.attend(q, k, v)
    grid = TokenGrid(3, 5, 4, axis)
    worst = 0.0
    for rank, r in enumerate(runs[world]):
        s, e = r[axis]["bands"][rank]
        want = cut_tokens(full, 1, grid, s, e, prefix)
        got = r[axis][kind]
        assert got.shape == want.shape
        worst = max(worst, (got - want).abs().max().item())
        own = sc.attend(cut_tokens(q, 1, grid, s, e, prefix), cut_tokens(k, 1, grid, s, e, prefix),
                        cut_tokens(v, 1, grid, s, e, prefix))
        assert (own - want).abs().max().item() > 1e-3, "the band's own keys alone must not pass"
    print(f"  {kind:18s} {world} ranks, split {axis:6s}: max abs err {worst:.1e}")
    assert worst <= TOL


def test_bytes_per_rank_follow_the_model_and_ulysses_pays_from_three_ranks(runs) -> None:
    """Sent per rank (B = 2, H heads of D, float64): gathered K/V, an all-gather padded to the largest band,
    (N-1) x max L x 2HD; Ulysses, (N-1)/N of the heads of its q/k/v and each other band's outputs for its
    heads, sum over j != me of (3 L_me + L_j) x (H/N) D."""
    b, hd, item = 2, sc.HEADS * sc.DIM, 8
    for world in (2, 3):
        sizes = [(e - s) * 12 for s, e in runs[world][0]["rows"]["bands"]]  # rows split: 3 frames x 4 cols
        g_model = sum((world - 1) * max(sizes) * 2 * hd * b * item for _ in sizes)
        u_model = sum((3 * sizes[me] + sizes[j]) * hd // world * b * item
                      for me in range(world) for j in range(world) if j != me)
        g = sum(r["rows"]["bytes"]["gathered"] for r in runs[world])
        u = sum(r["rows"]["bytes"]["ulysses_no_prefix"] for r in runs[world])
        print(f"  {world} ranks, bands {sizes}: gathered K/V {g} B, Ulysses {u} B (Ulysses / gathered {u / g:.2f})")
        assert (g, u) == (g_model, u_model)
    assert u < 0.8 * g, "from 3 ranks on Ulysses must move clearly fewer bytes"
