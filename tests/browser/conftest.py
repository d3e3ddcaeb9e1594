"""Browser layer: Debian's Chromium, headless, driven by Playwright, against ONE real ComfyUI server.

Everything here is module-scoped, not session-scoped: Playwright's sync API keeps an asyncio loop running in
this thread while it is started, which would break later layers that call asyncio.run().

The server is our harness (support.server.ComfyServer: main.py --cpu, 127.0.0.1, free port) with the
pack installed as "ComfyUI-HiRes-Parallel" and the test pack (tiny models). The browser is the system
Chromium (no browser download): $HIRES_CHROMIUM, else `chromium` on PATH. A missing browser or driver
FAILS the layer with what to install; it never skips.

Screenshots go to tests/browser/artifacts/ (gitignored; $HIRES_BROWSER_ARTIFACTS overrides) and their
paths are printed. HIRES_UPDATE_DOCS_IMAGES=1 also rewrites docs/images/sidebar.png from the run.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from support.browser import (ARTIFACTS, CHROMIUM_FLAGS, HOW_TO_INSTALL, PACK_FOLDER, READY_TIMEOUT_MS, REPO_ROOT,
                             TEST_LOADER, TEST_PACK_FOLDER, TEST_PACK_SRC, chromium_executable, chromium_pids)
from support.server import ComfyServer, comfyui_path


@pytest.fixture(scope="module")
def browser_server():
    try:
        comfyui = comfyui_path()
    except RuntimeError as e:
        pytest.fail(str(e), pytrace=False)
    server = ComfyServer({PACK_FOLDER: REPO_ROOT, TEST_PACK_FOLDER: TEST_PACK_SRC}, comfyui=comfyui)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def browser_context(tmp_path_factory):
    """A fresh Chromium profile for the session; every Chromium process of it is gone afterwards."""
    exe = chromium_executable()
    if exe is None:
        pytest.fail(f"No Chromium found (HIRES_CHROMIUM={os.environ.get('HIRES_CHROMIUM')!r}, PATH).\n"
                    + HOW_TO_INSTALL, pytrace=False)
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("The Python package playwright is not installed.\n" + HOW_TO_INSTALL, pytrace=False)
    profile = tmp_path_factory.mktemp("chromium-profile")
    pw = sync_playwright().start()
    context = None
    try:
        context = pw.chromium.launch_persistent_context(
            str(profile), executable_path=exe, headless=True, args=CHROMIUM_FLAGS,
            viewport={"width": 1400, "height": 900}, timeout=60_000)
        yield context
    except Exception as e:  # noqa: BLE001 - e.g. a Chromium that cannot start: say what to do
        if context is None:
            pytest.fail(f"Chromium at {exe} did not start: {e}\n" + HOW_TO_INSTALL, pytrace=False)
        raise
    finally:
        if context is not None:
            context.close()
        pw.stop()
        deadline = time.monotonic() + 10
        while chromium_pids(str(profile)) and time.monotonic() < deadline:
            time.sleep(0.2)
        left = chromium_pids(str(profile))
        for pid in left:
            try:
                os.kill(pid, 9)
            except OSError:
                pass
        assert not left, f"Chromium processes left after the session: {left}"


@pytest.fixture(scope="module")
def console() -> list[dict]:
    """Every console message and page error of the session's page, in order."""
    return []


@pytest.fixture(scope="module")
def responses() -> list[tuple[str, int]]:
    """(url, status) of every HTTP response the session's page received."""
    return []


@pytest.fixture(scope="module")
def page(browser_server, browser_context, console, responses):
    """ComfyUI's frontend, loaded once, with our extension registered."""
    page = browser_context.new_page()
    page.on("response", lambda r: responses.append((r.url, r.status)))
    page.on("console", lambda m: console.append(
        {"type": m.type, "text": m.text, "url": (m.location or {}).get("url", "")}))
    page.on("pageerror", lambda e: console.append({"type": "pageerror", "text": str(e), "stack": e.stack or ""}))
    page.goto(browser_server.url, wait_until="domcontentloaded")
    page.wait_for_function(
        "window.comfyAPI && window.comfyAPI.app.app.graph && window.hiresParallel && window.hiresParallel.panel",
        timeout=READY_TIMEOUT_MS)
    page.wait_for_function("window.hiresParallel.panel.registered", timeout=30_000)
    yield page
    page.close()


@pytest.fixture(scope="module")
def artifacts() -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    return ARTIFACTS


@pytest.fixture(scope="module")
def test_pack(browser_server) -> str:
    """Fails the test unless the test pack's loader (tiny models) is registered; returns its node id."""
    if TEST_LOADER not in browser_server.object_info():
        pytest.fail(f"{TEST_LOADER} is not registered\n--- log tail ---\n" + browser_server.log_tail(60),
                    pytrace=False)
    return TEST_LOADER
