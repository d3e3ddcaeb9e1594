"""Choose a parallel plan: enumerate plans, predict each with cost_model.predict_run, keep the fastest.

Pure function of its inputs. Never returns a plan predicted slower than one device (then: 1 device).
Measured inputs replace the datasheet: ``single_call_s`` (one device's seconds per model call at this size)
calibrates the rig's compute rate; ``link`` sets bandwidth / latency; a rig with ``shared_cores`` models CPU
ranks that share cores (Rig.rank_rate).
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable, Collection

from .cost_model import StepPrediction, compute_seconds, predict_run
from .exchange_pattern import ModelDescription, step_pattern
from .rig import Rig

__all__ = ["Link", "PlanChoice", "candidate_plans", "choose_plan", "calibrate"]

APPROXIMATE = ("displaced", "partial")


@dataclass(frozen=True)
class Link:
    bandwidth_gbps: float
    latency_us: float


@dataclass(frozen=True)
class PlanChoice:
    """The chosen plan (``world`` devices, ``mode``, ``cfg_parallel``, ``bands``), its prediction, why, and
    every allowed plan ranked fastest first."""

    world: int
    mode: str
    cfg_parallel: bool
    bands: int
    prediction: StepPrediction
    reason: str
    ranked: list[StepPrediction] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)


def candidate_plans(desc: ModelDescription, devices: int, batch: int) -> list[tuple[int, str, bool]]:
    """(world, mode, cfg_parallel) of every plan that fits the devices, the batch and the row alignment."""
    out = [(1, "exact", False)]
    for n in range(2, max(1, devices) + 1):
        if n <= batch:
            out.append((n, "batch", False))
        for cfg in (False, True):
            if cfg and (n % 2 or batch < 2):
                continue
            bands = n // 2 if cfg else n
            if desc.rows < bands * desc.align:
                continue
            for mode in ("exact",) + (APPROXIMATE if bands > 1 else ()):
                out.append((n, mode, cfg))
    return out


def calibrate(desc: ModelDescription, rig: Rig, single_call_s: float, batch: int) -> Rig:
    """``rig`` with its compute rate set so that one device takes ``single_call_s`` per call of ``batch``."""
    one = step_pattern(desc, 1, "exact", batch=batch)
    fixed = one.kernels * rig.launch_s
    if single_call_s <= fixed:
        rig, fixed = replace(rig, launch_s=0.0), 0.0
    flops_s = compute_seconds(one, replace(rig, tflops=1.0, launch_s=0.0))  # seconds at 1 TFLOP/s
    return replace(rig, tflops=flops_s / (single_call_s - fixed))


def _gate_ok(gate: Callable[[str], bool] | Collection[str] | None, mode: str) -> bool:
    if gate is None:
        return True
    if callable(gate):
        return bool(gate(mode))
    return mode not in gate


def choose_plan(desc: ModelDescription, rig: Rig, devices: int | None = None, *, link: Link | None = None,
                batch: int = 2, allow_approximate: bool = False,
                fidelity_gate: Callable[[str], bool] | Collection[str] | None = None,
                single_call_s: float | None = None, steps: int = 20, warmup: int = 1,
                fraction: float = 0.3) -> PlanChoice:
    """The fastest predicted plan for ``desc`` on up to ``devices`` (default: the rig's) devices.

    ``batch``: samples per call (2 with CFG, 1 without); ``allow_approximate``: consider displaced / partial;
    ``fidelity_gate``: a mode's fidelity check, a callable(mode) -> acceptable, or a set of modes to avoid
    (e.g. {"partial"} where its measured PSNR is under 30 dB); ``steps`` / ``warmup``: run length and exact
    warmup steps of the approximate modes."""
    if link is not None:
        rig = rig.with_link(link.bandwidth_gbps, link.latency_us)
    if single_call_s is not None:
        rig = calibrate(desc, rig, float(single_call_s), batch)
    devices = rig.gpus if devices is None else int(devices)
    preds, refused = [], []
    for n, mode, cfg in candidate_plans(desc, devices, batch):
        if mode in APPROXIMATE and not allow_approximate:
            refused.append(f"{mode} on {n}: approximate modes not allowed")
            continue
        if mode in APPROXIMATE and not _gate_ok(fidelity_gate, mode):
            refused.append(f"{mode} on {n}: fails the fidelity gate")
            continue
        preds.append(predict_run(desc, rig, n, mode, batch=batch, cfg_parallel=cfg, fraction=fraction,
                                 steps=steps, warmup=warmup))
    preds.sort(key=lambda p: (p.total_s, p.world))
    single = next(p for p in preds if p.world == 1)
    best = preds[0] if preds[0].total_s < single.total_s else single
    reason = _reason(best, preds, single)
    return PlanChoice(best.world, best.mode, best.cfg_parallel, best.bands, best, reason, preds, refused)


def _describe(p: StepPrediction) -> str:
    return (f"{p.label}: predicted {p.speedup:.2f}x (compute {p.compute_s:.3g} s, exchanges "
            f"{p.blocking_s:.3g} s blocking + {p.overlapped_s:.3g} s overlapped per step)")


def _reason(best: StepPrediction, preds: list[StepPrediction], single: StepPrediction) -> str:
    others = [p for p in preds if p is not best and p.world > 1][:2]
    head = (_describe(best) if best.world > 1 else
            f"1 device ({single.total_s:.3g} s/step): no plan is predicted faster")
    return "; ".join([head] + [_describe(p) for p in others])
