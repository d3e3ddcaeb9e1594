"""Controller side of a patch-parallel run, called by the nodes inside ComfyUI.

Chooses the devices, checks everything that can be wrong before any heavy work (model family, patches,
band layout, what can be shipped), then runs the SamplingJob in-process (1 device) or on the worker
pool, feeding ComfyUI's progress bar / previews and turning a Cancel into ComfyUI's interrupt.
"""
from __future__ import annotations

import logging
import math
import os
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch

from . import monitor  # the web panel's live view (web_routes.py); reporting only
from ..split.displaced import GROUPNORM_POLICIES, STALE_MODES
from ..split.dit_parallel import ATTENTION_MODES, check_dit_support, is_dit_model
from ..split.layout import LayoutError, ParallelPlan, band_alignment, split_rows
from ..split.memory_plan import check_preflight_memory
from ..split.trace import TRACE_ENV
from ..split.trace import summarize as summarize_trace
from .payload import (WeightStore, check_model_importable, check_picklable, check_worker_importable,
                      control_layer_classes, make_payload, ship_conditioning)
from .protocol import JobCancelled, JobFailed, WorkerContext
from .sampling_job import ParallelSpec, SamplerSpec, SamplingJob

log = logging.getLogger("hires_parallel")

DEVICE_KINDS = ["auto", "cuda", "cpu"]
CFG_PARALLEL = ["auto", "on", "off"]
COMFY_GPU = ["share", "avoid"]  # whether workers may use the GPU ComfyUI's own models are on
MODES = ["exact", "displaced", "partial", "batch"]
# auto: the planner picks devices and mode among the exact ones (exact bands, batch, CFG parallel, 1 device);
# auto_approximate may also pick displaced / partial (auto_plan.py)
AUTO_MODES = ["auto", "auto_approximate"]
NODE_MODES = AUTO_MODES + MODES
JOB_TIMEOUT_S = 900.0  # no word from rank 0 for this long: the job is declared hung
MAX_CPU_RANKS_ENV = "HIRES_PARALLEL_MAX_CPU_RANKS"  # override of the CPU rank cap (max_cpu_ranks)
MIN_CPU_RANK_CAP = 4  # CPU ranks always allowed (2 bands x CFG parallel), whatever the core count

_store_lock = threading.Lock()
_store: WeightStore | None = None
_store_pool: Any = None  # the pool the weight files were written for
LAST_RUN: dict[str, Any] = {}


class ParallelInputError(ValueError):
    """Bad input to a patch-parallel node; the message says what to change."""

    user_facing = True


@dataclass(frozen=True)
class ModeOptions:
    """Settings of the displaced / partial modes (ignored by exact and batch). ``warmup`` 0 = auto (the
    steps above displaced.COMPOSITION_NOISE_LEVEL, at least 10% of the steps and 1); ``partial_fraction_late`` < 0 = same as ``partial_fraction``; ``groupnorm``
    auto = synchronous at or below 1024x1024 pixels, corrected above."""

    warmup: int = 0
    partial_fraction: float = 0.3
    partial_fraction_late: float = -1.0
    groupnorm: str = "auto"
    attention: str = "auto"  # DiTs, exact mode: auto, gathered_kv or ulysses (split.dit_parallel)
    trace: bool = False  # keep a per-layer exchange trace (split.trace); also HIRES_PARALLEL_TRACE=1
    overlap: bool = True  # exact mode: exchanges overlapped with compute (False: the blocking order, to compare)


def check_mode_options(options: ModeOptions) -> None:
    if int(options.warmup) != options.warmup or options.warmup < 0:
        raise ParallelInputError(f"warmup must be a whole number of steps, 0 (auto) or more; got {options.warmup!r}.")
    if not 0.0 <= options.partial_fraction <= 1.0:
        raise ParallelInputError(f"partial_fraction must be between 0 and 1 (the share of each neighbour band "
                                 f"attended to); got {options.partial_fraction!r}.")
    late = options.partial_fraction_late
    if late > 1.0 or (0.0 > late and late != -1.0):
        raise ParallelInputError(f"partial_fraction_late must be between 0 and 1, or -1 for the same as "
                                 f"partial_fraction; got {late!r}.")
    if options.groupnorm not in GROUPNORM_POLICIES:
        raise ParallelInputError(f"groupnorm must be one of {list(GROUPNORM_POLICIES)}; got {options.groupnorm!r}.")
    if options.attention not in ATTENTION_MODES:
        raise ParallelInputError(f"sequence_attention must be one of {list(ATTENTION_MODES)}; got {options.attention!r}.")


