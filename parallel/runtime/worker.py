"""One rank of the background process group: ``python -m hires_parallel.parallel.runtime.worker``.

Started by ``pool.WorkerPool`` with subprocess.Popen (never fork: the controller may hold CUDA).
Life of a worker:
  1. read its settings (arguments, else HIRES_PARALLEL_* environment), set the per-rank
     environment (CUDA_VISIBLE_DEVICES so its GPU is cuda:0, OMP/MKL threads), only then import torch;
  2. connect to the controller (multiprocessing.connection.Client, authkey from the environment)
     and send ("hello", rank, pid);
  3. join torch.distributed (nccl for cuda, gloo otherwise) on tcp://127.0.0.1:port with a timeout
     on every collective, send ("ready", rank, info);
  4. loop: receive a job, run it, send its result or error (see protocol.py);
     a control thread reads the connection meanwhile: "cancel" sets the flag ``check_cancel`` reduces,
     "shutdown" stops the loop, and end-of-file (ComfyUI died) exits at once, so no orphan remains.
The authkey is read from HIRES_PARALLEL_AUTHKEY (hex) only, so it never shows in a process list.
"""
from __future__ import annotations

import argparse
import os
import pickle
import queue
import sys
import threading
import time
from typing import Any

from .protocol import (
    EXIT_CONTROLLER_GONE,
    EXIT_START_FAILED,
    JobCancelled,
    WorkerContext,
    error_info,
    to_cpu,
)

ENV = "HIRES_PARALLEL_"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    env = os.environ.get
    p = argparse.ArgumentParser(prog="python -m hires_parallel.parallel.runtime.worker",
                                description="One rank of the HiRes Parallel process group.")
    p.add_argument("--rank", type=int, default=int(env(ENV + "RANK", "0")))
    p.add_argument("--world-size", type=int, default=int(env(ENV + "WORLD_SIZE", "1")))
    p.add_argument("--port", type=int, default=int(env(ENV + "PORT", "0")),
                   help="torch.distributed rendezvous port on 127.0.0.1")
    p.add_argument("--control", default=env(ENV + "CONTROL", ""), help="controller address host:port")
    p.add_argument("--device", default=env(ENV + "DEVICE", "cpu"), help="cpu or cuda:N (the controller's index)")
    p.add_argument("--threads", type=int, default=int(env(ENV + "THREADS", "0")), help="0 = torch default")
    p.add_argument("--collective-timeout", type=float, default=float(env(ENV + "COLLECTIVE_TIMEOUT", "120")))
    args = p.parse_args(argv)
    if not args.control or not args.port:
        p.error("--control and --port (or HIRES_PARALLEL_CONTROL / HIRES_PARALLEL_PORT) are required; "
                "workers are started by hires_parallel.parallel.runtime.pool.WorkerPool")
    return args


def set_rank_environment(device: str, threads: int) -> str:
    """Set what must be decided before torch is imported; return the device this process uses."""
    if device.startswith("cuda"):
        index = int(device.split(":", 1)[1]) if ":" in device else 0
        # `cuda:N` is counted in the controller's view, which CUDA_VISIBLE_DEVICES may already narrow.
        visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
        if "CUDA_VISIBLE_DEVICES" in os.environ and index >= len(visible):
            raise ValueError(f"{device} is not among CUDA_VISIBLE_DEVICES={os.environ['CUDA_VISIBLE_DEVICES']!r}")
        os.environ["CUDA_VISIBLE_DEVICES"] = visible[index] if visible else str(index)
        local = "cuda:0"
    else:
        # A CPU rank should not create CUDA contexts on the user's GPUs.
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
        local = "cpu"
    if threads > 0:
        os.environ["OMP_NUM_THREADS"] = str(threads)
        os.environ["MKL_NUM_THREADS"] = str(threads)
    if sys.platform.startswith("linux"):
        # gloo resolves the hostname to pick an interface; that can be unroutable. Stay on loopback,
        # and so does NCCL's bootstrap (one machine: nothing needs another interface).
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
        os.environ.setdefault("NCCL_SOCKET_IFNAME", "lo")
    elif sys.platform == "darwin":
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo0")
    return local


