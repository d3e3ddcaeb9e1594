"""The memory estimate of DiT plans (parallel/split/memory_plan.estimate_dit_plan), from sizes only."""
from __future__ import annotations

import pytest
import torch

from hires_parallel.parallel.split.memory_plan import DitLayout, MemoryPlanError, check_plan_fits, estimate_dit_plan

# Flux.1-dev: hidden 3072, 19 + 38 blocks with image attention, MLP ratio 4, 64 values per token out, bf16
FLUX_DEV = DitLayout(hidden=3072, attn_layers=57, mlp_ratio=4.0, out_per_token=64, patch=(1, 2, 2))


def _est(mode: str, world: int = 2, side: int = 512, **kw) -> dict:
    return estimate_dit_plan(weights_bytes=int(23.8e9), latent_shape=(1, 16, side, side), dtype=torch.bfloat16,
                             world=world, bands=world, cfg_parallel=False, mode=mode, layout=FLUX_DEV,
                             has_negative=False, **kw)


def test_displaced_keeps_one_image_of_kv_per_attention_layer() -> None:
    exact, disp, part = _est("exact"), _est("displaced"), _est("partial")
    tokens = 256 * 256  # 4096^2 pixels
    print(f"  Flux.1-dev 4096^2, 2 devices: exact {exact['total'] / 2**30:.1f} GiB, displaced "
          f"{disp['total'] / 2**30:.1f} GiB (stale {disp['stale'] / 2**30:.1f}), partial {part['total'] / 2**30:.1f}")
    assert exact["stale"] == 0 and disp["stale"] == 57 * 2 * tokens * 3072 * 2
    assert 0 < part["stale"] < disp["stale"] / 2
    assert exact["band_tokens"] == tokens // 2
    assert _est("exact", world=4)["activations"] < exact["activations"], "more devices: smaller bands"


def test_a_plan_that_cannot_fit_is_refused_with_advice() -> None:
    with pytest.raises(MemoryPlanError, match="mode partial"):
        check_plan_fits(_est("displaced"), {"cuda:0": 48 * 2**30})
    check_plan_fits(_est("exact"), {"cuda:0": 48 * 2**30})


def test_video_latents_are_estimated_on_their_token_grid() -> None:
    wan = DitLayout(hidden=5120, attn_layers=40, mlp_ratio=13824 / 5120, out_per_token=64, patch=(1, 2, 2))
    est = estimate_dit_plan(weights_bytes=0, latent_shape=(1, 16, 21, 90, 160), dtype=torch.bfloat16, world=4,
                            bands=4, cfg_parallel=False, mode="exact", layout=wan)
    assert est["band_tokens"] in (21 * 12 * 80, 21 * 11 * 80)  # 45 token rows over 4: rows of every frame
