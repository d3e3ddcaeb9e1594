"""Simulated rigs: the cost model (parallel/planning) against DistriFusion's published speed-ups, then predicted
seconds per step of every mode on GPU rigs this machine does not have, and the plan choose_plan picks.

(i) SDXL 3840^2, 50 DDIM steps, A100 NVLink, DistriFusion's setup (distrifuser's default split_batch: CFG halves
    on two groups, displaced patches within each, 4 extra warmup steps after the first): predicted vs published.
(ii) 8x H100 NVLink, 8x / 4x RTX 4090 PCIe without P2P, 2x RTX 3090: SDXL and Flux.1-dev at 2048^2 and 4096^2,
    CFG batch 2 (Flux.1-dev: guidance-distilled, batch 1), 30 steps; s/step and speed-up of each mode on all
    devices (exact both blocking and overlapped per layer, as the runtime runs it now, beside displaced /
    partial), and the plans choose_plan picks for mode auto (exact results) and auto_approximate.

    python benchmarks/simulate_rig.py
"""
from __future__ import annotations

import argparse
import pathlib
import sys
from typing import Any

from bench_common import machine, write_result  # benchmarks/ is sys.path[0] when run as a script

REPO = pathlib.Path(__file__).resolve().parents[1]

# DistriFusion, SDXL, 50-step DDIM, A100: mit-han-lab/distrifuser README ("Speedups": 3840x3840 1.8x / 3.4x / 6.1x
# on 2 / 4 / 8 A100s). Its 1024^2 and 2048^2 speed-ups are only in a figure (assets/speedups.jpg), not cited here.
PUBLISHED = [{"model": "SDXL", "size": 3840, "gpus": n, "speedup": s, "source": "mit-han-lab/distrifuser README"}
             for n, s in ((2, 1.8), (4, 3.4), (8, 6.1))]
DISTRIFUSION = dict(steps=50, warmup=5)  # warmup_steps=4 "additional" after the first step


