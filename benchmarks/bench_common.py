"""What the benchmark scripts share: the machine a result was measured on, and writing the result JSON."""
from __future__ import annotations

import json
import os
import pathlib
import platform
from typing import Any


def machine(**extra: Any) -> dict[str, Any]:
    """CPU count, platform and torch version (plus ``extra``), for the result's "machine" entry."""
    import torch

    return {"cpu_count": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__, **extra}


def write_result(path: str | pathlib.Path, result: dict[str, Any], **json_kw: Any) -> pathlib.Path:
    """Write ``result`` as JSON (indent 2 unless given), creating the folder, and say where it went."""
    out = pathlib.Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, **{"indent": 2, **json_kw}) + "\n")
    print(f"wrote {out}")
    return out


def use_pytorch_attention() -> None:
    """ComfyUI's --use-pytorch-cross-attention for this process and its workers (they copy its settings); call
    before ComfyUI is imported."""
    import sys

    from hires_parallel.comfy_host import find_comfyui

    root = find_comfyui()
    if root and root not in sys.path:
        sys.path.insert(0, root)
    import comfy.cli_args

    comfy.cli_args.args.use_pytorch_cross_attention = True


def tiny_sd15(channels: int, pytorch_attention: bool = False) -> tuple[Any, list, list]:
    """The tests' seeded SD-family UNet (tests/support/tiny_models.py) with conds: (model, positive, negative).
    Imports ComfyUI (CPU) first, so call it before any other ComfyUI import. ``pytorch_attention``: ComfyUI's
    --use-pytorch-cross-attention (its attention on GPUs; the workers get the same setting)."""
    import sys

    from hires_parallel.comfy_host import ensure_comfy

    if pytorch_attention:
        use_pytorch_attention()
    ensure_comfy(cpu=True)
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "tests"))
    from support.tiny_models import build_sd15, make_conds

    model = build_sd15(seed=0, model_channels=channels)
    positive, negative = make_conds(model, seed=1)
    return model, positive, negative
