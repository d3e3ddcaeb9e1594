"""The background process group's lifecycle, in one place.

How a pool lives (read top to bottom):

* Start (lazy, on the first ``run``; idempotent): one subprocess per device, started with
  ``subprocess.Popen([sys.executable, -m, hires_parallel.parallel.runtime.worker, ...])`` in a new session
  (never fork: ComfyUI may already hold CUDA; a new session keeps Ctrl+C for ComfyUI alone), each with
  an explicit environment (see ``_rank_env``). The pack is made importable as ``hires_parallel``
  whatever folder ComfyUI loaded it from (see ``_launcher``). Each worker connects back to a control
  socket on 127.0.0.1 (authkey), says hello, joins torch.distributed (rendezvous on 127.0.0.1 and a
  free port) and says ready. A rank that exits or is late -> ``PoolStartError`` with its stderr.
* Run: the job is pickled once (classes of the pack are pickled under the name ``hires_parallel``,
  which is how workers import it) and sent to every rank. While waiting, the caller's thread
  delivers rank 0's progress events to ``on_progress``, polls ``should_cancel``, and watches every
  process. Liveness is the OS's answer (``Popen.poll`` and end-of-file on the connection), not a
  heartbeat, so a dead rank is seen within ~0.1 s whatever it was doing.
* Report: rank 0's value and every rank's stats -> ``JobResult``. An exception in the job ->
  ``JobFailed``; the pool stays warm (the model cache survives) unless some rank stayed stuck, e.g.
  in a collective with the rank that failed, or the error came from the communication backend.
* Cancel: "cancel" to every rank; the ranks raise together at their next ``ctx.check_cancel()``;
  the pool stays warm. Ranks that do not stop within ``cancel_timeout_s`` are killed.
* Die: a rank exits -> the others are killed, ``WorkerDied``; rank 0 silent for ``timeout_s`` ->
  killed, ``JobTimeout``. Either way the pool is cold and the next ``run`` starts fresh workers.
* Stop: ``shutdown()`` asks the workers to exit, then terminates and kills what is left, and checks
  that nothing remains. The registry (``get_pool`` / ``shutdown_pool``) is stopped at exit; workers
  also exit by themselves when their control connection closes, so ComfyUI dying leaves no orphan.
"""
from __future__ import annotations

import collections
import glob
import importlib
import io
import json
import operator
import os
import pickle
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import types
import uuid
from multiprocessing.connection import Connection, answer_challenge, deliver_challenge
from multiprocessing.connection import wait as wait_connections
from typing import Any, Callable

from . import host_args, leftovers
from .protocol import (
    Job,
    JobCancelled,
    JobFailed,
    JobResult,
    JobTimeout,
    PoolError,
    PoolStartError,
    WorkerDied,
    describe_exit,
    error_info,
)

__all__ = ["WorkerPool", "ProbeJob", "get_pool", "current_pool", "shutdown_pool"]

PACKAGE = "hires_parallel"
PACK_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# The name this process imported the pack under (ComfyUI uses the folder path; pip gives PACKAGE).
RUNTIME_PACKAGE = __name__.rsplit(".", 3)[0] if __name__.endswith(".parallel.runtime.pool") else PACKAGE
WORKER_MODULE = PACKAGE + ".parallel.runtime.worker"
# Set to "bootstrap" to skip the symlink and register the package from its path in the worker.
LAUNCH_ENV = "HIRES_PARALLEL_WORKER_LAUNCH"
POLL_S = 0.1
TAIL_LINES = 40

# Registers the pack as `hires_parallel` from its folder, for when a symlink cannot be made or the
# interpreter ignores PYTHONPATH (an embedded Python with a ._pth file, as in ComfyUI portable).
_BOOTSTRAP = (
    "import importlib.util, json, os, sys\n"
    "for p in reversed(json.loads(os.environ.get('HIRES_PARALLEL_SYS_PATH', '[]'))):\n"
    "    p in sys.path or sys.path.insert(0, p)\n"
    "root = os.environ['HIRES_PARALLEL_ROOT']\n"
    "spec = importlib.util.spec_from_file_location('hires_parallel', os.path.join(root, '__init__.py'),"
    " submodule_search_locations=[root])\n"
    "mod = importlib.util.module_from_spec(spec)\n"
    "sys.modules['hires_parallel'] = mod\n"
    "spec.loader.exec_module(mod)\n"
    "from hires_parallel.parallel.runtime.worker import main\n"
    "sys.exit(main())\n"
)


