"""What the web panel shows, kept in one place: the run in progress, the last run, the last error with a hint.

The controller (submit.py) reports here; ``web_routes`` serves ``snapshot()`` over HTTP and installs the
sink that pushes every change to the browsers (ComfyUI's ``PromptServer.send_sync``). Without a sink
(tests, scripts, no server) reporting only updates the state. No torch and no ComfyUI import.

Only rank 0 streams progress, but every rank ends each step with a collective cancel check, so all ranks
are at the same step: the live step applies to every rank. Per-rank step times and bytes come with the
ranks' stats when the run ends.
"""
from __future__ import annotations

import functools
import json
import logging
import threading
import time
from typing import Any, Callable

log = logging.getLogger("hires_parallel")

EVENT = "hires_parallel.status"  # the PromptServer message type the web extension listens to
MESSAGE_LIMIT = 4000  # JobFailed carries a remote traceback; the console has the full text

_lock = threading.Lock()
_sink: Callable[[str, dict], Any] | None = None
_seq = 0
LIVE: dict[str, Any] = {}  # the run in progress; empty when none
LAST_RUN: dict[str, Any] = {}  # summary of the last finished run
LAST_ERROR: dict[str, Any] = {}  # the last failed run: type, message, hint, time

# Exception class name -> what to do about it. Names, not classes: ComfyUI may load the pack under two
# module names, so an isinstance check against one copy of a class can miss the other.
HINTS = {
    "ParallelInputError": "Nothing ran: change the node's inputs as the message says.",
    "LayoutError": "Nothing ran: use fewer devices or a taller image, as the message says.",
    "UnsupportedModel": "This model family cannot be split into bands yet: set devices to 1.",
    "UnshippablePatch": "Remove the node that adds this patch or conditioning, or set devices to 1.",
    "WorkerDied": "A worker process ended during the job, most often out of memory (host or GPU): use a smaller "
                  "image or free memory. The pool starts again on the next job.",
    "PoolStartError": "The workers could not start: ComfyUI's console shows each rank's error. Check that the "
                      "devices exist (devices, device_kind) and that CUDA works, or try device_kind cpu.",
    "JobTimeout": "A worker stopped answering and the pool was stopped. Queue again; if it repeats, look for a "
                  "stuck worker in ComfyUI's console.",
    "JobFailed": "A worker raised an error (its traceback is in the message and in ComfyUI's console). Press "
                 "Restart and queue again; if it repeats, try devices 1 to see whether the model runs at all.",
    "PoolError": "The worker pool is in a bad state: press Restart and queue again.",
}
# Checked first: messages whose class alone would give the wrong advice.
MESSAGE_HINTS = {
    "was shut down while a job was running": "The pool was stopped during the job (Restart, Shut down or the Pool "
                                             "Shutdown node): queue the job again.",
}
DEFAULT_HINT = "See ComfyUI's console for the traceback; Restart clears a stuck worker pool."
CANCELLED = ("InterruptProcessingException", "JobCancelled")


def set_sink(sink: Callable[[str, dict], Any] | None) -> None:
    """Where events go: ``sink(EVENT, data)``; None stops pushing."""
    global _sink
    _sink = sink


def hint_for(exc: BaseException) -> str:
    message = str(exc)
    for part, hint in MESSAGE_HINTS.items():
        if part in message:
            return hint
    for cls in type(exc).__mro__:
        if cls.__name__ in HINTS:
            return HINTS[cls.__name__]
    return DEFAULT_HINT


