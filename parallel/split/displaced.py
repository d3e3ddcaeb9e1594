"""Displaced (DistriFusion) and partial (PCPP) patch parallelism: reuse last step's neighbour data.

Exact mode waits, at every layer, for what the other bands compute at that layer. Between two
denoising steps the activations change little, so after ``warmup`` exact steps each band can use
what the others sent during the PREVIOUS step and send its own fresh data for the NEXT step in the
background:

* conv halos: the neighbours' boundary rows of the previous step (point-to-point);
* GroupNorm (``corrected``): the other bands' sums of the previous step plus this band's fresh sums;
  where that gives a negative variance, this band's own variance is used (DistriFusion's fallback).
  ``sync`` keeps GroupNorm exact and blocking (cheap in bytes; the fix for black images at low
  resolution);
* self-attention: fresh own K/V with the other bands' K/V of the previous step (``displaced``: every
  band, point-to-point with each), or only a window of the two neighbour bands, the ``fraction`` of each
  neighbour's rows nearest to this band (``partial``, PCPP: point-to-point, fewer bytes).

Steps are counted by distinct sigma of the UNet calls. A step may hold several calls (cond and uncond
in separate calls, a second evaluation of heun): each call slot keeps its own stale data, so slot k of a
step reuses slot k of the previous step. A call whose input shape or layout differs from what its slot
holds (and every call during warmup) runs exact and refills the slot.

SPMD: what travels is fixed by the band geometry, which every rank knows, so every rank registers the
same layers, cuts them into the same buckets and starts the same collectives in the same order. Buckets
live in buffers allocated once; a bucket's async exchange starts when its last layer has written, and is
waited for only when a layer of the next step reads it. Cross-attention is local to each band and uses
the conditioning of the current call, so no text K/V is cached here (timestep-ranged conds just work).

Memory kept per self-attention layer and call slot between steps (tests/support/stale_engine_cases.py
``kept_bytes`` measures it): displaced, the other bands' K/V ((N-1)/N of the image's K/V with even bands)
plus this band's own K/V in flight (1/N), i.e. one image's K/V, no padding; partial, the two neighbour
windows received plus this band's two edge windows sent (about 4 x fraction x band rows). An exact call
that records for the next step keeps compact copies of exactly what will be read (never views of the
gathered K/V); they move into the buckets bucket by bucket when the buckets are built, so the warmup
switch holds no second copy beyond one bucket. memory_plan.py estimates these bytes before a run.
"""
from __future__ import annotations

import math
import time as _time
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.distributed as dist

from .band_ops import ConvGeometry, conv_band_rows, group_norm_from_sums, group_norm_sums
from .comm import BandGroup, CommStats, batch_isend_irecv

__all__ = [
    "STALE_MODES",
    "GROUPNORM_POLICIES",
    "AUTO_WARMUP_FRACTION",
    "COMPOSITION_NOISE_LEVEL",
    "SYNC_GROUPNORM_MAX_AREA",
    "DEBUG_SWITCHES",
    "StaleOptions",
    "StepClock",
    "StaleEngine",
    "StaleCall",
    "noise_levels",
    "resolve_warmup",
    "resolve_groupnorm",
    "window_rows",
]

STALE_MODES = ("displaced", "partial")
GROUPNORM_POLICIES = ("auto", "corrected", "sync")
AUTO_WARMUP_FRACTION = 0.1  # DistriFusion: 4 extra exact steps after step 0 of 50
# Stale GroupNorm statistics are known to give black images at low resolution; at or below this many
# latent positions (128 x 128 = 1024 x 1024 pixels) "auto" keeps GroupNorm synchronous.
SYNC_GROUPNORM_MAX_AREA = 128 * 128
DEBUG_SWITCHES = ("", "zero_kv", "no_halo")  # tests only: break the stale data on purpose
_TAG_BASE = 1 << 10  # P2P tags of the buckets; the exact halo exchange uses tag 0


