"""ParaTAA Sampler: a SAMPLER for SamplerCustomAdvanced that solves the whole trajectory in parallel rounds.

The node is an adapter: `sample_parataa` (a module-level k-diffusion-style sampler function, so KSAMPLER
objects holding it pickle and the Patch-Parallel Guider can ship them to worker processes) turns
ComfyUI's model wrapper into a batched `denoise(x, sigma_vec)` and calls algorithms.parataa. Each round
is one batched model call (chunked), which the Patch-Parallel Guider spreads over its devices.
"""
from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from typing import Any, Hashable

import torch

import comfy.model_management
import comfy.model_sampling
import comfy.samplers
from comfy_api.v0_0_2 import io

from ..algorithms.parataa import VARIANTS, ParaTAAConfig, make_recurrence, parataa_sample, presample_noises

log = logging.getLogger("hires_parallel")

WARM_CACHE_SIZE = 4  # trajectories kept per process (each is steps + 1 latents, float32, CPU)
_warm_lock = threading.Lock()
_warm_cache: OrderedDict[tuple, torch.Tensor] = OrderedDict()
LAST_REPORT: dict[str, Any] = {}  # the last run in this process: rounds, evaluations, residuals


class ParaTAAInputError(ValueError):
    """Bad input to the ParaTAA sampler; the message says what to change."""

    user_facing = True


def clear_warm_cache() -> None:
    with _warm_lock:
        _warm_cache.clear()


def _warm_key(seed: int, x: torch.Tensor, sigmas: torch.Tensor, options: tuple) -> tuple:
    return (int(seed), tuple(x.shape), tuple(round(float(s), 6) for s in sigmas.flatten()), options)


def _warm_get(key: tuple) -> torch.Tensor | None:
    with _warm_lock:
        traj = _warm_cache.get(key)
        if traj is not None:
            _warm_cache.move_to_end(key)
        return traj


def _warm_put(key: tuple, traj: torch.Tensor) -> None:
    with _warm_lock:
        _warm_cache[key] = traj.detach().to("cpu", torch.float32)
        _warm_cache.move_to_end(key)
        while len(_warm_cache) > WARM_CACHE_SIZE:
            _warm_cache.popitem(last=False)


def _guider_and_base(model):
    """(CFGGuider-like wrapper, BaseModel) behind KSAMPLER's KSamplerX0Inpaint, or Nones."""
    guider = getattr(model, "inner_model", None)
    return guider, getattr(guider, "inner_model", None)


def _check_hooks(guider) -> None:
    # Hook keyframes advance with the sampling position; ParaTAA visits noise levels out of order.
    for conds in (getattr(guider, "conds", None) or {}).values():
        for c in conds or []:
            group = c.get("hooks") if isinstance(c, dict) else None
            for hook in getattr(group, "hooks", None) or []:
                kf = getattr(hook, "hook_keyframe", None)
                if kf is not None and not kf.is_empty():
                    raise ParaTAAInputError(
                        "ParaTAA evaluates many noise levels in each round, out of order, so hooks with scheduled "
                        "keyframes cannot follow it: remove the hook keyframes or use a sampler from KSamplerSelect.")


def _group_key(guider):
    """Function of sigma that changes wherever ComfyUI would treat a batch differently.

    ComfyUI decides which conds (timestep ranges) and ControlNets (timestep_range) apply from the FIRST
    sigma of a batch; a round's calls are split where that decision changes, so every state gets exactly
    what a sequential sampler gives it at its sigma.
    """
    starts, ends, controls = set(), set(), set()
    for conds in (getattr(guider, "conds", None) or {}).values():
        for c in conds or []:
            if not isinstance(c, dict):
                continue
            if "timestep_start" in c:
                starts.add(float(c["timestep_start"]))
            if "timestep_end" in c:
                ends.add(float(c["timestep_end"]))
            control, seen = c.get("control"), 0
            while control is not None and seen < 64:
                rng = getattr(control, "timestep_range", None)
                if rng is not None:
                    controls.add((float(rng[0]), float(rng[1])))
                control, seen = getattr(control, "previous_controlnet", None), seen + 1
    if not (starts or ends or controls):
        return None
    starts_l, ends_l, controls_l = sorted(starts), sorted(ends), sorted(controls)

    def key(sigma: float) -> Hashable:
        return (tuple(sigma > s for s in starts_l), tuple(sigma < e for e in ends_l),
                tuple(sigma > r0 or sigma < r1 for r0, r1 in controls_l))

    return key


