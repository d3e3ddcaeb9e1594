"""Exact row-band versions of the layers that see across band boundaries.

Each function takes this rank's band of an activation (rows along dim -2) and a ``BandGroup``
and returns this band's part of what the layer computes on the whole image, equal to the
single-device result up to float rounding. All ranks of the group call them in the same order
(SPMD). Levels of a UNet are handled from the local tensor's height: the caller passes the
band tensor as it flows through the model and never tracks the downsampling factor.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from .comm import BandGroup

__all__ = [
    "ConvGeometry",
    "band_conv2d",
    "band_conv_geometry",
    "band_group_norm",
    "band_kv",
    "band_slice",
    "conv_band_rows",
    "conv_band_rows_overlapped",
    "conv_halo_rows",
    "group_norm_from_sums",
    "group_norm_sums",
]


def _pair(v: int | Sequence[int], name: str) -> tuple[int, int]:
    if isinstance(v, int):
        return v, v
    v = tuple(int(i) for i in v)
    if len(v) != 2:
        raise NotImplementedError(f"band_conv2d handles 2-d convolutions; got {name}={v}")
    return v  # type: ignore[return-value]


def _resolve_padding(padding: int | Sequence[int] | str, k_eff: tuple[int, int]) -> tuple[int, int]:
    if isinstance(padding, str):
        if padding == "valid":
            return 0, 0
        if padding == "same" and k_eff[0] % 2 and k_eff[1] % 2:
            return (k_eff[0] - 1) // 2, (k_eff[1] - 1) // 2
        raise NotImplementedError(
            f"band_conv2d supports padding='valid', padding='same' with odd kernels, or integers; got {padding!r} "
            f"with effective kernel {k_eff}"
        )
    return _pair(padding, "padding")


def conv_halo_rows(kernel_h: int, stride_h: int, padding_h: int, dilation_h: int = 1) -> tuple[int, int]:
    """(rows from the previous band, rows from the next band) that a conv needs.

    Output row o reads input rows ``o*stride - pad .. o*stride - pad + k_eff - 1``; a band
    whose height is a multiple of the stride therefore needs ``pad`` rows above and
    ``k_eff - pad - stride`` below (none when negative).
    """
    k_eff = dilation_h * (kernel_h - 1) + 1
    return padding_h, max(0, k_eff - padding_h - stride_h)


@dataclass(frozen=True)
class ConvGeometry:
    """What a band needs to know to run one conv on its rows: the conv's arguments with padding
    resolved, and the halo rows it needs from the previous (``top``) and next (``bottom``) band."""

    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    groups: int
    top: int
    bottom: int


def band_conv_geometry(
    x: torch.Tensor,
    weight: torch.Tensor,
    stride: int | Sequence[int],
    padding: int | Sequence[int] | str,
    dilation: int | Sequence[int],
    groups: int,
    band: BandGroup,
    full_height: int | None = None,
    padding_mode: str = "zeros",
) -> ConvGeometry:
    """Check that a conv can run on this band's rows and resolve its geometry (see ``band_conv2d``)."""
    if padding_mode != "zeros":
        raise NotImplementedError(
            f"band_conv2d supports padding_mode='zeros' only, got {padding_mode!r} "
            f"(wrap-around padding, e.g. seamless tiling, is not split across bands); run this model on one device"
        )
    if x.dim() != 4 or weight.dim() != 4:
        raise NotImplementedError(
            f"band_conv2d handles 4-d (B, C, H, W) inputs and weights; got {tuple(x.shape)} and {tuple(weight.shape)}"
        )
    sh, sw = _pair(stride, "stride")
    dh, dw = _pair(dilation, "dilation")
    kh, kw = weight.shape[-2:]
    k_eff = (dh * (kh - 1) + 1, dw * (kw - 1) + 1)
    ph, pw = _resolve_padding(padding, k_eff)
    h = x.shape[-2]

    heights = band.level_heights(h, full_height)
    if full_height is not None and heights is not None and sum(heights) != full_height:
        raise ValueError(
            f"band {band.index} has {h} rows, which does not fit a full height of {full_height} rows "
            f"for bands {band.bands}"
        )
    # Band starts must stay on the stride grid, or output rows would not split at band edges.
    bad = [j for j, hj in enumerate(heights[:-1]) if hj % sh] if heights is not None else []
    if (not band.is_last and h % sh) or bad:
        j = band.index if not bad else bad[0]
        hj = h if not bad else heights[j]  # type: ignore[index]
        raise ValueError(
            f"band {j} has {hj} rows at this level, not a multiple of the conv stride {sh}; "
            f"split the latent with an alignment that covers every downsampling of the model"
        )
    top, bottom = conv_halo_rows(kh, sh, ph, dh)
    return ConvGeometry((sh, sw), (ph, pw), (dh, dw), int(groups), top, bottom)


