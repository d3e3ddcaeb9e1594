"""The web panel's server side without ComfyUI: the monitor (live job, last run, last error + hint, pushed
events), the routes through a real aiohttp server on loopback, and registration with and without a
PromptServer. The same routes inside a real ComfyUI are tested in tests/server/test_web_routes.py."""
from __future__ import annotations

import json
import time

import psutil
import pytest
from hires_parallel import web_routes
from hires_parallel.parallel.runtime import monitor
from hires_parallel.parallel.runtime.pool import (
    ProbeJob,
    current_pool,
    get_pool,
    shutdown_pool,
)
from hires_parallel.parallel.runtime.protocol import JobFailed, PoolError
from hires_parallel.parallel.runtime.sampling_job import ParallelSpec
from hires_parallel.parallel.runtime.submit import ParallelInputError
from hires_parallel.parallel.split.layout import split_rows
from support.routes_client import call_route


@pytest.fixture(autouse=True)
def clean_monitor():
    def reset():
        monitor.set_sink(None)
        for d in (monitor.LIVE, monitor.LAST_RUN, monitor.LAST_ERROR):
            d.clear()

    reset()
    yield
    reset()


@pytest.fixture
def events():
    got: list[tuple[str, dict]] = []
    monitor.set_sink(lambda name, data: got.append((name, json.loads(json.dumps(data)))))
    return got


def _stats(rank: int, steps: int) -> dict:
    return {"rank": rank, "device": "cpu", "steps": steps, "step_s": [0.5] * steps,
            "comm": {"bytes_sent": {"halo": 400 * steps, "kv": 4000 * steps}, "total_bytes_sent": 4400 * steps,
                     "total_bytes_received": 4400 * steps, "total_seconds": 0.1 * steps}}


def test_a_run_is_pushed_step_by_step_then_summarised(events):
    monitor.run_started(["cpu", "cpu"], ParallelSpec(2, False), total_steps=3)
    for i in range(3):
        monitor.run_step({"step": i, "total": 3, "x0": object()})  # x0 (a tensor) is never sent
    live = monitor.snapshot()["job"]
    assert live["step"] == 3 and live["total"] == 3 and live["devices"] == ["cpu", "cpu"]
    assert live["startup_s"] is not None and len(live["step_s"]) == 2  # first interval = start-up
    monitor.run_finished({"devices": ["cpu", "cpu"], "world_size": 2, "cfg_parallel": False, "mode": "exact",
                          "band_weights": None, "seconds": 2.0, "finished": time.time(),
                          "ranks": [_stats(0, 3), _stats(1, 3)]})

    assert {name for name, _ in events} == {monitor.EVENT}
    kinds = [d["kind"] for _, d in events]
    assert kinds == ["start", "progress", "progress", "progress", "done"]
    assert [d["job"]["step"] for _, d in events if d["kind"] == "progress"] == [1, 2, 3]
    assert [d["seq"] for _, d in events] == sorted({d["seq"] for _, d in events})
    done = events[-1][1]
    assert done["job"] is None and done["pool"]["exists"] is False
    rank1 = done["last_run"]["ranks"][1]
    assert rank1["bytes_sent_per_step"] == {"halo": 400, "kv": 4000} and rank1["total_sent_per_step"] == 4400
    assert rank1["mean_step_s"] == 0.5 and rank1["comm_s_per_step"] == 0.1


def test_a_failed_run_keeps_its_error_with_a_hint_and_a_cancel_does_not(events):
    @monitor.watched
    def run(exc):
        monitor.run_started(["cpu"] * 3, ParallelSpec(3, False), 4)
        raise exc

    with pytest.raises(ParallelInputError):
        run(ParallelInputError("3 devices cannot be halved: use an even number of devices."))
    err = monitor.snapshot()["last_error"]
    assert err["type"] == "ParallelInputError" and "cannot be halved" in err["message"]
    assert err["hint"].startswith("Nothing ran")
    assert monitor.snapshot()["job"] is None  # a failed run is not shown as running

    class InterruptProcessingException(Exception):  # ComfyUI's Cancel, matched by name
        pass

    with pytest.raises(InterruptProcessingException):
        run(InterruptProcessingException())
    assert monitor.snapshot()["last_error"]["type"] == "ParallelInputError"
    assert [d["kind"] for _, d in events] == ["start", "error", "start", "cancelled"]


