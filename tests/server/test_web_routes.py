"""The web panel's routes and pushed events inside a real ComfyUI server, and a help page for every node."""
from __future__ import annotations

import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[2]
EVENT = "hires_parallel.status"


def _prompt(steps: int) -> dict:
    return {
        "1": {"class_type": "HiResTestCheckpointLoader", "inputs": {"ckpt_name": "tiny_sd15.safetensors"}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "a castle", "clip": ["1", 1]}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["1", 1]}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 128, "height": 128, "batch_size": 1}},
        "5": {"class_type": "HiResParallelPatchParallelKSampler", "inputs": {
            "model": ["1", 0], "seed": 1, "steps": steps, "cfg": 5.0, "sampler_name": "euler", "scheduler": "normal",
            "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["4", 0], "denoise": 1.0, "devices": 2,
            "device_kind": "cpu", "mode": "exact", "cfg_parallel": "off", "device_weights": ""}},
        "6": {"class_type": "SaveLatent", "inputs": {"samples": ["5", 0], "filename_prefix": "routes/job"}},
    }


def _events(server, since: int) -> list[dict]:
    return [m["data"] for m in server.ws_messages()[since:] if m.get("type") == EVENT]


def _wait_for(predicate, timeout: float = 20):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    return predicate()


def test_routes_are_served_with_and_without_the_api_prefix(comfy_server):
    for prefix in ("", "/api"):
        r = comfy_server.get(prefix + "/hires_parallel/status")
        assert r.status_code == 200 and r.headers["Content-Type"].startswith("application/json")
        assert set(r.json()) == {"pool", "job", "last_run", "last_error"}
        r = comfy_server.get(prefix + "/hires_parallel/layout?height=1024&devices=2&device_kind=cpu&cfg_parallel=off")
        assert r.status_code == 200 and [b["pixel_rows"] for b in r.json()["bands"]] == [[0, 512], [512, 1024]]
    assert comfy_server.get("/hires_parallel/layout?devices=many").status_code == 400
    assert "IMPORT FAILED" not in comfy_server.log_text()


def test_every_node_has_a_help_page_served_where_the_frontend_looks(comfy_server, object_info, pack_folder):
    ours = sorted(k for k in object_info if k.startswith("HiResParallel"))
    assert len(ours) >= 9
    for node_id in ours:
        r = comfy_server.get(f"/extensions/{pack_folder}/docs/{node_id}.md")
        assert r.status_code == 200 and r.text.startswith("# "), node_id
        assert object_info[node_id]["display_name"] in r.text.splitlines()[0], node_id
    pages = sorted(p.stem for p in (REPO / "web" / "docs").glob("*.md"))
    assert pages == ours, "a help page for a node that does not exist, or a node without one"


def test_a_job_pushes_its_steps_and_restart_stops_the_workers(comfy_server, test_pack):
    since = len(comfy_server.ws_messages())
    comfy_server.run(_prompt(steps=3), timeout=300)
    events = _wait_for(lambda: [e for e in _events(comfy_server, since) if e["kind"] == "done"] and
                       _events(comfy_server, since))
    kinds = [e["kind"] for e in events]
    assert kinds == ["start", "progress", "progress", "progress", "done"], kinds
    steps = [(e["job"]["step"], e["job"]["total"]) for e in events if e["kind"] == "progress"]
    assert steps == [(1, 3), (2, 3), (3, 3)]
    assert all(e["pool"]["busy"] for e in events if e["kind"] == "progress")
    done = events[-1]
    assert done["job"] is None and done["last_run"]["world_size"] == 2
    assert [r["steps"] for r in done["last_run"]["ranks"]] == [3, 3]
    assert all(r["total_sent_per_step"] > 0 and r["mean_step_s"] > 0 for r in done["last_run"]["ranks"])

    pids = comfy_server.get("/hires_parallel/status").json()["pool"]["pids"]
    assert len(pids) == 2
    since = len(comfy_server.ws_messages())
    r = comfy_server.post("/hires_parallel/pool/restart")
    assert r.status_code == 200 and r.json()["ok"] and r.json()["pool"]["exists"] is False
    assert not any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE for p in pids)
    assert _wait_for(lambda: [e["kind"] for e in _events(comfy_server, since)]) == ["restart"]
    # The pool starts again lazily: the next job runs on fresh workers.
    comfy_server.run(_prompt(steps=1), timeout=300)
    status = comfy_server.get("/hires_parallel/status").json()
    assert status["pool"]["warm"] and not set(status["pool"]["pids"]) & set(pids)
