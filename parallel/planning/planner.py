"""Choose a parallel plan: enumerate plans, predict each with cost_model.predict_run, keep the fastest.

Pure function of its inputs. Never returns a plan predicted slower than one device (then: 1 device).
Measured inputs replace the datasheet: ``single_call_s`` (one device's seconds per model call at this size)
calibrates the rig's compute rate; ``link`` sets bandwidth / latency; a rig with ``shared_cores`` models CPU
ranks that share cores (Rig.rank_rate); ``step_overhead_s`` is the measured fixed cost per step of a
multi-process run. ``plan_for_model`` is the run-time entry: a live diffusion model and measured inputs in,
a PlanChoice out.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Callable, Collection, Sequence

from .cost_model import StepPrediction, compute_seconds, predict_run
from .exchange_pattern import ModelDescription, step_pattern
from .rig import LAUNCH_S, Rig, cpu_rig

__all__ = ["Link", "PlanChoice", "candidate_plans", "choose_plan", "calibrate", "plan_for_model"]

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
                fraction: float = 0.3, overlap_exact: bool = True,
                step_overhead_s: float | None = None) -> PlanChoice:
    """The fastest predicted plan for ``desc`` on up to ``devices`` (default: the rig's) devices.

    ``batch``: samples per call (2 with CFG, 1 without); ``allow_approximate``: consider displaced / partial;
    ``fidelity_gate``: a mode's fidelity check, a callable(mode) -> acceptable, or a set of modes to avoid
    (e.g. {"partial"} where its measured PSNR is under 30 dB); ``steps`` / ``warmup``: run length and exact
    warmup steps of the approximate modes; ``overlap_exact``: exact mode overlaps its exchanges per layer
    (the runtime's default; False predicts the blocking variant); ``step_overhead_s``: measured fixed seconds
    per step of a multi-process run (default: the rig's), not paid by the 1-device plan."""
    if link is not None:
        rig = rig.with_link(link.bandwidth_gbps, link.latency_us)
    if step_overhead_s is not None:
        rig = replace(rig, step_overhead_s=float(step_overhead_s))
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
                                 steps=steps, warmup=warmup, overlap_exact=overlap_exact))
    preds.sort(key=lambda p: (p.total_s, p.world))
    single = next(p for p in preds if p.world == 1)
    best = preds[0] if preds[0].total_s < single.total_s else single
    reason = _reason(best, preds, single)
    return PlanChoice(best.world, best.mode, best.cfg_parallel, best.bands, best, reason, preds, refused)


def _describe(p: StepPrediction) -> str:
    hidden = f", {p.hidden_s:.3g} s of it hidden in its layers" if p.hidden_s > 0 else ""
    overhead = f", overhead {p.overhead_s:.3g} s" if p.overhead_s > 0 else ""
    return (f"{p.label}: predicted {p.speedup:.2f}x (compute {p.compute_s:.3g} s, exchanges "
            f"{p.blocking_s:.3g} s blocking{hidden} + {p.overlapped_s:.3g} s overlapped{overhead} per step)")


def _reason(best: StepPrediction, preds: list[StepPrediction], single: StepPrediction) -> str:
    others = [p for p in preds if p is not best and p.world > 1][:2]
    head = (_describe(best) if best.world > 1 else
            f"1 device ({single.total_s:.3g} s/step): no plan is predicted faster")
    return "; ".join([head] + [_describe(p) for p in others])


def plan_for_model(diffusion_model: Any, latent_shape: Sequence[int], devices: int, *, batch: int,
                   single_call_s: float, link: Link, thread_speedup: float | None = None, shared_cores: int = 0,
                   step_overhead_s: float = 0.0, allow_approximate: bool = False,
                   fidelity_gate: Callable[[str], bool] | Collection[str] | None = None, steps: int = 20,
                   warmup: int = 1, device_kind: str = "cuda", overlap_exact: bool = True,
                   text_tokens: int | None = None, sms: int = 0, fixed_call_s: float = 0.0) -> PlanChoice:
    """The plan for a live ComfyUI diffusion model (the torch module: UNetModel, Flux, SD3, Qwen-Image, Wan)
    on ``devices`` devices, from measured inputs. Pure apart from reading the module's layers.

    ``latent_shape``: (B, C, H, W) or (B, C, T, H, W); ``batch``: samples per model call (2 with CFG);
    ``single_call_s``: measured seconds of one model call of ``batch`` on ONE device; for CPU ranks that
    share cores (``device_kind`` "cpu"), one rank with ALL ``shared_cores`` cores (the best one-rank
    configuration): N ranks are then predicted with the thread model (Rig.rank_rate), ``thread_speedup``
    being how much faster 1 rank with every core is than 1 rank with one (None: unknown, taken as
    ``shared_cores``, i.e. threads scale perfectly and extra ranks gain nothing from the cores);
    ``link``: measured bandwidth / latency between ranks; ``step_overhead_s``: measured fixed seconds per
    step of a multi-process run; ``sms``: streaming multiprocessors of a GPU (0: no wave quantisation);
    ``fixed_call_s``: measured seconds of a call that do not shrink with a smaller share of the work (the
    model's per-layer overheads, e.g. a call at a tiny latent; CPU ranks), spread over its layers.
    A model describe_module cannot read, or a latent it cannot describe, gives 1 device (exact) with a
    reason saying so."""
    from .comfy_shapes import describe_module  # torch only; no ComfyUI import

    shape = [int(v) for v in latent_shape]
    try:
        frames = shape[2] if len(shape) == 5 else 1
        desc = describe_module(diffusion_model, (shape[-2], shape[-1]), frames=frames, text_tokens=text_tokens)
        if desc.flops <= 0:
            raise ValueError("no FLOPs found in its layers")
    except Exception as e:  # noqa: BLE001 - any module describe_module cannot read: run it on 1 device
        return _single_only(f"1 device: no plan predicted, the model cannot be described "
                            f"({type(diffusion_model).__name__}: {type(e).__name__}: {e})", float(single_call_s))
    devices = max(1, int(devices))
    if device_kind == "cpu":
        cores = max(1, int(shared_cores) or devices)
        speedup = float(thread_speedup) if thread_speedup is not None else float(cores)
        rig = cpu_rig(cores, speedup, link_gbps=link.bandwidth_gbps, latency_us=link.latency_us,
                      step_overhead_s=step_overhead_s)
        if fixed_call_s > 0:
            rig = replace(rig, launch_s=float(fixed_call_s) / max(1, desc.kernels))
    elif device_kind == "cuda":
        rig = Rig(f"{devices}x GPU (measured)", devices, 100.0, link.bandwidth_gbps, link.latency_us, True, LAUNCH_S,
                  sms=int(sms), source="measured", step_overhead_s=float(step_overhead_s))
    else:
        raise ValueError(f"device_kind must be 'cpu' or 'cuda'; got {device_kind!r}")
    return choose_plan(desc, rig, devices, batch=int(batch), allow_approximate=allow_approximate,
                       fidelity_gate=fidelity_gate, single_call_s=float(single_call_s), steps=int(steps),
                       warmup=int(warmup), overlap_exact=overlap_exact)


def _single_only(reason: str, single_call_s: float) -> PlanChoice:
    one = StepPrediction("1 device", 1, "exact", False, 1, single_call_s, 0.0, 0.0, single_call_s, single_call_s, 0, 0)
    return PlanChoice(1, "exact", False, 1, one, reason, [one], [])
