"""One patch-parallel sampling run: the job every rank executes with ComfyUI's own sampler loop.

Every rank holds the full latent and runs the same CFGGuider.sample with the same noise, sigmas and seed
(so ancestral and SDE samplers draw identical noise everywhere); only the UNet evaluation is split, by the
hooks of unet_parallel. Rank 0 reports progress with the step's x0 (for previews); every rank checks for
a cancel once per step, collectively, so all stop at the same step.
"""
from __future__ import annotations

import pickle
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from .payload import (ModelPayload, UnshippablePatch, build_model, check_picklable, check_worker_importable,
                      rebuild_conditioning)
from .protocol import Job, JobCancelled, WorkerContext


@dataclass
class SamplerSpec:
    """A ComfyUI sampler by name (rebuilt in the worker) or a picklable SAMPLER object."""

    name: str | None = None
    obj: Any = None

    def build(self):
        import comfy.samplers

        return comfy.samplers.sampler_object(self.name) if self.name is not None else self.obj


def sampler_spec(sampler) -> SamplerSpec:
    """Ship a SAMPLER object (from KSamplerSelect etc.) to the workers, or say why it cannot go."""
    try:
        pickle.dumps(sampler)
    except Exception:  # noqa: BLE001
        check_picklable(getattr(sampler, "__dict__", sampler), "the SAMPLER input",
                        "Use a sampler from KSamplerSelect, or run with 1 device.")
        raise UnshippablePatch("The SAMPLER input cannot be sent to worker processes: use KSamplerSelect or 1 device.")
    # pickles here, but a sampler of another node pack would not import in a worker
    check_worker_importable(sampler, "the SAMPLER input", "Use a sampler from KSamplerSelect, or run with 1 device.")
    return SamplerSpec(obj=sampler)


