"""Block noise (Relay Diffusion): statistics, exact formula on small inputs, seeding, errors.

Statistical tolerances are derived from the sample size: for box noise the effective number of
independent samples is N / (sum_d rho(d)^2)^2 with rho(d) = (k - |d|) / k, and the bounds are 6
standard errors. The `*_rejects_broken_*` tests run the same checks on deliberately wrong noise to
show the tolerances are tight enough to catch real mistakes.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from hires_parallel.algorithms.block_noise import (
    box_block_noise,
    constant_block_noise,
    mix_block_noise,
    relay_noise,
)

BIG = (4, 4, 256, 256)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _rho(d: int, k: int) -> float:
    return max(0, k - abs(d)) / k


def _n_eff(n: int, k: int) -> float:
    s = sum(_rho(d, k) ** 2 for d in range(-k + 1, k))
    return n / (s * s)


def _corr(x: torch.Tensor, dy: int, dx: int, var: float | None = None) -> float:
    """Circular empirical correlation at offset (dy, dx) over the last two dims (x: centred when var given)."""
    if var is None:
        x = x.double()
        x = x - x.mean()
        var = float((x * x).mean())
    y = torch.roll(x, shifts=(dy, dx), dims=(-2, -1))
    return float((x * y).mean()) / var


def box_stat_errors(x: torch.Tensor, k: int) -> list[str]:
    """Every way `x` fails to look like unit-variance box block noise of size k (empty list: looks right)."""
    errors = []
    n = x.numel()
    ne = _n_eff(n, k)
    x64 = x.double()
    mean_tol = 6 * k / math.sqrt(n)  # var(mean) = (1/N) * (sum of all correlations) = k^2 / N
    var_tol = 6 * math.sqrt(2 / ne)
    corr_tol = 6 * math.sqrt(2 / ne)
    if abs(float(x64.mean())) > mean_tol:
        errors.append(f"mean {float(x64.mean()):.4f} beyond {mean_tol:.4f}")
    var = float(x64.var())
    if abs(var - 1) > var_tol:
        errors.append(f"variance {var:.4f} not 1 within {var_tol:.4f}")
    # Border rows/columns: a non-circular sum loses variance there.
    for name, part in (("top rows", x64[..., : k - 1, :]), ("left cols", x64[..., :, : k - 1])):
        if part.numel() == 0:
            continue
        tol = 6 * math.sqrt(2 / _n_eff(part.numel(), k))
        pv = float(part.pow(2).mean())
        if abs(pv - 1) > tol:
            errors.append(f"{name} variance {pv:.4f} not 1 within {tol:.4f}")
    # Correlation grid over both axes and both diagonals, past the block size.
    # All circular autocorrelations at once (Wiener-Khinchin), averaged over batch and channels.
    centred = x64 - x64.mean()
    f = torch.fft.rfft2(centred)
    acf = torch.fft.irfft2(f.real**2 + f.imag**2, s=x.shape[-2:]).reshape(-1, *x.shape[-2:]).mean(0)
    acf = acf / acf[0, 0]
    for dy in range(0, k + 2):
        for dx in range(-(k + 1), k + 2):
            c = float(acf[dy % acf.shape[0], dx % acf.shape[1]])
            want = _rho(dy, k) * _rho(dx, k)
            if abs(c - want) > corr_tol:
                errors.append(f"corr at ({dy}, {dx}) = {c:.4f}, want {want:.4f} +- {corr_tol:.4f}")
    # Stationarity: the neighbour correlation must not depend on the row's phase inside a block.
    if k > 1:
        nb = x64 * torch.roll(x64, shifts=-1, dims=-2)
        tol = 6 * math.sqrt(2 * k / ne)
        for phase in range(k):
            c = float(nb[..., phase::k, :].mean())
            if abs(c - _rho(1, k)) > tol:
                errors.append(f"row phase {phase}: neighbour corr {c:.4f}, want {_rho(1, k):.4f} +- {tol:.4f}")
    return errors


# ---------------------------------------------------------------- box noise: statistics


@pytest.mark.parametrize("k", [2, 4, 7])
def test_box_noise_statistics(k):
    x = box_block_noise(BIG, k, generator=_gen(1234 + k))
    assert x.shape == BIG and x.dtype == torch.float32
    errors = box_stat_errors(x, k)
    assert not errors, errors


def test_box_noise_statistics_non_square_16_channels():
    x = box_block_noise((1, 16, 96, 160), 3, generator=_gen(5))
    assert x.shape == (1, 16, 96, 160)
    errors = box_stat_errors(x, 3)
    assert not errors, errors


def _box_reference(g: torch.Tensor, k: int) -> torch.Tensor:
    out = torch.zeros_like(g, dtype=torch.float64)
    for p in range(k):
        for q in range(k):
            out += torch.roll(g.double(), shifts=(p, q), dims=(-2, -1))  # g[i - p, j - q]
    return out / k


def _zero_padded_box(shape, k, seed):
    g = torch.randn(shape, generator=_gen(seed))
    b, c, h, w = shape
    weight = torch.ones(1, 1, k, k)
    y = F.conv2d(F.pad(g.reshape(b * c, 1, h, w), (k - 1, 0, k - 1, 0)), weight)
    return y.reshape(shape) / k


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda s, k, seed: box_block_noise(s, k, generator=_gen(seed)) * k, id="no-1/k"),
        pytest.param(_zero_padded_box, id="not-circular"),
        pytest.param(lambda s, k, seed: box_block_noise(s, k - 1, generator=_gen(seed)), id="window-off-by-one"),
        pytest.param(lambda s, k, seed: torch.randn(s, generator=_gen(seed)), id="white-noise"),
        pytest.param(lambda s, k, seed: constant_block_noise(s, k, generator=_gen(seed)), id="block-constant"),
    ],
)
def test_box_statistics_reject_broken_noise(make):
    k = 4
    x = make(BIG, k, 99)
    assert box_stat_errors(x, k), "a broken block noise passed the statistical checks"


# ---------------------------------------------------------------- box noise: exact formula


@pytest.mark.parametrize("k", [1, 2, 3, 5, 10])
def test_box_noise_matches_brute_force_circular_sum(k):
    shape = (2, 3, 10, 13)
    got = box_block_noise(shape, k, generator=_gen(7))
    g = torch.randn(shape, generator=_gen(7))
    want = _box_reference(g, k).float()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_box_block_size_1_is_the_white_noise():
    shape = (1, 4, 8, 8)
    assert torch.equal(box_block_noise(shape, 1, generator=_gen(3)), torch.randn(shape, generator=_gen(3)))


def test_box_noise_5d_filters_each_frame():
    shape5 = (2, 4, 3, 64, 48)
    x5 = box_block_noise(shape5, 4, generator=_gen(11))
    assert x5.shape == shape5
    g = torch.randn(shape5, generator=_gen(11))
    torch.testing.assert_close(x5, _box_reference(g, 4).float(), rtol=1e-5, atol=1e-5)
    # Frames stay independent of each other.
    a, b = x5[:, :, 0].double(), x5[:, :, 1].double()
    tol = 6 * math.sqrt(2 / _n_eff(a.numel(), 4))
    assert abs(float((a * b).mean())) < tol


def test_box_noise_dtype_and_generator_reproducibility():
    a = box_block_noise((1, 4, 32, 32), 4, generator=_gen(1), dtype=torch.float64)
    b = box_block_noise((1, 4, 32, 32), 4, generator=_gen(1))
    assert a.dtype == torch.float64
    torch.testing.assert_close(a.float(), b)
    assert not torch.equal(b, box_block_noise((1, 4, 32, 32), 4, generator=_gen(2)))


def test_box_noise_errors():
    with pytest.raises(ValueError, match="block_size"):
        box_block_noise((1, 4, 8, 8), 0)
    with pytest.raises(ValueError, match="block_size"):
        box_block_noise((1, 4, 8, 8), 9)
    with pytest.raises(ValueError, match="4-D"):
        box_block_noise((4, 8, 8), 2)


# ---------------------------------------------------------------- block-constant noise


@pytest.mark.parametrize("shape,k", [((4, 4, 256, 256), 4), ((2, 16, 90, 130), 8)])
def test_constant_noise_statistics(shape, k):
    x = constant_block_noise(shape, k, generator=_gen(21))
    assert x.shape == shape
    h, w = shape[-2:]
    # Perfectly correlated inside a block: every element equals its block's top-left one.
    corner = x[..., ::k, ::k]
    expanded = corner.repeat_interleave(k, -2).repeat_interleave(k, -1)[..., :h, :w]
    assert torch.equal(x, expanded)
    # The block values are independent N(0, 1): unit variance, no correlation across blocks.
    low = corner.double()
    n = low.numel()
    assert abs(float(low.mean())) < 6 / math.sqrt(n)
    assert abs(float(low.var()) - 1) < 6 * math.sqrt(2 / n)
    for dy, dx in ((0, 1), (1, 0), (1, 1), (1, -1)):
        c = float((low * torch.roll(low, (dy, dx), (-2, -1))).mean())
        assert abs(c) < 6 / math.sqrt(n), (dy, dx, c)
    # Neighbouring pixels across a block edge are uncorrelated too (full resolution view).
    across = float((x[..., k - 1 : -1 : k, :].double() * x[..., k::k, :].double()).mean())
    assert abs(across) < 6 / math.sqrt(x[..., k::k, :].numel() / k)


def test_constant_noise_5d_and_uncropped_size():
    x = constant_block_noise((1, 4, 2, 10, 7), 4, generator=_gen(0))
    assert x.shape == (1, 4, 2, 10, 7)
    assert torch.equal(x[..., 0:4, 0:4], x[..., 0:1, 0:1].expand_as(x[..., 0:4, 0:4]))


# ---------------------------------------------------------------- mixing and relay_noise


def test_mix_block_noise_formula_and_unit_variance():
    s = 0.5
    eps = torch.randn(BIG, generator=_gen(1))
    blk = box_block_noise(BIG, 4, generator=_gen(2))
    raw = mix_block_noise(eps, blk, s, normalize=False)
    norm = mix_block_noise(eps, blk, s)
    torch.testing.assert_close(raw, eps + s * blk)
    torch.testing.assert_close(norm, (eps + s * blk) / math.sqrt(1 + s * s))
    ne = _n_eff(eps.numel(), 4)
    assert abs(float(norm.double().var()) - 1) < 6 * math.sqrt(2 / ne)
    assert abs(float(raw.double().var()) - (1 + s * s)) < 6 * (1 + s * s) * math.sqrt(2 / ne)
    with pytest.raises(ValueError, match="differ"):
        mix_block_noise(eps, blk[:, :2], s)


def test_relay_noise_statistics():
    k, s = 4, 0.5
    x = relay_noise(BIG, seed=42, block_size=k, strength=s)
    ne = _n_eff(x.numel(), k)
    tol = 6 * math.sqrt(2 / ne)
    assert abs(float(x.double().var()) - 1) < tol
    frac = s * s / (1 + s * s)  # share of the variance that is correlated
    for dy, dx in ((1, 0), (0, 2), (1, 1), (k, 0), (0, k)):
        want = frac * _rho(dy, k) * _rho(dx, k)
        assert abs(_corr(x, dy, dx) - want) < tol, (dy, dx)


def test_relay_noise_strength_0_is_comfyui_noise():
    for shape in ((1, 4, 64, 64), (2, 16, 40, 24), (1, 16, 3, 20, 20)):
        for seed in (0, 123456789, 2**63 + 5):
            torch.manual_seed(seed)
            want = torch.randn(shape)
            got = relay_noise(shape, seed, block_size=4, strength=0.0)
            assert got.dtype == torch.float32 and got.device.type == "cpu"
            assert torch.equal(got, want), (shape, seed)


@pytest.mark.parametrize("variant", ["box", "constant"])
def test_relay_noise_draws_eps_first_then_block_noise(variant):
    shape, seed, k, s = (1, 4, 32, 40), 77, 4, 0.3
    gen = _gen(seed)
    eps = torch.randn(shape, generator=gen)
    make = box_block_noise if variant == "box" else constant_block_noise
    blk = make(shape, k, generator=gen)
    want = (eps + s * blk) / math.sqrt(1 + s * s)
    torch.testing.assert_close(relay_noise(shape, seed, k, s, variant=variant), want)
    torch.testing.assert_close(relay_noise(shape, seed, k, s, normalize=False, variant=variant), eps + s * blk)


@pytest.mark.parametrize("shape", [(1, 4, 64, 64), (1, 16, 48, 80), (1, 16, 2, 32, 32)])
def test_relay_noise_reproducible_per_seed(shape):
    a = relay_noise(shape, 5, 4, 0.3)
    assert a.shape == shape
    assert torch.equal(a, relay_noise(shape, 5, 4, 0.3))
    assert not torch.allclose(a, relay_noise(shape, 6, 4, 0.3))


def test_relay_noise_errors():
    shape = (1, 4, 16, 16)
    with pytest.raises(ValueError, match="variant"):
        relay_noise(shape, 0, 4, 0.2, variant="gaussian")
    with pytest.raises(ValueError, match="block_size"):
        relay_noise(shape, 0, 0, 0.2)
    with pytest.raises(ValueError, match="strength"):
        relay_noise(shape, 0, 4, -0.1)
    with pytest.raises(ValueError, match="strength"):
        relay_noise(shape, 0, 4, float("nan"))
