"""Write the example workflows (ComfyUI UI format, as the frontend saves them) and their thumbnails.

Each workflow is described below as nodes with widget values and links by input name; this script lays
them out and writes example_workflows/<name>.json and <name>.jpg. The server tests load these files
and run them on a real ComfyUI.

    python tools/make_workflows.py                 # all of them
    python tools/make_workflows.py NAME [NAME ...]  # only these (names of WORKFLOWS below)

The output is deterministic: rewriting an unchanged workflow gives the same bytes.
"""
from __future__ import annotations

import json
import pathlib
import sys
import uuid

OUT = pathlib.Path(__file__).resolve().parents[1] / "example_workflows"

# Output sockets of the node types we use: (name, type).
OUTPUTS = {
    "CheckpointLoaderSimple": [("MODEL", "MODEL"), ("CLIP", "CLIP"), ("VAE", "VAE")],
    "CLIPTextEncode": [("CONDITIONING", "CONDITIONING")],
    "EmptyLatentImage": [("LATENT", "LATENT")],
    "KSampler": [("LATENT", "LATENT")],
    "VAEDecode": [("IMAGE", "IMAGE")],
    "SaveImage": [],
    "PreviewImage": [],
    "HiResParallelRelayUpscaleSampler": [("LATENT", "LATENT")],
    "HiResParallelPatchParallelKSampler": [("LATENT", "LATENT")],
    "CFGGuider": [("GUIDER", "GUIDER")],
    "BasicScheduler": [("SIGMAS", "SIGMAS")],
    "RandomNoise": [("NOISE", "NOISE")],
    "SamplerCustomAdvanced": [("output", "LATENT"), ("denoised_output", "LATENT")],
    "HiResParallelParaTAASampler": [("SAMPLER", "SAMPLER")],
    "KSamplerSelect": [("SAMPLER", "SAMPLER")],
    "HiResParallelCoopGuider": [("GUIDER", "GUIDER")],
    "HiResParallelTimeDecoupledGuider": [("GUIDER", "GUIDER")],
    "HiResParallelStructureGuidedHiRes": [("MODEL", "MODEL")],
    "UNETLoader": [("MODEL", "MODEL")],
    "DualCLIPLoader": [("CLIP", "CLIP")],
    "CLIPLoader": [("CLIP", "CLIP")],
    "VAELoader": [("VAE", "VAE")],
    "FluxGuidance": [("CONDITIONING", "CONDITIONING")],
    "ConditioningZeroOut": [("CONDITIONING", "CONDITIONING")],
    "EmptySD3LatentImage": [("LATENT", "LATENT")],
    "ModelSamplingSD3": [("MODEL", "MODEL")],
    "EmptyHunyuanLatentVideo": [("LATENT", "LATENT")],
    "SaveAnimatedWEBP": [],
}
# Socket (non-widget) inputs of those types: (name, type, optional).
INPUTS = {
    "CLIPTextEncode": [("clip", "CLIP")],
    "KSampler": [("model", "MODEL"), ("positive", "CONDITIONING"), ("negative", "CONDITIONING"),
                 ("latent_image", "LATENT")],
    "VAEDecode": [("samples", "LATENT"), ("vae", "VAE")],
    "SaveImage": [("images", "IMAGE")],
    "PreviewImage": [("images", "IMAGE")],
    "HiResParallelRelayUpscaleSampler": [("model", "MODEL"), ("positive", "CONDITIONING"),
                                         ("negative", "CONDITIONING"), ("latent_image", "LATENT"), ("vae", "VAE")],
    "HiResParallelPatchParallelKSampler": [("model", "MODEL"), ("positive", "CONDITIONING"),
                                           ("negative", "CONDITIONING"), ("latent_image", "LATENT")],
    "CFGGuider": [("model", "MODEL"), ("positive", "CONDITIONING"), ("negative", "CONDITIONING")],
    "BasicScheduler": [("model", "MODEL")],
    "SamplerCustomAdvanced": [("noise", "NOISE"), ("guider", "GUIDER"), ("sampler", "SAMPLER"), ("sigmas", "SIGMAS"),
                              ("latent_image", "LATENT")],
    "HiResParallelCoopGuider": [("model_a", "MODEL"), ("positive_a", "CONDITIONING"), ("negative_a", "CONDITIONING"),
                                ("model_b", "MODEL"), ("positive_b", "CONDITIONING"), ("negative_b", "CONDITIONING"),
                                ("vae_a", "VAE"), ("vae_b", "VAE")],
    "HiResParallelTimeDecoupledGuider": [("model_a", "MODEL"), ("positive_a", "CONDITIONING"),
                                         ("negative_a", "CONDITIONING"), ("model_b", "MODEL"),
                                         ("positive_b", "CONDITIONING"), ("negative_b", "CONDITIONING"),
                                         ("vae_a", "VAE"), ("vae_b", "VAE")],
    "HiResParallelStructureGuidedHiRes": [("model", "MODEL")],
    "FluxGuidance": [("conditioning", "CONDITIONING")],
    "ConditioningZeroOut": [("conditioning", "CONDITIONING")],
    "ModelSamplingSD3": [("model", "MODEL")],
    "SaveAnimatedWEBP": [("images", "IMAGE")],
}
SIZES = {"CheckpointLoaderSimple": (315, 98), "CLIPTextEncode": (400, 160), "KSampler": (315, 262),
         "HiResParallelRelayUpscaleSampler": (340, 430), "HiResParallelPatchParallelKSampler": (340, 400), "SaveImage": (420, 440), "PreviewImage": (300, 300),
         "HiResParallelParaTAASampler": (340, 370), "SamplerCustomAdvanced": (300, 110),
         "HiResParallelCoopGuider": (340, 480), "HiResParallelTimeDecoupledGuider": (340, 330),
         "HiResParallelStructureGuidedHiRes": (340, 400), "UNETLoader": (315, 82), "DualCLIPLoader": (315, 130),
         "CLIPLoader": (315, 106), "VAELoader": (315, 58), "FluxGuidance": (317, 58), "ConditioningZeroOut": (317, 26),
         "EmptySD3LatentImage": (315, 106), "ModelSamplingSD3": (315, 58), "EmptyHunyuanLatentVideo": (315, 130),
         "SaveAnimatedWEBP": (420, 460)}


