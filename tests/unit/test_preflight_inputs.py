"""Checks before any work: cfg-aware CFG parallel, device_weights, the CPU rank cap, and objects that
pickle here but would not import in a worker (classes of other node packs, loaded under path-derived names)."""
from __future__ import annotations

import os
import pickle
import sys
import types

import pytest
import torch

from hires_parallel.parallel.runtime import submit
from hires_parallel.parallel.split.layout import ParallelPlan
from hires_parallel.parallel.runtime.payload import UnshippablePatch, check_worker_importable, referenced_globals
from support.fake_pack import fake_pack_module


# ------------------------------------------------------------------------------- CFG parallel and cfg
def test_cfg_1_has_no_negative_pass_so_auto_gives_bands_and_on_is_refused():
    assert submit.resolve_cfg_parallel("auto", 2, True, cfg=1.0) is False
    assert submit.resolve_cfg_parallel("auto", 4, True, cfg=1.0, model_options={}) is False
    assert submit.resolve_cfg_parallel("off", 2, True, cfg=1.0) is False
    with pytest.raises(submit.ParallelInputError, match="cfg 1 has no negative pass.*use auto or off"):
        submit.resolve_cfg_parallel("on", 2, True, cfg=1.0)
    # ComfyUI keeps the negative pass at cfg 1 when a node asks for it (comfy.samplers.sampling_function)
    forced = {"disable_cfg1_optimization": True}
    assert submit.resolve_cfg_parallel("auto", 2, True, cfg=1.0, model_options=forced) is True
    assert submit.resolve_cfg_parallel("on", 2, True, cfg=1.0, model_options=forced) is True
    # any other cfg, or cfg unknown: as before
    assert submit.resolve_cfg_parallel("auto", 2, True, cfg=5.0) is True
    assert submit.resolve_cfg_parallel("auto", 2, True) is True
    assert submit.resolve_cfg_parallel("auto", 3, True, cfg=5.0) is False
    assert submit.uncond_runs(1.0 + 1e-12) is False and submit.uncond_runs(1.1) is True


# ------------------------------------------------------------------------------------ device_weights
@pytest.mark.parametrize("text", ["1e308,1e308", "nan,1", "1,inf", "-inf,1", "-0,1", "0,1", "1,-2", "1e999,1"])
def test_bad_device_weights_get_the_same_clear_message(text):
    with pytest.raises(submit.ParallelInputError, match="one positive number per device"):
        submit.band_weights(text, ParallelPlan(2, False))


def test_good_device_weights_still_pass():
    assert submit.band_weights("2,1", ParallelPlan(2, False)) == [2.0, 1.0]
    assert submit.band_weights("1e300,1e300", ParallelPlan(2, False)) == [1e300, 1e300]


