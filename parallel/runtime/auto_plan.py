"""The automatic plan of ``mode`` auto / auto_approximate: what the planner is told, measured where it can be.

* the link: bandwidth, latency and the per-step overhead of a run in the pool (the cancel check and the
  progress message of every step), measured by ``LinkProbeJob`` once when a pool starts and cached per
  device kind; before any pool ran, typical figures of the device kind stand in (and the reason says so);
* the model's cost at this size: one denoising step of the user's model, conds and latent size, sampled in
  this process (ComfyUI's own sampler loop), cached per model and latent shape; on CPU also the same step on
  one thread (how much faster one process runs on every core than on one) and a step at an 8x8 latent (the
  fixed cost of a call, which a smaller share of the work does not shrink);
* the plan: ``planning.planner.plan_for_model`` enumerates world sizes and modes and returns the fastest
  predicted (never one predicted slower than one device) with the reason, which goes to the log, Pool
  Status and the web panel (``LAST_RUN["plan"]``).
"""
from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from .protocol import Job

log = logging.getLogger(__name__)

__all__ = ["AUTO_MODES", "LinkProbeJob", "AutoPlan", "probe_pool", "link_for", "choose"]

AUTO_MODES = ("auto", "auto_approximate")
# Typical links before a pool measured its own: gloo over loopback (this kind of machine), NCCL over PCIe.
ASSUMED_LINK = {"cpu": (2.0, 80.0, 0.002, 1000.0), "cuda": (10.0, 30.0, 0.003, 50.0)}  # GB/s, us, s, sync us
_LINKS: dict[str, dict[str, float]] = {}
_CALLS: dict[tuple, float] = {}
_lock = threading.Lock()


