"""Cooperation of two diffusion models (PanGu-Draw, arXiv 2312.16486): Coop-Diffusion and the
time-decoupled model switch.

The paper gives no code; this is the reconstruction in METHODS.md. Model A drives the sampler state
x_A. On a bridge step, A's clean estimate D_A is carried into B's latent space (decode with A's VAE,
resize to B's native size, encode with B's VAE), re-noised to B's equivalent noise level, denoised by
B, carried back the same way and fused: D = (1 - w) D_A + w D_BA.

Conventions (ComfyUI's): EPS/V models mix x = x0 + sigma * eps; flow models x = (1 - s) x0 + s * eps.
Both are the same state up to a scale when their noise-to-signal ratios agree, s / (1 - s) = sigma,
which is how noise levels are mapped between the two kinds.

Pure torch: nothing here imports ComfyUI. Models are ``denoise(x, sigma) -> D`` callables, VAEs are
``decode(z) -> image (B, 3, H, W) in [0, 1]`` and ``encode(image) -> z`` callables.
"""
from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "KINDS",
    "NOISE_MODES",
    "WEIGHT_SCHEDULES",
    "CoopBridge",
    "PersistentNoise",
    "bridge_state",
    "bridge_steps",
    "bridge_x0",
    "convert_noisy",
    "coop_denoise",
    "fusion_weight",
    "map_sigma",
    "noise_estimate",
    "noise_to_signal",
    "renoise",
    "resize_images",
    "resize_noise",
    "sigma_from_nsr",
    "split_at_sigma",
    "step_index",
    "transfer_noise",
]

KINDS = ("eps", "flow")
WEIGHT_SCHEDULES = ("constant", "linear", "cosine")
NOISE_MODES = ("transfer", "persistent")

Denoise = Callable[[Tensor, float], Tensor]
LatentMap = Callable[[Tensor], Tensor]


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"model kind must be one of {KINDS}, got {kind!r}")


# ---------------------------------------------------------------------------------------------
# noise levels


def noise_to_signal(sigma: float, kind: str) -> float:
    """The noise-to-signal ratio r of a noise level: sigma for EPS/V, s / (1 - s) for flow."""
    _check_kind(kind)
    sigma = float(sigma)
    if kind == "eps":
        return sigma
    return math.inf if sigma >= 1.0 else sigma / (1.0 - sigma)


def sigma_from_nsr(r: float, kind: str) -> float:
    """Inverse of noise_to_signal: the noise level of ``kind`` whose noise-to-signal ratio is r."""
    _check_kind(kind)
    r = float(r)
    if kind == "eps":
        return r
    return 1.0 if math.isinf(r) else r / (1.0 + r)


def map_sigma(sigma: float, from_kind: str, to_kind: str, sigma_max_to: float = math.inf) -> float:
    """The noise level of a ``to_kind`` model equivalent to ``sigma`` of a ``from_kind`` model.

    Between kinds the result is capped at ``sigma_max_to`` (a flow model's pure noise, s = 1, has no
    finite EPS equivalent). Within one kind sigma passes unchanged: schedules overshoot sigma_max by
    float rounding, and a model evaluates any sigma.
    """
    if from_kind == to_kind:
        _check_kind(from_kind)
        return float(sigma)
    return min(sigma_from_nsr(noise_to_signal(sigma, from_kind), to_kind), float(sigma_max_to))


def _signal_scale(sigma: float, kind: str) -> float:
    # x = scale * (x0 + r * eps): 1 for EPS/V, 1 - s for flow.
    return 1.0 if kind == "eps" else 1.0 - float(sigma)


def renoise(z0: Tensor, noise: Tensor, sigma: float, kind: str) -> Tensor:
    """The noisy state at ``sigma``: z0 + sigma * noise (EPS/V) or (1 - s) z0 + s * noise (flow)."""
    _check_kind(kind)
    if z0.shape != noise.shape:
        raise ValueError(f"clean latent {tuple(z0.shape)} and noise {tuple(noise.shape)} must have one shape")
    if kind == "eps":
        return z0 + float(sigma) * noise
    return (1.0 - float(sigma)) * z0 + float(sigma) * noise