def build(nodes: list[dict], links: list[tuple[int, str, int, str]]) -> dict:
    """nodes: {id, type, pos, widgets_values, title?}; links: (from_id, output name, to_id, input name)."""
    by_id = {n["id"]: n for n in nodes}
    out_nodes = []
    for order, n in enumerate(nodes):
        t = n["type"]
        node = {
            "id": n["id"], "type": t, "pos": list(n["pos"]), "size": list(SIZES.get(t, (315, 120))), "flags": {},
            "order": order, "mode": 0,
            "inputs": [{"name": name, "type": typ, "link": None} for name, typ in INPUTS.get(t, [])],
            "outputs": [{"name": name, "type": typ, "links": [], "slot_index": i}
                        for i, (name, typ) in enumerate(OUTPUTS[t])],
            "properties": {"Node name for S&R": t},
            "widgets_values": n.get("widgets_values", []),
        }
        if "title" in n:
            node["title"] = n["title"]
        out_nodes.append(node)
    nodes_by_id = {n["id"]: n for n in out_nodes}
    out_links = []
    for link_id, (src, out_name, dst, in_name) in enumerate(links, start=1):
        s, d = nodes_by_id[src], nodes_by_id[dst]
        slot = next(i for i, o in enumerate(s["outputs"]) if o["name"] == out_name)
        in_slot = next(i for i, x in enumerate(d["inputs"]) if x["name"] == in_name)
        typ = s["outputs"][slot]["type"]
        s["outputs"][slot]["links"].append(link_id)
        d["inputs"][in_slot]["link"] = link_id
        out_links.append([link_id, src, slot, dst, in_slot, typ])
    for n in out_nodes:  # optional inputs left unconnected are not saved by the frontend
        n["inputs"] = [x for x in n["inputs"] if x["link"] is not None or x["name"] != "vae" or n["type"] == "VAEDecode"]
    assert set(by_id) == set(nodes_by_id)
    return {
        "id": str(uuid.uuid5(uuid.NAMESPACE_URL, "hires-parallel/" + json.dumps(links))),
        "revision": 0, "last_node_id": max(nodes_by_id), "last_link_id": len(out_links),
        "nodes": out_nodes, "links": out_links, "groups": [], "config": {},
        "extra": {"ds": {"scale": 0.8, "offset": [0, 0]}}, "version": 0.4,
    }


