"""The controller's ComfyUI settings, carried to the workers.

A worker imports ComfyUI itself, with argument parsing off, so on its own it would run with ComfyUI's
defaults: another attention backend (sub-quadratic instead of the user's sage, flash, xformers, split or
pytorch), other precision (``--force-fp16``, ``--fp32-unet``, ``--bf16-unet``, ``--fast``), other VRAM
modes and ``--reserve-vram``; "exact equals one device" would then not hold on the user's setup. The
controller captures its parsed ``comfy.cli_args.args`` (``capture``), the pool hands them to every rank
in its environment, and the worker applies them (``apply``) before ``comfy.model_management`` is first
imported, since ComfyUI decides devices, dtypes and the attention function at that import.
"""
from __future__ import annotations

import base64
import hashlib
import pickle
import sys
from typing import Any

ENV = "HIRES_PARALLEL_COMFY_ARGS"
# Settings a rank decides for itself: its device (CUDA_VISIBLE_DEVICES already maps its GPU to cuda:0)
# and what only ComfyUI's server uses. Everything else is the user's and goes along unchanged.
RANK_OWN = frozenset({"cpu", "cuda_device", "default_device", "directml", "listen", "port", "auto_launch",
                      "disable_auto_launch", "tls_keyfile", "tls_certfile", "enable_cors_header",
                      "multi_user", "front_end_version", "front_end_root", "user_directory"})


def capture() -> dict[str, Any]:
    """The controller's ComfyUI arguments worth shipping ({} when ComfyUI is not imported here)."""
    mod = sys.modules.get("comfy.cli_args")
    args = getattr(mod, "args", None)
    if args is None:
        return {}
    out = {}
    for key, value in vars(args).items():
        if key in RANK_OWN:
            continue
        try:
            pickle.dumps(value)
        except Exception:  # noqa: BLE001 - a setting of a newer ComfyUI that cannot travel stays default
            continue
        out[key] = value
    return out


def encode(settings: dict[str, Any]) -> str:
    return base64.b64encode(pickle.dumps(settings, protocol=pickle.HIGHEST_PROTOCOL)).decode("ascii")


def decode(text: str) -> dict[str, Any]:
    return pickle.loads(base64.b64decode(text.encode("ascii"))) if text else {}


def fingerprint(settings: dict[str, Any]) -> str:
    """Changes when a setting changes (the pool is rebuilt then: its workers imported ComfyUI already)."""
    return hashlib.sha1(repr(sorted((k, repr(v)) for k, v in settings.items())).encode()).hexdigest()[:12]


def apply(settings: dict[str, Any], device_type: str) -> list[str]:
    """Set ``settings`` on this process's ``comfy.cli_args.args`` (the ComfyUI root must be on sys.path)
    and this rank's own device choice; return the names that differ from ComfyUI's defaults."""
    if "comfy.model_management" in sys.modules:
        raise RuntimeError("ComfyUI's settings must be applied before comfy.model_management is imported")
    import comfy.cli_args

    args = comfy.cli_args.args
    defaults = vars(comfy.cli_args.parser.parse_args([])) if hasattr(comfy.cli_args, "parser") else {}
    changed = []
    for key, value in settings.items():
        if key in RANK_OWN or not hasattr(args, key):
            continue
        setattr(args, key, value)
        if key in defaults and defaults[key] != value and (defaults[key] or value):  # None vs set(): same
            changed.append(key)
    args.cpu = device_type == "cpu"
    return sorted(changed)
