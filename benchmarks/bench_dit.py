"""DiT sequence parallelism, measured on this CPU and modelled for the real Flux.1-dev and Wan 2.2 14B.

Measured, through the real worker pool (gloo, 1 thread per rank): a Flux-family model built from ComfyUI's own
classes with seeded weights (hidden 128, 4 heads, 2 double + 2 single blocks) at a latent where one CFG step
takes over a second: 1 rank x 1 thread, 1 rank x 2 threads, and 2 ranks in every mode (exact with gathered
K/V, exact with Ulysses, displaced, partial), the configurations visited in turn in each round, the fastest
of the rounds kept. Seconds per step, bytes sent per step by rank 0 by kind (steady state: after warmup),
fidelity against 1 rank x 1 thread (latent PSNR over its range, max abs error).

Analytic: bytes one rank SENDS per model call (batch 1, one CFG branch; busiest rank), with the runtime's
counting rules (all-gather padded to the largest band, point-to-point windows, all-to-all chunks), for the
REAL Flux.1-dev (hidden 3072, 24 heads, 19 double + 38 single blocks, 512 text tokens, bf16) at 2048^2 and
4096^2, and Wan 2.2 14B (Wan 2.1 layout: dim 5120, 40 heads, 40 blocks; 1280x720, 81 frames = 21 latent
frames, bf16), for N = 2, 4, 8; and the time that takes over a few links. Beside them, xDiT's published
Flux.1-dev latencies (docs/performance/flux.md of xdit-project/xDiT; 1024px, 28 steps, 4x H100).

    python benchmarks/bench_dit.py [--size 96] [--steps 4] [--repeat 2] [--analytic-only]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import sys
import time
from typing import Any

from bench_common import machine, use_pytorch_attention, write_result  # benchmarks/ is sys.path[0] when run as a script

REPO = pathlib.Path(__file__).resolve().parents[1]
LINKS_GBPS = {"NVLink 4 (450 GB/s)": 450.0, "PCIe 4.0 x16 (25 GB/s)": 25.0, "PCIe 3.0 x16 (12 GB/s)": 12.0}
MODES = ("gathered_kv", "ulysses", "displaced", "partial")

# Real models (ComfyUI's configs of the released checkpoints).
FLUX_DEV = dict(name="Flux.1-dev", hidden=3072, heads=24, layers=19 + 38, text=512, patch=2, out=64, item=2)
WAN22_14B = dict(name="Wan 2.2 14B", hidden=5120, heads=40, layers=40, text=0, patch=2, out=64, item=2)
# xDiT, docs/performance/flux.md: FLUX.1 [dev], 28 steps, 1024px, 4x H100 (seconds, PyTorch / torch.compile)
XDIT_FLUX_DEV_1024_H100 = {"1 GPU": (6.71, 4.30), "Ulysses-2": (4.38, 2.68), "Ring-2": (5.31, 2.60),
                           "Ulysses-2 x Ring-2": (5.19, 1.80), "Ulysses-4": (4.24, 1.63), "Ring-4": (5.11, 1.98)}


# ------------------------------------------------------------------------------------ analytic
def analytic_call_bytes(model: dict[str, Any], frames: int, rows: int, cols: int, n: int, mode: str,
                        fraction: float = 0.3) -> dict[str, Any]:
    """Bytes the busiest rank sends in one model call (batch 1), by kind, for a token grid of ``frames`` x
    ``rows`` x ``cols`` split as the runtime splits it (tokens.token_grid's axis rule)."""
    from hires_parallel.parallel.split.displaced import window_rows
    from hires_parallel.parallel.split.tokens import TokenGrid, choose_axis, split_units

    grid = TokenGrid(frames, rows, cols, choose_axis(frames, rows, n))
    units = [e - s for s, e in split_units(grid, n)]
    sizes = [u * grid.width for u in units]
    h, item, layers = model["hidden"], model["item"], model["layers"]
    per_rank = []
    for me in range(n):
        first, last = me == 0, me == n - 1
        if mode == "ulysses":
            kv = sum((3 * sizes[me] + sizes[j]) * h // n for j in range(n) if j != me) * item
            kv += (n - 1) * model["text"] * h // n * item  # the text tokens' outputs, gathered over heads
        elif mode == "partial":
            kv = sum(window_rows(fraction, units[me]) * grid.width * 2 * h * item for nb in (first, last) if not nb)
        else:  # gathered K/V, exact or displaced (displaced sends the same, in the background)
            kv = (n - 1) * max(sizes) * 2 * h * item
        per_rank.append({"kv": kv * layers, "output": (n - 1) * max(sizes) * model["out"] * item})
    busiest = max(range(n), key=lambda r: sum(per_rank[r].values()))
    total = sum(per_rank[busiest].values())
    return {"model": model["name"], "grid": [frames, rows, cols], "axis": grid.axis, "tokens": grid.tokens, "n": n,
            "mode": mode, "sent": per_rank[busiest], "total": total,
            "link_ms": {k: round(total / (g * 1e9) * 1e3, 2) for k, g in LINKS_GBPS.items()}}


def analytic_table() -> list[dict[str, Any]]:
    rows = []
    cases = [(FLUX_DEV, 1, 2048 // 16, 2048 // 16, "2048^2"), (FLUX_DEV, 1, 4096 // 16, 4096 // 16, "4096^2"),
             (WAN22_14B, 21, 720 // 16, 1280 // 16, "1280x720x81")]
    for model, f, r, c, label in cases:
        for n in (2, 4, 8):
            for mode in MODES:
                if mode == "ulysses" and model["heads"] % n:
                    continue
                row = analytic_call_bytes(model, f, r, c, n, mode)
                row["image"] = label
                rows.append(row)
    return rows


def print_analytic(rows: list[dict[str, Any]]) -> None:
    print("\nANALYTIC: bytes the busiest rank sends per model call (batch 1, one CFG branch), bf16; displaced "
          "sends what gathered K/V sends but overlapped with compute; partial at fraction 0.3")
    print(f"{'model':12s} {'image':>12s} {'N':>2s} {'split':6s} {'mode':12s} {'K/V GB':>8s} {'out MB':>7s} "
          + " ".join(f"{k.split(' (')[0]:>14s}" for k in LINKS_GBPS))
    for r in rows:
        print(f"{r['model']:12s} {r['image']:>12s} {r['n']:>2d} {r['axis']:6s} {r['mode']:12s} "
              f"{r['sent']['kv'] / 1e9:8.3f} {r['sent']['output'] / 1e6:7.2f} "
              + " ".join(f"{r['link_ms'][k]:11.1f} ms" for k in LINKS_GBPS))
    print("\nxDiT published (docs/performance/flux.md): FLUX.1-dev, 1024px, 28 steps, 4x H100, seconds "
          "(PyTorch / torch.compile):")
    for k, (a, b) in XDIT_FLUX_DEV_1024_H100.items():
        print(f"  {k:20s} {a:5.2f} / {b:5.2f}")


# ------------------------------------------------------------------------------------ measured (this CPU)
def bench_flux(hidden: int):
    """A Flux-family model from ComfyUI's classes (tests' seeded weights), 4 heads, 2 + 2 blocks."""
    sys.path.insert(0, str(REPO / "tests"))
    from support import tiny_dits as td

    cfg = dict(td.flux_unet_config(True), hidden_size=hidden, num_heads=4,
               axes_dim=[hidden // 4 - 2 * (3 * hidden // 32), 3 * hidden // 32, 3 * hidden // 32])
    model = td._build_dit("Flux", cfg, 0)
    return model, td.make_dit_conds(model, 3)


def _psnr(out, ref) -> float:
    mse = float(((out - ref) ** 2).mean())
    return math.inf if mse == 0 else 20 * math.log10(float(ref.max() - ref.min()) / math.sqrt(mse))


def measure(args: argparse.Namespace) -> list[dict[str, Any]]:
    from hires_parallel.comfy_host import ensure_comfy

    if args.attention == "pytorch":
        use_pytorch_attention()
    ensure_comfy(cpu=True)
    import torch

    import comfy.samplers
    from hires_parallel.parallel.runtime import submit
    from hires_parallel.parallel.runtime.pool import shutdown_pool
    from hires_parallel.parallel.runtime.sampling_job import SamplerSpec

    model, (pos, neg) = bench_flux(args.hidden)
    latent = torch.zeros(1, 16, args.size, args.size)
    noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(0))
    sigmas = comfy.samplers.KSampler(model, args.steps, "cpu", "euler", "simple", 1.0).sigmas

    def run(n: int, threads: int, mode: str, sig=sigmas):
        torch.set_num_threads(threads)
        attention = mode if mode in ("gathered_kv", "ulysses") else "auto"
        options = submit.ModeOptions(warmup=1, attention=attention)
        out = submit.run_sampling(model, pos, neg, 3.5, noise, latent, sig, SamplerSpec(name="euler"), 0, None,
                                  ["cpu"] * n, cfg_parallel="off",
                                  mode=mode if mode in ("displaced", "partial") else "exact", options=options)
        return out, json.loads(json.dumps(submit.LAST_RUN, default=str))

    configs = [(1, 1, "exact"), (1, 2, "exact")] + [(2, 1, m) for m in MODES]
    best: dict[tuple, tuple] = {}
    run(2, 1, "gathered_kv", sigmas[-2:])  # start the pool and ship the model: not what is measured
    for _ in range(args.repeat):
        for n, threads, mode in configs:
            t0 = time.perf_counter()
            out, last = run(n, threads, mode)
            wall = time.perf_counter() - t0
            steps = last["ranks"][0]["step_s"]
            per_step = min(steps[1:] or steps)  # the first step also pays the model load
            if (n, threads, mode) not in best or per_step < best[(n, threads, mode)][0]:
                best[(n, threads, mode)] = (per_step, out, last, wall)
    shutdown_pool()
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    ref = best[(1, 1, "exact")][1]
    one = {t: best[(1, t, "exact")][0] for t in (1, 2)}
    rows = []
    for (n, threads, mode), (per_step, out, last, wall) in best.items():
        per = last["comm_per_step"][0] if n > 1 else {}
        steady = per.get("stale") or per.get("exact") or {}
        rows.append({
            "ranks": n, "threads_per_rank": threads, "mode": mode if n > 1 else f"1 rank x {threads} thread(s)",
            "latent": args.size, "tokens": (args.size // 2) ** 2, "hidden": args.hidden, "steps": args.steps,
            "s_per_step": round(per_step, 3), "wall_s": round(wall, 2),
            "speedup_vs_1x1": round(one[1] / per_step, 2), "speedup_vs_1x2": round(one[2] / per_step, 2),
            "attention": last["ranks"][0].get("attention") if n > 1 else None,
            "sent_per_step_rank0": steady.get("bytes_sent", {}),
            "wait_s_per_step_rank0": round(sum(steady.get("wait_s", {}).values()), 4),
            "psnr_db": None if n == 1 else round(_psnr(out, ref), 2),
            "max_abs_err": round(float((out - ref).abs().max()), 5),
        })
    return rows


def print_measured(rows: list[dict[str, Any]], repeat: int) -> None:
    r0 = rows[0]
    print(f"\nMEASURED on this machine ({os.cpu_count()} CPU cores, gloo, 1 thread per rank): Flux-family model, "
          f"hidden {r0['hidden']}, {r0['tokens']} image tokens, {r0['steps']} euler steps, CFG batch 2, "
          f"best of {repeat}; bytes = rank 0 per step after warmup; fidelity vs 1 rank x 1 thread")
    print(f"{'config':22s} {'s/step':>7s} {'vs 1x1':>6s} {'vs 1x2':>6s} {'KiB sent/step':>13s} {'K/V KiB':>8s} "
          f"{'wait s':>7s} {'PSNR dB':>8s} {'max err':>8s}")
    for r in rows:
        sent = r["sent_per_step_rank0"]
        psnr = "-" if r["psnr_db"] is None else ("inf" if r["psnr_db"] == math.inf else f"{r['psnr_db']:.1f}")
        label = r["mode"] if r["ranks"] == 1 else f"2 ranks {r['mode']}"
        print(f"{label:22s} {r['s_per_step']:7.3f} {r['speedup_vs_1x1']:6.2f} {r['speedup_vs_1x2']:6.2f} "
              f"{sum(sent.values()) / 1024:13.1f} {sent.get('kv', 0) / 1024:8.1f} {r['wait_s_per_step_rank0']:7.3f} "
              f"{psnr:>8s} {r['max_abs_err']:8.4f}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=96, help="latent side (pixels / 8); tokens = (size / 2) ** 2")
    ap.add_argument("--hidden", type=int, default=128, help="hidden size of the measured Flux-family model")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--repeat", type=int, default=2, help="rounds; the fastest step of each configuration is kept")
    ap.add_argument("--analytic-only", action="store_true")
    ap.add_argument("--attention", default="default", choices=["default", "pytorch"],
                    help="ComfyUI's attention: its default for this machine, or PyTorch's (--use-pytorch-cross-attention)")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "dit.json"))
    args = ap.parse_args(argv)
    analytic = analytic_table()
    measured = [] if args.analytic_only else measure(args)
    if measured:
        print_measured(measured, args.repeat)
    print_analytic(analytic)
    write_result(args.out, {"benchmark": "dit", "machine": machine(), "attention": args.attention,
                            "measured": measured, "analytic": analytic,
                            "xdit_published_flux_dev_1024_4xH100_s": XDIT_FLUX_DEV_1024_H100}, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
