"""What the runtime leaves on disk and in shared memory, and how it is cleaned up.

The controller writes multi-GB weight files (``/dev/shm`` or a disk folder) and a pool folder (``/tmp``).
They must not outlive ComfyUI, however it ends:
* normal exit, Ctrl+C (ComfyUI returns from its loop): ``atexit`` runs the registered cleanups;
* SIGTERM / SIGHUP (a service manager, ``kill``, a closed terminal), whose default action skips atexit:
  a handler installed from the main thread runs the same cleanups, then lets the signal do what it did
  before (the previous handler, or the default action: the process still ends with that signal);
* SIGKILL, a crash, power loss: nothing can run then, so every folder carries its owner's pid in its
  name and the next start sweeps the folders of processes that are gone (``sweep``).
"""
from __future__ import annotations

import atexit
import logging
import os
import re
import shutil
import signal
import sys
import tempfile
import threading
from typing import Callable

log = logging.getLogger("hires_parallel")

WEIGHTS_PREFIX = "hires_parallel_weights_"
POOL_PREFIX = "hires_parallel_pool_"
_OWNED = re.compile(r"^(?:%s|%s)(\d+)_[a-z0-9_]{8}$" % (WEIGHTS_PREFIX, POOL_PREFIX))  # pid + mkdtemp's 8
# Weight folders of versions before the owner pid was in the name: whether their ComfyUI still runs cannot be
# told, so they are only reported (with their size and the command that removes them), never removed.
_LEGACY = re.compile(r"^%s[a-z0-9_]{8}$" % WEIGHTS_PREFIX)  # mkdtemp's 8 characters alone

_cleanups: list[Callable[[], None]] = []
_lock = threading.RLock()  # re-entrant: a signal handler may run while this thread holds it
_reported: set[str] = set()  # legacy folders already reported
_installed: dict[int, object] = {}  # signal number -> the handler that was there before ours


def owned_prefix(prefix: str) -> str:
    """A folder prefix naming this process as the owner (``sweep`` reads the pid back)."""
    return f"{prefix}{os.getpid()}_"


def shm_dir() -> str | None:
    return "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    if sys.platform == "win32":
        try:
            import psutil

            return psutil.pid_exists(pid)
        except ImportError:
            return True  # cannot tell: keep it
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's live process
    return True


def sweep(folders: list[str | None] | None = None) -> list[str]:
    """Remove the weight and pool folders whose owner process is gone; return what was removed."""
    removed, legacy = [], []
    for root in folders if folders is not None else [shm_dir(), tempfile.gettempdir()]:
        if not root or not os.path.isdir(root):
            continue
        try:
            names = os.listdir(root)
        except OSError:
            continue
        for name in names:
            m = _OWNED.match(name)
            path = os.path.join(root, name)
            if _LEGACY.match(name) and os.path.isdir(path) and not os.path.islink(path):
                legacy.append(path)
            if not m or _alive(int(m.group(1))) or not os.path.isdir(path) or os.path.islink(path):
                continue
            try:
                if os.stat(path).st_uid != os.getuid():  # someone else's: not ours to remove
                    continue
            except (OSError, AttributeError):
                pass
            shutil.rmtree(path, ignore_errors=True)
            if not os.path.exists(path):
                removed.append(path)
    if removed:
        log.info("HiRes Parallel: removed %d folder(s) left by processes that are gone: %s", len(removed),
                 ", ".join(removed))
    legacy = [p for p in legacy if p not in _reported]
    if legacy:
        _reported.update(legacy)  # once per process: every pool start sweeps
        size = sum(_folder_bytes(p) for p in legacy)
        log.warning("HiRes Parallel: %d weight folder(s) of an earlier version of this pack hold %.2f GB (RAM, when "
                    "in /dev/shm): %s. Unless a ComfyUI started before the update still runs, remove them: rm -r %s",
                    len(legacy), size / 2**30, ", ".join(legacy), " ".join(legacy))
    return removed


def _folder_bytes(path: str) -> int:
    total = 0
    for entry in os.scandir(path):
        try:
            total += entry.stat(follow_symlinks=False).st_size
        except OSError:
            pass
    return total


def on_exit(fn: Callable[[], None]) -> None:
    """Run ``fn`` when this process ends (atexit, and on SIGTERM / SIGHUP once ``install_signal_handlers``
    ran on the main thread). Cleanups run newest first and never raise."""
    with _lock:
        if not _cleanups:
            atexit.register(run_cleanups)
        if fn not in _cleanups:
            _cleanups.append(fn)
    install_signal_handlers()


def run_cleanups() -> None:
    with _lock:
        fns = list(reversed(_cleanups))
    for fn in fns:
        try:
            fn()
        except Exception as exc:  # noqa: BLE001 - the others must still run
            log.warning("HiRes Parallel: cleanup %s failed: %s", getattr(fn, "__name__", fn), exc)


def _handler(signum: int, frame) -> None:
    run_cleanups()
    previous = _installed.get(signum, signal.SIG_DFL)
    if callable(previous):
        previous(signum, frame)  # a handler of ComfyUI or another pack: it decides what happens next
        return
    signal.signal(signum, signal.SIG_DFL if previous in (None, signal.SIG_DFL) else previous)
    os.kill(os.getpid(), signum)  # the default action, as if we had not been here


def install_signal_handlers() -> bool:
    """Install the SIGTERM / SIGHUP cleanup (main thread only; ignored signals stay ignored)."""
    if threading.current_thread() is not threading.main_thread():
        return False
    for name in ("SIGTERM", "SIGHUP"):
        signum = getattr(signal, name, None)
        if signum is None or signum in _installed:
            continue
        previous = signal.getsignal(signum)
        if previous is signal.SIG_IGN:
            continue
        _installed[signum] = previous
        signal.signal(signum, _handler)
    return True