# Auto warmup also keeps exact every step that starts above this noise level (``noise_levels``: 1 = pure
# noise, 0 = clean), the phase in which a run from noise decides its composition. Measured on the shapes
# model (a trained SD1-class UNet, 2 ranks, euler / karras 16 steps, cfg 5, 8 seeds, worst image's pixel PSNR
# against one device; /tmp experiments reported with the change): from noise at 256x256 (latent 32x32) partial
# 0.3 gives 24.9 dB with warmup 2 (10%: stale from noise level 0.90), 30.6 with 4 (from 0.77), 35.0 with 5
# (0.69), 37.5 with 6 (0.59, what this level picks); displaced 30.3 / 30.8 / 36.5 / 38.9. From noise at 512x512
# (latent 64x64), warmup 2 -> 6: partial 20.5 -> 38.3 dB, displaced 22.9 -> 43.5 dB. Neither GroupNorm policy
# (sync 24.9, corrected 25.1 dB) nor the window (fraction 0.3: 24.9, 0.5: 24.0, 1.0: 30.3 dB = displaced)
# fixes it; the windowed attention costs little once the composition is set (fraction 1.0 for the first half of
# the schedule and 0.3 after it: 30.3 dB, as displaced). Passes that start below this level (the relay's
# second pass at 2x / 3x starts at timestep 500 / 600 of 1000) keep the 10% rule.
COMPOSITION_NOISE_LEVEL = 0.6


def noise_levels(model_sampling: Any, sigmas: Any) -> list[float]:
    """Noise level in [0, 1] of each sigma of a ComfyUI ``model_sampling`` (1 at its ``sigma_max``, 0 at its
    ``sigma_min``), measured on the model's own timestep scale (``timestep(sigma)``: 0..999 for SD-family
    EPS / v models, sigma x multiplier for flow models, 0.25 ln sigma for EDM), so one threshold means the
    same share of the noise schedule whatever the family. Pure apart from calling ``model_sampling``."""
    ts = model_sampling.timestep
    values = torch.as_tensor(sigmas, dtype=torch.float32).reshape(-1)
    lo = float(ts(torch.as_tensor(float(model_sampling.sigma_min))))
    hi = float(ts(torch.as_tensor(float(model_sampling.sigma_max))))
    span = hi - lo
    if not span > 0:
        return [1.0 for _ in range(values.numel())]
    return [min(1.0, max(0.0, (float(ts(v)) - lo) / span)) for v in values]


def resolve_warmup(warmup: int, steps: int, levels: Sequence[float] | None = None) -> int:
    """Exact steps before stale data is used: ``warmup`` when > 0, else (auto) the larger of 10% of
    ``steps`` (at least 1: the first step has no previous step to reuse) and, when ``levels`` (the noise
    level of each step's starting sigma, ``noise_levels(model_sampling, sigmas[:-1])``) is given, the
    leading steps above COMPOSITION_NOISE_LEVEL (at most ``steps``)."""
    if warmup > 0:
        return int(warmup)
    steps = max(1, int(steps))
    auto = max(1, math.ceil(AUTO_WARMUP_FRACTION * steps))
    if levels is not None:
        early = 0
        for level in list(levels)[:steps]:
            if float(level) <= COMPOSITION_NOISE_LEVEL:
                break
            early += 1
        auto = max(auto, early)
    return auto


def resolve_groupnorm(policy: str, height: int, width: int) -> str:
    """"corrected" or "sync" for a latent of ``height`` x ``width``; "auto" is sync on small latents."""
    if policy not in GROUPNORM_POLICIES:
        raise ValueError(f"groupnorm must be one of {GROUPNORM_POLICIES}; got {policy!r}")
    if policy == "auto":
        return "sync" if height * width <= SYNC_GROUPNORM_MAX_AREA else "corrected"
    return policy


def window_rows(fraction: float, rows: int) -> int:
    """Rows of a neighbour band of ``rows`` rows that a band attends to in partial mode: the
    ``fraction`` nearest to it, rounded up (any fraction > 0 keeps at least one row)."""
    return min(int(rows), math.ceil(float(fraction) * int(rows) - 1e-9)) if fraction > 0 else 0


