"""The ParaTAA example workflow, as a user loads it, runs on a real ComfyUI server and reports progress.

As in test_example_workflows: the checkpoint loader is swapped for the test pack's tiny model and the size
and step count are lowered for a CPU; the graph (SamplerCustomAdvanced + CFGGuider + BasicScheduler +
RandomNoise + ParaTAA Sampler) is the saved file's.
"""
from __future__ import annotations

from pathlib import Path

from PIL import Image

from support.workflow import load_workflow, ui_to_api, validate_ui_workflow

EXAMPLE = Path(__file__).resolve().parents[2] / "example_workflows" / "parataa_sampler.json"


def test_parataa_example_runs_and_reports_progress_per_round(comfy_server, object_info, test_pack):
    wf = load_workflow(EXAMPLE)
    validate_ui_workflow(wf, object_info)
    prompt = ui_to_api(wf, object_info, replace_types={"CheckpointLoaderSimple": test_pack})
    (taa,) = [n for n in prompt.values() if n["class_type"] == "HiResParallelParaTAASampler"]
    assert taa["inputs"]["variant"] == "ddim" and taa["inputs"]["memory"] == 2 and taa["inputs"]["warm_start"] is True
    (sched,) = [n for n in prompt.values() if n["class_type"] == "BasicScheduler"]
    assert sched["inputs"]["steps"] == 50  # the file's value
    sched["inputs"]["steps"] = 6
    (empty,) = [n for n in prompt.values() if n["class_type"] == "EmptyLatentImage"]
    empty["inputs"].update(width=64, height=64)

    prompt_id = comfy_server.queue(prompt)
    history = comfy_server.wait(prompt_id, timeout=300)
    pngs = [p for p in comfy_server.output_files(history) if p.suffix == ".png"]
    assert len(pngs) == 1 and Image.open(pngs[0]).size == (64, 64)

    sca_id = next(k for k, v in prompt.items() if v["class_type"] == "SamplerCustomAdvanced")
    events = comfy_server.progress_events(prompt_id)
    values = [m["data"]["value"] for m in events if m["type"] == "progress" and m["data"].get("node") == sca_id]
    # One progress message per round: steps finished so far, rising to all 6 steps, never more rounds than steps.
    assert values and values[-1] == 6 and len(values) <= 6, values
    assert values == sorted(values) and len(set(values)) == len(values), values
