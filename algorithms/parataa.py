"""ParaTAA: parallel-in-time sampling by fixed-point iteration with triangular Anderson acceleration.

(Tang et al., arXiv 2402.09970.) A sampler of N steps is a lower-triangular system of equations in the
states x_1..x_N (x_0, the start, is given):

    x_{i+1} = a_i x_i + b_i D(x_i, sigma_i) + c_i z_i        (step i: sigma_i -> sigma_{i+1})

with ComfyUI's sigma-space state (x = x0 + sigma * eps). DDIM (eta = 0) is a_i = sigma_{i+1} / sigma_i,
b_i = 1 - a_i, c_i = 0, which is exactly ComfyUI's `euler`; the ancestral variant uses noises z_i drawn
once from a seed (in the order ComfyUI's `euler_ancestral` draws them). Instead of running the steps one
after another, every round evaluates the model on a whole window of states in one batch (a sigma vector),
and updates all of them at once:

* order-s residual R_i = (unrolled recurrence from x_{max(i-s, p-1)} with the current D values) - x_i;
* triangular Anderson acceleration with memory m: per entry i, least squares over the residual changes of
  the entries p..i (those x_i depends on), x_i <- x_i + R_i - sum_k gamma_ik (dX_ik + dR_ik); m = 1 is the
  plain fixed point;
* convergence per entry on the order-1 residual r_i, RMS in VP-scaled coordinates x / sqrt(1 + sigma^2):
  r_i <= max(tol, tol_noise * nu_i), nu_i the step's DDPM (eta = 1) noise level. The converged prefix of
  the window is final; the first unconverged entry p gets its exact one-step update (its input is final),
  so it is final too and every round finishes at least one step: rounds <= N, always.

Least squares and tolerances run in float64 in VP-scaled coordinates (flow models: the state itself).
Pure torch: nothing here imports ComfyUI.
"""
from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable

import torch
from torch import Tensor

__all__ = [
    "ParaTAAConfig",
    "ParaTAAReport",
    "Recurrence",
    "make_recurrence",
    "presample_noises",
    "sequential_sample",
    "parataa_sample",
    "VARIANTS",
]

VARIANTS = ("ddim", "ancestral")

Denoise = Callable[[Tensor, Tensor], Tensor]


@dataclass
class Recurrence:
    """Coefficients of x_{i+1} = a_i x_i + b_i D(x_i, sigma_i) + c_i z_i for i = 0..N-1 (float64, CPU)."""

    sigmas: Tensor  # (N + 1,)
    a: Tensor  # (N,)
    b: Tensor
    c: Tensor
    draws: list[bool]  # whether step i draws a noise from the generator (ComfyUI's draw order)
    nu: Tensor  # (N,) DDPM (eta = 1) noise level added by step i, in scaled coordinates of state i + 1
    scales: Tensor  # (N + 1,) scale of state i: 1 / sqrt(1 + sigma_i^2) (VP), or 1 (flow)

    @property
    def steps(self) -> int:
        return int(self.a.shape[0])

    @property
    def stochastic(self) -> bool:
        return any(self.draws) and bool((self.c != 0).any())


def _check_sigmas(sigmas: Tensor) -> Tensor:
    s = torch.as_tensor(sigmas).detach().to("cpu", torch.float64).flatten()
    if s.numel() < 1 or not torch.isfinite(s).all():
        raise ValueError(f"sigmas must be finite and non-empty; got {s.tolist()}")
    if s.numel() > 1 and (s[:-1] <= 0).any():
        raise ValueError("every sigma except the last must be positive (a step cannot start from sigma 0); "
                         f"got {[round(v, 4) for v in s.tolist()]}")
    return s


def _eps_ancestral(s: float, s_next: float, eta: float) -> tuple[float, float]:
    """(sigma_down, sigma_up) exactly as k-diffusion's get_ancestral_step."""
    if not eta:
        return s_next, 0.0
    up = min(s_next, eta * (s_next ** 2 * (s ** 2 - s_next ** 2) / s ** 2) ** 0.5)
    return (s_next ** 2 - up ** 2) ** 0.5, up


def _rf_ancestral(s: float, s_next: float, eta: float) -> tuple[float, float, float]:
    """(a, b, c) of ComfyUI's sample_euler_ancestral_RF step for a flow model, s_next > 0."""
    down = s_next * (1 + (s_next / s - 1) * eta)
    alpha_next, alpha_down = 1 - s_next, 1 - down
    renoise = max(s_next ** 2 - down ** 2 * alpha_next ** 2 / alpha_down ** 2, 0.0) ** 0.5
    r = down / s
    k = alpha_next / alpha_down if eta > 0 else 1.0
    return k * r, k * (1 - r), renoise if eta > 0 else 0.0


