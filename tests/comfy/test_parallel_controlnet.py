"""ControlNet conditioning with the Patch-Parallel KSampler, through the real worker pool.

A tiny real ControlNet (comfy.cldm.cldm.ControlNet with the tiny SD1.5 UNet's config, seeded weights) is
applied with ComfyUI's own ControlNetApplyAdvanced node; every rank computes the ControlNet on the full
latent and the band wrapper slices its residuals. Tolerance as in test_parallel_nodes: 32 x the measured
float noise of nodes.common_ksampler with the same seed (support/float_noise.py; values are printed).
"""
from __future__ import annotations

import pytest
import torch

from support.tiny_controlnet import build_tiny_controlnet, hint_image
from support.references import comfy_reference
from support.tiny_models import make_conds

REL_TOL = 1e-5


@pytest.fixture(scope="module")
def controlnet(sd15):
    return build_tiny_controlnet(sd15, seed=11)


def _latent(h=40, w=32):
    return {"samples": torch.zeros(1, 4, h, w)}


def _apply(conds, control_net, h, w, seed=0, strength=0.8, start=0.0, end=1.0):
    import nodes

    image = hint_image(h, w, seed)
    return nodes.ControlNetApplyAdvanced().apply_controlnet(conds[0], conds[1], control_net, image, strength, start,
                                                             end)


_reference = comfy_reference


def _parallel(model, conds, latent, devices=2, cfg_parallel="off", seed=5, steps=3, cfg=5.0, sampler="euler",
              scheduler="karras"):
    from hires_parallel.nodes.parallel_sampler import HiResParallelPatchParallelKSampler

    out = HiResParallelPatchParallelKSampler.execute(model, seed, steps, cfg, sampler, scheduler, conds[0], conds[1],
                                                     latent, 1.0, devices, "cpu", "exact", cfg_parallel, "")
    return out.result[0]["samples"]


def _compare(label, a, b):
    tol = getattr(b, "noise_tolerance", None)  # measured for references made by _reference
    if tol is not None:
        tol.check(label, a, b)
        return
    assert a.shape == b.shape
    err, scale = (a - b).abs().max().item(), b.abs().max().item()
    print(f"\n[exact] {label}: max abs error {err:.3g} (max|ref| {scale:.3g}, relative {err / scale:.2g})")
    assert err <= REL_TOL * scale, f"{label}: {err}"


def _loads(key):
    from hires_parallel.parallel.runtime import submit

    return [r[key] for r in submit.LAST_RUN["ranks"]]


def test_controlnet_two_cpu_devices_equals_comfy_ksampler(sd15, controlnet):
    h, w = 40, 32
    plain = make_conds(sd15, seed=1)
    conds = _apply(plain, controlnet, h, w)
    ref = _reference(sd15, conds, _latent(h, w))
    without = _reference(sd15, plain, _latent(h, w))
    change = (ref - without).abs().max().item()
    print(f"\n[control] the ControlNet changes the result by {change:.3g} (max|ref| {ref.abs().max().item():.3g})")
    assert change > 1e3 * REL_TOL * ref.abs().max().item(), "the ControlNet barely changes the result"
    _compare("controlnet, cfg_parallel off", _parallel(sd15, conds, _latent(h, w), cfg_parallel="off"), ref)
    assert min(_loads("control_model_loads")) >= 1
    _compare("controlnet, cfg_parallel on", _parallel(sd15, conds, _latent(h, w), cfg_parallel="on"), ref)


def test_chain_of_two_controlnets(sd15, controlnet):
    h, w = 36, 28  # 36 rows over 2 bands aligned to 4: uneven split
    second = build_tiny_controlnet(sd15, seed=12)
    conds = _apply(make_conds(sd15, seed=2), controlnet, h, w, seed=1)
    conds = _apply(conds, second, h, w, seed=2, strength=0.6, start=0.0, end=0.7)
    assert conds[0][0][1]["control"].previous_controlnet is not None
    one = _apply(make_conds(sd15, seed=2), controlnet, h, w, seed=1)
    ref = _reference(sd15, conds, _latent(h, w), sampler="dpmpp_2m")
    change = (ref - _reference(sd15, one, _latent(h, w), sampler="dpmpp_2m")).abs().max().item()
    print(f"\n[control] the second ControlNet changes the result by {change:.3g}")
    assert change > 1e3 * REL_TOL * ref.abs().max().item()
    _compare("chain of two controlnets", _parallel(sd15, conds, _latent(h, w), sampler="dpmpp_2m"), ref)


def test_second_job_does_not_reload_the_control_model(sd15, controlnet):
    h, w = 32, 32
    _parallel(sd15, _apply(make_conds(sd15, seed=3), controlnet, h, w, seed=3), _latent(h, w), seed=1, steps=2)
    loads, base = _loads("control_model_loads"), _loads("base_model_loads")
    # A new apply node run: new ControlNet copies with a new hint, the same control model.
    _parallel(sd15, _apply(make_conds(sd15, seed=3), controlnet, h, w, seed=4), _latent(h, w), seed=2, steps=2)
    print(f"\n[control] control model loads per rank: {loads} -> {_loads('control_model_loads')}")
    assert _loads("control_model_loads") == loads, "the second job rebuilt the control model"
    assert _loads("base_model_loads") == base


def test_unshippable_controls_are_refused_before_any_work(sd15, controlnet):
    import comfy.controlnet

    from hires_parallel.parallel.runtime.payload import UnshippablePatch

    custom = controlnet.copy()
    custom.preprocess_image = lambda a: a * 2.0 - 1.0
    conds = _apply(make_conds(sd15, seed=1), custom, 32, 32)
    with pytest.raises(UnshippablePatch, match="preprocess_image.*run with 1 device"):
        _parallel(sd15, conds, _latent(32, 32))
    lora = comfy.controlnet.ControlLora({"lora_controlnet": torch.zeros(1)})
    conds = _apply(make_conds(sd15, seed=1), lora, 32, 32)
    with pytest.raises(UnshippablePatch, match="ControlLora.*not supported by patch-parallel sampling yet: run with 1"):
        _parallel(sd15, conds, _latent(32, 32))
