"""Coop-Diffusion bridge maths (PanGu-Draw): sigma mapping, re-noising, noise resizing, schedules, the fused step."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from hires_parallel.algorithms.coop import (
    CoopBridge,
    PersistentNoise,
    bridge_state,
    bridge_steps,
    bridge_x0,
    convert_noisy,
    coop_denoise,
    fusion_weight,
    map_sigma,
    noise_estimate,
    noise_to_signal,
    renoise,
    resize_images,
    resize_noise,
    split_at_sigma,
    step_index,
    transfer_noise,
)


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# ---------------------------------------------------------------- noise levels


@pytest.mark.parametrize("sigma", [0.03, 0.5, 1.62, 14.6])
def test_eps_to_flow_keeps_the_noise_to_signal_ratio(sigma):
    s = map_sigma(sigma, "eps", "flow")
    assert 0 < s < 1
    assert s / (1 - s) == pytest.approx(sigma, rel=1e-12)
    assert noise_to_signal(s, "flow") == pytest.approx(sigma, rel=1e-12)
    assert map_sigma(s, "flow", "eps") == pytest.approx(sigma, rel=1e-12)
    assert map_sigma(sigma, "eps", "eps") == sigma


def test_flow_end_points_and_the_cap_of_the_target_model():
    assert map_sigma(1.0, "flow", "eps") == math.inf
    assert map_sigma(1.0, "flow", "eps", 14.6) == 14.6
    assert map_sigma(20.0, "eps", "eps", 14.6) == 20.0  # one kind: unchanged
    assert map_sigma(0.9999, "flow", "eps", 14.6) == 14.6
    x = randn(1, 4, 4, 4, seed=5)  # a flow model's pure noise (s = 1) is x = eps
    x_eps, sigma = convert_noisy(x, 1.0, "flow", "eps", 14.6)
    assert sigma == 14.6
    torch.testing.assert_close(x_eps, 14.6 * x)
    assert map_sigma(0.0, "flow", "eps") == 0.0 and map_sigma(0.0, "eps", "flow") == 0.0
    with pytest.raises(ValueError):
        map_sigma(1.0, "eps", "vpred")


@pytest.mark.parametrize("kind, sigma", [("eps", 2.5), ("flow", 0.7)])
def test_noise_estimate_inverts_renoise(kind, sigma):
    z0, eps = randn(2, 4, 6, 6, seed=1), randn(2, 4, 6, 6, seed=2)
    x = renoise(z0, eps, sigma, kind)
    torch.testing.assert_close(noise_estimate(x, z0, sigma, kind), eps)
    if kind == "flow":
        torch.testing.assert_close(x, (1 - sigma) * z0 + sigma * eps)
    else:
        torch.testing.assert_close(x, z0 + sigma * eps)


def test_convert_noisy_is_the_same_state_for_a_flow_model():
    z0, eps, sigma = randn(1, 4, 5, 5, seed=3), randn(1, 4, 5, 5, seed=4), 1.62
    x_eps = renoise(z0, eps, sigma, "eps")
    x_flow, s = convert_noisy(x_eps, sigma, "eps", "flow")
    torch.testing.assert_close(x_flow, renoise(z0, eps, s, "flow"))
    back, sigma_back = convert_noisy(x_flow, s, "flow", "eps")
    torch.testing.assert_close(back, x_eps)
    assert sigma_back == pytest.approx(sigma)


# ---------------------------------------------------------------- noise between shapes


def test_persistent_noise_is_fixed_per_run_and_shape():
    a, b = PersistentNoise(5), PersistentNoise(5)
    assert torch.equal(a((1, 4, 8, 8)), b((1, 4, 8, 8)))
    assert a((1, 4, 8, 8)) is a((1, 4, 8, 8))
    assert not torch.equal(a((1, 4, 8, 8)), PersistentNoise(6)((1, 4, 8, 8)))
    assert not torch.equal(a((1, 4, 8, 8), "xi"), a((1, 4, 8, 8), "resize"))


@pytest.mark.parametrize("k", [2, 4])
def test_shrinking_noise_is_k_times_avgpool(k):
    eps = randn(2, 4, 32, 24, seed=7)
    small = resize_noise(eps, (32 // k, 24 // k), PersistentNoise(0))
    torch.testing.assert_close(small, k * F.avg_pool2d(eps, k))


def test_resized_noise_keeps_unit_variance_both_ways():
    eps = randn(4, 4, 128, 128, seed=8)
    for size in [(64, 64), (256, 256), (64, 256)]:
        out = resize_noise(eps, size, PersistentNoise(1))
        assert out.shape == (4, 4, *size)
        assert abs(out.mean().item()) < 0.01
        assert out.std().item() == pytest.approx(1.0, abs=0.01), size


def test_grown_noise_is_iid_and_shrinks_back_to_the_input():
    eps = randn(8, 4, 32, 32, seed=9)
    big = resize_noise(eps, (64, 64), PersistentNoise(2))
    torch.testing.assert_close(resize_noise(big, (32, 32), PersistentNoise(3)), eps)
    # neighbours inside one 2x2 block are uncorrelated (nearest upsampling alone would give 0.25 / 0.25 = 1)
    left, right = big[..., :, 0::2].flatten(), big[..., :, 1::2].flatten()
    assert abs(torch.corrcoef(torch.stack([left, right]))[0, 1].item()) < 0.02


def test_non_integer_ratio_and_other_channels_use_the_persistent_noise():
    fresh = PersistentNoise(4)
    eps = randn(1, 4, 12, 12, seed=10).float()
    out = resize_noise(eps, (16, 16), fresh)
    assert torch.equal(out, fresh((1, 4, 16, 16), "xi"))
    other = transfer_noise(eps, (1, 16, 12, 12), fresh)
    assert torch.equal(other, fresh((1, 16, 12, 12), "xi"))
    assert torch.equal(transfer_noise(eps, (1, 4, 12, 12), fresh), eps)  # same shape: A's noise itself
    assert torch.equal(transfer_noise(eps, (1, 4, 12, 12), fresh, "persistent"), fresh((1, 4, 12, 12), "xi"))
    with pytest.raises(ValueError):
        transfer_noise(eps, (1, 4, 12, 12), fresh, "fresh")


# ---------------------------------------------------------------- images between spaces


def test_resize_images_and_bridge_x0_compose_decode_resize_encode():
    calls = []

    def decode(z):  # 4 channels -> 3-channel image at 8x
        calls.append(("decode", tuple(z.shape)))
        return torch.sigmoid(F.interpolate(z[:, :3], scale_factor=8, mode="nearest"))

    def encode(img):  # image -> 16 channels at 1/8
        calls.append(("encode", tuple(img.shape)))
        return F.avg_pool2d(img, 8).repeat(1, 6, 1, 1)[:, :16]

    z = randn(2, 4, 8, 8, seed=11).float()
    out = bridge_x0(z, decode, encode, (128, 128))
    assert out.shape == (2, 16, 16, 16)
    assert calls == [("decode", (2, 4, 8, 8)), ("encode", (2, 3, 128, 128))]
    img = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    assert resize_images(img, (64, 64)) is img
    down = resize_images(img, (32, 32))
    assert down.shape == (1, 3, 32, 32) and 0 <= down.min() and down.max() <= 1
    flat = torch.full((1, 3, 16, 16), 0.25)
    torch.testing.assert_close(resize_images(flat, (48, 32)), torch.full((1, 3, 48, 32), 0.25))


# ---------------------------------------------------------------- when and how much


def test_fusion_weight_schedules():
    first, last = 14.6, 0.03
    assert fusion_weight(3.0, first, last, 0.4, 0.9, "constant") == 0.4
    assert fusion_weight(first, first, last, 0.2, 0.8, "linear") == pytest.approx(0.2)
    assert fusion_weight(last, first, last, 0.2, 0.8, "linear") == pytest.approx(0.8)
    mid = math.sqrt(first * last)  # halfway in log sigma
    assert fusion_weight(mid, first, last, 0.2, 0.8, "linear") == pytest.approx(0.5)
    assert fusion_weight(mid, first, last, 0.2, 0.8, "cosine") == pytest.approx(0.5)
    q = math.exp(math.log(first) - 0.25 * (math.log(first) - math.log(last)))
    assert fusion_weight(q, first, last, 0.0, 1.0, "cosine") < fusion_weight(q, first, last, 0.0, 1.0, "linear")
    ws = [fusion_weight(s, first, last, 1.0, 0.0, "cosine") for s in torch.linspace(first, last, 20).tolist()]
    assert all(a >= b for a, b in zip(ws, ws[1:]))
    with pytest.raises(ValueError):
        fusion_weight(1.0, first, last, 0.5, 0.5, "step")


def test_bridge_steps_window_and_every_k():
    sigmas = [14.0, 8.0, 4.0, 2.0, 1.0, 0.5, 0.0]
    assert bridge_steps(sigmas, math.inf, 0.0, 1) == frozenset(range(6))
    assert bridge_steps(sigmas, math.inf, 0.0, 2) == frozenset({0, 2, 4})
    assert bridge_steps(sigmas, 5.0, 0.8, 1) == frozenset({2, 3, 4})
    assert bridge_steps(sigmas, 5.0, 0.8, 2) == frozenset({2, 4})
    assert bridge_steps(sigmas, 0.4, 0.0, 1) == frozenset()
    with pytest.raises(ValueError):
        bridge_steps(sigmas, 1.0, 0.0, 0)


def test_step_index_maps_intermediate_evaluations_to_the_nearest_step():
    sigmas = [14.0, 8.0, 4.0, 2.0, 0.0]
    assert [step_index(s, sigmas) for s in sigmas[:-1]] == [0, 1, 2, 3]
    assert step_index(math.sqrt(8.0 * 4.0) * 1.01, sigmas) == 1  # a midpoint sampler's second call
    assert step_index(0.0, sigmas) == 3


def test_split_at_sigma():
    sigmas = torch.tensor([14.0, 8.0, 4.0, 1.62, 1.0, 0.5, 0.0], dtype=torch.float64)
    first, second = split_at_sigma(sigmas, 1.62)
    assert first.tolist() == [14.0, 8.0, 4.0, 1.62, 1.0] and second.tolist() == [1.0, 0.5, 0.0]
    first, second = split_at_sigma(sigmas, 20.0)
    assert first.numel() == 0 and torch.equal(second, sigmas)
    first, second = split_at_sigma(sigmas, 0.1)
    assert torch.equal(first, sigmas) and second.numel() == 0
    with pytest.raises(ValueError):
        split_at_sigma(torch.tensor([1.0, 4.0, 0.0]), 2.0)


# ---------------------------------------------------------------- the fused prediction


def gaussian_denoiser(calls=None, name="a"):
    """The exact denoiser for x0 ~ N(0, I) (EPS convention): D(x, sigma) = x / (1 + sigma^2)."""

    def denoise(x, sigma):
        if calls is not None:
            calls.append(name)
        return x / (1 + sigma**2)

    return denoise


def flow_twin(denoise_eps):
    """The flow-kind model that predicts exactly what ``denoise_eps`` predicts for the same state."""

    def denoise(x, s):
        return denoise_eps(x / (1 - s), s / (1 - s))

    return denoise


def test_weight_zero_never_calls_b_and_returns_a():
    calls = []
    x = randn(1, 4, 8, 8, seed=12)
    d = coop_denoise(x, 2.0, gaussian_denoiser(calls, "a"), gaussian_denoiser(calls, "b"), 0.0, "eps", "eps",
                     CoopBridge(lambda z: 1 / 0, lambda z: 1 / 0))
    assert calls == ["a"]
    torch.testing.assert_close(d, x / 5)


def test_shared_latent_identical_models_equal_a_exactly():
    x = randn(1, 4, 8, 8, seed=13)
    da = gaussian_denoiser()
    d = coop_denoise(x, 1.3, da, da, 0.5, "eps", "eps", CoopBridge())
    assert torch.equal(d, da(x, 1.3))


def test_shared_latent_flow_partner_gets_the_converted_state():
    calls = []
    x, sigma = randn(1, 4, 8, 8, seed=14), 3.0
    da = gaussian_denoiser(calls, "a")
    d = coop_denoise(x, sigma, da, flow_twin(gaussian_denoiser(calls, "b")), 1.0, "eps", "flow", CoopBridge())
    assert calls == ["b"]  # w = 1 with a shared latent needs no D_A
    torch.testing.assert_close(d, x / (1 + sigma**2))


def test_bridge_across_sizes_follows_the_reconstruction():
    """A at 8x8, B at 16x16 (nearest up, mean down): every piece of the formula is checked in closed form."""
    x, sigma = randn(1, 4, 8, 8, seed=15), 2.0
    fresh = PersistentNoise(9)
    up = lambda z: z.repeat_interleave(2, -2).repeat_interleave(2, -1)  # noqa: E731
    bridge = CoopBridge(to_b=up, to_a=lambda z: F.avg_pool2d(z, 2),
                        noise=lambda eps, shape: transfer_noise(eps, shape, fresh))
    da, db = gaussian_denoiser(), gaussian_denoiser()
    w = 0.3
    d = coop_denoise(x, sigma, da, db, w, "eps", "eps", bridge)
    d_a = da(x, sigma)
    eps_a = (x - d_a) / sigma
    z_b0, noise_b, sigma_b = bridge_state(x, d_a, sigma, "eps", "eps", bridge)
    torch.testing.assert_close(z_b0, up(d_a))
    torch.testing.assert_close(2 * F.avg_pool2d(noise_b, 2), eps_a)  # the unit-variance rule, back
    # mean of B's noise over each block is eps_A / 2, so D_BA = (D_A + sigma eps_A / 2) / (1 + sigma^2)
    d_ba = (d_a + sigma * eps_a / 2) / (1 + sigma**2)
    torch.testing.assert_close(d, (1 - w) * d_a + w * d_ba)
    assert sigma_b == sigma


def test_bridge_to_a_flow_model_with_other_channels_uses_mapped_sigma_and_persistent_noise():
    seen = {}
    x, sigma = randn(1, 4, 8, 8, seed=16), 1.62
    fresh = PersistentNoise(3)
    to_b = lambda z: z.repeat(1, 4, 1, 1)  # noqa: E731  4 -> 16 channels
    to_a = lambda z: z[:, :4]  # noqa: E731
    bridge = CoopBridge(to_b, to_a, lambda eps, shape: transfer_noise(eps, shape, fresh))

    def db(xb, s):
        seen["x"], seen["s"] = xb, s
        return torch.zeros_like(xb)

    d = coop_denoise(x, sigma, gaussian_denoiser(), db, 0.25, "eps", "flow", bridge)
    s = sigma / (1 + sigma)
    assert seen["s"] == pytest.approx(s)
    d_a = x / (1 + sigma**2)
    expected_xb = (1 - s) * to_b(d_a) + s * fresh((1, 16, 8, 8), "xi").double()
    torch.testing.assert_close(seen["x"], expected_xb)
    torch.testing.assert_close(d, 0.75 * d_a)
