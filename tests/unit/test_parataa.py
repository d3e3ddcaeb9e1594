"""ParaTAA solver (algorithms.parataa) on analytic denoisers: no ComfyUI.

Denoisers: the exact posterior mean of a Gaussian mixture (nonlinear in x) and of a Gaussian with a random
anisotropic covariance (linear in x, stiff). Tolerance statement: with the one-step tolerance at 1e-5, the
final sample is within 2e-4 x max|sequential| of the sequential recurrence run on the same denoiser.
"""
from __future__ import annotations

import math

import pytest
import torch

from hires_parallel.algorithms.parataa import (
    ParaTAAConfig,
    make_recurrence,
    parataa_sample,
    presample_noises,
    sequential_sample,
)

SHAPE = (2, 4, 8, 8)


def karras(n: int, smin: float = 0.0292, smax: float = 14.6146, rho: float = 7.0) -> torch.Tensor:
    ramp = torch.linspace(0, 1, n)
    a, b = smax ** (1 / rho), smin ** (1 / rho)
    return torch.cat([(a + ramp * (b - a)) ** rho, torch.zeros(1)])


class Mixture:
    """E[x0 | x0 + sigma eps = x] for x0 from an isotropic Gaussian mixture; records its batch calls."""

    def __init__(self, k: int = 3, spread: float = 0.3, seed: int = 0, shift: float = 0.0):
        g = torch.Generator().manual_seed(seed)
        self.mu = torch.randn(k, *SHAPE[1:], generator=g, dtype=torch.float64) + shift
        self.logw = torch.randn(k, generator=g, dtype=torch.float64) * 0.3
        self.s2 = spread ** 2
        self.calls: list[torch.Tensor] = []

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        assert sigma.shape == (x.shape[0],) and x.dtype == torch.float32
        self.calls.append(sigma.clone())
        var = (self.s2 + sigma.double() ** 2).view(-1, 1)
        diff = x.double().unsqueeze(1) - self.mu.unsqueeze(0)  # (B, K, ...)
        resp = torch.softmax(-(diff ** 2).flatten(2).sum(-1) / (2 * var) + self.logw, dim=1)
        post = self.mu.unsqueeze(0) + (self.s2 / var).view(-1, 1, *[1] * (x.dim() - 1)) * diff
        return (resp.view(*resp.shape, *[1] * (x.dim() - 1)) * post).sum(1).float()


class Gaussian:
    """E[x0 | x] for x0 ~ N(mu, U diag(lam) U^T), eigenvalues spread over 10^-2..10^2 (a stiff linear ODE)."""

    def __init__(self, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        d = math.prod(SHAPE[1:])
        self.u = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))[0]
        self.lam = 10 ** (torch.rand(d, generator=g, dtype=torch.float64) * 4 - 2)
        self.mu = torch.randn(d, generator=g, dtype=torch.float64) * 0.5

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        c = (x.double().flatten(1) - self.mu) @ self.u
        c = c * self.lam / (self.lam + sigma.double().view(-1, 1) ** 2)
        return (c @ self.u.T + self.mu).view_as(x).float()


def start(sigmas: torch.Tensor, seed: int = 1) -> torch.Tensor:
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed)) * float(sigmas[0])


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return (a.double() - ref.double()).abs().max().item() / ref.abs().max().item()


# ---------------------------------------------------------------------------------------------- recurrences


def test_ddim_coefficients_are_comfyui_euler():
    sig = karras(7)
    rec = make_recurrence(sig)
    x, d = torch.randn(3, dtype=torch.float64), torch.randn(3, dtype=torch.float64)
    for i in range(7):
        euler = x + (x - d) / sig[i].double() * (sig[i + 1].double() - sig[i].double())  # k-diffusion euler step
        assert torch.allclose(rec.a[i] * x + rec.b[i] * d, euler, atol=1e-12)
    assert (rec.c == 0).all() and not rec.stochastic
    assert torch.allclose(rec.scales, 1 / torch.sqrt(1 + sig.double() ** 2))
    # The same DDIM step is model-agnostic: a flow model (x = (1 - s) x0 + s eps) gets the same a, b.
    flow_sig = torch.tensor([1.0, 0.7, 0.3, 0.0])
    flow = make_recurrence(flow_sig, flow=True)
    assert torch.allclose(flow.a, flow_sig[1:].double() / flow_sig[:-1].double()) and (flow.scales == 1).all()


