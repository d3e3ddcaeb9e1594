"""What travels between the controller (the ComfyUI process) and the worker ranks.

A ``Job`` is a picklable object whose ``run(ctx)`` executes on every rank at once (SPMD); rank 0's
return value is the result. Jobs talk to the runtime only through a ``WorkerContext``: progress
events, a collective cancel check, a per-process cache and a stats dict.

Messages on the control connection are tuples ``(kind, ...)`` pickled with plain ``pickle`` (never
with multiprocessing's ForkingPickler, which would move tensors into shared memory or CUDA IPC
handles that an unrelated process cannot open). Tensors in events and results are moved to the CPU
before they are sent, because a worker's cuda:0 is not the controller's cuda:0.

    controller -> worker: ("job", job_id, job_bytes) | ("cancel", job_id) | ("shutdown",)
    worker -> controller: ("hello", rank, pid) | ("ready", rank, info) | ("start_error", rank, text)
                          ("progress", job_id, event)            (rank 0 only)
                          ("done", job_id, result_bytes, stats)  (result_bytes is None off rank 0)
                          ("cancelled", job_id, stats) | ("error", job_id, error_info, stats)

Exceptions are never pickled across: a failing rank sends ``error_info(exc)`` (plain data) and the
controller raises ``JobFailed`` built from it, so ``except JobFailed`` always matches the class the
controller's code imported, whatever name ComfyUI loaded the pack under.

This module imports no torch and no ComfyUI at import time.
"""
from __future__ import annotations

import threading
import traceback
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    import torch

__all__ = [
    "Job",
    "JobResult",
    "WorkerContext",
    "PoolError",
    "PoolStartError",
    "WorkerDied",
    "JobFailed",
    "JobCancelled",
    "JobTimeout",
    "error_info",
    "to_cpu",
]

# Worker exit codes the controller can name in WorkerDied.
EXIT_OK = 0
EXIT_START_FAILED = 2
EXIT_CONTROLLER_GONE = 3


class Job:
    """Base class of everything the pool runs. Subclasses must be picklable (plain attributes,
    defined in an importable module) and implement ``run``, which every rank executes with the same
    job object; ranks must call collectives (including ``ctx.check_cancel()``) in the same order."""

    job_id: str = ""  # a fresh uuid4 hex, set by the pool for every run

    def run(self, ctx: "WorkerContext") -> Any:
        raise NotImplementedError(f"{type(self).__name__}.run(ctx) is not implemented")


@dataclass
class JobResult:
    """Rank 0's return value, each rank's ``ctx.stats`` (index = rank) and the controller-side
    wall time of the job in seconds (including a lazy pool start)."""

    value: Any
    stats: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    job_id: str = ""


