"""Test layers: tests/unit (no ComfyUI), tests/comfy (ComfyUI in process), tests/server (a real
ComfyUI server over HTTP), tests/browser (headless Chromium against that server).

The layer is the folder a test lives in; its marker is added here, so `-m unit` etc. select layers.
Layers that need ComfyUI fail (they do not skip) when no checkout is found: integration is not optional.
"""
from __future__ import annotations

import os
import pathlib

import pytest

TESTS = pathlib.Path(__file__).parent
LAYERS = ("unit", "comfy", "server", "browser")


def pytest_collection_modifyitems(config, items):
    for item in items:
        rel = pathlib.Path(str(item.fspath)).resolve().relative_to(TESTS.resolve())
        layer = rel.parts[0]
        if layer in LAYERS:
            item.add_marker(getattr(pytest.mark, layer))


def pytest_report_header(config):
    from hires_parallel.comfy_host import find_comfyui

    return f"hires_parallel: COMFYUI_PATH={os.environ.get('COMFYUI_PATH', '(unset)')} -> {find_comfyui()}"


@pytest.fixture(scope="session")
def comfy_root() -> str:
    """Import the real ComfyUI in this process (CPU unless CUDA is present) and return its root."""
    from hires_parallel.comfy_host import HOW_TO, ComfyUINotFound, ensure_comfy

    try:
        return ensure_comfy()
    except ComfyUINotFound:
        pytest.fail(HOW_TO, pytrace=False)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """Print how many tests ran in each layer (CI reads this)."""
    counts: dict[str, dict[str, int]] = {layer: {} for layer in LAYERS}
    for outcome in ("passed", "failed", "error", "skipped", "xfailed", "xpassed"):
        for rep in terminalreporter.stats.get(outcome, []):
            if getattr(rep, "when", "call") not in ("call", "setup") or (outcome == "passed" and rep.when != "call"):
                continue
            parts = pathlib.Path(rep.nodeid.split("::")[0]).parts
            layer = parts[1] if len(parts) > 1 and parts[0] == "tests" else (parts[0] if parts else "?")
            if layer in counts:
                counts[layer][outcome] = counts[layer].get(outcome, 0) + 1
    terminalreporter.section("tests per layer")
    for layer, c in counts.items():
        detail = ", ".join(f"{n} {k}" for k, n in sorted(c.items())) or "none"
        terminalreporter.write_line(f"{layer:8s} {detail}")