def test_ancestral_coefficients_follow_k_diffusion():
    sig = karras(5)
    eta, s_noise = 0.8, 0.9
    rec = make_recurrence(sig, "ancestral", eta=eta, s_noise=s_noise)
    for i in range(5):
        s, sn = float(sig[i]), float(sig[i + 1])
        up = min(sn, eta * math.sqrt(sn ** 2 * (s ** 2 - sn ** 2) / s ** 2)) if sn > 0 else 0.0
        down = math.sqrt(sn ** 2 - up ** 2)
        assert rec.a[i].item() == pytest.approx(down / s, abs=1e-12)
        assert rec.b[i].item() == pytest.approx(1 - down / s, abs=1e-12)
        assert rec.c[i].item() == pytest.approx(up * s_noise, abs=1e-12)
        assert rec.draws[i] == (down > 0)
    # Noises: one draw per drawing step from one generator seeded with the seed, as default_noise_sampler.
    z = presample_noises(rec, (1, 2, 3), seed=7)
    g = torch.Generator().manual_seed(7)
    for i in range(5):
        expect = torch.randn((1, 2, 3), generator=g) if rec.draws[i] else torch.zeros(1, 2, 3)
        assert torch.equal(z[i], expect)
    assert presample_noises(make_recurrence(sig), (1, 2, 3), seed=7) is None


def test_bad_inputs_are_rejected_with_a_reason():
    with pytest.raises(ValueError, match="positive"):
        make_recurrence(torch.tensor([2.0, 0.0, 0.0]))
    with pytest.raises(ValueError, match="variant"):
        make_recurrence(karras(3), "dpm")
    with pytest.raises(ValueError, match="memory"):
        ParaTAAConfig(memory=0).check()
    sig = karras(4)
    with pytest.raises(ValueError, match="warm-start trajectory"):
        parataa_sample(Mixture(), start(sig), sig, init=torch.zeros(3, *SHAPE))
    with pytest.raises(ValueError, match="noises"):
        parataa_sample(Mixture(), start(sig), sig, make_recurrence(sig, "ancestral"))


# ---------------------------------------------------------------------------------------------- solver


@pytest.mark.parametrize("steps,window", [(25, 0), (50, 0), (40, 12)])
def test_converges_to_the_sequential_ddim_result(steps, window):
    sig = karras(steps)
    x = start(sig)
    den = Mixture()
    ref = sequential_sample(den, x, make_recurrence(sig))
    den.calls.clear()
    out, rep = parataa_sample(den, x, sig, config=ParaTAAConfig(window=window, tol=1e-5, tol_noise=1e-5))
    err = rel_err(out, ref)
    print(f"\n[parataa] {steps} steps, window {window or steps}: {rep.rounds} rounds, "
          f"{rep.evaluations} evaluations, relative error {err:.2e}")
    assert rep.converged and err <= 2e-4
    assert rep.rounds < steps  # the point of the method (fewer sequential model calls)
    # Every round is batched calls with one sigma per latent; no call exceeds the window.
    w = window or steps
    assert all(c.numel() <= w * SHAPE[0] for c in den.calls) and len(den.calls) == rep.rounds
    assert rep.evaluations == sum(hi - lo + 1 for lo, hi in rep.windows)
    # The loose published tolerance is still close (the figure a user gets by default).
    out3, rep3 = parataa_sample(den, x, sig, config=ParaTAAConfig(window=window))
    print(f"[parataa] default tolerance 1e-3: {rep3.rounds} rounds, relative error {rel_err(out3, ref):.2e}")
    assert rep3.rounds <= rep.rounds and rel_err(out3, ref) <= 2e-2


def test_anderson_memory_two_needs_fewer_rounds_than_the_plain_fixed_point():
    sig = karras(50)
    x = start(sig)
    den = Gaussian()
    ref = sequential_sample(den, x, make_recurrence(sig))
    rounds = {}
    for m in (1, 2):
        out, rep = parataa_sample(den, x, sig, config=ParaTAAConfig(memory=m, tol=1e-5, tol_noise=1e-5))
        rounds[m] = rep.rounds
        print(f"\n[parataa] memory {m}: {rep.rounds} rounds, relative error {rel_err(out, ref):.2e}")
        assert rep.converged and rel_err(out, ref) <= 2e-4
    assert rounds[1] > rounds[2]


