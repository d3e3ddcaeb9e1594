"""Relay upscaling (Relay Diffusion, arXiv 2309.03350; CogView3 linear relay).

A low-resolution result is upsampled in latent space, re-noised to an intermediate sigma (the relay
point) and sampled from there at high resolution. This module holds the pure parts: latent resize,
the relay start state, timestep/sigma conversion, schedules that start exactly at the relay point,
and CogView3's linear relay sampler.

Pure torch: nothing here imports ComfyUI.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "UPSAMPLE_MODES",
    "upsample_latent",
    "relay_start",
    "sigma_from_timestep",
    "relay_schedule",
    "denoise_schedule",
    "linear_relay_step",
    "sample_linear_relay",
]

UPSAMPLE_MODES = ("nearest", "bilinear", "bicubic")


def upsample_latent(z: Tensor, scale: float, mode: str = "nearest") -> Tensor:
    """Resize the last two dims of a 4-D or 5-D latent to (round(H*scale), round(W*scale))."""
    if mode not in UPSAMPLE_MODES:
        raise ValueError(f"unknown upsample mode {mode!r}; use one of {', '.join(UPSAMPLE_MODES)}")
    if not scale >= 1:  # also rejects NaN
        raise ValueError(f"upsample scale must be >= 1, got {scale!r}; relay upscaling only enlarges")
    if z.dim() not in (4, 5):
        raise ValueError(f"latent must be 4-D (B, C, H, W) or 5-D (B, C, T, H, W), got shape {tuple(z.shape)}")
    if z.numel() == 0:
        raise ValueError(f"latent of shape {tuple(z.shape)} is empty; pass a non-empty latent")
    h, w = z.shape[-2], z.shape[-1]
    # Python round, as ComfyUI's LatentUpscaleBy does, so sizes agree with its nodes.
    size = (round(h * scale), round(w * scale))
    # All three modes work per channel, so frames of a 5-D latent can ride along as extra channels.
    flat = z.reshape(z.shape[0], -1, h, w)
    work = flat if flat.dtype in (torch.float32, torch.float64) else flat.float()
    if mode == "nearest":
        out = F.interpolate(work, size=size, mode="nearest-exact")
    else:
        out = F.interpolate(work, size=size, mode=mode, align_corners=False)
    return out.to(z.dtype).reshape(*z.shape[:-2], *size)


def relay_start(z_up: Tensor, noise: Tensor, sigma: float, flow: bool = False) -> Tensor:
    """Noised relay start state: z_up + sigma * noise (EPS/V), or (1 - sigma) * z_up + sigma * noise (flow)."""
    if z_up.shape != noise.shape:
        raise ValueError(
            f"latent {tuple(z_up.shape)} and noise {tuple(noise.shape)} differ; draw the noise for the upsampled latent"
        )
    if flow:
        return (1.0 - sigma) * z_up + sigma * noise
    return z_up + sigma * noise


def sigma_from_timestep(t: float, sigma_table: Tensor) -> float:
    """Sigma at a (fractional) timestep: log-linear interpolation in the model's per-timestep sigma table.

    Matches ComfyUI's ModelSamplingDiscrete.sigma, including clamping t to the table's range.
    """
    table = torch.as_tensor(sigma_table, dtype=torch.float64).flatten()
    if table.numel() < 1:
        raise ValueError("sigma_table is empty; pass the model's per-timestep sigma table")
    if not bool((table > 0).all()):
        raise ValueError("sigma_table must hold positive sigmas; pass the model's per-timestep sigma table")
    if math.isnan(t):
        raise ValueError("timestep is NaN; pass a timestep between 0 and len(sigma_table) - 1")
    t = min(max(float(t), 0.0), float(table.numel() - 1))
    lo, hi = math.floor(t), math.ceil(t)
    w = t - lo
    log_sigma = (1.0 - w) * math.log(float(table[lo])) + w * math.log(float(table[hi]))
    return math.exp(log_sigma)


def relay_schedule(
    schedule_fn: Callable[[int], Tensor],
    steps: int,
    sigma_relay: float,
    max_total: int | None = None,
) -> Tensor:
    """`steps + 1` sigmas starting exactly at sigma_relay and following the tail of a longer full schedule.

    Scans totals n in [steps, max_total] (default 50 * steps) and keeps the smallest n whose entry
    full[n - steps] is closest to sigma_relay in log sigma; that entry is replaced by sigma_relay. An n
    whose replacement would not be strictly decreasing is skipped for the next best one. The result has
    the schedule's dtype, so its first entry is sigma_relay rounded to that dtype.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}; use at least one step after the relay point")
    if not sigma_relay > 0:
        raise ValueError(f"sigma_relay must be > 0, got {sigma_relay!r}; pick a relay point above sigma 0")
    max_total = 50 * steps if max_total is None else int(max_total)
    if max_total < steps:
        raise ValueError(f"max_total ({max_total}) is below steps ({steps}); raise max_total")
    top = float(schedule_fn(steps)[0])
    if sigma_relay > top:
        raise ValueError(
            f"sigma_relay {sigma_relay:.4g} is above the schedule's maximum {top:.4g}; lower the relay point"
        )
    log_target = math.log(sigma_relay)
    candidates: list[tuple[float, int, Tensor]] = []
    for n in range(steps, max_total + 1):
        full = torch.as_tensor(schedule_fn(n))
        entry = float(full[n - steps])
        if entry <= 0:
            continue
        candidates.append((abs(math.log(entry) - log_target), n, full[n - steps:]))
        if candidates[-1][0] == 0.0:
            break  # exact hit; no later n can beat it and ties go to the smallest n
    # Best log distance first, smallest n on ties (sort is stable and n is increasing).
    candidates.sort(key=lambda c: c[0])
    for _, _, tail in candidates:
        tail = tail.clone()
        tail[0] = sigma_relay
        if bool((tail[1:] < tail[:-1]).all()):
            return tail
    raise ValueError(
        f"no schedule of {steps} to {max_total} total steps continues strictly below sigma_relay {sigma_relay:.4g}; "
        "raise the relay point or use fewer steps"
    )


