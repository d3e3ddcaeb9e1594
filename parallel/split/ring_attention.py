"""Exact self-attention over every band's keys and values that overlaps the K/V exchange with compute.

Each band starts sending its K/V to the others, attends to its OWN block while they travel, then to each
other band's block as it arrives, and merges the partial results with a streaming (online) softmax:
for partial outputs O_i with log-sum-exp L_i over disjoint key blocks,
    L = log(sum_i exp(L_i)),  O = sum_i exp(L_i - L) * O_i,
which is softmax attention over the union of the blocks (Milakov & Gimelshein 2018, "Online normalizer
calculation for softmax"; the merge of ring attention, Liu et al. 2023). Equal to attention over the
gathered K/V up to float rounding.

The partial attentions need each block's log-sum-exp, which ComfyUI's attention functions do not return:
they come from PyTorch's own scaled-dot-product kernels (those ComfyUI's ``pytorch`` attention dispatches
to). ``lse_attention_available`` says when that computes what the user's ComfyUI would up to float rounding
(its backend is one of the plain softmax ones: pytorch, sub-quadratic, split, basic); with xformers, flash,
sage (quantized) or an attention override the callers gather K/V and use the user's function unchanged.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch

from .comm import BandGroup

__all__ = ["attention_lse", "merge_partials", "lse_attention_available", "ring_attention",
           "overlapped_kv_attention"]


def _acc(t: torch.Tensor) -> torch.dtype:
    """The dtype partial results are combined in: float32, or float64 for float64 inputs."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _math_attention_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    ct = _acc(q)
    scale = q.shape[-1] ** -0.5
    s = torch.matmul(q.to(ct), k.to(ct).transpose(-2, -1)) * scale
    lse = torch.logsumexp(s, dim=-1)
    out = torch.matmul(torch.exp(s - lse.unsqueeze(-1)), v.to(ct))
    return out.to(q.dtype), lse


def attention_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention of (B, H, Lq, D) queries over (B, H, Lk, D) keys / values: (output (B, H, Lq, D),
    log-sum-exp (B, H, Lq) in float32). PyTorch's flash kernels where they apply, exact math otherwise."""
    try:
        if q.device.type == "cpu" and q.dtype != torch.float64:
            out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, False)[:2]
            return out, lse.float()
        if q.device.type == "cuda":
            if q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] <= 256:
                out, lse = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, False)[:2]
            else:
                out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, None, True)[:2]
            return out, lse.float()[..., : q.shape[-2]]
    except (RuntimeError, AttributeError, NotImplementedError):
        pass
    return _math_attention_lse(q, k, v)


def merge_partials(parts: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """Attention over the union of disjoint key blocks from each block's (output, log-sum-exp)."""
    out0, lse = parts[0]
    ct = _acc(out0)
    acc, lse = out0.to(ct), lse.to(ct)
    for out, lse_j in parts[1:]:
        lse_j = lse_j.to(ct)
        new = torch.logaddexp(lse, lse_j)
        acc = acc * torch.exp(lse - new).unsqueeze(-1) + out.to(ct) * torch.exp(lse_j - new).unsqueeze(-1)
        lse = new
    return acc.to(out0.dtype)


# ComfyUI's attention functions that compute plain softmax attention (fused, chunked or split): the
# overlapped path computes the same up to float rounding. Quantized (sage) or external kernels keep theirs.
_EXACT_BACKENDS = ("attention_pytorch", "attention_sub_quad", "attention_split", "attention_basic")


def _exact_backends() -> frozenset:
    """ComfyUI's plain-softmax attention functions, wrapped and unwrapped (looked up once: ComfyUI picks its
    backend at import, before any model runs)."""
    global _EXACT_FUNCS
    if _EXACT_FUNCS is None:
        from comfy.ldm.modules import attention

        found = set()
        for name in _EXACT_BACKENDS:
            f = getattr(attention, name, None)
            found |= {f, getattr(f, "__wrapped__", None)} - {None}
        _EXACT_FUNCS = frozenset(found)
    return _EXACT_FUNCS


_EXACT_FUNCS: frozenset | None = None


def lse_attention_available(q: torch.Tensor, transformer_options: dict | None = None, func: Any = None) -> bool:
    """Whether the overlapped path computes what the user's ComfyUI would: its attention function (``func``,
    the one a model called, else ComfyUI's ``optimized_attention``) is a plain softmax one, no override is
    installed, and the dtype is one the kernels take as ComfyUI would."""
    try:
        from comfy.ldm.modules import attention
    except ImportError:
        return False
    if (func if func is not None else attention.optimized_attention) not in _exact_backends():
        return False
    if transformer_options and transformer_options.get("optimized_attention_override") is not None:
        return False
    if q.device.type == "cpu":
        return q.dtype in (torch.float32, torch.bfloat16)
    return q.device.type == "cuda" and q.dtype in (torch.float16, torch.bfloat16, torch.float32)


def ring_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, send: torch.Tensor, band: BandGroup,
                   shapes: Sequence[Sequence[int]], split: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
                   kind: str = "kv") -> torch.Tensor:
    """The ring loop both splits share, on (B, H, L, D) tensors: ``send`` (this band's K/V in the exchange
    format, received blocks of ``shapes``) starts travelling to every other band, ``q`` attends to its own
    ``k`` / ``v`` meanwhile, then to each band's block as it arrives (``split`` turns a received block into
    (B, H, L, D) keys and values), and the blocks merge by online softmax. Returns (B, H, Lq, D)."""
    pending = band.start_peer_exchange(send, shapes, kind=kind)
    parts = [attention_lse(q, k, v)]  # own block while the others travel
    for j in range(band.size):
        if j != band.index:
            parts.append(attention_lse(q, *split(pending.wait(j))))
    return merge_partials(parts)


def overlapped_kv_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, band: BandGroup,
                            sizes: Sequence[int], kind: str = "kv") -> torch.Tensor:
    """This band's rows of self-attention over every band's tokens, ring style: (B, L, H*D) in and out
    (ComfyUI's layout), ``sizes`` every band's token count. K and V travel together, point to point."""
    b, n, inner = q.shape
    d = inner // heads

    def heads_first(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(b, t.shape[1], heads, d).transpose(1, 2)

    kv = torch.cat([k, v], dim=-1)
    out = ring_attention(heads_first(q), heads_first(k), heads_first(v), kv, band,
                         [(b, int(s), kv.shape[-1]) for s in sizes],
                         lambda kv_j: (heads_first(kv_j[..., :inner]), heads_first(kv_j[..., inner:])), kind)
    return out.transpose(1, 2).reshape(b, n, inner)
