"""Cases for tests/comfy/test_overlap_trace.py: exact patch parallelism with the exchanges overlapped (the
default) and blocking (``overlap=False``), both traced, on the tiny SD1.5 / SDXL UNets and a tiny Flux.

Each rank runs every case of its world size and returns the output, the comm counts and its trace; the
parent compares with single-device ComfyUI sampling (the same ``sample_case`` functions as the exactness
tests of unet_parallel_cases / dit_parallel_cases).
"""
from __future__ import annotations

from typing import Any

from support import dit_parallel_cases as dc
from support import unet_parallel_cases as uc

CASES: dict[int, list[dict[str, Any]]] = {
    2: [dict(uc.case("w2 sd15 euler lora 40x40", "sd15", "euler", 40, 40, lora="full"), kind="unet"),
        dict(uc.case("w2 sdxl dpmpp_2m 44x36", "sdxl", "dpmpp_2m", 44, 36), kind="unet"),
        dict(dc.case("w2 flux euler lora 22x16", "flux", "euler", 22, 16, lora=True), kind="dit")],
    3: [dict(uc.case("w3 sd15 euler_ancestral 46x40 (ragged)", "sd15", "euler_ancestral", 46, 40), kind="unet"),
        dict(dc.case("w3 flux euler 22x16", "flux", "euler", 22, 16), kind="dit")],
}


def build_model(c: dict[str, Any]) -> Any:
    return uc.build_model(c) if c["kind"] == "unet" else dc.build_model(c)


def sample_case(model: Any, c: dict[str, Any]) -> Any:
    return uc.sample_case(model, c) if c["kind"] == "unet" else dc.sample_case(model, c)


def run_parallel(rank: int, world: int, c: dict[str, Any], overlap: bool) -> dict[str, Any]:
    from hires_parallel.parallel.split.dit_parallel import apply_dit_parallel
    from hires_parallel.parallel.split.layout import ParallelPlan
    from hires_parallel.parallel.split.unet_parallel import BandParallelRuntime, apply_band_parallel

    align = uc.ALIGN if c["kind"] == "unet" else 1
    runtime = BandParallelRuntime(ParallelPlan(world, False), rank, align, trace=True, overlap=overlap)
    try:
        base = build_model(c)
        model = apply_band_parallel(base, runtime) if c["kind"] == "unet" else \
            apply_dit_parallel(base, runtime, "gathered_kv")
        out = sample_case(model, c)
        return {"out": out, "stats": runtime.stats.as_dict(), "trace": runtime.stats.trace.as_dict()}
    finally:
        runtime.close()


def run_world(rank: int, world: int) -> dict[str, Any]:
    from hires_parallel.comfy_host import ensure_comfy

    ensure_comfy()
    return {(c["name"], overlap): run_parallel(rank, world, c, overlap)
            for c in CASES[world] for overlap in (True, False)}
