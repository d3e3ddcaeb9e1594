"""Every refusal of the patch-parallel nodes reaches the web panel's last error (monitor.run_failed), also
those raised before a run starts (resolve_devices), and once only; and the run's band rule is the overlay's."""
from __future__ import annotations

import json

import pytest
import torch

from support.tiny_models import build_sdxl, make_conds


@pytest.fixture()
def panel():
    from hires_parallel.parallel.runtime import monitor

    events: list[dict] = []
    monitor.set_sink(lambda name, data: events.append(json.loads(json.dumps(data))))
    monitor.LAST_ERROR.clear()
    monitor.run_failed(RuntimeError("the previous error"))  # what the panel showed before
    events.clear()
    yield monitor, events
    monitor.set_sink(None)
    monitor.LAST_ERROR.clear()
    from hires_parallel.parallel.runtime.pool import shutdown_pool

    shutdown_pool()


def _ksampler(model, conds, devices, device_kind, cfg_parallel="off", cfg=5.0, h=16):
    from hires_parallel.nodes.parallel_sampler import HiResParallelPatchParallelKSampler

    return HiResParallelPatchParallelKSampler.execute(model, 5, 2, cfg, "euler", "karras", conds[0], conds[1],
                                                      {"samples": torch.zeros(1, 4, h, 16)}, 1.0, devices,
                                                      device_kind, "exact", cfg_parallel, "")


def _guider(model, conds, devices, device_kind):
    from hires_parallel.nodes.parallel_sampler import HiResParallelPatchParallelGuider

    return HiResParallelPatchParallelGuider.execute(model, conds[0], conds[1], 5.0, devices, device_kind, "exact",
                                                    "off", "")


def _errors(events):
    return [e for e in events if e["kind"] == "error"]


@pytest.mark.parametrize("node", ["ksampler", "guider"])
def test_a_device_refusal_before_the_run_replaces_the_previous_error(panel, sd15, node):
    monitor, events = panel
    conds = make_conds(sd15, seed=1)
    call = _ksampler if node == "ksampler" else _guider
    with pytest.raises(ValueError, match="device_kind must be one of"):
        call(sd15, conds, 2, "tpu")
    assert "device_kind must be one of" in monitor.LAST_ERROR["message"], monitor.LAST_ERROR
    assert monitor.LAST_ERROR["hint"].startswith("Nothing ran")
    assert len(_errors(events)) == 1 and "device_kind" in _errors(events)[0]["last_error"]["message"]
    if not torch.cuda.is_available():  # the refusal of the issue: cuda asked, none visible
        with pytest.raises(ValueError, match="no CUDA device is visible"):
            call(sd15, conds, 2, "cuda")
        assert "no CUDA device is visible" in monitor.snapshot()["last_error"]["message"]
        assert len(_errors(events)) == 2


def test_a_refusal_inside_the_run_is_reported_once(panel, sd15):
    monitor, events = panel
    conds = make_conds(sd15, seed=1)
    with pytest.raises(ValueError, match="cannot be halved"):  # preflight, inside run_sampling (watched too)
        _ksampler(sd15, conds, 3, "cpu", cfg_parallel="on")
    assert "cannot be halved" in monitor.LAST_ERROR["message"]
    assert len(_errors(events)) == 1, [e["kind"] for e in events]


def test_sdxl_1024_on_3_devices_the_run_splits_44_40_44_like_the_overlay(monkeypatch):
    from hires_parallel import web_routes
    from hires_parallel.parallel.runtime import submit
    from hires_parallel.parallel.split.layout import band_alignment, split_rows

    xl = build_sdxl(seed=0)
    seen = []

    def recording_split_rows(*args, **kwargs):
        seen.append(split_rows(*args, **kwargs))
        return seen[-1]

    monkeypatch.setattr(submit, "split_rows", recording_split_rows)
    conds = make_conds(xl, seed=2)
    submit.preflight(xl, conds[0], conds[1], torch.zeros(1, 4, 128, 128), ["cpu"] * 3, "off", "exact")
    assert band_alignment(xl) == 4
    assert seen and [e - s for s, e in seen[-1]] == [44, 40, 44]
    route = web_routes.layout_for({"height": "1024", "width": "1024", "devices": "3", "device_kind": "cpu",
                                   "cfg_parallel": "off", "family": "sdxl"})
    assert [tuple(b["latent_rows"]) for b in route["bands"]] == seen[-1]
