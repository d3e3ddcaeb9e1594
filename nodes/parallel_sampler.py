"""Patch-parallel sampling nodes: a KSampler and a GUIDER that split each UNet step over several devices,
plus pool status and shutdown. Thin adapters over parallel.submit."""
from __future__ import annotations

import json

import comfy.model_management
import comfy.sample
import comfy.samplers
import comfy.utils
import latent_preview
from comfy_api.v0_0_2 import io, ui

from ..parallel.runtime import monitor, submit
from ..parallel.runtime.sampling_job import SamplerSpec, sampler_spec


def _parallel_inputs() -> list:
    return [
        io.Int.Input("devices", default=0, min=0, max=64,
                     tooltip="How many devices split each step. 0 = every visible GPU (mode auto: the planner picks "
                             "how many of them, on CPU up to one process per core). Asking for more GPUs than exist "
                             "runs on those that exist (see the log). 1 runs in this process."),
        io.Combo.Input("device_kind", options=submit.DEVICE_KINDS, default="auto",
                       tooltip="auto: CUDA GPUs when present, else CPU processes. cpu: N worker processes on the CPU "
                               "(gloo), to try the pipeline without GPUs."),
        io.Combo.Input("mode", options=submit.NODE_MODES, default="auto",
                       tooltip="auto: a planner picks the fastest plan that gives the single-device image (exact bands, "
                               "batch, CFG parallel, or 1 device when splitting would not pay) from this model's "
                               "measured step time and the measured link; it never picks a plan it predicts slower "
                               "than 1 device, and says what it picked and why (log, Pool Status, panel). "
                               "auto_approximate: may also pick displaced or partial. "
                               "exact: the image is cut into row bands that exchange halos, GroupNorm statistics and "
                               "attention keys/values every layer; equals the single-device image up to float rounding. "
                               "displaced (DistriFusion): after a few exact warmup steps each band reuses what the others "
                               "sent during the previous step and sends its own in the background, so devices do not "
                               "wait for each other; nearly the same image, faster on slow links. partial (PCPP): like "
                               "displaced, but attention only looks at part of the two neighbouring bands, which talk "
                               "point to point; least traffic, small changes near distant regions. "
                               "batch: each model call's batch (images of a batch, cond/uncond, views, time steps) is "
                               "shared out over the devices; no bands, also exact."),
        io.Combo.Input("cfg_parallel", options=submit.CFG_PARALLEL, default="auto",
                       tooltip="Run the positive and negative prompt on different halves of the devices. auto: on for an "
                               "even number of devices when there is a negative prompt and cfg is not 1 (at cfg 1 "
                               "ComfyUI skips the negative prompt, so all devices split bands; on is refused)."),
        io.String.Input("device_weights", default="", optional=True,
                        tooltip="Optional relative speed per device, in device order, e.g. 2,1 when the first GPU is "
                                "twice as fast: faster devices get taller bands. Empty = equal bands."),
        io.Int.Input("warmup", default=0, min=0, max=10000, optional=True,
                     tooltip="displaced / partial: exact steps before data of the previous step is reused. "
                             "0 = auto: exact while the composition forms (noise level above 0.6 of the schedule), at least "
                             "10% of the steps. More warmup: closer to exact, slower."),
        io.Float.Input("partial_fraction", default=0.3, min=0.0, max=1.0, step=0.05, optional=True,
                       tooltip="partial: how much of each neighbouring band (the rows nearest to a band) its attention "
                               "sees, in the first half of the steps. 0.3 as in the PCPP paper; 1 = whole neighbours."),
        io.Float.Input("partial_fraction_late", default=-1.0, min=-1.0, max=1.0, step=0.05, optional=True,
                       tooltip="partial: the same for the second half of the steps (fine detail). "
                               "-1 = same as partial_fraction."),
        io.Combo.Input("groupnorm", options=list(submit.GROUPNORM_POLICIES), default="auto", optional=True,
                       tooltip="displaced / partial: how GroupNorm statistics are shared. corrected: the other bands' "
                               "statistics of the previous step with this band's fresh ones (no waiting). sync: exact "
                               "every step (tiny messages, but each one waits); the fix when images come out black or "
                               "washed out. auto: sync up to 1024x1024 pixels, corrected above."),
        io.Combo.Input("comfy_gpu", options=submit.COMFY_GPU, default="share", optional=True,
                       tooltip="share: workers use every GPU, the one ComfyUI's own models are on included (its "
                               "models are unloaded from it for the run and come back for the VAE decode). avoid: "
                               "leave ComfyUI's GPU to ComfyUI (its VAE, other samplers) and split over the others."),
        io.Combo.Input("sequence_attention", options=list(submit.ATTENTION_MODES), default="auto", optional=True,
                       tooltip="DiT models (Flux, SD3, Qwen-Image, Wan), exact mode: how a band's attention sees the "
                               "other bands. gathered_kv: every band receives the others' keys/values (any device "
                               "count). ulysses: an all-to-all over attention heads; fewer bytes from 3 devices on, "
                               "needs the head count to divide by the bands. auto: ulysses where it applies and "
                               "pays, else gathered_kv. The pool status says which ran."),
    ]


