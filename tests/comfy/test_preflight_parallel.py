"""Patch-parallel checks that need the real ComfyUI: CFG parallel decided with cfg known (cfg 1 has no
negative pass), objects of other node packs refused before any worker starts, layers the band layers
would bypass refused by check_band_parallel_support, and the CPU rank cap through the node."""
from __future__ import annotations

import copy

import pytest
import torch

from support.tiny_models import make_conds
from support.fake_pack import fake_pack_module

REL_TOL = 1e-5  # as test_parallel_nodes: fp32 CPU, a few steps, against ComfyUI's own single-process result


def _node(model, conds, latent, cfg, devices=2, cfg_parallel="auto", device_kind="cpu", steps=3):
    from hires_parallel.nodes.parallel_sampler import HiResParallelPatchParallelKSampler

    out = HiResParallelPatchParallelKSampler.execute(model, 5, steps, cfg, "euler", "karras", conds[0], conds[1],
                                                     latent, 1.0, devices, device_kind, "exact", cfg_parallel, "")
    return out.result[0]["samples"]


def _compare(label, a, b):
    assert a.shape == b.shape
    err, scale = (a - b).abs().max().item(), b.abs().max().item()
    print(f"\n[exact] {label}: max abs error {err:.3g} (max|ref| {scale:.3g})")
    assert err <= REL_TOL * scale, f"{label}: {err}"


def _no_pool():
    from hires_parallel.parallel.runtime.pool import current_pool, shutdown_pool

    shutdown_pool()
    assert current_pool() is None


# ------------------------------------------------------------------------------- cfg 1: bands, not halves
def test_cfg_1_with_auto_splits_bands_over_both_devices(sd15):
    import nodes
    from hires_parallel.parallel.runtime import submit

    conds = make_conds(sd15, seed=1)
    latent = {"samples": torch.zeros(1, 4, 40, 32)}
    out = _node(sd15, conds, latent, cfg=1.0)
    assert submit.LAST_RUN["world_size"] == 2 and submit.LAST_RUN["cfg_parallel"] is False
    assert submit.LAST_RUN["ranks"][0]["comm"]["bytes_sent"].get("halo", 0) > 0  # bands exchanged halos
    ref = nodes.common_ksampler(sd15, 5, 3, 1.0, "euler", "karras", conds[0], conds[1], latent)[0]["samples"]
    _compare("cfg 1, cfg_parallel auto, 2 ranks", out, ref)


def test_cfg_1_with_cfg_parallel_on_is_refused_before_any_work(sd15):
    from hires_parallel.parallel.runtime import submit
    from hires_parallel.parallel.runtime.pool import current_pool

    _no_pool()
    with pytest.raises(submit.ParallelInputError, match="cfg 1 has no negative pass.*use auto or off"):
        _node(sd15, make_conds(sd15, seed=1), {"samples": torch.zeros(1, 4, 40, 32)}, cfg=1.0, cfg_parallel="on")
    assert current_pool() is None


def test_guider_decides_at_sample_time_with_the_cfg_set_last(sd15):
    from comfy_extras.nodes_custom_sampler import CFGGuider, KSamplerSelect, SamplerCustomAdvanced
    from comfy_extras.nodes_custom_sampler import Noise_RandomNoise
    from hires_parallel.nodes.parallel_sampler import HiResParallelPatchParallelGuider
    from hires_parallel.parallel.runtime import submit

    conds = make_conds(sd15, seed=1)
    latent = {"samples": torch.zeros(1, 4, 32, 32)}
    sigmas = torch.tensor([14.6, 3.0, 0.9, 0.0])
    sampler = KSamplerSelect().get_sampler("euler")[0]
    guider = HiResParallelPatchParallelGuider.execute(sd15, conds[0], conds[1], 5.0, 2, "cpu", "exact", "auto").result[0]
    guider.set_cfg(1.0)  # e.g. a later node changes it
    out, _ = SamplerCustomAdvanced().sample(Noise_RandomNoise(3), guider, sampler, sigmas, latent)
    assert submit.LAST_RUN["world_size"] == 2 and submit.LAST_RUN["cfg_parallel"] is False
    ref, _ = SamplerCustomAdvanced().sample(Noise_RandomNoise(3), CFGGuider().get_guider(sd15, *conds, 1.0)[0],
                                            sampler, sigmas, latent)
    _compare("guider, cfg set to 1 after the node", out["samples"], ref["samples"])


