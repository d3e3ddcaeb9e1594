"""The PanGu-Draw example workflow (Coop Guider and Time-Decoupled Guider, SD1.5 + SDXL at twice the size), as a
user loads it, runs on a real ComfyUI server and reports progress for both samplers.

As in test_example_workflows: the checkpoint loaders are swapped for the test pack's (names with "xl" give the
tiny SDXL family, others SD1.5; both come with a 4-channel VAE, and the two latent formats differ, so the bridge
goes through the VAEs); size and step count are lowered for a CPU. The graph is the saved file's.
"""
from __future__ import annotations

from pathlib import Path

from PIL import Image

from support.workflow import load_workflow, ui_to_api, validate_ui_workflow

EXAMPLE = Path(__file__).resolve().parents[2] / "example_workflows" / "coop_sd15_sdxl.json"


def _one(prompt: dict, class_type: str) -> dict:
    (node,) = [n for n in prompt.values() if n["class_type"] == class_type]
    return node


def test_coop_example_runs_both_guiders_and_reports_progress(comfy_server, object_info, test_pack):
    wf = load_workflow(EXAMPLE)
    validate_ui_workflow(wf, object_info)
    prompt = ui_to_api(wf, object_info, replace_types={"CheckpointLoaderSimple": test_pack})
    coop = _one(prompt, "HiResParallelCoopGuider")
    switch = _one(prompt, "HiResParallelTimeDecoupledGuider")
    assert coop["inputs"]["b_scale"] == 2.0 and coop["inputs"]["weight"] == 0.5 and coop["inputs"]["every_k"] == 2
    assert switch["inputs"]["switch_timestep"] == 500.0 and switch["inputs"]["b_scale"] == 2.0
    names = sorted(n["inputs"]["ckpt_name"] for n in prompt.values() if n["class_type"] == test_pack)
    assert names == ["sd_xl_base_1.0.safetensors", "v1-5-pruned-emaonly.safetensors"]
    sched = _one(prompt, "BasicScheduler")
    assert sched["inputs"]["steps"] == 20  # the file's value
    sched["inputs"]["steps"] = 4
    _one(prompt, "EmptyLatentImage")["inputs"].update(width=64, height=64)

    prompt_id = comfy_server.queue(prompt)
    history = comfy_server.wait(prompt_id, timeout=400)
    pngs = [p for p in comfy_server.output_files(history) if p.suffix == ".png"]
    sizes = sorted(Image.open(p).size for p in pngs)
    # Coop stays in model A's space and size; the time-decoupled result is model B's, at twice the size.
    assert sizes == [(64, 64), (128, 128)], sizes

    events = comfy_server.progress_events(prompt_id)
    for sca_id in [k for k, v in prompt.items() if v["class_type"] == "SamplerCustomAdvanced"]:
        values = [m["data"]["value"] for m in events if m["type"] == "progress" and m["data"].get("node") == sca_id]
        assert values and values[-1] == 4 and values == sorted(values), (sca_id, values)