def resolve_devices(devices: int, kind: str, comfy_gpu: str = "share", auto: bool = False) -> list[str]:
    """Device list for a run: `devices` 0 means every visible GPU; more than exist runs on what exists.
    ``comfy_gpu`` "avoid" leaves out the GPU ComfyUI's own models use (its VAE decode and other samplers
    then keep their memory); "share" (default) uses it too, as rank 0's device when it is cuda:0.
    ``auto`` (mode auto): the devices the planner may use; on CPU, 0 means one process per core."""
    if kind not in DEVICE_KINDS:
        raise ParallelInputError(f"device_kind must be one of {DEVICE_KINDS}; got {kind!r}.")
    if comfy_gpu not in COMFY_GPU:
        raise ParallelInputError(f"comfy_gpu must be one of {COMFY_GPU}; got {comfy_gpu!r}.")
    cuda_n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if kind == "auto":
        kind = "cuda" if cuda_n else "cpu"
    if kind == "cuda":
        if cuda_n == 0:
            raise ParallelInputError("device_kind is cuda but no CUDA device is visible: choose auto or cpu.")
        from .pool import comfy_gpu as comfys_gpu

        usable = [f"cuda:{i}" for i in range(cuda_n)]
        if comfy_gpu == "avoid":
            usable = [d for d in usable if d != comfys_gpu()]
            if not usable:
                raise ParallelInputError(f"comfy_gpu is avoid, but the only visible GPU ({comfys_gpu()}) is the one "
                                         "ComfyUI itself uses: set comfy_gpu to share, or make more GPUs visible.")
        n = len(usable) if devices <= 0 else devices
        if n > len(usable):
            log.warning("HiRes Parallel: %d devices asked for, %d usable%s; running on %d.", n, len(usable),
                        " (ComfyUI's own GPU left out)" if comfy_gpu == "avoid" else "", len(usable))
            n = len(usable)
        return usable[:n]
    n = max(1, devices) if not (auto and devices <= 0) else max(1, min(os.cpu_count() or 1, max_cpu_ranks()))
    cap = max_cpu_ranks()
    if n > cap:
        raise ParallelInputError(
            f"device_kind cpu starts one worker process per device; {n} were asked for, but this machine allows at "
            f"most {cap} ({os.cpu_count() or 1} CPU cores; the cap is max({MIN_CPU_RANK_CAP}, cores)). Use at most "
            f"{cap} devices, or set the environment variable {MAX_CPU_RANKS_ENV} to a larger number before starting "
            f"ComfyUI if you really want more.")
    return ["cpu"] * n


def max_cpu_ranks() -> int:
    """How many CPU worker processes a run may start: max(4, CPU cores), or the override in the environment."""
    text = os.environ.get(MAX_CPU_RANKS_ENV, "").strip()
    if text:
        try:
            value = int(text)
        except ValueError:
            value = 0
        if value < 1:
            raise ParallelInputError(f"the environment variable {MAX_CPU_RANKS_ENV} must be a whole number of at "
                                     f"least 1; got {text!r}.")
        return value
    return max(MIN_CPU_RANK_CAP, os.cpu_count() or 1)


def uncond_runs(cfg: float | None, model_options: dict | None = None) -> bool:
    """Whether ComfyUI evaluates the negative prompt at this cfg (comfy.samplers.sampling_function): at cfg 1
    it skips the uncond pass unless model_options say disable_cfg1_optimization. None (cfg unknown) = True."""
    if cfg is None:
        return True
    return not (math.isclose(float(cfg), 1.0) and not (model_options or {}).get("disable_cfg1_optimization", False))