# ---------------------------------------------------------------- objects of other node packs
@pytest.fixture()
def fake_pack(tmp_path):
    yield from fake_pack_module(tmp_path)


def test_a_cfg_function_of_another_pack_is_refused_before_any_worker_starts(sd15, fake_pack):
    from hires_parallel.parallel.runtime.payload import UnshippablePatch
    from hires_parallel.parallel.runtime.pool import current_pool

    _no_pool()
    model = sd15.clone()
    model.set_model_sampler_cfg_function(fake_pack.PackCFG())  # picklable here: passes check_picklable
    with pytest.raises(UnshippablePatch) as info:
        _node(model, make_conds(sd15, seed=1), {"samples": torch.zeros(1, 4, 40, 32)}, cfg=5.0)
    msg = str(info.value)
    assert "sampler_cfg_function" in msg and "PackCFG" in msg and '"SomePack"' in msg and "1 device" in msg
    assert current_pool() is None


def test_a_sampler_of_another_pack_is_refused_before_any_worker_starts(sd15, fake_pack):
    import comfy.samplers
    from comfy_extras.nodes_custom_sampler import KSamplerSelect, Noise_RandomNoise, SamplerCustomAdvanced
    from hires_parallel.nodes.parallel_sampler import HiResParallelPatchParallelGuider
    from hires_parallel.parallel.runtime.payload import UnshippablePatch, check_model_importable, check_worker_importable
    from hires_parallel.parallel.runtime.pool import current_pool

    _no_pool()
    conds = make_conds(sd15, seed=1)
    guider = HiResParallelPatchParallelGuider.execute(sd15, conds[0], conds[1], 5.0, 2, "cpu", "exact", "auto").result[0]
    sampler = comfy.samplers.KSAMPLER(fake_pack.pack_sampler)
    with pytest.raises(UnshippablePatch, match=r"SAMPLER input.*pack_sampler.*\"SomePack\""):
        SamplerCustomAdvanced().sample(Noise_RandomNoise(3), guider, sampler, torch.tensor([14.6, 3.0, 0.0]),
                                       {"samples": torch.zeros(1, 4, 32, 32)})
    assert current_pool() is None
    # ComfyUI's own objects pass
    check_worker_importable(KSamplerSelect().get_sampler("dpmpp_2m_sde")[0], "the SAMPLER input")
    check_worker_importable(list(conds), "the conditioning")
    check_model_importable(sd15)


def test_cpu_rank_cap_through_the_node_starts_nothing(sd15, monkeypatch):
    import os

    from hires_parallel.parallel.runtime import submit
    from hires_parallel.parallel.runtime.pool import current_pool

    _no_pool()
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    monkeypatch.delenv(submit.MAX_CPU_RANKS_ENV, raising=False)
    with pytest.raises(submit.ParallelInputError, match=r"at most 4 .*HIRES_PARALLEL_MAX_CPU_RANKS"):
        _node(sd15, make_conds(sd15, seed=1), {"samples": torch.zeros(1, 4, 64, 32)}, cfg=5.0, devices=64)
    assert current_pool() is None


# ------------------------------------------------------------- layers the band layers would bypass
class _Stub:
    """What check_band_parallel_support reads of a ModelPatcher."""

    def __init__(self, dm):
        self.dm, self.model_options = dm, {}

    def get_model_object(self, name):
        assert name == "diffusion_model"
        return self.dm


def _with_layer(sd15, make):
    """A copy of the tiny UNet whose first 3x3 conv (or first GroupNorm) is replaced by make(original)."""
    dm = copy.deepcopy(sd15.get_model_object("diffusion_model"))
    for name, m in dm.named_modules():
        parent_name, _, attr = name.rpartition(".")
        replacement = make(m)
        if replacement is not None:
            parent = dm.get_submodule(parent_name) if parent_name else dm
            setattr(parent, attr, replacement)
            return _Stub(dm), name
    raise AssertionError("no layer replaced")