def published_rows() -> list[dict[str, Any]]:
    from hires_parallel.parallel.planning.cost_model import predict_run
    from hires_parallel.parallel.planning.exchange_pattern import SDXL_CONFIG, unet_description
    from hires_parallel.parallel.planning.rig import preset

    rig, rows = preset("A100"), []
    for pub in PUBLISHED:
        desc = unet_description(SDXL_CONFIG, (pub["size"] // 8, pub["size"] // 8))
        p = predict_run(desc, rig, pub["gpus"], "displaced", cfg_parallel=True, **DISTRIFUSION)
        rows.append({**pub, "predicted": round(p.speedup, 2), "rel_error": round(p.speedup / pub["speedup"] - 1, 3),
                     "plan": p.label, "s_per_step": round(p.total_s, 4), "single_s_per_step": round(p.single_s, 4)})
    return rows


def rig_rows(steps: int = 30) -> list[dict[str, Any]]:
    from hires_parallel.parallel.planning.cost_model import predict_run
    from hires_parallel.parallel.planning.exchange_pattern import (FLUX_DEV_CONFIG, SDXL_CONFIG, flux_description,
                                                                    unet_description)
    from hires_parallel.parallel.planning.planner import choose_plan
    from hires_parallel.parallel.planning.rig import preset

    rows = []
    for rig_name in ("8x H100", "8x RTX 4090", "4x RTX 4090", "2x RTX 3090"):
        rig = preset(rig_name)
        for model in ("SDXL", "Flux.1-dev"):
            for size in (2048, 4096):
                hw = (size // 8, size // 8)
                desc = unet_description(SDXL_CONFIG, hw) if model == "SDXL" else flux_description(FLUX_DEV_CONFIG, hw)
                batch = 2 if model == "SDXL" else 1
                n = rig.gpus
                plans = [("exact", False, False), ("exact", False, True), ("displaced", False, True),
                         ("partial", False, True), ("batch", False, True)]
                if batch == 2:
                    plans += [("exact", True, False), ("exact", True, True), ("displaced", True, True)]
                modes = {}
                for mode, cfg, ovl in plans:
                    if mode == "batch" and n > batch:
                        continue
                    p = predict_run(desc, rig, n, mode, batch=batch, cfg_parallel=cfg, steps=steps, warmup=1,
                                    overlap_exact=ovl)
                    modes[p.label] = {"s_per_step": round(p.total_s, 4), "speedup": round(p.speedup, 2),
                                      "exchange_s": round(p.exchange_s, 4), "exposed_s": round(p.exposed_s, 4),
                                      "GB_sent": round(p.bytes_sent / 1e9, 3)}
                choice = choose_plan(desc, rig, batch=batch, allow_approximate=True, steps=steps)
                exact = choose_plan(desc, rig, batch=batch, allow_approximate=False, steps=steps)
                rows.append({"rig": rig.name, "model": model, "size": size, "batch": batch,
                             "single_s_per_step": round(choice.prediction.single_s, 4), "modes": modes,
                             "choice": choice.prediction.label, "choice_speedup": round(choice.prediction.speedup, 2),
                             "reason": choice.reason, "choice_auto": exact.prediction.label,
                             "choice_auto_speedup": round(exact.prediction.speedup, 2)})
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "simulate_rig.json"))
    args = ap.parse_args(argv)
    pub = published_rows()
    print("\n(i) DistriFusion published vs predicted (SDXL, 50 DDIM steps, A100 NVLink, CFG split + displaced bands)")
    print(f"{'size':>6s} {'GPUs':>4s} {'published':>9s} {'predicted':>9s} {'rel err':>8s}  plan")
    for r in pub:
        print(f"{r['size']:>6d} {r['gpus']:>4d} {r['speedup']:>8.2f}x {r['predicted']:>8.2f}x {r['rel_error']:>+8.1%}  {r['plan']}")
    rows = rig_rows(args.steps)
    print(f"\n(ii) predicted s/step (speed-up vs 1 device) on all devices of each rig, {args.steps} steps, warmup 1; "
          f"exact: blocking, and overlapped per layer (the runtime's default)")
    for r in rows:
        print(f"\n{r['rig']} | {r['model']} {r['size']}^2 batch {r['batch']} | 1 device {r['single_s_per_step']:.3f} s/step")
        for label, m in r["modes"].items():
            print(f"  {label:63s} {m['s_per_step']:8.3f} s ({m['speedup']:5.2f}x)  exchanges {m['exchange_s']:.3f} s "
                  f"(exposed {m['exposed_s']:.3f}), {m['GB_sent']:.2f} GB sent")
        print(f"  -> mode auto: {r['choice_auto']} ({r['choice_auto_speedup']:.2f}x); "
              f"auto_approximate: {r['choice']} ({r['choice_speedup']:.2f}x)")
    print("\nsummary: predicted speed-up on all devices; the planner's pick (auto = exact results only)")
    print(f"{'rig':28s} {'model':11s} {'size':>5s} {'exact blk':>9s} {'exact ovl':>9s} {'displaced':>9s} "
          f"{'partial':>8s}  auto pick")
    for r in rows:
        def find(prefix: str, r: dict = r) -> str:
            hit = [m["speedup"] for k, m in r["modes"].items() if k.startswith(prefix)]
            return f"{hit[0]:.2f}x" if hit else "-"
        print(f"{r['rig']:28s} {r['model']:11s} {r['size']:>5d} {find('exact bands (blocking)'):>9s} "
              f"{find('exact bands on'):>9s} {find('displaced bands on'):>9s} {find('partial bands on'):>8s}  "
              f"{r['choice_auto']} ({r['choice_auto_speedup']:.2f}x)")
    write_result(args.out, {"benchmark": "simulate_rig", "machine": machine(), "published": pub, "rigs": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