class WorkerContext:
    """The runtime as a job sees it, on one rank.

    In a worker it is built by the worker loop; for an in-process run (one device, no pool) use
    ``WorkerContext.local(...)`` so the same job code runs unchanged as a group of size 1.
    """

    def __init__(
        self,
        rank: int,
        world_size: int,
        device: "torch.device | str",
        backend: str,
        cache: dict,
        job_id: str = "",
        send: Callable[[tuple], None] | None = None,
        cancel_event: threading.Event | None = None,
        on_progress: Callable[[dict], None] | None = None,
        should_cancel: Callable[[], bool] | None = None,
    ) -> None:
        import torch

        self.rank = rank
        self.world_size = world_size
        self.device = torch.device(device)
        self.backend = backend
        self.cache = cache
        self.stats: dict[str, Any] = {}
        self.job_id = job_id
        self._send = send
        self._cancel_event = cancel_event or threading.Event()
        self._on_progress = on_progress
        self._should_cancel = should_cancel
        # Where small collectives (cancel flag, counters) live: NCCL reduces device tensors only,
        # gloo is happiest with host tensors.
        self.collective_device = self.device if backend == "nccl" else torch.device("cpu")

    @classmethod
    def local(
        cls,
        device: "torch.device | str" = "cpu",
        cache: dict | None = None,
        on_progress: Callable[[dict], None] | None = None,
        should_cancel: Callable[[], bool] | None = None,
    ) -> "WorkerContext":
        """A world of one in the calling process: progress goes to ``on_progress``, cancel comes
        from ``should_cancel()``; no torch.distributed is touched."""
        return cls(0, 1, device, "local", {} if cache is None else cache,
                   on_progress=on_progress, should_cancel=should_cancel)

    def progress(self, **event: Any) -> None:
        """Report an event (step, total, a small preview tensor...) to the controller now.
        Only rank 0 reports; on the other ranks this is a no-op, so every rank may call it."""
        if self.rank != 0:
            return
        if self._on_progress is not None:
            self._on_progress(dict(event))
        elif self._send is not None:
            self._send(("progress", self.job_id, to_cpu(dict(event))))

    def cancel_requested(self) -> bool:
        """This rank's local view only; use ``check_cancel`` to act on it (it keeps ranks together)."""
        if self._should_cancel is not None and self._should_cancel():
            self._cancel_event.set()
        return self._cancel_event.is_set()

    def check_cancel(self) -> None:
        """Collective: every rank must call it at the same points (e.g. once per step).

        All ranks all_reduce(MAX) their local cancel flag, so when the controller asked any rank to
        cancel, every rank raises ``JobCancelled`` at the same call and none is left in a collective.
        """
        flag = 1 if self.cancel_requested() else 0
        if self.world_size > 1:
            import torch
            import torch.distributed as dist

            t = torch.tensor([flag], dtype=torch.int32, device=self.collective_device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            flag = int(t.item())
        if flag:
            raise JobCancelled(
                f"Job {self.job_id or '(local)'} was cancelled; every rank stopped at the same "
                "cancel check and the workers stay ready for the next job."
            )


# ----------------------------------------------------------------------------------------------
# Exceptions. Each keeps its constructor arguments so it pickles (ComfyUI may log or re-raise it).


class PoolError(RuntimeError):
    """Base of every error of the background process group."""

    def __reduce__(self):  # type: ignore[override]
        return (type(self), self.args)


class PoolStartError(PoolError):
    """The workers could not be started or did not join the process group in time."""


class WorkerDied(PoolError):
    """A worker process exited while the pool was in use."""

    def __init__(self, rank: int, device: str, returncode: int | None, stderr_tail: str = "",
                 during: str = "a job") -> None:
        super().__init__(rank, device, returncode, stderr_tail, during)
        self.rank = rank
        self.device = device
        self.returncode = returncode
        self.stderr_tail = stderr_tail
        self.during = during

    def __str__(self) -> str:
        tail = self.stderr_tail.strip()
        tail = f" Last lines of its stderr:\n{tail}" if tail else " It wrote nothing to stderr."
        return (
            f"Worker rank {self.rank} on {self.device} died during {self.during} "
            f"({describe_exit(self.returncode)}). The other workers were stopped; the pool restarts "
            "on the next job. If it keeps happening, check for running out of memory (host or GPU; "
            f"the system's out-of-memory killer uses SIGKILL) or for a crash.{tail}"
        )


class JobFailed(PoolError):
    """An exception was raised inside ``Job.run`` on some rank.

    ``str(exc)`` is the remote message unchanged when the remote exception class sets
    ``user_facing = True`` (so a node can show it as is); otherwise it names the type, the rank and
    includes the remote traceback. ``errors`` holds the error of every rank that failed.
    """

    def __init__(self, exc_type: str, message: str, remote_traceback: str = "", rank: int = 0,
                 user_facing: bool = False, errors: list[dict] | None = None,
                 pool_restarted: bool = False) -> None:
        super().__init__(exc_type, message, remote_traceback, rank, user_facing, errors, pool_restarted)
        self.exc_type = exc_type
        self.message = message
        self.remote_traceback = remote_traceback
        self.rank = rank
        self.user_facing = user_facing
        self.errors = errors or []
        self.pool_restarted = pool_restarted

    @classmethod
    def from_info(cls, info: dict, errors: list[dict] | None = None,
                  pool_restarted: bool = False) -> "JobFailed":
        return cls(info["type"], info["message"], info.get("traceback", ""), info.get("rank", 0),
                   bool(info.get("user_facing")), errors, pool_restarted)

    def __str__(self) -> str:
        if self.user_facing:
            return self.message
        restart = (" The other ranks did not finish, so the workers were stopped and restart on the "
                   "next job." if self.pool_restarted else "")
        return (
            f"The job failed on worker rank {self.rank} with {self.exc_type}: {self.message}.{restart}\n"
            f"Remote traceback (rank {self.rank}):\n{self.remote_traceback.rstrip()}"
        )


class JobCancelled(PoolError):
    """The job was cancelled (Cancel in ComfyUI); nothing is returned."""


class JobTimeout(PoolError):
    """Rank 0 sent nothing (no progress, no result) for longer than the job's timeout."""


def describe_exit(returncode: int | None) -> str:
    if returncode is None:
        return "still running"
    if returncode < 0:
        import signal

        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return f"killed by {name}"
    if returncode == EXIT_CONTROLLER_GONE:
        return "exit code 3: it lost its connection to ComfyUI"
    if returncode == EXIT_START_FAILED:
        return "exit code 2: it failed to start"
    return f"exit code {returncode}"


def error_info(exc: BaseException, rank: int = 0) -> dict:
    """Plain-data description of an exception, to send instead of the exception itself."""
    return {
        "type": f"{type(exc).__module__}.{type(exc).__qualname__}".replace("builtins.", ""),
        "message": str(exc),
        "traceback": "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)),
        "user_facing": bool(getattr(type(exc), "user_facing", False)),
        "rank": rank,
    }


def to_cpu(obj: Any) -> Any:
    """Detached CPU copies of the tensors in obj (through dicts, lists and tuples)."""
    import torch

    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [to_cpu(v) for v in obj]
    if isinstance(obj, tuple) and not hasattr(obj, "_fields"):
        return tuple(to_cpu(v) for v in obj)
    return obj