def conv_band_rows(
    x: torch.Tensor,
    above: torch.Tensor | None,
    below: torch.Tensor | None,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    geo: ConvGeometry,
    band: BandGroup,
) -> torch.Tensor:
    """This band's output rows of a conv, given the halo rows (None: zeros, as at an image edge).

    The halo rows may come from anywhere: a fresh exchange (exact), the previous step (displaced),
    or the full input every rank holds."""
    y = _padded_band_conv(x, weight, bias, geo, band)
    if y is None:
        return _stacked_band_conv(x, above, below, weight, bias, geo, band)
    return _add_halo_terms(y, x, above, below, weight, geo, band)


def conv_band_rows_overlapped(
    x: torch.Tensor,
    pending: Any,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    geo: ConvGeometry,
    band: BandGroup,
) -> torch.Tensor:
    """``conv_band_rows`` with the halo still in flight (``pending.wait()`` gives (above, below)): the
    band's rows are convolved while the halo travels, the halo's terms are added to the border rows once
    it is here."""
    y = _padded_band_conv(x, weight, bias, geo, band)
    above, below = pending.wait()
    if y is None:
        return _stacked_band_conv(x, above, below, weight, bias, geo, band)
    return _add_halo_terms(y, x, above, below, weight, geo, band)


def _out_rows(h: int, weight: torch.Tensor, geo: ConvGeometry, band: BandGroup) -> tuple[int, int]:
    """(this band's output rows, effective kernel height)."""
    sh = geo.stride[0]
    k_eff = geo.dilation[0] * (weight.shape[-2] - 1) + 1
    if not band.is_last:
        return h // sh, k_eff
    return (geo.top + h + geo.padding[0] - k_eff) // sh + 1, k_eff


def _padded_band_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, geo: ConvGeometry,
                      band: BandGroup) -> torch.Tensor | None:
    """The conv of the band alone, zero rows in place of the halo (as if the band were the image): every
    output row not reading a halo row is final. None when that gives another number of rows than the band's
    (a geometry where the zero padding does not line up with the halo)."""
    n_out, k_eff = _out_rows(x.shape[-2], weight, geo, band)
    if geo.top != geo.padding[0] or (x.shape[-2] + 2 * geo.padding[0] - k_eff) // geo.stride[0] + 1 != n_out:
        return None
    return F.conv2d(x, weight, bias, geo.stride, geo.padding, geo.dilation, geo.groups)


