"""Stopping ComfyUI while the worker pool is warm leaves nothing behind: not the weight file in /dev/shm
(or the disk folder), not the pool folder in /tmp, not a worker process. SIGTERM is what a service
manager, `kill` or the test harness sends; Ctrl+C is SIGINT. A ComfyUI of its own per case."""
from __future__ import annotations

import os
import signal
import tempfile
import time

import psutil
import pytest

from support.server import ComfyServer, comfyui_path

from .conftest import _custom_nodes
from .test_web_routes import _prompt


def _ours(pid: int) -> list[str]:
    found = []
    for root in ("/dev/shm", tempfile.gettempdir()):
        if os.path.isdir(root):
            found += [os.path.join(root, n) for n in os.listdir(root)
                      if n.startswith((f"hires_parallel_weights_{pid}_", f"hires_parallel_pool_{pid}_"))]
    return found


def _alive(pid: int) -> bool:
    return psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE


@pytest.mark.parametrize("how", ["SIGTERM", "SIGINT"])
def test_stopping_comfyui_with_a_warm_pool_leaves_nothing(how):
    server = ComfyServer(_custom_nodes(), comfyui=comfyui_path(), listen_ws=False)
    server.start()
    try:
        server.run(_prompt(steps=1), timeout=300)
        pid = server.proc.pid
        workers = server.get("/hires_parallel/status").json()["pool"]["pids"]
        left_before = _ours(pid)
        assert len(workers) == 2 and any("weights" in p for p in left_before) and any("pool" in p for p in left_before)
        server.proc.send_signal(getattr(signal, how))
        rc = server.proc.wait(timeout=60)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(_alive(p) for p in workers):
            time.sleep(0.1)
        print(f"\n[{how}] ComfyUI exit code {rc}; before: {left_before}; after: {_ours(pid)}")
        assert _ours(pid) == []
        assert not any(_alive(p) for p in workers)
    finally:
        server.stop()