class ProbeJob(Job):
    """Says where and how each rank runs (also a cheap way to warm the pool up)."""

    def run(self, ctx: Any) -> Any:
        import torch
        import torch.distributed as dist

        import hires_parallel

        ranks = torch.tensor([ctx.rank], dtype=torch.int64, device=ctx.collective_device)
        if ctx.world_size > 1:
            dist.all_reduce(ranks)
        ctx.stats.update(pid=os.getpid(), device=str(ctx.device), threads=torch.get_num_threads())
        return {"pack_file": hires_parallel.__file__,
                "pack_root": os.path.realpath(os.path.dirname(hires_parallel.__file__)),
                "rank_sum": int(ranks.item()),
                "backend": ctx.backend, "world_size": ctx.world_size}


# ----------------------------------------------------------------------------------------------
# Making the pack importable in a fresh interpreter


def _inherited_paths() -> list[str]:
    """The controller's sys.path entries a fresh interpreter would not have by itself (ComfyUI's
    root, helper folders); its own stdlib and site-packages are left to the child's `site`."""
    own = {os.path.realpath(p) for p in (sys.prefix, sys.exec_prefix, sys.base_prefix, sys.base_exec_prefix)}
    out: list[str] = []
    for p in sys.path:
        if not p or not os.path.exists(p):
            continue
        p = os.path.abspath(p)
        real = os.path.realpath(p)
        if any(real == o or real.startswith(o + os.sep) for o in own) or p in out:
            continue
        out.append(p)
    return out


def _pythonpath_ignored() -> bool:
    return bool(glob.glob(os.path.join(os.path.dirname(sys.executable), "*._pth")))


def _launcher(tmpdir: str) -> tuple[list[str], dict[str, str], str]:
    """argv (without worker arguments), environment additions, and the mode's name."""
    paths = _inherited_paths()
    env = {"HIRES_PARALLEL_ROOT": PACK_ROOT, "HIRES_PARALLEL_SYS_PATH": json.dumps(paths)}
    # -P (3.11+): do not put the current directory first on sys.path, as the controller does not.
    flags = ["-P"] if sys.version_info >= (3, 11) else []
    if os.environ.get(LAUNCH_ENV) != "bootstrap" and not _pythonpath_ignored():
        link_dir = os.path.join(tmpdir, "pkg")
        try:
            os.makedirs(link_dir, exist_ok=True)
            # A folder named `hires_parallel` first on the path, whatever the pack's folder is called.
            os.symlink(PACK_ROOT, os.path.join(link_dir, PACKAGE), target_is_directory=True)
            env["PYTHONPATH"] = os.pathsep.join([link_dir] + paths)
            return [sys.executable, *flags, "-m", WORKER_MODULE], env, "symlink"
        except OSError:
            pass  # e.g. Windows without the symlink privilege
    env["PYTHONPATH"] = os.pathsep.join(paths)
    return [sys.executable, *flags, "-c", _BOOTSTRAP], env, "bootstrap"


def comfy_gpu() -> str | None:
    """The GPU ComfyUI's own models use in this process ('cuda:N'), or None (CPU, or ComfyUI not loaded)."""
    mm = sys.modules.get("comfy.model_management")
    if mm is None:
        return None
    try:
        dev = mm.get_torch_device()
    except Exception:  # noqa: BLE001 - no device to speak of
        return None
    if getattr(dev, "type", None) != "cuda":
        return None
    return f"cuda:{dev.index if dev.index is not None else 0}"


def _comfyui_root() -> str | None:
    mm = sys.modules.get("comfy.model_management")
    if mm is not None and getattr(mm, "__file__", None):
        # comfy/ has no __init__.py: locate the checkout through one of its modules.
        return os.path.dirname(os.path.dirname(os.path.abspath(mm.__file__)))
    return os.environ.get("COMFYUI_PATH") or None


# ----------------------------------------------------------------------------------------------
# Pickling across the two names of the pack


