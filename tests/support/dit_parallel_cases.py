"""Cases for tests/comfy/test_dit_parallel.py: the same ComfyUI sampling run of a tiny DiT on one device
(parent process) and sequence-parallel on spawned gloo ranks (``run_world`` on 2 and 3 ranks).

A case is a plain dict; ``build_model`` and ``sample_case`` are shared by the parent and the ranks, so both
sides run exactly the same ComfyUI loop (``comfy.sample.sample``, noise from ``prepare_noise(seed)``, conds
from ``tiny_dits.make_dit_conds``). Latent sizes are in latent units; patch 2, so 32 rows = 16 token rows.
"""
from __future__ import annotations

from typing import Any

import torch

LORA_SEED = 7


def case(name: str, family: str, sampler: str, h: int, w: int, frames: int = 3, lora: bool = False,
         cfg_parallel: bool = False, attention: str = "gathered_kv", mode: str = "exact", cfg: float = 4.0,
         steps: int = 3, scheduler: str = "simple", seed: int = 11, warmup: int = 1, fraction: float = 0.5,
         debug: str = "", control: bool = False) -> dict[str, Any]:
    return dict(name=name, family=family, sampler=sampler, h=h, w=w, frames=frames, lora=lora,
                cfg_parallel=cfg_parallel, attention=attention, mode=mode, cfg=cfg, steps=steps, scheduler=scheduler,
                seed=seed, warmup=warmup, fraction=fraction, debug=debug, control=control)


FAMILIES = ("flux", "flux_schnell", "sd3", "qwen_image", "wan21", "wan22")
# Exact cases: every family at N = 2 and 3 with uneven bands (odd token rows), euler and an ancestral / SDE
# sampler, a LoRA on the attention weights, CFG parallel; Ulysses against gathered K/V.
CASES: dict[int, list[dict[str, Any]]] = {
    2: [
        case("w2 flux euler 22x16", "flux", "euler", 22, 16),
        case("w2 flux dpmpp_2m_sde lora 26x20", "flux", "dpmpp_2m_sde", 26, 20, lora=True),
        case("w2 flux_schnell euler_ancestral 22x16", "flux_schnell", "euler_ancestral", 22, 16, cfg=1.0),
        case("w2 sd3 euler lora 22x16", "sd3", "euler", 22, 16, lora=True),
        case("w2 qwen_image euler_ancestral lora 22x18", "qwen_image", "euler_ancestral", 22, 18, lora=True),
        case("w2 wan21 euler lora 14x12x3f", "wan21", "euler", 14, 12, lora=True),
        case("w2 wan22 dpmpp_2m_sde 12x12x5f", "wan22", "dpmpp_2m_sde", 12, 12, frames=5),
        case("w2 cfgpar flux euler lora 22x16", "flux", "euler", 22, 16, lora=True, cfg_parallel=True),
        case("w2 cfgpar wan21 euler 14x12x3f", "wan21", "euler", 14, 12, cfg_parallel=True),
        case("w2 flux ulysses euler 22x16", "flux", "euler", 22, 16, attention="ulysses"),
        case("w2 flux displaced 26x16", "flux", "euler", 26, 16, mode="displaced", steps=6),
        case("w2 flux partial 26x16", "flux", "euler", 26, 16, mode="partial", steps=6),
        case("w2 flux displaced zero_kv (broken exchange)", "flux", "euler", 26, 16, mode="displaced", steps=6,
             debug="zero_kv"),
        case("w2 wan21 partial 14x12x3f", "wan21", "euler", 14, 12, mode="partial", steps=6),
        case("w2 wan21 displaced 14x12x3f", "wan21", "euler", 14, 12, mode="displaced", steps=6),
        case("w2 flux euler control 22x16", "flux", "euler", 22, 16, control=True),
        case("w2 cfgpar sd3 euler control 22x16", "sd3", "euler", 22, 16, control=True, cfg_parallel=True),
    ],
    3: [
        case("w3 flux euler_ancestral lora 22x16", "flux", "euler_ancestral", 22, 16, lora=True),
        case("w3 sd3 dpmpp_2m_sde 26x16", "sd3", "dpmpp_2m_sde", 26, 16),
        case("w3 qwen_image euler 22x16", "qwen_image", "euler", 22, 16),
        case("w3 wan21 euler_ancestral lora 10x12x2f (row split)", "wan21", "euler_ancestral", 10, 12, frames=2,
             lora=True),
        case("w3 wan22 euler 12x12x4f", "wan22", "euler", 12, 12, frames=4),
        case("w3 flux ulysses (heads 4 % 3: refused)", "flux", "euler", 22, 16, attention="ulysses"),
        case("w3 qwen_image partial 26x16", "qwen_image", "euler", 26, 16, mode="partial", steps=6),
        case("w3 qwen_image euler control 22x16", "qwen_image", "euler", 22, 16, control=True),
    ],
}