def relay_upscale_2x() -> dict:
    nodes = [
        {"id": 1, "type": "CheckpointLoaderSimple", "pos": (20, 200), "widgets_values": ["v1-5-pruned-emaonly.safetensors"]},
        {"id": 2, "type": "CLIPTextEncode", "pos": (380, 40), "title": "Positive",
         "widgets_values": ["a lighthouse on a cliff above the sea at sunset, wide view, highly detailed"]},
        {"id": 3, "type": "CLIPTextEncode", "pos": (380, 240), "title": "Negative",
         "widgets_values": ["blurry, lowres, duplicate, watermark"]},
        {"id": 4, "type": "EmptyLatentImage", "pos": (380, 440), "widgets_values": [512, 512, 1]},
        {"id": 5, "type": "KSampler", "pos": (820, 40), "title": "First pass (native size)",
         "widgets_values": [0, "fixed", 20, 7.0, "euler", "karras", 1.0]},
        {"id": 6, "type": "HiResParallelRelayUpscaleSampler", "pos": (1180, 40), "title": "Relay 2x",
         "widgets_values": [2.0, 0, "fixed", 12, 7.0, "euler", "karras", 4, 0.3, "timestep", 500.0, "nearest (latent)"]},
        {"id": 7, "type": "VAEDecode", "pos": (1560, 40)},
        {"id": 8, "type": "SaveImage", "pos": (1800, 40), "widgets_values": ["HiResParallel_relay_2x"]},
        {"id": 9, "type": "VAEDecode", "pos": (1180, 520)},
        {"id": 10, "type": "PreviewImage", "pos": (1420, 520), "title": "First pass preview"},
    ]
    links = [
        (1, "CLIP", 2, "clip"), (1, "CLIP", 3, "clip"),
        (1, "MODEL", 5, "model"), (2, "CONDITIONING", 5, "positive"), (3, "CONDITIONING", 5, "negative"),
        (4, "LATENT", 5, "latent_image"),
        (1, "MODEL", 6, "model"), (2, "CONDITIONING", 6, "positive"), (3, "CONDITIONING", 6, "negative"),
        (5, "LATENT", 6, "latent_image"),
        (6, "LATENT", 7, "samples"), (1, "VAE", 7, "vae"), (7, "IMAGE", 8, "images"),
        (5, "LATENT", 9, "samples"), (1, "VAE", 9, "vae"), (9, "IMAGE", 10, "images"),
    ]
    return build(nodes, links)


def patch_parallel_ksampler() -> dict:
    nodes = [
        {"id": 1, "type": "CheckpointLoaderSimple", "pos": (20, 200), "widgets_values": ["sd_xl_base_1.0.safetensors"]},
        {"id": 2, "type": "CLIPTextEncode", "pos": (380, 40), "title": "Positive",
         "widgets_values": ["a vast mountain valley with one castle on a hill, morning light, highly detailed"]},
        {"id": 3, "type": "CLIPTextEncode", "pos": (380, 240), "title": "Negative",
         "widgets_values": ["blurry, lowres, duplicate, watermark"]},
        {"id": 4, "type": "EmptyLatentImage", "pos": (380, 440), "widgets_values": [2048, 2048, 1]},
        {"id": 5, "type": "HiResParallelPatchParallelKSampler", "pos": (820, 40), "title": "Patch-Parallel KSampler",
         "widgets_values": [0, "fixed", 30, 7.0, "euler", "karras", 1.0, 0, "auto", "auto", "auto", "", 0, 0.3, -1.0,
                            "auto", "share", "auto"]},
        {"id": 6, "type": "VAEDecode", "pos": (1200, 40)},
        {"id": 7, "type": "SaveImage", "pos": (1440, 40), "widgets_values": ["HiResParallel_patch_parallel"]},
    ]
    links = [
        (1, "CLIP", 2, "clip"), (1, "CLIP", 3, "clip"),
        (1, "MODEL", 5, "model"), (2, "CONDITIONING", 5, "positive"), (3, "CONDITIONING", 5, "negative"),
        (4, "LATENT", 5, "latent_image"), (5, "LATENT", 6, "samples"), (1, "VAE", 6, "vae"), (6, "IMAGE", 7, "images"),
    ]
    return build(nodes, links)


