"""A real ComfyUI server for tests: started as a subprocess (``main.py --cpu``), driven over HTTP.

    with ComfyServer({"ComfyUI-HiRes-Parallel": REPO}) as server:
        info = server.object_info()
        history = server.run(prompt, timeout=300)
        files = server.output_files(history)

Each server gets a fresh temporary base directory (custom_nodes/, input/, output/, temp/, user/,
its own SQLite database and log file); custom node packs are symlinked into custom_nodes/ under the
given folder names, so ComfyUI imports them by path exactly as a user's install would. The server
runs in its own process session; ``stop()`` ends the whole process group and checks that nothing of
it is left. ``stop()`` runs on leaving the ``with`` block and, as a last resort, at interpreter exit.
"""
from __future__ import annotations

import asyncio
import atexit
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Iterable

import requests

LOOPBACK = "127.0.0.1"
STARTUP_TIMEOUT = 120.0
STOP_GRACE = 10.0

_LIVE: "set[ComfyServer]" = set()


def comfyui_path() -> str:
    """The ComfyUI checkout: $COMFYUI_PATH, else hires_parallel.comfy_host.find_comfyui()."""
    from hires_parallel.comfy_host import HOW_TO, find_comfyui

    env = os.environ.get("COMFYUI_PATH")
    root = env if env else find_comfyui()
    if not root or not os.path.isfile(os.path.join(root, "main.py")):
        raise RuntimeError(HOW_TO + (f" (COMFYUI_PATH={env!r} has no main.py)" if env else ""))
    return os.path.abspath(root)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def _group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes in process group ``pgid``."""
    proc = Path("/proc")
    if not proc.is_dir():  # not Linux: fall back to a signal-0 probe
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return []
        except PermissionError:
            pass
        return [pgid]
    members = []
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # "pid (comm) state ppid pgrp ..."; comm may contain spaces and parentheses
        fields = stat[stat.rfind(")") + 2:].split()
        if len(fields) >= 3 and int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
            members.append(int(entry.name))
    return members


def _stop_all_at_exit() -> None:
    for server in list(_LIVE):
        try:
            server.stop()
        except Exception as e:  # noqa: BLE001  (interpreter is exiting; report and go on)
            print(f"ComfyServer atexit: {e}", file=sys.stderr)


atexit.register(_stop_all_at_exit)


class PromptFailed(AssertionError):
    """A prompt ended in status "error" (execution error or interruption)."""

    def __init__(self, message: str, history: dict):
        super().__init__(message)
        self.history = history

    @property
    def interrupted(self) -> bool:
        return any(m[0] == "execution_interrupted" for m in self.history.get("status", {}).get("messages", []))


def _default_signals() -> None:
    """The server gets the signals' default meaning (Ctrl+C, SIGTERM), whatever the test run inherited: a
    shell's background job ignores SIGINT, nohup ignores SIGHUP."""
    for name in ("SIGTERM", "SIGINT", "SIGHUP"):
        signal.signal(getattr(signal, name), signal.SIG_DFL)


