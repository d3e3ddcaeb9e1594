"""Cases for tests/comfy/test_displaced_modes.py: displaced (DistriFusion) and partial (PCPP) patch
parallelism on spawned gloo ranks, against single-device ComfyUI sampling of the same seed.

A run is a base case of ``unet_parallel_cases`` (model, sampler, size, seed) plus the stale options;
every rank samples with ComfyUI's own loop on a band-parallel clone and returns its output, its per-call
records and its per-step summary. The parent computes the references and the layer shapes.
"""
from __future__ import annotations

from typing import Any

import torch

from support import unet_parallel_cases as uc

STEPS = 8
PROBE_SIGMAS = [5.0, 5.0 * (1 - 1e-6), 5.0 * (1 - 2e-6), 5.0 * (1 - 3e-6), 0.0]


def run(name: str, base: dict[str, Any], mode: str, warmup: int = 2, groupnorm: str = "sync",
        fraction: float = 0.3, debug: str = "", buckets: int = 4, split_calls: bool = False,
        probe: bool = False) -> dict[str, Any]:
    """mode: "exact" or a stale mode. split_calls: cond and uncond of different lengths, so ComfyUI runs
    them in separate UNet calls (two call slots per step). probe: instead of
    sampling, evaluate the model on ONE input at the nearly equal sigmas PROBE_SIGMAS (each its own step),
    so stale data equals fresh data up to that tiny sigma change: a displaced call must then give the
    exact output, whatever the model, unless stale data is misplaced or lost."""
    return dict(name=name, base=base, mode=mode, warmup=warmup, groupnorm=groupnorm, fraction=fraction,
                debug=debug, buckets=buckets, split_calls=split_calls, probe=probe)


SD15 = uc.case("sd15 euler 40x40", "sd15", "euler", 40, 40, steps=STEPS)
SD15_48 = uc.case("sd15 euler 48x40", "sd15", "euler", 48, 40, steps=STEPS)
SDXL_46 = uc.case("sdxl euler 46x36", "sdxl", "euler", 46, 36, steps=STEPS)
HEUN = uc.case("sd15 heun 40x32", "sd15", "heun", 40, 32, steps=3)
SPLIT = uc.case("sd15 euler 40x32 split", "sd15", "euler", 40, 32, steps=4)

SD15_8 = uc.case("sd15 euler 40x40", "sd15", "euler", 40, 40, steps=STEPS)
SD15_48 = uc.case("sd15 euler 48x40", "sd15", "euler", 48, 40, steps=STEPS)
SDXL_46 = uc.case("sdxl euler 46x36 (ragged)", "sdxl", "euler", 46, 36, steps=STEPS)
HEUN = uc.case("sd15 heun 40x32", "sd15", "heun", 40, 32, steps=3)
SPLIT = uc.case("sd15 euler 40x32 split calls", "sd15", "euler", 40, 32, steps=3)

RUNS: dict[int, list[dict[str, Any]]] = {
    2: [
        run("exact", SD15_8, "exact"),
        run("displaced warmup=all", SD15_8, "displaced", warmup=STEPS),
        run("partial warmup=all", SD15_8, "partial", warmup=STEPS),
        run("displaced", SD15_8, "displaced"),
        run("displaced 1 bucket", SD15_8, "displaced", buckets=1),
        run("displaced corrected-gn", SD15_8, "displaced", groupnorm="corrected"),
        run("partial", SD15_8, "partial"),
        run("displaced no_halo", SD15_8, "displaced", debug="no_halo"),
        run("displaced zero_kv", SD15_8, "displaced", debug="zero_kv"),
        run("heun displaced", HEUN, "displaced", warmup=1),
        run("split-calls displaced", SPLIT, "displaced", warmup=1, split_calls=True),
        run("probe exact", SD15_8, "exact", probe=True),
        run("probe displaced", SD15_8, "displaced", warmup=1, probe=True),
        run("probe displaced corrected-gn", SD15_8, "displaced", warmup=1, groupnorm="corrected", probe=True),
        run("probe partial f=1", SD15_8, "partial", warmup=1, fraction=1.0, probe=True),
        run("probe displaced zero_kv", SD15_8, "displaced", warmup=1, debug="zero_kv", probe=True),
        run("probe displaced no_halo", SD15_8, "displaced", warmup=1, debug="no_halo", probe=True),
    ],
    3: [
        run("exact", SD15_48, "exact"),
        run("displaced warmup=all", SD15_48, "displaced", warmup=STEPS),
        run("displaced", SD15_48, "displaced"),
        run("partial", SD15_48, "partial"),
        run("displaced no_halo", SD15_48, "displaced", debug="no_halo"),
        run("sdxl displaced corrected-gn", SDXL_46, "displaced", groupnorm="corrected"),
        run("sdxl partial", SDXL_46, "partial"),
        run("probe sdxl exact", SDXL_46, "exact", probe=True),
        run("probe sdxl displaced corrected-gn", SDXL_46, "displaced", warmup=1, groupnorm="corrected", probe=True),
        run("probe sdxl partial f=1 zero_kv", SDXL_46, "partial", warmup=1, fraction=1.0, debug="zero_kv", probe=True),
    ],
}


def conds(model: Any, r: dict[str, Any]) -> tuple[list, list]:
    from support import tiny_models as tm

    positive, negative = tm.make_conds(model, 3)
    if r["split_calls"]:
        # 77 and 100 tokens cannot be concatenated (lcm / 77 > 4): one UNet call each.
        _, negative = tm.make_conds(model, 4, prompt_len=100)
    return positive, negative


