"""Test-only ComfyUI node pack: a checkpoint loader that needs no checkpoint file.

``HiResTestCheckpointLoader`` ("HiRes Test Checkpoint Loader", category hires_parallel/testing) takes
``ckpt_name`` as a free STRING, so the widget value of a CheckpointLoaderSimple node (for example
"sd_xl_base_1.0.safetensors") can be passed through unchanged, and returns MODEL, CLIP, VAE like
CheckpointLoaderSimple, built by tests/support/tiny_models.py with seeded random weights:

* a name containing "xl" (any case): tiny SDXL UNet (adm 2816, context 64) + tiny SDXL dual CLIP
  (conditioning (1, 77, 64), pooled_output projected to (1, 1280)) + tiny VAE;
* a name containing "shapes" (any case): the TRAINED shapes model of benchmarks/shapes_model.py
  (models/hires_shapes.safetensors; SD1.5 family, its CLIP and its fixed linear VAE; weight_seed unused);
* any other name: tiny SD1.5 UNet (context 64) + tiny SD1 CLIP (conditioning (1, 77, 64)) + tiny VAE.

Apart from "shapes", the name chooses nothing but the family; the optional ``weight_seed`` chooses the weights.

The server tests copy or link this folder into a temporary custom_nodes folder, where tests/ is not
on sys.path, so the tests folder is found from this file's own (symlink-resolved) location, else
next to the installed ``hires_parallel`` package, and put on sys.path to import ``support``.
"""
from __future__ import annotations

import os
import sys


def _tests_dir() -> str:
    candidates = [os.path.dirname(os.path.dirname(os.path.realpath(__file__)))]
    try:
        import hires_parallel

        candidates.append(os.path.join(os.path.dirname(os.path.realpath(hires_parallel.__file__)), "tests"))
    except ImportError:
        pass
    for path in candidates:
        if os.path.isfile(os.path.join(path, "support", "tiny_models.py")):
            return path
    raise ImportError("HiRes test pack: cannot find tests/support/tiny_models.py (looked in {})".format(candidates))


_TESTS = _tests_dir()
if _TESTS not in sys.path:
    sys.path.insert(0, _TESTS)

from support import tiny_models  # noqa: E402  (cheap: ComfyUI models are built on first use)


class HiResTestCheckpointLoader:
    DESCRIPTION = (
        "Test stand-in for Load Checkpoint: builds tiny real ComfyUI models with seeded random weights. "
        "Names containing 'xl' give the SDXL family, others SD1.5."
    )
    CATEGORY = "hires_parallel/testing"
    RETURN_TYPES = ("MODEL", "CLIP", "VAE")
    OUTPUT_TOOLTIPS = (
        "The tiny diffusion model (SD1.5 or SDXL family).",
        "The tiny text encoder matching the model (context dim 64).",
        "The tiny VAE (4 latent channels, downscale 8).",
    )
    FUNCTION = "load_checkpoint"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "ckpt_name": ("STRING", {
                    "default": "tiny_sd15.safetensors",
                    "tooltip": "Any checkpoint file name; names containing 'xl' give the SDXL family, 'shapes' the "
                               "trained shapes model, others SD1.5.",
                }),
            },
            "optional": {
                "weight_seed": ("INT", {
                    "default": 0, "min": 0, "max": 2**31 - 1,
                    "tooltip": "Seed of the random weights.",
                }),
            },
        }

    def load_checkpoint(self, ckpt_name, weight_seed=0):
        if "shapes" in str(ckpt_name).lower():
            benchmarks = os.path.join(os.path.dirname(_TESTS), "benchmarks")
            if benchmarks not in sys.path:
                sys.path.insert(0, benchmarks)
            import shapes_model

            return shapes_model.load_shapes_model()
        return tiny_models.build_checkpoint(ckpt_name, int(weight_seed))


NODE_CLASS_MAPPINGS = {"HiResTestCheckpointLoader": HiResTestCheckpointLoader}
NODE_DISPLAY_NAME_MAPPINGS = {"HiResTestCheckpointLoader": "HiRes Test Checkpoint Loader"}

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