def _add_halo_terms(y: torch.Tensor, x: torch.Tensor, above: torch.Tensor | None, below: torch.Tensor | None,
                    weight: torch.Tensor, geo: ConvGeometry, band: BandGroup) -> torch.Tensor:
    """``y`` (from ``_padded_band_conv``) plus, in place on its border rows, what the halo rows add: a conv
    is linear, so the halo's contribution is the conv (no bias) of the halo rows with zeros elsewhere. Only
    a few rows are computed and nothing of the band's size is copied."""
    h = x.shape[-2]
    sh = geo.stride[0]
    top = geo.top
    n_out, k_eff = _out_rows(h, weight, geo, band)
    shape = list(x.shape)

    def conv(rows: torch.Tensor) -> torch.Tensor:
        return F.conv2d(rows, weight, None, geo.stride, (0, geo.padding[1]), geo.dilation, geo.groups)

    # padded rows: [top halo | band (h) | bottom halo]; output o reads rows [o*sh, o*sh + k_eff)
    lo = min(n_out, -(-top // sh))  # outputs [0, lo) read the top halo
    if above is not None and lo > 0:
        span = (lo - 1) * sh + k_eff
        rows = above[..., :span, :] if span <= top else \
            torch.cat([above, x.new_zeros(shape[:-2] + [span - top, shape[-1]])], dim=-2)
        y[..., :lo, :] += conv(rows)
    need = (n_out - 1) * sh + k_eff - (top + h)  # rows below the band the last outputs read
    if below is not None and not band.is_last and need > 0:
        hi = max(0, (top + h - k_eff) // sh + 1)  # outputs [hi, n_out) read the bottom halo
        lead = top + h - hi * sh
        rows = torch.cat([x.new_zeros(shape[:-2] + [lead, shape[-1]]), below[..., :need, :]], dim=-2)
        y[..., hi:, :] += conv(rows)
    return y


def _stacked_band_conv(x: torch.Tensor, above: torch.Tensor | None, below: torch.Tensor | None,
                       weight: torch.Tensor, bias: torch.Tensor | None, geo: ConvGeometry,
                       band: BandGroup) -> torch.Tensor:
    """The conv of [halo | band | halo] stacked (copies the band; for geometries _padded_band_conv refuses)."""
    h = x.shape[-2]
    shape = list(x.shape)
    parts = []
    if geo.top:
        parts.append(above if above is not None else x.new_zeros(shape[:-2] + [geo.top, shape[-1]]))
    parts.append(x)
    if geo.bottom:
        parts.append(below if below is not None else x.new_zeros(shape[:-2] + [geo.bottom, shape[-1]]))
    xh = torch.cat(parts, dim=-2) if len(parts) > 1 else x
    sh = geo.stride[0]
    ph, pw = geo.padding
    if band.is_last:
        # The image's own bottom edge: exactly ph zero rows, whatever the neighbours exchanged.
        xh = xh[..., : geo.top + h, :]
        if ph:
            xh = F.pad(xh, (0, 0, 0, ph))
    y = F.conv2d(xh, weight, bias, geo.stride, (0, pw), geo.dilation, geo.groups)
    if not band.is_last:
        y = y[..., : h // sh, :]
    return y


def band_conv2d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    stride: int | Sequence[int],
    padding: int | Sequence[int] | str,
    dilation: int | Sequence[int],
    groups: int,
    band: BandGroup,
    full_height: int | None = None,
    *,
    padding_mode: str = "zeros",
    kind: str = "halo",
) -> torch.Tensor:
    """This band's rows of ``F.conv2d(full_x, weight, bias, stride, padding, dilation, groups)``.

    Band ``[s, e)`` of the input gives output rows ``[s/stride, e/stride)``; the last band
    runs to the full output height ``floor((H + 2p - k_eff)/stride) + 1``, which follows from
    its own height because its start is a multiple of the stride. Halo rows come from the
    neighbours at the same level; zero rows stand in at the image edges. ``full_height``
    (the whole input's height at this level), when known, is checked against the bands.
    Arguments mirror ``nn.Conv2d``'s attributes; only zeros padding is supported.
    """
    geo = band_conv_geometry(x, weight, stride, padding, dilation, groups, band, full_height, padding_mode)
    if band.size == 1:
        return F.conv2d(x, weight, bias, geo.stride, geo.padding, geo.dilation, geo.groups)
    above, below = band.halo_parts(x, geo.top, geo.bottom, kind=kind)
    return conv_band_rows(x, above, below, weight, bias, geo, band)


def group_norm_sums(x: torch.Tensor, num_groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(x grouped as (B, G, -1) in the compute dtype, this band's float64 [sum (B*G), sum of squares
    (B*G), count]). Local statistics come from ``var_mean`` (two-pass, stable) and are turned into
    sums in float64, so no float64 copy of the activation is made."""
    b, c = x.shape[:2]
    if c % num_groups:
        raise ValueError(f"{c} channels do not split into {num_groups} groups")
    compute = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
    xg = x.reshape(b, num_groups, -1).to(compute)
    n_local = xg.shape[-1]
    var, mean = torch.var_mean(xg, dim=-1, correction=0)
    mean64, var64 = mean.double(), var.double()
    count = torch.full((1,), float(n_local), dtype=torch.float64, device=x.device)
    return xg, torch.cat([(mean64 * n_local).flatten(), ((var64 + mean64 * mean64) * n_local).flatten(), count])


def group_norm_from_sums(
    x: torch.Tensor,
    xg: torch.Tensor,
    total: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    local: torch.Tensor | None = None,
) -> torch.Tensor:
    """Normalise this band with whole-image sums ``total`` (layout of ``group_norm_sums``).

    ``local`` (this band's own sums) is the fallback where ``total`` gives a negative variance,
    which happens when ``total`` mixes statistics of different steps (displaced mode); without
    it the variance is clamped at 0 (exact sums can only go negative by rounding)."""
    b, groups = xg.shape[:2]
    k = b * groups
    n = total[-1]
    full_mean = total[:k] / n
    full_var = total[k : 2 * k] / n - full_mean * full_mean
    if local is not None:
        own_mean = local[:k] / local[-1]
        own_var = (local[k : 2 * k] / local[-1] - own_mean * own_mean).clamp_min(0)
        full_var = torch.where(full_var < 0, own_var, full_var)
    full_var = full_var.clamp_min(0)
    rstd = torch.rsqrt(full_var + eps)
    # y = (x - mean) * rstd * weight + bias = x * scale + shift, per (sample, channel): one pass over x
    # (addcmul) instead of four, which matters where activations are memory-bound (CPU)
    c = x.shape[1]
    per = c // groups
    scale = rstd.view(b, groups, 1).expand(b, groups, per).reshape(b, c)
    shift = -full_mean.view(b, groups, 1).expand(b, groups, per).reshape(b, c) * scale
    if weight is not None:
        w = weight.double().view(1, c)
        scale, shift = scale * w, shift * w
    if bias is not None:
        shift = shift + bias.double().view(1, c)
    compute = xg.dtype
    shape = [b, c] + [1] * (x.dim() - 2)
    y = torch.addcmul(shift.to(compute).view(shape), xg.view(x.shape), scale.to(compute).view(shape))
    return y.to(x.dtype)


def band_group_norm(
    x: torch.Tensor,
    num_groups: int,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    band: BandGroup,
    kind: str = "groupnorm",
) -> torch.Tensor:
    """``F.group_norm`` over the whole image, applied to this band.

    Each band computes per-(sample, group) count, sum and sum of squares; these are summed
    over the group in float64 (one all_reduce) and give the full mean and biased variance.
    """
    if band.size == 1:
        return F.group_norm(x, num_groups, weight, bias, eps)  # bitwise the unsplit model
    xg, stats = group_norm_sums(x, num_groups)
    stats = band.all_reduce_sum(stats, kind=kind)
    return group_norm_from_sums(x, xg, stats, weight, bias, eps)


def band_kv(
    k: torch.Tensor,
    v: torch.Tensor,
    band: BandGroup,
    dim: int = 1,
    sizes: Sequence[int] | None = None,
    kind: str = "kv",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values of all bands, tokens concatenated along ``dim`` in band order.

    Queries of this band attending to the result give exactly this band's rows of full
    self-attention. k and v travel in one collective (concatenated along the last dim) when
    their shapes allow; ``sizes`` (every band's token count) saves the size exchange.
    """
    if band.size == 1:
        return k, v
    dim = dim % k.dim()
    if k.shape[:-1] == v.shape[:-1] and k.dtype == v.dtype and dim != k.dim() - 1:
        kv = band.gather_tokens(torch.cat([k, v], dim=-1), dim=dim, kind=kind, sizes=sizes)
        return kv[..., : k.shape[-1]], kv[..., k.shape[-1] :]
    if sizes is None:
        sizes = band.exchange_sizes(k.shape[dim], k.device, kind)
    return (
        band.gather_tokens(k, dim=dim, kind=kind, sizes=sizes),
        band.gather_tokens(v, dim=dim, kind=kind, sizes=sizes),
    )


def band_slice(x_full: torch.Tensor, band: BandGroup, factor: int | None = None) -> torch.Tensor:
    """This band's rows (dim -2) of a full tensor at any level.

    At a level downsampled by ``factor`` the band holds rows ``[s/f, e/f)``, or ``[s/f, end)``
    for the last band (the ceil rule of stride-2 convolutions). ``factor`` is found from the
    tensor's height when not given; a ValueError asks for it when the height is ambiguous.
    """
    hx = x_full.shape[-2]
    s, e = band.rows
    h0 = band.full_height
    if factor is None:
        if hx == h0:
            factor = 1
        else:
            inner = band.heights[:-1]
            cands = [f for f in range(1, h0 + 1) if -(-h0 // f) == hx and all(r % f == 0 for r in inner)]
            picks = {(s // f, None if band.is_last else e // f) for f in cands}
            if len(picks) != 1:
                raise ValueError(
                    f"a tensor of {hx} rows does not identify a level of bands {band.bands}; pass factor="
                )
            factor = cands[0]
    f = int(factor)
    if s % f or (not band.is_last and e % f) or -(-h0 // f) != hx:
        raise ValueError(f"bands {band.bands} do not split a {hx}-row tensor at downsampling factor {f}")
    return x_full[..., s // f : (hx if band.is_last else e // f), :]
