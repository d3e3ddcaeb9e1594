"""Workers run with the controller's ComfyUI settings (parallel/runtime/host_args.py): a flag set in the
controller reaches every rank, and exact mode still equals one device when the attention backend is not
ComfyUI's CPU default (sub-quadratic) but the controller's --use-pytorch-cross-attention."""
from __future__ import annotations

import pytest
import torch

from support.float_noise import cfg_noise_tolerance
from support.pool_jobs import ComfySettingsJob
from support.tiny_models import build_sd15, make_conds


@pytest.fixture(autouse=True)
def _fresh_pools():
    from hires_parallel.parallel.runtime.pool import shutdown_pool

    shutdown_pool()
    yield
    shutdown_pool()


def _settings(devices=("cpu", "cpu")) -> list[dict]:
    from hires_parallel.parallel.runtime.pool import get_pool

    return get_pool(list(devices)).run(ComfySettingsJob()).value


def test_a_flag_set_in_comfyui_reaches_the_workers(comfy_root, monkeypatch):
    import comfy.cli_args

    default = _settings()
    assert default["attention"] == "attention_sub_quad" and not default["use_pytorch_cross_attention"]
    monkeypatch.setattr(comfy.cli_args.args, "use_pytorch_cross_attention", True)
    monkeypatch.setattr(comfy.cli_args.args, "reserve_vram", 1.5)
    flagged = _settings()  # a new pool: the settings are part of the pool's key
    print(f"\n[settings] default worker: {default}; with the flags: {flagged}")
    assert flagged == {"use_pytorch_cross_attention": True, "reserve_vram": 1.5, "cpu": True,
                       "attention": "attention_pytorch"}


def test_exact_mode_equals_one_device_with_the_pytorch_attention_backend(comfy_root, monkeypatch):
    import comfy.cli_args
    import comfy.ldm.modules.attention as attention
    import nodes

    from hires_parallel.nodes.parallel_sampler import HiResParallelPatchParallelKSampler
    from hires_parallel.parallel.runtime import submit

    # The controller as ComfyUI started with --use-pytorch-cross-attention would be.
    monkeypatch.setattr(comfy.cli_args.args, "use_pytorch_cross_attention", True)
    monkeypatch.setattr(attention, "optimized_attention", attention.attention_pytorch)
    monkeypatch.setattr(attention, "optimized_attention_masked", attention.attention_pytorch)
    model = build_sd15(seed=3)
    conds = make_conds(model, seed=2)
    latent = {"samples": torch.zeros(1, 4, 32, 24)}

    def one_device(cfg):
        return nodes.common_ksampler(model, 7, 3, cfg, "euler", "karras", conds[0], conds[1], latent)[0]["samples"]

    ref, tol = cfg_noise_tolerance("exact", one_device, 5.0)
    out = HiResParallelPatchParallelKSampler.execute(model, 7, 3, 5.0, "euler", "karras", conds[0], conds[1], latent,
                                                     1.0, 2, "cpu", "exact", "off").result[0]["samples"]
    assert submit.LAST_RUN["ranks"][0]["comm"]["bytes_sent"].get("kv", 0) > 0  # bands really exchanged K/V
    tol.check("exact, 2 ranks, pytorch attention vs one device", out, ref)