@dataclass(frozen=True)
class StaleOptions:
    """How a displaced / partial run uses stale data. ``fraction_late`` (None: same as ``fraction``)
    applies to calls at sigma <= ``late_sigma``. ``buckets``: how many async exchanges each kind of
    traffic is cut into per call (more: earlier starts, more overlap; fewer: fewer messages)."""

    mode: str
    warmup: int = 1
    groupnorm: str = "corrected"
    fraction: float = 0.3
    fraction_late: float | None = None
    late_sigma: float | None = None
    buckets: int = 4
    debug: str = ""

    def __post_init__(self) -> None:
        if self.mode not in STALE_MODES:
            raise ValueError(f"stale mode must be one of {STALE_MODES}; got {self.mode!r}")
        if self.groupnorm not in ("corrected", "sync"):
            raise ValueError(f"groupnorm must be corrected or sync here (resolve auto first); got {self.groupnorm!r}")
        for name in ("fraction", "fraction_late"):
            f = getattr(self, name)
            if f is not None and not 0.0 <= f <= 1.0:
                raise ValueError(f"{name} must be between 0 and 1; got {f!r}")
        if self.warmup < 1 or self.buckets < 1:
            raise ValueError(f"warmup and buckets must be >= 1; got {self.warmup}, {self.buckets}")
        if self.debug not in DEBUG_SWITCHES:
            raise ValueError(f"debug must be one of {DEBUG_SWITCHES}; got {self.debug!r}")

    def fraction_at(self, sigma: float | None) -> float:
        if self.fraction_late is not None and self.late_sigma is not None and sigma is not None:
            if sigma <= self.late_sigma:
                return self.fraction_late
        return self.fraction


class StepClock:
    """Step and call slot of each UNet call: a new step starts when sigma changes."""

    def __init__(self) -> None:
        self.step = -1
        self.slot = 0
        self._sigma: float | None = None

    def tick(self, sigma: float | None) -> tuple[int, int]:
        if self.step < 0 or sigma != self._sigma:
            self.step += 1
            self.slot = 0
        else:
            self.slot += 1
        self._sigma = sigma
        return self.step, self.slot


# ------------------------------------------------------------------------------------ layers, buckets
class _Layer:
    """One layer's stale exchange: what it sends and receives (element counts, fixed by the geometry),
    where that lives in its bucket, and the data of an exact call until the first bucket launch."""

    def __init__(self, kind: str, spec: tuple, transport: str, dtype: torch.dtype, weight: int) -> None:
        self.kind = kind  # CommStats kind: "halo", "groupnorm", "kv"
        self.spec = spec  # checked on every call of the slot: the same layer sequence, the same shapes
        self.transport = transport  # "peers" (every other band) or "p2p" (neighbours)
        self.dtype = dtype
        self.weight = int(weight)  # rank-independent bytes, for cutting buckets identically everywhere
        self.peer_numel: list[int] = []  # peers: elements each band sends (own entry: what this band sends)
        self.p2p = (0, 0, 0, 0)  # p2p: elements sent to prev, to next, received from prev, from next
        self.saved: Any = None  # what an exact call recorded (compact copies), until moved into its bucket
        self.bucket: _Bucket | None = None
        self.offsets: tuple[int, ...] = (0, 0, 0, 0)  # peers: offset in each band's buffer; p2p: in the four