def choose_backend(device_type: str) -> str:
    """nccl for GPUs where this torch has it; gloo otherwise (CPU ranks, Windows, ROCm builds without
    NCCL). gloo cannot move CUDA tensors, so a GPU rank on gloo stages exchanges through host memory."""
    import torch.distributed as dist

    return "nccl" if device_type == "cuda" and dist.is_nccl_available() else "gloo"


def loopback_store(rank: int, world_size: int, port: int, timeout: Any) -> Any:
    """The rendezvous store, listening on 127.0.0.1 only.

    torch's own tcp:// rendezvous makes rank 0 listen on every interface ([::]:port) even when the
    address names 127.0.0.1, so another machine on the network could talk to the store of a warm pool.
    Rank 0 binds the socket itself and hands it to the store (master_listen_fd, libuv backend).
    """
    import socket

    import torch.distributed as dist

    if rank != 0:
        return dist.TCPStore("127.0.0.1", port, world_size, False, timeout)
    if sys.platform == "win32":  # no listen-fd hand-over there; the store listens where torch puts it
        return dist.TCPStore("127.0.0.1", port, world_size, True, timeout, wait_for_workers=False)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    sock.listen(max(128, world_size))
    store = dist.TCPStore("127.0.0.1", port, world_size, True, timeout, wait_for_workers=False,
                          master_listen_fd=sock.detach(), use_libuv=True)
    return store


def release_device_memory(device: Any) -> None:
    """After a job: give the allocator's cached GPU blocks back, so ComfyUI's own next model (the VAE
    decode, a plain KSampler) finds the memory free. The rank that shares ComfyUI's GPU also moves its
    model off the GPU (HIRES_PARALLEL_OFFLOAD_AFTER_JOB=1, set by the pool for that rank)."""
    if getattr(device, "type", "cpu") != "cuda" or "comfy.model_management" not in sys.modules:
        return
    import comfy.model_management as mm

    if os.environ.get(ENV + "OFFLOAD_AFTER_JOB") == "1":
        mm.unload_all_models()
    mm.soft_empty_cache(True)


class _Control:
    """Reads the control connection in a thread while the main thread runs jobs."""

    def __init__(self, conn: Any) -> None:
        self.conn = conn
        self.jobs: "queue.Queue[tuple | None]" = queue.Queue()
        self.cancel = threading.Event()
        self.latest_job = ""
        self._send_lock = threading.Lock()

    def send(self, msg: tuple) -> None:
        data = pickle.dumps(msg, protocol=pickle.HIGHEST_PROTOCOL)
        with self._send_lock:
            self.conn.send_bytes(data)

    def loop(self) -> None:
        while True:
            try:
                msg = pickle.loads(self.conn.recv_bytes())
            except (EOFError, OSError):
                # The controller (ComfyUI) is gone: exit now, even from inside a collective.
                os._exit(EXIT_CONTROLLER_GONE)
            kind = msg[0]
            if kind == "job":
                # Messages are ordered: a cancel for this id can only follow this job message.
                self.latest_job = msg[1]
                self.cancel.clear()
                self.jobs.put(msg)
            elif kind == "cancel":
                if msg[1] == self.latest_job:
                    self.cancel.set()
            elif kind == "shutdown":
                self.cancel.set()  # a running job stops at its next check_cancel
                self.jobs.put(None)
                return


