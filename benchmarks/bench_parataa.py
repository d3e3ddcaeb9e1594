"""ParaTAA rounds and wall-clock against sequential sampling, on this machine's CPU.

For each step count: ComfyUI's `euler` through SamplerCustomAdvanced (the sequential DDIM result), then the
ParaTAA Sampler (DDIM, window = all steps, order 20) with memory 2 (TAA) and memory 1 (plain fixed point),
a warm start on the unchanged prompt, and a warm start after a small prompt change. Reports rounds (the
sequential depth: model calls one after another), model evaluations, seconds, and the difference to euler.
Prints a table and writes JSON.

    python benchmarks/bench_parataa.py [--steps 25 50 100] [--size 16] [--channels 32]

The model is the tiny SD-family test UNet with random weights; a trained model will follow (its smoother
denoiser is where the published 7-rounds-for-100-steps figures come from).
"""
from __future__ import annotations

import argparse
import os
import pathlib
import sys
import time

from bench_common import machine, tiny_sd15, write_result  # benchmarks/ is sys.path[0] when run as a script

REPO = pathlib.Path(__file__).resolve().parents[1]
NOTE = ("tiny random-weight test UNet: rounds reflect its rough denoiser; a trained model will follow. "
        "Wall-clock here is one CPU running every evaluation of a round; with spare devices a round costs "
        "about one model call (Patch-Parallel Guider, mode batch).")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, nargs="+", default=[25, 50, 100])
    ap.add_argument("--size", type=int, default=16, help="latent side (pixels / 8)")
    ap.add_argument("--channels", type=int, default=32, help="UNet model_channels of the test model")
    ap.add_argument("--cfg", type=float, default=5.0)
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "parataa.json"))
    args = ap.parse_args(argv)

    model, pos, neg = tiny_sd15(args.channels)
    import torch
    from comfy_extras.nodes_custom_sampler import (BasicScheduler, CFGGuider, KSamplerSelect, RandomNoise,
                                                   SamplerCustomAdvanced)

    from hires_parallel.nodes import parataa

    torch.set_num_threads(2)
    changed = [[pos[0][0] + 0.05 * torch.randn(pos[0][0].shape, generator=torch.Generator().manual_seed(7)),
                pos[0][1]]]
    latent = {"samples": torch.zeros(1, 4, args.size, args.size)}
    noise = RandomNoise().get_noise(0)[0]

    def run(sampler, sigmas, positive=pos) -> tuple[torch.Tensor, float]:
        guider = CFGGuider().get_guider(model, positive, neg, args.cfg)[0]
        t0 = time.perf_counter()
        out = SamplerCustomAdvanced().sample(noise, guider, sampler, sigmas, latent)[0]["samples"]
        return out, time.perf_counter() - t0

    def rel(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a - b).abs().max() / b.abs().max())

    def taa(**kw):
        return parataa.HiResParallelParaTAASampler.execute(**kw).result[0]

    run(KSamplerSelect().get_sampler("euler")[0], BasicScheduler().get_sigmas(model, "karras", 2, 1.0)[0])  # warm-up
    rows = []
    for steps in args.steps:
        sigmas = BasicScheduler().get_sigmas(model, "karras", steps, 1.0)[0]
        ref, t_seq = run(KSamplerSelect().get_sampler("euler")[0], sigmas)
        ref_changed, _ = run(KSamplerSelect().get_sampler("euler")[0], sigmas, changed)
        row = {"steps": steps, "sequential_s": round(t_seq, 3)}
        for label, kw, positive, want in (("taa", {}, pos, ref), ("plain", {"memory": 1}, pos, ref),
                                          ("warm_same", {}, pos, ref), ("warm_changed", {}, changed, ref_changed)):
            if label in ("taa", "plain"):
                parataa.clear_warm_cache()
            if label == "warm_same":  # the cache now holds the plain run's trajectory: store the TAA one again
                parataa.clear_warm_cache()
                run(taa(), sigmas)
            out, secs = run(taa(**kw), sigmas, positive)
            rep = parataa.LAST_REPORT
            row[label] = {"rounds": rep["rounds"], "evaluations": rep["evaluations"], "s": round(secs, 3),
                          "converged": rep["converged"], "warm_start": rep["warm_start"],
                          "rel_diff_vs_euler": float(f"{rel(out, want):.3g}")}
        row["depth_speedup"] = round(steps / row["taa"]["rounds"], 2)
        row["cpu_speedup"] = round(t_seq / row["taa"]["s"], 2)
        rows.append(row)

    print(f"\nParaTAA (DDIM, window = all steps, order 20, tolerance 1e-3) vs sequential euler; SD-family test UNet "
          f"({args.channels} ch), latent {args.size}x{args.size}, CFG {args.cfg}, 1 process, 2 threads")
    print(f"note: {NOTE}")
    head = (f"{'steps':>5s} {'seq s':>7s} {'rounds m=2':>10s} {'rounds m=1':>10s} {'evals':>6s} {'TAA s':>7s} "
            f"{'depth x':>7s} {'cpu x':>6s} {'warm same':>9s} {'warm chg':>8s} {'rel diff':>9s}")
    print(head)
    for r in rows:
        print(f"{r['steps']:5d} {r['sequential_s']:7.2f} {r['taa']['rounds']:10d} {r['plain']['rounds']:10d} "
              f"{r['taa']['evaluations']:6d} {r['taa']['s']:7.2f} {r['depth_speedup']:7.2f} {r['cpu_speedup']:6.2f} "
              f"{r['warm_same']['rounds']:9d} {r['warm_changed']['rounds']:8d} {r['taa']['rel_diff_vs_euler']:9.2e}")
    result = {"benchmark": "parataa", "note": NOTE,
              "machine": machine(load_avg_1min=round(os.getloadavg()[0], 2)),
              "size": args.size, "channels": args.channels, "cfg": args.cfg, "rows": rows}
    write_result(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