class LinkProbeJob(Job):
    """Rank 0 and rank 1 ping-pong a small and a large tensor (latency, bandwidth); then every rank runs
    ``steps`` empty steps with the per-step messages of a sampling job (overhead per step)."""

    def __init__(self, large_mib: int = 8, steps: int = 8) -> None:
        self.large_mib, self.steps = int(large_mib), int(steps)

    def run(self, ctx: Any) -> Any:
        import torch.distributed as dist

        dev = ctx.collective_device if ctx.backend == "nccl" else torch.device("cpu")
        small = torch.zeros(1, device=dev)
        large = torch.zeros(self.large_mib * (1 << 18), device=dev)  # float32: 4 bytes each

        def pingpong(t: torch.Tensor, n: int) -> float:
            dist.barrier()
            t0 = time.perf_counter()
            for _ in range(n):
                if ctx.rank == 0:
                    dist.send(t, 1)
                    dist.recv(t, 1)
                elif ctx.rank == 1:
                    dist.recv(t, 0)
                    dist.send(t, 0)
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            return (time.perf_counter() - t0) / n / 2  # one way

        pingpong(small, 3)  # first messages set up the connection
        latency = pingpong(small, 20)
        one_way = pingpong(large, 3)
        bandwidth = large.numel() * 4 / max(one_way - latency, 1e-9)
        # A blocking exchange between ranks that compute costs more than the link's latency: the ranks reach
        # it at slightly different times (threads, caches, the OS). Measure that wait with real compute between.
        a = torch.randn(192, 192, device=dev)
        waits = []
        dist.barrier()
        for _ in range(12):
            for _ in range(6):
                a = torch.tanh(a @ a)
            t0 = time.perf_counter()
            dist.all_reduce(small)
            waits.append(time.perf_counter() - t0)
        sync_wait = sorted(waits)[len(waits) // 2]
        x0 = torch.zeros(1, 4, 64, 64)
        dist.barrier()
        t0 = time.perf_counter()
        for i in range(self.steps):
            ctx.progress(step=i, total=self.steps, x0=x0, probe=True)
            ctx.check_cancel()
        overhead = (time.perf_counter() - t0) / self.steps
        return {"bandwidth_gbps": bandwidth / 1e9, "latency_us": latency * 1e6, "step_overhead_s": overhead,
                "sync_wait_us": sync_wait * 1e6, "backend": ctx.backend, "world_size": ctx.world_size}


def probe_pool(pool: Any, kind: str) -> dict[str, float] | None:
    """Measure the link of a freshly started pool once (cached on the pool and per device kind)."""
    found = getattr(pool, "link_probe", None)
    if found is not None:
        with _lock:
            _LINKS.setdefault(kind, found)
        return found
    if len(getattr(pool, "devices", [])) < 2:
        return None
    try:
        result = pool.run(LinkProbeJob(), timeout_s=60).value
    except Exception as e:  # noqa: BLE001 - a failed probe leaves the assumed figures; the run goes on
        log.warning("HiRes Parallel: the link probe failed (%s); the planner keeps typical figures.", e)
        return None
    result = {k: float(result[k]) for k in ("bandwidth_gbps", "latency_us", "step_overhead_s", "sync_wait_us")}
    pool.link_probe = result
    with _lock:
        _LINKS[kind] = result
    log.info("HiRes Parallel: link measured on %d %s devices: %.2f GB/s, %.0f us (%.0f us between computing ranks), "
             "%.1f ms per step of overhead.", len(pool.devices), kind, result["bandwidth_gbps"], result["latency_us"],
             result["sync_wait_us"], result["step_overhead_s"] * 1e3)
    return result


def link_for(kind: str) -> tuple[dict[str, float], bool]:
    """(link figures, measured?) for a device kind."""
    with _lock:
        if kind in _LINKS:
            return dict(_LINKS[kind]), True
    bw, lat, over, sync = ASSUMED_LINK.get(kind, ASSUMED_LINK["cuda"])
    return {"bandwidth_gbps": bw, "latency_us": lat, "step_overhead_s": over, "sync_wait_us": sync}, False


def small_latent(latent: torch.Tensor, side: int = 8) -> torch.Tensor:
    """A latent of the same batch, channels (and frames) at ``side`` x ``side``: a call there is almost only
    the model's fixed per-layer cost."""
    return latent.new_zeros((*latent.shape[:-2], min(side, latent.shape[-2]), min(side, latent.shape[-1])))


def cpu_thread_speedup(model: Any, positive: list, negative: list | None, cfg: float, latent: torch.Tensor,
                       sigmas: torch.Tensor, fixed_s: float = 0.0, threads: int | None = None) -> float:
    """How much faster the work of one step of this model at this size (beyond its fixed cost ``fixed_s``)
    runs on ``threads`` (default: torch's) threads than on one: the thread model of CPU ranks that share the
    cores (measured, cached with the step times)."""
    threads = threads or torch.get_num_threads()
    if threads <= 1:
        return 1.0
    many = measure_step(model, positive, negative, cfg, latent, sigmas)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        one = measure_step(model, positive, negative, cfg, latent, sigmas)
    finally:
        torch.set_num_threads(before)
    return max(1.0, (one - fixed_s) / max(many - fixed_s, 1e-9))


def measure_step(model: Any, positive: list, negative: list | None, cfg: float, latent: torch.Tensor,
                 sigmas: torch.Tensor) -> float:
    """Seconds of one denoising step of this model at this latent size, in this process (cached per model
    and latent shape; the first of two steps warms up, the second is timed)."""
    import comfy.samplers

    # the model's weights and its patch set (LoRAs), the size, whether there is a negative pass, where and how
    key = (id(model.model), str(getattr(model, "patches_uuid", "")), tuple(latent.shape),
           negative is not None and cfg != 1.0, str(model.load_device), torch.get_num_threads())
    if key in _CALLS:
        return _CALLS[key]
    guider = comfy.samplers.CFGGuider(model)
    if negative is None:
        guider.inner_set_conds({"positive": positive})
    else:
        guider.set_conds(positive, negative)
    guider.set_cfg(cfg)
    sampler = comfy.samplers.sampler_object("euler")
    two = sigmas[:3] if sigmas.shape[-1] >= 3 else sigmas
    noise = torch.zeros_like(latent)
    times: list[float] = []

    def callback(step: int, x0: Any, x: Any, total: int) -> None:
        times.append(time.perf_counter())

    t0 = time.perf_counter()
    guider.sample(noise, latent, sampler, two.to(model.load_device), callback=callback, disable_pbar=True, seed=0)
    stamps = [t0] + times
    seconds = min(b - a for a, b in zip(stamps, stamps[1:])) if len(stamps) > 1 else time.perf_counter() - t0
    _CALLS[key] = seconds
    return seconds


@dataclass
class AutoPlan:
    devices: list[str]
    mode: str
    cfg_parallel: str
    reason: str
    inputs: dict[str, Any] = field(default_factory=dict)
    ranked: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"devices": len(self.devices), "mode": self.mode, "cfg_parallel": self.cfg_parallel,
                "reason": self.reason, "inputs": self.inputs, "ranked": self.ranked[:6]}