class _Bucket:
    """Consecutive layers of one transport and dtype whose exchange is one async operation.

    Memory: "peers" keeps one buffer per OTHER band (exactly its payload, no padding, none for this band)
    plus one send buffer of this band's payload; "p2p" keeps the neighbour windows only (two to send,
    two received). Nothing else of a layer stays alive between steps."""

    def __init__(self, transport: str, dtype: torch.dtype, layers: list[_Layer], band: BandGroup, device: Any,
                 tag: int) -> None:
        self.transport, self.dtype, self.layers, self.tag = transport, dtype, layers, tag
        self.works: list[Any] = []
        self.launched = 0.0  # when the last exchange of this bucket started (for the trace)
        self.filled = 0
        self.kind_bytes: dict[str, int] = {}
        if transport == "peers":
            me, n = band.index, band.size
            offs = [0] * n
            for lay in layers:
                lay.bucket, lay.offsets = self, tuple(offs)
                offs = [o + k for o, k in zip(offs, lay.peer_numel)]
            # recv[me] is empty: this band's own data lives in ``send`` (and in the caller's tensors).
            self.send = torch.zeros(offs[me], dtype=dtype, device=device)
            self.recv = [torch.zeros(0 if j == me else offs[j], dtype=dtype, device=device) for j in range(n)]
            size = self.send.element_size()
            for lay in layers:
                b = ((n - 1) * lay.peer_numel[me] + sum(lay.peer_numel) - lay.peer_numel[me]) * size
                self.kind_bytes[lay.kind] = self.kind_bytes.get(lay.kind, 0) + b
        else:
            offs = [0, 0, 0, 0]
            for lay in layers:
                lay.bucket, lay.offsets = self, tuple(offs)
                offs = [o + n for o, n in zip(offs, lay.p2p)]
            self.flat = [torch.zeros(n, dtype=dtype, device=device) for n in offs]  # sp, sn, rp, rn
            size = self.flat[0].element_size()
            for lay in layers:
                b = sum(lay.p2p) * size
                self.kind_bytes[lay.kind] = self.kind_bytes.get(lay.kind, 0) + b

    def stash(self, lay: _Layer) -> None:
        """Move what an exact call recorded for ``lay`` into this bucket's receive regions (then drop it),
        so that the first stale call reads it where later calls read the async exchange's data."""
        data, lay.saved = lay.saved, None
        if data is None:
            return
        o = lay.offsets
        if self.transport == "peers":
            if lay.kind == "groupnorm":  # the other bands' summed statistics: one region, the rest stays 0
                j = next(j for j, n in enumerate(self.recv) if n.numel())
                self.recv[j][o[j] : o[j] + data.numel()].copy_(data.reshape(-1))
                return
            for j, part in enumerate(data):
                if part is not None and part.numel():
                    self.recv[j][o[j] : o[j] + part.numel()].copy_(part.reshape(-1))
        else:
            above, below = data
            _, _, rp, rn = self.flat
            if above is not None and lay.p2p[2]:
                rp[o[2] : o[2] + lay.p2p[2]].copy_(above.reshape(-1))
            if below is not None and lay.p2p[3]:
                rn[o[3] : o[3] + lay.p2p[3]].copy_(below.reshape(-1))

    def launch(self, band: BandGroup, stats: CommStats) -> None:
        if self.transport == "peers":
            # Every other band gets this band's payload and sends its own (point-to-point, any sizes).
            ops = []
            for j, peer in enumerate(band.ranks):
                if j == band.index:
                    continue
                if self.recv[j].numel():
                    ops.append(dist.P2POp(dist.irecv, self.recv[j], peer, band.group, self.tag))
                if self.send.numel():
                    ops.append(dist.P2POp(dist.isend, self.send, peer, band.group, self.tag))
            self.works = batch_isend_irecv(ops)
            self.launched = _time.perf_counter()
            size = self.send.element_size()
            me, n = band.index, band.size
            for lay in self.layers:
                stats.add(lay.kind, (n - 1) * lay.peer_numel[me] * size,
                          (sum(lay.peer_numel) - lay.peer_numel[me]) * size, blocking=False)
        else:
            sp, sn, rp, rn = self.flat
            ops = []
            if rp.numel():
                ops.append(dist.P2POp(dist.irecv, rp, band.prev_rank, band.group, self.tag))
            if sn.numel():
                ops.append(dist.P2POp(dist.isend, sn, band.next_rank, band.group, self.tag))
            if rn.numel():
                ops.append(dist.P2POp(dist.irecv, rn, band.next_rank, band.group, self.tag))
            if sp.numel():
                ops.append(dist.P2POp(dist.isend, sp, band.prev_rank, band.group, self.tag))
            self.works = batch_isend_irecv(ops)
            self.launched = _time.perf_counter()
            size = sp.element_size()
            for lay in self.layers:
                stats.add(lay.kind, (lay.p2p[0] + lay.p2p[1]) * size, (lay.p2p[2] + lay.p2p[3]) * size,
                          blocking=False)
        self.filled = 0

    def wait(self, stats: CommStats) -> None:
        if not self.works:
            return
        t0 = _time.perf_counter()
        for w in self.works:
            w.wait()
        self.works = []
        dt = _time.perf_counter() - t0
        total = sum(self.kind_bytes.values()) or 1
        start = t0
        for kind, b in self.kind_bytes.items():  # one wait serves every kind in the bucket: split by bytes
            share = dt * b / total
            stats.add_wait(kind, t0, t0 + share, blocking=False)
            t0 += share
        if stats.trace is not None:  # how long the bucket travelled while this rank computed
            stats.trace.in_flight(start - self.launched)