def resolve_cfg_parallel(setting: str, world: int, has_negative: bool, cfg: float | None = None,
                         model_options: dict | None = None) -> bool:
    """Whether cond and uncond go to two halves of the devices. With cfg known (``cfg``), cfg 1 has no
    negative pass (see uncond_runs): auto then splits bands over all devices, and on is refused."""
    if setting not in CFG_PARALLEL:
        raise ParallelInputError(f"cfg_parallel must be one of {CFG_PARALLEL}; got {setting!r}.")
    if setting == "off" or world < 2 or not has_negative:
        return False
    if not uncond_runs(cfg, model_options):
        if setting == "on":
            raise ParallelInputError(f"cfg_parallel is on, but cfg {cfg:g} has no negative pass (ComfyUI skips the "
                                     f"negative prompt at cfg 1), so half of the devices would have nothing to do: "
                                     f"use auto or off.")
        return False
    if setting == "auto":
        return world % 2 == 0
    if world % 2:
        raise ParallelInputError(f"CFG parallel splits cond and uncond over two halves of the devices; "
                                 f"{world} devices cannot be halved: use an even number of devices or set cfg_parallel to off.")
    return True


def weight_store(pool: Any = None) -> WeightStore:
    """The weight files for the workers. They belong to one pool: when ``pool`` is another pool than the
    one they were written for (devices or settings changed, so the pool was rebuilt), the old files go."""
    global _store, _store_pool
    with _store_lock:
        if pool is not None and _store_pool is not None and _store_pool is not pool and _store is not None:
            _store.close()
            _store = None
        if _store is None:
            _store = WeightStore()
        if pool is not None:
            _store_pool = pool
        return _store


def close_weight_store() -> None:
    global _store
    with _store_lock:
        if _store is not None:
            _store.close()
            _store = None


def band_weights(text: str, plan: ParallelPlan) -> list[float] | None:
    """Parse "2,1,1" (one relative speed per device, in device order) into one weight per band.

    With CFG parallel the devices holding the same band in the two halves share its size; the slower
    (smaller) weight counts, since both must finish the band.
    """
    text = (text or "").strip()
    if not text:
        return None
    try:
        per_device = [float(t) for t in text.replace(";", ",").split(",") if t.strip()]
    except ValueError:
        raise ParallelInputError(f"device_weights must be numbers separated by commas, like 2,1; got {text!r}.") from None
    # not (w > 0) also refuses nan; a sum that overflows (1e308,1e308) would turn the band shares into nan
    if (len(per_device) != plan.world_size or any(not (w > 0) or not math.isfinite(w) for w in per_device)
            or not math.isfinite(sum(per_device))):
        raise ParallelInputError(f"device_weights needs one positive number per device ({plan.world_size}), finite "
                                 f"and of ordinary size, like 2,1; got {text!r}.")
    return [min(per_device[r] for r in plan.peer_ranks(b)) for b in range(plan.bands_per_group)]


def preflight(model, positive, negative, latent_image: torch.Tensor, devices: list[str], cfg_parallel: str,
              mode: str, device_weights: str = "", options: ModeOptions | None = None,
              cfg: float | None = None) -> ParallelSpec:
    """Every check that needs no heavy work; raises ParallelInputError/UnsupportedModel/UnshippablePatch.
    ``cfg`` (None = unknown) decides whether there is a negative pass to run beside the positive one."""
    world = len(devices)
    if mode not in MODES:
        raise ParallelInputError(f"mode must be one of {MODES}; got {mode!r}.")
    options = options or ModeOptions()
    check_mode_options(options)
    batch_mode = mode == "batch"  # the batch of every UNet call is cut over the devices; no bands
    late = options.partial_fraction_late
    cfg_split = False if batch_mode else resolve_cfg_parallel(cfg_parallel, world, negative is not None, cfg,
                                                              getattr(model, "model_options", None))
    spec = ParallelSpec(world, cfg_split,
                        mode, warmup=int(options.warmup), partial_fraction=float(options.partial_fraction),
                        partial_fraction_late=None if late < 0 else float(late), groupnorm=options.groupnorm)
    spec.attention = options.attention
    spec.trace = bool(options.trace) or os.environ.get(TRACE_ENV, "") == "1"
    spec.overlap = bool(options.overlap)
    if world == 1:
        return spec
    plan = ParallelPlan(world, spec.cfg_parallel, batch_split=world if batch_mode else 0)
    if not batch_mode:
        spec.weights = band_weights(device_weights, plan)
    if is_dit_model(model):
        check_dit_split(model, latent_image, plan, spec)
    else:
        from ..split.unet_parallel import check_band_parallel_support

        check_band_parallel_support(model)
        align = band_alignment(model)  # the one band rule, shared with the web overlay
        if latent_image.ndim != 4:
            raise ParallelInputError(f"Patch-parallel sampling takes image latents (4-D); got shape "
                                     f"{tuple(latent_image.shape)}.")
        try:
            split_rows(int(latent_image.shape[-2]), plan.bands_per_group, align, spec.weights)
        except LayoutError as e:
            raise ParallelInputError(str(e)) from e
    if mode in STALE_MODES and plan.bands_per_group == 1:
        log.info("HiRes Parallel: mode %s has no bands to exchange with %d devices and CFG parallel on; "
                 "it runs like exact.", mode, world)
    # can it fit? (at cfg 1 ComfyUI runs no negative pass: only the positive one takes memory)
    check_preflight_memory(model, latent_image, devices, spec, plan,
                           negative is not None and uncond_runs(cfg, getattr(model, "model_options", None)))
    advice = "Remove the node that adds it, or run with 1 device."
    control_layers = control_layer_classes(positive, negative)  # the layers a ControlNet's skeleton pickles
    positive, negative = ship_conditioning(positive, negative, None)  # ControlNets: checked, nothing written
    check_picklable(positive, "the positive conditioning", advice)
    check_picklable(negative, "the negative conditioning", advice)
    # what pickles here may still not import in a worker (classes of other node packs): refuse it now
    check_model_importable(model)
    check_worker_importable(positive, "the positive conditioning", advice)
    check_worker_importable(negative, "the negative conditioning", advice)
    check_worker_importable(control_layers, "the layers of a ControlNet's model", advice)
    return spec


