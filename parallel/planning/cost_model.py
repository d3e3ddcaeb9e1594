"""Seconds per denoising step of a plan on a rig: the one function both the simulator and the planner use.

Physical terms only (nothing fitted to a published speed-up):
* compute: each layer's FLOPs on this rank / (effective TFLOP/s x rank rate x wave efficiency). Wave
  efficiency: a layer's work is cut into tiles of 128 tokens x ``tiles_n`` (output-channel tiles, heads)
  and run in waves over the device's SMs; a last partial wave leaves SMs idle, which matters more as a
  rank's share shrinks (waves / ceil(waves));
* device-memory copies that build the K/V of all bands for each self-attention (full size on every rank:
  they do not shrink with more devices), at the rig's memory bandwidth;
* a fixed launch overhead per listed layer per call, which does not shrink with more devices;
* exchanges, alpha-beta: latency x messages + bytes / bandwidth. Blocking ones add to the step; overlapped
  ones (displaced / partial after warmup) hide behind compute when the rig overlaps, and only their
  excess over compute shows;
* overlapped exact (``overlap_exact``, per layer): an exchange that carries compute of its own layer shows
  only its excess over that compute. A halo: max(0, T - interior rows' compute). A K/V ring of ``pieces``
  blocks arriving evenly over T, after the own block (H) and with R of attention after it in ``pieces``
  equal blocks: exposed = max(0, T - H - R (pieces - 1) / pieces) (block j can start when piece j is here).
  Needs ``rig.overlap`` (a rig whose transfers compete with compute, e.g. gloo on CPU ranks that use every
  core, hides nothing);
* a fixed ``step_overhead_s`` per step of a multi-process run (the pool's cancel-check all-reduce and the
  progress message); world 1 runs in-process and pays none.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from .exchange_pattern import TILE, ModelDescription, StepPattern, step_pattern
from .rig import Rig

__all__ = ["StepPrediction", "predict_step", "predict_run", "compute_seconds", "exchange_seconds", "hidden_seconds"]


@dataclass(frozen=True)
class StepPrediction:
    """One step (``total_s``) of a plan and of one device (``single_s``); ``speedup`` = single / total."""

    label: str
    world: int
    mode: str
    cfg_parallel: bool
    bands: int
    compute_s: float
    blocking_s: float
    overlapped_s: float
    total_s: float
    single_s: float
    bytes_sent: int
    messages: int
    hidden_s: float = 0.0  # of ``blocking_s``, what overlapped exact hid behind its own layers' compute
    overhead_s: float = 0.0  # the fixed per-step overhead of a multi-process run (in ``total_s``)
    overlap_exact: bool = False

    @property
    def speedup(self) -> float:
        return self.single_s / self.total_s if self.total_s > 0 else math.inf

    @property
    def exchange_s(self) -> float:
        """Every exchange's seconds, hidden or not."""
        return self.blocking_s + self.overlapped_s

    @property
    def exposed_s(self) -> float:
        """Seconds the step spends beyond its compute: exchanges not hidden, and the per-step overhead."""
        return self.total_s - self.compute_s


def _wave_efficiency(tokens: int, tiles_n: int, sms: int) -> float:
    if sms <= 0 or tokens <= 0:
        return 1.0
    waves = math.ceil(tokens / TILE) * max(1, tiles_n) / sms
    return waves / math.ceil(waves)


def _seconds_per_flop(pattern: StepPattern, rig: Rig) -> dict[str, float]:
    """Seconds per FLOP of each listed layer on this rank (rate x rank rate x wave efficiency)."""
    rate = rig.tflops * 1e12 * rig.rank_rate(pattern.world if rig.shared_cores else 1)
    return {lay.name: 1.0 / (rate * _wave_efficiency(tok, lay.tiles_n, rig.sms)) for lay, f, tok in pattern.work}


def compute_seconds(pattern: StepPattern, rig: Rig) -> float:
    """Seconds one rank computes in one step of ``pattern`` (kernel launches included)."""
    spf = _seconds_per_flop(pattern, rig)
    s = sum(f * spf[lay.name] for lay, f, tok in pattern.work if f > 0)
    copies = pattern.copy_bytes / (rig.hbm_gbps * 1e9) if rig.hbm_gbps > 0 else 0.0
    return s + copies + pattern.kernels * rig.launch_s


