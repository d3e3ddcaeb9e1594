"""Ring attention's pieces (parallel/split/ring_attention.py) against ComfyUI's attention, in process.

The merge of per-block (output, log-sum-exp) pairs is exact algebra: in float64 (the math path) it equals
attention over the union of the blocks to 1e-12. In float32 the kernels' own rounding is the noise: the merged
result is compared with ComfyUI's optimized_attention over all keys within 1e-5 x max|reference| (measured:
4.3e-6 absolute on values of a few units, about 1e-6 relative).
"""
from __future__ import annotations

import pytest
import torch

from hires_parallel.parallel.split import ring_attention as ra


def _qkv(dtype: torch.dtype, lq: int = 70, lk: int = 150, heads: int = 4, d: int = 16):
    g = torch.Generator().manual_seed(0)
    return tuple(torch.randn(2, heads, n, d, generator=g, dtype=dtype) * 2 for n in (lq, lk, lk))


def test_merge_of_blocks_is_attention_over_their_union_float64():
    q, k, v = _qkv(torch.float64)
    ref, _ = ra._math_attention_lse(q, k, v)
    cuts = [0, 20, 90, 150]  # uneven blocks, as uneven bands give
    parts = [ra._math_attention_lse(q, k[:, :, a:b], v[:, :, a:b]) for a, b in zip(cuts, cuts[1:])]
    assert (ra.merge_partials(parts) - ref).abs().max().item() < 1e-12
    assert (ra.merge_partials(parts[::-1]) - ref).abs().max().item() < 1e-12  # block order does not matter


def test_kernel_blocks_merged_equal_comfys_attention_float32():
    from comfy.ldm.modules import attention

    q, k, v = _qkv(torch.float32)
    b, h, lq, d = q.shape
    flat = [t.transpose(1, 2).reshape(b, t.shape[2], h * d) for t in (q, k, v)]
    ref = attention.optimized_attention(*flat, h).reshape(b, lq, h, d).transpose(1, 2)
    parts = [ra.attention_lse(q, k[:, :, :64], v[:, :, :64]), ra.attention_lse(q, k[:, :, 64:], v[:, :, 64:])]
    err = (ra.merge_partials(parts) - ref).abs().max().item()
    print(f"\nmerged kernel blocks vs ComfyUI's {attention.optimized_attention.__name__}: max err {err:.2e}")
    assert err <= 1e-5 * ref.abs().max().item()


@pytest.mark.parametrize("backend, expected", [("attention_pytorch", True), ("attention_sub_quad", True),
                                               ("attention_split", True), ("attention_basic", True),
                                               ("attention_sage", False), ("attention_xformers", False)])
def test_overlap_only_where_comfys_attention_is_plain_softmax(monkeypatch, backend, expected):
    from comfy.ldm.modules import attention

    fn = getattr(attention, backend, None)
    if fn is None:
        pytest.skip(f"this ComfyUI has no {backend}")
    monkeypatch.setattr(attention, "optimized_attention", fn)
    q = torch.zeros(1, 8, 16)
    assert ra.lse_attention_available(q) is expected
    assert ra.lse_attention_available(q, func=getattr(fn, "__wrapped__", fn)) is expected  # as a model calls it
    assert ra.lse_attention_available(q, {"optimized_attention_override": object()}) is False
    assert ra.lse_attention_available(q.half()) is False  # CPU fp16: ComfyUI would upcast, the kernel would not