def _control_class() -> type:
    import comfy.controlnet

    class TokenControl(comfy.controlnet.ControlBase):
        """A ControlNet stand-in for DiTs: one residual per image token of the width the blocks carry (as
        ComfyUI's Flux / SD3 / Qwen-Image ControlNets give), computed from x_noisy (so it depends on position
        and batch); "input" for every double block (Flux, Qwen-Image), "output" for every block after it (Flux
        single blocks, SD3 joint blocks), some entries None."""

        def __init__(self, hidden: int, blocks: int, scale: float = 0.3) -> None:
            super().__init__()
            self.hidden, self.blocks, self.scale = hidden, blocks, scale

        def get_control(self, x_noisy, t, cond, batched_number, transformer_options):
            b, c = x_noisy.shape[:2]
            x = x_noisy.reshape(b, c, -1, x_noisy.shape[-2], x_noisy.shape[-1])[:, :, 0]  # first frame if 5-D
            x = torch.nn.functional.pad(x, (0, x.shape[-1] % 2, 0, x.shape[-2] % 2))
            tokens = x.unfold(2, 2, 2).unfold(3, 2, 2).permute(0, 2, 3, 1, 4, 5).reshape(b, -1, c * 4)
            reps = -(-self.hidden // tokens.shape[-1])
            res = [torch.sin(tokens.repeat(1, 1, reps)[..., :self.hidden] * (i + 1)) * self.scale
                   for i in range(self.blocks)]
            res[1] = None
            return {"input": list(res), "output": list(res)}

        def copy(self):
            out = TokenControl(self.hidden, self.blocks, self.scale)
            self.copy_to(out)
            return out

    return TokenControl


def add_control(model: Any, positive: list, negative: list) -> None:
    dm = model.get_model_object("diffusion_model")
    hidden = int(getattr(dm, "hidden_size", 0) or getattr(dm, "inner_dim", 0))
    control = _control_class()(hidden, 2)
    for cond in positive + negative:
        cond[1]["control"] = control


def build_model(c: dict[str, Any]) -> Any:
    from support import tiny_dits as td

    model = td.build_tiny_dit(c["family"], 0)
    if c["lora"]:
        model, _ = td.make_attention_lora(model, LORA_SEED)
    return model


def latent_of(c: dict[str, Any]) -> torch.Tensor:
    from support import tiny_dits as td

    return td.empty_latent(c["family"], c["h"], c["w"], frames=c["frames"])


def sample_case(model: Any, c: dict[str, Any]) -> torch.Tensor:
    """ComfyUI's own KSampler path, as the single-device node would run it."""
    import comfy.sample

    from support import tiny_dits as td

    positive, negative = td.make_dit_conds(model, 3)
    if c["control"]:
        add_control(model, positive, negative)
    latent = comfy.sample.fix_empty_latent_channels(model, latent_of(c))  # as KSampler: Qwen-Image's are 5-D
    noise = comfy.sample.prepare_noise(latent, c["seed"])
    out = comfy.sample.sample(model, noise, c["steps"], c["cfg"], c["sampler"], c["scheduler"], positive, negative,
                              latent, disable_pbar=True, seed=c["seed"])
    return out.float().cpu()


def run_parallel(rank: int, world: int, c: dict[str, Any]) -> dict[str, Any]:
    """One case on this rank: the sequence-parallel clone, the same sampling loop; output and records."""
    from hires_parallel.parallel.split.displaced import StaleOptions
    from hires_parallel.parallel.split.dit_parallel import apply_dit_parallel
    from hires_parallel.parallel.split.layout import ParallelPlan
    from hires_parallel.parallel.split.unet_parallel import BandParallelRuntime, UnsupportedModel

    stale = None
    if c["mode"] != "exact":
        stale = StaleOptions(mode=c["mode"], warmup=c["warmup"], fraction=c["fraction"], debug=c["debug"])
    runtime = BandParallelRuntime(ParallelPlan(world, c["cfg_parallel"]), rank, 2, stale=stale)
    try:
        try:
            model = apply_dit_parallel(build_model(c), runtime, c["attention"])
        except UnsupportedModel as e:
            return {"refused": str(e)}
        out = sample_case(model, c)
        runtime.finish()
        return {"out": out, "calls": runtime.calls, "stats": runtime.stats.as_dict(),
                "stale_calls": 0 if runtime.stale is None else runtime.stale.stale_calls}
    finally:
        runtime.close()


def run_world(rank: int, world: int) -> dict[str, Any]:
    from hires_parallel.comfy_host import ensure_comfy

    ensure_comfy()
    return {c["name"]: run_parallel(rank, world, c) for c in CASES[world]}


def run_one(rank: int, world: int, name: str) -> dict[str, Any]:
    from hires_parallel.comfy_host import ensure_comfy

    ensure_comfy()
    c = next(c for c in CASES[world] if c["name"] == name)
    return run_parallel(rank, world, c)
