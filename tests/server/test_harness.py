"""The server harness itself: the server comes up with our pack loaded by path, UI workflows convert
and run, and failures come back readable."""
from __future__ import annotations

import copy
import glob
import os
import re
import shutil
import time

import pytest

from support.server import PromptFailed
from support.workflow import load_workflow, ui_to_api, validate_ui_workflow

CORE_NODES = ("KSampler", "CheckpointLoaderSimple", "EmptyLatentImage", "LatentUpscaleBy", "SaveLatent",
              "VAEDecode", "SaveImage")


def test_server_lists_core_nodes_and_our_pack(comfy_server, object_info, pack_folder):
    PACK_FOLDER = pack_folder
    missing = [n for n in CORE_NODES if n not in object_info]
    assert not missing, f"core nodes missing from /object_info: {missing}"

    log = comfy_server.log_text()
    failed = [line for line in log.splitlines() if "IMPORT FAILED" in line and PACK_FOLDER in line]
    assert not failed, "our pack failed to import:\n" + "\n".join(failed) + "\n--- log tail ---\n" + comfy_server.log_tail(80)

    ours = sorted(k for k in object_info if k.startswith("HiResParallel"))
    assert ours, "no HiResParallel* node in /object_info\n--- log tail ---\n" + comfy_server.log_tail(80)
    # Loaded by path from the custom_nodes folder named PACK_FOLDER, not as the installed package.
    modules = {object_info[k].get("python_module") for k in ours}
    assert modules == {f"custom_nodes.{PACK_FOLDER}"}, modules
    # The import-times table lists the pack under its folder name, without a failure mark.
    import_lines = [line for line in log.splitlines() if f"custom_nodes/{PACK_FOLDER}" in line and "seconds" in line]
    assert import_lines and not any("FAILED" in line for line in import_lines), import_lines


def _core_ui_workflow() -> dict:
    """EmptyLatentImage -> Reroute -> LatentUpscaleBy -> SaveLatent, plus a muted SaveLatent fed by the
    empty latent and a note, in the frontend's UI format."""
    return {
        "id": "4f0c9a3e-0000-4000-8000-000000000001",
        "revision": 0,
        "last_node_id": 6,
        "last_link_id": 4,
        "nodes": [
            {"id": 1, "type": "EmptyLatentImage", "pos": [0, 0], "size": [315, 106], "flags": {}, "order": 0,
             "mode": 0, "inputs": [],
             "outputs": [{"name": "LATENT", "type": "LATENT", "links": [1, 4], "slot_index": 0}],
             "properties": {"Node name for S&R": "EmptyLatentImage"}, "widgets_values": [64, 48, 1]},
            {"id": 2, "type": "Reroute", "pos": [350, 0], "size": [75, 26], "flags": {}, "order": 1, "mode": 0,
             "inputs": [{"name": "", "type": "*", "link": 1}],
             "outputs": [{"name": "", "type": "LATENT", "links": [2]}],
             "properties": {"showOutputText": False, "horizontal": False}},
            {"id": 3, "type": "LatentUpscaleBy", "pos": [450, 0], "size": [315, 82], "flags": {}, "order": 2,
             "mode": 0, "inputs": [{"name": "samples", "type": "LATENT", "link": 2}],
             "outputs": [{"name": "LATENT", "type": "LATENT", "links": [3], "slot_index": 0}],
             "properties": {"Node name for S&R": "LatentUpscaleBy"}, "widgets_values": ["nearest-exact", 1.5]},
            {"id": 4, "type": "SaveLatent", "pos": [800, 0], "size": [315, 58], "flags": {}, "order": 3, "mode": 0,
             "inputs": [{"name": "samples", "type": "LATENT", "link": 3}], "outputs": [],
             "properties": {"Node name for S&R": "SaveLatent"}, "widgets_values": ["harness/upscaled"]},
            {"id": 5, "type": "SaveLatent", "pos": [350, 200], "size": [315, 58], "flags": {}, "order": 4, "mode": 2,
             "inputs": [{"name": "samples", "type": "LATENT", "link": 4}], "outputs": [],
             "properties": {"Node name for S&R": "SaveLatent"}, "widgets_values": ["harness/muted"]},
            {"id": 6, "type": "Note", "pos": [0, 200], "size": [300, 80], "flags": {}, "order": 5, "mode": 0,
             "inputs": [], "outputs": [], "properties": {}, "widgets_values": ["muted save must not run"]},
        ],
        "links": [
            [1, 1, 0, 2, 0, "LATENT"],
            [2, 2, 0, 3, 0, "LATENT"],
            [3, 3, 0, 4, 0, "LATENT"],
            [4, 1, 0, 5, 0, "LATENT"],
        ],
        "groups": [],
        "config": {},
        "extra": {"ds": {"scale": 1, "offset": [0, 0]}},
        "version": 0.4,
    }