def make_recurrence(sigmas: Tensor, variant: str = "ddim", eta: float = 1.0, s_noise: float = 1.0,
                    flow: bool = False) -> Recurrence:
    """The step coefficients of DDIM (eta = 0, ComfyUI `euler`) or of the ancestral sampler with `eta`
    (ComfyUI `euler_ancestral`; for flow models its rectified-flow form), for the given sigmas."""
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}; got {variant!r}")
    if eta < 0 or s_noise < 0:
        raise ValueError(f"eta and s_noise must be >= 0; got eta={eta}, s_noise={s_noise}")
    s = _check_sigmas(sigmas)
    n = s.numel() - 1
    a, b, c, nu, draws = [], [], [], [], []
    for i in range(n):
        si, sn = float(s[i]), float(s[i + 1])
        # Tolerance scale: the noise an eta = 1 step would add (VP-scaled for EPS models).
        if flow:
            nu.append(_rf_ancestral(si, sn, 1.0)[2] if sn > 0 else 0.0)
        else:
            nu.append(_eps_ancestral(si, sn, 1.0)[1] / math.sqrt(1 + sn ** 2))
        if variant == "ddim":
            r = sn / si
            a.append(r), b.append(1 - r), c.append(0.0), draws.append(False)
        elif flow:
            if sn == 0:
                a.append(0.0), b.append(1.0), c.append(0.0), draws.append(False)
            else:
                ai, bi, ci = _rf_ancestral(si, sn, eta)
                a.append(ai), b.append(bi), c.append(ci * s_noise), draws.append(eta > 0)
        else:
            down, up = _eps_ancestral(si, sn, eta)
            if down == 0:  # k-diffusion returns the denoised value and draws nothing
                a.append(0.0), b.append(1.0), c.append(0.0), draws.append(False)
            else:
                r = down / si
                a.append(r), b.append(1 - r), c.append(up * s_noise), draws.append(True)
    f64 = dict(dtype=torch.float64)
    scales = torch.ones_like(s) if flow else 1.0 / torch.sqrt(1.0 + s ** 2)
    return Recurrence(s, torch.tensor(a, **f64), torch.tensor(b, **f64), torch.tensor(c, **f64), draws,
                      torch.tensor(nu, **f64), scales)


def presample_noises(rec: Recurrence, shape: tuple[int, ...], seed: int, device: Any = "cpu",
                     dtype: torch.dtype = torch.float32) -> Tensor | None:
    """Per-step noises z_i (N, *shape) drawn as k-diffusion's default_noise_sampler draws them for `seed`
    (one generator on `device`, one draw per step that draws), so the ancestral variant reproduces
    ComfyUI's `euler_ancestral` for the same seed. None when no step adds noise."""
    if not rec.stochastic:
        return None
    gen = torch.Generator(device=device)
    gen.manual_seed(int(seed))
    out = torch.zeros((rec.steps, *shape), dtype=dtype, device=device)
    for i, draw in enumerate(rec.draws):
        if draw:
            out[i] = torch.randn(shape, dtype=dtype, device=device, generator=gen)
    return out


def sequential_sample(denoise: Denoise, x: Tensor, rec: Recurrence, noises: Tensor | None = None) -> Tensor:
    """The reference: the same recurrence one step after another (float64 state, model in x.dtype)."""
    state = x.to(torch.float64)
    for i in range(rec.steps):
        sig = rec.sigmas[i].to(device=x.device, dtype=x.dtype).expand(x.shape[0])
        d = denoise(state.to(x.dtype), sig).to(torch.float64)
        state = float(rec.a[i]) * state + float(rec.b[i]) * d
        if noises is not None and float(rec.c[i]) != 0:
            state = state + float(rec.c[i]) * noises[i].to(torch.float64)
    return state.to(x.dtype)


