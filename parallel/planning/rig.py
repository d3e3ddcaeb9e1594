"""What a set of devices can do, for the cost model: compute rate, streaming multiprocessors, link, overheads.

Numbers come from datasheets, times ONE utilisation factor for every GPU (``UTILISATION``): the share of
the dense fp16 / bf16 tensor-core peak that eager PyTorch reaches on diffusion models. It is set so that
the model reproduces one published single-GPU time: SDXL 1024^2, 50 steps, CFG, A100 80G: 5.9 s
(fal-ai/stable-diffusion-benchmarks README, diffusers fp16 SDPA), i.e. 118 ms per step; the HF page
stabilityai/stable-diffusion-xl-1.0-tensorrt gives 3704 ms / 30 steps = 123 ms (A100, PyTorch baseline).
Link figures are achieved (not nominal) one-direction bandwidths per rank; latency is per message.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

__all__ = ["UTILISATION", "LAUNCH_S", "Rig", "PRESETS", "preset", "cpu_rig"]

UTILISATION = 0.50  # of the datasheet dense fp16/bf16 tensor peak (see above)
LAUNCH_S = 20e-6  # per listed layer: its kernel launch plus the elementwise kernels around it (eager PyTorch)


@dataclass(frozen=True)
class Rig:
    """``gpus`` devices of ``tflops`` effective TFLOP/s each with ``sms`` streaming multiprocessors (0: no wave
    quantisation, e.g. CPUs); a link of ``link_gbps`` GB/s per rank and direction and ``latency_us`` per
    message; ``overlap``: async exchanges run beside compute; ``launch_s``: fixed seconds per listed layer
    per call (does not shrink with more devices); ``memory_gib`` per device; ``hbm_gbps``: effective device
    memory bandwidth for copies (0: free). ``shared_cores`` > 0: the
    "devices" are ranks sharing that many CPU cores, and ``thread_speedup`` is how much faster 1 rank with
    all of them is than 1 rank with one core (measured). ``step_overhead_s``: fixed seconds per step of a
    multi-process run (the pool's per-step cancel-check all-reduce and the progress message from rank 0 to
    the controller; measured; 0 for the GPU presets, where it is tens of microseconds); a 1-device plan runs
    in-process and pays none."""

    name: str
    gpus: int
    tflops: float
    link_gbps: float
    latency_us: float
    overlap: bool = True
    launch_s: float = LAUNCH_S
    memory_gib: float = 80.0
    sms: int = 0
    hbm_gbps: float = 0.0
    shared_cores: int = 0
    thread_speedup: float = 1.0
    source: str = ""
    step_overhead_s: float = 0.0

    def rank_rate(self, ranks: int) -> float:
        """Compute rate of each of ``ranks`` concurrent ranks relative to one rank alone. Separate devices: 1.
        Shared cores C: one rank with t threads runs at t ** a (a = log(thread_speedup) / log C, so C threads
        give the measured speed-up); N <= C ranks get C / N threads each, more ranks time-share single cores."""
        c = self.shared_cores
        if c == 0 or ranks <= 1:
            return 1.0
        if c == 1:
            return 1.0 / ranks
        a = math.log(max(self.thread_speedup, 1.0)) / math.log(c)
        per_rank = (c / ranks) ** a if ranks <= c else c / ranks
        return per_rank / c ** a

    def with_link(self, gbps: float, latency_us: float) -> "Rig":
        return replace(self, link_gbps=float(gbps), latency_us=float(latency_us))


def _gpu(name: str, gpus: int, peak_tflops: float, sms: int, hbm: float, gbps: float, lat_us: float, mem: float,
         source: str) -> Rig:
    return Rig(name, gpus, peak_tflops * UTILISATION, gbps, lat_us, True, LAUNCH_S, mem, sms, hbm * UTILISATION,
               source=source)


PRESETS: dict[str, Rig] = {r.name: r for r in (
    # HBM / GDDR bandwidths (GB/s) from the same datasheets, times UTILISATION.
    # A100 SXM4 80GB: 312 TFLOP/s dense fp16 (NVIDIA A100 datasheet), 108 SMs, 2039 GB/s; NVLink 3 600 GB/s total =
    # 300 GB/s per direction, NCCL reaches ~240 GB/s (nccl-tests on DGX A100); DistriFusion's rig.
    _gpu("8x A100-80G NVLink", 8, 312.0, 108, 2039.0, 240.0, 15.0, 80, "A100 datasheet; NVLink 3"),
    # H100 SXM5: 989 TFLOP/s dense bf16 (H100 datasheet), 132 SMs; NVLink 4 900 GB/s total, ~360 achieved.
    _gpu("8x H100 NVLink", 8, 989.0, 132, 3350.0, 360.0, 15.0, 80, "H100 SXM datasheet; NVLink 4"),
    # RTX 4090: 165 TFLOP/s dense fp16 with fp32 accumulate (Ada whitepaper), 128 SMs, 24 GB. GeForce has no
    # P2P: NCCL stages through host memory (device->host->device), PCIe 4.0 x16 ~25 GB/s per copy, two copies
    # and a shared root complex: ~8 GB/s per rank for 8 cards, ~10 GB/s for 4; shared-memory hops ~50 us.
    _gpu("8x RTX 4090 PCIe (no P2P)", 8, 165.0, 128, 1008.0, 8.0, 50.0, 24, "Ada whitepaper; PCIe 4.0 via host"),
    _gpu("4x RTX 4090 PCIe (no P2P)", 4, 165.0, 128, 1008.0, 10.0, 40.0, 24, "Ada whitepaper; PCIe 4.0 via host"),
    # RTX 3090: 71 TFLOP/s dense fp16 with fp32 accumulate (Ampere GA102 whitepaper), 82 SMs, 24 GB; PCIe 4.0,
    # no P2P without an NVLink bridge: ~12 GB/s through host, ~30 us.
    _gpu("2x RTX 3090 PCIe", 2, 71.0, 82, 936.0, 12.0, 30.0, 24, "GA102 whitepaper; PCIe 4.0 via host"),
)}


def preset(name: str) -> Rig:
    """A preset by name, or by a unique case-insensitive substring of it (e.g. "h100", "8x rtx 4090")."""
    if name in PRESETS:
        return PRESETS[name]
    hits = [r for k, r in PRESETS.items() if name.lower() in k.lower()]
    if len(hits) != 1:
        raise KeyError(f"no single rig preset matches {name!r}; presets: {', '.join(PRESETS)}")
    return hits[0]


def cpu_rig(cores: int, thread_speedup: float, *, tflops: float = 0.1, link_gbps: float = 2.0,
            latency_us: float = 100.0, memory_gib: float = 8.0, step_overhead_s: float = 0.0) -> Rig:
    """Ranks on one CPU sharing ``cores`` cores (gloo on loopback). ``tflops`` is a placeholder: the planner
    calibrates it from a measured ``single_call_s``. No overlap: gloo moves the bytes with CPU threads that
    compete with the ranks' compute for the same cores, so an overlapped exchange hides nothing."""
    return Rig(f"{cores}-core CPU", cores, tflops, link_gbps, latency_us, False, 0.0, memory_gib, 0,
               shared_cores=cores, thread_speedup=thread_speedup, source="measured",
               step_overhead_s=float(step_overhead_s))