def test_hints_follow_the_exception_class_and_its_bases():
    class RemoteFailure(JobFailed):
        pass

    assert monitor.hint_for(RemoteFailure("RuntimeError", "boom")) == monitor.HINTS["JobFailed"]
    assert monitor.hint_for(KeyError("x")) == monitor.DEFAULT_HINT
    stopped = PoolError("The worker pool was shut down while a job was running.")
    assert monitor.hint_for(stopped).startswith("The pool was stopped during the job")
    err = JobFailed("RuntimeError", "x" * 10_000, "traceback")
    monitor.run_failed(err)
    assert len(monitor.LAST_ERROR["message"]) == monitor.MESSAGE_LIMIT


def test_a_failing_sink_never_fails_the_run():
    def broken(name, data):
        raise RuntimeError("event loop closed")

    monitor.set_sink(broken)
    monitor.run_started(["cpu"], ParallelSpec(1, False), 1)
    monitor.run_step({"step": 0, "total": 1})
    assert monitor.LIVE["step"] == 1


# ---------------------------------------------------------------------------------------------
# The routes, on a real aiohttp server


_call = call_route


def test_status_route_reports_pool_job_last_run_and_error():
    monitor.run_failed(ParallelInputError("bad"))
    status, data = _call("GET", "/hires_parallel/status")
    assert status == 200
    assert set(data) == {"pool", "job", "last_run", "last_error"}
    assert data["pool"]["exists"] is False and data["job"] is None and data["last_error"]["message"] == "bad"


@pytest.mark.parametrize("weights, cfg, want_groups", [("", "off", 1), ("2,1", "off", 1), ("3,1,1,1", "on", 2)])
def test_layout_route_gives_split_rows_bands(weights, cfg, want_groups):
    devices = len(weights.split(",")) if weights else 2
    status, data = _call("GET", f"/hires_parallel/layout?height=1152&width=896&devices={devices}&device_kind=cpu"
                                f"&cfg_parallel={cfg}&weights={weights}")
    assert status == 200 and data["ok"], data
    assert data["latent_rows"] == 144 and data["latent_cols"] == 112 and data["batch_groups"] == want_groups
    bands_per_group = devices // want_groups
    per_device = [float(w) for w in weights.split(",")] if weights else None
    band_weights = None if per_device is None else [
        min(per_device[g * bands_per_group + b] for g in range(want_groups)) for b in range(bands_per_group)]
    want = split_rows(144, bands_per_group, 8, band_weights)
    assert [tuple(b["latent_rows"]) for b in data["bands"]] == want
    assert [b["pixel_rows"] for b in data["bands"]] == [[s * 8, e * 8] for s, e in want]
    assert [b["ranks"] for b in data["bands"]] == [
        [g * bands_per_group + b for g in range(want_groups)] for b in range(bands_per_group)]


def test_layout_route_explains_settings_without_a_layout_and_rejects_bad_queries():
    status, data = _call("GET", "/hires_parallel/layout?height=1024&devices=3&device_kind=cpu&cfg_parallel=on")
    assert status == 200 and data["ok"] is False and "cannot be halved" in data["error"]
    status, data = _call("GET", "/hires_parallel/layout?height=64&devices=4&device_kind=cpu&cfg_parallel=off")
    assert status == 200 and data["ok"] is False and "use at most 1 device" in data["error"], data
    status, data = _call("GET", "/hires_parallel/layout?height=tall")
    assert status == 400 and data == {"ok": False, "error": "height must be an integer; got 'tall'."}
    status, data = _call("GET", "/hires_parallel/layout?devices=2&device_kind=cpu&weights=2,x")
    assert status == 200 and "device_weights must be numbers" in data["error"]