def _make_denoise(model, extra_args: dict, batch: int):
    """denoise(x, sigma_vec) over a batch of (states x batch) latents through ComfyUI's model wrapper."""
    mask = extra_args.get("denoise_mask")
    if mask is None:
        return lambda xs, sig: model(xs, sig, **extra_args), 0
    if not isinstance(model, comfy.samplers.KSamplerX0Inpaint):
        return lambda xs, sig: model(xs, sig, **extra_args), 1  # unknown wrapper: one state per call
    mask = mask.expand(batch, *mask.shape[1:]) if mask.shape[0] == 1 else mask
    noise = model.noise.expand(batch, *model.noise.shape[1:]) if model.noise.shape[0] == 1 else model.noise
    latent = model.latent_image
    latent = latent.expand(batch, *latent.shape[1:]) if latent.shape[0] == 1 else latent

    def denoise(xs: torch.Tensor, sig: torch.Tensor) -> torch.Tensor:
        # The inpainting wrapper mixes in its noise and latent per latent: repeat them for every state.
        reps = xs.shape[0] // batch
        inner = comfy.samplers.KSamplerX0Inpaint(model.inner_model, model.sigmas)
        inner.noise, inner.latent_image = torch.cat([noise] * reps), torch.cat([latent] * reps)
        args = dict(extra_args, denoise_mask=torch.cat([mask] * reps))
        return inner(xs, sig, **args)

    return denoise, 0


@torch.no_grad()
def sample_parataa(model, x: torch.Tensor, sigmas: torch.Tensor, extra_args: dict | None = None, callback=None,
                   disable=None, variant: str = "ddim", eta: float = 1.0, s_noise: float = 1.0, window: int = 0,
                   order: int = 20, memory: int = 2, tolerance: float = 1e-3, tolerance_noise: float = 1e-3,
                   max_rounds: int = 0, batch_chunk: int = 0, warm_start: bool = True,
                   warm_keep_steps: int = 0) -> torch.Tensor:
    """k-diffusion-style sampler function (for KSAMPLER): ParaTAA over the given sigmas.

    Progress: the callback runs once per round with i = (steps finished so far) - 1, so ComfyUI's bar
    shows finished steps out of all steps and reaches the end when the trajectory has converged; an
    interrupt raised there (Cancel) stops the solve. Model calls also check for an interrupt.
    """
    extra_args = extra_args or {}
    n = len(sigmas) - 1
    if n < 1:
        return x
    seed = extra_args.get("seed")
    seed = 0 if seed is None else int(seed)
    guider, base = _guider_and_base(model)
    flow = isinstance(getattr(base, "model_sampling", None), comfy.model_sampling.CONST)
    _check_hooks(guider)
    rec = make_recurrence(sigmas, variant, eta, s_noise, flow)
    noises = presample_noises(rec, tuple(x.shape), seed, x.device, x.dtype)
    config = ParaTAAConfig(window=window, order=order, memory=memory, tol=tolerance, tol_noise=tolerance_noise,
                           max_rounds=max_rounds, chunk=batch_chunk)
    denoise, force_chunk = _make_denoise(model, extra_args, x.shape[0])
    if force_chunk:
        config.chunk = force_chunk
    key = _warm_key(seed, x, sigmas, (variant, float(eta), float(s_noise), flow))
    init = _warm_get(key) if warm_start else None

    def on_round(info: dict) -> None:
        if callback is not None:
            callback({"x": info["x"], "i": info["finished"] - 1, "sigma": info["sigma"], "sigma_hat": info["sigma"],
                      "denoised": info["denoised"]})

    out, report = parataa_sample(denoise, x, sigmas, rec, noises, config, init=init, keep=warm_keep_steps,
                                 callback=on_round, group_key=_group_key(guider),
                                 check_interrupt=comfy.model_management.throw_exception_if_processing_interrupted)
    if report.converged:
        _warm_put(key, report.trajectory)
    LAST_REPORT.clear()
    LAST_REPORT.update(steps=n, rounds=report.rounds, evaluations=report.evaluations, converged=report.converged,
                       warm_start=init is not None, finished=report.finished,
                       max_residual=[max(r) for r in report.residuals])
    log.info("HiRes Parallel ParaTAA: %d steps in %d rounds (%d model evaluations per latent)%s%s", n, report.rounds,
             report.evaluations, ", warm start" if init is not None else "",
             "" if report.converged else ", NOT converged: raise max_rounds or the tolerance")
    return out


_TOL = dict(min=0.0, max=1.0, step=0.0001, round=0.000001)