class _Slot:
    """Stale data of one call slot: its layers in forward order and their buckets."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.key: tuple | None = None
        self.layers: list[_Layer] = []
        self.buckets: list[_Bucket] | None = None
        self.ready = False

    def drain(self, stats: CommStats) -> None:
        for b in self.buckets or []:
            b.wait(stats)

    def reset(self, key: tuple, stats: CommStats) -> None:
        self.drain(stats)
        self.key, self.layers, self.buckets, self.ready = key, [], None, False

    def build_buckets(self, band: BandGroup, device: Any, parts: int) -> None:
        """Cut each stream (transport, dtype) into at most ``parts`` buckets of about equal weight."""
        streams: dict[tuple[str, torch.dtype], list[_Layer]] = {}
        for lay in self.layers:
            streams.setdefault((lay.transport, lay.dtype), []).append(lay)
        buckets: list[_Bucket] = []
        for (transport, dtype), layers in streams.items():
            total = sum(lay.weight for lay in layers) or 1
            groups: list[list[_Layer]] = [[]]
            acc = 0
            for lay in layers:
                groups[-1].append(lay)
                acc += lay.weight
                if acc * parts >= total * len(groups) and len(groups) < parts:
                    groups.append([])
            for g in groups:
                if g:
                    tag = _TAG_BASE + self.index * 4096 + len(buckets)
                    bucket = _Bucket(transport, dtype, g, band, device, tag)
                    for lay in g:  # bucket by bucket: at most one bucket's worth held twice
                        bucket.stash(lay)
                    buckets.append(bucket)
        self.buckets = buckets


# ------------------------------------------------------------------------------------ calls
class StaleCall:
    """One UNet call of a displaced / partial run on this rank: exact (recording what the next step
    needs) or stale (reading last step's data, sending this step's in the background)."""

    def __init__(self, engine: "StaleEngine", slot: _Slot, band: BandGroup, stale: bool, record: bool,
                 fraction: float, step: int) -> None:
        self.engine, self.slot, self.band = engine, slot, band
        self.stale, self.record, self.fraction, self.step = stale, record, fraction, step
        self.index = 0

    @property
    def options(self) -> StaleOptions:
        return self.engine.options

    def _layer(self, kind: str, spec: tuple, make: Any) -> _Layer | None:
        """The slot's next layer: checked against this call (stale) or registered (recording)."""
        i = self.index
        self.index += 1
        if self.stale:
            lay = self.slot.layers[i] if i < len(self.slot.layers) else None
            if lay is None or lay.spec != spec:
                raise RuntimeError(
                    f"displaced mode: layer {i} of call slot {self.slot.index} is {spec}, but the previous step "
                    f"had {None if lay is None else lay.spec}; the UNet must run the same layers every step"
                )
            return lay
        if self.record:
            lay = make()
            self.slot.layers.append(lay)
            return lay
        return None

    def _read(self, lay: _Layer) -> None:
        """Wait until the layer's bucket holds last step's data (the exact call's data was stashed in it
        when the buckets were built); the caller reads its regions."""
        assert lay.bucket is not None and lay.saved is None
        lay.bucket.wait(self.engine.stats)

    def _written(self, lay: _Layer) -> None:
        b = lay.bucket
        assert b is not None
        b.filled += 1
        if b.filled == len(b.layers):
            b.launch(self.band, self.engine.stats)

    # ---------------------------------------------------------------- conv halos
    def conv(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, geo: ConvGeometry) -> torch.Tensor:
        band = self.band
        if geo.top == 0 and geo.bottom == 0:
            return conv_band_rows(x, None, None, weight, bias, geo, band)
        b, c, h, w = x.shape
        top, bottom = geo.top, geo.bottom
        spec = ("conv", tuple(x.shape), top, bottom)

        def make() -> _Layer:
            lay = _Layer("halo", spec, "p2p", x.dtype, b * c * (top + bottom) * w * x.element_size())
            first, last = band.is_first, band.is_last
            lay.p2p = (0 if first else b * c * bottom * w, 0 if last else b * c * top * w,
                       0 if first else b * c * top * w, 0 if last else b * c * bottom * w)
            return lay

        lay = self._layer("halo", spec, make)
        if not self.stale:
            above, below = band.halo_parts(x, top, bottom, kind="halo")
            if lay is not None:
                lay.saved = (above, below)
            return conv_band_rows(x, above, below, weight, bias, geo, band)
        assert lay is not None
        self._read(lay)
        _, _, rp, rn = lay.bucket.flat  # type: ignore[union-attr]
        o = lay.offsets
        above = rp[o[2] : o[2] + lay.p2p[2]].view(b, c, top, w) if lay.p2p[2] else None
        below = rn[o[3] : o[3] + lay.p2p[3]].view(b, c, bottom, w) if lay.p2p[3] else None
        if self.options.debug == "no_halo":
            above = below = None
        y = conv_band_rows(x, above, below, weight, bias, geo, band)
        sp, sn, _, _ = lay.bucket.flat  # type: ignore[union-attr]
        o = lay.offsets
        if lay.p2p[0]:
            sp[o[0] : o[0] + lay.p2p[0]].view(b, c, bottom, w).copy_(x[..., :bottom, :])
        if lay.p2p[1]:
            sn[o[1] : o[1] + lay.p2p[1]].view(b, c, top, w).copy_(x[..., h - top :, :])
        self._written(lay)
        return y

    # ---------------------------------------------------------------- GroupNorm
    def group_norm(self, x: torch.Tensor, num_groups: int, weight: torch.Tensor | None, bias: torch.Tensor | None,
                   eps: float) -> torch.Tensor:
        band = self.band
        xg, local = group_norm_sums(x, num_groups)
        n = local.numel()
        spec = ("groupnorm", tuple(x.shape), int(num_groups))

        def make() -> _Layer:
            lay = _Layer("groupnorm", spec, "peers", torch.float64, n * 8)
            lay.peer_numel = [n] * band.size
            return lay

        lay = self._layer("groupnorm", spec, make)
        if not self.stale:
            total = band.all_reduce_sum(local.clone(), kind="groupnorm")
            if lay is not None:
                lay.saved = total - local  # the other bands' sums
            return group_norm_from_sums(x, xg, total, weight, bias, eps)
        assert lay is not None
        self._read(lay)
        o = lay.offsets
        recv = lay.bucket.recv  # type: ignore[union-attr]
        others = sum(recv[j][o[j] : o[j] + n] for j in range(band.size) if j != band.index)
        y = group_norm_from_sums(x, xg, others + local, weight, bias, eps, local=local)
        me = band.index
        lay.bucket.send[o[me] : o[me] + n].copy_(local)  # type: ignore[union-attr]
        self._written(lay)
        return y

    # ---------------------------------------------------------------- self-attention K/V
    def kv(self, k: torch.Tensor, v: torch.Tensor, width: int,
           heights: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values this band's queries attend to. ``heights``: every band's rows at this level."""
        band = self.band
        if k.shape != v.shape or k.dim() != 3:
            raise RuntimeError(f"displaced self-attention needs k and v of one shape (B, N, D); got "
                               f"{tuple(k.shape)} and {tuple(v.shape)}")
        b, n_own, d = k.shape
        dd = 2 * d
        sizes = [int(h) * int(width) for h in heights]
        me = band.index
        partial = self.options.mode == "partial"
        # Partial: rows of each band that its neighbours attend to (the fraction nearest to them).
        win = [window_rows(self.fraction, h) * int(width) for h in heights] if partial else []
        spec = ("kv", b, n_own, d, int(width), tuple(sizes), self.fraction if partial else None)

        def make() -> _Layer:
            if partial:
                lay = _Layer("kv", spec, "p2p", k.dtype, b * dd * max(win) * 2 * k.element_size())
                first, last = band.is_first, band.is_last
                lay.p2p = (0 if first else b * win[me] * dd, 0 if last else b * win[me] * dd,
                           0 if first else b * win[me - 1] * dd, 0 if last else b * win[me + 1] * dd)
            else:
                lay = _Layer("kv", spec, "peers", k.dtype, b * max(sizes) * dd * k.element_size())
                lay.peer_numel = [b * s * dd for s in sizes]
            return lay

        lay = self._layer("kv", spec, make)
        own = torch.cat([k, v], dim=-1)
        if not self.stale:
            full = band.gather_tokens(own, dim=1, kind="kv", sizes=sizes)
            if lay is not None:
                # Compact copies of what the next step reads (never views: a view would keep the whole
                # gathered K/V alive until then, for every layer at once).
                offs = [sum(sizes[:j]) for j in range(band.size + 1)]
                if partial:
                    above = None if band.is_first else full[:, offs[me] - win[me - 1] : offs[me]].clone()
                    below = None if band.is_last else full[:, offs[me + 1] : offs[me + 1] + win[me + 1]].clone()
                    lay.saved = (above, below)
                else:
                    lay.saved = [None if j == me else full[:, offs[j] : offs[j + 1]].clone() for j in range(band.size)]
            return full[..., :d], full[..., d:]
        assert lay is not None
        self._read(lay)
        zero = self.options.debug == "zero_kv"
        o = lay.offsets
        if partial:
            _, _, rp, rn = lay.bucket.flat  # type: ignore[union-attr]
            above = rp[o[2] : o[2] + lay.p2p[2]].view(b, -1, dd) if lay.p2p[2] else None
            below = rn[o[3] : o[3] + lay.p2p[3]].view(b, -1, dd) if lay.p2p[3] else None
            parts = [p for p in (above, own, below) if p is not None and p.shape[1]]
            if zero:
                parts = [p if p is own else torch.zeros_like(p) for p in parts]
        else:
            recv = lay.bucket.recv  # type: ignore[union-attr]
            data = [None if j == me else recv[j][o[j] : o[j] + b * sizes[j] * dd].view(b, sizes[j], dd)
                    for j in range(band.size)]
            parts = [own if j == me else (torch.zeros_like(data[j]) if zero else data[j]) for j in range(band.size)]
        full = torch.cat(parts, dim=1)  # a copy: the bucket may be overwritten from here on
        if partial:
            sp, sn, _, _ = lay.bucket.flat  # type: ignore[union-attr]
            w_own = win[me]
            if lay.p2p[0]:
                sp[o[0] : o[0] + lay.p2p[0]].view(b, w_own, dd).copy_(own[:, :w_own])
            if lay.p2p[1]:
                sn[o[1] : o[1] + lay.p2p[1]].view(b, w_own, dd).copy_(own[:, n_own - w_own :])
        else:
            lay.bucket.send[o[me] : o[me] + b * n_own * dd].view(b, n_own, dd).copy_(own)  # type: ignore[union-attr]
        self._written(lay)
        return full[..., :d], full[..., d:]


class StaleEngine:
    """The stale state of one runtime (one job on one rank): a slot per call index of a step."""

    def __init__(self, options: StaleOptions, stats: CommStats) -> None:
        self.options = options
        self.stats = stats
        self.slots: dict[int, _Slot] = {}
        self.stale_calls = 0

    def begin_call(self, step: int, slot_index: int, sigma: float | None, key: tuple, band: BandGroup,
                   device: Any) -> StaleCall:
        fraction = self.options.fraction_at(sigma) if self.options.mode == "partial" else 0.0
        key = (*key, fraction)
        slot = self.slots.get(slot_index)
        if slot is None:
            slot = self.slots[slot_index] = _Slot(slot_index)
        stale = step >= self.options.warmup and slot.ready and slot.key == key
        if stale:
            if slot.buckets is None:
                slot.build_buckets(band, device, self.options.buckets)
            self.stale_calls += 1
            return StaleCall(self, slot, band, True, False, fraction, step)
        # Exact: record when the next step may read it (the last warmup step, or a fallback later).
        record = step + 1 >= self.options.warmup
        slot.reset(key, self.stats)
        return StaleCall(self, slot, band, False, record, fraction, step)

    def end_call(self, call: StaleCall) -> None:
        slot = call.slot
        if call.stale and call.index != len(slot.layers):
            raise RuntimeError(
                f"displaced mode: call slot {slot.index} ran {call.index} layers, the previous step "
                f"{len(slot.layers)}; the UNet must run the same layers every step"
            )
        slot.ready = call.stale or call.record

    def drain(self) -> None:
        """Wait for every exchange still in flight (every rank has the same ones)."""
        for slot in self.slots.values():
            slot.drain(self.stats)
