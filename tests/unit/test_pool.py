"""The background process group: start, jobs, progress, errors, cancel, death, timeout, shutdown.

Real worker processes (gloo on 127.0.0.1, CPU). Most tests share the registry pool (`get_pool`
with SHARED options) so a warm pool is reused like in ComfyUI; tests that break it check that the
next job restarts it. After every test, the only worker processes alive must be those of the
registered pool; at the end of the module none may be. Every test is bounded by a watchdog.
"""
from __future__ import annotations

import faulthandler
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import psutil
import pytest

from hires_parallel.parallel.runtime.pool import ProbeJob, WorkerPool, current_pool, get_pool, shutdown_pool
from hires_parallel.parallel.runtime.protocol import (
    JobCancelled,
    JobFailed,
    JobTimeout,
    PoolError,
    PoolStartError,
    WorkerContext,
    WorkerDied,
)
from support.pool_jobs import FailOnRankJob, HangJob, LoopJob, ProgressJob, RankSumJob

PACK_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEVICES = ["cpu", "cpu"]
# Short timeouts so failures surface fast; detection must not rely on the collective timeout.
SHARED = dict(collective_timeout_s=20, start_timeout_s=60, cancel_timeout_s=5, failure_grace_s=1.0)
TEST_LIMIT_S = 90
RUN_LIMIT_S = 30  # passed as timeout_s: a job that stops talking fails instead of hanging


def worker_pids() -> set[int]:
    """Live worker processes started (directly or not) by this test process."""
    out = set()
    for p in psutil.Process().children(recursive=True):
        try:
            cmd = " ".join(p.cmdline())
            if p.status() != psutil.STATUS_ZOMBIE and ("hires_parallel.parallel.runtime.worker" in cmd
                                                      or "HIRES_PARALLEL_ROOT" in cmd):
                out.add(p.pid)
        except psutil.Error:
            pass
    return out


def _running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def wait_gone(pids: set[int] | list[int], within: float = 10.0) -> set[int]:
    """The pids still running after waiting up to `within` seconds."""
    deadline = time.monotonic() + within
    left = {p for p in pids if _running(p)}
    while left and time.monotonic() < deadline:
        time.sleep(0.05)
        left = {p for p in left if _running(p)}
    return left


@pytest.fixture(scope="module", autouse=True)
def _no_workers_after_module():
    yield
    shutdown_pool()
    assert not wait_gone(worker_pids()), f"worker processes left after the module: {worker_pids()}"


@pytest.fixture(autouse=True)
def _bounded_and_clean():
    # A hang dumps every thread's stack and ends the run (a failure, never a blocked suite); the
    # workers then see their control connection close and exit by themselves.
    faulthandler.dump_traceback_later(TEST_LIMIT_S, exit=True)
    try:
        yield
    finally:
        faulthandler.cancel_dump_traceback_later()
    pool = current_pool()
    allowed = set(pool.pids) if pool is not None and pool.warm else set()
    stray = wait_gone(worker_pids() - allowed, within=5.0)
    assert not stray, f"worker processes left behind: {stray} (registered pool: {allowed})"


@pytest.fixture
def pool() -> WorkerPool:
    return get_pool(DEVICES, **SHARED)


def test_warm_pool_is_reused_and_faster(pool):
    if pool.warm:
        pool.shutdown()  # measure a real cold start whatever ran before
    first = pool.run(RankSumJob(), timeout_s=RUN_LIMIT_S)
    pids = pool.pids
    second = pool.run(RankSumJob(), timeout_s=RUN_LIMIT_S)
    print(f"\n[pool] first job (cold start included): {first.seconds:.3f} s; warm job: {second.seconds:.4f} s")
    assert pool.pids == pids and all(psutil.pid_exists(p) for p in pids)
    assert [s["pid"] for s in second.stats] == pids
    assert second.seconds < first.seconds / 5
    assert pool.status()["jobs_run"] >= 2 and pool.status()["warm"]


