"""Relay upscaling helpers: latent resize, relay start, sigma tables, relay schedules, linear relay sampler."""
from __future__ import annotations

import math

import pytest
import torch

from hires_parallel.algorithms.relay import (
    denoise_schedule,
    linear_relay_step,
    relay_schedule,
    relay_start,
    sample_linear_relay,
    sigma_from_timestep,
    upsample_latent,
)

SIGMA_MIN, SIGMA_MAX = 0.0292, 14.6146


def karras(n: int, sigma_min: float = SIGMA_MIN, sigma_max: float = SIGMA_MAX, rho: float = 7.0) -> torch.Tensor:
    ramp = torch.linspace(0, 1, n)
    a, b = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    return torch.cat([(a + ramp * (b - a)) ** rho, torch.zeros(1)])


def linear(n: int) -> torch.Tensor:
    return torch.cat([torch.linspace(SIGMA_MAX, SIGMA_MIN, n), torch.zeros(1)])


def sd1_sigma_table() -> torch.Tensor:
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    ac = torch.cumprod(1 - betas, 0)
    return ((1 - ac) / ac).sqrt()


# ---------------------------------------------------------------- upsample_latent


@pytest.mark.parametrize("scale", [1.5, 2, 3, 4])
@pytest.mark.parametrize("channels", [4, 16])
@pytest.mark.parametrize("mode", ["nearest", "bilinear", "bicubic"])
def test_upsample_sizes(scale, channels, mode):
    for h, w in ((64, 64), (48, 80), (13, 7)):
        z = torch.randn(2, channels, h, w)
        out = upsample_latent(z, scale, mode)
        assert out.shape == (2, channels, round(h * scale), round(w * scale))
        assert out.dtype == z.dtype


@pytest.mark.parametrize("mode", ["nearest", "bilinear", "bicubic"])
def test_upsample_keeps_constant_latents(mode):
    z = torch.full((1, 4, 16, 24), 0.7)
    torch.testing.assert_close(upsample_latent(z, 2.5, mode), torch.full((1, 4, 40, 60), 0.7))


def test_upsample_nearest_integer_scale_replicates_pixels():
    z = torch.randn(1, 16, 10, 12)
    for k in (2, 3, 4):
        want = z.repeat_interleave(k, -2).repeat_interleave(k, -1)
        assert torch.equal(upsample_latent(z, k, "nearest"), want)


def test_upsample_scale_1_is_identity_and_5d_resizes_each_frame():
    z = torch.randn(1, 4, 8, 8)
    assert torch.equal(upsample_latent(z, 1.0), z)
    z5 = torch.randn(2, 16, 3, 12, 10)
    out = upsample_latent(z5, 2, "bilinear")
    assert out.shape == (2, 16, 3, 24, 20)
    for t in range(3):
        torch.testing.assert_close(out[:, :, t], upsample_latent(z5[:, :, t], 2, "bilinear"))


def test_upsample_errors():
    z = torch.randn(1, 4, 8, 8)
    with pytest.raises(ValueError, match=">= 1"):
        upsample_latent(z, 0.5)
    with pytest.raises(ValueError, match="empty"):
        upsample_latent(torch.zeros(1, 4, 0, 8), 2)
    with pytest.raises(ValueError, match="empty"):
        upsample_latent(torch.zeros(0, 4, 8, 8), 2)
    with pytest.raises(ValueError, match="mode"):
        upsample_latent(z, 2, "lanczos")


# ---------------------------------------------------------------- relay_start


def test_relay_start_formulas():
    z, n, s = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8), 1.62
    torch.testing.assert_close(relay_start(z, n, s), z + s * n)
    torch.testing.assert_close(relay_start(z, n, 0.4, flow=True), 0.6 * z + 0.4 * n)
    # Sigma 0 leaves the latent alone in both parametrisations.
    torch.testing.assert_close(relay_start(z, n, 0.0, flow=True), z)
    with pytest.raises(ValueError, match="differ"):
        relay_start(z, n[:, :2], s)


# ---------------------------------------------------------------- sigma_from_timestep


