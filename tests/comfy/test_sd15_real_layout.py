"""Exact patch parallelism on SD1.5's REAL level structure (four levels, attention at 1/1, 1/2, 1/4).

The other UNet tests use models with no attention at full latent resolution and three levels. Here
``tiny_models.build_sd15_real_layout`` (channel_mult (1, 2, 4, 4), 2 ResBlocks per level, a transformer
after each ResBlock of the first three levels and in the middle block, none in the 1/8 level's blocks)
runs band-parallel on 2 and 3 spawned gloo ranks (bands aligned to 8, uneven and ragged heights, LoRA,
a ControlNet stand-in, device weights) through ``apply_band_parallel`` and ComfyUI's own sampler loop,
against the single-device run in this process.

Tolerance from measured float noise: for every case the single-device sampling is also run with the
UNet in float64 (same weights, exactly representable), and ``noise = max|fp32 - fp64| / max|fp64|`` is
the fp32 rounding error of the unsplit model. Measured on this machine (3 steps, 1 thread): 1.9e-6 to
2.4e-6 for every case. The band split may reorder float sums (GroupNorm statistics, attention over
gathered K/V), which is rounding of the same kind, so it must stay within ``NOISE_FACTOR`` x noise
(about 1e-5, the bound the other exactness tests use); a missing halo, K/V or LoRA gives errors of
order 1e-2 and more (``test_attention_at_full_resolution_matters``).
"""
from __future__ import annotations

import time
from typing import Any

import pytest
import torch

from support import real_layout_cases as rc
from support import tiny_models as tm
from support import unet_parallel_cases as uc
from support.gloo import spawn_run

NOISE_FACTOR = 5.0
SPAWN_TIMEOUT_S = 180


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[int, list[dict[str, Any]]]:
    out = {}
    for world in rc.CASES:
        t0 = time.monotonic()
        out[world] = spawn_run(rc.run_world, world, tmp_path_factory.mktemp(f"real_layout_w{world}"), SPAWN_TIMEOUT_S)
        print(f"\n[spawn] {world} gloo ranks, {len(rc.CASES[world])} real-layout cases: {time.monotonic() - t0:.1f} s")
    return out


_REFS: dict[tuple, torch.Tensor] = {}


def reference(c: dict[str, Any], dtype: torch.dtype | None = None) -> torch.Tensor:
    key = tuple(sorted((k, str(v)) for k, v in c.items() if k != "name")) + (str(dtype),)
    if key not in _REFS:
        _REFS[key] = uc.sample_case(rc.build_model(c, dtype), c)
    return _REFS[key]


def test_model_has_the_real_sd15_layout() -> None:
    from hires_parallel.parallel.split.unet_parallel import _unet_levels

    model = tm.build_sd15_real_layout(0)
    unet = model.model.diffusion_model
    assert list(unet.channel_mult) == [1, 2, 4, 4] and tm.total_downsampling(model) == 8
    n_down, factors = _unet_levels(unet)
    assert n_down == 3
    by_factor: dict[int, list] = {}
    for key, f in factors.items():
        by_factor.setdefault(f, []).append(key)
    # SD1.5: two transformers per level on the way down (1/1, 1/2, 1/4), three per level on the way up,
    # one in the middle block (1/8), none in the 1/8 level's own blocks.
    assert {f: len(keys) for f, keys in by_factor.items()} == {1: 5, 2: 5, 4: 5, 8: 1}
    assert by_factor[8] == [("middle", 0, 0)]
    assert sorted(by_factor[1]) == [("input", 1, 0), ("input", 2, 0), ("output", 9, 0), ("output", 10, 0), ("output", 11, 0)]
    assert factors.keys() == set(tm.attention_blocks(model))
    # The pack's own preflight alignment for this model.
    assert 2 ** (len(model.get_model_object("diffusion_model").channel_mult) - 1) == rc.ALIGN


@pytest.mark.parametrize("world", sorted(rc.CASES))
def test_exact_mode_matches_single_device(runs, one_thread, world: int) -> None:
    for c in rc.CASES[world]:
        per_rank = [r[c["name"]]["out"] for r in runs[world]]
        for rank, out in enumerate(per_rank[1:], 1):
            assert torch.equal(out, per_rank[0]), f"{c['name']}: rank {rank} holds a different latent than rank 0"
        ref, ref64 = reference(c), reference(c, torch.float64)
        assert torch.isfinite(ref).all() and ref.abs().max() > 1.0 and ref.std() > 1.0, f"{c['name']}: degenerate reference"
        scale = ref64.abs().max().item()
        noise = (ref - ref64).abs().max().item() / scale
        err = (per_rank[0] - ref).abs().max().item() / scale
        tol = NOISE_FACTOR * noise
        bands = runs[world][0][c["name"]]["bands"]
        print(f"  {c['name']:48s} bands {bands}: rel err {err:.2e}  (fp32 noise {noise:.2e}, tol {tol:.2e})")
        assert 0.0 < noise < 1e-5, f"{c['name']}: fp32-vs-fp64 noise {noise:.2e} is out of the expected range"
        assert err <= tol, f"{c['name']}: relative error {err:.3e} > {NOISE_FACTOR} x fp32 noise {noise:.3e}"


