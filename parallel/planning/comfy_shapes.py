"""A ModelDescription read from a real ComfyUI diffusion model module (UNetModel, Flux, and the other DiT families
the pack splits: SD3 / SD3.5 MMDiT, Qwen-Image, Wan), and such modules built
on the ``meta`` device from ComfyUI's own configs (no weights, no memory). ComfyUI is imported here only,
inside the functions; the description walks the module's own layers, so it is independent of the analytic
builders in exchange_pattern.py and checks them."""
from __future__ import annotations

import re
from typing import Any, Sequence

import torch

from ..split.band_ops import conv_halo_rows
from ..split.dit_families import DitFamily, dit_family
from ..split.tokens import choose_axis
from .exchange_pattern import FLUX_DEV_CONFIG, SDXL_CONFIG, TILE, ModelDescription, _Builder, _ceil

# text tokens each family attends to when the caller does not know the prompt's: Flux T5 512; SD3 CLIP-L/G 77
# concatenated with T5 77 (ComfyUI's sd3_clip default); Qwen-Image: the prompt after the chat template
# (varies; a typical prompt); Wan: umt5 text_len 512.
TEXT_TOKENS = {"Flux": 512, "SD3": 154, "Qwen-Image": 256, "Wan": 512}
# (path pattern inside the diffusion model, stream) per family, first match wins: "img" token-wise on image
# tokens (split by band), "txt" on text tokens (every rank repeats it), "vec" on one vector (modulation,
# embeddings), "skip" not run by a plain text-to-image / video call.
_STREAMS: dict[str, tuple[tuple[str, str], ...]] = {
    "SD3": ((r"(^|\.)adaLN_modulation\.", "vec"), (r"^(t_embedder|y_embedder)\.", "vec"),
            (r"^context_embedder", "txt"), (r"^joint_blocks\.\d+\.context_block\.", "txt"),
            (r"^context_processor\.", "txt"), (r"^(x_embedder|joint_blocks|final_layer)\.", "img")),
    "Qwen-Image": ((r"_mod\.", "vec"), (r"^(time_text_embed|norm_out)\.", "vec"), (r"^txt_in", "txt"),
                   (r"\.txt_mlp\.", "txt"), (r"\.attn\.(add_[qkv]_proj|to_add_out)", "txt"),
                   (r"^(img_in|proj_out|transformer_blocks)", "img")),
    "Wan": ((r"^(time_embedding|time_projection)\.", "vec"), (r"^text_embedding\.", "txt"),
            (r"\.cross_attn\.[kv]$", "txt"), (r"\.cross_attn\.[kv]_img$", "skip"), (r"^img_emb\.", "skip"),
            (r"^(ref_conv|vace_|control_adapter|audio)", "skip"),
            (r"^(patch_embedding|blocks|head)\.", "img")),
}

__all__ = ["TEXT_TOKENS", "describe_module", "meta_model"]


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


def describe_module(dm: Any, latent_hw: tuple[int, int], *, context_tokens: int = 77, text_tokens: int | None = None,
                    name: str | None = None, frames: int = 1) -> ModelDescription:
    """The description of a ComfyUI ``UNetModel`` (openaimodel), ``Flux``, SD3 MMDiT
    (``OpenAISignatureMMDITWrapper``), ``QwenImageTransformer2DModel`` or ``WanModel`` module at a latent size
    (``frames``: latent frames of a video latent, Wan). ``text_tokens``: the DiT's text tokens (default: the
    family's usual, ``TEXT_TOKENS``); ``context_tokens``: a UNet's cross-attention context. TypeError for
    any other module."""
    if hasattr(dm, "input_blocks"):
        return _describe_unet(dm, latent_hw, context_tokens, name or type(dm).__name__)
    fam = dit_family(dm)
    txt = int(text_tokens) if text_tokens is not None else TEXT_TOKENS.get(fam.name if fam else "Flux", 512)
    if hasattr(dm, "double_blocks") and hasattr(dm, "single_blocks"):
        return _describe_flux(dm, latent_hw, txt, name or type(dm).__name__)
    if fam is not None and fam.name in _STREAMS:
        return _describe_dit(dm, fam, latent_hw, int(frames), txt, name or type(dm).__name__)
    raise TypeError(f"{type(dm).__name__}: describe_module reads openaimodel UNets and the DiT families Flux, SD3, "
                    f"Qwen-Image and Wan only")


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


# ------------------------------------------------------------------------------------ SD3, Qwen-Image, Wan
def _stream(fam: str, path: str) -> str:
    for pat, where in _STREAMS[fam]:
        if re.search(pat, path):
            return where
    return "skip"


def _tokenwise_params(m: torch.nn.Module) -> tuple[int, int] | None:
    """(multiply-adds per token, output features) of a Linear, or of a patchifying conv (kernel = stride:
    one output position per token); None for anything else."""
    if isinstance(m, torch.nn.Linear):
        return m.in_features * m.out_features, m.out_features
    if isinstance(m, (torch.nn.Conv2d, torch.nn.Conv3d)) and tuple(m.kernel_size) == tuple(m.stride):
        k = 1
        for v in m.kernel_size:
            k *= int(v)
        return m.in_channels // m.groups * m.out_channels * k, m.out_channels
    return None


