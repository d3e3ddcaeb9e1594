"""support.workflow on synthetic UI workflows: no server, no ComfyUI import.

The node definitions below are copied (trimmed) from ComfyUI 0.3.64's /object_info.
"""
from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest

from support.workflow import ui_to_api, validate_ui_workflow, widget_layout, workflow_problems

TESTS = Path(__file__).resolve().parents[1]
SAMPLERS = ["euler", "euler_ancestral", "dpmpp_2m"]
SCHEDULERS = ["simple", "normal", "karras"]

OBJECT_INFO = {
    "CheckpointLoaderSimple": {
        "input": {"required": {"ckpt_name": [["a.safetensors", "b.safetensors"], {}]}},
        "input_order": {"required": ["ckpt_name"]},
        "output": ["MODEL", "CLIP", "VAE"], "output_name": ["MODEL", "CLIP", "VAE"],
    },
    "HiResTestCheckpointLoader": {
        "input": {"required": {"ckpt_name": ["STRING", {"default": "tiny_sd15.safetensors"}]},
                  "optional": {"weight_seed": ["INT", {"default": 0, "min": 0}]}},
        "input_order": {"required": ["ckpt_name"], "optional": ["weight_seed"]},
        "output": ["MODEL", "CLIP", "VAE"], "output_name": ["MODEL", "CLIP", "VAE"],
    },
    "WrongLoader": {
        "input": {"required": {"ckpt_name": ["STRING", {}]}},
        "input_order": {"required": ["ckpt_name"]},
        "output": ["CLIP", "MODEL", "VAE"], "output_name": ["CLIP", "MODEL", "VAE"],
    },
    "KSampler": {
        "input": {"required": {
            "model": ["MODEL", {}],
            "seed": ["INT", {"default": 0, "min": 0, "max": 18446744073709551615, "control_after_generate": True}],
            "steps": ["INT", {"default": 20, "min": 1, "max": 10000}],
            "cfg": ["FLOAT", {"default": 8.0, "min": 0.0, "max": 100.0}],
            "sampler_name": [SAMPLERS, {}],
            "scheduler": [SCHEDULERS, {}],
            "positive": ["CONDITIONING", {}],
            "negative": ["CONDITIONING", {}],
            "latent_image": ["LATENT", {}],
            "denoise": ["FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0}],
        }},
        "input_order": {"required": ["model", "seed", "steps", "cfg", "sampler_name", "scheduler", "positive",
                                     "negative", "latent_image", "denoise"]},
        "output": ["LATENT"], "output_name": ["LATENT"],
    },
    "CLIPTextEncode": {
        "input": {"required": {"text": ["STRING", {"multiline": True, "dynamicPrompts": True}], "clip": ["CLIP", {}]}},
        "input_order": {"required": ["text", "clip"]},
        "output": ["CONDITIONING"], "output_name": ["CONDITIONING"],
    },
    "EmptyLatentImage": {
        "input": {"required": {"width": ["INT", {"default": 512, "min": 16}], "height": ["INT", {"default": 512, "min": 16}],
                               "batch_size": ["INT", {"default": 1, "min": 1}]}},
        "input_order": {"required": ["width", "height", "batch_size"]},
        "output": ["LATENT"], "output_name": ["LATENT"],
    },
    "LatentUpscaleBy": {
        "input": {"required": {"samples": ["LATENT"], "upscale_method": [["nearest-exact", "bilinear", "area"]],
                               "scale_by": ["FLOAT", {"default": 1.5}]}},
        "input_order": {"required": ["samples", "upscale_method", "scale_by"]},
        "output": ["LATENT"], "output_name": ["LATENT"],
    },
    "SaveLatent": {
        "input": {"required": {"samples": ["LATENT"], "filename_prefix": ["STRING", {"default": "latents/ComfyUI"}]},
                  "hidden": {"prompt": "PROMPT"}},
        "input_order": {"required": ["samples", "filename_prefix"], "hidden": ["prompt"]},
        "output": [], "output_name": [], "output_node": True,
    },
    "VAEDecode": {
        "input": {"required": {"samples": ["LATENT"], "vae": ["VAE"]}},
        "input_order": {"required": ["samples", "vae"]},
        "output": ["IMAGE"], "output_name": ["IMAGE"],
    },
    "SaveImage": {
        "input": {"required": {"images": ["IMAGE"], "filename_prefix": ["STRING", {"default": "ComfyUI"}]}},
        "input_order": {"required": ["images", "filename_prefix"]},
        "output": [], "output_name": [], "output_node": True,
    },
    "RandomNoise": {
        "input": {"required": {"noise_seed": ["INT", {"default": 0, "min": 0, "control_after_generate": True}]}},
        "input_order": {"required": ["noise_seed"]},
        "output": ["NOISE"], "output_name": ["NOISE"],
    },
    "LoadImage": {
        "input": {"required": {"image": [["cat.png", "dog.png"], {"image_upload": True}]}},
        "input_order": {"required": ["image"]},
        "output": ["IMAGE", "MASK"], "output_name": ["IMAGE", "MASK"],
    },
    "ComboSeeded": {  # a combo with control_after_generate (control value + filter list follow it)
        "input": {"required": {"choice": ["COMBO", {"options": ["x", "y", "z"], "control_after_generate": True}],
                               "amount": ["FLOAT", {"default": 0.5}],
                               "tags": ["STRING", {"forceInput": True}]}},
        "input_order": {"required": ["choice", "amount", "tags"]},
        "output": ["FLOAT"], "output_name": ["FLOAT"],
    },
    "PrimitiveInt": {
        "input": {"required": {"value": ["INT", {"min": -9223372036854775807, "control_after_generate": True}]}},
        "input_order": {"required": ["value"]},
        "output": ["INT"], "output_name": ["INT"],
    },
    "ListWidget": {
        "input": {"required": {"values": ["STRING", {"default": ""}]}},
        "input_order": {"required": ["values"]},
        "output": ["STRING"], "output_name": ["STRING"],
    },
}


class UI:
    """Build a UI-format workflow the way the frontend stores it (links kept consistent)."""

    def __init__(self):
        self.nodes: dict[int, dict] = {}
        self.links: list[list] = []

    def node(self, nid, type_, widgets=None, *, inputs=(), outputs=(), mode=0, title=None):
        n = {
            "id": nid, "type": type_, "pos": [nid * 100, 0], "size": [200, 80], "flags": {}, "order": nid,
            "mode": mode,
            "inputs": [dict(name=name, type=t, link=None, **({"widget": {"name": name}} if w else {}))
                       for name, t, w in ((i + (False,))[:3] for i in inputs)],
            "outputs": [{"name": name, "type": t, "links": []} for name, t in outputs],
            "properties": {},
        }
        if widgets is not None:
            n["widgets_values"] = widgets
        if title:
            n["title"] = title
        self.nodes[nid] = n
        return self

    def link(self, src, src_slot, dst, dst_slot):
        lid = len(self.links) + 1
        t = self.nodes[src]["outputs"][src_slot]["type"]
        self.links.append([lid, src, src_slot, dst, dst_slot, t])
        self.nodes[src]["outputs"][src_slot]["links"].append(lid)
        self.nodes[dst]["inputs"][dst_slot]["link"] = lid
        return self

    def build(self) -> dict:
        return {
            "id": "00000000-0000-4000-8000-000000000000", "revision": 0,
            "last_node_id": max(self.nodes), "last_link_id": len(self.links),
            "nodes": list(self.nodes.values()), "links": self.links,
            "groups": [], "config": {}, "extra": {}, "version": 0.4,
        }


def _txt2img(ksampler_widgets) -> UI:
    return (
        UI()
        .node(4, "CheckpointLoaderSimple", ["b.safetensors"], outputs=[("MODEL", "MODEL"), ("CLIP", "CLIP"), ("VAE", "VAE")])
        .node(6, "CLIPTextEncode", ["a cat"], inputs=[("clip", "CLIP")], outputs=[("CONDITIONING", "CONDITIONING")])
        .node(7, "CLIPTextEncode", ["blurry"], inputs=[("clip", "CLIP")], outputs=[("CONDITIONING", "CONDITIONING")])
        .node(5, "EmptyLatentImage", [64, 96, 2], outputs=[("LATENT", "LATENT")])
        .node(3, "KSampler", ksampler_widgets,
              inputs=[("model", "MODEL"), ("positive", "CONDITIONING"), ("negative", "CONDITIONING"),
                      ("latent_image", "LATENT")],
              outputs=[("LATENT", "LATENT")])
        .node(8, "VAEDecode", [], inputs=[("samples", "LATENT"), ("vae", "VAE")], outputs=[("IMAGE", "IMAGE")])
        .node(9, "SaveImage", ["out/x"], inputs=[("images", "IMAGE")])
        .link(4, 0, 3, 0).link(4, 1, 6, 0).link(4, 1, 7, 0).link(6, 0, 3, 1).link(7, 0, 3, 2).link(5, 0, 3, 3)
        .link(3, 0, 8, 0).link(4, 2, 8, 1).link(8, 0, 9, 0)
    )


def test_converter_imports_without_comfyui():
    code = (
        "import sys; sys.path.insert(0, %r); import support.workflow, support.server; "
        "bad = [m for m in ('comfy', 'nodes', 'folder_paths', 'torch') if m in sys.modules]; "
        "assert not bad, bad; print('ok')" % str(TESTS)
    )
    env = {k: v for k, v in os.environ.items() if k != "COMFYUI_PATH"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/", env=env)
    assert r.returncode == 0 and "ok" in r.stdout, r.stdout + r.stderr


def test_seed_control_after_generate_value_is_skipped():
    wf = _txt2img([1234, "randomize", 7, 3.5, "dpmpp_2m", "karras", 0.6]).build()
    validate_ui_workflow(wf, OBJECT_INFO)
    p = ui_to_api(wf, OBJECT_INFO)
    assert p["3"] == {
        "class_type": "KSampler",
        "inputs": {"seed": 1234, "steps": 7, "cfg": 3.5, "sampler_name": "dpmpp_2m", "scheduler": "karras",
                   "denoise": 0.6, "model": ["4", 0], "positive": ["6", 0], "negative": ["7", 0],
                   "latent_image": ["5", 0]},
        "_meta": {"title": "KSampler"},
    }
    assert p["5"]["inputs"] == {"width": 64, "height": 96, "batch_size": 2}
    assert p["8"]["inputs"] == {"samples": ["3", 0], "vae": ["4", 2]}
    assert p["9"]["inputs"] == {"images": ["8", 0], "filename_prefix": "out/x"}
    assert set(p) == {"3", "4", "5", "6", "7", "8", "9"}


@pytest.mark.parametrize("widgets", [
    [1234, 7, 3.5, "dpmpp_2m", "karras", 0.6],  # no control value stored (older files)
    [1234, True, 7, 3.5, "dpmpp_2m", "karras", 0.6],  # boolean control (very old files)
    [1234, "fixed", 7, 3.5, "dpmpp_2m", "karras", 0.6],
])
def test_seed_widget_layout_variants(widgets):
    p = ui_to_api(_txt2img(widgets).build(), OBJECT_INFO)
    ks = p["3"]["inputs"]
    assert (ks["seed"], ks["steps"], ks["cfg"], ks["sampler_name"], ks["scheduler"], ks["denoise"]) == (
        1234, 7, 3.5, "dpmpp_2m", "karras", 0.6)


def test_noise_seed_and_combo_control_and_force_input():
    wf = (
        UI()
        .node(1, "RandomNoise", [99, "increment"], outputs=[("NOISE", "NOISE")])
        .node(2, "ComboSeeded", ["z", "fixed", "", 0.25], inputs=[("tags", "STRING")], outputs=[("FLOAT", "FLOAT")])
        .build()
    )
    p = ui_to_api(wf, OBJECT_INFO)
    assert p["1"]["inputs"] == {"noise_seed": 99}
    assert p["2"]["inputs"] == {"choice": "z", "amount": 0.25}  # tags is forceInput: no widget slot
    assert widget_layout(OBJECT_INFO["ComboSeeded"]) == [("choice", False), (None, True), (None, True), ("amount", False)]


def test_linked_widget_input_keeps_its_slot_and_primitive_node_feeds_it():
    ui = (
        UI()
        .node(10, "PrimitiveNode", [320, "fixed"], outputs=[("INT", "INT")], title="size")
        .node(5, "EmptyLatentImage", [512, 512, 3], inputs=[("width", "INT", True), ("height", "INT", True)],
              outputs=[("LATENT", "LATENT")])
        .node(9, "SaveLatent", ["p"], inputs=[("samples", "LATENT")])
        .link(10, 0, 5, 0).link(10, 0, 5, 1).link(5, 0, 9, 0)
    )
    ui.nodes[10]["outputs"][0]["widget"] = {"name": "width"}
    wf = ui.build()
    validate_ui_workflow(wf, OBJECT_INFO)
    p = ui_to_api(wf, OBJECT_INFO)
    # widgets_values [512, 512, 3]: width/height keep their slots (overridden by the primitive),
    # batch_size is the third value
    assert p["5"]["inputs"] == {"width": 320, "height": 320, "batch_size": 3}
    assert "10" not in p


def test_primitive_through_reroute_and_widget_link_from_real_node():
    ui = (
        UI()
        .node(10, "PrimitiveNode", [200, "fixed"], outputs=[("INT", "INT")])
        .node(11, "Reroute", None, inputs=[("", "*")], outputs=[("", "INT")])
        .node(5, "EmptyLatentImage", [512, 512, 1], inputs=[("width", "INT", True)], outputs=[("LATENT", "LATENT")])
        .node(9, "SaveLatent", ["p"], inputs=[("samples", "LATENT")])
        .link(10, 0, 11, 0).link(11, 0, 5, 0).link(5, 0, 9, 0)
    )
    p = ui_to_api(ui.build(), OBJECT_INFO)
    assert p["5"]["inputs"]["width"] == 200
    assert set(p) == {"5", "9"}


def test_reroute_chain_and_note_are_followed_and_ignored():
    wf = (
        UI()
        .node(1, "EmptyLatentImage", [64, 64, 1], outputs=[("LATENT", "LATENT")])
        .node(2, "Reroute", None, inputs=[("", "*")], outputs=[("", "LATENT")])
        .node(3, "Reroute", None, inputs=[("", "*")], outputs=[("", "LATENT")])
        .node(4, "SaveLatent", ["r"], inputs=[("samples", "LATENT")])
        .node(5, "Note", ["hello"])
        .node(6, "MarkdownNote", ["# hi"])
        .link(1, 0, 2, 0).link(2, 0, 3, 0).link(3, 0, 4, 0)
        .build()
    )
    validate_ui_workflow(wf, OBJECT_INFO)
    p = ui_to_api(wf, OBJECT_INFO)
    assert set(p) == {"1", "4"}
    assert p["4"]["inputs"] == {"samples": ["1", 0], "filename_prefix": "r"}


def _chain(mode_of_upscale: int) -> dict:
    return (
        UI()
        .node(1, "EmptyLatentImage", [64, 64, 1], outputs=[("LATENT", "LATENT")])
        .node(2, "LatentUpscaleBy", ["bilinear", 2.0], inputs=[("samples", "LATENT")], outputs=[("LATENT", "LATENT")],
              mode=mode_of_upscale)
        .node(3, "SaveLatent", ["c"], inputs=[("samples", "LATENT")])
        .link(1, 0, 2, 0).link(2, 0, 3, 0)
        .build()
    )


def test_bypassed_node_passes_its_matching_input_through():
    p = ui_to_api(_chain(4), OBJECT_INFO)
    assert set(p) == {"1", "3"}
    assert p["3"]["inputs"]["samples"] == ["1", 0]
    assert ui_to_api(_chain(0), OBJECT_INFO)["3"]["inputs"]["samples"] == ["2", 0]


def test_bypassed_node_without_matching_input_gives_nothing():
    wf = (
        UI()
        .node(4, "CheckpointLoaderSimple", ["a.safetensors"], outputs=[("MODEL", "MODEL"), ("CLIP", "CLIP"), ("VAE", "VAE")])
        .node(1, "EmptyLatentImage", [64, 64, 1], outputs=[("LATENT", "LATENT")])
        .node(2, "VAEDecode", [], inputs=[("samples", "LATENT"), ("vae", "VAE")], outputs=[("IMAGE", "IMAGE")], mode=4)
        .node(3, "SaveImage", ["i"], inputs=[("images", "IMAGE")])
        .link(1, 0, 2, 0).link(4, 2, 2, 1).link(2, 0, 3, 0)
        .build()
    )
    p = ui_to_api(wf, OBJECT_INFO)
    assert "2" not in p
    assert p["3"]["inputs"] == {"filename_prefix": "i"}  # no IMAGE input on the bypassed decoder


def test_muted_node_is_dropped_with_the_inputs_linked_to_it():
    p = ui_to_api(_chain(2), OBJECT_INFO)
    assert set(p) == {"1", "3"}
    assert p["3"]["inputs"] == {"filename_prefix": "c"}


@pytest.mark.parametrize("mode, width", [(0, ["1", 0]), (2, None), (4, 512)])
def test_widget_input_linked_from_muted_or_bypassed_node(mode, width):
    wf = (
        UI()
        .node(1, "PrimitiveInt", [128, "fixed"], outputs=[("INT", "INT")], mode=mode)
        .node(2, "EmptyLatentImage", [512, 64, 1], inputs=[("width", "INT", True)], outputs=[("LATENT", "LATENT")])
        .node(3, "SaveLatent", ["m"], inputs=[("samples", "LATENT")])
        .link(1, 0, 2, 0).link(2, 0, 3, 0)
        .build()
    )
    inputs = ui_to_api(wf, OBJECT_INFO)["2"]["inputs"]
    # muted source: the frontend drops the input, widget value included; bypassed source with no
    # input to pass on: the widget keeps its own value
    assert inputs.get("width") == width
    assert inputs["height"] == 64


def test_widgets_values_as_dict_and_defaults_for_missing_values():
    wf = (
        UI()
        .node(1, "EmptyLatentImage", {"height": 80, "width": 40, "unknown": 1}, outputs=[("LATENT", "LATENT")])
        .node(2, "SaveLatent", None, inputs=[("samples", "LATENT")])
        .link(1, 0, 2, 0)
        .build()
    )
    p = ui_to_api(wf, OBJECT_INFO)
    assert p["1"]["inputs"] == {"width": 40, "height": 80, "batch_size": 1}
    assert p["2"]["inputs"] == {"samples": ["1", 0], "filename_prefix": "latents/ComfyUI"}


def test_upload_button_value_and_list_values():
    wf = (
        UI()
        .node(1, "LoadImage", ["dog.png", "image"], outputs=[("IMAGE", "IMAGE"), ("MASK", "MASK")])
        .node(2, "ListWidget", [["a", "b"]], outputs=[("STRING", "STRING")])
        .build()
    )
    validate_ui_workflow(wf, OBJECT_INFO)
    p = ui_to_api(wf, OBJECT_INFO)
    assert p["1"]["inputs"] == {"image": "dog.png"}
    assert p["2"]["inputs"] == {"values": {"__value__": ["a", "b"]}}  # lists would read as links


def test_replace_types_keeps_widget_values_of_same_named_inputs():
    wf = _txt2img([5, "fixed", 2, 1.0, "euler", "simple", 1.0]).build()
    p = ui_to_api(wf, OBJECT_INFO, replace_types={"CheckpointLoaderSimple": "HiResTestCheckpointLoader"})
    assert p["4"]["class_type"] == "HiResTestCheckpointLoader"
    assert p["4"]["inputs"] == {"ckpt_name": "b.safetensors"}
    assert p["3"]["inputs"]["model"] == ["4", 0] and p["8"]["inputs"]["vae"] == ["4", 2]
    with pytest.raises(ValueError, match="WrongLoader.*output 0"):
        ui_to_api(wf, OBJECT_INFO, replace_types={"CheckpointLoaderSimple": "WrongLoader"})


def test_unknown_node_type_is_a_clear_error():
    wf = _txt2img([5, "fixed", 2, 1.0, "euler", "simple", 1.0]).build()
    wf["nodes"][0]["type"] = "SomeCustomLoader"
    with pytest.raises(ValueError, match=r"node 4 has type 'SomeCustomLoader'.*not in object_info"):
        ui_to_api(wf, OBJECT_INFO)
    with pytest.raises(ValueError, match=r"'SaveImage' \(replaced by 'Nope'\)"):
        ui_to_api(_txt2img([5, 2, 1.0, "euler", "simple", 1.0]).build(), OBJECT_INFO, replace_types={"SaveImage": "Nope"})


def test_used_subgraph_is_rejected_unused_definitions_are_fine():
    wf = _chain(0)
    wf["definitions"] = {"subgraphs": [{"id": "9a4c0b8e-1111-4222-8333-444455556666", "nodes": [], "links": []}]}
    assert set(ui_to_api(wf, OBJECT_INFO)) == {"1", "2", "3"}
    wf["nodes"][1]["type"] = "9a4c0b8e-1111-4222-8333-444455556666"
    with pytest.raises(ValueError, match="subgraphs are not supported"):
        ui_to_api(wf, OBJECT_INFO)


def test_validate_accepts_good_and_names_each_problem():
    good = _txt2img([5, "fixed", 2, 1.0, "euler", "simple", 1.0]).build()
    assert workflow_problems(good, OBJECT_INFO) == []

    cases = {
        "no 'version'": lambda w: w.pop("version"),
        "has no 'pos'": lambda w: w["nodes"][0].pop("pos"),
        "size is not [x, y]": lambda w: w["nodes"][0].update(size=[1]),
        "last_link_id 3 < largest link id 9": lambda w: w.update(last_link_id=3),
        "last_node_id 2 < largest node id 9": lambda w: w.update(last_node_id=2),
        "whose link is None": lambda w: w["nodes"][4]["inputs"][0].update(link=None),
        "not listed in node 4 output 0 links": lambda w: w["nodes"][0]["outputs"][0].update(links=[]),
        "comes from missing node 77": lambda w: w["links"][0].__setitem__(1, 77),
        "uses missing link 123": lambda w: w["nodes"][6]["inputs"][0].update(link=123),
        "node id 4 is used twice": lambda w: w["nodes"][1].update(id=4),
        "type 'Mystery' is not in object_info": lambda w: w["nodes"][6].update(type="Mystery"),
    }
    for expected, damage in cases.items():
        wf = copy.deepcopy(good)
        damage(wf)
        problems = workflow_problems(wf, OBJECT_INFO)
        assert any(expected in p for p in problems), (expected, problems)
        with pytest.raises(ValueError, match="not well-formed"):
            validate_ui_workflow(wf, OBJECT_INFO)

    short = copy.deepcopy(good)
    short["nodes"][4]["widgets_values"] = [5, 2, 1.0]  # KSampler lost widgets
    assert any("3 widgets_values, KSampler has 6 widgets" in p for p in workflow_problems(short, OBJECT_INFO))
    long = copy.deepcopy(good)
    long["nodes"][4]["widgets_values"] += [1, 2]
    assert any("more than the 7 widget slots" in p for p in workflow_problems(long, OBJECT_INFO))
