"""One band rule for the runs and the web overlay: parallel.layout.band_alignment, used by the layout route.

SDXL UNets downsample 4x (channel_mult has 3 entries), SD1.x/2.x 8x: 1024 px on 3 devices is 44/40/44 latent
rows for SDXL (what a run splits) and 40/48/40 for SD1.5. The run side (submit.preflight on a real SDXL model)
is checked in tests/comfy/test_refusals_reach_the_panel.py."""
from __future__ import annotations

import pytest
import torch
from hires_parallel import web_routes
from hires_parallel.parallel.split.layout import LayoutError, band_alignment, split_rows
from support.routes_client import call_route

SDXL_KEYS = [f"model.diffusion_model.input_blocks.{i}.0.{'op' if i in (3, 6) else 'in_layers'}.weight"
             for i in range(9)] + ["conditioner.embedders.1.model.ln_final.weight"]
SD15_KEYS = [f"model.diffusion_model.input_blocks.{i}.0.{'op' if i in (3, 6, 9) else 'in_layers'}.weight"
             for i in range(12)]


class _UNet:
    def __init__(self, channel_mult):
        self.channel_mult = channel_mult


class _Patcher:
    def __init__(self, channel_mult):
        self.unet = _UNet(channel_mult)

    def get_model_object(self, name):
        assert name == "diffusion_model"
        return self.unet


def test_band_alignment_from_models_families_and_headers():
    assert band_alignment(_Patcher((1, 2, 4))) == 4 and band_alignment(_Patcher((1, 2, 4, 4))) == 8
    assert band_alignment(_UNet([1, 2, 2])) == 4
    assert band_alignment("sdxl") == 4 and band_alignment("SD15") == 8 and band_alignment("sd2") == 8
    assert band_alignment(SDXL_KEYS) == 4 and band_alignment(SD15_KEYS) == 8
    assert band_alignment({k[len("model.diffusion_model."):]: None for k in SD15_KEYS}) == 8  # a UNet-only file
    assert band_alignment(6) == 6
    # DiTs: one token row (patch 2 in latent rows); video may split frames instead (tokens.py)
    assert band_alignment("flux") == 2 and band_alignment("Qwen_Image") == 2 and band_alignment("wan") == 2
    for bad in ("hunyuan_video", ["double_blocks.0.img_attn.qkv.weight"], object()):
        with pytest.raises(LayoutError):
            band_alignment(bad)


def _bands(data):
    return [e - s for s, e in (b["latent_rows"] for b in data["bands"])]


def test_sdxl_1024_on_3_devices_is_44_40_44_in_the_route_as_in_a_run():
    q = {"height": "1024", "width": "1024", "devices": "3", "device_kind": "cpu", "cfg_parallel": "off"}
    sdxl = web_routes.layout_for({**q, "family": "sdxl"})
    assert _bands(sdxl) == [44, 40, 44] and sdxl["align"] == 4 and sdxl["model_known"]
    assert [tuple(b["latent_rows"]) for b in sdxl["bands"]] == split_rows(128, 3, band_alignment(_Patcher((1, 2, 4))))
    sd15 = web_routes.layout_for({**q, "family": "sd15"})
    assert _bands(sd15) == [40, 48, 40] and sd15["align"] == 8
    # the model unknown: the SD1.x rule is drawn and the SDXL split comes with it
    unknown = web_routes.layout_for(q)
    assert not unknown["model_known"] and unknown["align"] == 8 and _bands(unknown) == [40, 48, 40]
    assert unknown["bands_by_family"] == {"sdxl": [[0, 44], [44, 84], [84, 128]]}
    assert unknown["align_by_family"] == {"sd15": 8, "sdxl": 4}


def test_a_checkpoint_name_gives_its_alignment_from_the_file_header(tmp_path, monkeypatch):
    from safetensors.torch import save_file

    xl = tmp_path / "my_xl_model.safetensors"
    save_file({k: torch.zeros(1) for k in SDXL_KEYS}, str(xl))
    sd = tmp_path / "plain.safetensors"
    save_file({k: torch.zeros(1) for k in SD15_KEYS}, str(sd))
    files = {"my_xl_model.safetensors": str(xl), "plain.safetensors": str(sd)}
    monkeypatch.setattr(web_routes, "checkpoint_path", files.get)
    q = {"height": "1024", "devices": "3", "device_kind": "cpu", "cfg_parallel": "off"}
    got = web_routes.layout_for({**q, "checkpoint": "my_xl_model.safetensors"})
    assert got["model_known"] and got["align"] == 4 and _bands(got) == [44, 40, 44]
    assert got["align_source"] == "my_xl_model.safetensors" and got["bands_by_family"] == {}
    assert web_routes.layout_for({**q, "checkpoint": "plain.safetensors"})["align"] == 8
    missing = web_routes.layout_for({**q, "checkpoint": "not_there.safetensors"})
    assert not missing["model_known"] and missing["align"] == 8


def _call(path: str) -> tuple[int, dict]:
    return call_route("GET", path)


def test_the_align_route_answers_for_a_family_and_refuses_an_unknown_one():
    status, data = _call("/hires_parallel/align?family=sdxl")
    assert status == 200 and data["ok"] and data["align"] == 4 and data["known"]
    status, data = _call("/hires_parallel/align")
    assert status == 200 and data["align"] == 8 and not data["known"] and data["by_family"]["sdxl"] == 4
    status, data = _call("/hires_parallel/align?family=hunyuan_video")
    assert status == 400 and not data["ok"] and "unknown model family" in data["error"]