def _pack_aliases() -> set[str]:
    """Top-level names under which this pack is loaded here, other than `hires_parallel`."""
    init = os.path.realpath(os.path.join(PACK_ROOT, "__init__.py"))
    out = set()
    for name, mod in list(sys.modules.items()):
        f = getattr(mod, "__file__", None)
        if name == PACKAGE or "." in name or not f or not f.endswith("__init__.py"):
            continue
        if os.path.realpath(f) == init:
            out.add(name)
    return out


class _ModuleRef:
    def __init__(self, name: str) -> None:
        self.name = name

    def __reduce__(self) -> tuple:
        return (importlib.import_module, (self.name,))


def comfy_extras_name(module: str) -> str | None:
    """``comfy_extras.<name>`` for a module ComfyUI loaded from its comfy_extras folder under a name made
    from the file's path (as it loads every node file there), else None. Workers import it by that name."""
    if not module or all(p.isidentifier() for p in module.split(".")):
        return None
    root = _comfyui_root()
    if not root:
        return None
    folder, name = os.path.split(module)
    try:
        same = os.path.samefile(folder, os.path.join(root, "comfy_extras"))
    except OSError:
        return None
    return f"comfy_extras.{name}" if same and name.isidentifier() else None


class _PackPickler(pickle.Pickler):
    """Pickles classes and functions of the pack by the name the workers import it under, and those of
    ComfyUI's own comfy_extras node files by their importable name."""

    def __init__(self, file: io.BytesIO, aliases: set[str]) -> None:
        super().__init__(file, protocol=pickle.HIGHEST_PROTOCOL)
        self.aliases = aliases

    def reducer_override(self, obj: Any) -> Any:
        if isinstance(obj, (type, types.FunctionType)):
            top, dot, rest = (getattr(obj, "__module__", None) or "").partition(".")
            qual = getattr(obj, "__qualname__", "")
            if top in self.aliases and "<locals>" not in qual:
                return operator.attrgetter(qual), (_ModuleRef(PACKAGE + dot + rest),)
            extras = comfy_extras_name(getattr(obj, "__module__", None) or "")
            if extras and "<locals>" not in qual:
                return operator.attrgetter(qual), (_ModuleRef(extras),)
        return NotImplemented


def dumps_job(obj: Any) -> bytes:
    buf = io.BytesIO()
    _PackPickler(buf, _pack_aliases()).dump(obj)
    return buf.getvalue()


class _PackUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if RUNTIME_PACKAGE != PACKAGE and (module == PACKAGE or module.startswith(PACKAGE + ".")):
            module = RUNTIME_PACKAGE + module[len(PACKAGE):]
        return super().find_class(module, name)


def loads_result(data: bytes) -> Any:
    return _PackUnpickler(io.BytesIO(data)).load()


# ----------------------------------------------------------------------------------------------
# Processes


def _normalize_devices(devices: list[str]) -> list[str]:
    if not devices:
        raise ValueError("WorkerPool needs at least one device, e.g. ['cuda:0', 'cuda:1'] or ['cpu', 'cpu'].")
    out = []
    for d in devices:
        d = str(d).strip().lower()
        if d == "cuda":
            d = "cuda:0"
        if not (d == "cpu" or (d.startswith("cuda:") and d[5:].isdigit())):
            raise ValueError(f"Unsupported device {d!r} for the worker pool: use 'cpu' or 'cuda:N'.")
        out.append(d)
    kinds = {d.split(":")[0] for d in out}
    if len(kinds) > 1:
        raise ValueError(f"Devices {out} mix CPU and CUDA; one process group uses one kind. "
                         "Pick all 'cuda:N' or all 'cpu'.")
    cuda = [d for d in out if d != "cpu"]
    if len(set(cuda)) != len(cuda):
        raise ValueError(f"Devices {out} name the same GPU twice; NCCL needs one rank per GPU.")
    if cuda:
        import torch

        count = torch.cuda.device_count()  # no CUDA context is created for this
        missing = [d for d in cuda if int(d[5:]) >= count]
        if missing:
            raise ValueError(f"{missing} do not exist: this process sees {count} CUDA device(s) "
                             f"(cuda:0 to cuda:{count - 1}). Pick devices from that list." if count else
                             f"{missing} do not exist: this process sees no CUDA device. Use 'cpu'.")
    return out


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _set_recv_timeout(sock: socket.socket, seconds: float) -> None:
    """Kernel receive timeout (0 = none), so the authentication handshake of a stray local client
    cannot block the start; it survives handing the descriptor to a Connection."""
    if sys.platform == "win32":
        val = struct.pack("I", int(seconds * 1000))
    else:
        val = struct.pack("ll", int(seconds), int((seconds % 1) * 1e6))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, val)


