"""Cases for tests/comfy/test_partial_window.py: does partial (PCPP) mode attend ONLY to its windows?

The model: the tiny SD1.5 test UNet (``tiny_models.build_sd15`` of a seed only this test uses) with every
self-attention's ``to_q`` and ``to_k`` weights multiplied by ``QK_GAIN``:
the logits grow by QK_GAIN^2 and each query puts most of its weight on a few keys, wherever in the image
they are (the random features make the peaks content-, hence position-dependent). On the plain random
UNet, attention is nearly uniform and partial's windows change little (README, test_displaced_modes).

The run: the "probe" of displaced_cases: ONE input evaluated at the nearly equal sigmas ``PROBE_SIGMAS``
(each its own step), warmup 1 and synchronous GroupNorm, so the stale data of steps 1.. equals fresh data
up to a 1e-6 sigma change. A stale partial call must then equal the same UNet on one device whose
self-attention is restricted, for the queries of each band, to the rows of that band plus the
``window_rows(fraction, h)`` rows of each neighbour band nearest to it (``windowed_attn1``), and must differ
from full attention (what displaced mode computes).

The ranks can also run partial with the window IGNORED (``ignore_window``: ``displaced.window_rows``
patched to return every row of the neighbour band), to show that the check catches it.
"""
from __future__ import annotations

import math
from typing import Any

import torch

H, W = 40, 40  # latent: 2 bands of 20 rows; attention at 1/2 (10 rows per band) and 1/4 (5 rows)
ALIGN = 4  # total downsampling of the tiny UNet
QK_GAIN = 4.0
FRACTION = 0.3
SEED = 5  # the probe input
MODEL_SEED = 517  # the UNet's weights; no other test uses this seed
CFG = 1.0  # one UNet call per step (ComfyUI skips the negative at cfg 1)
PROBE_CALLS = 22  # the stale iteration on a fixed input settles to float rounding after about 17 calls
# Distinct sigmas (each its own step) 1e-6 apart relative (8 float32 ulps: the step clock sees them change).
PROBE_SIGMAS = [5.0 * (1 - i * 1e-6) for i in range(PROBE_CALLS)] + [0.0]
QK_SUFFIXES = (".attn1.to_q.weight", ".attn1.to_k.weight")

RUNS: list[dict[str, Any]] = [
    dict(name="partial", mode="partial", ignore_window=False),
    dict(name="partial, window ignored", mode="partial", ignore_window=True),
    dict(name="displaced", mode="displaced", ignore_window=False),
]


def build_model() -> Any:
    """The tiny SD1.5 UNet of seed MODEL_SEED (no other test builds it) with every attn1 q/k weight scaled by
    QK_GAIN, in place, once per process (the cached UNet is this test's own; clones share its weights).
    Not a weight patch: ComfyUI leaves patched weights in place between runs, so a "diff" computed from
    ``state_dict()`` would compound."""
    from support import tiny_models as tm

    model = tm.build_sd15(MODEL_SEED)
    unet = model.model
    if not getattr(unet, "_partial_window_qk_gain", False):
        keys = [k for k in unet.state_dict() if k.startswith("diffusion_model.") and k.endswith(QK_SUFFIXES)]
        assert len(keys) == 2 * len(tm.attention_blocks(model)), keys
        with torch.no_grad():
            for name, p in unet.named_parameters():
                if name in keys:
                    p.mul_(QK_GAIN)
        unet._partial_window_qk_gain = True
    return model


