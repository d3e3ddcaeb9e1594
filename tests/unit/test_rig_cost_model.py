"""The cost model: calibration against DistriFusion's published speed-ups, sane presets, and the byte count of SDXL
exact at 1024^2 against a hand computation."""
from __future__ import annotations

import pytest

from hires_parallel.parallel.planning.cost_model import predict_run, predict_step
from hires_parallel.parallel.planning.exchange_pattern import SDXL_CONFIG, step_pattern, unet_description
from hires_parallel.parallel.planning.rig import PRESETS, preset

# mit-han-lab/distrifuser README, "Speedups": SDXL 3840x3840, 50-step DDIM, A100: 1.8x / 3.4x / 6.1x on 2 / 4 / 8.
PUBLISHED_3840 = {2: 1.8, 4: 3.4, 8: 6.1}


@pytest.mark.parametrize("gpus", sorted(PUBLISHED_3840))
def test_distrifusion_points_within_15_percent(gpus):
    desc = unet_description(SDXL_CONFIG, (480, 480))
    # distrifuser's default: CFG halves on two groups (split_batch), displaced bands in each, 1 + 4 warmup steps
    p = predict_run(desc, preset("A100"), gpus, "displaced", cfg_parallel=True, steps=50, warmup=5)
    rel = p.speedup / PUBLISHED_3840[gpus] - 1
    assert abs(rel) <= 0.15, f"{gpus} GPUs: predicted {p.speedup:.2f}x vs published {PUBLISHED_3840[gpus]}x"


def test_single_a100_step_matches_published_time():
    # fal-ai/stable-diffusion-benchmarks: SDXL 1024^2, 50 steps, A100 80G, 5.9 s -> 118 ms per CFG step
    p = predict_step(unet_description(SDXL_CONFIG, (128, 128)), preset("A100"), 1)
    assert p.total_s == pytest.approx(0.118, rel=0.15)


def test_presets_are_sane():
    for rig in PRESETS.values():
        assert rig.gpus in (2, 4, 8) and rig.sms > 0 and rig.hbm_gbps > 0 and rig.memory_gib >= 24
        assert 10 < rig.tflops < 1000 and rig.link_gbps > 0 and rig.latency_us > 0 and rig.overlap
    assert preset("H100").tflops > preset("A100").tflops > preset("4x RTX 4090").tflops > preset("3090").tflops
    assert preset("A100").link_gbps > 10 * preset("8x RTX 4090").link_gbps
    assert preset("8x RTX 4090").latency_us > preset("A100").latency_us


def test_sdxl_exact_bytes_at_1024_by_hand():
    desc = unet_description(SDXL_CONFIG, (128, 128))
    p = step_pattern(desc, 2, "exact", batch=2)
    b, item = 2, 2
    # K/V: 2 ranks, each band half the rows; (n-1) * own tokens * 2C * batch * item per self-attention layer.
    # level 1 (64x64, 640 ch): 2 input blocks x 2 + 3 output blocks x 2 = 10 layers; level 2 (32x32, 1280 ch):
    # 2 x 10 + 10 (middle) + 3 x 10 = 60 layers
    kv = 10 * (32 * 64) * 2 * 640 * b * item + 60 * (16 * 32) * 2 * 1280 * b * item
    # halos: with 2 bands the busiest rank is band 0, which sends 1 row down for every 3x3 conv except the input
    # conv (stride 1 and the stride-2 downsample both read 1 row above). Input channels summed per level:
    # level 0 (128 wide): 4 x 320 + downsample 320 + output res (960, 320, 640, 320, 640, 320) + upsample 640
    #   + out conv 320 = 5760; level 1 (64 wide): 320, 640, 640, 640 + downsample 640 + (1920, 640, 1280, 640,
    #   960, 640) + upsample 1280 = 10240; level 2 (32 wide): 640, 1280, 1280, 1280 + middle 4 x 1280 +
    #   (2560, 1280, 2560, 1280, 1920, 1280) = 20480
    halo = (5760 * 128 + 10240 * 64 + 20480 * 32) * b * item
    # GroupNorm: 17 ResBlocks x 2 + 11 SpatialTransformers + the output norm = 46 layers of float64
    # (2 * batch * 32 groups + 1), ring all_reduce on 2 ranks sends 2 (n - 1) / n = 1 buffer
    gn = 46 * (2 * b * 32 + 1) * 8
    out = 64 * 128 * 4 * b * item  # the other band's output rows (gathered, 64 of 128 rows), fp16
    by = p.sent_by_kind()
    assert by["kv"] == kv == 419_430_400  # 2 x 0.21 GB: half of the 0.42 GB per CFG branch (METHODS.md)
    assert by["halo"] == halo == 8_192_000
    assert by["groupnorm"] == gn == 47_472
    assert by["output"] == out
    assert p.bytes_sent == kv + halo + gn + out


def test_displaced_hides_exchanges_and_partial_sends_less():
    desc = unet_description(SDXL_CONFIG, (256, 256))
    rig = preset("A100")
    ex, dis, par = (predict_step(desc, rig, 4, m, overlap_exact=False) for m in ("exact", "displaced", "partial"))
    assert dis.blocking_s < ex.blocking_s and par.bytes_sent < dis.bytes_sent
    assert dis.total_s <= ex.total_s  # against the blocking exact variant
    # a slow link: the exact exchanges dominate
    slow = rig.with_link(0.1, 1000)
    assert predict_step(desc, slow, 4, "exact").speedup < 1.0