# ------------------------------------------------------------------------------------- CPU rank cap
@pytest.fixture()
def two_cores(monkeypatch):
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    monkeypatch.delenv(submit.MAX_CPU_RANKS_ENV, raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def test_cpu_ranks_are_capped_before_anything_starts(two_cores, monkeypatch):
    from hires_parallel.parallel.runtime import pool

    started = []
    monkeypatch.setattr(pool.subprocess, "Popen", lambda *a, **k: started.append(a) or pytest.fail("a process started"))
    for kind in ("cpu", "auto"):
        with pytest.raises(submit.ParallelInputError, match=r"at most 4 .*HIRES_PARALLEL_MAX_CPU_RANKS"):
            submit.resolve_devices(64, kind)
    assert submit.resolve_devices(4, "cpu") == ["cpu"] * 4
    assert submit.resolve_devices(0, "cpu") == ["cpu"]
    assert not started


def test_cpu_rank_cap_follows_the_cores_and_the_override(two_cores, monkeypatch):
    monkeypatch.setattr(os, "cpu_count", lambda: 12)
    assert len(submit.resolve_devices(12, "cpu")) == 12
    with pytest.raises(submit.ParallelInputError, match="at most 12"):
        submit.resolve_devices(13, "cpu")
    monkeypatch.setenv(submit.MAX_CPU_RANKS_ENV, "16")
    assert len(submit.resolve_devices(16, "cpu")) == 16
    monkeypatch.setenv(submit.MAX_CPU_RANKS_ENV, "lots")
    with pytest.raises(submit.ParallelInputError, match="whole number"):
        submit.resolve_devices(2, "cpu")


# ------------------------------------------------------------------- importable in a worker process
@pytest.fixture()
def fake_pack(tmp_path):
    yield from fake_pack_module(tmp_path)


def test_path_derived_pack_objects_pickle_here_but_are_refused(fake_pack):
    options = {"transformer_options": {}, "sampler_cfg_function": fake_pack.PackCFG()}
    pickle.dumps(options)  # the controller's own pickle check lets it through...
    with pytest.raises(UnshippablePatch) as info:  # ...a worker could not import it
        check_worker_importable(options, "model_options")
    msg = str(info.value)
    assert "model_options['sampler_cfg_function']" in msg and "PackCFG" in msg and '"SomePack"' in msg
    assert "1 device" in msg
    with pytest.raises(UnshippablePatch, match=r"function pack_sampler of the node pack \"SomePack\""):
        check_worker_importable([fake_pack.pack_sampler], "the SAMPLER input")


def test_controlnet_layers_of_another_pack_are_refused(fake_pack):
    from hires_parallel.parallel.runtime.payload import control_layer_classes

    class Control:  # what control_layer_classes reads of a ControlNet (a chain of two)
        def __init__(self, module, previous=None):
            self.control_model, self.previous_controlnet = module, previous

    own = Control(torch.nn.Sequential(torch.nn.Conv2d(4, 4, 3)))
    previous = Control(torch.nn.Sequential(fake_pack.PackConv(4, 4, 3)))
    chain = Control(torch.nn.Sequential(torch.nn.GroupNorm(2, 4)), previous)
    positive = [[torch.zeros(1, 2, 8), {"control": own}]]
    check_worker_importable(control_layer_classes(positive, None), "the layers of a ControlNet's model")
    negative = [[torch.zeros(1, 2, 8), {"control": chain}]]
    layers = control_layer_classes(positive, negative)
    assert fake_pack.PackConv in layers.values() and torch.nn.GroupNorm in layers.values()
    with pytest.raises(UnshippablePatch, match=r"ControlNet's model\[.*PackConv'\].*\"SomePack\""):
        check_worker_importable(layers, "the layers of a ControlNet's model")


def test_modules_not_on_the_workers_path_and_main_are_refused(tmp_path, monkeypatch):
    plain = types.ModuleType("hp_test_not_on_path")
    plain.__file__ = str(tmp_path / "hp_test_not_on_path.py")
    exec("class Thing:\n    pass\n", plain.__dict__)
    monkeypatch.setitem(sys.modules, "hp_test_not_on_path", plain)
    with pytest.raises(UnshippablePatch, match="Thing.*no module 'hp_test_not_on_path' can be found"):
        check_worker_importable({"x": plain.Thing()}, "model_options")
    main_cls = type("MainThing", (), {"__module__": "__main__"})
    with pytest.raises(UnshippablePatch, match="MainThing.*__main__"):
        check_worker_importable(main_cls, "model_options")


def test_torch_stdlib_and_pack_objects_pass():
    from hires_parallel.parallel.runtime.sampling_job import ParallelSpec, SamplerSpec

    obj = {"a": torch.nn.functional.gelu, "b": torch.nn.Conv2d(1, 1, 3), "c": torch.zeros(2), "d": torch.float16,
           "e": SamplerSpec(name="euler"), "f": ParallelSpec(2, False), "g": os.path.join, "h": [len, {1, 2}]}
    check_worker_importable(obj, "model_options")
    names = {getattr(g, "__qualname__", "") for g in referenced_globals(obj)}
    assert {"Conv2d", "SamplerSpec", "ParallelSpec"} <= names