def level_factor(h: int) -> int:
    f = 1
    while -(-H // f) != h:
        f *= 2
        assert f <= ALIGN, h
    return f


def level_rows(bands: list[tuple[int, int]], j: int, f: int) -> tuple[int, int]:
    """Rows of band j at downsampling f (the last band runs to ceil(H / f))."""
    s, e = bands[j]
    return (s // f, -(-e // f)) if j == len(bands) - 1 else (s // f, e // f)


def window(fraction: float, rows: int) -> int:
    """Rows of a neighbour band of ``rows`` rows in the window: the fraction nearest, rounded up."""
    return min(rows, math.ceil(fraction * rows - 1e-9)) if fraction > 0 else 0


def key_rows(bands: list[tuple[int, int]], j: int, f: int, fraction: float) -> tuple[int, int]:
    """Rows ``[lo, hi)`` band j's queries may attend to at level f: its own rows plus the nearest
    ``window(fraction, .)`` rows of the band above and of the band below (one contiguous range)."""
    s, e = level_rows(bands, j, f)
    above = 0 if j == 0 else window(fraction, s - level_rows(bands, j - 1, f)[0])
    below = 0 if j == len(bands) - 1 else window(fraction, level_rows(bands, j + 1, f)[1] - e)
    return s - above, e + below


def windowed_attn1(bands: list[tuple[int, int]], fraction: float, stats: dict[str, list[float]]):
    """An attn1 replace patch: full-image attention (``fraction`` None) or each band's queries against
    its key rows only. Records per call the mean largest attention weight (uniform: 1/tokens) and the
    attention mass full attention puts OUTSIDE the window of the query's band."""

    def attn1(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, extra: dict) -> torch.Tensor:
        from comfy.ldm.modules.attention import optimized_attention

        heads = extra["n_heads"]
        _, _, h, w = extra["activations_shape"]
        f = level_factor(int(h))
        b, n, dim = q.shape
        if fraction is None:
            qh = q.reshape(b, n, heads, -1).transpose(1, 2)
            kh = k.reshape(b, n, heads, -1).transpose(1, 2)
            p = torch.softmax(qh @ kh.transpose(-1, -2) / math.sqrt(qh.shape[-1]), dim=-1)  # (b, heads, n, n)
            stats.setdefault("max_weight", []).append(float(p.max(-1).values.mean().detach()))
            stats.setdefault("uniform", []).append(1.0 / n)
            outside = []
            for j in range(len(bands)):
                s, e = level_rows(bands, j, f)
                lo, hi = key_rows(bands, j, f, FRACTION)
                pj = p[:, :, s * w : e * w]
                outside.append(float(1.0 - pj[..., lo * w : hi * w].sum(-1).mean()))
            stats.setdefault("outside", []).append(sum(outside) / len(outside))
            return optimized_attention(q, k, v, heads, attn_precision=extra.get("attn_precision"))
        out = torch.empty_like(q)
        for j in range(len(bands)):
            s, e = level_rows(bands, j, f)
            lo, hi = key_rows(bands, j, f, fraction)
            out[:, s * w : e * w] = optimized_attention(q[:, s * w : e * w], k[:, lo * w : hi * w], v[:, lo * w : hi * w],
                                                        heads, attn_precision=extra.get("attn_precision"))
        return out

    return attn1


def with_attention(model: Any, patch: Any) -> Any:
    from support import tiny_models as tm

    model = model.clone()
    for block, number, index in tm.attention_blocks(model):
        model.set_model_attn1_replace(patch, block, number, index)
    return model


def probe(model: Any) -> torch.Tensor:
    """The denoised output of every call at PROBE_SIGMAS on one fixed input, stacked (calls, B, C, H, W)."""
    from support import tiny_models as tm
    from support.displaced_cases import same_input_outputs

    positive, negative = tm.make_conds(model, 3)
    x = torch.randn(1, 4, H, W, generator=torch.Generator().manual_seed(SEED))
    return same_input_outputs(model, x, CFG, PROBE_SIGMAS, positive, negative)


def references(bands: list[tuple[int, int]]) -> dict[str, Any]:
    """One device: full attention (with its statistics) and attention restricted to the windows."""
    stats: dict[str, list[float]] = {}
    model = build_model()
    full = probe(with_attention(model, windowed_attn1(bands, None, stats)))
    windowed = probe(with_attention(model, windowed_attn1(bands, FRACTION, {})))
    return {"full": full, "windowed": windowed, "stats": stats}


def compare(out: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    """PSNR (peak max|ref|) and max abs error relative to max|ref|."""
    mse = float(((out - ref) ** 2).mean())
    peak = float(ref.abs().max())
    return {"psnr": math.inf if mse == 0 else 10 * math.log10(peak**2 / mse),
            "rel_err": float((out - ref).abs().max()) / peak}


def run_parallel(rank: int, world: int, r: dict[str, Any]) -> dict[str, Any]:
    from hires_parallel.parallel.split import displaced
    from hires_parallel.parallel.split.displaced import StaleOptions
    from hires_parallel.parallel.split.layout import ParallelPlan
    from hires_parallel.parallel.split.unet_parallel import BandParallelRuntime, apply_band_parallel

    options = StaleOptions(mode=r["mode"], warmup=1, groupnorm="sync", fraction=FRACTION)
    runtime = BandParallelRuntime(ParallelPlan(world), rank, ALIGN, None, stale=options)
    original = displaced.window_rows
    if r["ignore_window"]:
        displaced.window_rows = lambda fraction, rows: int(rows)  # the whole neighbour band
    try:
        out = probe(apply_band_parallel(build_model(), runtime))
        runtime.finish()
        return {"out": out, "bands": [tuple(b) for b in runtime.band_for(H).bands],
                "stale_calls": runtime.stale.stale_calls, "stats": runtime.stats.as_dict()}
    finally:
        displaced.window_rows = original
        runtime.close()


def run_world(rank: int, world: int) -> dict[str, Any]:
    from hires_parallel.comfy_host import ensure_comfy

    ensure_comfy()
    return {r["name"]: run_parallel(rank, world, r) for r in RUNS}