def _dit_grid(fam: DitFamily, dm: Any, latent_hw: Sequence[int], frames: int) -> tuple[int, int, int]:
    """(split units, tokens per unit, image tokens) as tokens.token_grid lays them out for 2 bands: token rows
    of every frame, or whole frames when they split more evenly."""
    pt, ph, pw = fam.patch(dm)
    f = _ceil(max(1, frames), pt) if fam.video else 1
    rows, cols = _ceil(int(latent_hw[0]), ph), _ceil(int(latent_hw[1]), pw)
    try:
        axis = choose_axis(f, rows, 2)
    except ValueError:
        axis = "rows"
    if axis == "frames":
        return f, rows * cols, f * rows * cols
    return rows, f * cols, f * rows * cols


def _describe_dit(dm: Any, fam: DitFamily, latent_hw: Sequence[int], frames: int, txt: int,
                  name: str) -> ModelDescription:
    """A DiT read generically: token-wise FLOPs = 2 x (multiply-adds of its token-wise linear layers) x the
    tokens of their stream (image tokens split by band; text tokens and vectors repeated on every rank);
    attention 4 x queries x keys x width per attention: joint image + text (SD3, Qwen-Image: the image
    queries against all keys are the split ``self_attn``, the text queries ``shared``), image-only (SD3.5's
    extra x-block attention, Wan's self-attention) and Wan's cross-attention of the image tokens to the text
    (token-wise, no exchange). Exchanges then follow from the kinds (exchange_pattern.step_pattern): the
    image K/V of every self-attention and the gathered output, as parallel/split/dit_parallel.py runs them."""
    rows, width, t = _dit_grid(fam, dm, latent_hw, frames)
    grid = {"rows": rows, "width": width}
    heads = fam.heads(dm)
    b = _Builder()
    for path, m in dm.named_modules():
        if not path:
            continue
        where = _stream(fam.name, path)
        if where == "skip":
            continue
        pm = _tokenwise_params(m)
        if pm is not None:
            io, outs = pm
            if where == "img":
                b.add(f"linear {path.split('.')[-1]} {io}x{outs}", "token_mlp", 2 * io * t, tiles_n=_ceil(outs, TILE),
                      **grid)
            else:
                n = txt if where == "txt" else 1
                b.add(f"shared linear {io}x{outs} x{n}", "shared", 2 * io * n)
        elif where == "img" and type(m).__name__.endswith("Norm") and not path.endswith(("norm_q", "norm_k")) \
                and ".ln_" not in path:
            b.add(f"norm {type(m).__name__}", "norm", 0, **grid)
    for blk_path, blk in _attention_blocks(fam, dm):
        for kind, hd in blk:
            if kind == "joint":
                b.add(f"self_attn {hd}", "self_attn", 4 * t * (t + txt) * hd, channels=hd, extra_keys=txt,
                      tiles_n=heads, **grid)
                b.add(f"text queries {hd}", "shared", 4 * txt * (t + txt) * hd)
            elif kind == "image":
                b.add(f"self_attn image-only {hd}", "self_attn", 4 * t * t * hd, channels=hd, tiles_n=heads, **grid)
            elif kind == "cross":
                b.add(f"cross_attn {hd}", "cross_attn", 4 * t * txt * hd, tiles_n=heads, **grid)
    head = _head_linear(fam, dm)
    out_per_token = head.out_features if head is not None else 0
    return ModelDescription(name, "dit", rows, width, 1, _itemsize(dm), int(out_per_token), b.done())


def _head_linear(fam: DitFamily, dm: Any) -> torch.nn.Linear | None:
    """The output module's linear on the image tokens (not its modulation)."""
    mod = dm.get_submodule(fam.head)
    lin = [m for p, m in mod.named_modules() if isinstance(m, torch.nn.Linear)
           and _stream(fam.name, f"{fam.head}.{p}" if p else fam.head) == "img"]
    return lin[-1] if lin else None


def _attention_blocks(fam: DitFamily, dm: Any) -> list[tuple[str, list[tuple[str, int]]]]:
    """Every block's attentions: ("joint" | "image" | "cross", K width)."""
    out = []
    for _, attr in fam.blocks:
        for i, blk in enumerate(getattr(dm, attr)):
            if fam.name == "SD3":
                x = blk.x_block
                hd = int(x.attn.qkv.out_features) // 3
                kinds = [("joint", hd)] + ([("image", hd)] if getattr(x, "x_block_self_attn", False) else [])
            elif fam.name == "Qwen-Image":
                kinds = [("joint", int(blk.attn.to_k.out_features))]
            else:  # Wan
                kinds = [("image", int(blk.self_attn.k.out_features)), ("cross", int(blk.cross_attn.k.out_features))]
            out.append((f"{attr}.{i}", kinds))
    return out