def _conv_as(cls):
    def make(m):
        if isinstance(m, torch.nn.Conv2d) and m.kernel_size[0] == 3:
            new = cls(m.in_channels, m.out_channels, m.kernel_size, padding=m.padding)
            new.load_state_dict(m.state_dict())
            return new
        return None

    return make


def test_custom_conv_classes_are_refused_with_their_name(sd15):
    import comfy.ops
    from hires_parallel.parallel.split.unet_parallel import UnsupportedModel, check_band_parallel_support

    class OwnForwardConv(comfy.ops.disable_weight_init.Conv2d):
        def forward(self, x):
            return super().forward(x) * 2

    class DequantMixin(torch.nn.Module):  # as GGUF's GGMLLayer: no forward of its own, a cast path instead
        comfy_cast_weights = True

        def forward_comfy_cast_weights(self, input, *args, **kwargs):
            return super().forward_comfy_cast_weights(input, *args, **kwargs)

    class MixinConv(DequantMixin, comfy.ops.manual_cast.Conv2d):
        pass

    class RawConv(torch.nn.Module):  # a 3x3 convolution that is no Conv2d
        def __init__(self, conv):
            super().__init__()
            self.weight = torch.nn.Parameter(conv.weight.detach().clone())

        def forward(self, x):
            return torch.nn.functional.conv2d(x, self.weight, padding=1)

    for cls, name in ((OwnForwardConv, "OwnForwardConv"), (MixinConv, "MixinConv")):
        stub, where = _with_layer(sd15, _conv_as(cls))
        with pytest.raises(UnsupportedModel, match=rf"diffusion_model\.{where}.*{name}.*use 1 device"):
            check_band_parallel_support(stub)
    stub, _ = _with_layer(sd15, lambda m: RawConv(m) if isinstance(m, torch.nn.Conv2d) and m.kernel_size[0] == 3
                          else None)
    with pytest.raises(UnsupportedModel, match="RawConv.*no Conv2d"):
        check_band_parallel_support(stub)

    class QuantTensor(torch.Tensor):
        pass

    def quantized(m):
        if isinstance(m, torch.nn.Conv2d) and m.kernel_size[0] == 3:
            m.weight = torch.nn.Parameter(m.weight.detach().as_subclass(QuantTensor), requires_grad=False)
            return m
        return None

    stub, _ = _with_layer(sd15, quantized)
    with pytest.raises(UnsupportedModel, match="QuantTensor"):
        check_band_parallel_support(stub)

    class OwnGroupNorm(torch.nn.GroupNorm):
        def forward(self, x):
            return super().forward(x)

    def group_norm(m):
        if isinstance(m, torch.nn.GroupNorm):
            new = OwnGroupNorm(m.num_groups, m.num_channels, m.eps)
            new.load_state_dict(m.state_dict())
            return new
        return None

    stub, _ = _with_layer(sd15, group_norm)
    with pytest.raises(UnsupportedModel, match="OwnGroupNorm"):
        check_band_parallel_support(stub)


def test_comfy_ops_layers_are_accepted(sd15):
    import comfy.ops
    from hires_parallel.parallel.split.unet_parallel import check_band_parallel_support

    check_band_parallel_support(sd15)
    kinds = [comfy.ops.disable_weight_init.Conv2d, comfy.ops.manual_cast.Conv2d, comfy.ops.fp8_ops.Conv2d,
             comfy.ops.scaled_fp8_ops().Conv2d, torch.nn.Conv2d]
    for cls in kinds:
        stub, _ = _with_layer(sd15, _conv_as(cls))
        check_band_parallel_support(stub)
    stub, _ = _with_layer(sd15, lambda m: comfy.ops.manual_cast.GroupNorm(m.num_groups, m.num_channels, m.eps)
                          if isinstance(m, torch.nn.GroupNorm) else None)
    check_band_parallel_support(stub)