def noise_estimate(x: Tensor, denoised: Tensor, sigma: float, kind: str) -> Tensor:
    """The unit-variance noise that ``denoised`` implies in ``x``: the inverse of renoise."""
    _check_kind(kind)
    sigma = float(sigma)
    if sigma <= 0:
        raise ValueError(f"the noise estimate needs sigma > 0, got {sigma}")
    if kind == "eps":
        return (x - denoised) / sigma
    return (x - (1.0 - sigma) * denoised) / sigma


def convert_noisy(x: Tensor, sigma: float, from_kind: str, to_kind: str,
                  sigma_max_to: float = math.inf) -> tuple[Tensor, float]:
    """The same noisy state seen by a model of another kind: (x_to, sigma_to), equal noise-to-signal ratio.

    When ``sigma_max_to`` caps the level, the state is scaled so that its noise part matches sigma_to
    (x = scale * x0 + sigma * eps in both conventions); the signal is negligible that high anyway.
    """
    if from_kind == to_kind:
        return x, map_sigma(sigma, from_kind, to_kind)
    unclamped = map_sigma(sigma, from_kind, to_kind)
    sigma_to = min(unclamped, float(sigma_max_to))
    if sigma_to < unclamped:
        return x * (sigma_to / float(sigma)), sigma_to
    return x * (_signal_scale(sigma_to, to_kind) / _signal_scale(sigma, from_kind)), sigma_to


# ---------------------------------------------------------------------------------------------
# noise in another latent shape


class PersistentNoise:
    """Seeded unit Gaussian noise, one fixed tensor per (tag, shape) for the whole run.

    B's re-noising uses the same noise on every bridge step, so B sees one consistent trajectory
    instead of fresh noise each step. Tensors are drawn on the CPU (device independent) in float32.
    """

    def __init__(self, seed: int) -> None:
        self.seed = int(seed)
        self._cache: dict[tuple, Tensor] = {}

    def __call__(self, shape: Sequence[int], tag: str = "xi") -> Tensor:
        key = (tag, tuple(int(s) for s in shape))
        if key not in self._cache:
            salt = zlib.crc32(repr(key).encode("ascii"))
            g = torch.Generator().manual_seed((self.seed * 1_000_003 + salt) % (2**63))
            self._cache[key] = torch.randn(key[1], generator=g)
        return self._cache[key]


def _resize_axis(noise: Tensor, axis: int, out: int, fresh: PersistentNoise) -> Tensor | None:
    n = noise.shape[axis]
    if out == n:
        return noise
    split = list(noise.shape)
    if n % out == 0:  # shrink by k: sqrt(k) * mean of k keeps unit variance (k * avgpool_k in 2-D)
        k = n // out
        split[axis:axis + 1] = [out, k]
        return noise.reshape(split).mean(dim=axis + 1) * math.sqrt(k)
    if out % n == 0:  # grow by k: draw i.i.d. noise whose k-block means, times sqrt(k), equal the input
        k = out // n
        full = list(noise.shape)
        full[axis] = out
        xi = fresh(full, "resize").to(device=noise.device, dtype=noise.dtype)
        split[axis:axis + 1] = [n, k]
        blocks = xi.reshape(split)
        blocks = blocks - blocks.mean(dim=axis + 1, keepdim=True) + noise.unsqueeze(axis + 1) / math.sqrt(k)
        return blocks.reshape(full)
    return None


def resize_noise(noise: Tensor, size: Sequence[int], fresh: PersistentNoise) -> Tensor:
    """Unit-variance i.i.d. noise of spatial ``size`` (last two dims) that agrees with ``noise``.

    Shrinking by an integer k per side is eps_LR = k * avgpool_k(eps_HR). Growing by k draws the
    high-resolution noise conditioned on that rule, so shrinking the result gives ``noise`` back.
    Sides whose ratio is not an integer (either way) get the persistent noise instead.
    """
    if noise.dim() < 3:
        raise ValueError(f"noise must have spatial dims (..., H, W), got shape {tuple(noise.shape)}")
    out = noise
    for axis, target in ((-2, int(size[0])), (-1, int(size[1]))):
        out = _resize_axis(out, out.dim() + axis, target, fresh)
        if out is None:
            shape = (*noise.shape[:-2], int(size[0]), int(size[1]))
            return fresh(shape, "xi").to(device=noise.device, dtype=noise.dtype)
    return out


