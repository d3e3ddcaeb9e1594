"""Ranks of the host-staging test (tests/unit/test_host_staging.py): the band exchanges and the stale
engine, once sent directly and once through host buffers (comm.set_host_staging with host tensors
staged too, as a GPU rank on gloo stages its device tensors)."""
from __future__ import annotations

from typing import Any

from hires_parallel.parallel.split import comm
from support import band_ops_cases as bc
from support import stale_engine_cases as sc


def _round(rank: int, world: int) -> dict[str, Any]:
    out = {"bands": bc._case_results(rank, world, bc.CASES[world][0]), "engine": sc.engine_world(rank, world)}
    out["staged"] = comm.host_staging()
    return out


def staging_world(rank: int, world: int) -> dict[str, Any]:
    direct = _round(rank, world)
    comm.set_host_staging(True, host_too=True)
    calls = {"n": 0}
    original = comm._host_copy

    def counting(t):  # every staged send / all-reduce / all-gather makes one host copy
        calls["n"] += 1
        return original(t)

    comm._host_copy = counting
    try:
        staged = _round(rank, world)
    finally:
        comm._host_copy = original
        comm.set_host_staging(False)
    return {"direct": direct, "staged": staged, "host_copies": calls["n"]}