def parataa_sampler() -> dict:
    nodes = [
        {"id": 1, "type": "CheckpointLoaderSimple", "pos": (20, 200), "widgets_values": ["v1-5-pruned-emaonly.safetensors"]},
        {"id": 2, "type": "CLIPTextEncode", "pos": (380, 40), "title": "Positive",
         "widgets_values": ["a red fox in a snowy birch forest, soft morning light, highly detailed"]},
        {"id": 3, "type": "CLIPTextEncode", "pos": (380, 240), "title": "Negative",
         "widgets_values": ["blurry, lowres, watermark"]},
        {"id": 4, "type": "EmptyLatentImage", "pos": (380, 440), "widgets_values": [512, 512, 1]},
        {"id": 5, "type": "CFGGuider", "pos": (820, 40), "widgets_values": [7.0]},
        {"id": 6, "type": "BasicScheduler", "pos": (820, 200), "widgets_values": ["karras", 50, 1.0]},
        {"id": 7, "type": "RandomNoise", "pos": (820, 340), "widgets_values": [0, "fixed"]},
        {"id": 8, "type": "HiResParallelParaTAASampler", "pos": (820, 460), "title": "ParaTAA Sampler (DDIM, 50 steps)",
         "widgets_values": ["ddim", 1.0, 1.0, 0, 20, 2, 0.001, 0.001, 0, 0, True, 0]},
        {"id": 9, "type": "SamplerCustomAdvanced", "pos": (1200, 40)},
        {"id": 10, "type": "VAEDecode", "pos": (1540, 40)},
        {"id": 11, "type": "SaveImage", "pos": (1780, 40), "widgets_values": ["HiResParallel_parataa"]},
    ]
    links = [
        (1, "CLIP", 2, "clip"), (1, "CLIP", 3, "clip"),
        (1, "MODEL", 5, "model"), (2, "CONDITIONING", 5, "positive"), (3, "CONDITIONING", 5, "negative"),
        (1, "MODEL", 6, "model"),
        (7, "NOISE", 9, "noise"), (5, "GUIDER", 9, "guider"), (8, "SAMPLER", 9, "sampler"), (6, "SIGMAS", 9, "sigmas"),
        (4, "LATENT", 9, "latent_image"),
        (9, "output", 10, "samples"), (1, "VAE", 10, "vae"), (10, "IMAGE", 11, "images"),
    ]
    return build(nodes, links)


