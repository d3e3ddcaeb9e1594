"""Cases for tests/comfy/test_sd15_real_layout.py: exact patch parallelism on a UNet with SD1.5's REAL
level structure (``tiny_models.build_sd15_real_layout``: four levels, total downsampling 8, attention at
1/1, 1/2 and 1/4 and in the middle block), run on spawned gloo ranks (``spawn_run``) against the same
ComfyUI sampling loop in the parent process.

The sampling itself (conds, noise, LoRA / ControlNet stand-in, ``comfy.sample.sample``) is the one of
``unet_parallel_cases``; only the model and the band alignment (8 instead of 4) differ.
"""
from __future__ import annotations

from typing import Any

import torch

from support import unet_parallel_cases as uc

ALIGN = 8  # total downsampling of SD1.5's layout: 2 ** (4 levels - 1)


def case(name: str, sampler: str, h: int, w: int, **kw: Any) -> dict[str, Any]:
    return uc.case(name, "sd15_real", sampler, h, w, **kw)


# Heights: 40 over 2 bands aligned to 8 is 24 / 16 (uneven); 44 is not a multiple of 8 (the last band
# absorbs 4 unaligned rows, and every level below full resolution rounds up); 3 ranks give 16/16/8 etc.
CASES: dict[int, list[dict[str, Any]]] = {
    2: [
        case("w2 sd15-real euler 40x40", "euler", 40, 40),
        case("w2 sd15-real dpmpp_2m lora 44x32 (ragged)", "dpmpp_2m", 44, 32, lora="full"),
        case("w2 sd15-real euler control 40x32", "euler", 40, 32, control=True),
    ],
    3: [
        case("w3 sd15-real euler 40x40", "euler", 40, 40),
        case("w3 sd15-real euler_ancestral lora 46x32 (ragged)", "euler_ancestral", 46, 32, lora="full"),
        case("w3 sd15-real dpmpp_2m weights 1:2:1 48x32", "dpmpp_2m", 48, 32, weights=[1.0, 2.0, 1.0]),
    ],
}


def build_model(c: dict[str, Any], dtype: torch.dtype | None = None) -> Any:
    from support import tiny_models as tm

    model = tm.build_sd15_real_layout(0, dtype=dtype)
    if c["lora"] == "full":
        model = tm.make_lora_patches(model, uc.LORA_SEED)
    elif c["lora"] != "none":
        raise ValueError(f"lora {c['lora']!r} is not used with the real-layout model")
    return model


def run_parallel(rank: int, world: int, c: dict[str, Any]) -> dict[str, Any]:
    from hires_parallel.parallel.split.layout import ParallelPlan
    from hires_parallel.parallel.split.unet_parallel import BandParallelRuntime, apply_band_parallel

    runtime = BandParallelRuntime(ParallelPlan(world, c["cfg_parallel"]), rank, ALIGN, c["weights"])
    try:
        model = apply_band_parallel(build_model(c), runtime)
        out = uc.sample_case(model, c)
        return {"out": out, "calls": runtime.calls, "bands": runtime.band_for(c["h"]).bands}
    finally:
        runtime.close()


def run_world(rank: int, world: int) -> dict[str, Any]:
    from hires_parallel.comfy_host import ensure_comfy

    ensure_comfy()
    return {c["name"]: run_parallel(rank, world, c) for c in CASES[world]}
