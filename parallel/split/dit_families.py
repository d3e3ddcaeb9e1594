"""The DiT families patch-parallel sampling splits, and where each one's seams are.

Every family runs through the same hooks (dit_parallel.py); what differs is named here:

* ``blocks``: the (``patches_replace["dit"]`` kind, ModuleList attribute) pairs of its transformer blocks;
  the first block to run cuts the image tokens to the band, every block cuts the rotary embedding;
* ``scope``: where attention over image tokens happens (``"block"``: every attention inside a block is
  joint text+image or image self-attention; else the attribute of the self-attention module inside each
  block, e.g. Wan, whose blocks also hold a text cross-attention that stays local);
* ``pe_dim``: the token dimension of the rotary embedding passed to the blocks (None: none passed);
* ``head``: the output module whose result is gathered back to every token;
* ``heads`` / ``patch``: attention heads, and the (frames, rows, cols) patch size.

Only ComfyUI's own classes are matched, exactly (a subclass may run other code: VACE, Chroma, ...).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

__all__ = ["DitFamily", "FAMILIES", "dit_family", "is_dit"]


@dataclass(frozen=True)
class DitFamily:
    name: str
    module: str
    cls: str
    blocks: tuple[tuple[str, str], ...]
    scope: str
    pe_dim: int | None
    head: str
    heads: Callable[[Any], int]
    patch: Callable[[Any], tuple[int, int, int]]
    video: bool = False

    def matches(self, dm: Any) -> bool:
        t = type(dm)
        return t.__module__ == self.module and t.__qualname__ == self.cls


def _square(dm: Any) -> tuple[int, int, int]:
    p = dm.patch_size
    p = int(p[0]) if isinstance(p, (tuple, list)) else int(p)
    return 1, p, p


FAMILIES: tuple[DitFamily, ...] = (
    DitFamily("Flux", "comfy.ldm.flux.model", "Flux", (("double_block", "double_blocks"), ("single_block", "single_blocks")),
              "block", 2, "final_layer", lambda dm: int(dm.num_heads), _square),
    DitFamily("SD3", "comfy.ldm.modules.diffusionmodules.mmdit", "OpenAISignatureMMDITWrapper",
              (("double_block", "joint_blocks"),), "block", None, "final_layer",
              lambda dm: int(dm.joint_blocks[0].x_block.attn.num_heads),
              lambda dm: (1, int(dm.x_embedder.patch_size[0]), int(dm.x_embedder.patch_size[-1]))),
    DitFamily("Qwen-Image", "comfy.ldm.qwen_image.model", "QwenImageTransformer2DModel",
              (("double_block", "transformer_blocks"),), "block", 1, "proj_out",
              lambda dm: int(dm.transformer_blocks[0].attn.heads), _square),
    DitFamily("Wan", "comfy.ldm.wan.model", "WanModel", (("double_block", "blocks"),), "self_attn", 1, "head",
              lambda dm: int(dm.num_heads), lambda dm: tuple(int(p) for p in dm.patch_size), video=True),
)


def dit_family(dm: Any) -> DitFamily | None:
    """The family of a diffusion model (the torch module inside a ModelPatcher), or None."""
    for fam in FAMILIES:
        if fam.matches(dm):
            return fam
    return None


def is_dit(dm: Any) -> bool:
    """True for any patchified transformer (split or not): it has a patch size and no UNet levels."""
    return dit_family(dm) is not None or (hasattr(dm, "patch_size") and not hasattr(dm, "channel_mult"))
