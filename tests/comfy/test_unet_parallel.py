"""Exact patch parallelism of ComfyUI UNets (parallel/split/unet_parallel.py) against single-device ComfyUI.

Spawned gloo runs (2, 3 and 4 ranks; tests/support/unet_parallel_cases.py) apply ``apply_band_parallel``
to the tiny SD1.5 / SDXL models and run ComfyUI's own sampler loop; this process runs the plain
single-device sampling of every case and compares. World size 1 runs here, without torch.distributed.

Tolerance (fp32, 3 steps): max |parallel - single| <= TOL_REL * max |single|, TOL_REL = 1e-5. The tiny
random UNets end the loop at values of 300-800 (their eps is far from the noise, and CFG 4 amplifies
it), where one fp32 ulp is 3e-5 to 6e-5, so an absolute 1e-4 would mean "bitwise up to 2 ulps of the
largest value". Band parallelism changes the float order of GroupNorm statistics only, which gives
errors spread evenly over all rows; a missing halo, K/V or LoRA gives errors of order 1 and more (see
``test_lora_changes_the_result``). World size 1 must match bit for bit.
"""
from __future__ import annotations

import time
from typing import Any

import pytest
import torch
import torch.distributed as dist

from support import tiny_models as tm
from support import unet_parallel_cases as uc
from support.gloo import spawn_run

TOL_REL = 1e-5
SPAWN_TIMEOUT_S = 150
WORLDS = (2, 3, 4)


# ---------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[int, list[dict[str, Any]]]:
    out = {}
    for world in WORLDS:
        t0 = time.monotonic()
        out[world] = spawn_run(uc.run_world, world, tmp_path_factory.mktemp(f"unet_world{world}"), SPAWN_TIMEOUT_S)
        print(f"\n[spawn] {world} gloo ranks, {len(uc.CASES[world])} cases: {time.monotonic() - t0:.1f} s")
    return out


_REFS: dict[tuple, torch.Tensor] = {}


def reference(c: dict[str, Any]) -> torch.Tensor:
    """Single-device ComfyUI sampling of a case (cached per case)."""
    key = tuple(sorted((k, str(v)) for k, v in c.items() if k != "name"))
    if key not in _REFS:
        _REFS[key] = uc.sample_case(uc.build_model(c), c)
    return _REFS[key]