def test_layout_knows_that_cfg_1_has_no_negative_pass():
    # As submit.preflight: at cfg 1 ComfyUI skips the negative prompt, so auto splits bands over all devices.
    status, data = _call("GET", "/hires_parallel/layout?height=1024&devices=4&device_kind=cpu&cfg_parallel=auto&cfg=1")
    assert data["ok"] and data["cfg_parallel"] is False and len(data["bands"]) == 4
    status, data = _call("GET", "/hires_parallel/layout?height=1024&devices=4&device_kind=cpu&cfg_parallel=auto&cfg=7")
    assert data["ok"] and data["cfg_parallel"] is True and len(data["bands"]) == 2
    status, data = _call("GET", "/hires_parallel/layout?height=1024&devices=2&device_kind=cpu&cfg_parallel=on&cfg=1.0")
    assert data["ok"] is False and "no negative pass" in data["error"]
    status, data = _call("GET", "/hires_parallel/layout?height=1024&devices=2&cfg=lots")
    assert status == 400 and "cfg must be a number" in data["error"]


def test_one_device_layout_is_the_whole_image():
    status, data = _call("GET", "/hires_parallel/layout?height=1000&devices=1&device_kind=cpu")
    assert data["ok"] and data["world_size"] == 1
    assert data["bands"] == [{"index": 0, "ranks": [0], "devices": ["cpu"], "latent_rows": [0, 125],
                              "pixel_rows": [0, 1000]}]


def test_batch_mode_layout_keeps_the_whole_image_on_every_device():
    # As submit.preflight: batch mode ignores cfg_parallel and device weights and splits no rows.
    status, data = _call("GET", "/hires_parallel/layout?height=512&devices=4&device_kind=cpu&mode=batch"
                                "&cfg_parallel=on&weights=2,1,1,1")
    assert data["ok"] and data["mode"] == "batch" and data["cfg_parallel"] is False and data["batch_groups"] == 4
    assert [(b["ranks"], b["latent_rows"]) for b in data["bands"]] == [([0, 1, 2, 3], [0, 64])]
    status, data = _call("GET", "/hires_parallel/layout?devices=2&device_kind=cpu&mode=fast")
    assert data["ok"] is False and "mode must be one of" in data["error"]


def test_shutdown_and_restart_routes_stop_a_real_pool(monkeypatch, events):
    from hires_parallel.parallel.runtime import submit

    freed = []
    monkeypatch.setattr(submit, "close_weight_store", lambda: freed.append(True))
    try:
        for action, frees in (("restart", False), ("shutdown", True)):
            pool = get_pool(["cpu"], start_timeout_s=60)
            pool.run(ProbeJob(), timeout_s=60)
            pids = pool.status()["pids"]
            freed.clear()
            status, data = _call("POST", f"/hires_parallel/pool/{action}")
            assert status == 200 and data["ok"] and data["action"] == action, data
            assert data["pool"]["exists"] is False and current_pool() is None
            assert not any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE for p in pids)
            assert freed == ([True] if frees else [])
            assert events[-1][1]["kind"] == action
    finally:
        shutdown_pool()


def test_pool_actions_are_post_only():
    # A link or an <img> (GET) must not stop the pool; ComfyUI's origin check guards cross-site POSTs.
    assert _call("GET", "/hires_parallel/pool/shutdown")[0] == 405
    assert _call("GET", "/hires_parallel/pool/restart")[0] == 405


# ---------------------------------------------------------------------------------------------
# Registration


def test_register_is_a_no_op_without_a_prompt_server(monkeypatch):
    import sys

    monkeypatch.delitem(sys.modules, "server", raising=False)
    assert web_routes.register() is False
    assert monitor._sink is None


def test_register_adds_the_routes_once_and_pushes_through_send_sync():
    from aiohttp import web

    class FakeServer:
        def __init__(self):
            self.routes = web.RouteTableDef()
            self.sent = []

        def send_sync(self, event, data, sid=None):
            self.sent.append((event, data["kind"]))

    server = FakeServer()
    assert web_routes.register(server) and web_routes.register(server)  # ComfyUI may call the entry point twice
    paths = sorted((r.method, r.path) for r in server.routes)
    assert paths == [("GET", "/hires_parallel/align"), ("GET", "/hires_parallel/layout"), ("GET", "/hires_parallel/status"),
                     ("POST", "/hires_parallel/pool/restart"), ("POST", "/hires_parallel/pool/shutdown")]
    monitor.run_started(["cpu"], ParallelSpec(1, False), 1)
    assert server.sent == [(monitor.EVENT, "start")]