def coop_sd15_sdxl() -> dict:
    """SD1.5 at 512 px and SDXL at 1024 px on one image: Coop Guider (A drives, B joins early) and the
    time-decoupled switch (SD1.5 composes until t = 500, SDXL finishes at twice the size)."""
    nodes = [
        {"id": 1, "type": "CheckpointLoaderSimple", "pos": (20, 120), "title": "Model A: SD1.5 (512 px)",
         "widgets_values": ["v1-5-pruned-emaonly.safetensors"]},
        {"id": 2, "type": "CheckpointLoaderSimple", "pos": (20, 560), "title": "Model B: SDXL (1024 px)",
         "widgets_values": ["sd_xl_base_1.0.safetensors"]},
        {"id": 3, "type": "CLIPTextEncode", "pos": (380, 0), "title": "Positive A",
         "widgets_values": ["a harbour town on a hillside at dusk, boats, warm window lights, highly detailed"]},
        {"id": 4, "type": "CLIPTextEncode", "pos": (380, 200), "title": "Negative A",
         "widgets_values": ["blurry, lowres, watermark"]},
        {"id": 5, "type": "CLIPTextEncode", "pos": (380, 440), "title": "Positive B",
         "widgets_values": ["a harbour town on a hillside at dusk, boats, warm window lights, highly detailed"]},
        {"id": 6, "type": "CLIPTextEncode", "pos": (380, 640), "title": "Negative B",
         "widgets_values": ["blurry, lowres, watermark"]},
        {"id": 7, "type": "EmptyLatentImage", "pos": (380, 860), "widgets_values": [512, 512, 1]},
        {"id": 8, "type": "HiResParallelCoopGuider", "pos": (820, 0), "title": "Coop Guider (SD1.5 + SDXL at 2x)",
         "widgets_values": [7.0, 7.0, 0.5, 0.2, "linear", 0.0, 0.8, 2, 2.0, "auto", "transfer"]},
        {"id": 9, "type": "HiResParallelTimeDecoupledGuider", "pos": (820, 520),
         "title": "Time-Decoupled Guider (SD1.5 -> SDXL at t=500)",
         "widgets_values": [7.0, 7.0, 500.0, 2.0, "auto", "transfer"]},
        {"id": 10, "type": "KSamplerSelect", "pos": (820, 880), "widgets_values": ["euler"]},
        {"id": 11, "type": "BasicScheduler", "pos": (820, 980), "widgets_values": ["karras", 20, 1.0]},
        {"id": 12, "type": "RandomNoise", "pos": (820, 1120), "widgets_values": [0, "fixed"]},
        {"id": 13, "type": "SamplerCustomAdvanced", "pos": (1220, 0), "title": "Coop sampling (A's space)"},
        {"id": 14, "type": "SamplerCustomAdvanced", "pos": (1220, 520), "title": "Time-decoupled sampling (B's space)"},
        {"id": 15, "type": "VAEDecode", "pos": (1560, 0), "title": "Decode with VAE A"},
        {"id": 16, "type": "SaveImage", "pos": (1800, 0), "widgets_values": ["HiResParallel_coop"]},
        {"id": 17, "type": "VAEDecode", "pos": (1560, 520), "title": "Decode with VAE B"},
        {"id": 18, "type": "SaveImage", "pos": (1800, 520), "widgets_values": ["HiResParallel_time_decoupled"]},
    ]
    pair = []
    for guider in (8, 9):
        pair += [
            (1, "MODEL", guider, "model_a"), (3, "CONDITIONING", guider, "positive_a"),
            (4, "CONDITIONING", guider, "negative_a"), (2, "MODEL", guider, "model_b"),
            (5, "CONDITIONING", guider, "positive_b"), (6, "CONDITIONING", guider, "negative_b"),
            (1, "VAE", guider, "vae_a"), (2, "VAE", guider, "vae_b"),
        ]
    links = [
        (1, "CLIP", 3, "clip"), (1, "CLIP", 4, "clip"), (2, "CLIP", 5, "clip"), (2, "CLIP", 6, "clip"),
        *pair,
        (1, "MODEL", 11, "model"),
        (12, "NOISE", 13, "noise"), (8, "GUIDER", 13, "guider"), (10, "SAMPLER", 13, "sampler"),
        (11, "SIGMAS", 13, "sigmas"), (7, "LATENT", 13, "latent_image"),
        (12, "NOISE", 14, "noise"), (9, "GUIDER", 14, "guider"), (10, "SAMPLER", 14, "sampler"),
        (11, "SIGMAS", 14, "sigmas"), (7, "LATENT", 14, "latent_image"),
        (13, "output", 15, "samples"), (1, "VAE", 15, "vae"), (15, "IMAGE", 16, "images"),
        (14, "output", 17, "samples"), (2, "VAE", 17, "vae"), (17, "IMAGE", 18, "images"),
    ]
    return build(nodes, links)


