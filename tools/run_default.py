"""The pack's main job on its embedded default: the trained shapes model, native pass + 2x block-noise relay,
on 2 CPU ranks through the Patch-Parallel runtime.

Runs headless in this process on the real ComfyUI (COMFYUI_PATH, default /work/ComfyUI):
txt2img at the model's native 256x256, then a block-noise relay to 2x (512x512), both passes sampled by
``parallel.submit.run_sampling`` over ``--devices`` CPU ranks (gloo; CFG parallel on 2 ranks), and the
same two passes on 1 rank side by side, to print the time per step and the speed-up measured now.
Writes the PNG of the parallel run and one line "wrote <png> ...; timing: {json}".

When models/hires_shapes.safetensors is missing it says how to train it and runs the small seeded
random-weight test model instead (its picture is noise).

    python tools/run_default.py --out out/shapes_2x.png
"""
from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="out/shapes_2x.png", help="PNG to write")
    ap.add_argument("--prompt", default="a red circle", help='"a <red|green|blue|yellow> <circle|square|triangle>"')
    ap.add_argument("--size", type=int, default=256, help="first-pass image side in pixels (multiple of 64)")
    ap.add_argument("--scale", type=float, default=2.0, help="relay upscale factor per side")
    ap.add_argument("--steps", type=int, default=20, help="first-pass steps")
    ap.add_argument("--relay-steps", type=int, default=12, help="steps after the relay point")
    ap.add_argument("--cfg", type=float, default=5.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--devices", type=int, default=2, help="CPU ranks of the parallel run")
    ap.add_argument("--no-compare", action="store_true", help="skip the 1-rank run (no speed-up figure)")
    ap.add_argument("--model", default="", help="model file (default: models/hires_shapes.safetensors)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads of the 1-rank run (0: all cores)")
    args = ap.parse_args(argv)

    from hires_parallel.comfy_host import ensure_comfy

    ensure_comfy(cpu=True)
    import os

    import torch

    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    sys.path.insert(0, str(REPO / "benchmarks"))
    import comfy.sample
    import comfy.samplers
    import nodes as comfy_nodes

    import metrics
    import shapes_model
    from hires_parallel.algorithms.block_noise import relay_noise
    from hires_parallel.nodes.relay import relay_sigmas, relay_upscale
    from hires_parallel.parallel import submit
    from hires_parallel.parallel.pool import shutdown_pool
    from hires_parallel.parallel.sampling_job import SamplerSpec

    try:
        model, clip, vae = shapes_model.load_shapes_model(args.model or None)
        model_name = pathlib.Path(args.model or shapes_model.MODEL_PATH).name
    except shapes_model.ShapesModelMissing as e:
        print(f"{e}\nRunning the seeded random-weight test model instead: its picture is noise.", file=sys.stderr)
        sys.path.insert(0, str(REPO / "tests"))
        from support.tiny_models import build_sd15, build_tiny_clip, build_tiny_vae

        model, clip, vae = build_sd15(seed=0), build_tiny_clip(seed=0), build_tiny_vae(seed=0)
        model_name = "random test model (trained model missing)"

    pos = comfy_nodes.CLIPTextEncode().encode(clip, args.prompt)[0]
    neg = comfy_nodes.CLIPTextEncode().encode(clip, "")[0]
    side = args.size // 8
    ms = model.get_model_object("model_sampling")
    first_sigmas = comfy.samplers.calculate_sigmas(ms, "karras", args.steps).cpu()
    first_noise = comfy.sample.prepare_noise(torch.zeros(1, 4, side, side), args.seed)  # KSampler's noise

    def sample(devices: list[str], noise, latent, sigmas) -> tuple[torch.Tensor, float, float]:
        t0 = time.perf_counter()
        out = submit.run_sampling(model, pos, neg, args.cfg, noise, latent, sigmas, SamplerSpec(name="euler"),
                                  args.seed, None, devices)
        wall = time.perf_counter() - t0
        step_s = submit.LAST_RUN["ranks"][0]["step_s"]
        return out, statistics.median(step_s[1:] or step_s), wall  # the first step carries the set-up

    def pipeline(devices: list[str]) -> dict:
        low, first_step, first_wall = sample(devices, first_noise, torch.zeros(1, 4, side, side), first_sigmas)
        z_up = relay_upscale(low, args.scale, "nearest (latent)")
        sigmas = relay_sigmas(model, "karras", args.relay_steps, "timestep", 500.0 if args.scale <= 2 else 600.0)
        noise = relay_noise(tuple(z_up.shape), args.seed, 4, 0.3)
        high, relay_step, relay_wall = sample(devices, noise, z_up, sigmas)
        return {"latent": high, "first_s_per_step": first_step, "relay_s_per_step": relay_step,
                "first_wall_s": first_wall, "relay_wall_s": relay_wall}

    ranks = ["cpu"] * max(1, args.devices)
    if len(ranks) > 1:
        pipeline(ranks)  # start the worker pool and ship the model once: start-up is not what is measured
    par = pipeline(ranks)
    one = None if args.no_compare or len(ranks) == 1 else pipeline(["cpu"])
    shutdown_pool()
    image = vae.decode(par["latent"])[0]

    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    from PIL import Image

    Image.fromarray((image.clamp(0, 1) * 255).round().byte().cpu().numpy()).save(out)
    h, w = image.shape[:2]
    timing = {
        "model": model_name, "prompt": args.prompt, "size": f"{args.size}x{args.size} -> {w}x{h}",
        "ranks": len(ranks), "first_pass_s_per_step": round(par["first_s_per_step"], 4),
        "relay_s_per_step": round(par["relay_s_per_step"], 4),
        "total_s": round(par["first_wall_s"] + par["relay_wall_s"], 2),
    }
    if one is not None:
        timing.update({
            "one_rank_threads": torch.get_num_threads(),
            "one_rank_first_pass_s_per_step": round(one["first_s_per_step"], 4),
            "one_rank_relay_s_per_step": round(one["relay_s_per_step"], 4),
            "speedup_first_pass": round(one["first_s_per_step"] / par["first_s_per_step"], 2),
            "speedup_relay": round(one["relay_s_per_step"] / par["relay_s_per_step"], 2),
            "max_abs_diff_vs_one_rank": float((par["latent"] - one["latent"]).abs().max()),
        })
    words = args.prompt.split()
    if len(words) == 3 and words[1] in metrics.COLORS:
        timing["subjects"] = metrics.subject_count(image, words[1])
    print(f"wrote {out} ({w}x{h}); timing: " + json.dumps(timing))
    return 0


if __name__ == "__main__":
    sys.exit(main())