def test_sigma_from_timestep_sd1():
    table = sd1_sigma_table()
    assert round(sigma_from_timestep(999, table), 2) == 14.61
    assert round(sigma_from_timestep(500, table), 2) == 1.62
    assert round(sigma_from_timestep(700, table), 2) == 3.33
    assert sigma_from_timestep(0, table) == pytest.approx(float(table[0]))
    # Fractional timesteps interpolate log sigma: the geometric mean half-way.
    mid = sigma_from_timestep(500.5, table)
    assert mid == pytest.approx(math.sqrt(float(table[500]) * float(table[501])), rel=1e-12)
    # Monotone in t, clamped outside the table like ComfyUI.
    ts = [0, 10.5, 250, 600.25, 998.9]
    vals = [sigma_from_timestep(t, table) for t in ts]
    assert vals == sorted(vals)
    assert sigma_from_timestep(1500, table) == pytest.approx(float(table[-1]))


# ---------------------------------------------------------------- relay_schedule


@pytest.mark.parametrize("fn", [karras, linear], ids=["karras", "linear"])
@pytest.mark.parametrize("steps,sigma_relay", [(10, 1.62), (20, 2.3), (4, 0.5), (8, SIGMA_MAX)])
def test_relay_schedule_shape_and_tail(fn, steps, sigma_relay):
    sig = relay_schedule(fn, steps, sigma_relay)
    assert len(sig) == steps + 1
    assert sig[0] == torch.tensor(sigma_relay, dtype=sig.dtype)
    assert sig[-1] == 0
    assert bool((sig[1:] < sig[:-1]).all())
    # The rest is the tail of a real full schedule, and no other total gets closer to the relay point.
    matches = [n for n in range(steps, 50 * steps + 1) if torch.equal(fn(n)[n - steps + 1 :], sig[1:])]
    assert matches, "tail does not come from any full schedule"
    n = matches[0]
    best = abs(math.log(float(fn(n)[n - steps])) - math.log(sigma_relay))
    for m in range(steps, 50 * steps + 1):
        other = abs(math.log(float(fn(m)[m - steps])) - math.log(sigma_relay))
        assert other >= best - 1e-12 or not float(fn(m)[m - steps + 1]) < sigma_relay


def test_relay_schedule_full_schedule_when_relay_is_the_maximum():
    torch.testing.assert_close(relay_schedule(karras, 12, float(karras(12)[0])), karras(12))


def test_relay_schedule_tail_lands_near_the_relay_point():
    # With enough candidate totals the replaced entry is close to the relay point, so the first step is normal.
    sig = relay_schedule(karras, 20, 1.62)
    n = next(n for n in range(20, 1001) if torch.equal(karras(n)[n - 19 :], sig[1:]))
    assert abs(math.log(float(karras(n)[n - 20]) / 1.62)) < 0.05


def test_relay_schedule_falls_back_when_replacement_breaks_order():
    steps, relay = 2, 2.0

    def weird(n: int) -> torch.Tensor:
        if n == 2:  # nearest candidate (2.01) but its next entry equals the relay point
            return torch.tensor([2.01, 2.0, 0.0])
        if n == 3:
            return torch.tensor([10.0, 3.0, 1.0, 0.0])
        return torch.cat([torch.linspace(10.0, 5.0, n), torch.zeros(1)])

    sig = relay_schedule(weird, steps, relay, max_total=6)
    torch.testing.assert_close(sig, torch.tensor([2.0, 1.0, 0.0]))


def test_relay_schedule_errors():
    with pytest.raises(ValueError, match="lower the relay point"):
        relay_schedule(karras, 10, 20.0)
    with pytest.raises(ValueError, match="sigma_relay"):
        relay_schedule(karras, 10, 0.0)
    with pytest.raises(ValueError, match="steps"):
        relay_schedule(karras, 0, 1.0)
    with pytest.raises(ValueError, match="raise the relay point"):
        relay_schedule(karras, 10, 0.01)  # below sigma_min: nothing can follow it