def sample(model: Any, r: dict[str, Any]) -> torch.Tensor:
    """The final latent of ComfyUI's own sampling loop; for a probe run, the denoised output of every
    probe call stacked (calls, B, C, H, W)."""
    import comfy.sample

    c = r["base"]
    if r["probe"]:
        return probe(model, r)
    positive, negative = conds(model, r)
    latent = torch.zeros(c["batch"], 4, c["h"], c["w"])
    noise = comfy.sample.prepare_noise(latent, c["seed"])
    out = comfy.sample.sample(
        model, noise, c["steps"], c["cfg"], c["sampler"], c["scheduler"], positive, negative, latent,
        disable_pbar=True, seed=c["seed"],
    )
    return out.float().cpu()


def probe(model: Any, r: dict[str, Any]) -> torch.Tensor:
    c = r["base"]
    positive, negative = conds(model, r)
    x = torch.randn(c["batch"], 4, c["h"], c["w"], generator=torch.Generator().manual_seed(c["seed"]))
    return same_input_outputs(model, x, c["cfg"], PROBE_SIGMAS, positive, negative)


def same_input_outputs(model: Any, x: torch.Tensor, cfg: float, sigmas: list[float], positive: list,
                       negative: list) -> torch.Tensor:
    """The denoised output of every model call at ``sigmas`` on the one input ``x``, stacked: a sampler that
    never moves, so every step sees the same input and stale data can be compared with fresh data."""
    import comfy.sample
    import comfy.samplers

    outs: list[torch.Tensor] = []

    def same_input(model_k, noise, sigmas, extra_args=None, callback=None, disable=None):
        s_in = noise.new_ones([noise.shape[0]])
        for sigma in sigmas[:-1]:
            outs.append(model_k(noise, sigma * s_in, **(extra_args or {})).float().cpu())
        return outs[-1]

    comfy.sample.sample_custom(model, x, cfg, comfy.samplers.KSAMPLER(same_input), torch.tensor(sigmas),
                               positive, negative, torch.zeros_like(x), disable_pbar=True, seed=0)
    return torch.stack(outs)


def stale_options(r: dict[str, Any]):
    from hires_parallel.parallel.split.displaced import StaleOptions

    if r["mode"] == "exact":
        return None
    return StaleOptions(mode=r["mode"], warmup=r["warmup"], groupnorm=r["groupnorm"], fraction=r["fraction"],
                        buckets=r["buckets"], debug=r["debug"])


def layer_shapes(model: Any, r: dict[str, Any]) -> list[tuple]:
    """(kind, shape, extra) of every layer that talks across bands, in forward order, from a single-device
    UNet call: ("conv", input shape, (kernel, stride, padding)), ("groupnorm", shape, groups),
    ("attn", (B, tokens, dim) of to_k's output, None); the test derives the byte counts from these."""
    import comfy.ldm.modules.attention as attention

    seen: list[tuple] = []
    unet = model.model.diffusion_model
    hooks = []

    def conv(mod, a):
        seen.append(("conv", tuple(a[0].shape), (mod.kernel_size[0], mod.stride[0], mod.padding[0])))

    def norm(mod, a):
        seen.append(("groupnorm", tuple(a[0].shape), mod.num_groups))

    def to_k(mod, a, out):
        seen.append(("attn", tuple(out.shape), None))

    for m in unet.modules():
        if isinstance(m, torch.nn.Conv2d) and (m.kernel_size[0] > 1 or m.stride[0] > 1):
            hooks.append(m.register_forward_pre_hook(conv))
        elif isinstance(m, torch.nn.GroupNorm):
            hooks.append(m.register_forward_pre_hook(norm))
        elif isinstance(m, attention.BasicTransformerBlock) and not m.disable_self_attn:
            hooks.append(m.attn1.to_k.register_forward_hook(to_k))
    try:
        c = dict(r["base"], steps=1)
        sample(model, dict(r, base=c))
    finally:
        for h in hooks:
            h.remove()
    return seen


def run_parallel(rank: int, world: int, r: dict[str, Any]) -> dict[str, Any]:
    from hires_parallel.parallel.split.layout import ParallelPlan
    from hires_parallel.parallel.split.unet_parallel import BandParallelRuntime, apply_band_parallel

    c = r["base"]
    # overlap off: the exact runs here are the blocking order, whose arithmetic the stale engine's warmup calls
    # repeat (so "warmup over all steps equals exact" can be bitwise); the overlapped order is tested elsewhere
    runtime = BandParallelRuntime(ParallelPlan(world), rank, uc.ALIGN, None, stale=stale_options(r), overlap=False)
    try:
        model = apply_band_parallel(uc.build_model(c), runtime)
        out = sample(model, r)
        runtime.finish()
        return {"out": out, "calls": runtime.calls, "steps": runtime.step_summary(), "stats": runtime.stats.as_dict(),
                "bands": runtime.band_for(c["h"]).bands,
                "stale_calls": 0 if runtime.stale is None else runtime.stale.stale_calls}
    finally:
        runtime.close()


def run_world(rank: int, world: int) -> dict[str, Any]:
    from hires_parallel.comfy_host import ensure_comfy

    ensure_comfy()
    return {r["name"]: run_parallel(rank, world, r) for r in RUNS[world]}