def transfer_noise(eps: Tensor, shape: Sequence[int], fresh: PersistentNoise, mode: str = "transfer") -> Tensor:
    """The noise B's latent is re-noised with.

    ``transfer``: A's own noise estimate, resized by the unit-variance rule, when the channel counts
    agree (so two identical models see the same state); the persistent noise when they differ.
    ``persistent``: always the persistent per-run noise in B's shape.
    """
    if mode not in NOISE_MODES:
        raise ValueError(f"noise mode must be one of {NOISE_MODES}, got {mode!r}")
    shape = tuple(int(s) for s in shape)
    if mode == "transfer" and eps.shape[:-2] == shape[:-2]:
        return resize_noise(eps, shape[-2:], fresh)
    return fresh(shape, "xi").to(device=eps.device, dtype=eps.dtype)


# ---------------------------------------------------------------------------------------------
# x0 estimates between latent spaces


def resize_images(images: Tensor, size: Sequence[int]) -> Tensor:
    """Bicubic (antialiased when shrinking) resize of (B, C, H, W) images in [0, 1]."""
    size = (int(size[0]), int(size[1]))
    if tuple(images.shape[-2:]) == size:
        return images
    work = images if images.dtype in (torch.float32, torch.float64) else images.float()
    out = F.interpolate(work, size=size, mode="bicubic", align_corners=False, antialias=True)
    return out.clamp(0.0, 1.0).to(images.dtype)


def bridge_x0(z: Tensor, decode: LatentMap, encode: LatentMap, pixel_size: Sequence[int]) -> Tensor:
    """Carry a clean latent into another latent space: encode(resize(decode(z), pixel_size))."""
    return encode(resize_images(decode(z), pixel_size))


# ---------------------------------------------------------------------------------------------
# when and how much


def _progress(sigma: float, sigma_first: float, sigma_last: float) -> float:
    # Position between the run's first and last noise level, in log sigma (0 at the start, 1 at the end).
    if sigma_first <= 0 or sigma_last <= 0 or sigma_first == sigma_last:
        return 0.0
    if sigma <= 0:
        return 1.0
    p = (math.log(sigma_first) - math.log(sigma)) / (math.log(sigma_first) - math.log(sigma_last))
    return min(1.0, max(0.0, p))


def fusion_weight(sigma: float, sigma_first: float, sigma_last: float, w_start: float, w_end: float,
                  schedule: str = "constant") -> float:
    """B's share w at ``sigma``: constant w_start, or from w_start (first sigma) to w_end (last nonzero sigma)."""
    if schedule not in WEIGHT_SCHEDULES:
        raise ValueError(f"weight schedule must be one of {WEIGHT_SCHEDULES}, got {schedule!r}")
    if schedule == "constant":
        return float(w_start)
    p = _progress(float(sigma), float(sigma_first), float(sigma_last))
    if schedule == "cosine":
        p = 0.5 - 0.5 * math.cos(math.pi * p)
    return float(w_start) + (float(w_end) - float(w_start)) * p


def step_index(sigma: float, sigmas: Sequence[float]) -> int:
    """The step whose starting noise level is nearest ``sigma`` (log scale); step i starts at sigmas[i]."""
    starts = [float(s) for s in sigmas][:-1] if len(sigmas) > 1 else [float(s) for s in sigmas]
    if not starts:
        raise ValueError("step_index needs a non-empty schedule")
    sigma = float(sigma)
    if sigma <= 0:
        return len(starts) - 1
    return min(range(len(starts)), key=lambda i: abs(math.log(sigma) - math.log(starts[i])) if starts[i] > 0 else math.inf)


def bridge_steps(sigmas: Sequence[float], sigma_hi: float, sigma_lo: float, every_k: int = 1) -> frozenset[int]:
    """Steps that run the bridge: those starting inside [sigma_lo, sigma_hi], then every k-th of them."""
    if int(every_k) != every_k or every_k < 1:
        raise ValueError(f"every_k must be an integer >= 1, got {every_k!r}")
    starts = [float(s) for s in sigmas][:-1]
    inside = [i for i, s in enumerate(starts) if sigma_lo <= s <= sigma_hi]
    return frozenset(inside[::int(every_k)])


