"""Weight files and pool folders never outlive ComfyUI: removed at exit, on SIGTERM, on pool rebuild; the
folders of killed processes swept at the next start; a small /dev/shm falls back to a disk folder; no
room anywhere is a clear error before anything is written. Files are the owner's only."""
from __future__ import annotations

import logging
import os
import signal
import stat
import subprocess
import sys
import textwrap
import time
from collections import namedtuple

import pytest
import torch

from hires_parallel.parallel.runtime import leftovers, payload
from hires_parallel.parallel.runtime.payload import NoRoomForWeights, WeightStore

Usage = namedtuple("Usage", "total used free")
GB = 2**30


def _data(mb: int = 1) -> dict:
    return {"w": torch.zeros(mb * 2**18)}  # float32: mb MiB


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_files_are_private_and_folders_name_their_owner(tmp_path, monkeypatch):
    store = WeightStore()
    try:
        path = store.file_for_data("k1", _data, "base")
        folder = os.path.dirname(path)
        assert os.path.basename(folder).startswith(f"{leftovers.WEIGHTS_PREFIX}{os.getpid()}_")
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        assert stat.S_IMODE(os.stat(folder).st_mode) == 0o700
        assert torch.load(path, weights_only=True)["w"].numel() == 2**18
    finally:
        store.close()
    assert not os.path.exists(folder)


def test_small_shared_memory_falls_back_to_a_disk_folder_with_a_log_line(tmp_path, monkeypatch, caplog):
    if leftovers.shm_dir() is None:
        pytest.skip("no /dev/shm on this system: the disk folder is the only place anyway")
    real = payload.shutil.disk_usage
    monkeypatch.setenv("HIRES_PARALLEL_WEIGHTS_DIR", str(tmp_path))
    monkeypatch.setattr(payload.shutil, "disk_usage",
                        lambda p: Usage(64 << 20, 0, 60 << 20) if str(p).startswith("/dev/shm") else real(p))
    store = WeightStore()
    try:
        with caplog.at_level(logging.WARNING, logger="hires_parallel"):
            path = store.file_for_data("big", lambda: _data(300), "base")  # 300 MiB > 60 MiB of /dev/shm
        assert path.startswith(str(tmp_path)), path
        assert any("/dev/shm" in r.message and "on disk instead" in r.message for r in caplog.records)
        small = store.file_for_data("small", lambda: {"w": torch.zeros(4)}, "control")
        assert small.startswith(str(tmp_path))  # 60 MiB free is under the margin too
    finally:
        store.close()
    assert not [p for p in os.listdir(tmp_path) if p.startswith(leftovers.WEIGHTS_PREFIX)]


def test_no_room_anywhere_is_a_clear_error_before_writing(tmp_path, monkeypatch):
    monkeypatch.setenv("HIRES_PARALLEL_WEIGHTS_DIR", str(tmp_path))
    monkeypatch.setattr(payload.shutil, "disk_usage", lambda p: Usage(GB, GB - (10 << 20), 10 << 20))
    store = WeightStore()
    try:
        with pytest.raises(NoRoomForWeights, match="HIRES_PARALLEL_WEIGHTS_DIR") as e:
            store.file_for_data("big", lambda: _data(50), "base")
        assert e.value.user_facing and "GB free" in str(e.value)
        assert not any(f.endswith((".pt", ".tmp")) for d in store.dirs.values() for f in os.listdir(d))
    finally:
        store.close()


def test_sweep_removes_folders_of_dead_processes_only(tmp_path):
    dead = _dead_pid()
    gone = [tmp_path / f"{leftovers.WEIGHTS_PREFIX}{dead}_abc_1234", tmp_path / f"{leftovers.POOL_PREFIX}{dead}_defgh567"]
    kept = [tmp_path / f"{leftovers.WEIGHTS_PREFIX}{os.getpid()}_ghi_5678", tmp_path / "hires_parallel_weights_oldstyle",
            tmp_path / "hires_parallel_weights_12_abcde", tmp_path / "unrelated_123_x"]
    for d in gone + kept:
        d.mkdir()
        (d / "w.pt").write_bytes(b"x" * 100)
    removed = leftovers.sweep([str(tmp_path)])
    assert sorted(removed) == sorted(str(d) for d in gone)
    assert all(d.exists() for d in kept) and not any(d.exists() for d in gone)


def test_weight_folders_of_an_earlier_version_are_reported_not_removed(tmp_path, caplog):
    old = tmp_path / "hires_parallel_weights_k3j_x9qa"  # mkdtemp's 8 characters, no owner pid
    old.mkdir()
    (old / "abc.pt").write_bytes(b"x" * 3000)
    with caplog.at_level(logging.WARNING, logger="hires_parallel"):
        assert leftovers.sweep([str(tmp_path)]) == []
    assert old.exists()
    msg = " ".join(r.message for r in caplog.records)
    assert "earlier version" in msg and f"rm -r {old}" in msg
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="hires_parallel"):
        leftovers.sweep([str(tmp_path)])  # the next pool start: said once is enough
    assert not caplog.records


def test_pool_rebuild_removes_the_old_pools_weight_files():
    from hires_parallel.parallel.runtime import submit

    submit.close_weight_store()
    a, b = object(), object()
    first = submit.weight_store(a)
    path = first.file_for_data("k", _data, "base")
    assert submit.weight_store(a) is first and os.path.exists(path)
    second = submit.weight_store(b)  # another pool: its workers have none of the old files cached
    assert second is not first and not os.path.exists(path)
    submit.close_weight_store()


_CHILD = textwrap.dedent("""
    import os, sys, time, torch
    from hires_parallel.parallel.runtime.payload import WeightStore
    from hires_parallel.parallel.runtime.pool import WorkerPool
    from support.pool_jobs import RankSumJob
    store = WeightStore()
    path = store.file_for_data("k", lambda: {"w": torch.zeros(1000)}, "base")
    pool = WorkerPool(["cpu", "cpu"], threads_per_worker=1)
    assert pool.run(RankSumJob()).value["sum"] == 1
    from hires_parallel.parallel.runtime import pool as pool_module
    pool_module._pool = pool  # the registry's pool, as get_pool makes it
    print(path, pool._tmpdir, *pool.pids, flush=True)
    time.sleep(120)
""")


@pytest.mark.parametrize("how", ["SIGTERM", "SIGINT", "SIGHUP"])
def test_a_stopped_controller_leaves_no_weight_file_pool_folder_or_worker(how):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.join(os.path.dirname(__file__), ".."),
                                                       os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.Popen([sys.executable, "-c", _CHILD], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
                            text=True, preexec_fn=default_signals)
    try:
        line = proc.stdout.readline().split()
        assert line, proc.stderr.read()
        weights, pool_dir, *pids = line
        assert os.path.exists(weights) and os.path.isdir(pool_dir)
        proc.send_signal(getattr(signal, how))
        rc = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    print(f"\n[{how}] controller exit code {rc}")
    assert rc != 0  # the signal still ends the process as it did (default action / KeyboardInterrupt)
    assert not os.path.exists(weights) and not os.path.exists(os.path.dirname(weights))
    assert not os.path.exists(pool_dir)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(_running(int(p)) for p in pids):
        time.sleep(0.1)
    assert not any(_running(int(p)) for p in pids)


def default_signals() -> None:
    """In the child: the signals' default meaning, whatever this test run inherited (nohup ignores SIGHUP,
    a shell's background job ignores SIGINT); a signal ignored by the user's setup stays ignored by design."""
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_DFL)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie of an exited child is gone for our purpose
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True
