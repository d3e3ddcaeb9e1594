"""Exchanges through host memory (Windows, torch without NCCL): gloo cannot move CUDA tensors, so a GPU
rank on gloo stages every exchange through host buffers. Without a GPU here, host tensors are staged too
(the same copies), on 2 and 3 gloo ranks; the results and the byte accounting must not change."""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from hires_parallel.parallel.split import comm
from hires_parallel.parallel.runtime import worker
from support import staging_cases
from support.gloo import spawn_run


def _equal(a, b, where: str = "") -> None:
    if any(part in ("seconds", "total_seconds", "wait_s") for part in where.split(".")):
        return  # wall time differs run to run
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _equal(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _equal(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


@pytest.mark.parametrize("world", [2, 3])
def test_staged_exchanges_equal_direct_ones(tmp_path, world: int) -> None:
    ranks = spawn_run(staging_cases.staging_world, world, tmp_path, 180)
    for r, res in enumerate(ranks):
        direct, staged = res["direct"], res["staged"]
        assert not direct["staged"] and staged["staged"]
        assert res["host_copies"] > 10, "the staged round did not go through host buffers"
        _equal(direct["bands"], staged["bands"], f"rank{r}.bands")
        # the stale engine's results, its async buckets included; the same bytes counted
        engine_d, engine_s = direct["engine"], staged["engine"]
        _equal(engine_d["partial late"], engine_s["partial late"], f"rank{r}.partial late")
        for mode in ("displaced", "partial"):
            _equal(engine_d[mode]["steps"], engine_s[mode]["steps"], f"rank{r}.{mode}")
            for key in ("bytes_sent", "bytes_received"):
                assert engine_d[mode]["stats"][key] == engine_s[mode]["stats"][key], (mode, key)


def test_gpu_rank_without_nccl_uses_gloo_with_staging(monkeypatch) -> None:
    monkeypatch.setattr(dist, "is_nccl_available", lambda: False)
    assert worker.choose_backend("cuda") == "gloo" and worker.choose_backend("cpu") == "gloo"
    monkeypatch.setattr(dist, "is_nccl_available", lambda: True)
    assert worker.choose_backend("cuda") == "nccl" and worker.choose_backend("cpu") == "gloo"


def test_staging_leaves_host_tensors_alone_unless_asked() -> None:
    t = torch.ones(3)
    try:
        comm.set_host_staging(True)
        assert not comm._staged(t)  # a CPU rank's tensors go straight to gloo
        comm.set_host_staging(True, host_too=True)
        assert comm._staged(t)
    finally:
        comm.set_host_staging(False)
    assert not comm.host_staging()