def choose(model: Any, positive: list, negative: list | None, cfg: float, latent: torch.Tensor, sigmas: torch.Tensor,
           available: list[str], setting: str, kind: str, options: Any = None) -> AutoPlan:
    """The plan for ``mode`` auto (exact results) or auto_approximate (displaced / partial allowed)."""
    from ..planning.planner import Link, plan_for_model
    from ..split.displaced import noise_levels, resolve_warmup
    from .submit import uncond_runs

    batch = 2 if negative is not None and uncond_runs(cfg, getattr(model, "model_options", None)) else 1
    batch *= int(latent.shape[0])
    link, measured = link_for(kind)
    try:
        single = measure_step(model, positive, negative, cfg, latent, sigmas)
    except torch.OutOfMemoryError:
        # one device cannot even run a step at this size: splitting is the only way, and the plan the user
        # would get from mode exact (bands on every device, CFG parallel auto) is the safe one
        import comfy.model_management

        comfy.model_management.soft_empty_cache()
        plan = AutoPlan(list(available), "exact", "auto", f"1 device ran out of memory measuring one step at "
                        f"{tuple(latent.shape)}: exact bands on all {len(available)} devices (nothing predicted)",
                        {"one_device_step_s": None, "out_of_memory": True})
        log.info("HiRes Parallel: plan: %s", plan.reason)
        return plan
    cores = os.cpu_count() or 1
    fixed = 0.0
    if kind == "cpu":  # what a call costs whatever its share of the work (CPU: Python and per-layer overheads)
        fixed = min(single, measure_step(model, positive, negative, cfg, small_latent(latent), sigmas))
    speedup = cpu_thread_speedup(model, positive, negative, cfg, latent, sigmas, fixed) if kind == "cpu" else None
    steps = max(1, int(sigmas.shape[-1]) - 1)
    # the warmup the run will use (displaced.resolve_warmup: exact while the composition forms); with it the
    # approximate modes measured 32.7-49.8 dB PSNR on the shapes model at 1x-3x, so no size is excluded here
    levels = noise_levels(model.get_model_object("model_sampling"), sigmas[:steps])
    warmup = resolve_warmup(int(getattr(options, "warmup", 0) or 0), steps, levels)
    # every blocking exchange pays the link's latency plus the wait of ranks that arrive apart
    latency_us = link["latency_us"] + link["sync_wait_us"]
    choice = plan_for_model(
        model.get_model_object("diffusion_model"), tuple(latent.shape), len(available), batch=batch,
        single_call_s=single, link=Link(link["bandwidth_gbps"], latency_us), thread_speedup=speedup,
        shared_cores=cores if kind == "cpu" else 0, step_overhead_s=link["step_overhead_s"],
        allow_approximate=setting == "auto_approximate", steps=steps, warmup=warmup, device_kind=kind,
        fixed_call_s=fixed)
    inputs = {"one_device_step_s": round(single, 4), "link": {k: round(v, 4) for k, v in link.items()},
              "link_measured": measured, "batch": batch}
    if speedup is not None:
        inputs["cpu_thread_speedup"] = round(speedup, 2)
        inputs["fixed_call_s"] = round(fixed, 4)
    reason = choice.reason + ("" if measured else " (link: typical figures, not yet measured on this machine)")
    plan = AutoPlan(available[: choice.world], choice.mode, "on" if choice.cfg_parallel else "off", reason, inputs,
                    [p.label for p in choice.ranked])
    log.info("HiRes Parallel: plan: %s on %d device(s), CFG parallel %s. %s", plan.mode, len(plan.devices),
             plan.cfg_parallel, reason)
    return plan
