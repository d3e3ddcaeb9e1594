"""Sequence-parallel attention over image-token bands: gathered keys/values and Ulysses.

Every rank holds a band of the image tokens, and the same ``prefix`` tokens (text, in joint attention)
before them. Tensors here are ``(B, L, H, D)``: L = prefix + this band's image tokens, H heads of D.
``attend(q, k, v)`` is the model's own attention on such tensors (any head count, query and key lengths
may differ) and returns ``(B, Lq, H', D)``.

* ``gathered_kv_attention``: this band's queries against the keys / values of every band (all-gather,
  any number of ranks, uneven bands; DistriFusion's exact mode, and the base of the stale modes).
* ``ulysses_attention``: DeepSpeed-Ulysses. An all-to-all turns "my tokens, all heads" into "all
  tokens, my heads", each rank attends over the whole sequence for H/N heads, and a second all-to-all
  turns the result back. Per rank it moves 4 x (N-1)/N of its band's q/k/v/out instead of receiving the
  (N-1) other bands' k/v: fewer bytes for N > 2. Needs H divisible by N.

Both give the single-device attention up to float rounding (the same keys, in band order).
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from .comm import BandGroup
from .ring_attention import ring_attention

__all__ = ["gathered_kv_attention", "ring_kv_attention", "ulysses_attention", "ulysses_applies"]

Attend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def ulysses_applies(heads: int, bands: int) -> bool:
    return bands > 1 and heads % bands == 0


def _image_kv(k: torch.Tensor, v: torch.Tensor, prefix: int) -> tuple[torch.Tensor, int, int]:
    """This band's image K|V as one (B, L_img, 2 * H * D) tensor (the exchange format)."""
    b, _, h, d = k.shape
    kv = torch.cat([k[:, prefix:], v[:, prefix:]], dim=2)  # (B, L_img, 2H, D)
    return kv.reshape(b, -1, 2 * h * d), h, d


def gathered_kv_attention(attend: Attend, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prefix: int,
                          band: BandGroup, sizes: Sequence[int], exchange=None) -> torch.Tensor:
    """This band's queries against [prefix K/V, every band's image K/V in band order].

    ``sizes``: every band's image token count. ``exchange(k_img, v_img) -> (k_all, v_all)`` replaces the
    fresh all-gather (the stale engine's displaced / partial K/V, on (B, L, H * D) tensors)."""
    b, _, h, d = k.shape
    if exchange is not None:
        k_img = k[:, prefix:].reshape(b, -1, h * d)
        v_img = v[:, prefix:].reshape(b, -1, h * d)
        k_all, v_all = exchange(k_img, v_img)
        k_all, v_all = k_all.view(b, -1, h, d), v_all.view(b, -1, h, d)
    else:
        kv, _, _ = _image_kv(k, v, prefix)
        full = band.gather_tokens(kv, dim=1, kind="kv", sizes=list(sizes)).view(b, -1, 2 * h, d)
        k_all, v_all = full[:, :, :h], full[:, :, h:]
    if prefix:
        k_all = torch.cat([k[:, :prefix], k_all], dim=1)
        v_all = torch.cat([v[:, :prefix], v_all], dim=1)
    return attend(q, k_all, v_all)


def ring_kv_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prefix: int, band: BandGroup,
                      sizes: Sequence[int]) -> torch.Tensor:
    """``gathered_kv_attention``'s result with the exchange overlapped (ring_attention.py): this band's
    queries attend to [prefix + own image K/V] while the other bands' image K/V travel, then to each band's
    block as it arrives; the blocks merge by online softmax. Only where ``lse_attention_available``."""
    b, _, h, d = k.shape
    kv, _, _ = _image_kv(k, v, prefix)
    out = ring_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), kv, band,
                         [(b, int(s), kv.shape[-1]) for s in sizes],
                         lambda kv_j: tuple(t.transpose(1, 2) for t in kv_j.view(b, -1, 2 * h, d).split(h, dim=2)))
    return out.transpose(1, 2)


def ulysses_attention(attend: Attend, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prefix: int,
                      band: BandGroup, sizes: Sequence[int]) -> torch.Tensor:
    """Ulysses all-to-all attention; same result as ``gathered_kv_attention`` (heads must divide by N)."""
    n, me = band.size, band.index
    b, _, h, d = q.shape
    if h % n:
        raise ValueError(f"Ulysses attention splits the {h} heads over {n} devices; {h} is not divisible by {n}")
    g = h // n
    qkv = torch.stack([q[:, prefix:], k[:, prefix:], v[:, prefix:]])  # (3, B, L_img, H, D)
    chunks = [qkv[:, :, :, j * g:(j + 1) * g] for j in range(n)]
    got = band.all_to_all(chunks, [(3, b, sizes[j], g, d) for j in range(n)], kind="kv")
    full = torch.cat(got, dim=2)  # (3, B, L_all, g, D): every band's tokens, this rank's heads
    heads = slice(me * g, (me + 1) * g)
    if prefix:
        pre = torch.stack([q[:, :prefix, heads], k[:, :prefix, heads], v[:, :prefix, heads]])
        full = torch.cat([pre, full], dim=2)
    out = attend(full[0], full[1], full[2])  # (B, prefix + L_all, g, D)
    offs = [prefix + sum(sizes[:j]) for j in range(n + 1)]
    back = band.all_to_all([out[:, offs[j]:offs[j + 1]] for j in range(n)],
                           [(b, sizes[me], g, d)] * n, kind="output")
    img = torch.cat(back, dim=2)  # (B, L_img, H, D): heads in rank order
    if not prefix:
        return img
    pre_out = band.gather_tokens(out[:, :prefix].contiguous(), dim=2, kind="output", sizes=[g] * n)
    return torch.cat([pre_out, img], dim=1)