def test_core_ui_workflow_converts_and_runs(comfy_server, object_info):
    wf = _core_ui_workflow()
    validate_ui_workflow(wf, object_info)
    prompt = ui_to_api(wf, object_info)
    assert set(prompt) == {"1", "3", "4"}, prompt  # reroute, muted node and note are gone
    assert prompt["3"]["inputs"] == {"samples": ["1", 0], "upscale_method": "nearest-exact", "scale_by": 1.5}
    assert prompt["1"]["inputs"] == {"width": 64, "height": 48, "batch_size": 1}

    pid = comfy_server.queue(prompt)
    history = comfy_server.wait(pid, timeout=60)
    files = comfy_server.output_files(history)
    assert len(files) == 1, files
    path = files[0]
    assert path.suffix == ".latent" and path.is_file(), path
    assert path.parent == comfy_server.output_dir / "harness"
    written = sorted(os.path.relpath(p, comfy_server.output_dir)
                     for p in glob.glob(str(comfy_server.output_dir / "**" / "*.latent"), recursive=True))
    assert not any("muted" in p for p in written), f"the muted SaveLatent ran: {written}"

    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        latent = f.get_tensor("latent_tensor")
    # 64x48 px -> 8x6 latent -> x1.5 -> 12x9: the widget values reached the server as written
    assert tuple(latent.shape) == (1, 4, 9, 12), latent.shape

    events = comfy_server.progress_events(pid)
    types = [e["type"] for e in events]
    assert "execution_start" in types and "execution_success" in types, types
    executed = {e["data"]["node"] for e in events if e["type"] == "executed"}
    assert "4" in executed, events


@pytest.mark.parametrize(
    "bad, expect",
    [
        ({"1": {"class_type": "EmptyLatentImage", "inputs": {"width": 4, "height": 64, "batch_size": 1}},
          "2": {"class_type": "SaveLatent", "inputs": {"samples": ["1", 0], "filename_prefix": "x"}}},
         [r"node 1 \(EmptyLatentImage\)", r"width", r"smaller than min"]),
        ({"1": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
          "2": {"class_type": "LatentUpscaleBy",
                "inputs": {"samples": ["1", 0], "upscale_method": "no-such-method", "scale_by": 1.5}},
          "3": {"class_type": "SaveLatent", "inputs": {"samples": ["2", 0], "filename_prefix": "x"}}},
         [r"node 2 \(LatentUpscaleBy\)", r"upscale_method", r"no-such-method"]),
        ({"1": {"class_type": "NoSuchNodeAnywhere", "inputs": {}}},
         [r"NoSuchNodeAnywhere"]),
    ],
    ids=["below-min", "not-in-list", "unknown-class"],
)
def test_bad_prompt_gives_readable_error(comfy_server, bad, expect):
    with pytest.raises(AssertionError) as info:
        comfy_server.queue(bad)
    message = str(info.value)
    assert message.startswith("server rejected the prompt (HTTP 400)"), message
    for pattern in expect:
        assert re.search(pattern, message), f"{pattern!r} not in:\n{message}"


def test_execution_error_is_reported_with_message(comfy_server):
    # Validates, then fails while running: ComfyUI refuses to save outside output/.
    prompt = {
        "1": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "2": {"class_type": "SaveLatent", "inputs": {"samples": ["1", 0], "filename_prefix": "../escape"}},
    }
    pid = comfy_server.queue(prompt)
    with pytest.raises(PromptFailed) as info:
        comfy_server.wait(pid, timeout=60)
    message = str(info.value)
    assert "outside the output folder" in message, message
    assert "node 2, SaveLatent" in message, message
    assert not (comfy_server.output_dir.parent / "escape_00001_.latent").exists()
    assert comfy_server.wait(pid, raise_on_error=False)["status"]["status_str"] == "error"