@dataclass
class ParaTAAConfig:
    window: int = 0  # states updated per round (= model evaluations per round per latent); 0 = all steps
    order: int = 20  # s: how many steps the residual unrolls; 1 = plain Jacobi-style fixed point
    memory: int = 2  # m: iterates kept for Anderson acceleration; 1 turns it off
    tol: float = 1e-3  # absolute RMS tolerance of the one-step residual, VP-scaled
    tol_noise: float = 1e-3  # tolerance relative to the step's DDPM noise level
    max_rounds: int = 0  # 0 = number of steps (enough: every round finishes at least one step)
    chunk: int = 0  # states per model call; 0 = the whole window in one call
    reg: float = 1e-3  # Tikhonov term of the least squares, relative to the mean diagonal

    def check(self) -> None:
        bad = []
        if self.window < 0:
            bad.append(f"window must be >= 0 (0 = all steps); got {self.window}")
        if self.order < 1:
            bad.append(f"order must be >= 1; got {self.order}")
        if self.memory < 1:
            bad.append(f"memory must be >= 1 (1 = no Anderson acceleration); got {self.memory}")
        if not (self.tol >= 0 and self.tol_noise >= 0):
            bad.append(f"tolerances must be >= 0; got {self.tol}, {self.tol_noise}")
        if self.max_rounds < 0 or self.chunk < 0 or not self.reg >= 0:
            bad.append("max_rounds, chunk and reg must be >= 0")
        if bad:
            raise ValueError("; ".join(bad))


@dataclass
class ParaTAAReport:
    steps: int
    rounds: int = 0
    evaluations: int = 0  # model evaluations, in states (each is one latent batch)
    converged: bool = False
    residuals: list[list[float]] = field(default_factory=list)  # per round: one-step residual per window entry
    windows: list[tuple[int, int]] = field(default_factory=list)  # per round: (first, last) state updated
    finished: list[int] = field(default_factory=list)  # per round: how many steps were final after it
    trajectory: Tensor | None = None  # (N + 1, *x.shape) float64: every state, for a warm start
    noises: Tensor | None = None


def _rms(t: Tensor) -> Tensor:
    """RMS per leading (window) entry and batch element, max over the batch: (W,)."""
    return t.pow(2).flatten(2).mean(-1).sqrt().amax(-1)


def _evaluate(denoise: Denoise, states: Tensor, sigmas: Tensor, dtype: torch.dtype, chunk: int,
              group_key: Callable[[float], Hashable] | None, check_interrupt: Callable[[], None] | None) -> Tensor:
    """D for W states (W, B, ...) at W sigmas, as batched calls with a sigma vector of W * B entries."""
    w, bsz = states.shape[0], states.shape[1]
    keys = [group_key(float(v)) for v in sigmas] if group_key is not None else [None] * w
    out = torch.empty_like(states)
    start = 0
    while start < w:
        end = start + 1
        # A call holds states with the same key (e.g. the same active conds), at most `chunk` of them.
        while end < w and keys[end] == keys[start] and (chunk <= 0 or end - start < chunk):
            end += 1
        if check_interrupt is not None:
            check_interrupt()
        xs = states[start:end].reshape(-1, *states.shape[2:]).to(dtype)
        sig = sigmas[start:end].to(device=states.device, dtype=dtype).repeat_interleave(bsz)
        d = denoise(xs, sig)
        out[start:end] = d.reshape(end - start, bsz, *states.shape[2:]).to(torch.float64)
        start = end
    return out


def _unroll(x_prev: Tensor, g: Tensor, a: Tensor, entries: range, p: int, lo: int, order: int) -> Tensor:
    """Order-s values F_i for the given entries: the recurrence unrolled from x_e, e = max(i - s, p - 1).

    x_prev[k] is state lo - 1 + k, g[k] = b D + c z of step lo - 1 + k, a the step coefficients (float64).
    """
    idx = torch.tensor(list(entries), dtype=torch.long)
    length = torch.clamp(idx - (p - 1), max=order)  # steps unrolled per entry, >= 1
    view = (-1,) + (1,) * (x_prev.dim() - 1)
    coef = torch.ones(len(idx), dtype=torch.float64)
    f = torch.zeros((len(idx), *x_prev.shape[1:]), dtype=x_prev.dtype, device=x_prev.device)
    for d in range(1, int(length.max()) + 1):
        live = length >= d
        j = torch.where(live, idx - d, idx - 1)  # step index; dead rows point anywhere valid
        f += (coef * live).to(f.device).view(view) * g[j - (lo - 1)]
        coef = torch.where(live, coef * a[j], coef)
    e = idx - length
    return f + coef.to(f.device).view(view) * x_prev[e - (lo - 1)]


