"""ComfyUI loads every node file of its comfy_extras folder under a name made from the file's path, as it
loads node packs; their module-level samplers and functions are still ComfyUI's own, so they ship to the
workers as ``comfy_extras.<name>`` (pool._PackPickler) instead of being refused. End to end: the
Euler CFG++ sampler of comfy_extras/nodes_advanced_samplers.py through the Patch-Parallel Guider."""
from __future__ import annotations

import importlib.util
import os
import pickle
import subprocess
import sys

import pytest
import torch

from support.float_noise import cfg_noise_tolerance
from support.tiny_models import build_sd15, make_conds


@pytest.fixture(scope="module")
def path_loaded(comfy_root):
    """comfy_extras/nodes_advanced_samplers.py imported the way ComfyUI's load_custom_node does."""
    path = os.path.join(comfy_root, "comfy_extras", "nodes_advanced_samplers.py")
    name = os.path.splitext(path)[0]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(name, None)
    from hires_parallel.parallel.runtime.pool import shutdown_pool

    shutdown_pool()


def test_path_named_comfy_extras_objects_pickle_under_their_importable_name(path_loaded, comfy_root):
    from hires_parallel.parallel.runtime.payload import check_worker_importable
    from hires_parallel.parallel.runtime.pool import comfy_extras_name, dumps_job

    fn = path_loaded.sample_euler_pp
    assert "/" in fn.__module__ and comfy_extras_name(fn.__module__) == "comfy_extras.nodes_advanced_samplers"
    assert fn.__module__.encode() in pickle.dumps(fn)  # a plain pickle names the path: no worker imports that
    check_worker_importable({"f": fn}, "test")  # accepted
    blob = dumps_job({"f": fn})
    assert fn.__module__.encode() not in blob
    code = ("import pickle, sys; from hires_parallel.comfy_host import ensure_comfy; ensure_comfy(cpu=True);"
            "f = pickle.loads(sys.stdin.buffer.read())['f']; print(f.__module__, f.__name__)")
    out = subprocess.run([sys.executable, "-c", code], input=blob, capture_output=True, timeout=120,
                         env=dict(os.environ, COMFYUI_PATH=comfy_root))
    assert out.returncode == 0, out.stderr.decode()
    assert out.stdout.decode().split() == ["comfy_extras.nodes_advanced_samplers", "sample_euler_pp"]
    assert comfy_extras_name("custom_nodes/SomePack/nodes") is None and comfy_extras_name("comfy.samplers") is None


def test_euler_cfg_pp_of_comfy_extras_runs_on_two_workers(path_loaded):
    import comfy.samplers
    from comfy_extras.nodes_custom_sampler import CFGGuider, SamplerCustomAdvanced

    from hires_parallel.nodes.parallel_sampler import HiResParallelPatchParallelGuider
    from hires_parallel.nodes.relay import HiResParallelBlockNoise

    model = build_sd15(seed=4)
    conds = make_conds(model, seed=1)
    latent = {"samples": torch.zeros(1, 4, 32, 24)}
    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "karras", 3).cpu()
    noise = HiResParallelBlockNoise.execute(3, 4, 0.0, True, "box").result[0]
    sampler = path_loaded.SamplerEulerCFGpp.execute("alternative").result[0]

    def one_device(cfg):
        return SamplerCustomAdvanced().sample(noise, CFGGuider().get_guider(model, *conds, cfg)[0], sampler, sigmas,
                                              latent)[0]["samples"]

    ref, tol = cfg_noise_tolerance("cfg++", one_device, 1.5)
    guider = HiResParallelPatchParallelGuider.execute(model, conds[0], conds[1], 1.5, 2, "cpu", "exact", "off").result[0]
    out = SamplerCustomAdvanced().sample(noise, guider, sampler, sigmas, latent)[0]["samples"]
    tol.check("Euler CFG++ (comfy_extras) through the Patch-Parallel Guider, 2 ranks", out, ref)