def _prepare_comfy(device: Any) -> None:
    """Put the controller's ComfyUI on sys.path, with the controller's settings (host_args) and this rank's
    device choice, before a job is unpickled (jobs carry ComfyUI objects, and comfy.model_management picks
    devices, dtypes and the attention function when first imported)."""
    root = os.environ.get("COMFYUI_PATH")
    if "comfy.model_management" in sys.modules or not root:
        return
    from ...comfy_host import ensure_comfy
    from .host_args import ENV as ARGS_ENV
    from .host_args import apply, decode

    if root not in sys.path:
        sys.path.insert(0, root)  # the controller's ComfyUI, whichever checkout this pack sits in
    device_type = getattr(device, "type", str(device))
    changed = apply(decode(os.environ.get(ARGS_ENV, "")), device_type)
    if changed:
        sys.stderr.write(f"ComfyUI settings from the controller: {', '.join(changed)}\n")
    ensure_comfy(cpu=device_type == "cpu", root=root)


def _run_one(control: _Control, msg: tuple, rank: int, world: int, device: Any, backend: str,
             cache: dict) -> None:
    _, job_id, blob = msg
    ctx = WorkerContext(rank, world, device, backend, cache, job_id=job_id, send=control.send,
                        cancel_event=control.cancel)
    try:
        _prepare_comfy(device)
        job = pickle.loads(blob)
        job.job_id = job_id
        value = job.run(ctx)
        payload = None
        if rank == 0:
            try:
                payload = pickle.dumps(to_cpu(value), protocol=pickle.HIGHEST_PROTOCOL)
            except Exception as exc:
                raise TypeError(f"the result of {type(job).__name__} cannot be pickled: {exc}") from exc
        control.send(("done", job_id, payload, _plain(ctx.stats)))
    except JobCancelled:
        control.send(("cancelled", job_id, _plain(ctx.stats)))
    except BaseException as exc:  # noqa: BLE001 - SystemExit in a job must not end the worker
        control.send(("error", job_id, error_info(exc, rank), _plain(ctx.stats)))


def _plain(stats: dict) -> dict:
    """Stats must reach the controller even if a job put something unpicklable in them."""
    try:
        pickle.dumps(to_cpu(stats))
        return to_cpu(stats)
    except Exception as exc:  # noqa: BLE001
        return {"_unpicklable_stats": repr(exc)}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import signal

    # Ctrl+C in ComfyUI's terminal is for ComfyUI; the worker stops when ComfyUI tells it or dies.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    local_device = set_rank_environment(args.device, args.threads)
    from multiprocessing.connection import Client

    host, port = args.control.rsplit(":", 1)
    authkey = bytes.fromhex(os.environ.pop(ENV + "AUTHKEY", ""))
    conn = Client((host, int(port)), authkey=authkey)
    control = _Control(conn)
    control.send(("hello", args.rank, os.getpid()))
    # Read the connection from now on, so that ComfyUI dying even during the rendezvous ends us.
    threading.Thread(target=control.loop, name="hires-parallel-control", daemon=True).start()
    try:
        import datetime

        import torch
        import torch.distributed as dist

        if args.threads > 0:
            torch.set_num_threads(args.threads)
        device = torch.device(local_device)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        backend = choose_backend(device.type)
        t0 = time.perf_counter()
        timeout = datetime.timedelta(seconds=args.collective_timeout)
        dist.init_process_group(backend, store=loopback_store(args.rank, args.world_size, args.port, timeout),
                                rank=args.rank, world_size=args.world_size, timeout=timeout)
        if device.type == "cuda" and backend != "nccl":
            from ..split.comm import set_host_staging

            set_host_staging(True)  # gloo moves host tensors only: exchanges go through host memory
        info = {
            "pid": os.getpid(),
            "backend": backend,
            "device": str(device),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "init_seconds": time.perf_counter() - t0,
            "host_staging": device.type == "cuda" and backend != "nccl",
        }
    except BaseException as exc:  # noqa: BLE001
        control.send(("start_error", args.rank, error_info(exc, args.rank)["traceback"]))
        return EXIT_START_FAILED
    control.send(("ready", args.rank, info))

    cache: dict = {}  # models and anything else jobs keep between jobs in this process
    while True:
        msg = control.jobs.get()
        if msg is None:
            break
        _run_one(control, msg, args.rank, args.world_size, device, backend, cache)
        release_device_memory(device)
    try:
        dist.destroy_process_group()
    finally:
        conn.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