class ComfyServer:
    """One ComfyUI server process on a free loopback port with its own base directory."""

    def __init__(
        self,
        custom_nodes: dict[str, str | os.PathLike] | None = None,
        *,
        comfyui: str | None = None,
        extra_args: Iterable[str] = (),
        python: str | None = None,
        startup_timeout: float = STARTUP_TIMEOUT,
        keep_dir: bool | None = None,
        listen_ws: bool = True,
    ):
        self.custom_nodes = {name: Path(src) for name, src in (custom_nodes or {}).items()}
        self._comfyui = comfyui
        self.extra_args = list(extra_args)
        self.python = python or os.environ.get("COMFYUI_PYTHON") or sys.executable
        self.startup_timeout = startup_timeout
        self.keep_dir = bool(os.environ.get("HIRES_KEEP_SERVER_DIR")) if keep_dir is None else keep_dir
        self.listen_ws = listen_ws
        self.client_id = uuid.uuid4().hex
        self.base_dir: Path | None = None
        self.command_line: list[str] = []
        self.port: int | None = None
        self.proc: subprocess.Popen | None = None
        self._log_file = None
        self._final_log: str | None = None
        self._session = requests.Session()
        self._session.trust_env = False  # loopback only: never route through a proxy
        self._ws_thread: threading.Thread | None = None
        self._ws_loop: asyncio.AbstractEventLoop | None = None
        self._ws_ready = threading.Event()
        self._ws_messages: list[dict] = []
        self._ws_lock = threading.Lock()

    # ------------------------------------------------------------------ lifecycle

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    @property
    def log_path(self) -> Path:
        assert self.base_dir is not None, "server not started"
        return self.base_dir / "comfyui.log"

    @property
    def output_dir(self) -> Path:
        assert self.base_dir is not None, "server not started"
        return self.base_dir / "output"

    @property
    def input_dir(self) -> Path:
        assert self.base_dir is not None, "server not started"
        return self.base_dir / "input"

    def command(self) -> list[str]:
        assert self.base_dir is not None and self.port is not None
        root = self.comfyui
        return [
            self.python, os.path.join(root, "main.py"),
            "--cpu",
            "--listen", LOOPBACK,
            "--port", str(self.port),
            "--base-directory", str(self.base_dir),
            "--disable-auto-launch",
            # The default database lives in the ComfyUI checkout; keep ours in the temp folder.
            "--database-url", f"sqlite:///{self.base_dir / 'user' / 'comfyui.db'}",
            *self.extra_args,
        ]

    @property
    def comfyui(self) -> str:
        if self._comfyui is None:
            self._comfyui = comfyui_path()
        return self._comfyui

    def start(self) -> "ComfyServer":
        if self.proc is not None:
            raise RuntimeError("server already started")
        root = self.comfyui
        for name, src in self.custom_nodes.items():
            if not src.is_dir():
                raise FileNotFoundError(f"custom node folder {name!r}: {src} is not a directory")
        self.base_dir = Path(tempfile.mkdtemp(prefix="hires-comfy-"))
        for sub in ("custom_nodes", "input", "output", "temp", "user"):
            (self.base_dir / sub).mkdir()
        for name, src in self.custom_nodes.items():
            (self.base_dir / "custom_nodes" / name).symlink_to(src.resolve(), target_is_directory=True)
        self.port = free_port()
        env = dict(os.environ)
        env["PYTHONUNBUFFERED"] = "1"
        env.setdefault("PYTHONIOENCODING", "utf-8")
        for var in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
            env.pop(var, None)
        env["NO_PROXY"] = env["no_proxy"] = "*"
        self._log_file = open(self.log_path, "wb")
        self.command_line = self.command()
        self.proc = subprocess.Popen(
            self.command_line,
            cwd=root,
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
            preexec_fn=_default_signals if os.name == "posix" else None,
        )
        _LIVE.add(self)
        try:
            self._wait_ready()
            if self.listen_ws:
                self._start_ws()
        except BaseException as e:
            if not isinstance(e, Exception):  # KeyboardInterrupt etc.: clean up, let it through
                self.stop()
                raise
            state = self._describe_exit()
            time.sleep(0.2)  # let the last lines reach the log
            tail = self.log_tail(80)
            self.stop()
            raise RuntimeError(
                f"ComfyUI server did not start: {e} ({state}); command: {' '.join(self.command_line)}"
                f"\n--- log tail ---\n{tail}"
            ) from None
        return self

    def _describe_exit(self) -> str:
        if self.proc is None:
            return "no process"
        rc = self.proc.poll()
        return "still running" if rc is None else f"exit code {rc}"

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        while True:
            rc = self.proc.poll()
            if rc is not None:
                raise RuntimeError(f"server exited during startup with code {rc}")
            try:
                r = self._session.get(self.url + "/system_stats", timeout=2)
                if r.status_code == 200:
                    return
            except requests.RequestException:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"no answer from {self.url}/system_stats after {self.startup_timeout:.0f} s")
            time.sleep(0.25)

    def stop(self) -> None:
        """End the server's whole process group (SIGTERM, SIGKILL after 10 s); check none is left."""
        proc = self.proc
        left: list[int] = []
        if proc is not None:
            pgid = proc.pid  # start_new_session: the server leads its own group
            self._stop_ws()
            try:
                os.killpg(pgid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                proc.wait(timeout=STOP_GRACE)
            except subprocess.TimeoutExpired:
                pass
            deadline = time.monotonic() + STOP_GRACE
            while _group_members(pgid) and time.monotonic() < deadline:
                time.sleep(0.1)
            if _group_members(pgid) or proc.poll() is None:
                try:
                    os.killpg(pgid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                try:
                    proc.wait(timeout=STOP_GRACE)
                except subprocess.TimeoutExpired:
                    pass
                deadline = time.monotonic() + 5
                while _group_members(pgid) and time.monotonic() < deadline:
                    time.sleep(0.1)
            left = _group_members(pgid)
            self.proc = None
        _LIVE.discard(self)
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        if self.base_dir is not None and self._final_log is None:
            try:
                self._final_log = self.log_path.read_text(errors="replace")
            except OSError:
                self._final_log = ""
        if self.base_dir is not None and not self.keep_dir:
            shutil.rmtree(self.base_dir, ignore_errors=True)
        self._session.close()
        if left:
            raise RuntimeError(f"ComfyUI server processes still alive after SIGKILL: {left}")

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def __enter__(self) -> "ComfyServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ------------------------------------------------------------------ log

    def log_text(self) -> str:
        if self._final_log is not None:
            return self._final_log
        if self.base_dir is None:
            return ""
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, n: int = 60) -> str:
        return "\n".join(self.log_text().splitlines()[-n:])

    # ------------------------------------------------------------------ HTTP

    def get(self, path: str, **kw) -> requests.Response:
        kw.setdefault("timeout", 60)
        return self._session.get(self.url + path, **kw)

    def post(self, path: str, payload: Any = None, **kw) -> requests.Response:
        kw.setdefault("timeout", 60)
        return self._session.post(self.url + path, json=payload, **kw)

    def object_info(self) -> dict:
        r = self.get("/object_info")
        r.raise_for_status()
        return r.json()

    def queue(self, prompt: dict, extra_data: dict | None = None) -> str:
        """POST /prompt; return the prompt id. A rejected prompt raises AssertionError with the
        server's error and node_errors spelled out."""
        payload = {"prompt": prompt, "client_id": self.client_id}
        if extra_data:
            payload["extra_data"] = extra_data
        r = self.post("/prompt", payload)
        if r.status_code == 400:
            raise AssertionError(self._format_rejection(r, prompt))
        r.raise_for_status()
        return r.json()["prompt_id"]

    @staticmethod
    def _format_rejection(r: requests.Response, prompt: dict) -> str:
        try:
            body = r.json()
        except ValueError:
            return f"server rejected the prompt (HTTP 400): {r.text[:2000]}"
        err = body.get("error") or {}
        node_errors = body.get("node_errors") or {}
        lines = [f"server rejected the prompt (HTTP 400): {err.get('message', '')}"
                 + (f": {err['details']}" if err.get("details") else "")]
        for nid, ne in node_errors.items():
            ctype = ne.get("class_type") or (prompt.get(nid) or {}).get("class_type")
            for e in ne.get("errors", []):
                lines.append(f"  node {nid} ({ctype}): {e.get('message', '')}: {e.get('details', '')}")
        lines.append("node_errors = " + json.dumps(node_errors, indent=2, default=str))
        return "\n".join(lines)

    def history(self, prompt_id: str) -> dict | None:
        r = self.get(f"/history/{prompt_id}")
        r.raise_for_status()
        return r.json().get(prompt_id)

    def wait(self, prompt_id: str, timeout: float = 600, raise_on_error: bool = True) -> dict:
        """Poll /history/<id> until the prompt is done; return its history entry.

        A prompt that ended in error (or was interrupted) raises PromptFailed with the exception,
        the node, the traceback and the server log tail, unless ``raise_on_error`` is False.
        """
        deadline = time.monotonic() + timeout
        delay = 0.05
        while True:
            entry = self.history(prompt_id)
            if entry is not None and (entry.get("status") or {}).get("status_str") in ("success", "error"):
                if raise_on_error and entry["status"]["status_str"] == "error":
                    raise PromptFailed(self._format_failure(prompt_id, entry), entry)
                return entry
            if not self.running:
                raise RuntimeError(f"ComfyUI server died while running prompt {prompt_id} "
                                   f"({self._describe_exit()})\n--- log tail ---\n{self.log_tail(80)}")
            if time.monotonic() > deadline:
                queue = self.get("/queue").json()
                raise TimeoutError(
                    f"prompt {prompt_id} not done after {timeout:.0f} s; queue: running "
                    f"{len(queue.get('queue_running', []))}, pending {len(queue.get('queue_pending', []))}"
                    f"\n--- log tail ---\n{self.log_tail(60)}"
                )
            time.sleep(delay)
            delay = min(delay * 1.5, 0.5)

    def _format_failure(self, prompt_id: str, entry: dict) -> str:
        lines = [f"prompt {prompt_id} failed"]
        for event, data in (entry.get("status") or {}).get("messages", []):
            if event == "execution_error":
                lines.append(
                    f"{data.get('exception_type')}: {data.get('exception_message')}"
                    f" (node {data.get('node_id')}, {data.get('node_type')})"
                )
                tb = data.get("traceback") or []
                lines.append("".join(tb).rstrip())
            elif event == "execution_interrupted":
                lines.append(f"interrupted at node {data.get('node_id')} ({data.get('node_type')})")
        lines.append("--- server log tail ---")
        lines.append(self.log_tail(25))
        return "\n".join(lines)

    def run(self, prompt: dict, timeout: float = 600) -> dict:
        """Queue ``prompt`` and wait for it; return its history entry."""
        return self.wait(self.queue(prompt), timeout=timeout)

    def interrupt(self, prompt_id: str | None = None) -> None:
        r = self.post("/interrupt", {"prompt_id": prompt_id} if prompt_id else {})
        r.raise_for_status()

    def clear_queue(self) -> None:
        self.post("/queue", {"clear": True}).raise_for_status()

    def output_files(self, history: dict, kinds: Iterable[str] = ("output",)) -> list[Path]:
        """Files a prompt's output nodes wrote (images, latents, ...), as paths under the base dir.

        ``kinds`` selects the folder type each file record names: "output" (default), "temp", "input".
        """
        assert self.base_dir is not None, "server not started"
        kinds = set(kinds)
        paths: list[Path] = []
        for node_out in (history.get("outputs") or {}).values():
            for items in node_out.values():
                if not isinstance(items, list):
                    continue
                for item in items:
                    if not (isinstance(item, dict) and "filename" in item):
                        continue
                    kind = item.get("type", "output")
                    if kind not in kinds:
                        continue
                    p = self.base_dir / kind / (item.get("subfolder") or "") / item["filename"]
                    paths.append(p)
        return paths

    # ------------------------------------------------------------------ websocket (/ws)

    def _start_ws(self) -> None:
        try:
            import aiohttp  # noqa: F401  (a ComfyUI requirement)
        except ImportError:
            return
        self._ws_ready.clear()
        self._ws_thread = threading.Thread(target=self._ws_main, name="comfy-ws", daemon=True)
        self._ws_thread.start()
        if not self._ws_ready.wait(30):
            raise TimeoutError("could not connect to the server's /ws")

    def _ws_main(self) -> None:
        import aiohttp

        loop = asyncio.new_event_loop()
        self._ws_loop = loop

        async def listen():
            url = f"ws://{LOOPBACK}:{self.port}/ws?clientId={self.client_id}"
            async with aiohttp.ClientSession(trust_env=False) as session:
                async with session.ws_connect(url, heartbeat=30) as ws:
                    self._ws_ready.set()
                    async for msg in ws:
                        if msg.type == aiohttp.WSMsgType.TEXT:
                            try:
                                data = json.loads(msg.data)
                            except ValueError:
                                continue
                        elif msg.type == aiohttp.WSMsgType.BINARY:
                            data = {"type": "binary", "data": {"size": len(msg.data)}}
                        else:
                            break
                        data["received"] = time.time()
                        with self._ws_lock:
                            self._ws_messages.append(data)

        self._ws_task = loop.create_task(listen())
        try:
            loop.run_until_complete(self._ws_task)
        except (asyncio.CancelledError, Exception):  # noqa: BLE001  (server gone / stopping)
            pass
        finally:
            loop.close()

    def _stop_ws(self) -> None:
        loop, thread = self._ws_loop, self._ws_thread
        if loop is not None and thread is not None and thread.is_alive():
            try:
                loop.call_soon_threadsafe(self._ws_task.cancel)
            except RuntimeError:
                pass
            thread.join(5)
        self._ws_thread = self._ws_loop = None

    def ws_messages(self) -> list[dict]:
        """Every /ws message received so far (JSON messages as sent; binary ones as their size)."""
        with self._ws_lock:
            return list(self._ws_messages)

    def progress_events(self, prompt_id: str, wait_end: bool = True, timeout: float = 10) -> list[dict]:
        """The /ws messages about ``prompt_id`` (execution_start, execution_cached, executing,
        progress, progress_state, executed, execution_success / _error / _interrupted), in arrival
        order. With ``wait_end`` it first waits (up to ``timeout`` s) for the closing message that
        ComfyUI sends after the history entry ("executing" with node None), so the list is complete.
        """
        if not self.listen_ws or self._ws_thread is None:
            raise RuntimeError("no /ws listener (listen_ws=False, or aiohttp missing)")

        def mine():
            return [m for m in self.ws_messages() if (m.get("data") or {}).get("prompt_id") == prompt_id]

        deadline = time.monotonic() + timeout
        while wait_end and time.monotonic() < deadline:
            if any(m.get("type") == "executing" and m["data"].get("node") is None for m in mine()):
                break
            time.sleep(0.05)
        return mine()
