"""Module twins: a layer that ComfyUI sees as the same module, with a different forward.

The patch-parallel hooks swap layers through ``ModelPatcher.add_object_patch`` (per clone, undone on
unpatch; nothing global changes). A twin is an instance of a subclass of the layer's class whose
``__dict__`` IS the original's (shared, not copied): parameters set by weight loading or LoRA patching
(by name, through whichever object is in the tree), ``comfy_patched_weights`` and lowvram
``weight_function`` bookkeeping all land in both. A copy would freeze that bookkeeping: e.g. a stale
``comfy_patched_weights = True`` copied while another patcher had the model loaded makes
ModelPatcher.load skip the module and silently drop its LoRA.

The twin class keeps the original class in ``_hp_base``; its forward decides per call (from the
thread's active parallel call) whether to do anything else than ``_hp_base.forward``.
"""
from __future__ import annotations

import threading
from typing import Callable

import torch

__all__ = ["twin", "base_class"]

_CLASSES: dict[tuple[type, str], type] = {}
_LOCK = threading.Lock()


def base_class(module: torch.nn.Module) -> type:
    """The original class of a module or of its twin."""
    return getattr(type(module), "_hp_base", type(module))


def twin(module: torch.nn.Module, role: str, forward: Callable) -> torch.nn.Module:
    """A twin of ``module`` (a twin of a twin is a twin of the original) running ``forward``; one class
    per (original class, role), named ``<role><Class>``."""
    base = base_class(module)
    with _LOCK:
        cls = _CLASSES.get((base, role))
        if cls is None:
            cls = type(f"{role}{base.__name__}", (base,), {"forward": forward, "_hp_base": base,
                                                           "__module__": __name__})
            _CLASSES[(base, role)] = cls
    out = object.__new__(cls)
    object.__setattr__(out, "__dict__", module.__dict__)
    return out
