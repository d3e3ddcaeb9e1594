"""Scaling of exact patch-parallel sampling on this machine's CPU.

Side by side in one run (this machine is noisy): 1 rank x 2 threads, 1 rank x 1 thread, 2 ranks x 1 thread
exact with the exchanges overlapped (the default) and blocking (as before the overlap), and CFG parallel
(the worker pool, gloo), on an SD-family test UNet at a latent where one CFG step takes over a second. The
configurations run interleaved ``--repeats`` times; each one's seconds per step is the minimum over the
repeats of its median step. Prints a table (seconds per step, speed-up against 1 rank x 1 thread and
against 1 rank x 2 threads, seconds per step waiting in exchanges, bytes sent per step per rank by kind,
max difference to the 1-rank result) and writes JSON. ``--attention pytorch`` runs every configuration
with ComfyUI's PyTorch attention (its default on GPUs; on CPU ComfyUI picks sub-quadratic attention).

    python benchmarks/bench_exact_scaling.py [--size 128] [--steps 4] [--channels 64] [--repeats 3]
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import sys
import time

from bench_common import machine, tiny_sd15, write_result  # benchmarks/ is sys.path[0] when run as a script

REPO = pathlib.Path(__file__).resolve().parents[1]


def _load() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=128, help="latent side (pixels / 8)")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--channels", type=int, default=64, help="UNet model_channels of the test model")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved runs of every configuration")
    ap.add_argument("--attention", default="default", choices=["default", "pytorch"],
                    help="ComfyUI's attention: its default for this machine, or PyTorch's (--use-pytorch-cross-attention)")
    ap.add_argument("--trace", action="store_true",
                    help="also trace the exchanges (split/trace.py) and print each parallel row's per-step summary")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "exact_scaling.json"))
    args = ap.parse_args(argv)

    model, pos, neg = tiny_sd15(args.channels, pytorch_attention=args.attention == "pytorch")
    import comfy.samplers
    import torch

    from hires_parallel.parallel.runtime import submit
    from hires_parallel.parallel.runtime.pool import shutdown_pool
    from hires_parallel.parallel.runtime.sampling_job import SamplerSpec

    latent = torch.zeros(1, 4, args.size, args.size)
    noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(0))
    sigmas = comfy.samplers.KSampler(model, args.steps, "cpu", "euler", "karras", 1.0).sigmas

    def run(devices: list[str], threads: int, cfg_parallel: str = "off", overlap: bool = True):
        torch.set_num_threads(threads)
        out = submit.run_sampling(model, pos, neg, 5.0, noise, latent, sigmas, SamplerSpec(name="euler"), 0, None,
                                  devices, cfg_parallel=cfg_parallel,
                                  options=submit.ModeOptions(overlap=overlap, trace=args.trace))
        return out, json.loads(json.dumps(submit.LAST_RUN, default=str))

    configs = [("1 rank x 2 threads", ["cpu"], 2, "off", True), ("1 rank x 1 thread", ["cpu"], 1, "off", True),
               ("2 ranks x 1 thread, exact overlapped", ["cpu", "cpu"], 1, "off", True),
               ("2 ranks x 1 thread, exact blocking", ["cpu", "cpu"], 1, "off", False),
               ("2 ranks x 1 thread, CFG par.", ["cpu", "cpu"], 1, "on", True)]
    samples: dict[str, list[dict]] = {c[0]: [] for c in configs}
    outs: dict[str, torch.Tensor] = {}
    run(["cpu", "cpu"], 1)  # start the pool and cache the model: start-up is not what is measured
    for r in range(args.repeats):
        order = configs if r % 2 == 0 else configs[::-1]  # neither end always runs first
        for label, devices, threads, cfg_par, overlap in order:
            t0 = time.perf_counter()
            out, last = run(devices, threads, cfg_par, overlap)
            wall = time.perf_counter() - t0
            outs.setdefault(label, out)
            rank0 = last["ranks"][0]
            steps = max(1, rank0["steps"])
            comm = rank0.get("comm", {})
            if last.get("trace_summary"):
                for t in last["trace_summary"]:
                    print(f"  trace {label}, rank {t['rank']}: per step {t['per_step']}")
            samples[label].append({
                "s_per_step": statistics.median(rank0["step_s"][1:] or rank0["step_s"]), "wall_s": wall,
                "wait_s_per_step": float(comm.get("total_seconds", 0.0)) / steps,
                "sent": {k: v // steps for k, v in comm.get("bytes_sent", {}).items()}})
    shutdown_pool()
    torch.set_num_threads(2)
    ref = outs[configs[0][0]]
    rows = []
    for label, devices, threads, cfg_par, overlap in configs:
        best = min(samples[label], key=lambda x: x["s_per_step"])
        rows.append({"config": label, "ranks": len(devices), "threads_per_rank": threads,
                     "s_per_step": round(best["s_per_step"], 3),
                     "s_per_step_all": [round(x["s_per_step"], 3) for x in samples[label]],
                     "wait_s_per_step": round(best["wait_s_per_step"], 3), "wall_s": round(best["wall_s"], 2),
                     "bytes_sent_per_step_rank0": best["sent"],
                     "max_abs_diff_vs_first": float((outs[label] - ref).abs().max())})

    base1 = next(r for r in rows if r["config"] == "1 rank x 1 thread")["s_per_step"]
    base2 = next(r for r in rows if r["config"] == "1 rank x 2 threads")["s_per_step"]
    print(f"\nexact patch-parallel, SD-family test UNet ({args.channels} ch), latent {args.size}x{args.size}, "
          f"{args.steps} euler steps, CFG batch 2, attention {args.attention}, min of {args.repeats} interleaved runs")
    print(f"{'config':38s} {'s/step':>8s} {'vs 1x1':>7s} {'vs 1x2':>7s} {'wait/step':>9s} "
          f"{'KiB sent/step (rank 0)':>24s} {'max diff':>9s}")
    for r in rows:
        r["speedup_vs_1rank_1thread"] = round(base1 / r["s_per_step"], 2)
        r["speedup_vs_1rank_2threads"] = round(base2 / r["s_per_step"], 2)
        kib = sum(r["bytes_sent_per_step_rank0"].values()) / 1024
        print(f"{r['config']:38s} {r['s_per_step']:8.3f} {r['speedup_vs_1rank_1thread']:7.2f} "
              f"{r['speedup_vs_1rank_2threads']:7.2f} {r['wait_s_per_step']:9.3f} {kib:24.1f} "
              f"{r['max_abs_diff_vs_first']:9.2e}")
    result = {"benchmark": "exact_scaling", "machine": machine(load_1min=_load()), "attention": args.attention,
              "repeats": args.repeats, "size": args.size, "steps": args.steps, "channels": args.channels,
              "rows": rows}
    write_result(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