def parataa_sample(
    denoise: Denoise,
    x: Tensor,
    sigmas: Tensor,
    rec: Recurrence | None = None,
    noises: Tensor | None = None,
    config: ParaTAAConfig | None = None,
    init: Tensor | None = None,
    keep: int = 0,
    callback: Callable[[dict], None] | None = None,
    group_key: Callable[[float], Hashable] | None = None,
    check_interrupt: Callable[[], None] | None = None,
) -> tuple[Tensor, ParaTAAReport]:
    """Solve the sampler's trajectory from `x` (the start state at sigmas[0]) with ParaTAA.

    denoise(x_batch, sigma_vec) -> D_batch takes W * B latents and one sigma each. `rec` defaults to DDIM
    for `sigmas`; `noises` (N, *x.shape) are the per-step noises of a stochastic recurrence. `init` is a
    previous trajectory (N + 1, *x.shape) to start from (warm start); with it, `keep` first steps are taken
    as they are and only the rest is solved. `callback(info)` runs after every round with the round number,
    the steps finished so far, the residuals and the latest denoised estimate. `group_key(sigma)` splits a
    round's model calls where its value changes; `check_interrupt()` runs before every model call.
    Returns the final state (x.dtype) and a report.
    """
    config = config or ParaTAAConfig()
    config.check()
    rec = rec or make_recurrence(sigmas)
    n = rec.steps
    if rec.sigmas.numel() != torch.as_tensor(sigmas).numel():
        raise ValueError(f"the recurrence has {n} steps but {torch.as_tensor(sigmas).numel() - 1} were given")
    if rec.stochastic and noises is None:
        raise ValueError("a stochastic recurrence needs its pre-sampled noises (presample_noises)")
    if x.dim() < 2:
        raise ValueError(f"x must be batched (B, ...); got shape {tuple(x.shape)}")
    report = ParaTAAReport(steps=n, noises=noises)
    dev = x.device
    traj = torch.empty((n + 1, *x.shape), dtype=torch.float64, device=dev)
    traj[0] = x.to(torch.float64)
    if n == 0:
        report.converged, report.trajectory = True, traj
        return x, report
    a = rec.a
    a_dev, b_dev, c_dev = (v.to(dev) for v in (rec.a, rec.b, rec.c))
    scales = rec.scales.to(dev)
    tol = torch.clamp(config.tol_noise * rec.nu, min=config.tol)  # per state 1..N
    view = (-1,) + (1,) * x.dim()
    window = n if config.window <= 0 else min(config.window, n)
    max_rounds = n if config.max_rounds <= 0 else min(config.max_rounds, n)
    z = None if noises is None else noises.to(device=dev)
    memory = config.memory

    if init is not None:
        if tuple(init.shape) != tuple(traj.shape):
            raise ValueError(f"warm-start trajectory has shape {tuple(init.shape)}, expected {tuple(traj.shape)}")
        traj[1:] = init[1:].to(device=dev, dtype=torch.float64)
        ready = n  # states up to here hold a guess
    else:
        ready = 0
    lo = min(max(int(keep), 0), n) + 1 if init is not None else 1
    history: dict[int, deque] = {}  # entry -> last iterates (y, r) in scaled coordinates
    last_d = None

    def fill(upto: int, d_ref: Tensor | None) -> None:
        """Initial guesses for states ready+1..upto: VP-scaled copy of the start, or the recurrence run on
        with the latest denoised estimate held fixed."""
        nonlocal ready
        for k in range(ready + 1, upto + 1):
            if d_ref is None:
                traj[k] = traj[k - 1] * (scales[k - 1] / scales[k])
            else:
                nxt = a_dev[k - 1] * traj[k - 1] + b_dev[k - 1] * d_ref
                traj[k] = nxt if z is None else nxt + c_dev[k - 1] * z[k - 1].to(torch.float64)
        ready = max(ready, upto)

    while lo <= n and report.rounds < max_rounds:
        hi = min(lo + window - 1, n)
        fill(hi, last_d)
        xin = traj[lo - 1:hi]  # inputs of the entries lo..hi
        d = _evaluate(denoise, xin, rec.sigmas[lo - 1:hi], x.dtype, config.chunk, group_key, check_interrupt)
        report.evaluations += hi - lo + 1
        report.rounds += 1
        last_d = d[-1]
        g = b_dev[lo - 1:hi].view(view) * d
        if z is not None:
            g = g + c_dev[lo - 1:hi].view(view) * z[lo - 1:hi].to(torch.float64)
        one_step = a_dev[lo - 1:hi].view(view) * xin + g  # G_i for i = lo..hi
        err = _rms((one_step - traj[lo:hi + 1]) * scales[lo:hi + 1].view(view))
        report.residuals.append([float(v) for v in err])
        report.windows.append((lo, hi))
        bad = (err > tol[lo - 1:hi].to(err.device)).nonzero()
        if bad.numel() == 0:  # the whole window is within tolerance: final as it is
            for k in range(lo, hi + 1):
                history.pop(k, None)
            lo = hi + 1
        else:
            p = lo + int(bad[0])
            entries = range(p, hi + 1)
            f = _unroll(xin, g, a, entries, p, lo, config.order)
            y = traj[p:hi + 1] * scales[p:hi + 1].view(view)
            r = (f - traj[p:hi + 1]) * scales[p:hi + 1].view(view)
            new = y + r
            if memory > 1 and hi > p:
                new[1:] -= _anderson(y, r, [history.get(k) for k in entries], config.reg)[1:]
            if memory > 1:
                for k, yk, rk in zip(entries, y, r):
                    history.setdefault(k, deque(maxlen=memory - 1)).append((yk, rk))
            traj[p:hi + 1] = new / scales[p:hi + 1].view(view)
            traj[p] = one_step[p - lo]  # exact: its input is final, so it is final too
            for k in range(lo, p + 1):
                history.pop(k, None)
            lo = p + 1
        report.finished.append(lo - 1)
        if callback is not None:
            callback({"round": report.rounds, "finished": lo - 1, "steps": n, "window": (report.windows[-1]),
                      "residual": max(report.residuals[-1]), "denoised": last_d.to(x.dtype),
                      "x": traj[lo - 1].to(x.dtype), "sigma": float(rec.sigmas[lo - 1])})
    report.converged = lo > n
    report.trajectory = traj
    return traj[n].to(x.dtype), report