def structure_guided_hires() -> dict:
    """SDXL far above its native 1024: one patched model, a square 2048 branch and a 1024x2048 branch."""
    nodes = [
        {"id": 1, "type": "CheckpointLoaderSimple", "pos": (20, 200), "widgets_values": ["sd_xl_base_1.0.safetensors"]},
        {"id": 2, "type": "CLIPTextEncode", "pos": (380, 40), "title": "Positive",
         "widgets_values": ["a lone lighthouse on a rocky island, stormy sea, dramatic clouds, highly detailed"]},
        {"id": 3, "type": "CLIPTextEncode", "pos": (380, 240), "title": "Negative",
         "widgets_values": ["blurry, lowres, duplicate, watermark"]},
        {"id": 4, "type": "HiResParallelStructureGuidedHiRes", "pos": (380, 440), "title": "Structure-Guided HiRes",
         "widgets_values": [0, 1.0, "cosine", 0.5, True, "decoder, coarsest level", True, False, 4, 0, 8, True, 0.1]},
        {"id": 5, "type": "EmptyLatentImage", "pos": (820, 40), "widgets_values": [2048, 2048, 1]},
        {"id": 6, "type": "KSampler", "pos": (1100, 40), "title": "2048 x 2048",
         "widgets_values": [0, "fixed", 30, 7.0, "euler", "karras", 1.0]},
        {"id": 7, "type": "VAEDecode", "pos": (1450, 40)},
        {"id": 8, "type": "SaveImage", "pos": (1690, 40), "widgets_values": ["HiResParallel_asg_2048x2048"]},
        {"id": 9, "type": "EmptyLatentImage", "pos": (820, 520), "widgets_values": [1024, 2048, 1]},
        {"id": 10, "type": "KSampler", "pos": (1100, 520), "title": "1024 x 2048",
         "widgets_values": [0, "fixed", 30, 7.0, "euler", "karras", 1.0]},
        {"id": 11, "type": "VAEDecode", "pos": (1450, 520)},
        {"id": 12, "type": "SaveImage", "pos": (1690, 520), "widgets_values": ["HiResParallel_asg_1024x2048"]},
    ]
    links = [
        (1, "CLIP", 2, "clip"), (1, "CLIP", 3, "clip"), (1, "MODEL", 4, "model"),
        (4, "MODEL", 6, "model"), (2, "CONDITIONING", 6, "positive"), (3, "CONDITIONING", 6, "negative"),
        (5, "LATENT", 6, "latent_image"), (6, "LATENT", 7, "samples"), (1, "VAE", 7, "vae"), (7, "IMAGE", 8, "images"),
        (4, "MODEL", 10, "model"), (2, "CONDITIONING", 10, "positive"), (3, "CONDITIONING", 10, "negative"),
        (9, "LATENT", 10, "latent_image"), (10, "LATENT", 11, "samples"), (1, "VAE", 11, "vae"),
        (11, "IMAGE", 12, "images"),
    ]
    return build(nodes, links)


# Patch-Parallel KSampler widgets after denoise: devices (0 = every GPU), device_kind, mode, cfg_parallel,
# device_weights, warmup, partial_fraction, partial_fraction_late, groupnorm, comfy_gpu, sequence_attention.
PARALLEL_DEFAULTS = [0, "auto", "exact", "auto", "", 0, 0.3, -1.0, "auto", "share", "auto"]