# ---------------------------------------------------------------- denoise_schedule


def test_denoise_schedule_basic_scheduler_rule():
    calls = []

    def fn(n: int) -> torch.Tensor:
        calls.append(n)
        return karras(n)

    assert torch.equal(denoise_schedule(fn, 10, 1.0), karras(10))
    assert torch.equal(denoise_schedule(fn, 10, 0.99995), karras(10))
    out = denoise_schedule(fn, 10, 0.5)
    assert calls[-1] == 20 and torch.equal(out, karras(20)[-11:])
    out = denoise_schedule(fn, 10, 0.3)
    assert calls[-1] == 33 and len(out) == 11 and torch.equal(out, karras(33)[23:])
    with pytest.raises(ValueError, match="denoise"):
        denoise_schedule(fn, 10, 0.0)


# ---------------------------------------------------------------- linear relay step and sampler


def test_linear_relay_step_last_step_returns_denoised():
    x, d, z = torch.randn(3, 1, 4, 4).unbind(0)
    for n in (1, 4, 9):
        assert torch.equal(linear_relay_step(x, d, z, 0.7, 0.0, 1, n), d)


def test_linear_relay_step_with_z_low_equal_denoised_is_ddim():
    x, d = torch.randn(2, 1, 4, 4).unbind(0)
    s, s_next = 2.0, 1.3
    r = s_next / s
    for k in (5, 3, 1):
        torch.testing.assert_close(linear_relay_step(x, d, d, s, s_next, k, 5), r * x + (1 - r) * d)


def test_linear_relay_step_beta():
    # beta = r k / N - (k - 1) / N; with x = d = 0 the step returns -beta * z_low.
    z = torch.ones(1)
    zero = torch.zeros(1)
    s, s_next, n = 3.0, 1.5, 4
    for k in (4, 2, 1):
        beta = 0.5 * k / n - (k - 1) / n
        torch.testing.assert_close(linear_relay_step(zero, zero, z, s, s_next, k, n), -beta * z)


@pytest.mark.parametrize("relay_steps", [None, 0, 3, 100])
def test_sample_linear_relay_ends_at_fixed_x0(relay_steps):
    x0 = torch.randn(2, 4, 8, 8)
    z_low = torch.randn(2, 4, 8, 8)
    sigmas = karras(8)
    x = x0 + sigmas[0] * torch.randn(2, 4, 8, 8)
    seen = []

    def denoise(xi, sigma):
        assert sigma.shape == (2,)
        return x0

    out = sample_linear_relay(denoise, x, sigmas, z_low, callback=seen.append, relay_steps=relay_steps)
    assert torch.equal(out, x0)
    assert [c["i"] for c in seen] == list(range(8))
    assert all(c["sigma"] == sigmas[c["i"]] and c["sigma_hat"] == c["sigma"] for c in seen)
    assert torch.equal(seen[0]["x"], x) and torch.equal(seen[0]["denoised"], x0)


def test_sample_linear_relay_uses_relay_steps_only_at_the_end():
    # With z_low far from D, a pure-DDIM run and a run with 2 relay steps agree until the relay part starts.
    x0 = torch.zeros(1, 4, 4, 4)
    z_low = torch.full((1, 4, 4, 4), 5.0)
    sigmas = karras(6)
    x = torch.randn(1, 4, 4, 4) * sigmas[0]
    xs_ddim, xs_relay = [], []
    sample_linear_relay(lambda xi, s: x0, x, sigmas, z_low, lambda c: xs_ddim.append(c["x"]), relay_steps=0)
    sample_linear_relay(lambda xi, s: x0, x, sigmas, z_low, lambda c: xs_relay.append(c["x"]), relay_steps=2)
    for i in range(5):  # states before step 4 (the first relay step) coincide
        assert torch.equal(xs_ddim[i], xs_relay[i])
    assert not torch.allclose(xs_ddim[5], xs_relay[5])
    with pytest.raises(ValueError, match="relay_steps"):
        sample_linear_relay(lambda xi, s: x0, x, sigmas, z_low, relay_steps=-1)
