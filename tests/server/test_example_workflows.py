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
