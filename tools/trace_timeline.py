"""Trace one patch-parallel run and write its per-layer exchange trace as JSON and as a timeline picture.

Runs the embedded shapes model (or, in a clone, the tests' seeded SD-family UNet with ``--model test``) on
``--devices`` CPU ranks with the trace on, then writes ``<out>.json`` (every exchange of every rank: layer,
kind, bytes, blocking or background, compute before it, wait in it, how long a background exchange
travelled while the rank computed) and ``<out>.png``: one row per rank, time to the right; green = compute,
red = waiting in a blocking exchange, orange = waiting for a background exchange, blue ticks above a row =
background exchanges in flight; grey lines = steps. ``--from-json`` redraws a saved trace (for example
one written by a ComfyUI started with HIRES_PARALLEL_TRACE=1; see README "Trace").

    python tools/trace_timeline.py --size 1024 --devices 2 --out out/trace
    python tools/trace_timeline.py --from-json out/trace.json --out out/trace_again
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys
from typing import Any

PACK = pathlib.Path(__file__).resolve().parents[1]

COLORS = {"compute": (76, 175, 80), "blocking": (229, 57, 53), "background": (251, 140, 0),
          "flight": (30, 136, 229), "step": (160, 160, 160), "text": (20, 20, 20), "bg": (255, 255, 255)}


def draw_timeline(traces: list[dict[str, Any]], path: str | pathlib.Path, width: int = 1600) -> pathlib.Path:
    """A timeline PNG of the ranks' traces (``ExchangeTrace.as_dict`` each) on one clock."""
    from PIL import Image, ImageDraw

    t_start = min(c["t0"] for t in traces for c in t["calls"])
    t_end = max(c["t1"] for t in traces for c in t["calls"])
    left, row_h, gap, top = 70, 34, 14, 30
    height = top + len(traces) * (row_h + gap) + 30
    img = Image.new("RGB", (width, height), COLORS["bg"])
    d = ImageDraw.Draw(img)
    span = max(t_end - t_start, 1e-9)

    def x(t: float) -> int:
        return left + int((t - t_start) / span * (width - left - 10))

    d.text((left, 8), f"{span:.3f} s; green compute, red blocking wait, orange background wait, "
                      f"blue background exchange in flight", fill=COLORS["text"])
    for i, tr in enumerate(sorted(traces, key=lambda t: t["rank"])):
        y0 = top + i * (row_h + gap)
        y1 = y0 + row_h
        d.text((6, y0 + row_h // 2 - 6), f"rank {tr['rank']}", fill=COLORS["text"])
        for call in tr["calls"]:
            d.rectangle([x(call["t0"]), y0 + 6, max(x(call["t0"]) + 1, x(call["t1"])), y1], fill=COLORS["compute"])
        steps_seen = set()
        for call in tr["calls"]:
            if call["step"] not in steps_seen:
                steps_seen.add(call["step"])
                d.line([x(call["t0"]), y0, x(call["t0"]), y1], fill=COLORS["step"])
        for ev in tr["events"]:
            if ev["wait_s"] > 0:
                color = COLORS["blocking"] if ev["blocking"] else COLORS["background"]
                d.rectangle([x(ev["t0"]), y0 + 6, max(x(ev["t0"]) + 1, x(ev["t0"] + ev["wait_s"])), y1], fill=color)
            if not ev["blocking"] and ev.get("in_flight_s"):
                d.line([x(ev["t0"] - ev["in_flight_s"]), y0 + 2, x(ev["t0"]), y0 + 2], fill=COLORS["flight"], width=3)
    out = pathlib.Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    img.save(out)
    return out


def _run(args: argparse.Namespace) -> dict[str, Any]:
    sys.path.insert(0, str(PACK / "benchmarks"))
    from hires_parallel.comfy_host import ensure_comfy

    ensure_comfy(cpu=True)
    import comfy.sample
    import comfy.samplers
    import torch

    from hires_parallel.parallel.runtime import submit
    from hires_parallel.parallel.runtime.pool import shutdown_pool
    from hires_parallel.parallel.runtime.sampling_job import SamplerSpec

    if args.model == "test":
        from bench_common import tiny_sd15

        model, pos, neg = tiny_sd15(64)
    else:
        import nodes as comfy_nodes

        from hires_parallel.embedded import shapes_model

        model, clip, _ = shapes_model.load_shapes_model(None)
        pos = comfy_nodes.CLIPTextEncode().encode(clip, "a red circle")[0]
        neg = comfy_nodes.CLIPTextEncode().encode(clip, "")[0]
    side = args.size // 8
    latent = torch.zeros(1, 4, side, side)
    noise = comfy.sample.prepare_noise(latent, 0)
    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "karras", args.steps).cpu()
    torch.set_num_threads(1)
    options = submit.ModeOptions(trace=True, overlap=not args.no_overlap)
    devices = ["cpu"] * args.devices
    try:
        for _ in range(2):  # the first run starts the pool and ships the model: the second is traced
            submit.run_sampling(model, pos, neg, 5.0, noise, latent, sigmas, SamplerSpec(name="euler"), 0, None,
                                devices, cfg_parallel=args.cfg_parallel, mode=args.mode, options=options)
    finally:
        shutdown_pool()
    run = submit.LAST_RUN
    return {"size": args.size, "devices": args.devices, "mode": args.mode, "overlap": not args.no_overlap,
            "model": args.model, "summary": run.get("trace_summary"),
            "traces": [r["trace"] for r in run["ranks"] if r.get("trace")]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="out/trace", help="writes <out>.json and <out>.png")
    ap.add_argument("--from-json", default="", help="draw a saved trace instead of running one")
    ap.add_argument("--size", type=int, default=512, help="image side in pixels (multiple of 64)")
    ap.add_argument("--devices", type=int, default=2)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--mode", default="exact", choices=["exact", "displaced", "partial", "batch"])
    ap.add_argument("--cfg-parallel", default="off", choices=["off", "on", "auto"])
    ap.add_argument("--no-overlap", action="store_true", help="exact mode with blocking exchanges")
    ap.add_argument("--model", default="shapes", choices=["shapes", "test"])
    args = ap.parse_args(argv)
    out = pathlib.Path(args.out)
    if args.from_json:
        data = json.loads(pathlib.Path(args.from_json).read_text())
    else:
        data = _run(args)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".json").write_text(json.dumps(data, default=str) + "\n")
        print(f"wrote {out.with_suffix('.json')}")
    png = draw_timeline(data["traces"], out.with_suffix(".png"))
    print(f"wrote {png}")
    for s in data.get("summary") or []:
        print(f"rank {s['rank']}: per step {s['per_step']}; longest waits {s['top_wait_layers'][:3]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