def _mode_options(warmup: int, partial_fraction: float, partial_fraction_late: float,
                  groupnorm: str, sequence_attention: str = "auto") -> submit.ModeOptions:
    return submit.ModeOptions(warmup=warmup, partial_fraction=partial_fraction,
                              partial_fraction_late=partial_fraction_late, groupnorm=groupnorm,
                              attention=sequence_attention)


class HiResParallelPatchParallelKSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="HiResParallelPatchParallelKSampler",
            display_name="Patch-Parallel KSampler",
            category="sampling",
            description="KSampler whose every step is split over several devices: the image is cut into row bands, "
                        "one per device, that exchange what they need at each layer. Your model, LoRAs, sampler and "
                        "scheduler are ComfyUI's own. Exact mode gives the single-device image; displaced and partial "
                        "modes hide the communication for speed on slower links.",
            inputs=[
                io.Model.Input("model", tooltip="The model used for denoising: SD1.x/2.x/SDXL UNets, Flux, SD3, "
                                                "Qwen-Image or Wan (LoRAs apply)."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                             tooltip="The random seed used for creating the noise."),
                io.Int.Input("steps", default=20, min=1, max=10000, tooltip="The number of denoising steps."),
                io.Float.Input("cfg", default=8.0, min=0.0, max=100.0, step=0.1, round=0.01,
                               tooltip="Classifier-free guidance scale."),
                io.Combo.Input("sampler_name", options=comfy.samplers.SAMPLER_NAMES, tooltip="Any ComfyUI sampler."),
                io.Combo.Input("scheduler", options=comfy.samplers.SCHEDULER_NAMES, tooltip="Any ComfyUI scheduler."),
                io.Conditioning.Input("positive", tooltip="What the image should contain."),
                io.Conditioning.Input("negative", tooltip="What the image should not contain."),
                io.Latent.Input("latent_image", tooltip="The latent to denoise (an empty latent for txt2img)."),
                io.Float.Input("denoise", default=1.0, min=0.0, max=1.0, step=0.01,
                               tooltip="How much of the schedule to run, as in KSampler."),
                *_parallel_inputs(),
            ],
            outputs=[io.Latent.Output()],
        )

    @classmethod
    @monitor.watched  # every refusal reaches the web panel's last error, not only those of run_sampling
    def execute(cls, model, seed: int, steps: int, cfg: float, sampler_name: str, scheduler: str, positive, negative,
                latent_image: dict, denoise: float, devices: int, device_kind: str, mode: str,
                cfg_parallel: str, device_weights: str = "", warmup: int = 0, partial_fraction: float = 0.3,
                partial_fraction_late: float = -1.0, groupnorm: str = "auto",
                comfy_gpu: str = "share", sequence_attention: str = "auto") -> io.NodeOutput:
        latent = comfy.sample.fix_empty_latent_channels(model, latent_image["samples"])
        noise = comfy.sample.prepare_noise(latent, seed, latent_image.get("batch_index"))
        ks = comfy.samplers.KSampler(model, steps=steps, device="cpu", sampler=sampler_name, scheduler=scheduler,
                                     denoise=denoise, model_options=model.model_options)
        out = latent_image.copy()
        if ks.sigmas.shape[-1] == 0:  # denoise 0: nothing to do, as KSampler
            out["samples"] = latent
            return io.NodeOutput(out)
        callback = latent_preview.prepare_callback(model, ks.sigmas.shape[-1] - 1)
        samples = submit.run_sampling(
            model, positive, negative, cfg, noise, latent, ks.sigmas, SamplerSpec(name=sampler_name), seed,
            latent_image.get("noise_mask"),
            submit.resolve_devices(devices, device_kind, comfy_gpu, auto=mode in submit.AUTO_MODES), cfg_parallel,
            mode, callback,
            device_weights, _mode_options(warmup, partial_fraction, partial_fraction_late, groupnorm,
                                         sequence_attention))
        out["samples"] = samples.to(comfy.model_management.intermediate_device())
        return io.NodeOutput(out)


class PatchParallelGuider(comfy.samplers.CFGGuider):
    """CFGGuider whose sampling runs through the patch-parallel runtime."""

    def __init__(self, model_patcher, devices: list[str], cfg_parallel: str, mode: str, device_weights: str = "",
                 options: submit.ModeOptions | None = None):
        super().__init__(model_patcher)
        self.devices, self.cfg_parallel, self.mode, self.device_weights = devices, cfg_parallel, mode, device_weights
        self.options = options
        self.raw_positive = self.raw_negative = None

    def set_conds(self, positive, negative):
        self.raw_positive, self.raw_negative = positive, negative
        super().set_conds(positive, negative)

    @monitor.watched  # refusals before run_sampling (e.g. a sampler that cannot be shipped) reach the panel too
    def sample(self, noise, latent_image, sampler, sigmas, denoise_mask=None, callback=None, disable_pbar=False,
               seed=None):
        if sigmas.shape[-1] == 0:
            return latent_image
        spec = SamplerSpec(obj=sampler) if len(self.devices) == 1 else sampler_spec(sampler)
        return submit.run_sampling(self.model_patcher, self.raw_positive, self.raw_negative, self.cfg, noise,
                                   latent_image, sigmas.cpu(), spec, seed, denoise_mask, self.devices,
                                   self.cfg_parallel, self.mode, callback, self.device_weights, self.options)