def flux_patch_parallel_2048() -> dict:
    """Flux.1-dev from its split files at 2048x2048, every step split over all GPUs (token bands that
    exchange attention keys/values). cfg 1 as Flux-dev wants: the guidance is FluxGuidance's 3.5, the
    negative (zeroed) is skipped by ComfyUI, so every GPU takes a band."""
    nodes = [
        {"id": 1, "type": "UNETLoader", "pos": (20, 40), "widgets_values": ["flux1-dev.safetensors", "default"]},
        {"id": 2, "type": "DualCLIPLoader", "pos": (20, 200),
         "widgets_values": ["clip_l.safetensors", "t5xxl_fp16.safetensors", "flux", "default"]},
        {"id": 3, "type": "VAELoader", "pos": (20, 420), "widgets_values": ["ae.safetensors"]},
        {"id": 4, "type": "CLIPTextEncode", "pos": (380, 40), "title": "Prompt",
         "widgets_values": ["a sprawling alpine village at golden hour seen from a hillside, snow-capped peaks, "
                            "wooden chalets with warm lit windows, a winding river, pine forest, crisp air, "
                            "ultra detailed, sharp focus, 35mm photograph"]},
        {"id": 5, "type": "FluxGuidance", "pos": (820, 40), "widgets_values": [3.5]},
        {"id": 6, "type": "ConditioningZeroOut", "pos": (820, 160), "title": "Negative (zeroed, unused at cfg 1)"},
        {"id": 7, "type": "EmptySD3LatentImage", "pos": (820, 260), "widgets_values": [2048, 2048, 1]},
        {"id": 8, "type": "HiResParallelPatchParallelKSampler", "pos": (1180, 40),
         "title": "Patch-Parallel KSampler (all GPUs)",
         "widgets_values": [0, "fixed", 20, 1.0, "euler", "simple", 1.0, *PARALLEL_DEFAULTS]},
        {"id": 9, "type": "VAEDecode", "pos": (1560, 40)},
        {"id": 10, "type": "SaveImage", "pos": (1800, 40), "widgets_values": ["HiResParallel_flux_2048"]},
    ]
    links = [
        (2, "CLIP", 4, "clip"), (4, "CONDITIONING", 5, "conditioning"), (4, "CONDITIONING", 6, "conditioning"),
        (1, "MODEL", 8, "model"), (5, "CONDITIONING", 8, "positive"), (6, "CONDITIONING", 8, "negative"),
        (7, "LATENT", 8, "latent_image"), (8, "LATENT", 9, "samples"), (3, "VAE", 9, "vae"), (9, "IMAGE", 10, "images"),
    ]
    return build(nodes, links)


def wan_t2v_patch_parallel() -> dict:
    """Wan 2.1 14B text-to-video, 81 frames at 1280x720, every step split over all GPUs (cfg 6: with an even
    number of GPUs, cond and uncond on one half each, the video's tokens split in bands within each half)."""
    nodes = [
        {"id": 1, "type": "UNETLoader", "pos": (20, 40),
         "widgets_values": ["wan2.1_t2v_14B_fp16.safetensors", "default"]},
        {"id": 2, "type": "CLIPLoader", "pos": (20, 200),
         "widgets_values": ["umt5_xxl_fp8_e4m3fn_scaled.safetensors", "wan", "default"]},
        {"id": 3, "type": "VAELoader", "pos": (20, 380), "widgets_values": ["wan_2.1_vae.safetensors"]},
        {"id": 4, "type": "CLIPTextEncode", "pos": (380, 40), "title": "Positive",
         "widgets_values": ["a red fox trotting through fresh snow in a quiet birch forest, soft morning light, "
                            "snowflakes drifting, the camera slowly tracks alongside it, cinematic, highly detailed"]},
        {"id": 5, "type": "CLIPTextEncode", "pos": (380, 240), "title": "Negative",
         "widgets_values": ["oversaturated, overexposed, static, blurry details, subtitles, still image, gray, worst "
                            "quality, low quality, jpeg artifacts, ugly, deformed, extra limbs, disfigured, messy "
                            "background, walking backwards"]},
        {"id": 6, "type": "EmptyHunyuanLatentVideo", "pos": (380, 440), "widgets_values": [1280, 720, 81, 1]},
        {"id": 7, "type": "ModelSamplingSD3", "pos": (820, 40), "widgets_values": [8.0]},
        {"id": 8, "type": "HiResParallelPatchParallelKSampler", "pos": (1180, 40),
         "title": "Patch-Parallel KSampler (all GPUs)",
         "widgets_values": [0, "fixed", 30, 6.0, "uni_pc", "simple", 1.0, *PARALLEL_DEFAULTS]},
        {"id": 9, "type": "VAEDecode", "pos": (1560, 40)},
        {"id": 10, "type": "SaveAnimatedWEBP", "pos": (1800, 40),
         "widgets_values": ["HiResParallel_wan_t2v", 16.0, False, 90, "default"]},
    ]
    links = [
        (2, "CLIP", 4, "clip"), (2, "CLIP", 5, "clip"), (1, "MODEL", 7, "model"),
        (7, "MODEL", 8, "model"), (4, "CONDITIONING", 8, "positive"), (5, "CONDITIONING", 8, "negative"),
        (6, "LATENT", 8, "latent_image"), (8, "LATENT", 9, "samples"), (3, "VAE", 9, "vae"), (9, "IMAGE", 10, "images"),
    ]
    return build(nodes, links)


