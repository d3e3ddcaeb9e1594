"""Which DiTs patch-parallel sampling splits, and the errors for the others (no ComfyUI needed)."""
from __future__ import annotations

import pytest
import torch

from hires_parallel.parallel.split.dit_families import FAMILIES, dit_family, is_dit
from hires_parallel.parallel.split.dit_parallel import check_dit_support, resolve_attention
from hires_parallel.parallel.split.unet_parallel import UnsupportedModel


class _Patcher:
    def __init__(self, dm, transformer_options=None):
        self.dm = dm
        self.model_options = {"transformer_options": transformer_options or {}}

    def get_model_object(self, name):
        assert name == "diffusion_model"
        return self.dm


def _dit(module: str, qualname: str) -> torch.nn.Module:
    cls = type(qualname, (torch.nn.Module,), {"__module__": module, "patch_size": 2})
    cls.__qualname__ = qualname
    return cls()


def test_every_family_matches_its_own_class_only() -> None:
    for fam in FAMILIES:
        assert dit_family(_dit(fam.module, fam.cls)) is fam
    chroma = _dit("comfy.ldm.chroma.model", "Chroma")  # Flux's cousin with its own forward
    assert dit_family(chroma) is None and is_dit(chroma)


@pytest.mark.parametrize("module,name", [("comfy.ldm.hunyuan_video.model", "HunyuanVideo"),
                                         ("comfy.ldm.chroma.model", "Chroma"), ("comfy.ldm.wan.model", "VaceWanModel")])
def test_other_dits_get_an_error_that_names_them(module: str, name: str) -> None:
    with pytest.raises(UnsupportedModel, match=f"{module}.{name}.*not split yet: use 1 device"):
        check_dit_support(_Patcher(_dit(module, name)))


def test_patches_that_see_every_token_are_refused() -> None:
    flux = _dit("comfy.ldm.flux.model", "Flux")
    assert check_dit_support(_Patcher(flux)).name == "Flux"
    for to, what in (({"patches": {"post_input": [print]}}, '"post_input" patches'),
                     ({"patches_replace": {"dit": {("double_block", 0): print}}}, "dit replace")):
        with pytest.raises(UnsupportedModel, match=what):
            check_dit_support(_Patcher(flux, to))


@pytest.mark.parametrize("mode,heads,bands,want", [
    ("auto", 24, 2, "gathered_kv"),   # equal bytes at 2: keep the any-N path
    ("auto", 24, 4, "ulysses"), ("auto", 24, 5, "gathered_kv"), ("gathered_kv", 24, 4, "gathered_kv"),
    ("ulysses", 24, 2, "ulysses"),
])
def test_attention_choice(mode: str, heads: int, bands: int, want: str) -> None:
    assert resolve_attention(mode, heads, bands) == want


def test_forced_ulysses_needs_divisible_heads() -> None:
    with pytest.raises(UnsupportedModel, match="24 attention heads.*does not divide by 5"):
        resolve_attention("ulysses", 24, 5)