def split_at_sigma(sigmas: Tensor, sigma_switch: float) -> tuple[Tensor, Tensor]:
    """Split a schedule where steps stop starting at or above ``sigma_switch``.

    Returns (first, second) sharing the boundary sigma: the first model runs the steps that start at
    sigma >= sigma_switch, the second the rest. Either part can be empty (fewer than 2 sigmas).
    """
    starts = sigmas[:-1]
    n_first = int((starts >= sigma_switch).sum()) if starts.numel() else 0
    if n_first and not bool((starts[:n_first] >= sigma_switch).all()):
        raise ValueError("sigmas must be non-increasing to split a schedule at a noise level")
    first = sigmas[:n_first + 1] if n_first else sigmas[:0]
    second = sigmas[n_first:] if n_first < starts.numel() else sigmas[:0]
    return first, second


# ---------------------------------------------------------------------------------------------
# the bridge step


@dataclass
class CoopBridge:
    """How A's latent space reaches B's and back.

    ``to_b`` / ``to_a`` carry a clean latent across (bridge_x0 with the two VAEs); None for both means
    the two models share one latent space and size, and B sees A's noisy state directly.
    ``noise`` makes B's re-noising noise from A's noise estimate and B's latent shape.
    """

    to_b: LatentMap | None = None
    to_a: LatentMap | None = None
    noise: Callable[[Tensor, Sequence[int]], Tensor] | None = None

    @property
    def shares_latent(self) -> bool:
        return self.to_b is None


def bridge_state(x_a: Tensor, d_a: Tensor, sigma_a: float, kind_a: str, kind_b: str, bridge: CoopBridge,
                 sigma_max_b: float = math.inf) -> tuple[Tensor, Tensor, float]:
    """B's view of A's noisy state: (z_B0, noise_B, sigma_B) with x_B = renoise(z_B0, noise_B, sigma_B, kind_B)."""
    sigma_b = map_sigma(sigma_a, kind_a, kind_b, sigma_max_b)
    eps_a = noise_estimate(x_a, d_a, sigma_a, kind_a)
    if bridge.shares_latent:
        return d_a, eps_a, sigma_b
    z_b0 = bridge.to_b(d_a)
    if bridge.noise is None:
        raise ValueError("a bridge between latent spaces needs a noise rule for B")
    return z_b0, bridge.noise(eps_a, tuple(z_b0.shape)).to(device=z_b0.device, dtype=z_b0.dtype), sigma_b


def coop_denoise(x_a: Tensor, sigma_a: float, denoise_a: Denoise, denoise_b: Denoise, w: float, kind_a: str,
                 kind_b: str, bridge: CoopBridge, sigma_max_b: float = math.inf) -> Tensor:
    """One Coop-Diffusion prediction for A's state: (1 - w) D_A + w D_BA.

    w = 0 never calls B. With a shared latent space B gets A's state converted to its kind (no D_A is
    needed to build it, so w = 1 never calls A); across latent spaces B gets Enc_B(resize(Dec_A(D_A)))
    re-noised to B's equivalent sigma, and B's estimate comes back as Enc_A(resize(Dec_B(D_B))).
    """
    w = float(w)
    if w == 0.0:
        return denoise_a(x_a, sigma_a)
    if bridge.shares_latent:
        x_b, sigma_b = convert_noisy(x_a, sigma_a, kind_a, kind_b, sigma_max_b)
        d_ba = denoise_b(x_b, sigma_b)
        if w == 1.0:
            return d_ba
        d_a = denoise_a(x_a, sigma_a)
    else:
        d_a = denoise_a(x_a, sigma_a)
        z_b0, noise_b, sigma_b = bridge_state(x_a, d_a, sigma_a, kind_a, kind_b, bridge, sigma_max_b)
        d_b = denoise_b(renoise(z_b0, noise_b, sigma_b, kind_b), sigma_b)
        d_ba = bridge.to_a(d_b).to(device=d_a.device, dtype=d_a.dtype)
        if w == 1.0:
            return d_ba
    return (1.0 - w) * d_a + w * d_ba
