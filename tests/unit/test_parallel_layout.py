"""Row-band split and rank layout (pure, no processes)."""
from __future__ import annotations

import itertools

import pytest

from hires_parallel.parallel.split.layout import LayoutError, ParallelPlan, split_rows


def _check_cover(bands: list[tuple[int, int]], rows: int, n: int, align: int) -> None:
    assert len(bands) == n
    assert bands[0][0] == 0 and bands[-1][1] == rows
    for (s0, e0), (s1, _) in zip(bands, bands[1:]):
        assert e0 == s1
    for s, e in bands:
        assert e > s, bands
        assert s % align == 0, bands
    for s, e in bands[:-1]:
        assert (e - s) % align == 0, bands


@pytest.mark.parametrize("rows,n,align", list(itertools.product([1, 7, 8, 12, 13, 64, 100, 129], [1, 2, 3, 4, 5], [1, 2, 8])))
def test_split_covers_aligned_and_balanced(rows: int, n: int, align: int) -> None:
    units = -(-rows // align)
    if n > units:
        with pytest.raises(LayoutError):
            split_rows(rows, n, align)
        return
    bands = split_rows(rows, n, align)
    _check_cover(bands, rows, n, align)
    # As equal as the grid allows: no band is more than one aligned slot (plus the partial tail) off the mean.
    sizes = [e - s for s, e in bands]
    assert max(sizes) - min(sizes) <= 2 * align, (bands, sizes)


def test_split_examples() -> None:
    assert split_rows(16, 2, 8) == [(0, 8), (8, 16)]
    assert split_rows(20, 2, 8) == [(0, 8), (8, 20)]  # the tail beyond the grid joins the last band
    assert split_rows(13, 2, 4) == [(0, 8), (8, 13)]
    assert split_rows(128, 3, 8) == [(0, 40), (40, 88), (88, 128)]
    assert split_rows(10, 1, 8) == [(0, 10)]


def test_split_weights_give_faster_devices_more_rows() -> None:
    bands = split_rows(128, 2, 8, weights=[3, 1])
    assert bands == [(0, 96), (96, 128)]
    bands = split_rows(120, 3, 4, weights=[1, 2, 1])
    _check_cover(bands, 120, 3, 4)
    assert [e - s for s, e in bands] == [32, 60, 28]
    # An extreme weight still leaves every band at least one aligned slot.
    bands = split_rows(64, 3, 8, weights=[1000, 1, 1])
    _check_cover(bands, 64, 3, 8)
    assert bands == [(0, 48), (48, 56), (56, 64)]


def test_split_errors_say_what_to_change() -> None:
    with pytest.raises(LayoutError) as e:
        split_rows(12, 3, 8)
    msg = str(e.value)
    assert "12 latent rows at alignment 8 give only 2 bands" in msg
    assert "use at most 2 devices" in msg
    assert "at least 24 latent rows = 192 pixels for 3 devices" in msg
    with pytest.raises(LayoutError, match="at least 5 latent rows"):
        split_rows(3, 5)
    with pytest.raises(LayoutError, match="one weight per device"):
        split_rows(64, 2, 8, weights=[1.0])
    with pytest.raises(LayoutError, match="positive"):
        split_rows(64, 2, 8, weights=[1.0, 0.0])
    with pytest.raises(LayoutError):
        split_rows(0, 1)
    with pytest.raises(LayoutError):
        split_rows(8, 0)
    assert issubclass(LayoutError, ValueError)


def test_plan_without_cfg_parallel() -> None:
    plan = ParallelPlan(world_size=3, cfg_parallel=False)
    assert plan.batch_groups == 1 and plan.bands_per_group == 3
    assert [plan.coords(r) for r in range(3)] == [(0, 0), (0, 1), (0, 2)]
    assert plan.band_ranks(0) == [0, 1, 2]
    assert plan.peer_ranks(1) == [1]
    with pytest.raises(LayoutError):
        plan.coords(3)
    with pytest.raises(LayoutError):
        plan.band_ranks(1)


def test_plan_with_cfg_parallel() -> None:
    plan = ParallelPlan(world_size=6, cfg_parallel=True)
    assert plan.batch_groups == 2 and plan.bands_per_group == 3
    assert [plan.coords(r) for r in range(6)] == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2)]
    assert plan.band_ranks(0) == [0, 1, 2] and plan.band_ranks(1) == [3, 4, 5]
    assert plan.peer_ranks(0) == [0, 3] and plan.peer_ranks(2) == [2, 5]
    for r in range(6):
        g, b = plan.coords(r)
        assert plan.band_ranks(g)[b] == r and r in plan.peer_ranks(b)
    two = ParallelPlan(2, True)
    assert two.batch_groups == 2 and two.bands_per_group == 1 and two.peer_ranks(0) == [0, 1]
    one = ParallelPlan(1, True)
    assert one.batch_groups == 1 and one.band_ranks(0) == [0]


def test_plan_rejects_odd_cfg_parallel() -> None:
    with pytest.raises(LayoutError, match="even number of devices or turn CFG parallel off"):
        ParallelPlan(3, True)
    with pytest.raises(LayoutError):
        ParallelPlan(0)
