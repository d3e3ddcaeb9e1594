"""Write the example workflows (ComfyUI UI format, as the frontend saves them) and their thumbnails.

Each workflow is described below as nodes with widget values and links by input name; this script lays
them out and writes example_workflows/<name>.json and <name>.jpg. The server tests load these files
and run them on a real ComfyUI.

    python tools/make_workflows.py
"""
from __future__ import annotations

import json
import pathlib
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
}
SIZES = {"CheckpointLoaderSimple": (315, 98), "CLIPTextEncode": (400, 160), "KSampler": (315, 262),
         "HiResParallelRelayUpscaleSampler": (340, 430), "HiResParallelPatchParallelKSampler": (340, 400), "SaveImage": (420, 440), "PreviewImage": (300, 300)}


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
         "widgets_values": [0, "fixed", 30, 7.0, "euler", "karras", 1.0, 0, "auto", "exact", "auto", ""]},
        {"id": 6, "type": "VAEDecode", "pos": (1200, 40)},
        {"id": 7, "type": "SaveImage", "pos": (1440, 40), "widgets_values": ["HiResParallel_patch_parallel"]},
    ]
    links = [
        (1, "CLIP", 2, "clip"), (1, "CLIP", 3, "clip"),
        (1, "MODEL", 5, "model"), (2, "CONDITIONING", 5, "positive"), (3, "CONDITIONING", 5, "negative"),
        (4, "LATENT", 5, "latent_image"), (5, "LATENT", 6, "samples"), (1, "VAE", 6, "vae"), (6, "IMAGE", 7, "images"),
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
    "patch_parallel_ksampler": (patch_parallel_ksampler, "Patch-parallel KSampler: one 2048x2048 image, a band per GPU",
                                [("GPU 0 band", 70), ("GPU 1 band", 70), ("gathered 2048", 160)]),
}


def main() -> None:
    OUT.mkdir(exist_ok=True)
    for name, (make, title, boxes) in WORKFLOWS.items():
        (OUT / f"{name}.json").write_text(json.dumps(make(), indent=2) + "\n")
        thumbnail(OUT / f"{name}.jpg", title, boxes)
        print("wrote", OUT / f"{name}.json")


if __name__ == "__main__":
    main()