@pytest.mark.parametrize("cfg", [
    dict(tol=0.0, tol_noise=0.0),  # nothing ever passes the test: one step per round, the structural bound
    dict(order=1, memory=1),
    dict(order=3, memory=4, window=5),
    dict(window=1),
])
def test_rounds_never_exceed_the_number_of_steps(cfg):
    sig = karras(12)
    x = start(sig)
    den = Mixture(k=6, spread=0.1)
    ref = sequential_sample(den, x, make_recurrence(sig))
    seen = []
    out, rep = parataa_sample(den, x, sig, config=ParaTAAConfig(**cfg), callback=seen.append)
    assert rep.converged and rep.rounds <= 12
    assert [s["round"] for s in seen] == list(range(1, rep.rounds + 1))
    assert all(b > a for a, b in zip(rep.finished, rep.finished[1:])) and rep.finished[-1] == 12
    if cfg.get("tol") == 0.0:
        # Each round's first unfinished step gets its exact update: the sequential recurrence itself.
        assert rep.rounds == 12 and rel_err(out, ref) <= 1e-6
    # max_rounds stops early and says so.
    out2, rep2 = parataa_sample(den, x, sig, config=ParaTAAConfig(max_rounds=2, tol=0.0, tol_noise=0.0))
    assert rep2.rounds == 2 and not rep2.converged and rep2.finished == [1, 2]


def test_warm_start_on_an_unchanged_problem_takes_one_round():
    sig = karras(30)
    x = start(sig)
    den = Mixture()
    out, rep = parataa_sample(den, x, sig)
    warm, wrep = parataa_sample(den, x, sig, init=rep.trajectory.float())
    print(f"\n[parataa] cold {rep.rounds} rounds, warm {wrep.rounds}")
    assert wrep.converged and wrep.rounds == 1 and rel_err(warm, out) <= 1e-6
    # With a window the trajectory is checked window by window, still one round each.
    _, wrep2 = parataa_sample(den, x, sig, config=ParaTAAConfig(window=10), init=rep.trajectory)
    assert wrep2.rounds == 3


def test_warm_start_after_a_change_resolves_to_the_new_result_faster():
    sig = karras(30)
    x = start(sig)
    _, rep = parataa_sample(Mixture(), x, sig, config=ParaTAAConfig(tol=1e-5, tol_noise=1e-5))
    changed = Mixture(shift=0.05)  # "a small prompt change"
    ref = sequential_sample(changed, x, make_recurrence(sig))
    cfg = ParaTAAConfig(tol=1e-5, tol_noise=1e-5)
    cold, crep = parataa_sample(changed, x, sig, config=cfg)
    warm, wrep = parataa_sample(changed, x, sig, config=cfg, init=rep.trajectory)
    print(f"\n[parataa] changed problem: cold {crep.rounds} rounds, warm {wrep.rounds} rounds")
    assert wrep.converged and rel_err(warm, ref) <= 2e-4 and rel_err(cold, ref) <= 2e-4
    assert wrep.rounds < crep.rounds
    # keep: the first steps stay exactly as the previous trajectory had them, only the rest is solved.
    kept, krep = parataa_sample(changed, x, sig, config=cfg, init=rep.trajectory, keep=20)
    assert torch.equal(krep.trajectory[1:21], rep.trajectory[1:21]) and krep.rounds <= 10
    assert min(lo for lo, _ in krep.windows) == 21


def test_stochastic_variant_converges_to_the_sequential_result_with_the_same_noises():
    sig = karras(30)
    x = start(sig)
    den = Mixture()
    rec = make_recurrence(sig, "ancestral", eta=1.0)
    z = presample_noises(rec, SHAPE, seed=11)
    ref = sequential_sample(den, x, rec, z)
    out, rep = parataa_sample(den, x, sig, rec, z, ParaTAAConfig(tol=1e-5, tol_noise=1e-5))
    print(f"\n[parataa] ancestral: {rep.rounds} rounds, relative error {rel_err(out, ref):.2e}")
    assert rep.converged and rep.rounds < 30 and rel_err(out, ref) <= 2e-4
    # Other noises give another sample: the noises really enter.
    other = sequential_sample(den, x, rec, presample_noises(rec, SHAPE, seed=12))
    assert rel_err(other, ref) > 1e-2


def test_chunks_and_group_keys_split_the_model_calls_without_changing_the_result():
    sig = karras(16)
    x = start(sig)
    den = Mixture()
    full, _ = parataa_sample(den, x, sig)
    den.calls.clear()
    checked = []
    out, rep = parataa_sample(den, x, sig, config=ParaTAAConfig(chunk=3), group_key=lambda s: s > 1.0,
                              check_interrupt=lambda: checked.append(1))
    assert all(c.numel() <= 3 * SHAPE[0] for c in den.calls)
    assert all(bool((c > 1.0).all()) or bool((c <= 1.0).all()) for c in den.calls)  # never across the key
    assert len(checked) == len(den.calls) > rep.rounds
    assert rel_err(out, full) <= 1e-5

    def stop():
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        parataa_sample(den, x, sig, check_interrupt=stop)
