"""Patch-parallel primitives against the full-tensor computation.

Two spawned gloo runs (2 and 3 processes) compute every check on their bands and save the
results; the parent process recomputes everything on the full tensors and compares.
"""
from __future__ import annotations

import time

import pytest
import torch
import torch.nn.functional as F

from hires_parallel.parallel.split.band_ops import band_conv2d, band_slice, conv_halo_rows
from hires_parallel.parallel.split.comm import BandGroup, CommStats, gather_batch
from support.band_ops_cases import *  # noqa: F401,F403  (data builders and rank workers)
from support.band_ops_cases import _worker_2, _worker_3
from support.gloo import spawn_run


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[int, list[dict]]:
    out = {}
    for world, fn in ((2, _worker_2), (3, _worker_3)):
        d = tmp_path_factory.mktemp(f"world{world}")
        t0 = time.monotonic()
        out[world] = spawn_run(fn, world, d)
        print(f"\n[spawn] {world} gloo ranks: {time.monotonic() - t0:.1f} s")
    return out


# ---------------------------------------------------------------------------- comparisons
def _err(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (tuple(a.shape), tuple(b.shape))
    return (a - b).abs().max().item()


def _report(label: str, err: float, tol: float = TOL) -> None:
    print(f"  {label:40s} max abs err {err:.2e}")
    assert err <= tol, f"{label}: max abs error {err:.3e} > {tol}"


def _all_cases(runs: dict[int, list[dict]]):
    for world in (2, 3):
        for ci, case in enumerate(CASES[world]):
            yield f"N={world} {case[:3]}", case, [r["cases"][ci] for r in runs[world]]
    yield "N=2 subgroup [0, 2]", (16, 6, 4, None), [runs[3][0]["sub"], runs[3][2]["sub"]]


def _cat(parts: list[dict], key: str, dim: int = -2) -> torch.Tensor:
    return torch.cat([p[key] for p in parts], dim=dim)


def test_band_layout_is_uneven_somewhere(runs) -> None:
    # Guards the test's own coverage: even and uneven bands, and ragged last bands, are exercised.
    sizes = [[e - s for s, e in parts[0]["bands"]] for _, _, parts in _all_cases(runs)]
    print("\n  band sizes:", sizes)
    assert any(len(set(s[:-1])) > 1 for s in sizes), sizes
    assert any(len(set(s)) == 1 for s in sizes), sizes
    assert any(s[-1] % case[2] for s, (_, case, _) in zip(sizes, _all_cases(runs))), sizes


@pytest.mark.parametrize("name", list(CONVS))
def test_band_conv2d_matches_full(runs, name: str) -> None:
    k, s, p, dil = CONVS[name]
    for label, (rows, width, align, _), parts in _all_cases(runs):
        d = make_data(rows, width, align)
        ref = F.conv2d(d["x"], d[f"w_{name}"], d[f"b_{name}"], s, p, dil)
        _report(f"conv {name} {label}", _err(_cat(parts, f"conv_{name}"), ref))


def test_level_chain_matches_full(runs) -> None:
    for label, (rows, width, align, _), parts in _all_cases(runs):
        d = make_data(rows, width, align)
        _report(f"chain {label}", _err(_cat(parts, "chain"), full_chain(d["x"], d)), 1e-4)


def test_band_group_norm_matches_full(runs) -> None:
    for label, (rows, width, align, _), parts in _all_cases(runs):
        d = make_data(rows, width, align)
        ref = F.group_norm(d["x"], GROUPS, d["gn_w"], d["gn_b"], 1e-5)
        _report(f"group_norm {label}", _err(_cat(parts, "gn"), ref))


def test_band_attention_matches_full(runs) -> None:
    for label, (rows, width, align, _), parts in _all_cases(runs):
        d = make_data(rows, width, align)
        t = d["tok"]
        ref = F.scaled_dot_product_attention(t @ d["wq"], t @ d["wk"], t @ d["wv"])
        _report(f"attention {label}", _err(_cat(parts, "attn", dim=1), ref))


def test_gathers_with_uneven_sizes(runs) -> None:
    for label, (rows, width, align, _), parts in _all_cases(runs):
        d = make_data(rows, width, align)
        for p in parts:
            assert torch.equal(p["gather_rows"], d["x"]), label
            assert torch.equal(p["gather_rows_sizes"], d["x"]), label
            assert torch.equal(p["gather_tokens"], d["tok"]), label


def test_halo_rows(runs) -> None:
    for label, (rows, width, align, _), parts in _all_cases(runs):
        x = make_data(rows, width, align)["x"]
        padded = F.pad(x, (0, 0, 2, 2))  # the full image with two zero rows above and below
        for p, (s, e) in zip(parts, parts[0]["bands"]):
            for top, bottom in ((1, 1), (2, 2), (2, 0), (0, 1)):
                want = padded[..., 2 + s - top : 2 + e + bottom, :]
                assert torch.equal(p[f"halo_{top}{bottom}"], want), (label, top, bottom, p["index"])


def test_comm_stats_count_bytes(runs) -> None:
    f32, i64 = 4, 8
    for label, (rows, width, align, _), parts in _all_cases(runs):
        n = len(parts)
        bands = parts[0]["bands"]
        row_bytes = B * C * width * f32
        for i, p in enumerate(parts):
            first, last = i == 0, i == n - 1
            # 3x3 stride 1: one row to and from each neighbour.
            neighbours = (not first) + (not last)
            conv = p["stats_conv_s1"]
            assert conv["bytes_sent"] == {"halo": neighbours * row_bytes}, (label, i, conv)
            assert conv["bytes_received"] == {"halo": neighbours * row_bytes}, (label, i, conv)
            # 3x3 stride 2, pad 1: one row above only, so bytes flow downwards only.
            s2 = p["stats_conv_s2"]
            assert s2["bytes_sent"] == {"halo": 0 if last else row_bytes}, (label, i, s2)
            assert s2["bytes_received"] == {"halo": 0 if first else row_bytes}, (label, i, s2)
            # gather_rows: a size exchange (one int64 per peer), then bands padded to the tallest.
            max_rows = max(e - s for s, e in bands)
            want = (n - 1) * i64 + (n - 1) * max_rows * row_bytes
            g = p["stats_gather"]
            assert g["bytes_sent"] == {"output": want} and g["bytes_received"] == {"output": want}, (label, i, g)
            assert g["calls"] == {"output": 2}
            # all_reduce of 5 float64 as a ring: 2 (n - 1) / n of the tensor each way.
            r = p["stats_reduce"]
            assert r["bytes_sent"] == {"groupnorm": 2 * (n - 1) * 5 * i64 // n}, (label, i, r)
            assert set(r["seconds"]) == {"groupnorm"} and r["seconds"]["groupnorm"] >= 0


def test_cfg_parallel_batch_gather(runs) -> None:
    r0, r1 = runs[2]
    xb = [torch.full((1, 2, 8, 3), 1.0), torch.full((1, 2, 8, 3), 2.0)]
    for r in (r0, r1):
        assert torch.equal(r["batch"], torch.cat(xb, 0))
        nbytes = xb[0].numel() * 4
        assert r["batch_stats"]["bytes_sent"] == {"batch": nbytes}
        assert r["batch_stats"]["bytes_received"] == {"batch": nbytes}
    for i, r in enumerate((r0, r1)):
        assert torch.allclose(r["solo_conv"], F.conv2d(xb[i], torch.ones(2, 2, 3, 3), None, 1, 1))


def test_too_deep_halo_fails_on_every_rank(runs) -> None:
    msgs = [r["deep_halo"] for r in runs[3]]
    print("\n  ", msgs[0])
    for m in msgs:
        assert "band 0 has 4 rows" in m and "5 halo rows" in m, msgs


# ---------------------------------------------------------------------------- single device
def test_size_one_band_group_without_distributed() -> None:
    assert not (dist.is_available() and dist.is_initialized())
    rows, width, align = 13, 9, 4
    d = make_data(rows, width, align)
    band = BandGroup([0], 0, [(0, rows)])
    assert band.size == 1 and band.is_first and band.is_last and band.prev_rank is None and band.next_rank is None
    x = d["x"]
    for name, (k, s, p, dil) in CONVS.items():
        got = band_conv2d(x, d[f"w_{name}"], d[f"b_{name}"], s, p, dil, 1, band)
        assert torch.equal(got, F.conv2d(x, d[f"w_{name}"], d[f"b_{name}"], s, p, dil)), name
    # One device runs the very same torch calls as the unsplit model: bitwise equal.
    assert torch.equal(band_chain(x, d, band), full_chain(x, d))
    assert torch.equal(band.halo(x, 2, 1), F.pad(x, (0, 0, 2, 1)))
    assert band.gather_rows(x) is x and band.gather_tokens(d["tok"]) is d["tok"]
    assert gather_batch(x) is x
    assert band.stats.as_dict()["total_bytes_sent"] == 0


def test_band_slice_levels() -> None:
    bands = [(0, 8), (8, 16), (16, 21)]
    x0 = torch.arange(21.0).view(1, 1, 21, 1)
    x2 = torch.arange(6.0).view(1, 1, 6, 1)  # 21 rows after two stride-2 convs: ceil(21 / 4) = 6
    expect0 = [(0, 8), (8, 16), (16, 21)]
    expect2 = [(0, 2), (2, 4), (4, 6)]
    for i in range(3):
        band = _fake_band(bands, i)
        assert band_slice(x0, band).flatten().tolist() == list(map(float, range(*expect0[i])))
        assert band_slice(x2, band).flatten().tolist() == list(map(float, range(*expect2[i])))
        assert band_slice(x2, band, factor=4).shape[-2] == expect2[i][1] - expect2[i][0]
    with pytest.raises(ValueError):
        band_slice(torch.zeros(1, 1, 5, 1), _fake_band(bands, 0))


def test_level_heights() -> None:
    bands = [(0, 8), (8, 16), (16, 21)]
    assert _fake_band(bands, 0).level_heights(4) == [4, 4, 3]
    assert _fake_band(bands, 1).level_heights(2) == [2, 2, 2]
    assert _fake_band(bands, 2).level_heights(3) == [4, 4, 3]
    assert _fake_band(bands, 2).level_heights(1) == [1, 1, 1]  # the 8-row grid allows factor 8 only
    assert _fake_band(bands, 0).level_heights(3) is None  # 8 rows do not downsample to 3
    tail = [(0, 16), (16, 17)]  # a 1-row last band has 1 row at every level: ambiguous on its own
    assert _fake_band(tail, 1).level_heights(1) is None
    assert _fake_band(tail, 1).level_heights(1, full_height=5) == [4, 1]
    assert _fake_band(tail, 0).level_heights(4) == [4, 1]


def test_conv_halo_rows() -> None:
    assert conv_halo_rows(3, 1, 1) == (1, 1)
    assert conv_halo_rows(3, 2, 1) == (1, 0)
    assert conv_halo_rows(1, 1, 0) == (0, 0)
    assert conv_halo_rows(5, 1, 2) == (2, 2)
    assert conv_halo_rows(3, 1, 2, dilation_h=2) == (2, 2)


def test_band_conv2d_rejects_what_it_cannot_split() -> None:
    band = BandGroup([0], 0, [(0, 8)])
    x, w = torch.zeros(1, 1, 8, 8), torch.zeros(1, 1, 3, 3)
    with pytest.raises(NotImplementedError, match="padding_mode"):
        band_conv2d(x, w, None, 1, 1, 1, 1, band, padding_mode="circular")
    with pytest.raises(NotImplementedError, match="same"):
        band_conv2d(x, torch.zeros(1, 1, 2, 2), None, 1, "same", 1, 1, band)
    # Checks that need no communication fail before any exchange starts.
    with pytest.raises(ValueError, match="full height of 20"):
        band_conv2d(x, w, None, 1, 1, 1, 1, _fake_band([(0, 8), (8, 16), (16, 21)], 0), full_height=20)
    with pytest.raises(ValueError, match="not a multiple of the conv stride 2"):
        band_conv2d(torch.zeros(1, 1, 3, 8), w, None, 2, 1, 1, 1, _fake_band([(0, 6), (6, 12)], 1))


class _NoDistBand(BandGroup):
    """Geometry of a multi-band group without a process group (for pure checks)."""

    def __init__(self, bands: list[tuple[int, int]], index: int) -> None:
        self.ranks = list(range(len(bands)))
        self.rank = index
        self.bands = bands
        self.group = None
        self.stats = CommStats()
        self._index = index
        self._level_cache = {}


def _fake_band(bands: list[tuple[int, int]], index: int) -> BandGroup:
    return _NoDistBand(bands, index)


def test_comm_stats_merge_and_reset() -> None:
    a, b = CommStats(), CommStats()
    a.add("halo", 10, 20)
    b.add("halo", 1, 2)
    b.add("kv", 5, 5)
    with b.time("kv"):
        time.sleep(0.01)
    a.merge(b)
    d = a.as_dict()
    assert d["bytes_sent"] == {"halo": 11, "kv": 5} and d["bytes_received"] == {"halo": 22, "kv": 5}
    assert d["total_bytes_sent"] == 16 and d["seconds"]["kv"] >= 0.01
    a.merge(b.as_dict())
    assert a.sent["kv"] == 10
    a.reset()
    assert a.as_dict()["total_bytes_sent"] == 0 and a.as_dict()["bytes_sent"] == {}


def test_band_conv_from_padded_band_and_halo_terms_equals_stacked_input():
    """conv_band_rows convolves the band alone (zero rows for the halo) and adds the halo rows' terms to the
    border rows in place; the overlapped variant does the same with the halo arriving during the conv. Both
    equal the conv of the stacked [halo | band | halo] rows (float64: 1e-12) for every kernel, stride,
    padding and dilation the bands take, at both image edges and in between."""
    import itertools
    from types import SimpleNamespace

    from hires_parallel.parallel.split.band_ops import (ConvGeometry, _stacked_band_conv, conv_band_rows,
                                                          conv_band_rows_overlapped, conv_halo_rows)

    class Pending:
        def __init__(self, above, below):
            self.result = (above, below)

        def wait(self):
            return self.result

    g = torch.Generator().manual_seed(0)
    checked = 0
    for k, st, pad, dil, h, last, first in itertools.product([1, 3, 5], [1, 2], [0, 1, 2], [1, 2], [2, 4, 6, 8],
                                                             [False, True], [False, True]):
        if h % st:
            continue
        top, bottom = conv_halo_rows(k, st, pad, dil)
        if (h + top + (pad if last else bottom) - (dil * (k - 1) + 1)) < 0:
            continue  # the conv has no output row for this band
        w = torch.randn(5, 3, k, k, generator=g, dtype=torch.float64)
        b = torch.randn(5, generator=g, dtype=torch.float64)
        x = torch.randn(2, 3, h, 12, generator=g, dtype=torch.float64)
        geo = ConvGeometry((st, st), (pad, pad), (dil, dil), 1, top, bottom)
        above = torch.randn(2, 3, top, 12, generator=g, dtype=torch.float64) if top and not first else None
        below = torch.randn(2, 3, bottom, 12, generator=g, dtype=torch.float64) if bottom and not last else None
        band = SimpleNamespace(is_last=last)
        ref = _stacked_band_conv(x, above, below, w, b, geo, band)
        for out in (conv_band_rows(x, above, below, w, b, geo, band),
                    conv_band_rows_overlapped(x, Pending(above, below), w, b, geo, band)):
            assert out.shape == ref.shape, (k, st, pad, dil, h, last, first)
            assert (out - ref).abs().max().item() < 1e-12, (k, st, pad, dil, h, last, first)
            checked += 1
    assert checked > 800