def _err(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (tuple(a.shape), tuple(b.shape))
    return (a - b).abs().max().item()


def _check(label: str, out: torch.Tensor, ref: torch.Tensor) -> float:
    assert torch.isfinite(ref).all() and ref.abs().max() > 1.0, f"{label}: degenerate reference"
    err = _err(out, ref)
    scale = ref.abs().max().item()
    print(f"  {label:52s} max abs err {err:.2e}  (max|ref| {scale:6.1f}, rel {err / scale:.1e})")
    assert err <= TOL_REL * scale, f"{label}: max abs error {err:.3e} > {TOL_REL} x {scale:.1f}"
    return err


# ---------------------------------------------------------------------------------------- spawned runs
@pytest.mark.parametrize("world", WORLDS)
def test_parallel_sampling_matches_single_device(runs, one_thread, world: int) -> None:
    for c in uc.CASES[world]:
        per_rank = [r[c["name"]]["out"] for r in runs[world]]
        for rank, out in enumerate(per_rank[1:], 1):
            assert torch.equal(out, per_rank[0]), f"{c['name']}: rank {rank} holds a different latent than rank 0"
        _check(c["name"], per_rank[0], reference(c))


def _case(name: str) -> dict[str, Any]:
    return next(c for cases in uc.CASES.values() for c in cases if c["name"] == name)


def test_patches_change_the_result(one_thread) -> None:
    # Without this, the LoRA / ControlNet cases above could pass with a patch silently dropped.
    for name, off in (
        ("w2 sd15 dpmpp_2m conv-lora 40x36", {"lora": "none"}),
        ("w3 sd15 dpmpp_sde lora 42x40 (ragged)", {"lora": "none"}),
        ("w3 sdxl euler_ancestral conv-lora 46x40 (ragged)", {"lora": "none"}),
        ("w2 sd15 euler control 42x36", {"control": False}),
        ("w2 cfgpar sd15 euler control lora 40x40", {"control": False}),
        ("w3 sdxl euler control 46x36 (ragged)", {"control": False}),
    ):
        c = _case(name)
        d = _err(reference(c), reference(dict(c, **off)))
        print(f"  {name:52s} effect of {list(off)[0]}: {d:.2e}")
        assert d > 1e3 * TOL_REL * reference(c).abs().max().item()


def test_layouts_of_the_runs(runs) -> None:
    got = {c["name"]: runs[w][0][c["name"]]["bands"] for w in runs for c in uc.CASES[w]}
    assert got["w3 sd15 euler 44x40"] == [(0, 16), (16, 28), (28, 44)]  # uneven, 44 rows over 3
    assert got["w3 sd15 dpmpp_sde lora 42x40 (ragged)"] == [(0, 16), (16, 28), (28, 42)]  # 42 % 4 != 0
    assert got["w3 sd15 dpmpp_2m weights 1:2:1 48x32"] == [(0, 12), (12, 36), (36, 48)]
    assert got["w2 cfgpar sd15 euler lora 40x40"] == [(0, 40)]
    assert got["w4 cfgpar 2x2 sd15 euler_ancestral lora 42x40"] == [(0, 20), (20, 42)]
    coords = [r["w4 cfgpar 2x2 sd15 euler_ancestral lora 42x40"]["coords"] for r in runs[4]]
    assert coords == [(0, 0), (0, 1), (1, 0), (1, 1)]


def test_comm_stats_per_call(runs) -> None:
    band_kinds = ("halo", "groupnorm", "kv", "output")
    for world, results in runs.items():
        for c in uc.CASES[world]:
            per_rank = [r[c["name"]] for r in results]
            n_calls = {len(p["calls"]) for p in per_rank}
            assert len(n_calls) == 1 and n_calls.pop() >= c["steps"], c["name"]
            bands = len(per_rank[0]["bands"])
            split_batch = c["cfg_parallel"] and c["cfg"] != 1.0  # cfg 1: odd batch, every group runs it all
            for rank, p in enumerate(per_rank):
                for i, call in enumerate(p["calls"]):
                    where = f"{c['name']} rank {rank} call {i}"
                    assert call["rows"] == p["bands"][p["coords"][1]], where
                    for kind in band_kinds:
                        if bands > 1:
                            assert call["sent"].get(kind, 0) > 0 and call["received"].get(kind, 0) > 0, (where, kind, call)
                        else:
                            assert call["sent"].get(kind, 0) == 0, (where, kind, call)
                    assert (call["sent"].get("batch", 0) > 0) == split_batch, (where, call)
                    assert call["computed_batch"] == (call["batch"] // 2 if split_batch else call["batch"]), where
                totals = {k: sum(call["sent"].get(k, 0) for call in p["calls"]) for k in p["stats"]["bytes_sent"]}
                assert totals == p["stats"]["bytes_sent"], c["name"]
            first = per_rank[0]["calls"][0]["sent"]
            print(f"  {c['name']:52s} bytes sent by rank 0, first call: {first}")


# ---------------------------------------------------------------------------------------- world size 1
def _one_rank_runtime():
    from hires_parallel.parallel.split.layout import ParallelPlan
    from hires_parallel.parallel.split.unet_parallel import BandParallelRuntime

    return BandParallelRuntime(ParallelPlan(1), 0, uc.ALIGN)


def test_world_size_one_same_code_path(one_thread) -> None:
    from hires_parallel.parallel.split.unet_parallel import active_band, apply_band_parallel

    assert not (dist.is_available() and dist.is_initialized())
    plain = uc.case("w1 sd15 euler conv-lora 40x36", "sd15", "euler", 40, 36)
    cases = [
        dict(plain, lora="conv"),
        uc.case("w1 sdxl dpmpp_sde lora 42x40", "sdxl", "dpmpp_sde", 42, 40, lora="full"),
    ]
    for c in cases:
        ref = reference(c)
        reference(dict(c, lora="none"))  # the base model was loaded (weights marked patched) by another patcher
        model = uc.build_model(c)
        runtime = _one_rank_runtime()
        band_model = apply_band_parallel(model, runtime)
        seen: list[tuple[str, bool]] = []
        conv = model.get_model_object("diffusion_model.input_blocks.1.0.in_layers.2")
        hook = conv.register_forward_pre_hook(lambda m, args: seen.append((type(m).__name__, active_band() is not None)))
        try:
            out = uc.sample_case(band_model, c)
        finally:
            hook.remove()
        err = _err(out, ref)
        print(f"  {c['name']:52s} max abs err {err:.2e} (must be 0)")
        assert err == 0.0
        assert seen and all(s == ("BandConv2d", True) for s in seen), seen[:3]
        assert len(runtime.calls) >= c["steps"]
        assert runtime.stats.total_sent == 0 and runtime.stats.total_received == 0
        assert all(not call["sent"] and not call["received"] for call in runtime.calls)
        # The plain model runs plain again afterwards, on its original modules.
        again = uc.sample_case(model, c)
        assert torch.equal(again, ref)
        assert type(model.model.diffusion_model.input_blocks[1][0].in_layers[2]).__name__ == "Conv2d"


def _snapshot(model) -> dict[str, Any]:
    def walk(o: Any) -> Any:
        if isinstance(o, dict):
            return {k: walk(v) for k, v in o.items()}
        if isinstance(o, (list, tuple)):
            return [walk(v) for v in o]
        return id(o)

    return {
        "object_patches": {k: id(v) for k, v in model.object_patches.items()},
        "model_options": walk(model.model_options),
        "wrappers": walk(model.wrappers),
        "patches": walk(model.patches),
        "patches_uuid": model.patches_uuid,
        "modules": {n: type(m) for n, m in model.model.diffusion_model.named_modules()},
    }


def test_original_model_untouched(one_thread) -> None:
    import comfy.patcher_extension

    from hires_parallel.parallel.split.unet_parallel import WRAPPER_KEY, apply_band_parallel

    c = uc.case("w1 sd15 euler lora attn2 40x32", "sd15", "euler", 40, 32, lora="full", attn2=True)
    model = uc.build_model(c)
    before = _snapshot(model)
    band_model = apply_band_parallel(model, _one_rank_runtime())
    assert _snapshot(model) == before
    assert band_model is not model and band_model.model is model.model
    assert len(band_model.object_patches) > len(model.object_patches)
    assert band_model.get_wrappers(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, WRAPPER_KEY)
    assert not model.get_wrappers(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, WRAPPER_KEY)
    out = uc.sample_case(band_model, c)
    after_run = _snapshot(model)
    after_run.pop("modules")  # the band clone stays loaded (ComfyUI keeps object patches applied) ...
    assert after_run == {k: v for k, v in before.items() if k != "modules"}
    assert torch.equal(uc.sample_case(model, c), out)  # ... until another patcher loads the model
    assert _snapshot(model) == before
    band_model.clone()  # deep-copies model_options: the patches must survive it (no process groups copied)


# ---------------------------------------------------------------------------------------- unit checks
def test_control_residuals_sliced_per_band() -> None:
    from hires_parallel.parallel.split.layout import split_rows
    from hires_parallel.parallel.split.unet_parallel import band_rows, slice_control

    height, width, batch = 42, 6, 4
    bands = split_rows(height, 3, uc.ALIGN)
    assert bands[-1][1] - bands[-1][0] == 14  # the last band absorbs the unaligned rows

    def level(f: int, ch: int) -> torch.Tensor:
        h = -(-height // f)
        rows = torch.arange(h, dtype=torch.float32).view(1, 1, h, 1)
        samples = torch.arange(batch, dtype=torch.float32).view(batch, 1, 1, 1) * 1000
        return (rows + samples).expand(batch, ch, h, width).clone()

    control = {
        "input": [level(4, 8), None, level(2, 6), level(1, 4)],
        "middle": [level(4, 8)],
        "output": [level(1, 4), level(2, 6), None],
    }
    for cut in (None, (2, 4, batch)):
        for i in range(3):
            part = slice_control(control, bands, i, uc.ALIGN, cut)
            assert part is not control and all(part[k] is not control[k] for k in control)
            for key, items in control.items():
                assert len(part[key]) == len(items)
                for full, got in zip(items, part[key]):
                    if full is None:
                        assert got is None
                        continue
                    f = {42: 1, 21: 2, 11: 4}[full.shape[-2]]
                    s, e = band_rows(bands, i, f)
                    want = full[..., s:e, :] if cut is None else full[cut[0] : cut[1], ..., s:e, :]
                    assert torch.equal(got, want), (key, f, i)
        # The bands' rows tile every level exactly.
        for full in (level(1, 1), level(2, 1), level(4, 1)):
            parts = [slice_control({"input": [full]}, bands, i, uc.ALIGN)["input"][0] for i in range(3)]
            assert torch.equal(torch.cat(parts, dim=-2), full)
    assert slice_control(None, bands, 0, uc.ALIGN) is None
    with pytest.raises(ValueError, match="no UNet level"):
        slice_control({"input": [torch.zeros(1, 1, 30, 4)]}, bands, 0, uc.ALIGN)


def test_band_modules_are_the_same_modules() -> None:
    """Twins share the original's state (weights set by name land in both) and, while a band is
    active, use the weights ComfyUI's own forward would use (cast / weight_function / bias_function)."""
    from hires_parallel.parallel.split.comm import BandGroup
    from hires_parallel.parallel.split.unet_parallel import _band_active, _band_module

    unet = tm.build_sd15(0).model.diffusion_model
    conv = unet.input_blocks[1][0].in_layers[2]
    norm = unet.input_blocks[1][0].in_layers[0]
    x = torch.randn(2, conv.in_channels, 12, 10, generator=torch.Generator().manual_seed(0))
    band = BandGroup([0], 0, [(0, 12)])
    for module in (conv, norm):
        twin = _band_module(module)
        assert type(twin).__name__ == "Band" + type(module).__name__ and isinstance(twin, type(module))
        assert twin.__dict__ is module.__dict__ and twin.weight is module.weight
        assert type(_band_module(twin)) is type(twin) and _band_module(twin).__dict__ is module.__dict__
        plain = module(x)
        assert torch.equal(twin(x), plain)  # no band active: the original forward
        with _band_active(band):
            assert torch.equal(twin(x), plain)
        old = module.weight
        own = {k: module.__dict__[k] for k in ("weight_function", "bias_function") if k in module.__dict__}
        try:
            module.weight = torch.nn.Parameter(old.detach() * 3, requires_grad=False)  # as LoRA patching does, by name
            assert twin.weight is module.weight
            module.weight_function = [lambda w: w * 0.5]
            module.bias_function = [lambda b: b + 1.0]
            want = module(x)  # ComfyUI's cast path honours the functions
            assert not torch.equal(want, plain)
            with _band_active(band):
                assert torch.equal(twin(x), want)
        finally:
            module.weight = old
            for k in ("weight_function", "bias_function"):
                module.__dict__.pop(k, None)
            module.__dict__.update(own)
        assert torch.equal(twin(x), plain)


def _tiny_flux():
    import comfy.ops
    from comfy.ldm.flux.model import Flux

    return Flux(
        operations=comfy.ops.disable_weight_init, in_channels=4, out_channels=4, vec_in_dim=8, context_in_dim=8,
        hidden_size=32, mlp_ratio=2.0, num_heads=2, depth=1, depth_single_blocks=1, axes_dim=[4, 6, 6],
        theta=10000, patch_size=2, qkv_bias=True, guidance_embed=False,
    )


def test_support_check_errors() -> None:
    from comfy_extras.nodes_freelunch import FreeU
    from comfy_extras.nodes_model_downscale import PatchModelAddDownscale

    from hires_parallel.parallel.split.unet_parallel import (
        UnsupportedModel,
        apply_band_parallel,
        check_band_parallel_support,
    )

    base = tm.build_sd15(0)
    check_band_parallel_support(base)
    assert UnsupportedModel.user_facing is True and issubclass(UnsupportedModel, ValueError)

    flux = base.clone()
    flux.add_object_patch("diffusion_model", _tiny_flux())
    with pytest.raises(UnsupportedModel, match=r"Flux.*DiT families \(Flux, SD3\) are not supported.*use 1 device"):
        check_band_parallel_support(flux)
    other = base.clone()
    other.add_object_patch("diffusion_model", torch.nn.Conv2d(4, 4, 3))
    with pytest.raises(UnsupportedModel, match="use 1 device"):
        check_band_parallel_support(other)

    shrink = PatchModelAddDownscale.execute(base, 3, 2.0, 0.0, 0.35, True, "bicubic", "bicubic").result[0]
    with pytest.raises(UnsupportedModel, match="input_block_patch_after_skip, output_block_patch.*remove it or use 1 device"):
        check_band_parallel_support(shrink)
    freeu = FreeU().patch(base, 1.1, 1.2, 0.9, 0.2)[0]
    with pytest.raises(UnsupportedModel, match="output_block_patch.*remove it or use 1 device"):
        check_band_parallel_support(freeu)

    attn1 = base.clone()
    attn1.set_model_attn1_replace(uc._plain_attn2, "input", 3, 0)
    with pytest.raises(UnsupportedModel, match=r"attn1 replace \('input', 3, 0\).*remove it or use 1 device"):
        check_band_parallel_support(attn1)
    before = _snapshot(attn1)
    with pytest.raises(UnsupportedModel):
        apply_band_parallel(attn1, _one_rank_runtime())
    assert _snapshot(attn1) == before

    attn2 = base.clone()
    attn2.set_model_attn2_replace(uc._plain_attn2, "input", 3, 0)
    check_band_parallel_support(attn2)  # cross-attention is local to a band
    apply_band_parallel(attn2, _one_rank_runtime())


def test_apply_rejects_misuse() -> None:
    from hires_parallel.parallel.split.layout import LayoutError, ParallelPlan
    from hires_parallel.parallel.split.unet_parallel import BandParallelRuntime, apply_band_parallel

    base = tm.build_sd15(0)
    with pytest.raises(LayoutError, match="multiple of 4"):
        apply_band_parallel(base, BandParallelRuntime(ParallelPlan(1), 0, 2))
    twice = apply_band_parallel(base, _one_rank_runtime())
    with pytest.raises(ValueError, match="already patched"):
        apply_band_parallel(twice, _one_rank_runtime())
    with pytest.raises(RuntimeError, match="torch.distributed"):
        BandParallelRuntime(ParallelPlan(2), 0, uc.ALIGN)
