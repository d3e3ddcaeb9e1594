"""describe_module on the tiny real SD3, Qwen-Image and Wan models (and the tests' SD UNet), and plan_for_model on
live modules: positive FLOPs growing with tokens, SD3 / Wan FLOPs against a hand formula, the analytic description
of the SD test UNet that the CPU planner tests use against the module's own."""
from __future__ import annotations

import pytest

from hires_parallel.parallel.planning.comfy_shapes import describe_module
from hires_parallel.parallel.planning.exchange_pattern import step_pattern, unet_description
from hires_parallel.parallel.planning.planner import Link, plan_for_model
from support import tiny_dits as td
from support import tiny_models as tm

TXT = 16


def _dm(family: str):
    return td.build_tiny_dit(family).model.diffusion_model


@pytest.mark.parametrize("family", ["sd3", "qwen_image", "wan21"])
def test_describes_and_grows_with_tokens(family):
    dm = _dm(family)
    small, big = (describe_module(dm, (s, s), text_tokens=TXT, frames=3) for s in (16, 32))
    assert 0 < small.flops < big.flops and small.family == big.family == "dit"
    assert big.rows * big.width == 4 * small.rows * small.width
    kinds = big.by_kind()
    assert kinds["self_attn"] > 0 and kinds["token_mlp"] > 0
    p = step_pattern(big, 2, "exact", batch=2)
    assert p.sent_by_kind()["kv"] > 0 and p.sent_by_kind()["output"] > 0 and 0 < p.flops < 2 * big.flops


def test_sd3_flops_by_hand():
    dm = _dm("sd3")  # depth 2: hidden 128, patch 2, 16 channels, context 64; the last context block is pre_only
    h, t, L, depth = 128, 16 * 16, TXT, 2
    per_block = 2 * 12 * h * h * t + 4 * (t + L) ** 2 * h
    ctx = 2 * 12 * h * h * L * (depth - 1) + 2 * 3 * h * h * L
    embed = 2 * 16 * 4 * h * t + 2 * 64 * h * L + 2 * h * 64 * t
    hand = depth * per_block + ctx + embed
    assert describe_module(dm, (32, 32), text_tokens=L).flops == pytest.approx(hand, rel=0.05)


def test_wan_flops_by_hand():
    dm = _dm("wan21")  # dim 64, ffn 128, 2 layers, text_dim 32, patch (1, 2, 2), 16 channels
    d, ffn, layers, L = 64, 128, 2, TXT
    t = 3 * 16 * 16  # frames x rows x cols of patches
    block = 2 * 4 * d * d * t + 4 * t * t * d + 2 * 2 * d * d * t + 2 * 2 * d * d * L + 4 * t * L * d + 2 * 2 * d * ffn * t
    embed = 2 * 16 * 4 * d * t + 2 * (32 * d + d * d) * L + 2 * d * 64 * t
    desc = describe_module(dm, (32, 32), text_tokens=L, frames=3)
    assert desc.rows * desc.width == t and desc.out_channels == 64
    assert desc.flops == pytest.approx(layers * block + embed, rel=0.05)


def test_sd_test_unet_analytic_matches_module():
    # tests/unit/test_planning_overlap.py's SD_TEST_64 (the CPU measurements' model) against the module itself
    cfg = dict(in_channels=4, out_channels=4, model_channels=64, channel_mult=[1, 2, 2], num_res_blocks=[1, 1, 1],
               transformer_depth=[0, 1, 1], transformer_depth_middle=1, transformer_depth_output=[0, 0, 1, 1, 1, 1],
               context_dim=64, num_head_channels=8, adm_in_channels=None, groups=32)
    dm = tm.build_sd15(seed=0, model_channels=64).model.diffusion_model
    a = unet_description(cfg, (128, 128), itemsize=4)
    b = describe_module(dm, (128, 128), context_tokens=77)
    assert b.flops == pytest.approx(a.flops, rel=0.05)
    assert step_pattern(b, 2, batch=2).sent_by_kind() == step_pattern(a, 2, batch=2).sent_by_kind()
    c = plan_for_model(dm, (1, 4, 128, 128), 2, batch=2, single_call_s=1.476, link=Link(2.0, 75.0),
                       thread_speedup=2.352 / 1.476, shared_cores=2, step_overhead_s=0.002, device_kind="cpu")
    assert c.world == 2 and c.bands == 1, c.reason


@pytest.mark.parametrize("family", ["sd3", "wan21"])
def test_plan_for_model_on_a_live_dit(family):
    dm = _dm(family)
    shape = (1, 16, 3, 32, 32) if family == "wan21" else (1, 16, 32, 32)
    c = plan_for_model(dm, shape, 2, batch=2, single_call_s=0.03, link=Link(2.0, 75.0), thread_speedup=1.59,
                       shared_cores=2, step_overhead_s=0.002, allow_approximate=False, fidelity_gate=None, steps=20,
                       warmup=1, device_kind="cpu")
    assert c.prediction.speedup >= 1.0 and "cannot be described" not in c.reason
    assert any(p.world == 2 for p in c.ranked)