class HiResParallelPatchParallelGuider(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="HiResParallelPatchParallelGuider",
            display_name="Patch-Parallel Guider",
            category="sampling/custom_sampling/guiders",
            description="A CFG guider for SamplerCustomAdvanced that splits every step over several devices, so custom "
                        "sigmas, noise (Block Noise too) and samplers run patch-parallel.",
            inputs=[
                io.Model.Input("model", tooltip="The model used for denoising: SD1.x/2.x/SDXL UNets, Flux, SD3, "
                                                "Qwen-Image or Wan (LoRAs apply)."),
                io.Conditioning.Input("positive", tooltip="What the image should contain."),
                io.Conditioning.Input("negative", tooltip="What the image should not contain."),
                io.Float.Input("cfg", default=8.0, min=0.0, max=100.0, step=0.1, round=0.01,
                               tooltip="Classifier-free guidance scale."),
                *_parallel_inputs(),
            ],
            outputs=[io.Guider.Output()],
        )

    @classmethod
    @monitor.watched  # a refusal here (devices, device_kind) reaches the web panel's last error too
    def execute(cls, model, positive, negative, cfg: float, devices: int, device_kind: str, mode: str,
                cfg_parallel: str, device_weights: str = "", warmup: int = 0, partial_fraction: float = 0.3,
                partial_fraction_late: float = -1.0, groupnorm: str = "auto",
                comfy_gpu: str = "share", sequence_attention: str = "auto") -> io.NodeOutput:
        available = submit.resolve_devices(devices, device_kind, comfy_gpu, auto=mode in submit.AUTO_MODES)
        guider = PatchParallelGuider(model, available, cfg_parallel, mode,
                                     device_weights, _mode_options(warmup, partial_fraction, partial_fraction_late,
                                                                   groupnorm, sequence_attention))
        guider.set_conds(positive, negative)
        guider.set_cfg(cfg)
        return io.NodeOutput(guider)


def pool_status_text() -> str:
    from ..parallel.runtime.pool import current_pool

    pool = current_pool()
    last = dict(submit.LAST_RUN) if submit.LAST_RUN else None
    if last is not None and last.get("ranks"):  # a trace's events stay out of the text: its summary is there
        last["ranks"] = [{k: v for k, v in r.items() if k != "trace"} for r in last["ranks"]]
    status = {"pool": pool.status() if pool is not None else {"warm": False, "devices": []}, "last_run": last}
    return json.dumps(status, indent=1, default=str)


class HiResParallelPoolStatus(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="HiResParallelPoolStatus",
            display_name="Parallel Pool Status",
            category="sampling/hires_parallel",
            description="Shows the worker pool: devices, whether it is warm, and the last run's time per step, and "
                        "bytes sent / received and time waiting on communication per step and per rank, by kind.",
            inputs=[io.Int.Input("refresh", default=0, min=0, max=0xFFFFFFFF,
                                 tooltip="Any value; change it (or queue again) to read the status anew.")],
            outputs=[io.String.Output(display_name="status")],
            is_output_node=True,
            not_idempotent=True,
        )

    @classmethod
    def execute(cls, refresh: int) -> io.NodeOutput:
        text = pool_status_text()
        return io.NodeOutput(text, ui=ui.PreviewText(text))


class HiResParallelPoolShutdown(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="HiResParallelPoolShutdown",
            display_name="Parallel Pool Shutdown",
            category="sampling/hires_parallel",
            description="Stops the worker processes and frees their memory. The next patch-parallel run starts them again.",
            inputs=[io.Int.Input("trigger", default=0, min=0, max=0xFFFFFFFF,
                                 tooltip="Any value; the node runs every time the graph is queued.")],
            outputs=[io.String.Output(display_name="status")],
            is_output_node=True,
            not_idempotent=True,
        )

    @classmethod
    def execute(cls, trigger: int) -> io.NodeOutput:
        from ..parallel.runtime.pool import shutdown_pool

        shutdown_pool()
        submit.close_weight_store()
        text = pool_status_text()
        return io.NodeOutput(text, ui=ui.PreviewText(text))


PARALLEL_NODES = [
    HiResParallelPatchParallelKSampler,
    HiResParallelPatchParallelGuider,
    HiResParallelPoolStatus,
    HiResParallelPoolShutdown,
]