@dataclass
class ParallelSpec:
    world_size: int
    cfg_parallel: bool
    mode: str = "exact"
    weights: list[float] | None = None
    # displaced / partial modes (see displaced.py); 0 warmup = auto, groupnorm "auto" resolved per latent
    warmup: int = 0
    partial_fraction: float = 0.3
    partial_fraction_late: float | None = None
    groupnorm: str = "auto"
    attention: str = "auto"  # DiTs: auto, gathered_kv or ulysses (exact mode)
    trace: bool = False  # keep a per-layer exchange trace (split.trace)
    overlap: bool = True  # exact mode: overlap exchanges with compute

    def stale_options(self, sigmas: torch.Tensor, height: int, width: int, model_sampling: Any = None):
        """StaleOptions for this run (None unless mode is displaced or partial). ``model_sampling`` (the
        model's) lets the auto warmup cover the steps that still decide the composition."""
        from ..split.displaced import STALE_MODES, StaleOptions, noise_levels, resolve_groupnorm, resolve_warmup

        if self.mode not in STALE_MODES:
            return None
        steps = max(1, int(sigmas.shape[-1]) - 1)
        late = self.partial_fraction_late
        levels = None if model_sampling is None else noise_levels(model_sampling, sigmas[:steps])
        return StaleOptions(
            mode=self.mode, warmup=resolve_warmup(self.warmup, steps, levels),
            groupnorm=resolve_groupnorm(self.groupnorm, height, width), fraction=float(self.partial_fraction),
            fraction_late=None if late is None or late < 0 else float(late),
            late_sigma=float(sigmas[steps // 2]),  # late steps: the second half of the schedule
        )


@dataclass
class SamplingJob(Job):
    model: Any  # ModelPayload in workers; the live ModelPatcher when run in-process (world size 1)
    positive: list
    negative: list | None
    cfg: float
    noise: torch.Tensor
    latent_image: torch.Tensor
    sigmas: torch.Tensor
    sampler: SamplerSpec
    seed: int | None
    parallel: ParallelSpec
    denoise_mask: torch.Tensor | None = None
    preview: bool = True
    job_id: str = field(default="")

    def run(self, ctx: WorkerContext) -> dict:
        import comfy.samplers

        from ..split.comm import CommStats
        from ..split.layout import ParallelPlan, band_alignment
        from ..split.dit_parallel import apply_dit_parallel, is_dit_model
        from ..split.unet_parallel import BandParallelRuntime, apply_band_parallel

        t0 = time.perf_counter()
        positive, negative = self.positive, self.negative
        if isinstance(self.model, ModelPayload):  # shipped: rebuild the model and the conds' ControlNets
            model = build_model(self.model, ctx.cache)
            positive, negative = rebuild_conditioning(positive, negative, ctx.cache)
        else:
            model = self.model
        t_model = time.perf_counter() - t0
        stats = CommStats()
        runtime = None
        stale = None
        if self.parallel.world_size > 1:  # one device: ComfyUI's model as it is, nothing to split
            plan = ParallelPlan(self.parallel.world_size, self.parallel.cfg_parallel,
                                batch_split=self.parallel.world_size if self.parallel.mode == "batch" else 0)
            align = band_alignment(model)  # the one band rule, shared with the web overlay
            stale = self.parallel.stale_options(self.sigmas, int(self.latent_image.shape[-2]),
                                                int(self.latent_image.shape[-1]),
                                                model.get_model_object("model_sampling"))
            runtime = BandParallelRuntime(plan, ctx.rank, align, weights=self.parallel.weights, stats=stats,
                                          stale=stale, trace=self.parallel.trace,
                                          overlap=self.parallel.overlap)
            if is_dit_model(model):
                model = apply_dit_parallel(model, runtime, self.parallel.attention)
            else:
                model = apply_band_parallel(model, runtime)

        step_times: list[float] = []
        last = [time.perf_counter()]

        def callback(step: int, x0: torch.Tensor, x: torch.Tensor, total: int) -> None:
            now = time.perf_counter()
            step_times.append(now - last[0])
            last[0] = now
            ctx.progress(step=step, total=total, x0=x0.detach().cpu() if self.preview else None)
            ctx.check_cancel()  # collective: every rank stops at the same step

        if self.parallel.world_size > 1:
            model = _agree_on_batching(model, ctx, plan.bands_per_group)

        guider = comfy.samplers.CFGGuider(model)
        if negative is None:
            guider.inner_set_conds({"positive": positive})
        else:
            guider.set_conds(positive, negative)
        guider.set_cfg(self.cfg)
        device = model.load_device
        try:
            samples = guider.sample(self.noise, self.latent_image, self.sampler.build(), self.sigmas.to(device),
                                    denoise_mask=self.denoise_mask, callback=callback, disable_pbar=True, seed=self.seed)
        except JobCancelled:
            if runtime is not None:  # every rank stops at the same step: the same exchanges are in flight
                runtime.finish()
                runtime.close()
            raise
        comm_steps: list[dict] = []
        if runtime is not None:
            runtime.finish()  # the last step's background sends: every rank waits for its own
            comm_steps = runtime.step_summary()
            runtime.close()
        ctx.stats.update(
            rank=ctx.rank, device=str(ctx.device), model_build_s=round(t_model, 3),
            base_model_loads=ctx.cache.get("base_loads", 0), control_model_loads=ctx.cache.get("control_loads", 0),
            step_s=[round(s, 4) for s in step_times],
            comm=stats.as_dict(), steps=len(step_times),
            mode=self.parallel.mode, comm_steps=comm_steps,
            attention=sorted({c["attention"] for c in runtime.calls if "attention" in c}) if runtime else None,
            stale=None if stale is None else {
                "warmup": stale.warmup, "groupnorm": stale.groupnorm, "fraction": stale.fraction,
                "fraction_late": stale.fraction_late, "stale_calls": runtime.stale.stale_calls},  # type: ignore[union-attr]
        )
        if stats.trace is not None:
            ctx.stats["trace"] = stats.trace.as_dict()
        return {"samples": samples.detach().cpu()} if ctx.rank == 0 else {}


def _agree_on_batching(model, ctx: WorkerContext, bands: int):
    """Make ComfyUI's cond/uncond batching decision identical on every rank.

    calc_cond_batch batches when memory_required(shape) * 1.5 < free memory; ranks with different free
    memory would make different numbers of UNet calls and their collectives would not match. The ranks
    agree once on the smallest free memory, and a CALC_COND_BATCH wrapper answers memory_required from
    that budget (per band) while the batching is decided.
    """
    import comfy.model_management
    import comfy.patcher_extension
    import torch.distributed as dist

    free = torch.tensor([float(comfy.model_management.get_free_memory(model.load_device))], dtype=torch.float64,
                        device=ctx.collective_device)
    dist.all_reduce(free, op=dist.ReduceOp.MIN)
    budget = float(free.item())

    def calc_cond_batch(executor, base, conds, x_in, timestep, model_options):
        original = type(base).memory_required.__get__(base)

        def memory_required(input_shape, *args, **kwargs):
            return 0.0 if original(input_shape, *args, **kwargs) * 1.5 / bands < budget else float("inf")

        base.memory_required = memory_required  # the worker's own model, for this decision only
        try:
            return executor(base, conds, x_in, timestep, model_options)
        finally:
            base.__dict__.pop("memory_required", None)

    model = model.clone()
    model.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.CALC_COND_BATCH, "hires_parallel_batching",
                               calc_cond_batch)
    return model