def _pump_stderr(stream: Any, tail: collections.deque, prefix: str, echo: bool) -> None:
    """Keep the last lines of a worker's stderr (for WorkerDied) and show them in ComfyUI's console."""
    for raw in iter(stream.readline, b""):
        line = raw.decode("utf-8", "replace").rstrip()
        tail.append(line)
        if echo:
            try:
                sys.stderr.write(f"{prefix}{line}\n")
            except Exception:  # noqa: BLE001 - a closed console must not stop the drain
                pass
    stream.close()


def _kill(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    try:
        if sys.platform != "win32":
            os.killpg(proc.pid, signal.SIGKILL)  # its own session: take any helper children too
        else:
            proc.kill()
    except (ProcessLookupError, PermissionError):
        proc.kill()


def _poisons_group(info: dict) -> bool:
    """Errors raised by the communication backend leave the process group unusable."""
    text = f"{info.get('type', '')} {info.get('message', '')}".lower()
    return any(k in text for k in ("distbackenderror", "disterror", "gloo", "nccl"))


class _Rank:
    """One started worker: process, control connection and stderr tail."""

    def __init__(self, rank: int, device: str, proc: subprocess.Popen, echo: bool) -> None:
        self.rank = rank
        self.device = device
        self.proc = proc
        self.conn: Connection | None = None
        self.info: dict = {}
        self.tail: collections.deque = collections.deque(maxlen=TAIL_LINES)
        self.send_lock = threading.Lock()
        self.pump = threading.Thread(
            target=_pump_stderr, args=(proc.stderr, self.tail, f"[hires_parallel rank {rank}] ", echo),
            name=f"hires-parallel-stderr-{rank}", daemon=True)
        self.pump.start()

    def send(self, msg: tuple) -> None:
        assert self.conn is not None
        data = pickle.dumps(msg, protocol=pickle.HIGHEST_PROTOCOL)
        with self.send_lock:
            self.conn.send_bytes(data)

    def recv(self) -> tuple:
        assert self.conn is not None
        return pickle.loads(self.conn.recv_bytes())

    def stderr_tail(self, lines: int = 20) -> str:
        if self.proc.poll() is not None:
            self.pump.join(timeout=2.0)  # the process is dead: drain what it wrote last
        return "\n".join(list(self.tail)[-lines:])


# ----------------------------------------------------------------------------------------------


class WorkerPool:
    """A group of worker processes, one per device, that run ``Job``s together (SPMD).

    ``run`` is serialized (one job at a time); ``status`` never waits; ``shutdown`` may be called
    from another thread while a job runs (the job then fails with ``PoolError``).
    """

    def __init__(
        self,
        devices: list[str],
        threads_per_worker: int | None = None,
        collective_timeout_s: float = 120,
        start_timeout_s: float = 120,
        *,
        cancel_timeout_s: float = 30,
        failure_grace_s: float = 5,
        echo_stderr: bool = True,
    ) -> None:
        self.devices = _normalize_devices(list(devices))
        self.world_size = len(self.devices)
        self.threads = threads_per_worker or max(1, (os.cpu_count() or 1) // self.world_size)
        self.collective_timeout_s = float(collective_timeout_s)
        self.start_timeout_s = float(start_timeout_s)
        self.cancel_timeout_s = float(cancel_timeout_s)
        self.failure_grace_s = float(failure_grace_s)
        self.echo_stderr = echo_stderr
        self.comfy_args = host_args.capture()  # the workers run with the controller's ComfyUI settings
        self._lock = threading.RLock()  # serializes start / run / teardown
        self._stop = threading.Event()  # shutdown() from another thread asks a running job to stop
        self._ranks: list[_Rank] = []
        self._tmpdir: str | None = None
        self._warm = False
        self._busy = False
        self.launch_mode = ""
        self.starts = 0
        self.jobs_run = 0
        self.last_seconds: float | None = None
        self.last_stats: list[dict] = []
        self.last_error = ""

    def __repr__(self) -> str:
        return f"WorkerPool({self.devices}, warm={self.warm})"

    def __enter__(self) -> "WorkerPool":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()

    @property
    def warm(self) -> bool:
        return self._warm and all(r.proc.poll() is None for r in self._ranks)

    @property
    def pids(self) -> list[int]:
        return [r.proc.pid for r in self._ranks]

    # -- start ------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the workers unless they are already running (a dead idle worker means a restart)."""
        with self._lock:
            if self.warm:
                return
            if self._ranks:
                dead = [r for r in self._ranks if r.proc.poll() is not None]
                if dead:
                    self.last_error = str(WorkerDied(dead[0].rank, dead[0].device, dead[0].proc.returncode,
                                                     dead[0].stderr_tail(), during="idle time"))
                self._teardown(graceful=False)
            self._stop.clear()
            try:
                self._spawn_and_join()
            except BaseException as exc:
                self._teardown(graceful=False)
                self.last_error = str(exc)
                raise
            self._warm = True
            self.starts += 1

    def _rank_env(self, rank: int, launch_env: dict[str, str], control: str, authkey: bytes,
                  port: int) -> dict[str, str]:
        env = dict(os.environ)
        env.update(launch_env)
        env.update({
            "HIRES_PARALLEL_RANK": str(rank),
            "HIRES_PARALLEL_WORLD_SIZE": str(self.world_size),
            "HIRES_PARALLEL_PORT": str(port),
            "HIRES_PARALLEL_CONTROL": control,
            "HIRES_PARALLEL_AUTHKEY": authkey.hex(),
            "HIRES_PARALLEL_DEVICE": self.devices[rank],
            "HIRES_PARALLEL_THREADS": str(self.threads),
            "HIRES_PARALLEL_COLLECTIVE_TIMEOUT": str(self.collective_timeout_s),
            "PYTHONUNBUFFERED": "1",
        })
        root = _comfyui_root()
        if root:
            env["COMFYUI_PATH"] = root  # the same ComfyUI the controller runs
        env[host_args.ENV] = host_args.encode(self.comfy_args)  # ... with the same settings
        if self.devices[rank] == comfy_gpu():  # shares ComfyUI's GPU: hand it back after each job
            env["HIRES_PARALLEL_OFFLOAD_AFTER_JOB"] = "1"
        return env  # CUDA_VISIBLE_DEVICES / OMP_NUM_THREADS are set by the worker from its device

    def _spawn_and_join(self) -> None:
        leftovers.sweep()  # folders of earlier ComfyUI processes that were killed
        self._tmpdir = tempfile.mkdtemp(prefix=leftovers.owned_prefix(leftovers.POOL_PREFIX))
        argv, launch_env, self.launch_mode = _launcher(self._tmpdir)
        authkey = os.urandom(32)
        port = _free_port()
        server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            server.bind(("127.0.0.1", 0))
            server.listen(self.world_size + 4)
            control = "127.0.0.1:%d" % server.getsockname()[1]
            for rank, device in enumerate(self.devices):
                proc = subprocess.Popen(
                    argv, env=self._rank_env(rank, launch_env, control, authkey, port),
                    stdin=subprocess.DEVNULL, stderr=subprocess.PIPE, close_fds=True,
                    start_new_session=sys.platform != "win32",
                    creationflags=getattr(subprocess, "CREATE_NEW_PROCESS_GROUP", 0),
                )
                self._ranks.append(_Rank(rank, device, proc, self.echo_stderr))
            self._join(server, authkey)
        finally:
            server.close()

    def _join(self, server: socket.socket, authkey: bytes) -> None:
        """Accept every rank's control connection and wait until all joined the process group."""
        deadline = time.monotonic() + self.start_timeout_s
        ready: set[int] = set()
        while len(ready) < self.world_size:
            if self._stop.is_set():
                raise PoolStartError("The worker pool was shut down while it was starting.")
            left = deadline - time.monotonic()
            if left <= 0:
                late = [r.rank for r in self._ranks if r.rank not in ready]
                raise PoolStartError(
                    f"The HiRes Parallel workers on {self.devices} did not start within "
                    f"{self.start_timeout_s:g} s (ranks {late} not ready). The machine may be busy "
                    "(raise start_timeout_s), or the rendezvous on 127.0.0.1 is blocked. "
                    f"Last stderr of rank {late[0]}:\n{self._ranks[late[0]].stderr_tail() or '(none)'}")
            for r in self._ranks:
                rc = r.proc.poll()
                if rc is not None:
                    raise PoolStartError(
                        f"HiRes Parallel worker rank {r.rank} on {r.device} exited while starting "
                        f"({describe_exit(rc)}). Its last stderr lines:\n{r.stderr_tail() or '(none)'}\n"
                        f"Launch: {self.launch_mode}; Python {sys.executable}.")
            if select.select([server], [], [], 0)[0]:
                self._accept(server, authkey, left)
            conns = [r.conn for r in self._ranks if r.conn is not None and r.rank not in ready]
            if not conns:
                time.sleep(POLL_S)
            for conn in wait_connections(conns, timeout=POLL_S) if conns else []:
                r = next(x for x in self._ranks if x.conn is conn)
                try:
                    msg = r.recv()
                except (EOFError, OSError):
                    r.proc.wait(timeout=5)
                    continue  # the exit check above reports it with its stderr
                if msg[0] == "ready":
                    r.info = msg[2]
                    ready.add(r.rank)
                elif msg[0] == "start_error":
                    raise PoolStartError(
                        f"HiRes Parallel worker rank {r.rank} on {r.device} could not join the process "
                        f"group:\n{msg[2]}")

    def _accept(self, server: socket.socket, authkey: bytes, left: float) -> None:
        sock, _ = server.accept()
        with sock:
            sock.setblocking(True)
            _set_recv_timeout(sock, min(left, 10.0))
            conn = Connection(sock.dup().detach())  # shares the socket, and so its receive timeout
            try:
                deliver_challenge(conn, authkey)
                answer_challenge(conn, authkey)
                kind, rank, _pid = pickle.loads(conn.recv_bytes())
            except Exception:  # noqa: BLE001 - a stray local client, not one of ours: drop it
                conn.close()
                return
            _set_recv_timeout(sock, 0)
        if kind != "hello" or not (0 <= rank < self.world_size) or self._ranks[rank].conn is not None:
            conn.close()
            return
        self._ranks[rank].conn = conn

    # -- run --------------------------------------------------------------------------------

    def run(self, job: Job, on_progress: Callable[[dict], Any] | None = None,
            should_cancel: Callable[[], bool] | None = None, timeout_s: float | None = None) -> JobResult:
        """Run ``job`` on every rank; return rank 0's value. See the module docstring for failures.

        ``on_progress(event)`` and ``should_cancel()`` are called in this thread. An exception
        raised by either cancels the job on the workers and is then re-raised here.
        ``timeout_s``: longest silence (no progress, no result) allowed from rank 0; None = none.
        """
        # Duck-typed: under ComfyUI the pack may be imported under two names, so a Job subclass
        # can derive from the other copy of `Job`.
        if not callable(getattr(job, "run", None)):
            raise TypeError(f"WorkerPool.run needs a Job (an object with run(ctx)), got {type(job).__name__}")
        with self._lock:
            if self._busy:  # the lock is re-entrant: only a callback of this very run gets here
                raise PoolError("WorkerPool.run was called from inside a running job's callback.")
            t0 = time.perf_counter()
            self._busy = True
            try:
                self.start()
                job.job_id = uuid.uuid4().hex
                try:
                    blob = dumps_job(job)
                except Exception as exc:
                    raise PoolError(
                        f"{type(job).__name__} cannot be sent to the workers: pickling it failed "
                        f"({type(exc).__name__}: {exc}). Everything a job holds must be picklable "
                        "and defined in an importable module.") from exc
                value, stats = self._drive(job.job_id, blob, on_progress, should_cancel, timeout_s)
                self.jobs_run += 1
                self.last_stats = stats
                self.last_error = ""
                return JobResult(value, stats, time.perf_counter() - t0, job.job_id)
            except BaseException as exc:
                self.last_error = f"{type(exc).__name__}: {exc}"
                raise
            finally:
                self.last_seconds = time.perf_counter() - t0
                self._busy = False

    def _drive(self, job_id: str, blob: bytes, on_progress: Callable[[dict], Any] | None,
               should_cancel: Callable[[], bool] | None, timeout_s: float | None) -> tuple[Any, list[dict]]:
        ranks = self._ranks
        for r in ranks:
            try:
                r.send(("job", job_id, blob))
            except OSError:
                pass  # a dead rank is reported by the liveness check below
        pending = set(range(self.world_size))
        stats: list[dict] = [{} for _ in ranks]
        value: Any = None
        errors: list[dict] = []
        cancelled: set[int] = set()
        interrupt: BaseException | None = None  # raised by on_progress / should_cancel
        cancel_deadline: float | None = None
        error_deadline: float | None = None
        last_rank0 = last_poll = time.monotonic()

        def request_cancel() -> None:
            nonlocal cancel_deadline
            if cancel_deadline is None:
                cancel_deadline = time.monotonic() + self.cancel_timeout_s
                for x in ranks:
                    try:
                        x.send(("cancel", job_id))
                    except OSError:
                        pass

        while pending:
            if self._stop.is_set():
                self._teardown(graceful=False)
                raise PoolError("The worker pool was shut down while a job was running.")
            for conn in wait_connections([ranks[i].conn for i in pending], timeout=POLL_S):
                r = next(x for x in ranks if x.conn is conn)
                try:
                    msg = r.recv()
                except (EOFError, OSError):
                    try:
                        r.proc.wait(timeout=2)
                    except subprocess.TimeoutExpired:
                        _kill(r.proc)  # connection lost but process alive: unusable either way
                        r.proc.wait(timeout=5)
                    break  # the liveness check below raises WorkerDied
                kind, jid = msg[0], msg[1]
                if jid != job_id:
                    continue
                if kind == "progress":
                    last_rank0 = time.monotonic()
                    if on_progress is not None and interrupt is None:
                        try:
                            on_progress(msg[2])
                        except BaseException as exc:  # noqa: BLE001 - re-raised after the cancel
                            interrupt = exc
                            request_cancel()
                    continue
                pending.discard(r.rank)
                stats[r.rank] = msg[-1]
                if r.rank == 0:
                    last_rank0 = time.monotonic()
                if kind == "done" and r.rank == 0:
                    try:
                        value = loads_result(msg[2])
                    except Exception as exc:  # noqa: BLE001
                        errors.append(error_info(exc, 0))
                elif kind == "cancelled":
                    cancelled.add(r.rank)
                elif kind == "error":
                    errors.append(msg[2])
                if errors and error_deadline is None:
                    error_deadline = time.monotonic() + self.failure_grace_s

            for r in ranks:
                rc = r.proc.poll()
                if rc is not None:
                    self._teardown(graceful=False)
                    raise WorkerDied(r.rank, r.device, rc, r.stderr_tail())

            now = time.monotonic()
            if should_cancel is not None and cancel_deadline is None and now - last_poll >= POLL_S:
                last_poll = now
                try:
                    if should_cancel():
                        request_cancel()
                except BaseException as exc:  # noqa: BLE001
                    interrupt = exc
                    request_cancel()
            if not pending:
                break
            if cancel_deadline is not None and now > cancel_deadline:
                self._teardown(graceful=False)
                if interrupt is not None:
                    raise interrupt
                raise JobCancelled(
                    f"The job was cancelled, but ranks {sorted(pending)} did not stop within "
                    f"{self.cancel_timeout_s:g} s (a job must call ctx.check_cancel() regularly), so the "
                    "workers were stopped; the pool restarts on the next job.")
            if error_deadline is not None and now > error_deadline:
                # The failed rank left the others waiting (in a collective, most likely).
                self._teardown(graceful=False)
                raise JobFailed.from_info(self._primary(errors), errors, pool_restarted=True)
            if timeout_s is not None and 0 in pending and cancel_deadline is None and now - last_rank0 > timeout_s:
                self._teardown(graceful=False)
                raise JobTimeout(
                    f"Worker rank 0 sent nothing (no progress, no result) for {timeout_s:g} s, so the job "
                    "was stopped and the workers killed; the pool restarts on the next job. If a step "
                    "can legitimately take that long, raise the timeout.")

        if errors:
            poisoned = any(_poisons_group(e) for e in errors)
            if poisoned:
                self._teardown(graceful=False)
            raise JobFailed.from_info(self._primary(errors), errors, pool_restarted=poisoned)
        if interrupt is not None:
            raise interrupt
        if cancel_deadline is not None or cancelled:
            raise JobCancelled("The job was cancelled; the workers stopped together and stay ready "
                               "for the next job.")
        return value, stats

    @staticmethod
    def _primary(errors: list[dict]) -> dict:
        """The error to show: one meant for the user, else the first that arrived (the cause;
        later ones are usually peers failing because of it)."""
        for e in errors:
            if e.get("user_facing"):
                return e
        return errors[0]

    # -- stop -------------------------------------------------------------------------------

    def shutdown(self, timeout: float = 10) -> None:
        """Stop the workers: ask, then terminate, then kill; remove the temp dir; check none remain."""
        self._stop.set()
        got = self._lock.acquire(timeout=timeout)  # a running job sees _stop within POLL_S
        try:
            self._teardown(graceful=True, timeout=timeout)
        finally:
            self._stop.clear()
            if got:
                self._lock.release()

    def _teardown(self, graceful: bool, timeout: float = 10) -> None:
        ranks, self._ranks, self._warm = self._ranks, [], False
        if graceful:
            for r in ranks:
                if r.conn is not None and r.proc.poll() is None:
                    try:
                        r.send(("shutdown",))
                    except OSError:
                        pass
            deadline = time.monotonic() + timeout
            for r in ranks:
                try:
                    r.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    r.proc.terminate()
        for r in ranks:
            try:
                r.proc.wait(timeout=2 if graceful else 0.01)
            except subprocess.TimeoutExpired:
                _kill(r.proc)
        left = []
        for r in ranks:
            try:
                r.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                left.append(r.proc.pid)
            if r.conn is not None:
                r.conn.close()
            r.pump.join(timeout=2)
        if self._tmpdir:
            shutil.rmtree(self._tmpdir, ignore_errors=True)
            self._tmpdir = None
        if left:
            raise PoolError(f"HiRes Parallel worker processes {left} could not be stopped; end them by pid.")

    # -- status -----------------------------------------------------------------------------

    def status(self) -> dict:
        """A snapshot for UIs and logs; never waits for a running job."""
        ranks = list(self._ranks)
        return {
            "devices": list(self.devices),
            "world_size": self.world_size,
            "threads_per_worker": self.threads,
            "pids": [r.proc.pid for r in ranks],
            "alive": [r.proc.poll() is None for r in ranks],
            "warm": self.warm,
            "busy": self._busy,
            "backend": ranks[0].info.get("backend") if ranks else None,
            "launch": self.launch_mode,
            "starts": self.starts,
            "jobs_run": self.jobs_run,
            "last_job_seconds": self.last_seconds,
            "last_job_stats": self.last_stats,
            "last_error": self.last_error,
        }


# ----------------------------------------------------------------------------------------------
# The process-wide pool (ComfyUI's executor thread and server routes share it)

_registry_lock = threading.Lock()
_pool: WorkerPool | None = None
_pool_key: tuple | None = None


def get_pool(devices: list[str], threads_per_worker: int | None = None, **options: Any) -> WorkerPool:
    """The pool for these devices and options: the current one when they match, else a new one
    (the old one is shut down first, stopping a job it runs, since two groups would compete for
    the same devices). Options are WorkerPool's keyword arguments."""
    global _pool, _pool_key
    # A change of ComfyUI settings needs new workers: they apply them when they import ComfyUI.
    key = (tuple(_normalize_devices(list(devices))), threads_per_worker, tuple(sorted(options.items())),
           host_args.fingerprint(host_args.capture()))
    with _registry_lock:
        if _pool is not None and _pool_key == key:
            return _pool
        old, _pool, _pool_key = _pool, None, None
        if old is not None:
            old.shutdown()
        _pool, _pool_key = WorkerPool(list(devices), threads_per_worker, **options), key
        return _pool


def current_pool() -> WorkerPool | None:
    return _pool


def shutdown_pool(timeout: float = 10) -> None:
    global _pool, _pool_key
    with _registry_lock:
        old, _pool, _pool_key = _pool, None, None
    if old is not None:
        old.shutdown(timeout)


leftovers.on_exit(shutdown_pool)  # at exit and on SIGTERM / SIGHUP: workers stopped, pool folder removed
