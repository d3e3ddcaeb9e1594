"""The description read from ComfyUI's own SDXL UNetModel and Flux modules (built on the meta device from their
configs) agrees with the analytic one: bytes per step within 1 %, FLOPs within 5 %."""
from __future__ import annotations

import pytest

from hires_parallel.parallel.planning.comfy_shapes import describe_module, meta_model
from hires_parallel.parallel.planning.exchange_pattern import (FLUX_DEV_CONFIG, SDXL_CONFIG, flux_description,
                                                                step_pattern, unet_description)

CASES = {"SDXL": (lambda hw: unet_description(SDXL_CONFIG, hw), 2), "Flux": (lambda hw: flux_description(FLUX_DEV_CONFIG, hw), 1)}


@pytest.fixture(scope="module", params=sorted(CASES))
def model(request):
    return request.param, meta_model(request.param)


@pytest.mark.parametrize("side", [128, 256])
def test_module_description_agrees_with_analytic(model, side):
    name, dm = model
    analytic, batch = CASES[name]
    a, b = analytic((side, side)), describe_module(dm, (side, side))
    assert b.flops == pytest.approx(a.flops, rel=0.05)
    assert (b.rows, b.width, b.align, b.itemsize, b.out_channels) == (a.rows, a.width, a.align, a.itemsize, a.out_channels)
    for n, mode, cfg in ((2, "exact", False), (4, "displaced", False), (4, "partial", False), (4, "exact", True)):
        if cfg and batch < 2:
            continue
        pa = step_pattern(a, n, mode, batch=batch, cfg_parallel=cfg)
        pb = step_pattern(b, n, mode, batch=batch, cfg_parallel=cfg)
        assert pb.bytes_sent == pytest.approx(pa.bytes_sent, rel=0.01), (n, mode, cfg)
        assert pb.flops == pytest.approx(pa.flops, rel=0.05)
    assert all(p.device.type == "meta" for p in dm.parameters())
