"""GPU memory next to ComfyUI, with CUDA faked: the controller unloads its own models only when a worker
runs on its GPU, and after each job a worker gives its cached blocks back (the one on ComfyUI's GPU also
moves its model off it), so the VAE decode or the next plain KSampler finds the memory free."""
from __future__ import annotations

import types

import pytest


@pytest.fixture
def calls(comfy_root, monkeypatch):
    import comfy.model_management as mm

    seen: list[str] = []
    monkeypatch.setattr(mm, "unload_all_models", lambda: seen.append("unload"))
    monkeypatch.setattr(mm, "soft_empty_cache", lambda force=False: seen.append(f"empty_cache(force={force})"))
    return seen


def test_controller_unloads_only_when_a_worker_shares_its_gpu(calls, monkeypatch):
    from hires_parallel.parallel.runtime import pool, submit

    monkeypatch.setattr(pool, "comfy_gpu", lambda: "cuda:0")
    assert submit.free_comfy_gpu(["cuda:0", "cuda:1"]) and calls == ["unload", "empty_cache(force=False)"]
    calls.clear()
    assert not submit.free_comfy_gpu(["cuda:1", "cuda:2"]) and calls == []  # comfy_gpu avoid: nothing to free
    monkeypatch.setattr(pool, "comfy_gpu", lambda: None)  # ComfyUI on the CPU
    assert not submit.free_comfy_gpu(["cuda:0", "cuda:1"]) and calls == []


def test_real_comfy_gpu_reading(comfy_root):
    from hires_parallel.parallel.runtime import pool

    assert pool.comfy_gpu() is None  # this test process runs ComfyUI with --cpu


def test_workers_release_memory_after_each_job(calls, monkeypatch):
    from hires_parallel.parallel.runtime import worker

    gpu = types.SimpleNamespace(type="cuda")
    monkeypatch.delenv("HIRES_PARALLEL_OFFLOAD_AFTER_JOB", raising=False)
    worker.release_device_memory(gpu)
    assert calls == ["empty_cache(force=True)"]  # its own GPU: model kept loaded, cache returned
    calls.clear()
    monkeypatch.setenv("HIRES_PARALLEL_OFFLOAD_AFTER_JOB", "1")
    worker.release_device_memory(gpu)
    assert calls == ["unload", "empty_cache(force=True)"]  # ComfyUI's GPU: the model leaves it too
    calls.clear()
    worker.release_device_memory(types.SimpleNamespace(type="cpu"))
    assert calls == []