def _anderson(y: Tensor, r: Tensor, hist: list, reg: float) -> Tensor:
    """Triangular Anderson correction sum_k gamma_ik (dY_ik + dR_ik) for the entries of a round.

    y, r: (W, B, ...) current iterates and residuals (scaled); hist[w]: deque of earlier (y, r), oldest
    first. Row i's least squares sums over the entries 0..i of the round (the states x_i depends on);
    gamma is solved per batch element in float64.
    """
    w, bsz = y.shape[0], y.shape[1]
    ks = [len(h) if h is not None else 0 for h in hist]
    kmax = max(ks)
    out = torch.zeros_like(y)
    if kmax == 0:
        return out
    numel = y[0, 0].numel()
    gram = torch.zeros((w, bsz, kmax, kmax), dtype=torch.float64, device=y.device)
    rhs = torch.zeros((w, bsz, kmax), dtype=torch.float64, device=y.device)
    dirs: list[tuple[Tensor, Tensor] | None] = []
    for i in range(w):
        if ks[i] == 0:
            dirs.append(None)
            continue
        ys = [y[i]] + [h[0] for h in reversed(hist[i])]  # newest first
        rs = [r[i]] + [h[1] for h in reversed(hist[i])]
        dy = torch.stack([ys[k] - ys[k + 1] for k in range(ks[i])], 1)  # (B, K, ...)
        dr = torch.stack([rs[k] - rs[k + 1] for k in range(ks[i])], 1)
        flat = dr.flatten(2)
        gram[i, :, :ks[i], :ks[i]] = flat @ flat.transpose(1, 2) / numel
        rhs[i, :, :ks[i]] = (flat @ r[i].flatten(1).unsqueeze(-1)).squeeze(-1) / numel
        dirs.append((dy, dr))
    gram, rhs = gram.cumsum(0), rhs.cumsum(0)  # triangular: row i sums entries 0..i
    for i in range(w):
        k = ks[i]
        if k == 0:
            continue
        bmat = gram[i, :, :k, :k]
        diag = torch.diagonal(bmat, dim1=-2, dim2=-1).mean(-1)
        bmat = bmat + (reg * diag + 1e-30).view(-1, 1, 1) * torch.eye(k, dtype=torch.float64, device=y.device)
        gamma = torch.linalg.solve(bmat, rhs[i, :, :k].unsqueeze(-1)).squeeze(-1)  # (B, K)
        dy, dr = dirs[i]
        out[i] = ((dy + dr) * gamma.view(bsz, k, *([1] * (dy.dim() - 2)))).sum(1)
    return out
