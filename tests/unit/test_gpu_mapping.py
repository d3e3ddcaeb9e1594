"""Which GPU each rank gets and what is left to ComfyUI, with CUDA faked (no GPU on this machine):
CUDA_VISIBLE_DEVICES per rank, `devices` 0 with comfy_gpu share / avoid, the rank that shares ComfyUI's
GPU hands its memory back after each job, and a GPU rank without NCCL stages through host memory."""
from __future__ import annotations

import pytest
import torch

from hires_parallel.parallel.runtime import pool as pool_module
from hires_parallel.parallel.runtime import submit, worker


def _fake_gpus(monkeypatch, n: int, comfys: str | None = "cuda:0") -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: n > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: n)
    monkeypatch.setattr(pool_module, "comfy_gpu", lambda: comfys)


@pytest.mark.parametrize("visible, device, expect", [
    (None, "cuda:0", "0"), (None, "cuda:3", "3"), ("4,6,7", "cuda:1", "6"), (" 2 , 5", "cuda:1", "5"),
    ("GPU-aa,GPU-bb", "cuda:1", "GPU-bb"), (None, "cpu", ""), ("1,2", "cpu", ""),
])
def test_each_rank_sees_only_its_gpu_as_cuda0(monkeypatch, visible, device, expect):
    if visible is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    local = worker.set_rank_environment(device, 0)
    import os

    assert os.environ["CUDA_VISIBLE_DEVICES"] == expect
    assert local == ("cpu" if device == "cpu" else "cuda:0")


def test_a_gpu_outside_cuda_visible_devices_is_refused(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    with pytest.raises(ValueError, match="not among CUDA_VISIBLE_DEVICES"):
        worker.set_rank_environment("cuda:1", 0)


def test_devices_share_or_avoid_comfyuis_gpu(monkeypatch):
    _fake_gpus(monkeypatch, 3, "cuda:0")
    assert submit.resolve_devices(0, "auto") == ["cuda:0", "cuda:1", "cuda:2"]
    assert submit.resolve_devices(0, "cuda", "avoid") == ["cuda:1", "cuda:2"]
    assert submit.resolve_devices(5, "cuda", "avoid") == ["cuda:1", "cuda:2"]  # more than usable: what exists
    _fake_gpus(monkeypatch, 3, "cuda:1")  # ComfyUI started with --default-device 1
    assert submit.resolve_devices(2, "cuda", "avoid") == ["cuda:0", "cuda:2"]
    _fake_gpus(monkeypatch, 1, "cuda:0")
    with pytest.raises(submit.ParallelInputError, match="only visible GPU"):
        submit.resolve_devices(0, "cuda", "avoid")
    with pytest.raises(submit.ParallelInputError, match="comfy_gpu must be one of"):
        submit.resolve_devices(0, "cuda", "elsewhere")
    assert submit.resolve_devices(2, "cpu", "avoid") == ["cpu", "cpu"]  # no GPU involved


def test_only_the_rank_on_comfyuis_gpu_hands_it_back_after_jobs(monkeypatch):
    _fake_gpus(monkeypatch, 2, "cuda:0")
    p = pool_module.WorkerPool(["cuda:0", "cuda:1"])  # nothing starts before run()
    envs = [p._rank_env(r, {}, "127.0.0.1:1", b"k", 2) for r in range(2)]
    assert envs[0].get("HIRES_PARALLEL_OFFLOAD_AFTER_JOB") == "1"
    assert "HIRES_PARALLEL_OFFLOAD_AFTER_JOB" not in envs[1]
    assert envs[0]["HIRES_PARALLEL_DEVICE"] == "cuda:0" and envs[1]["HIRES_PARALLEL_DEVICE"] == "cuda:1"
    _fake_gpus(monkeypatch, 3, None)  # ComfyUI on the CPU: nobody shares its device
    p = pool_module.WorkerPool(["cuda:1", "cuda:2"])
    assert not any("HIRES_PARALLEL_OFFLOAD_AFTER_JOB" in p._rank_env(r, {}, "x:1", b"k", 2) for r in range(2))
