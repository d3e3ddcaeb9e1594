"""Our example workflows, as a user loads them, run on a real ComfyUI server.

The checkpoint loader is swapped for the test pack's loader (tiny seeded models; no weights can be
downloaded), and sizes and step counts are lowered so a CPU runs each workflow in seconds; the graph
itself is the saved file's.
"""
from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from support.workflow import load_workflow, ui_to_api, validate_ui_workflow

EXAMPLES = Path(__file__).resolve().parents[2] / "example_workflows"


def _nodes(prompt: dict, class_type: str) -> list[dict]:
    return [n for n in prompt.values() if n["class_type"] == class_type]


def _prompt(name: str, object_info: dict, loader: str) -> dict:
    wf = load_workflow(EXAMPLES / f"{name}.json")
    validate_ui_workflow(wf, object_info)
    return ui_to_api(wf, object_info, replace_types={"CheckpointLoaderSimple": loader})


def test_relay_upscale_2x_runs_and_reports_progress(comfy_server, object_info, test_pack):
    prompt = _prompt("relay_upscale_2x", object_info, test_pack)
    (empty,) = _nodes(prompt, "EmptyLatentImage")
    empty["inputs"].update(width=128, height=128)
    for ks in _nodes(prompt, "KSampler"):
        ks["inputs"]["steps"] = 3
    (relay,) = _nodes(prompt, "HiResParallelRelayUpscaleSampler")
    assert relay["inputs"]["scale_by"] == 2.0 and relay["inputs"]["relay_value"] == 500.0
    relay["inputs"]["steps"] = 3

    prompt_id = comfy_server.queue(prompt)
    history = comfy_server.wait(prompt_id, timeout=300)
    pngs = [p for p in comfy_server.output_files(history) if p.suffix == ".png"]
    assert len(pngs) == 1, pngs
    assert Image.open(pngs[0]).size == (256, 256)

    relay_id = next(k for k, v in prompt.items() if v is relay)
    events = comfy_server.progress_events(prompt_id)
    steps = [m["data"]["value"] for m in events if m["type"] == "progress" and m["data"].get("node") == relay_id]
    assert steps and steps[-1] == 3, f"no per-step progress from the relay node: {steps}"


@pytest.mark.parametrize("name", sorted(p.stem for p in EXAMPLES.glob("*.json")))
def test_every_example_validates_against_the_running_server(name, object_info):
    validate_ui_workflow(load_workflow(EXAMPLES / f"{name}.json"), object_info)


def test_examples_are_listed_in_the_template_browser(comfy_server, pack_folder):
    listed = comfy_server.get("/workflow_templates").json()
    assert sorted(listed.get(pack_folder, [])) == sorted(p.stem for p in EXAMPLES.glob("*.json"))
    r = comfy_server.get(f"/api/workflow_templates/{pack_folder}/relay_upscale_2x.json")
    assert r.status_code == 200 and r.json()["nodes"]


def test_patch_parallel_example_as_saved_plans_itself(comfy_server, object_info, test_pack):
    """The example's own mode (auto) and devices (0: on CPU one worker per core): the planner picks, the image
    comes out, and Pool Status says what was picked and why."""
    import json

    prompt = _prompt("patch_parallel_ksampler", object_info, test_pack)
    (empty,) = _nodes(prompt, "EmptyLatentImage")
    empty["inputs"].update(width=256, height=256)
    (ks,) = _nodes(prompt, "HiResParallelPatchParallelKSampler")
    ks["inputs"].update(steps=3, device_kind="cpu")
    history = comfy_server.wait(comfy_server.queue(prompt), timeout=300)
    pngs = [p for p in comfy_server.output_files(history) if p.suffix == ".png"]
    assert len(pngs) == 1 and Image.open(pngs[0]).size == (256, 256)
    out = comfy_server.run({"1": {"class_type": "HiResParallelPoolStatus", "inputs": {"refresh": 2}}}, timeout=60)
    status = json.loads(out["outputs"]["1"]["text"][0])
    plan = status["last_run"]["plan"]
    assert plan["reason"] and plan["inputs"]["one_device_step_s"] > 0, plan
    assert status["last_run"]["world_size"] == plan["devices"] and status["last_run"]["mode"] == plan["mode"]


def test_patch_parallel_example_runs_on_two_cpu_workers_and_the_pool_reports(comfy_server, object_info, test_pack):
    import json
    import os

    prompt = _prompt("patch_parallel_ksampler", object_info, test_pack)
    (empty,) = _nodes(prompt, "EmptyLatentImage")
    empty["inputs"].update(width=256, height=320)
    (ks,) = _nodes(prompt, "HiResParallelPatchParallelKSampler")
    assert ks["inputs"]["devices"] == 0 and ks["inputs"]["device_kind"] == "auto"  # the file's defaults
    assert ks["inputs"]["mode"] == "auto"
    ks["inputs"].update(steps=3, devices=2, device_kind="cpu", mode="exact")  # auto: see the next test
    prompt_id = comfy_server.queue(prompt)
    history = comfy_server.wait(prompt_id, timeout=300)
    pngs = [p for p in comfy_server.output_files(history) if p.suffix == ".png"]
    assert len(pngs) == 1 and Image.open(pngs[0]).size == (256, 320)
    ks_id = next(k for k, v in prompt.items() if v is ks)
    events = comfy_server.progress_events(prompt_id)
    steps = [m["data"]["value"] for m in events if m["type"] == "progress" and m["data"].get("node") == ks_id]
    assert steps and steps[-1] == 3, f"no per-step progress from the patch-parallel sampler: {steps}"

    status_prompt = {"1": {"class_type": "HiResParallelPoolStatus", "inputs": {"refresh": 1}}}
    out = comfy_server.run(status_prompt, timeout=60)
    status = json.loads(out["outputs"]["1"]["text"][0])
    assert status["pool"]["warm"] is True and status["pool"]["devices"] == ["cpu", "cpu"]
    assert status["last_run"]["world_size"] == 2
    # cfg_parallel "auto" with 2 devices: cond and uncond on one device each, exchanged once per step
    assert status["last_run"]["cfg_parallel"] is True
    assert status["last_run"]["ranks"][1]["comm"]["bytes_sent"]["batch"] > 0
    pids = status["pool"]["pids"]

    shut = comfy_server.run({"1": {"class_type": "HiResParallelPoolShutdown", "inputs": {"trigger": 1}}}, timeout=60)
    after = json.loads(shut["outputs"]["1"]["text"][0])
    assert after["pool"]["warm"] is False
    for pid in pids:
        assert not os.path.exists(f"/proc/{pid}") or open(f"/proc/{pid}/stat").read().split()[2] == "Z", pid
