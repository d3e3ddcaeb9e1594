"""Cases for tests/comfy/test_unet_parallel.py: the same ComfyUI sampling run on one device (parent
process) and patch-parallel on spawned gloo ranks (``run_world`` on 2, 3 and 4 ranks).

A case is a plain dict; ``build_model`` and ``sample_case`` are shared by the parent and the ranks, so
both sides run exactly the same ComfyUI loop (``comfy.sample.sample``, noise from
``comfy.sample.prepare_noise(seed)``, conds from ``tiny_models.make_conds``).
"""
from __future__ import annotations

from typing import Any

import torch

ALIGN = 4  # total downsampling of the tiny UNets
LORA_SEED = 7
CONV_KEY = "diffusion_model.input_blocks.1.0.in_layers.2.weight"


def case(
    name: str,
    family: str,
    sampler: str,
    h: int,
    w: int,
    lora: str = "none",
    cfg_parallel: bool = False,
    weights: list[float] | None = None,
    cfg: float = 4.0,
    batch: int = 1,
    attn2: bool = False,
    control: bool = False,
    fp16: bool = False,
    steps: int = 3,
    scheduler: str = "normal",
    seed: int = 11,
) -> dict[str, Any]:
    return dict(
        name=name, family=family, sampler=sampler, h=h, w=w, lora=lora, cfg_parallel=cfg_parallel, weights=weights,
        cfg=cfg, batch=batch, attn2=attn2, control=control, fp16=fp16, steps=steps, scheduler=scheduler, seed=seed,
    )


# lora: "none", "full" (every attn1 to_q/k/v/out and the 3x3 conv), "conv" (only input_blocks.1.0.in_layers.2);
# control: a ControlNet stand-in adds residuals at every level; fp16: fp16 weights, ComfyUI's manual cast to fp32
CASES: dict[int, list[dict[str, Any]]] = {
    2: [
        case("w2 sd15 euler 40x40", "sd15", "euler", 40, 40),
        case("w2 sd15 euler_ancestral lora 44x40", "sd15", "euler_ancestral", 44, 40, lora="full"),
        case("w2 sd15 dpmpp_2m conv-lora 40x36", "sd15", "dpmpp_2m", 40, 36, lora="conv"),
        case("w2 sd15 dpmpp_sde attn2 42x40 (ragged)", "sd15", "dpmpp_sde", 42, 40, attn2=True),
        case("w2 sdxl euler lora 40x40", "sdxl", "euler", 40, 40, lora="full"),
        case("w2 sdxl dpmpp_2m_sde 44x36", "sdxl", "dpmpp_2m_sde", 44, 36),
        case("w2 cfgpar sd15 euler lora 40x40", "sd15", "euler", 40, 40, lora="full", cfg_parallel=True),
        case("w2 cfgpar sdxl dpmpp_2m batch2 36x40", "sdxl", "dpmpp_2m", 36, 40, cfg_parallel=True, batch=2),
        case("w2 cfgpar sd15 euler cfg1 (odd batch)", "sd15", "euler", 40, 32, cfg_parallel=True, cfg=1.0),
        case("w2 sd15 euler control 42x36", "sd15", "euler", 42, 36, control=True),
        case("w2 cfgpar sd15 euler control lora 40x40", "sd15", "euler", 40, 40, lora="full", cfg_parallel=True, control=True),
        case("w2 sd15 euler fp16-weights manual-cast lora 40x40", "sd15", "euler", 40, 40, lora="full", fp16=True),
    ],
    3: [
        case("w3 sd15 euler 44x40", "sd15", "euler", 44, 40),
        case("w3 sd15 dpmpp_sde lora 42x40 (ragged)", "sd15", "dpmpp_sde", 42, 40, lora="full"),
        case("w3 sdxl euler_ancestral conv-lora 46x40 (ragged)", "sdxl", "euler_ancestral", 46, 40, lora="conv"),
        case("w3 sd15 dpmpp_2m weights 1:2:1 48x32", "sd15", "dpmpp_2m", 48, 32, weights=[1.0, 2.0, 1.0]),
        case("w3 sdxl euler control 46x36 (ragged)", "sdxl", "euler", 46, 36, control=True),
    ],
    4: [
        case("w4 cfgpar 2x2 sd15 euler_ancestral lora 42x40", "sd15", "euler_ancestral", 42, 40, lora="full", cfg_parallel=True),
    ],
}


def skip_levels(unet_config: dict[str, Any]) -> list[tuple[int, int]]:
    """(channels, downsampling factor) of each input block's output, in block order (openaimodel's layout)."""
    mc, mult, nres = unet_config["model_channels"], unet_config["channel_mult"], unet_config["num_res_blocks"]
    out = [(mc, 1)]
    for level, m in enumerate(mult):
        out += [(m * mc, 2**level)] * nres[level]
        if level < len(mult) - 1:
            out.append((m * mc, 2 ** (level + 1)))
    return out


