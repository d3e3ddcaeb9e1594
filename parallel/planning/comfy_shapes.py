"""A ModelDescription read from a real ComfyUI diffusion model module (UNetModel or Flux), and such modules built
on the ``meta`` device from ComfyUI's own configs (no weights, no memory). ComfyUI is imported here only,
inside the functions; the description walks the module's own layers, so it is independent of the analytic
builders in exchange_pattern.py and checks them."""
from __future__ import annotations

from typing import Any

import torch

from ..split.band_ops import conv_halo_rows
from .exchange_pattern import FLUX_DEV_CONFIG, SDXL_CONFIG, TILE, ModelDescription, _Builder, _ceil

__all__ = ["describe_module", "meta_model"]


def meta_model(name: str) -> Any:
    """ComfyUI's SDXL UNetModel (fp16) or Flux.1-dev (bf16) built on the meta device."""
    import comfy.ops

    ops = comfy.ops.disable_weight_init
    if name == "SDXL":
        from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

        cfg = {k: v for k, v in SDXL_CONFIG.items() if k != "groups"}
        return UNetModel(**cfg, image_size=32, use_spatial_transformer=True, legacy=False, num_classes="sequential",
                         use_linear_in_transformer=True, use_temporal_attention=False, use_temporal_resblock=False,
                         dtype=torch.float16, device="meta", operations=ops)
    if name == "Flux":
        from comfy.ldm.flux.model import Flux

        return Flux(**FLUX_DEV_CONFIG, axes_dim=[16, 56, 56], theta=10000, qkv_bias=True, image_model="flux",
                    dtype=torch.bfloat16, device="meta", operations=ops)
    raise ValueError(f"no meta build for {name!r} (SDXL or Flux)")


def _itemsize(dm: Any) -> int:
    dt = getattr(dm, "dtype", None)
    return torch.empty((), dtype=dt).element_size() if isinstance(dt, torch.dtype) else 2


def describe_module(dm: Any, latent_hw: tuple[int, int], *, context_tokens: int = 77, text_tokens: int = 512,
                    name: str | None = None) -> ModelDescription:
    """The description of a ComfyUI ``UNetModel`` (openaimodel) or ``Flux`` module at a latent size."""
    if hasattr(dm, "input_blocks"):
        return _describe_unet(dm, latent_hw, context_tokens, name or type(dm).__name__)
    if hasattr(dm, "double_blocks") and hasattr(dm, "single_blocks"):
        return _describe_flux(dm, latent_hw, text_tokens, name or type(dm).__name__)
    raise TypeError(f"{type(dm).__name__}: describe_module reads openaimodel UNets and Flux only")