def exchange_seconds(pattern: StepPattern, rig: Rig) -> tuple[float, float]:
    """(blocking, overlappable) seconds of one rank's exchanges in one step (nothing hidden yet)."""
    lat, bw = rig.latency_us * 1e-6, rig.link_gbps * 1e9
    blocking = overlapped = 0.0
    for e in pattern.exchanges:
        t = e.messages * lat + e.sent / bw
        if e.blocking:
            blocking += t
        else:
            overlapped += t
    return blocking, overlapped


def hidden_seconds(pattern: StepPattern, rig: Rig) -> float:
    """Seconds of blocking exchanges that overlapped exact hides behind their own layers' compute."""
    if not rig.overlap:
        return 0.0
    lat, bw = rig.latency_us * 1e-6, rig.link_gbps * 1e9
    spf = _seconds_per_flop(pattern, rig)
    hidden = 0.0
    for e in pattern.exchanges:
        if not e.overlaps:
            continue
        t = e.messages * lat + e.sent / bw
        k = max(1, e.pieces)
        cover = (e.hide_flops + e.ring_flops * (k - 1) / k) * spf.get(e.layer, 0.0)
        hidden += min(t, cover)
    return hidden


def _label(p: StepPattern) -> str:
    if p.world == 1:
        return "1 device"
    if p.mode == "batch":
        return f"batch split on {p.world} devices"
    bands = f"{p.mode} bands" if p.bands > 1 else ""
    if bands and p.mode == "exact" and not p.overlap:
        bands = "exact bands (blocking)"
    if p.cfg_parallel:
        return f"CFG parallel x {bands} ({p.groups} x {p.bands}) on {p.world} devices" if bands else \
            "CFG parallel on 2 devices"
    return f"{bands} on {p.world} devices"


def predict_step(desc: ModelDescription, rig: Rig, n: int, mode: str = "exact", *, batch: int = 2,
                 cfg_parallel: bool = False, fraction: float = 0.3, groupnorm: str = "auto",
                 steady: bool = True, overlap_exact: bool = True,
                 step_overhead_s: float | None = None) -> StepPrediction:
    """One denoising step (one model call of ``batch`` samples, CFG: 2) of ``desc`` on ``n`` devices of ``rig``.
    ``steady`` False: a warmup step of displaced / partial (exact exchanges); ``overlap_exact``: exact mode
    overlaps its halo / K/V exchanges per layer (the runtime's default; False: the blocking variant);
    ``step_overhead_s``: fixed seconds per step of a multi-process run (default ``rig.step_overhead_s``; not
    paid by 1 device, which runs in-process)."""
    pat = step_pattern(desc, n, mode, batch=batch, cfg_parallel=cfg_parallel, fraction=fraction,
                       groupnorm=groupnorm, steady=steady, overlap=overlap_exact)
    compute = compute_seconds(pat, rig)
    blocking, overlapped = exchange_seconds(pat, rig)
    hidden = hidden_seconds(pat, rig)
    excess = max(0.0, overlapped - compute) if rig.overlap else overlapped
    overhead = 0.0
    if n > 1:
        overhead = float(rig.step_overhead_s if step_overhead_s is None else step_overhead_s)
    single = compute_seconds(step_pattern(desc, 1, "exact", batch=batch), rig)
    return StepPrediction(_label(pat), n, mode, pat.cfg_parallel, pat.bands, compute, blocking, overlapped,
                          compute + blocking - hidden + excess + overhead, single, pat.bytes_sent,
                          sum(e.messages for e in pat.exchanges), hidden, overhead, pat.overlap)


def predict_run(desc: ModelDescription, rig: Rig, n: int, mode: str = "exact", *, steps: int = 50,
                warmup: int = 1, **kw) -> StepPrediction:
    """Mean step over a run of ``steps``: displaced / partial pay ``warmup`` exact steps first."""
    steady = predict_step(desc, rig, n, mode, **kw)
    if mode not in ("displaced", "partial") or steady.bands < 2:
        return steady
    warm = predict_step(desc, rig, n, mode, steady=False, **kw)
    k = min(max(1, int(warmup)), steps)

    def mean(a: float, b: float) -> float:
        return (k * a + (steps - k) * b) / steps

    return StepPrediction(steady.label, n, mode, steady.cfg_parallel, steady.bands,
                          mean(warm.compute_s, steady.compute_s), mean(warm.blocking_s, steady.blocking_s),
                          mean(warm.overlapped_s, steady.overlapped_s), mean(warm.total_s, steady.total_s),
                          steady.single_s, int(mean(warm.bytes_sent, steady.bytes_sent)),
                          int(mean(warm.messages, steady.messages)), mean(warm.hidden_s, steady.hidden_s),
                          steady.overhead_s, False)
