"""Block noise for Relay Diffusion (arXiv 2309.03350).

Block noise is spatially correlated unit-variance noise. Added to ordinary noise it restores the
low-frequency signal-to-noise ratio a low-resolution model saw at a given sigma, which keeps the
coarse structure of an upsampled latent from being rebuilt from scratch at high resolution.

Pure torch: nothing here imports ComfyUI.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor

__all__ = ["box_block_noise", "constant_block_noise", "mix_block_noise", "relay_noise", "VARIANTS"]

VARIANTS = ("box", "constant")


def _check_shape(shape: Sequence[int]) -> tuple[int, ...]:
    shape = tuple(int(s) for s in shape)
    if len(shape) not in (4, 5):
        raise ValueError(
            f"block noise needs a 4-D (B, C, H, W) or 5-D (B, C, T, H, W) latent shape, got {shape}; "
            "pass the latent's full shape"
        )
    if any(s < 1 for s in shape):
        raise ValueError(f"block noise shape {shape} has an empty dimension; pass a non-empty latent shape")
    return shape


def _check_block_size(block_size: int) -> int:
    if int(block_size) != block_size or block_size < 1:
        raise ValueError(f"block_size must be an integer >= 1, got {block_size!r}; use 1 for plain noise")
    return int(block_size)


def _randn(shape: tuple[int, ...], generator: torch.Generator | None, device) -> Tensor:
    # Draw in float32 on the generator's own device so a seed gives the same numbers whatever the
    # requested dtype/device; the caller casts and moves afterwards.
    gen_device = generator.device if generator is not None else torch.device(device)
    return torch.randn(shape, generator=generator, dtype=torch.float32, device=gen_device)


def _circular_window_sum(x: Tensor, k: int, dim: int) -> Tensor:
    """out[i] = sum_{p<k} x[(i - p) mod n] along `dim`, via one cumulative sum (O(n), not O(n k))."""
    n = x.shape[dim]
    # Prepend the last k-1 entries (circular padding), then window sums are differences of a cumsum.
    head = x.narrow(dim, n - (k - 1), k - 1)
    padded = torch.cat([head, x], dim=dim)
    zero = torch.zeros_like(x.narrow(dim, 0, 1))
    c = torch.cat([zero, padded.cumsum(dim)], dim=dim)
    # Padded index j = i + k - 1 holds x[i]; the window x[i-k+1..i] is padded[i..i+k-1] = c[i+k] - c[i].
    return c.narrow(dim, k, n) - c.narrow(dim, 0, n)


def box_block_noise(
    shape: Sequence[int],
    block_size: int,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> Tensor:
    """Relay Diffusion block noise: a k x k circular box sum of white noise over the last two dims, / k.

    Unit variance per element; correlation at offset (dx, dy) is (k-|dx|)(k-|dy|)/k^2 for |dx|, |dy| < k
    and 0 beyond. block_size 1 returns the white noise itself. 5-D shapes filter each frame separately.
    """
    shape = _check_shape(shape)
    k = _check_block_size(block_size)
    h, w = shape[-2], shape[-1]
    if k > min(h, w):
        # A window longer than the latent wraps onto itself and the variance is no longer 1.
        raise ValueError(
            f"block_size {k} is larger than the latent ({h} x {w}); use a block_size <= {min(h, w)}"
        )
    g = _randn(shape, generator, device)
    if k == 1:
        return g.to(device=device, dtype=dtype)
    # float64 accumulation keeps the cumsum differences exact enough for any latent size.
    acc = g.double()
    acc = _circular_window_sum(acc, k, -2)
    acc = _circular_window_sum(acc, k, -1)
    return (acc / k).to(device=device, dtype=dtype)


def constant_block_noise(
    shape: Sequence[int],
    block_size: int,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> Tensor:
    """Block-constant noise: N(0, 1) at ceil(H/k) x ceil(W/k), nearest-upsampled by k, cropped to H x W."""
    shape = _check_shape(shape)
    k = _check_block_size(block_size)
    h, w = shape[-2], shape[-1]
    low = _randn(shape[:-2] + (math.ceil(h / k), math.ceil(w / k)), generator, device)
    up = low.repeat_interleave(k, dim=-2).repeat_interleave(k, dim=-1)
    return up[..., :h, :w].contiguous().to(device=device, dtype=dtype)


def mix_block_noise(eps: Tensor, eps_block: Tensor, strength: float, normalize: bool = True) -> Tensor:
    """eps + s * eps_block, divided by sqrt(1 + s^2) when normalize (keeps unit variance for a stock model)."""
    if eps.shape != eps_block.shape:
        raise ValueError(
            f"eps {tuple(eps.shape)} and eps_block {tuple(eps_block.shape)} differ; draw both for the same latent"
        )
    out = eps + strength * eps_block
    if normalize:
        out = out / math.sqrt(1.0 + strength * strength)
    return out


def relay_noise(
    shape: Sequence[int],
    seed: int,
    block_size: int,
    strength: float,
    normalize: bool = True,
    variant: str = "box",
) -> Tensor:
    """Relay noise (float32, CPU): white noise eps then block noise, both from one generator seeded with `seed`.

    eps is drawn first, exactly as ComfyUI's prepare_noise does, so strength 0 reproduces ComfyUI's noise.
    """
    if variant not in VARIANTS:
        raise ValueError(f"unknown block noise variant {variant!r}; use one of {', '.join(VARIANTS)}")
    _check_block_size(block_size)
    if not strength >= 0:  # also rejects NaN
        raise ValueError(f"block noise strength must be >= 0, got {strength!r}; use 0 to turn it off")
    shape = _check_shape(shape)
    gen = torch.Generator(device="cpu")
    gen.manual_seed(int(seed))
    eps = torch.randn(shape, generator=gen)
    if strength == 0:
        # Bit-identical to ComfyUI's noise; no need to draw the block noise at all.
        return eps
    make = box_block_noise if variant == "box" else constant_block_noise
    eps_block = make(shape, block_size, generator=gen)
    return mix_block_noise(eps, eps_block, strength, normalize)