def test_frontend_saved_template_converts_to_a_valid_prompt(comfy_server, object_info):
    """A workflow the real frontend saved (ComfyUI's default template: KSampler seed with a control
    value, SaveImage without widgets_values) converts to a prompt the server accepts except for
    the checkpoint file, which this server does not have."""
    try:
        import comfyui_workflow_templates
    except ImportError:
        pytest.fail("comfyui_workflow_templates (a ComfyUI requirement) is not installed")
    path = os.path.join(os.path.dirname(comfyui_workflow_templates.__file__), "templates", "default.json")
    wf = load_workflow(path)
    prompt = ui_to_api(copy.deepcopy(wf), object_info)
    assert prompt["3"]["class_type"] == "KSampler"
    ks = prompt["3"]["inputs"]
    assert isinstance(ks["seed"], int) and ks["steps"] == 20 and ks["sampler_name"] == "euler", ks
    with pytest.raises(AssertionError) as info:
        comfy_server.queue(prompt)
    message = str(info.value)
    errors = re.findall(r"^  node (\S+) \((\w+)\): (.*)$", message, flags=re.M)
    assert errors, message
    assert {(nid, cls) for nid, cls, _ in errors} == {("4", "CheckpointLoaderSimple")}, message
    assert all("ckpt_name" in text for _, _, text in errors), message


# ---------------------------------------------------------------------------------------------
# The harness's own failure paths, with a stand-in main.py (no real ComfyUI needed, a few seconds).

FAKE_MAIN = r'''
import http.server, os, signal, subprocess, sys, time
args = sys.argv
port = int(args[args.index("--port") + 1])
base = args[args.index("--base-directory") + 1]
mode = os.environ.get("FAKE_COMFY_MODE")
print("fake comfy starting in mode", mode, flush=True)
if mode == "crash":
    print("boom: fake ComfyUI failed to import", flush=True)
    sys.exit(3)
if mode == "hang":
    time.sleep(600)
if mode == "stubborn":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    child = subprocess.Popen([sys.executable, "-c",
        "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"])
    with open(os.path.join(base, "child.pid"), "w") as f:
        f.write(str(child.pid))

class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200); self.send_header("Content-Type", "application/json"); self.end_headers()
        self.wfile.write(b"{}")
    def log_message(self, *a):
        pass

http.server.HTTPServer(("127.0.0.1", port), H).serve_forever()
'''


@pytest.fixture
def fake_comfy(tmp_path):
    root = tmp_path / "FakeComfyUI"
    (root / "comfy").mkdir(parents=True)
    (root / "main.py").write_text(FAKE_MAIN)
    return str(root)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


def test_startup_crash_raises_with_log_tail(fake_comfy, monkeypatch):
    from support.server import ComfyServer

    monkeypatch.setenv("FAKE_COMFY_MODE", "crash")
    server = ComfyServer({}, comfyui=fake_comfy)
    with pytest.raises(RuntimeError) as info:
        server.start()
    message = str(info.value)
    assert "exit code 3" in message and "boom: fake ComfyUI failed to import" in message, message
    assert server.proc is None and not server.base_dir.exists()


def test_startup_timeout_raises_and_kills(fake_comfy, monkeypatch):
    from support.server import ComfyServer

    monkeypatch.setenv("FAKE_COMFY_MODE", "hang")
    server = ComfyServer({}, comfyui=fake_comfy, startup_timeout=2)
    with pytest.raises(RuntimeError) as info:
        server.start()
    message = str(info.value)
    assert "no answer from" in message and "fake comfy starting in mode hang" in message, message
    assert server.proc is None


def test_stop_kills_whole_group_even_when_sigterm_is_ignored(fake_comfy, monkeypatch, tmp_path):
    import support.server as srv

    monkeypatch.setenv("FAKE_COMFY_MODE", "stubborn")
    monkeypatch.setattr(srv, "STOP_GRACE", 1.0)
    server = srv.ComfyServer({"pack": tmp_path}, comfyui=fake_comfy, keep_dir=True, listen_ws=False)
    with server:
        assert (server.base_dir / "custom_nodes" / "pack").resolve() == tmp_path.resolve()
        assert {p.name for p in server.base_dir.iterdir()} >= {"custom_nodes", "input", "output", "temp", "user"}
        pgid = server.proc.pid
        deadline = time.monotonic() + 10
        while not (server.base_dir / "child.pid").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        child = int((server.base_dir / "child.pid").read_text())
        assert _alive(child) and len(srv._group_members(pgid)) == 2
    assert srv._group_members(pgid) == []
    assert not _alive(child) and not _alive(pgid)
    assert server not in srv._LIVE
    shutil.rmtree(server.base_dir, ignore_errors=True)
