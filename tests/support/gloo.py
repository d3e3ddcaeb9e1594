"""Run a function on N gloo ranks in spawned processes (tests only).

The function must be importable by the children (defined in a module under tests/support, which is on
sys.path in spawned children too); it returns a picklable result per rank. A hang or a dead rank fails
the test instead of hanging the suite.
"""
from __future__ import annotations

import datetime
import os
import queue
import socket
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

SPAWN_TIMEOUT_S = 120


def _entry(rank: int, world: int, port: int, fn: Callable, out_dir: str, q: Any) -> None:
    try:
        torch.set_num_threads(1)
        dist.init_process_group(
            "gloo",
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=world,
            timeout=datetime.timedelta(seconds=60),
        )
        try:
            result = fn(rank, world)
        finally:
            dist.destroy_process_group()
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
        q.put((rank, "ok", ""))
    except BaseException:
        q.put((rank, "error", traceback.format_exc()))


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn_run(fn: Callable, world: int, out_dir: Path, timeout: float = SPAWN_TIMEOUT_S) -> list[dict]:
    """Run fn(rank, world) on `world` gloo processes; fail (never hang) on error or timeout."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_entry, args=(r, world, port, fn, str(out_dir), q), daemon=True) for r in range(world)]
    for p in procs:
        p.start()
    done: set[int] = set()
    deadline = time.monotonic() + timeout
    try:
        while len(done) < world:
            left = deadline - time.monotonic()
            if left <= 0:
                pytest.fail(f"spawned run of {world} ranks timed out after {timeout} s (ranks done: {sorted(done)})")
            try:
                rank, status, msg = q.get(timeout=min(left, 1.0))
            except queue.Empty:
                dead = [i for i, p in enumerate(procs) if p.exitcode not in (None, 0) and i not in done]
                if dead:
                    pytest.fail(f"rank(s) {dead} died without reporting (exit codes {[procs[i].exitcode for i in dead]})")
                continue
            if status != "ok":
                pytest.fail(f"rank {rank} failed:\n{msg}")
            done.add(rank)
        for p in procs:
            p.join(timeout=30)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(5)
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=False) for r in range(world)]

