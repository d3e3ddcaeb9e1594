"""ComfyUI's own single-process KSampler as the reference of a parallel run, with its measured float noise."""
from __future__ import annotations

import torch

from support.float_noise import cfg_noise_tolerance


def comfy_reference(model, conds, latent, seed=5, steps=3, cfg=5.0, sampler="euler", scheduler="karras") -> torch.Tensor:
    """ComfyUI's KSampler; the result carries ``noise_tolerance``: k x the float noise of this path, measured
    by running it again with cfg one float32 ulp up and down (support/float_noise.py)."""
    import nodes

    def run(c):
        return nodes.common_ksampler(model, seed, steps, c, sampler, scheduler, conds[0], conds[1], latent)[0]["samples"]

    ref, tol = cfg_noise_tolerance("exact", run, cfg)
    ref.noise_tolerance = tol
    return ref
