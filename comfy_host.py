"""Find and import the ComfyUI host from outside a running ComfyUI (tests, benchmarks, CLI, workers).

Inside ComfyUI nothing here is needed: ``comfy`` is already imported. Elsewhere the checkout is taken
from ``COMFYUI_PATH``, else from the folder this pack sits in (``ComfyUI/custom_nodes/<pack>``), else
from ``DEFAULT_COMFYUI_PATH``.
"""
from __future__ import annotations

import os
import sys

DEFAULT_COMFYUI_PATH = "/work/ComfyUI"

HOW_TO = (
    "HiRes Parallel needs ComfyUI for this. Run it inside ComfyUI (custom_nodes/), or point "
    "COMFYUI_PATH at a ComfyUI checkout (the folder holding main.py and comfy/), "
    f"or put one at {DEFAULT_COMFYUI_PATH}."
)


class ComfyUINotFound(ImportError):
    """Raised when a ComfyUI-facing part is used and no ComfyUI can be imported."""


def _is_comfy_root(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "main.py")) and os.path.isdir(os.path.join(path, "comfy"))


def find_comfyui() -> str | None:
    """The ComfyUI checkout to use, or None."""
    env = os.environ.get("COMFYUI_PATH")
    if env:
        return os.path.abspath(env) if _is_comfy_root(env) else None
    here = os.path.dirname(os.path.abspath(__file__))
    grandparent = os.path.dirname(os.path.dirname(here))
    if os.path.basename(os.path.dirname(here)) == "custom_nodes" and _is_comfy_root(grandparent):
        return grandparent
    return DEFAULT_COMFYUI_PATH if _is_comfy_root(DEFAULT_COMFYUI_PATH) else None


def ensure_comfy(cpu: bool | None = None) -> str:
    """Make ``import comfy`` work and return the ComfyUI root.

    ``cpu`` forces ComfyUI's ``--cpu`` mode; by default it is set when torch sees no CUDA device.
    It must be decided before ``comfy.model_management`` is first imported.
    """
    if "comfy.model_management" not in sys.modules:
        root = find_comfyui()
        if root is None:
            raise ComfyUINotFound(HOW_TO)
        if root not in sys.path:
            sys.path.insert(0, root)
        import comfy.cli_args

        if cpu is None:
            import torch

            cpu = not torch.cuda.is_available()
        if cpu:
            comfy.cli_args.args.cpu = True
        import comfy.model_management  # noqa: F401  (decides devices now, with our args)
    import comfy.model_management

    # comfy/ is a namespace package (no __init__.py): locate it through one of its modules.
    return os.path.dirname(os.path.dirname(os.path.abspath(comfy.model_management.__file__)))