def test_process_group_works_and_rank0_value_returns(pool):
    res = pool.run(RankSumJob(), timeout_s=RUN_LIMIT_S)
    assert res.value == {"sum": 1, "rank": 0, "world_size": 2}
    assert [s["rank"] for s in res.stats] == [0, 1]
    assert len(res.job_id) == 32
    st = pool.status()
    assert st["devices"] == DEVICES and st["backend"] == "gloo" and all(st["alive"])
    assert st["last_job_stats"] == res.stats and st["last_error"] == ""
    probe = pool.run(ProbeJob(), timeout_s=RUN_LIMIT_S)
    threads = max(1, (os.cpu_count() or 1) // len(DEVICES))
    assert [s["threads"] for s in probe.stats] == [threads, threads]  # set before torch was imported
    assert probe.value["pack_root"] == os.path.realpath(PACK_ROOT) and probe.value["rank_sum"] == 1


def test_progress_events_stream_in_order(pool):
    events: list[dict] = []
    res = pool.run(ProgressJob(12), on_progress=events.append, timeout_s=RUN_LIMIT_S)
    assert res.value == 12
    assert [e["step"] for e in events] == list(range(1, 13))
    assert all(e["rank"] == 0 and e["total"] == 12 for e in events)  # rank 0 only
    assert float(events[4]["preview"][1, 2]) == 4.0 and tuple(events[4]["preview"].shape) == (2, 3)


def test_user_facing_error_comes_through_and_pool_stays_warm(pool):
    pool.start()
    pids = pool.pids
    msg = "Latent height 1000 is not a multiple of 8 x 2 bands: use 1008."
    with pytest.raises(JobFailed) as info:
        pool.run(FailOnRankJob(1, msg), timeout_s=RUN_LIMIT_S)
    assert str(info.value) == msg
    assert info.value.rank == 1 and info.value.user_facing and not info.value.pool_restarted
    assert info.value.exc_type.endswith("UserFacingError")
    # Any other exception names its type and rank and carries the remote traceback.
    with pytest.raises(JobFailed) as info:
        pool.run(FailOnRankJob(1, "plain bug", user_facing=False), timeout_s=RUN_LIMIT_S)
    text = str(info.value)
    assert "ValueError: plain bug" in text and "rank 1" in text and "pool_jobs.py" in text
    assert pool.pids == pids and pool.warm
    assert pool.run(RankSumJob(), timeout_s=RUN_LIMIT_S).value["sum"] == 1
    assert pool.pids == pids


def test_failure_while_peers_wait_in_a_collective_restarts_the_pool(pool):
    pool.start()
    old = pool.pids
    t0 = time.monotonic()
    with pytest.raises(JobFailed) as info:
        pool.run(FailOnRankJob(1, "rank 1 gave up", hold=True), timeout_s=RUN_LIMIT_S)
    elapsed = time.monotonic() - t0
    assert str(info.value) == "rank 1 gave up" and info.value.pool_restarted
    assert elapsed < 8, f"took {elapsed:.1f} s; collective timeout is {SHARED['collective_timeout_s']} s"
    assert not wait_gone(old)
    res = pool.run(RankSumJob(), timeout_s=RUN_LIMIT_S)
    assert res.value["sum"] == 1 and not set(pool.pids) & set(old)


def test_cancel_mid_job(pool):
    pool.start()
    pids = pool.pids
    seen = threading.Event()
    asked: list[float] = []

    def should_cancel() -> bool:
        if seen.is_set() and not asked:
            asked.append(time.monotonic())
        return bool(asked)

    with pytest.raises(JobCancelled):
        pool.run(LoopJob(max_s=60), on_progress=lambda e: seen.set(), should_cancel=should_cancel,
                 timeout_s=RUN_LIMIT_S)
    took = time.monotonic() - asked[0]
    print(f"\n[pool] cancel took {took:.3f} s")
    assert took < 2.0
    assert pool.pids == pids and pool.warm  # cancelled together: no restart
    assert pool.run(RankSumJob(), timeout_s=RUN_LIMIT_S).value["sum"] == 1


def test_exception_in_progress_callback_cancels_and_propagates(pool):
    class Interrupted(Exception):
        pass

    def on_progress(event: dict) -> None:
        if event["round"] >= 3:
            raise Interrupted("user pressed Cancel")

    pool.start()
    pids = pool.pids
    with pytest.raises(Interrupted):
        pool.run(LoopJob(max_s=60), on_progress=on_progress, timeout_s=RUN_LIMIT_S)
    assert pool.pids == pids and pool.warm


def test_killed_worker_is_reported_and_pool_restarts(pool):
    pool.start()
    old = pool.pids
    killed_at: list[float] = []

    def on_progress(event: dict) -> None:
        if not killed_at:  # the job is looping in its collectives now
            os.kill(old[1], signal.SIGKILL)
            killed_at.append(time.monotonic())

    with pytest.raises(WorkerDied) as info:
        pool.run(LoopJob(max_s=60), on_progress=on_progress, timeout_s=RUN_LIMIT_S)
    took = time.monotonic() - killed_at[0]
    print(f"\n[pool] dead worker reported after {took:.3f} s")
    assert info.value.rank == 1 and info.value.device == "cpu" and info.value.returncode == -signal.SIGKILL
    assert "rank 1" in str(info.value) and "SIGKILL" in str(info.value) and "restarts on the next job" in str(info.value)
    assert took < 5, f"collective timeout is {SHARED['collective_timeout_s']} s"
    assert not wait_gone(old), "a worker of the dead pool is still running"
    assert not pool.warm and not worker_pids()
    again = get_pool(DEVICES, **SHARED)
    assert again is pool
    res = again.run(RankSumJob(), timeout_s=RUN_LIMIT_S)
    assert res.value["sum"] == 1 and not set(again.pids) & set(old)


def test_silent_rank0_times_out(pool):
    pool.start()
    old = pool.pids
    t0 = time.monotonic()
    with pytest.raises(JobTimeout) as info:
        pool.run(HangJob(), timeout_s=1.5)
    assert 1.5 <= time.monotonic() - t0 < 6
    assert "1.5 s" in str(info.value)
    assert not wait_gone(old) and not pool.warm
    assert "JobTimeout" in pool.status()["last_error"]


def test_three_workers():
    with WorkerPool(["cpu"] * 3, threads_per_worker=1, **SHARED) as pool3:
        res = pool3.run(RankSumJob(), timeout_s=RUN_LIMIT_S)
        pids = pool3.pids
        assert res.value == {"sum": 3, "rank": 0, "world_size": 3}
        assert [s["rank"] for s in res.stats] == [0, 1, 2] and len(set(pids)) == 3
    assert not wait_gone(pids)


def test_bad_devices_are_refused_before_anything_starts():
    with pytest.raises(ValueError, match="mix CPU and CUDA"):
        WorkerPool(["cpu", "cuda:0"])
    with pytest.raises(ValueError, match="same GPU twice"):
        WorkerPool(["cuda:1", "cuda:1"])
    with pytest.raises(ValueError, match="'cpu' or 'cuda:N'"):
        WorkerPool(["tpu"])
    with pytest.raises(ValueError, match="do not exist"):
        WorkerPool(["cuda:63"])
    assert not worker_pids()


def test_start_that_does_not_finish_in_time_fails_cleanly():
    pool_slow = WorkerPool(DEVICES, start_timeout_s=0.5)
    with pytest.raises(PoolStartError, match="did not start within"):
        pool_slow.run(RankSumJob())
    assert not pool_slow.warm and pool_slow.status()["pids"] == []
    assert not wait_gone(worker_pids())


def test_local_context_runs_the_same_job_in_process():
    """World size 1 without a pool: the same job code, progress and cancel through callbacks."""
    events: list[dict] = []
    ctx = WorkerContext.local(on_progress=events.append)
    assert ProgressJob(3).run(ctx) == 3 and [e["step"] for e in events] == [1, 2, 3]
    rounds: list[dict] = []
    ctx = WorkerContext.local(on_progress=rounds.append, should_cancel=lambda: len(rounds) >= 4)
    with pytest.raises(JobCancelled):
        LoopJob(max_s=10, sleep_s=0.0).run(ctx)
    assert len(rounds) == 4


def test_shutdown_from_another_thread_and_registry(pool):
    pool.start()
    pids = pool.pids
    outcome: list[BaseException] = []

    def runner() -> None:
        try:
            pool.run(LoopJob(max_s=60), timeout_s=RUN_LIMIT_S)
        except BaseException as exc:  # noqa: BLE001
            outcome.append(exc)

    th = threading.Thread(target=runner)
    th.start()
    time.sleep(0.5)
    shutdown_pool()
    th.join(timeout=15)
    assert not th.is_alive() and isinstance(outcome[0], PoolError)
    assert current_pool() is None and not pool.warm and pool.status()["pids"] == []
    assert not wait_gone(pids) and not worker_pids()


SCRIPT = textwrap.dedent("""
    import importlib, importlib.util, json, os, sys, threading
    folder, tests_dir, result_file = sys.argv[1], sys.argv[2], sys.argv[3]
    sys.path.insert(0, tests_dir)  # for support.pool_jobs; workers inherit it
    # What ComfyUI does: import the folder under a name derived from its path.
    name = folder.replace(".", "_x_")
    spec = importlib.util.spec_from_file_location(name, os.path.join(folder, "__init__.py"))
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    pool_mod = importlib.import_module(name + ".parallel.runtime.pool")
    protocol = importlib.import_module(name + ".parallel.runtime.protocol")
    assert pool_mod.ProbeJob.__module__ == name + ".parallel.runtime.pool"
    # Pack classes travel under the name the workers import, and come back under ours.
    blob = pool_mod.dumps_job(protocol.JobResult(1))
    assert b"hires_parallel.parallel.runtime.protocol" in blob and name.encode() not in blob
    import pickle
    from hires_parallel.parallel.runtime.protocol import JobResult as WorkersJobResult  # as a worker names it
    assert WorkersJobResult is not protocol.JobResult
    assert type(pool_mod.loads_result(pickle.dumps(WorkersJobResult(2)))) is protocol.JobResult
    out = {}
    for mode in ("symlink", "bootstrap"):
        os.environ["HIRES_PARALLEL_WORKER_LAUNCH"] = mode
        pool = pool_mod.WorkerPool(["cpu", "cpu"], threads_per_worker=1, start_timeout_s=60)
        res = pool.run(pool_mod.ProbeJob(), timeout_s=30)
        out[mode] = dict(res.value, launch=pool.launch_mode, pids=pool.pids)
        if mode == "symlink":
            pool.shutdown()
    # ComfyUI dies mid-job (no shutdown, no atexit): its workers must notice and exit by themselves.
    from support.pool_jobs import LoopJob
    running = threading.Event()
    threading.Thread(target=pool.run, args=(LoopJob(max_s=60),),
                     kwargs=dict(on_progress=lambda e: running.set()), daemon=True).start()
    out["running"] = running.wait(30)
    with open(result_file, "w") as f:
        json.dump(out, f)
    os._exit(0)
""")


def test_pack_importable_in_workers_from_a_folder_with_another_name(tmp_path):
    folder = tmp_path / "ComfyUI-HiRes-Parallel"
    folder.symlink_to(PACK_ROOT, target_is_directory=True)
    tests_dir = os.path.join(PACK_ROOT, "tests")
    result_file = tmp_path / "result.json"
    # stdout to a file, not a pipe: workers inherit it, and waiting for a pipe's end would wait for them.
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(folder), tests_dir, str(result_file)],
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, timeout=80,
                          cwd=str(tmp_path), env=dict(os.environ, TMPDIR=str(tmp_path)))
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads(result_file.read_text())
    sym, boot = out["symlink"], out["bootstrap"]
    assert sym["launch"] == "symlink" and boot["launch"] == "bootstrap"
    # Workers imported this very folder as `hires_parallel`, not the editable install of the venv.
    assert sym["pack_file"].endswith(os.path.join("pkg", "hires_parallel", "__init__.py"))
    assert boot["pack_file"] == str(folder / "__init__.py")
    assert sym["pack_root"] == boot["pack_root"] == os.path.realpath(PACK_ROOT)
    for r in (sym, boot):
        assert r["rank_sum"] == 1 and r["world_size"] == 2 and r["backend"] == "gloo"
    assert not wait_gone(sym["pids"], within=2), "shutdown left a worker"
    assert out["running"], "the job did not start before the controller died"
    t0 = time.monotonic()
    assert not wait_gone(boot["pids"], within=10), "workers outlived their controller (orphans)"
    print(f"\n[pool] orphaned workers exited {time.monotonic() - t0:.2f} s after the controller died")
