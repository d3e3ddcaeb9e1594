"""Token grids and bands of DiT latents (parallel/split/tokens.py): pure tensor code, no ComfyUI."""
from __future__ import annotations

import pytest
import torch

from hires_parallel.parallel.split.layout import LayoutError
from hires_parallel.parallel.split.tokens import (TokenGrid, assemble, choose_axis, cut_tokens, split_units,
                                                  token_grid)


def _ids(grid: TokenGrid, prefix: int = 0) -> torch.Tensor:
    """(1, prefix + tokens, 3): every token's (frame, row, col) in the model's order; the prefix is -1."""
    f, r, c = torch.meshgrid(torch.arange(grid.frames), torch.arange(grid.rows), torch.arange(grid.cols), indexing="ij")
    img = torch.stack([f, r, c], -1).reshape(1, -1, 3)
    return torch.cat([torch.full((1, prefix, 3), -1), img], 1)


@pytest.mark.parametrize("shape,patch,n,axis,units", [
    ((1, 16, 22, 16), (1, 2, 2), 2, "rows", 11),          # odd token rows: uneven bands
    ((1, 16, 23, 16), (1, 2, 2), 3, "rows", 12),          # padded to the patch: ceil
    ((1, 16, 5, 12, 12), (1, 2, 2), 2, "rows", 6),         # 5 frames / 2 splits worse than 6 rows / 2
    ((1, 16, 4, 12, 12), (1, 2, 2), 2, "frames", 4),       # a tie: frames (contiguous)
    ((1, 16, 2, 10, 12), (1, 2, 2), 3, "rows", 5),         # 2 frames < 3 devices: rows
])
def test_grid_and_axis(shape, patch, n, axis, units) -> None:
    g = token_grid(shape, patch, n)
    print(f"  {shape} patch {patch} over {n}: {g}")
    assert (g.axis, g.units) == (axis, units)
    bands = split_units(g, n)
    assert bands[0][0] == 0 and bands[-1][1] == units and all(e > s for s, e in bands)


def test_too_few_units_is_a_clear_error() -> None:
    with pytest.raises(LayoutError, match="at most 3 devices"):
        token_grid((1, 16, 6, 16), (1, 2, 2), 4)
    with pytest.raises(LayoutError, match="cannot be split over 4 devices"):
        choose_axis(2, 3, 4)


@pytest.mark.parametrize("grid", [TokenGrid(1, 7, 5), TokenGrid(4, 3, 2, "frames"), TokenGrid(3, 5, 2, "rows")])
@pytest.mark.parametrize("prefix", [0, 3])
def test_cut_then_assemble_is_the_identity(grid: TokenGrid, prefix: int) -> None:
    ids = _ids(grid, prefix)
    bands = split_units(grid, 3 if grid.units >= 3 else 2)
    parts = [cut_tokens(ids, 1, grid, s, e, prefix) for s, e in bands]
    for (s, e), p in zip(bands, parts):
        assert torch.equal(p[:, :prefix], ids[:, :prefix])  # the text prefix rides along whole
        img = p[:, prefix:]
        axis = 0 if grid.axis == "frames" else 1
        assert img[0, :, axis].min() == s and img[0, :, axis].max() == e - 1, "a band holds its rows / frames only"
        assert img.shape[1] == (e - s) * grid.width
        # split-axis-major: each unit's tokens are consecutive
        assert torch.equal(img[0, :, axis], torch.arange(s, e).repeat_interleave(grid.width))
    back = assemble([p[:, prefix:] for p in parts], 1, grid)
    assert torch.equal(back, ids[:, prefix:]), "assemble must restore the model's token order"


def test_cut_refuses_a_wrong_token_count() -> None:
    with pytest.raises(RuntimeError, match="expected 0 \\+ 35 tokens"):
        cut_tokens(torch.zeros(1, 34, 2), 1, TokenGrid(1, 7, 5), 0, 3)
