"""The structure-guided hires example workflow, as a user loads it, runs on a real ComfyUI server.

As in test_example_workflows: the checkpoint loader is swapped for the test pack's tiny SDXL-family model,
and sizes, steps and the native resolution are lowered for a CPU (native 64 pixels, so the file's
2048x2048 and 1024x2048 branches become 128x128 and 64x128: 2x2 and 1x2 views); the graph (one patched
model feeding two plain KSamplers) is the saved file's.
"""
from __future__ import annotations

from pathlib import Path

from PIL import Image

from support.workflow import load_workflow, ui_to_api, validate_ui_workflow

EXAMPLE = Path(__file__).resolve().parents[2] / "example_workflows" / "structure_guided_hires.json"


def test_structure_guided_example_runs_both_branches_with_progress(comfy_server, object_info, test_pack):
    wf = load_workflow(EXAMPLE)
    validate_ui_workflow(wf, object_info)
    prompt = ui_to_api(wf, object_info, replace_types={"CheckpointLoaderSimple": test_pack})
    (asg,) = [n for n in prompt.values() if n["class_type"] == "HiResParallelStructureGuidedHiRes"]
    assert asg["inputs"]["native_resolution"] == 0 and asg["inputs"]["guidance"] == 1.0  # the file's values
    assert asg["inputs"]["guidance_schedule"] == "cosine" and asg["inputs"]["attention_mask"] is True
    asg["inputs"]["native_resolution"] = 64
    empties = [n for n in prompt.values() if n["class_type"] == "EmptyLatentImage"]
    assert sorted((e["inputs"]["width"], e["inputs"]["height"]) for e in empties) == [(1024, 2048), (2048, 2048)]
    for e in empties:
        e["inputs"].update(width=e["inputs"]["width"] // 16, height=e["inputs"]["height"] // 16)
    samplers = [k for k, n in prompt.items() if n["class_type"] == "KSampler"]
    assert len(samplers) == 2
    for k in samplers:
        assert prompt[k]["inputs"]["model"][0] == next(i for i, n in prompt.items() if n is asg)
        prompt[k]["inputs"]["steps"] = 2

    prompt_id = comfy_server.queue(prompt)
    history = comfy_server.wait(prompt_id, timeout=300)
    pngs = [p for p in comfy_server.output_files(history) if p.suffix == ".png"]
    assert sorted(Image.open(p).size for p in pngs) == [(64, 128), (128, 128)]
    events = comfy_server.progress_events(prompt_id)
    for k in samplers:
        steps = [m["data"]["value"] for m in events if m["type"] == "progress" and m["data"].get("node") == k]
        assert steps and steps[-1] == 2, (k, steps)
