"""Helpers of the browser layer (tests/browser): where things are, which console lines are ours, screenshots."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
PACK_FOLDER = "ComfyUI-HiRes-Parallel"
TEST_PACK_FOLDER = "hires_parallel_test_pack"
TEST_PACK_SRC = REPO_ROOT / "tests" / "test_pack"
TEST_LOADER = "HiResTestCheckpointLoader"
ARTIFACTS = Path(os.environ.get("HIRES_BROWSER_ARTIFACTS") or REPO_ROOT / "tests" / "browser" / "artifacts")
CHROMIUM_FLAGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
]
READY_TIMEOUT_MS = 120_000
HOW_TO_INSTALL = (
    "The browser tests need Debian's chromium and the Playwright driver (no browser download):\n"
    "  apt-get install chromium            (bash .ci/run does this when run as root)\n"
    "  pip install -e '.[test]'            (installs playwright)\n"
    "or point HIRES_CHROMIUM at a Chromium/Chrome executable."
)


def chromium_executable() -> str | None:
    env = os.environ.get("HIRES_CHROMIUM")
    if env:
        return env if os.access(env, os.X_OK) else None
    return shutil.which("chromium") or shutil.which("chromium-browser")


def is_ours(entry: dict) -> bool:
    """A console message or page error that comes from our extension, our routes or our files."""
    text = " ".join(str(entry.get(k) or "") for k in ("text", "url", "stack")).lower()
    return "hires" in text


def chromium_pids(marker: str) -> list[int]:
    """Processes whose command line contains ``marker`` (the session's own profile folder)."""
    import psutil

    found = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        try:
            if any(marker in part for part in proc.info["cmdline"] or []):
                found.append(proc.info["pid"])
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def save_screenshot(target, artifacts: Path, name: str, **kw) -> Path:
    """Screenshot a page or an element into the artefacts folder and print where it went."""
    path = artifacts / f"{name}.png"
    target.screenshot(path=str(path), **kw)
    print(f"screenshot: {path}")
    return path
