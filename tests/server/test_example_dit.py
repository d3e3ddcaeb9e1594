"""Our DiT example workflows (Flux.1-dev at 2048 px, Wan 2.1 text-to-video), as a user loads them, run on a
real ComfyUI server over two CPU worker processes.

The split loaders are swapped for the test pack's (UNETLoader -> HiResTestUNETLoader: the tiny seeded DiT
the file name stands for; CLIPLoader / DualCLIPLoader -> HiResTestTextEncoderLoader: seeded word
embeddings of the family's text dims; VAELoader -> HiResTestVAELoader: exact linear image / video VAE);
sizes and step counts are lowered so a CPU runs each workflow in seconds. The rest of the graph (ComfyUI's
own FluxGuidance, ConditioningZeroOut, EmptySD3LatentImage, ModelSamplingSD3, EmptyHunyuanLatentVideo,
VAEDecode, SaveImage, SaveAnimatedWEBP) is the saved file's.
"""
from __future__ import annotations

import json
from pathlib import Path

from PIL import Image

from support.workflow import load_workflow, ui_to_api, validate_ui_workflow

EXAMPLES = Path(__file__).resolve().parents[2] / "example_workflows"
SAMPLER = "HiResParallelPatchParallelKSampler"
LOADERS = {
    "UNETLoader": "HiResTestUNETLoader",
    "CLIPLoader": "HiResTestTextEncoderLoader",
    "DualCLIPLoader": "HiResTestTextEncoderLoader",
    "VAELoader": "HiResTestVAELoader",
}


def _nodes(prompt: dict, class_type: str) -> list[dict]:
    return [n for n in prompt.values() if n["class_type"] == class_type]


def _prompt(name: str, object_info: dict) -> dict:
    wf = load_workflow(EXAMPLES / f"{name}.json")
    validate_ui_workflow(wf, object_info)
    missing = sorted(v for v in set(LOADERS.values()) if v not in object_info)
    assert not missing, f"test pack loaders not registered: {missing}"
    return ui_to_api(wf, object_info, replace_types=LOADERS)


def _run_two_cpu_ranks(comfy_server, prompt: dict, ks: dict) -> tuple[dict, list]:
    """Queue ``prompt`` with its sampler on 2 CPU ranks, 3 steps; the history and per-step progress values."""
    assert ks["inputs"]["devices"] == 0 and ks["inputs"]["device_kind"] == "auto"  # the file's: all GPUs
    assert ks["inputs"]["mode"] == "exact" and ks["inputs"]["sequence_attention"] == "auto"
    ks["inputs"].update(steps=3, devices=2, device_kind="cpu")
    prompt_id = comfy_server.queue(prompt)
    history = comfy_server.wait(prompt_id, timeout=300)
    ks_id = next(k for k, v in prompt.items() if v is ks)
    events = comfy_server.progress_events(prompt_id)
    steps = [m["data"]["value"] for m in events if m["type"] == "progress" and m["data"].get("node") == ks_id]
    assert steps and steps[-1] == 3, f"no per-step progress from the patch-parallel sampler: {steps}"
    return history, steps


def _assert_sequence_parallel_last_run(comfy_server) -> dict:
    """The pool's last run: 2 ranks that each took a band of the tokens and gathered the others' K/V."""
    out = comfy_server.run({"1": {"class_type": "HiResParallelPoolStatus", "inputs": {"refresh": 1}}}, timeout=60)
    status = json.loads(out["outputs"]["1"]["text"][0])
    run = status["last_run"]
    assert run["world_size"] == 2 and run["cfg_parallel"] is False and run["mode"] == "exact", run
    assert len(run["ranks"]) == 2
    for rank in run["ranks"]:
        # sequence_attention "auto" on 2 devices: gathered K/V (Ulysses pays from 3 devices on)
        assert rank["attention"] == ["gathered_kv"], rank.get("attention")
        assert rank["comm"]["bytes_sent"].get("kv", 0) > 0, rank["comm"]
        assert rank["steps"] == 3
    return run


def test_flux_2048_example_runs_on_two_cpu_ranks(comfy_server, object_info, test_pack):
    prompt = _prompt("flux_patch_parallel_2048", object_info)
    (unet,) = _nodes(prompt, "HiResTestUNETLoader")
    assert unet["inputs"]["unet_name"] == "flux1-dev.safetensors"
    (te,) = _nodes(prompt, "HiResTestTextEncoderLoader")
    assert te["inputs"]["type"] == "flux" and te["inputs"]["clip_name2"] == "t5xxl_fp16.safetensors"
    (guidance,) = _nodes(prompt, "FluxGuidance")
    assert guidance["inputs"]["guidance"] == 3.5
    (empty,) = _nodes(prompt, "EmptySD3LatentImage")
    assert (empty["inputs"]["width"], empty["inputs"]["height"]) == (2048, 2048)
    empty["inputs"].update(width=256, height=320)
    (ks,) = _nodes(prompt, SAMPLER)
    # cfg 1 (Flux-dev): ComfyUI skips the negative, so cfg_parallel "auto" is off and both ranks take bands
    assert ks["inputs"]["cfg"] == 1.0 and ks["inputs"]["cfg_parallel"] == "auto"
    assert ks["inputs"]["comfy_gpu"] == "share"

    history, _ = _run_two_cpu_ranks(comfy_server, prompt, ks)
    pngs = [p for p in comfy_server.output_files(history) if p.suffix == ".png"]
    assert len(pngs) == 1 and Image.open(pngs[0]).size == (256, 320), pngs
    _assert_sequence_parallel_last_run(comfy_server)


def test_wan_t2v_example_runs_on_two_cpu_ranks(comfy_server, object_info, test_pack):
    prompt = _prompt("wan_t2v_patch_parallel", object_info)
    (unet,) = _nodes(prompt, "HiResTestUNETLoader")
    assert unet["inputs"]["unet_name"] == "wan2.1_t2v_14B_fp16.safetensors"
    (te,) = _nodes(prompt, "HiResTestTextEncoderLoader")
    assert te["inputs"]["type"] == "wan"
    (shift,) = _nodes(prompt, "ModelSamplingSD3")
    assert shift["inputs"]["shift"] == 8.0
    (empty,) = _nodes(prompt, "EmptyHunyuanLatentVideo")
    assert empty["inputs"] == {"width": 1280, "height": 720, "length": 81, "batch_size": 1}
    empty["inputs"].update(width=128, height=96, length=9)  # latent (1, 16, 3, 12, 16): 3 latent frames
    (ks,) = _nodes(prompt, SAMPLER)
    assert ks["inputs"]["cfg"] == 6.0 and ks["inputs"]["sampler_name"] == "uni_pc"
    # cfg 6 on 2 devices: cfg_parallel "auto" would put cond and uncond on one device each (no bands);
    # "off" makes both ranks split the video's tokens, the sequence-parallel path this test is about.
    assert ks["inputs"]["cfg_parallel"] == "auto"
    ks["inputs"]["cfg_parallel"] = "off"

    history, _ = _run_two_cpu_ranks(comfy_server, prompt, ks)
    webps = [p for p in comfy_server.output_files(history) if p.suffix == ".webp"]
    assert len(webps) == 1, comfy_server.output_files(history)
    video = Image.open(webps[0])
    # Wan's VAE (and the test one) decodes T latent frames into 1 + 4 (T - 1): 9 frames
    assert video.size == (128, 96) and getattr(video, "n_frames", 1) == 9, (video.size, getattr(video, "n_frames", 1))
    _assert_sequence_parallel_last_run(comfy_server)