def check_dit_split(model, latent_image: torch.Tensor, plan: ParallelPlan, spec: ParallelSpec) -> None:
    """A DiT run's checks before any work: the family, the token split, a forced Ulysses' head count."""
    from ..split.dit_parallel import dit_split_info, resolve_attention

    if spec.mode == "batch":
        check_dit_support(model)
        return
    try:
        info = dit_split_info(model, tuple(latent_image.shape), plan.bands_per_group, spec.weights)
    except LayoutError as e:
        raise ParallelInputError(str(e)) from e
    if spec.mode == "exact":
        resolve_attention(spec.attention, info["heads"], plan.bands_per_group)


@monitor.watched  # a failed or cancelled run reaches the web panel with a hint
def run_sampling(model, positive, negative, cfg: float, noise: torch.Tensor, latent_image: torch.Tensor,
                 sigmas: torch.Tensor, sampler: SamplerSpec, seed: int | None, denoise_mask, devices: list[str],
                 cfg_parallel: str = "auto", mode: str = "exact",
                 callback: Callable[[int, torch.Tensor, Any, int], None] | None = None,
                 device_weights: str = "", options: ModeOptions | None = None) -> torch.Tensor:
    """Sample like ComfyUI's CFGGuider.sample, with the model evaluation split over `devices`."""
    import comfy.model_management

    plan = None
    if mode in AUTO_MODES:  # the planner decides devices, mode and CFG parallel (auto_plan.py)
        from . import auto_plan

        plan = auto_plan.choose(model, positive, negative, cfg, latent_image, sigmas, devices, mode,
                                _device_kind(devices), options)
        devices, mode, cfg_parallel = plan.devices, plan.mode, plan.cfg_parallel
        if device_weights and len(devices) != len(device_weights.replace(";", ",").split(",")):
            device_weights = ""  # weights were given for the devices asked for, not those the plan uses
    spec = preflight(model, positive, negative, latent_image, devices, cfg_parallel, mode, device_weights, options,
                     cfg=cfg)
    monitor.run_started(devices, spec, int(sigmas.shape[-1]) - 1)
    interrupted = threading.Event()

    def on_progress(event: dict) -> None:
        monitor.run_step(event)
        if callback is None or event.get("step") is None:
            return
        try:
            callback(event["step"], event.get("x0"), None, event["total"])
        except comfy.model_management.InterruptProcessingException:
            interrupted.set()

    def should_cancel() -> bool:
        return interrupted.is_set() or comfy.model_management.processing_interrupted()

    t0 = time.perf_counter()
    if spec.world_size == 1:  # the smallest group: the same job, in this process, on ComfyUI's own model
        job = SamplingJob(model, positive, negative, cfg, noise, latent_image, sigmas, sampler, seed, spec, denoise_mask)
        ctx = WorkerContext.local(model.load_device, on_progress=on_progress, should_cancel=should_cancel)
        try:
            value = job.run(ctx)
        except JobCancelled:
            raise comfy.model_management.InterruptProcessingException() from None
        _record(devices, spec, time.perf_counter() - t0, [ctx.stats], plan)
        return value["samples"]

    from . import auto_plan
    from .pool import get_pool

    pool = get_pool(devices)
    auto_plan.probe_pool(pool, _device_kind(devices))  # once per pool
    store = weight_store(pool)
    payload = make_payload(model, store)
    positive, negative = ship_conditioning(positive, negative, store)  # ControlNets as records + files
    free_comfy_gpu(devices)
    job = SamplingJob(payload, positive, negative, cfg, noise.cpu(), latent_image.cpu(), sigmas.cpu(), sampler, seed,
                      spec, None if denoise_mask is None else denoise_mask.cpu())
    try:
        result = pool.run(job, on_progress=on_progress, should_cancel=should_cancel, timeout_s=JOB_TIMEOUT_S)
    except JobCancelled:
        raise comfy.model_management.InterruptProcessingException() from None
    except JobFailed as e:
        if getattr(e, "user_facing", False):
            raise ParallelInputError(str(e)) from None
        raise
    _record(devices, spec, result.seconds, result.stats, plan)
    return result.value["samples"]