def test_layouts_and_exchanges(runs) -> None:
    got = {c["name"]: runs[w][0][c["name"]]["bands"] for w in runs for c in rc.CASES[w]}
    assert got["w2 sd15-real euler 40x40"] == [(0, 24), (24, 40)]
    assert got["w2 sd15-real dpmpp_2m lora 44x32 (ragged)"] == [(0, 24), (24, 44)]
    assert got["w3 sd15-real euler 40x40"] == [(0, 16), (16, 24), (24, 40)]  # the middle band is 1 row at 1/8
    assert got["w3 sd15-real euler_ancestral lora 46x32 (ragged)"] == [(0, 16), (16, 32), (32, 46)]
    assert got["w3 sd15-real dpmpp_2m weights 1:2:1 48x32"] == [(0, 16), (16, 40), (40, 48)]
    for world, results in runs.items():
        for c in rc.CASES[world]:
            for rank, r in enumerate(results):
                calls = r[c["name"]]["calls"]
                assert len(calls) >= c["steps"], c["name"]
                for call in calls:
                    for kind in ("halo", "groupnorm", "kv", "output"):
                        assert call["sent"].get(kind, 0) > 0 and call["received"].get(kind, 0) > 0, (c["name"], rank, kind)


def test_attention_at_full_resolution_matters(one_thread) -> None:
    """The full-resolution transformers are live: without their self-attention the result changes by far
    more than the tolerance (so the cases above would catch a band attending to its own rows only)."""
    c = rc.CASES[2][0]
    ref = reference(c)
    model = rc.build_model(c).clone()

    def local(q, k, v, extra_options):
        from comfy.ldm.modules.attention import optimized_attention

        rows = q.shape[1] // 2  # attend within each half of the image only: a "band-local" attention
        return torch.cat([
            optimized_attention(q[:, :rows], k[:, :rows], v[:, :rows], extra_options["n_heads"]),
            optimized_attention(q[:, rows:], k[:, rows:], v[:, rows:], extra_options["n_heads"]),
        ], dim=1)

    for block, number, index in (("input", 1, 0), ("input", 2, 0), ("output", 9, 0), ("output", 10, 0), ("output", 11, 0)):
        model.set_model_attn1_replace(local, block, number, index)
    d = (uc.sample_case(model, c) - ref).abs().max().item() / ref.abs().max().item()
    print(f"  band-local attention at 1/1 only: rel change {d:.2e}")
    assert d > 1e-3


# SD15 entry of comfy/model_detection.py (ComfyUI 0.3.64), without dtype; num_heads 8 comes from
# supported_models.SD15.unet_extra_config.
_SD15_DETECTED = {
    "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True, "legacy": False,
    "adm_in_channels": None, "in_channels": 4, "model_channels": 320, "num_res_blocks": [2, 2, 2, 2],
    "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0], "channel_mult": [1, 2, 4, 4], "transformer_depth_middle": 1,
    "use_linear_in_transformer": False, "context_dim": 768, "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
    "use_temporal_attention": False, "use_temporal_resblock": False,
}


def test_real_layout_config_is_sd15s_own() -> None:
    """The full-size config is model_detection's SD15 entry; the tiny one differs only in widths."""
    assert tm.sd15_real_layout_unet_config(320, 2, 768) == _SD15_DETECTED
    tiny = tm.sd15_real_layout_unet_config()
    assert {k: v for k, v in tiny.items() if k not in ("model_channels", "context_dim")} == {
        k: v for k, v in _SD15_DETECTED.items() if k not in ("model_channels", "context_dim")
    }


def test_patch_parallel_ksampler_node_on_the_real_layout(one_thread) -> None:
    """The node path (preflight alignment 8, weight file, worker pool, worker-side runtime) on 2 CPU ranks,
    against ComfyUI's stock KSampler; uneven bands (40 rows: 24 + 16)."""
    import nodes

    from hires_parallel.nodes.parallel_sampler import HiResParallelPatchParallelKSampler
    from hires_parallel.parallel.runtime import submit
    from hires_parallel.parallel.runtime.pool import shutdown_pool

    model = tm.make_lora_patches(tm.build_sd15_real_layout(0), uc.LORA_SEED)
    positive, negative = tm.make_conds(model, 1)
    latent = {"samples": torch.zeros(1, 4, 40, 32)}
    args = (5, 3, 4.0, "euler", "karras", positive, negative, latent)
    ref = nodes.common_ksampler(model, *args)[0]["samples"]
    try:
        out = HiResParallelPatchParallelKSampler.execute(model, *args, 1.0, 2, "cpu", "exact", "off").result[0]["samples"]
        run = dict(submit.LAST_RUN)
    finally:
        shutdown_pool()
    scale = ref.abs().max().item()
    err = (out - ref).abs().max().item() / scale
    print(f"  node, 2 CPU ranks, real layout + LoRA, 40x32: rel err {err:.2e} (tol 1e-5 = about {NOISE_FACTOR:.0f}x fp32 noise)")
    assert run["world_size"] == 2 and run["cfg_parallel"] is False
    sent = run["ranks"][0]["comm"]["bytes_sent"]
    assert sent.get("halo", 0) > 0 and sent.get("kv", 0) > 0, sent
    assert err <= 1e-5