def thumbnail(path: pathlib.Path, title: str, boxes: list[tuple[str, int]]) -> None:
    """A schematic of the pipeline: one box per stage, sized by its output resolution."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (512, 288), (24, 27, 34))
    d = ImageDraw.Draw(img)
    d.text((16, 12), title, fill=(235, 235, 235))
    x = 24
    for i, (label, side) in enumerate(boxes):
        y0 = 160 - side // 2
        d.rectangle([x, y0, x + side, y0 + side], outline=(120, 180, 255), width=3, fill=(40, 60, 90))
        d.text((x + 6, y0 + side + 8), label, fill=(210, 210, 210))
        if i + 1 < len(boxes):
            d.line([x + side + 10, 160, x + side + 50, 160], fill=(255, 200, 90), width=4)
            d.polygon([(x + side + 50, 152), (x + side + 62, 160), (x + side + 50, 168)], fill=(255, 200, 90))
        x += side + 80
    img.save(path, quality=90)


WORKFLOWS = {
    "relay_upscale_2x": (relay_upscale_2x, "Relay upscale 2x: 512 -> 1024, block noise at t=500",
                         [("512 txt2img", 80), ("upsample + block noise", 120), ("1024 relay", 160)]),
    "patch_parallel_ksampler": (patch_parallel_ksampler, "Patch-parallel KSampler: 2048x2048 on all GPUs, planned",
                                [("GPU 0 band", 70), ("GPU 1 band", 70), ("gathered 2048", 160)]),
    "parataa_sampler": (parataa_sampler, "ParaTAA: 50 DDIM steps solved in parallel rounds",
                        [("all steps, round 1", 70), ("round k", 100), ("converged", 130)]),
    "coop_sd15_sdxl": (coop_sd15_sdxl, "PanGu-Draw: SD1.5 (512) and SDXL (1024) on one image",
                       [("SD1.5 512", 80), ("VAE bridge", 100), ("SDXL 1024", 160)]),
    "structure_guided_hires": (structure_guided_hires, "Structure-guided hires: SDXL at 2048x2048 and 1024x2048",
                               [("strided views", 70), ("key-view guidance", 100), ("windows 2048", 160)]),
    "flux_patch_parallel_2048": (flux_patch_parallel_2048, "Flux.1-dev at 2048x2048 on all GPUs",
                                 [("GPU 0 tokens", 70), ("GPU 1 tokens", 70), ("gathered K/V, 2048", 160)]),
    "wan_t2v_patch_parallel": (wan_t2v_patch_parallel, "Wan 2.1 text-to-video over all GPUs",
                               [("cond | uncond", 80), ("frame tokens / GPU", 100), ("81 frames 720p", 130)]),
}


def main(names: list[str] | None = None) -> None:
    unknown = sorted(set(names or []) - set(WORKFLOWS))
    if unknown:
        raise SystemExit("unknown workflow(s) {}; known: {}".format(", ".join(unknown), ", ".join(WORKFLOWS)))
    OUT.mkdir(exist_ok=True)
    for name, (make, title, boxes) in WORKFLOWS.items():
        if names and name not in names:
            continue
        (OUT / f"{name}.json").write_text(json.dumps(make(), indent=2) + "\n")
        thumbnail(OUT / f"{name}.jpg", title, boxes)
        print("wrote", OUT / f"{name}.json")


if __name__ == "__main__":
    main(sys.argv[1:])
