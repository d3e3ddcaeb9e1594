"""The pack's main job on its embedded default: txt2img at native size, then a 2x block-noise relay.

Runs headless in this process on the real ComfyUI (COMFYUI_PATH, default /work/ComfyUI) with the small
seeded test model (random weights: the picture is noise until a trained model is embedded), writes a PNG
and prints one timing line.

    python tools/run_default.py --out out/relay_2x.png
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="out/relay_2x.png", help="PNG to write")
    ap.add_argument("--size", type=int, default=256, help="first-pass image side in pixels (multiple of 64)")
    ap.add_argument("--scale", type=float, default=2.0, help="relay upscale factor per side")
    ap.add_argument("--steps", type=int, default=12, help="first-pass steps")
    ap.add_argument("--relay-steps", type=int, default=8, help="steps after the relay point")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args(argv)

    from hires_parallel.comfy_host import ensure_comfy

    ensure_comfy()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    sys.path.insert(0, str(REPO / "tests"))
    import nodes as comfy_nodes
    from support.tiny_models import build_sd15, build_tiny_clip, build_tiny_vae

    from hires_parallel.nodes.relay import HiResParallelRelayUpscaleSampler

    model, clip, vae = build_sd15(seed=0), build_tiny_clip(seed=0), build_tiny_vae(seed=0)
    pos = comfy_nodes.CLIPTextEncode().encode(clip, "a lighthouse on a cliff, one subject, wide view")[0]
    neg = comfy_nodes.CLIPTextEncode().encode(clip, "blurry, duplicate")[0]
    latent = comfy_nodes.EmptyLatentImage().generate(args.size, args.size, 1)[0]

    t0 = time.perf_counter()
    low = comfy_nodes.common_ksampler(model, args.seed, args.steps, 7.0, "euler", "karras", pos, neg, latent)[0]
    t1 = time.perf_counter()
    high = HiResParallelRelayUpscaleSampler.execute(
        model, pos, neg, low, scale_by=args.scale, seed=args.seed, steps=args.relay_steps, cfg=7.0,
        sampler_name="euler", scheduler="karras", block_size=4, strength=0.3, relay_point="timestep",
        relay_value=500.0, upscale_method="nearest (latent)").result[0]
    t2 = time.perf_counter()
    image = vae.decode(high["samples"])[0]

    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    from PIL import Image

    Image.fromarray((image.clamp(0, 1) * 255).round().byte().cpu().numpy()).save(out)
    h, w = image.shape[:2]
    timing = {
        "first_pass_s": round(t1 - t0, 3), "first_pass_s_per_step": round((t1 - t0) / args.steps, 3),
        "relay_s": round(t2 - t1, 3), "relay_s_per_step": round((t2 - t1) / args.relay_steps, 3),
        "size": f"{args.size}x{args.size} -> {w}x{h}", "threads": torch.get_num_threads(),
    }
    print(f"wrote {out} ({w}x{h}); timing: " + json.dumps(timing))
    return 0


if __name__ == "__main__":
    sys.exit(main())