def _device_kind(devices: list[str]) -> str:
    """"cuda" or "cpu": the kind of the run's devices (a run never mixes them)."""
    return "cuda" if str(devices[0]).startswith("cuda") else "cpu"


def free_comfy_gpu(devices: list[str]) -> bool:
    """When a worker runs on the GPU ComfyUI's own models use, ComfyUI's copies leave that GPU first (the
    worker needs the memory; ComfyUI reloads what it needs afterwards, e.g. for the VAE decode). Workers on
    other GPUs take nothing from ComfyUI, so nothing is unloaded then. Returns whether it unloaded."""
    import comfy.model_management

    from .pool import comfy_gpu

    if comfy_gpu() not in devices:
        return False
    comfy.model_management.unload_all_models()
    comfy.model_management.soft_empty_cache()
    return True


def comm_per_step(rank_stats: dict) -> dict:
    """One rank's mean bytes sent / received and seconds waited per step, by kind, separately for exact
    steps and steps that used stale data (displaced / partial), from the job's ``comm_steps``."""
    steps = rank_stats.get("comm_steps") or []
    out: dict[str, Any] = {"rank": rank_stats.get("rank"), "steps": len(steps)}
    for name, group in (("exact", [s for s in steps if not s["stale_calls"]]),
                        ("stale", [s for s in steps if s["stale_calls"]])):
        if not group:
            continue
        n = len(group)

        def mean(key: str, digits: int | None = None, group: list = group, n: int = n) -> dict:
            kinds = sorted({k for s in group for k in s[key]})
            sums = {k: sum(s[key].get(k, 0) for s in group) / n for k in kinds}
            return {k: (round(v, digits) if digits else int(v)) for k, v in sums.items()}

        out[name] = {"steps": n, "bytes_sent": mean("sent"), "bytes_received": mean("received"),
                     "wait_s": mean("wait_s", 5)}
    return out


def _record(devices: list[str], spec: ParallelSpec, seconds: float, stats: list[dict], plan: Any = None) -> None:
    LAST_RUN.clear()
    LAST_RUN.update(devices=devices, world_size=spec.world_size, cfg_parallel=spec.cfg_parallel, mode=spec.mode,
                    band_weights=spec.weights, stale=next((s.get("stale") for s in stats if s.get("stale")), None),
                    comm_per_step=[comm_per_step(s) for s in stats],
                    seconds=round(seconds, 3), ranks=stats, finished=time.time())
    if plan is not None:
        LAST_RUN["plan"] = plan.as_dict()
    traces = [s["trace"] for s in stats if s.get("trace")]
    if traces:
        LAST_RUN["trace_summary"] = [summarize_trace(t) for t in traces]
    monitor.run_finished(LAST_RUN)