def _control_class() -> type:
    import comfy.controlnet
    import torch.nn.functional as F

    class FakeControl(comfy.controlnet.ControlBase):
        """A ControlNet stand-in: residuals for every input block, the middle block and every skip,
        computed from x_noisy (so they depend on position and batch), some of them None."""

        def __init__(self, levels: list[tuple[int, int]], scale: float) -> None:
            super().__init__()
            self.levels, self.scale = levels, scale

        def get_control(self, x_noisy, t, cond, batched_number, transformer_options):
            def res(ch: int, f: int) -> torch.Tensor:
                r = F.avg_pool2d(x_noisy, f, ceil_mode=True) if f > 1 else x_noisy
                return torch.sin(r.repeat(1, ch // r.shape[1], 1, 1)) * self.scale

            skips = [res(ch, f) for ch, f in self.levels]
            skips[1] = None
            mid_ch, mid_f = self.levels[-1]
            # apply_control pops from the end: input block 0 takes the last "input" entry,
            # output block 0 the last "output" entry (the deepest skip).
            return {"input": skips[::-1], "middle": [res(mid_ch, mid_f)], "output": [None] + skips[1:]}

        def copy(self):
            c = FakeControl(self.levels, self.scale)
            self.copy_to(c)
            return c

    return FakeControl


def _plain_attn2(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, extra_options: dict) -> torch.Tensor:
    """An attn2 replace patch that computes what ComfyUI would (cross-attention is local to a band)."""
    from comfy.ldm.modules.attention import optimized_attention

    return optimized_attention(q, k, v, extra_options["n_heads"], attn_precision=extra_options["attn_precision"])


def conv_lora(model: Any) -> Any:
    """A clone of ``model`` with the test LoRA on the full-resolution 3x3 conv only."""
    from support import tiny_models as tm

    full = tm.make_lora_patches(model, LORA_SEED)
    clone = model.clone()
    patched = clone.add_patches({CONV_KEY: full.patches[CONV_KEY][0][1]}, 1.0)
    assert patched == [CONV_KEY], patched
    return clone


def build_model(c: dict[str, Any]) -> Any:
    from support import tiny_models as tm

    dtype = torch.float16 if c["fp16"] else None
    model = tm.build_sd15(0, dtype=dtype) if c["family"] == "sd15" else tm.build_sdxl(0, dtype=dtype)
    if c["lora"] == "full":
        model = tm.make_lora_patches(model, LORA_SEED)
    elif c["lora"] == "conv":
        model = conv_lora(model)
    if c["attn2"]:
        model = model.clone()
        for block, number, index in tm.attention_blocks(model):
            model.set_model_attn2_replace(_plain_attn2, block, number, index)
    return model


def sample_case(model: Any, c: dict[str, Any]) -> torch.Tensor:
    """ComfyUI's own KSampler path, as the single-device node would run it."""
    import comfy.sample

    from support import tiny_models as tm

    positive, negative = tm.make_conds(model, 3)
    if c["control"]:
        levels = skip_levels(model.model.model_config.unet_config)
        control = _control_class()(levels, 0.5)
        for cond in positive + negative:
            cond[1]["control"] = control
    latent = torch.zeros(c["batch"], 4, c["h"], c["w"])
    noise = comfy.sample.prepare_noise(latent, c["seed"])
    out = comfy.sample.sample(
        model, noise, c["steps"], c["cfg"], c["sampler"], c["scheduler"], positive, negative, latent,
        disable_pbar=True, seed=c["seed"],
    )
    return out.float().cpu()


def run_parallel(rank: int, world: int, c: dict[str, Any]) -> dict[str, Any]:
    """One case on this rank: band-parallel clone, same sampling loop; output and comm record."""
    from hires_parallel.parallel.split.layout import ParallelPlan
    from hires_parallel.parallel.split.unet_parallel import BandParallelRuntime, apply_band_parallel

    runtime = BandParallelRuntime(ParallelPlan(world, c["cfg_parallel"]), rank, ALIGN, c["weights"])
    try:
        model = apply_band_parallel(build_model(c), runtime)
        out = sample_case(model, c)
        return {
            "out": out,
            "calls": runtime.calls,
            "stats": runtime.stats.as_dict(),
            "bands": runtime.band_for(c["h"]).bands,
            "coords": (runtime.batch_group, runtime.band_index),
        }
    finally:
        runtime.close()


def run_world(rank: int, world: int) -> dict[str, Any]:
    from hires_parallel.comfy_host import ensure_comfy

    ensure_comfy()
    return {c["name"]: run_parallel(rank, world, c) for c in CASES[world]}
