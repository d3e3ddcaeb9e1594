"""Tolerances from the measured float noise of a path, instead of a constant that holds on one machine.

A parallel run and its one-device reference compute the same function with the float operations in another
order (sums split over bands and ranks, a batch cut into other GEMM shapes, other kernels picked by load or
thread count). Their difference is rounding noise, amplified by the path: a UNet inside a sampling loop with
CFG turns a rounding of one ulp into many ulps of the output, by an amount that depends on the model, the
seed and the steps. A fixed bound such as ``1e-5 x max|ref|`` therefore holds on one machine and fails on
the next (the ASG batch case measured 1.08e-5 to 1.16e-5 relative where the bound was 1e-5).

What is measured: the one-device reference run again with a perturbation of rounding size injected at every
model call: the guidance scale moved by one float32 ulp up and down (``next_float32(cfg, +-1)``). CFG
combines ``uncond + (cond - uncond) * cfg`` at every step, so this is one rounding of the output's own
scale per call, carried through the rest of the loop exactly as rounding differences of a split run are.
It costs two one-device runs, is deterministic (no dependence on load or threads) and is never zero when
the guidance matters. ``noise`` is the largest max-abs difference of those runs from the reference.

The tolerance is ``max(k x noise, floor_ulps x ulp(max|ref|))``:

* ``k = 32`` (``K_DEFAULT``). A split run reorders every reduction of every layer, not one multiply per
  step, so its difference is a few times the measured noise: on the tiny test models 2.8x to 7.6x for
  exact row bands, CFG parallel, batch mode and ControlNets (test_parallel_nodes, test_parallel_controlnet),
  3.6x and 4.9x for ASG row bands and batch mode, 9.2x for ASG asynchronous 2 ranks vs 1. 32 leaves about
  3.5x room above the largest. (When the key view of ASG stopped being shuffled, the asynchronous path's cfg
  reruns measured 26x less noise than the synchronous path's and the same split read 33x; that test now also
  reruns the reference with the batch cut as a rank cuts it, ``tolerance_from_runs``, which equals the split.) A real change stays above it: the guidance scale 0.1% off measured about 12x the tolerance,
  stale (asynchronous) guidance where synchronous was asked about 6000x; ``assert_exceeds`` checks that
  such runs do fail the check.
* ``floor_ulps = 8`` ulps of the output scale, for a path whose measured noise happens to be zero.

Every check prints the measured noise, the tolerance and the error, so a failure says by how much.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

import numpy as np
import torch

K_DEFAULT = 32.0
FLOOR_ULPS = 8.0


def next_float32(x: float, n: int = 1) -> float:
    """``x`` moved by ``n`` float32 ulps (n < 0: down)."""
    v = np.float32(x)
    toward = np.float32(np.inf if n > 0 else -np.inf)
    for _ in range(abs(int(n))):
        v = np.nextafter(v, toward)
    return float(v)


def ulp(scale: float, dtype: torch.dtype = torch.float32) -> float:
    """One ulp of ``dtype`` at ``scale`` (the spacing of representable numbers there)."""
    return float(np.spacing(np.abs(np.array(scale, dtype=torch.empty((), dtype=dtype).numpy().dtype))))


@dataclass(frozen=True)
class NoiseTolerance:
    label: str
    noise: float  # largest max-abs difference of the perturbed reference runs from the reference
    scale: float  # max|reference|
    tol: float  # max(k x noise, floor_ulps x ulp(scale))
    k: float
    floor: float

    def describe(self) -> str:
        return (f"measured float noise {self.noise:.3g} (relative {self.noise / self.scale:.2g}), "
                f"tolerance {self.tol:.3g} = max({self.k:g} x noise, floor {self.floor:.3g})")

    def check(self, what: str, got: torch.Tensor, reference: torch.Tensor) -> float:
        """Assert ``max|got - reference| <= tol``; print and return the error."""
        assert got.shape == reference.shape, f"{what}: shape {tuple(got.shape)} != {tuple(reference.shape)}"
        err = (got.double() - reference.double()).abs().max().item()
        print(f"\n[{self.label}] {what}: max abs {err:.3g} (relative {err / self.scale:.2g}, "
              f"{err / max(self.noise, 1e-300):.2g} x noise); {self.describe()}")
        assert err <= self.tol, f"{what}: {err:.3g} > tolerance {self.tol:.3g} ({self.describe()})"
        return err

    def assert_exceeds(self, what: str, got: torch.Tensor, reference: torch.Tensor) -> float:
        """The other side: a run that differs for a real reason must not pass as float noise."""
        err = (got.double() - reference.double()).abs().max().item()
        print(f"[{self.label}] {what} (must fail the check): max abs {err:.3g}, {err / self.tol:.3g} x tolerance")
        assert err > self.tol, f"{what}: {err:.3g} <= tolerance {self.tol:.3g}: the check cannot see it"
        return err


def tolerance_from_runs(label: str, reference: torch.Tensor, perturbed: Iterable[torch.Tensor],
                        k: float = K_DEFAULT, floor_ulps: float = FLOOR_ULPS) -> NoiseTolerance:
    """The tolerance for comparisons against ``reference``, from reruns of it with rounding-size perturbations."""
    ref = reference.double()
    noise = max(((p.double() - ref).abs().max().item() for p in perturbed), default=0.0)
    scale = ref.abs().max().item()
    floor = floor_ulps * ulp(scale, reference.dtype if reference.is_floating_point() else torch.float32)
    return NoiseTolerance(label, noise, scale, max(k * noise, floor), k, floor)


def cfg_noise_tolerance(label: str, run: Callable[[float], torch.Tensor], cfg: float,
                        reference: torch.Tensor | None = None, k: float = K_DEFAULT,
                        floor_ulps: float = FLOOR_ULPS) -> tuple[torch.Tensor, NoiseTolerance]:
    """``run(cfg)`` is the one-device reference; it runs again at cfg one float32 ulp up and down.
    Returns the reference (``reference`` when given, else ``run(cfg)``) and its tolerance."""
    ref = run(cfg) if reference is None else reference
    perturbed = [run(next_float32(cfg, +1)), run(next_float32(cfg, -1))]
    return ref, tolerance_from_runs(label, ref, perturbed, k, floor_ulps)


__all__ = ["K_DEFAULT", "FLOOR_ULPS", "NoiseTolerance", "next_float32", "ulp", "tolerance_from_runs",
           "cfg_noise_tolerance"]