class HiResParallelParaTAASampler(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="HiResParallelParaTAASampler",
            display_name="ParaTAA Sampler (parallel in time)",
            category="sampling/custom_sampling/samplers",
            description="SAMPLER that solves all steps at once by fixed-point rounds with triangular Anderson "
                        "acceleration (ParaTAA): each round evaluates the model on a window of steps in one batch. "
                        "Converges to the DDIM (euler) or euler_ancestral result of the same sigmas in far fewer "
                        "rounds than steps; pays off with spare devices (Patch-Parallel Guider, mode batch), small "
                        "models and prompt iteration (warm start).",
            inputs=[
                io.Combo.Input("variant", options=list(VARIANTS), default="ddim",
                               tooltip="ddim: the deterministic DDIM step (equals ComfyUI's euler). ancestral: "
                                       "euler_ancestral with every step's noise drawn up front from the seed "
                                       "(equals ComfyUI's euler_ancestral for the same seed)."),
                io.Float.Input("eta", default=1.0, min=0.0, max=1.0, step=0.01,
                               tooltip="ancestral only: how much fresh noise each step adds (1 = DDPM-like)."),
                io.Float.Input("s_noise", default=1.0, min=0.0, max=2.0, step=0.01,
                               tooltip="ancestral only: scale of the added noise, as in euler_ancestral."),
                io.Int.Input("window", default=0, min=0, max=10000,
                             tooltip="Steps updated per round, i.e. model evaluations per round per latent. "
                                     "0 = all steps. Smaller windows use less memory and compute per round but "
                                     "need more rounds."),
                io.Int.Input("order", default=20, min=1, max=10000,
                             tooltip="How many steps each update looks back (order s of the nonlinear equations). "
                                     "1 is the plain Jacobi fixed point; 20 is the paper's choice for 50-step SD."),
                io.Int.Input("memory", default=2, min=1, max=8,
                             tooltip="Iterates kept for triangular Anderson acceleration. 1 turns it off (plain "
                                     "fixed point); 2 to 5 is recommended."),
                io.Float.Input("tolerance", default=0.001, **_TOL,
                               tooltip="A step is converged when the RMS of its one-step residual (in x / sqrt(1 + "
                                       "sigma^2) units) is at most this. Smaller = closer to the sequential "
                                       "result, more rounds."),
                io.Float.Input("tolerance_noise", default=0.001, **_TOL,
                               tooltip="Also accept a residual up to this times the noise a DDPM step would add "
                                       "there (looser at high noise levels when above tolerance)."),
                io.Int.Input("max_rounds", default=0, min=0, max=10000,
                             tooltip="Stop after this many rounds even if not converged. 0 = number of steps, "
                                     "which always suffices: every round finishes at least one step."),
                io.Int.Input("batch_chunk", default=0, min=0, max=10000,
                             tooltip="Most steps per model call (each call holds this many latents, twice with "
                                     "CFG). 0 = the whole window in one call. Lower it when memory runs out; with "
                                     "the Patch-Parallel Guider in batch mode keep it at least the device count."),
                io.Boolean.Input("warm_start", default=True,
                                 tooltip="Start from the previous run's trajectory for the same seed, latent size and "
                                         "sigmas (kept in memory, 4 runs): a small prompt change converges in a "
                                         "few rounds, an unchanged one in one round."),
                io.Int.Input("warm_keep_steps", default=0, min=0, max=10000,
                             tooltip="With a warm start, keep the first N steps of the previous trajectory as they "
                                     "are and solve only the rest (keeps the old composition, faster). 0 = "
                                     "re-solve every step that needs it."),
            ],
            outputs=[io.Sampler.Output()],
        )

    @classmethod
    def execute(cls, variant: str = "ddim", eta: float = 1.0, s_noise: float = 1.0, window: int = 0,
                order: int = 20, memory: int = 2, tolerance: float = 1e-3, tolerance_noise: float = 1e-3,
                max_rounds: int = 0, batch_chunk: int = 0, warm_start: bool = True,
                warm_keep_steps: int = 0) -> io.NodeOutput:
        if variant not in VARIANTS:
            raise ParaTAAInputError(f"variant must be one of {list(VARIANTS)}; got {variant!r}.")
        options = dict(variant=variant, eta=float(eta), s_noise=float(s_noise), window=int(window), order=int(order),
                       memory=int(memory), tolerance=float(tolerance), tolerance_noise=float(tolerance_noise),
                       max_rounds=int(max_rounds), batch_chunk=int(batch_chunk), warm_start=bool(warm_start),
                       warm_keep_steps=int(warm_keep_steps))
        try:  # the same checks the solver makes, before any model runs
            ParaTAAConfig(window=options["window"], order=options["order"], memory=options["memory"],
                          tol=options["tolerance"], tol_noise=options["tolerance_noise"],
                          max_rounds=options["max_rounds"], chunk=options["batch_chunk"]).check()
            if eta < 0 or s_noise < 0 or warm_keep_steps < 0:
                raise ValueError("eta, s_noise and warm_keep_steps must be >= 0")
        except ValueError as e:
            raise ParaTAAInputError(f"ParaTAA Sampler: {e}.") from None
        return io.NodeOutput(comfy.samplers.KSAMPLER(sample_parataa, extra_options=options))


PARATAA_NODES = [HiResParallelParaTAASampler]

__all__ = ["PARATAA_NODES", "HiResParallelParaTAASampler", "ParaTAAInputError", "sample_parataa", "clear_warm_cache",
           "LAST_REPORT"]