def _describe_unet(dm: Any, latent_hw: tuple[int, int], ctx: int, name: str) -> ModelDescription:
    h, w = (int(v) for v in latent_hw)
    b = _Builder()

    def geo(f: int) -> dict[str, int]:
        return {"rows": _ceil(h, f), "width": _ceil(w, f), "factor": f}

    def visit(block: torch.nn.Module, f: int, first: bool) -> None:
        parents = {id(c): type(m).__name__ for m in block.modules() for c in m.children()}
        for path, m in block.named_modules():
            t = _ceil(h, f) * _ceil(w, f)
            if isinstance(m, torch.nn.Conv2d):
                fi = f // 2 if parents.get(id(m)) == "Upsample" else f  # Upsample: conv after the x2 interpolation
                kh, sh, ph = m.kernel_size[0], m.stride[0], m.padding[0]
                fo = fi * sh
                flops = 2 * m.in_channels // m.groups * m.out_channels * kh * m.kernel_size[1] * _ceil(h, fo) * _ceil(w, fo)
                tn = _ceil(m.out_channels, TILE)
                key = f"conv{kh}x{m.kernel_size[1]}/{sh} {m.in_channels}->{m.out_channels} @{fi}"
                if first:
                    b.add(key, "conv_in", flops, tiles_n=tn, **geo(fi))
                elif kh > 1 or sh > 1:
                    b.add(key, "conv_halo", flops, channels=m.in_channels, halo=conv_halo_rows(kh, sh, ph), tiles_n=tn,
                          **geo(fi))
                else:
                    b.add(key, "conv_local", flops, tiles_n=tn, **geo(fi))
            elif isinstance(m, torch.nn.GroupNorm):
                b.add(f"groupnorm {m.num_channels} @{f}", "groupnorm", 0, channels=m.num_groups, **geo(f))
            elif isinstance(m, torch.nn.LayerNorm):
                b.add(f"layernorm @{f}", "norm", 0, **geo(f))
            elif isinstance(m, torch.nn.Linear):
                if path.startswith("emb_layers") or ".emb_layers" in path:
                    b.add(f"shared linear {m.in_features}->{m.out_features} x1", "shared", 2 * m.in_features * m.out_features)
                elif path.endswith("attn2.to_k") or path.endswith("attn2.to_v"):
                    b.add(f"shared linear {m.in_features}->{m.out_features} x{ctx}", "shared",
                          2 * m.in_features * m.out_features * ctx)
                else:
                    b.add(f"linear {m.in_features}->{m.out_features} @{f}", "token_mlp",
                          2 * m.in_features * m.out_features * t, tiles_n=_ceil(m.out_features, TILE), **geo(f))
            elif hasattr(m, "to_q") and hasattr(m, "to_k"):  # CrossAttention
                c = m.to_k.out_features
                if path.endswith("attn2") or m.to_k.in_features != m.to_q.in_features:
                    b.add(f"cross_attn {c} @{f}", "cross_attn", 4 * t * ctx * c, tiles_n=m.heads, **geo(f))
                else:
                    b.add(f"self_attn {c} @{f}", "self_attn", 4 * t * t * c, channels=c, tiles_n=m.heads, **geo(f))

    def has(block: torch.nn.Module, cls: str) -> bool:
        return any(type(m).__name__ == cls for m in block.modules())

    for top in ("time_embed", "label_emb"):
        for m in (getattr(dm, top, None) or torch.nn.Identity()).modules():
            if isinstance(m, torch.nn.Linear):
                b.add(f"shared linear {m.in_features}->{m.out_features} x1", "shared", 2 * m.in_features * m.out_features)
    level = 0
    for i, block in enumerate(dm.input_blocks):
        visit(block, 2 ** level, i == 0)
        level += has(block, "Downsample")
    visit(dm.middle_block, 2 ** level, False)
    for block in dm.output_blocks:
        visit(block, 2 ** level, False)
        level -= has(block, "Upsample")
    visit(dm.out, 1, False)
    out_ch = int(getattr(dm, "out_channels", 4))
    levels = sum(has(blk, "Downsample") for blk in dm.input_blocks)
    return ModelDescription(name, "unet", h, w, 2 ** levels, _itemsize(dm), out_ch, b.done())


def _describe_flux(dm: Any, latent_hw: tuple[int, int], txt: int, name: str) -> ModelDescription:
    p, hd = int(dm.patch_size), int(dm.hidden_size)
    rows, width = _ceil(int(latent_hw[0]), p), _ceil(int(latent_hw[1]), p)
    t, grid = rows * width, {"rows": rows, "width": width}
    b = _Builder()

    def linears(mod: torch.nn.Module, tokens: str) -> None:
        for path, m in mod.named_modules():
            if not isinstance(m, torch.nn.Linear):
                continue
            io = 2 * m.in_features * m.out_features
            where = "vec" if "mod" in path or "adaLN" in path else tokens
            if where in ("img", "both"):
                b.add(f"linear {m.in_features}->{m.out_features}", "token_mlp", io * t,
                      tiles_n=_ceil(m.out_features, TILE), **grid)
            if where in ("txt", "both"):
                b.add(f"shared linear {m.in_features}->{m.out_features} x{txt}", "shared", io * txt)
            if where == "vec":
                b.add(f"shared linear {m.in_features}->{m.out_features} x1", "shared", io)

    def norms(mod: torch.nn.Module) -> None:
        for path, m in mod.named_modules():
            if isinstance(m, torch.nn.LayerNorm) and not path.startswith("txt_"):
                b.add(f"layernorm {hd}", "norm", 0, **grid)

    def attention() -> None:
        b.add(f"self_attn {hd}", "self_attn", 4 * t * (t + txt) * hd, channels=hd, extra_keys=txt,
              tiles_n=int(dm.num_heads), **grid)
        b.add(f"text queries {hd}", "shared", 4 * txt * (t + txt) * hd)

    linears(dm.img_in, "img")
    linears(dm.txt_in, "txt")
    for top in ("time_in", "vector_in", "guidance_in"):
        linears(getattr(dm, top), "vec")
    for blk in dm.double_blocks:
        for child_name, child in blk.named_children():
            linears(child, "vec" if child_name.endswith("_mod") else ("img" if child_name.startswith("img") else "txt"))
        norms(blk)
        attention()
    for blk in dm.single_blocks:
        for child_name, child in blk.named_children():
            linears(child, "vec" if child_name == "modulation" else "both")
        norms(blk)
        attention()
    linears(dm.final_layer.linear, "img")
    linears(dm.final_layer.adaLN_modulation, "vec")
    out = int(dm.out_channels)  # already patch * patch * channels
    return ModelDescription(name, "dit", rows, width, 1, _itemsize(dm), out, b.done())