def summarize_run(last_run: dict) -> dict:
    """submit.LAST_RUN -> what the panel shows: per rank the mean step time and the bytes per step."""
    ranks = []
    for i, st in enumerate(last_run.get("ranks") or []):
        st = st or {}
        steps = int(st.get("steps") or len(st.get("step_s") or []) or 0)
        step_s = [float(s) for s in st.get("step_s") or []]
        comm = st.get("comm") or {}
        per = max(steps, 1)
        sent = {k: int(v) // per for k, v in (comm.get("bytes_sent") or {}).items()}
        ranks.append({
            "rank": st.get("rank", i),
            "device": st.get("device", (last_run.get("devices") or [None] * (i + 1))[i]),
            "steps": steps,
            "step_s": step_s,
            "mean_step_s": round(sum(step_s) / len(step_s), 4) if step_s else None,
            "bytes_sent_per_step": sent,
            "total_sent_per_step": int(comm.get("total_bytes_sent") or 0) // per,
            "total_received_per_step": int(comm.get("total_bytes_received") or 0) // per,
            "comm_s_per_step": round(float(comm.get("total_seconds") or 0.0) / per, 4),
        })
    keys = ("devices", "world_size", "cfg_parallel", "mode", "band_weights", "seconds", "finished", "plan")
    out = {**{k: last_run.get(k) for k in keys}, "ranks": ranks}
    if last_run.get("trace_summary"):
        out["trace"] = [{k: t.get(k) for k in ("rank", "per_step", "top_wait_layers")}
                        for t in last_run["trace_summary"]]
    return out


def _pool_status() -> dict:
    from .pool import current_pool

    pool = current_pool()
    if pool is None:
        return {"exists": False, "warm": False, "busy": False, "devices": [], "world_size": 0, "pids": [],
                "alive": []}
    status = dict(pool.status())
    status.pop("last_job_stats", None)  # the same numbers as last_run's ranks, summarised there
    status["exists"] = True
    return status


def snapshot() -> dict:
    """Everything the panel shows, as plain JSON data."""
    with _lock:
        job = {k: v for k, v in LIVE.items() if not k.startswith("_")}
        job = {**job, "step_s": list(job.get("step_s", []))} if job else None
        data = {"job": job, "last_run": dict(LAST_RUN) or None, "last_error": dict(LAST_ERROR) or None}
    data["pool"] = _pool_status()
    return json.loads(json.dumps(data, default=str))  # plain data only: it goes through json.dumps again


def publish(kind: str) -> None:
    """Push a snapshot to the browsers; a failing push never disturbs a run."""
    global _seq
    sink = _sink
    if sink is None:
        return
    with _lock:
        _seq += 1
        seq = _seq
    try:
        sink(EVENT, {"kind": kind, "seq": seq, "time": time.time(), **snapshot()})
    except Exception:  # noqa: BLE001 - a closed loop or socket must not fail the sampling job
        log.debug("HiRes Parallel: could not push a status event", exc_info=True)


def run_started(devices: list[str], spec: Any, total_steps: int) -> None:
    with _lock:
        LIVE.clear()
        LIVE.update(devices=list(devices), world_size=spec.world_size, cfg_parallel=spec.cfg_parallel,
                    mode=spec.mode, step=0, total=int(total_steps), step_s=[], startup_s=None,
                    started=time.time(), _t=time.perf_counter())
    publish("start")


def run_step(event: dict) -> None:
    """A progress event of rank 0 (``step`` is ComfyUI's 0-based callback index)."""
    if event.get("step") is None:
        return
    with _lock:
        if not LIVE:
            return
        now = time.perf_counter()
        dt = round(now - LIVE["_t"], 4)
        LIVE["_t"] = now
        if LIVE["startup_s"] is None:  # the first interval includes the pool start and model transfer
            LIVE["startup_s"] = dt
        else:
            LIVE["step_s"].append(dt)
        LIVE["step"] = int(event["step"]) + 1
        LIVE["total"] = int(event.get("total") or LIVE["total"])
    publish("progress")


def run_finished(last_run: dict) -> None:
    summary = summarize_run(last_run)
    with _lock:
        LIVE.clear()
        LAST_RUN.clear()
        LAST_RUN.update(summary)
    publish("done")


_REPORTED = "_hires_parallel_reported"  # set on an exception once it reached the panel


def run_failed(exc: BaseException) -> None:
    cancelled = any(c.__name__ in CANCELLED for c in type(exc).__mro__)
    try:
        setattr(exc, _REPORTED, True)
    except Exception:  # noqa: BLE001 - an exception type without a __dict__: it may be reported twice
        pass
    with _lock:
        LIVE.clear()
        if not cancelled:
            message = str(exc)
            LAST_ERROR.clear()
            LAST_ERROR.update(type=type(exc).__name__, message=message[:MESSAGE_LIMIT], hint=hint_for(exc),
                              time=time.time())
    publish("cancelled" if cancelled else "error")


def watched(fn: Callable) -> Callable:
    """Decorator for the run entry point and the nodes' execute: whatever raises is reported (cancel included),
    then re-raised, so every refusal reaches the panel's last error, including those before a run starts
    (device checks such as "device_kind is cuda but no CUDA device is visible"). Nested watched calls report
    an exception once."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except BaseException as exc:
            if not getattr(exc, _REPORTED, False):
                run_failed(exc)
            raise

    return wrapper
