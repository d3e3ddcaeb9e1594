"""Find and import the ComfyUI host from outside a running ComfyUI (tests, benchmarks, CLI, workers).

Inside ComfyUI nothing here is needed: ``comfy`` is already imported. Elsewhere the ComfyUI to use is, in
this order:

1. the ComfyUI that contains this pack (the pack sits in ``<ComfyUI>/custom_nodes/<pack>/``);
2. ``COMFYUI_PATH`` (a ComfyUI checkout: the folder holding main.py and comfy/); when it is set but is not
   a ComfyUI, nothing further is tried, so a wrong setting is reported rather than silently replaced;
3. ``DEFAULT_COMFYUI_PATH`` (``/work/ComfyUI``), the last resort.
"""
from __future__ import annotations

import os
import sys

DEFAULT_COMFYUI_PATH = "/work/ComfyUI"

HOW_TO = (
    "HiRes Parallel needs ComfyUI for this. It uses the ComfyUI that contains the pack (ComfyUI/custom_nodes/"
    "<this pack>), else COMFYUI_PATH (the folder holding ComfyUI's main.py and comfy/), else "
    f"{DEFAULT_COMFYUI_PATH}. Put the pack in ComfyUI/custom_nodes/, or clone ComfyUI anywhere and set "
    "COMFYUI_PATH to it."
)


class ComfyUINotFound(ImportError):
    """Raised when a ComfyUI-facing part is used and no ComfyUI can be imported."""


def _is_comfy_root(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "main.py")) and os.path.isdir(os.path.join(path, "comfy"))


def containing_comfyui(pack_dir: str | None = None) -> str | None:
    """The ComfyUI root whose ``custom_nodes/`` holds the pack (``pack_dir``, default this file's folder)."""
    here = os.path.abspath(pack_dir or os.path.dirname(os.path.abspath(__file__)))
    parent = os.path.dirname(here)
    root = os.path.dirname(parent)
    if os.path.basename(parent) == "custom_nodes" and _is_comfy_root(root):
        return root
    return None


def find_comfyui(pack_dir: str | None = None, env: str | None = None) -> str | None:
    """The ComfyUI checkout to use, or None: the one containing the pack, else ``COMFYUI_PATH``, else
    ``DEFAULT_COMFYUI_PATH``. ``pack_dir`` and ``env`` (default: this pack, ``$COMFYUI_PATH``) are for tests."""
    containing = containing_comfyui(pack_dir)
    if containing:
        return containing
    env = os.environ.get("COMFYUI_PATH") if env is None else env
    if env:
        return os.path.abspath(env) if _is_comfy_root(env) else None
    return DEFAULT_COMFYUI_PATH if _is_comfy_root(DEFAULT_COMFYUI_PATH) else None


def ensure_comfy(cpu: bool | None = None, root: str | None = None) -> str:
    """Make ``import comfy`` work and return the ComfyUI root.

    ``cpu`` forces ComfyUI's ``--cpu`` mode; by default it is set when torch sees no CUDA device.
    It must be decided before ``comfy.model_management`` is first imported. ``root`` names the checkout
    (workers pass the controller's), else ``find_comfyui`` decides.
    """
    if "comfy.model_management" not in sys.modules:
        root = root or find_comfyui()
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