def denoise_schedule(schedule_fn: Callable[[int], Tensor], steps: int, denoise: float) -> Tensor:
    """ComfyUI BasicScheduler's denoise rule: the last steps + 1 sigmas of a schedule of int(steps / denoise)."""
    if not denoise > 0:
        raise ValueError(f"denoise must be > 0, got {denoise!r}; use a value in (0, 1]")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if denoise >= 0.9999:
        return schedule_fn(steps)
    total = int(steps / denoise)
    return schedule_fn(total)[-(steps + 1):]


def linear_relay_step(
    x: Tensor,
    denoised: Tensor,
    z_low: Tensor,
    sigma: float,
    sigma_next: float,
    k: int,
    n_relay: int,
) -> Tensor:
    """CogView3 linear relay step (k counts down n_relay..1): blends out z_low linearly over the relay steps."""
    r = float(sigma_next) / float(sigma)
    beta = r * k / n_relay - (k - 1) / n_relay
    return r * x + (1.0 - r + beta) * denoised - beta * z_low


def sample_linear_relay(
    denoise: Callable[[Tensor, Tensor], Tensor],
    x: Tensor,
    sigmas: Tensor,
    z_low: Tensor,
    callback: Callable[[dict], None] | None = None,
    relay_steps: int | None = None,
) -> Tensor:
    """k-diffusion style sampler: DDIM (Euler) steps, then CogView3 linear relay steps for the last relay_steps.

    relay_steps None means every step is a relay step; values above the step count are clamped.
    """
    if z_low.shape != x.shape:
        raise ValueError(
            f"z_low {tuple(z_low.shape)} and x {tuple(x.shape)} differ; pass the upsampled low-res latent"
        )
    n_steps = len(sigmas) - 1
    n_relay = n_steps if relay_steps is None else int(relay_steps)
    if n_relay < 0:
        raise ValueError(f"relay_steps must be >= 0, got {relay_steps}; use 0 for plain DDIM")
    n_relay = min(n_relay, n_steps)
    for i in range(n_steps):
        sigma = sigmas[i]
        denoised = denoise(x, sigma * x.new_ones(x.shape[0]))
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigma, "sigma_hat": sigma, "denoised": denoised})
        s, s_next = float(sigma), float(sigmas[i + 1])
        steps_left = n_steps - i
        if steps_left <= n_relay:
            x = linear_relay_step(x, denoised, z_low, s, s_next, steps_left, n_relay)
        else:
            r = s_next / s
            x = r * x + (1.0 - r) * denoised
    return x
