"""Server layer: ONE real ComfyUI server (main.py --cpu) for the whole layer, driven over HTTP.

Installed custom nodes (symlinks in a temporary base directory):
* this repository as "ComfyUI-HiRes-Parallel" -- deliberately not the package name, so ComfyUI must
  load the pack by path, as it does for a user who cloned the repository into custom_nodes/;
* tests/test_pack as "hires_parallel_test_pack" (HiResTestCheckpointLoader: tiny real models).

The server is stopped at the end of the session whatever happens (fixture finalizer, and an atexit
guard in support.server as a last resort).
"""
from __future__ import annotations

from pathlib import Path

import pytest

from support.server import ComfyServer, comfyui_path

REPO_ROOT = Path(__file__).resolve().parents[2]
PACK_FOLDER = "ComfyUI-HiRes-Parallel"
TEST_PACK_FOLDER = "hires_parallel_test_pack"
TEST_PACK_SRC = REPO_ROOT / "tests" / "test_pack"
TEST_LOADER = "HiResTestCheckpointLoader"


def _custom_nodes() -> dict[str, Path]:
    nodes = {PACK_FOLDER: REPO_ROOT}
    # Written by another part of the suite; when it is not there yet, only the tests that need it
    # fail (fixture `test_pack`), the rest of the layer still runs.
    if (TEST_PACK_SRC / "__init__.py").is_file():
        nodes[TEST_PACK_FOLDER] = TEST_PACK_SRC
    return nodes


@pytest.fixture(scope="session")
def comfy_server():
    try:
        comfyui = comfyui_path()
    except RuntimeError as e:
        pytest.fail(str(e), pytrace=False)
    server = ComfyServer(_custom_nodes(), comfyui=comfyui)
    server.start()  # raises with the log tail when the server does not come up
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def pack_folder() -> str:
    """The custom_nodes folder name our repository is installed under."""
    return PACK_FOLDER


@pytest.fixture(scope="session")
def object_info(comfy_server) -> dict:
    return comfy_server.object_info()


@pytest.fixture(scope="session")
def test_pack(comfy_server, object_info) -> str:
    """Fails the test unless the test pack loaded; returns the test loader's node id."""
    if TEST_PACK_FOLDER not in comfy_server.custom_nodes:
        pytest.fail(f"{TEST_PACK_SRC} has no __init__.py: the test node pack is missing", pytrace=False)
    if TEST_LOADER not in object_info:
        failed = [line for line in comfy_server.log_text().splitlines() if TEST_PACK_FOLDER in line]
        pytest.fail(
            f"{TEST_LOADER} is not registered; server log lines about the test pack:\n" + "\n".join(failed)
            + "\n--- log tail ---\n" + comfy_server.log_tail(60),
            pytrace=False,
        )
    return TEST_LOADER


@pytest.fixture(autouse=True, scope="module")
def _stop_pool_after_module(comfy_server):
    """The server lives for the whole session; its worker pool must not (later layers check that no
    worker process of this test run is left)."""
    yield
    if comfy_server.running:
        comfy_server.post("/hires_parallel/pool/shutdown")
