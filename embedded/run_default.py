"""The pack's main job on its embedded default: the trained shapes model, native pass + 2x block-noise relay,
on CPU ranks through the Patch-Parallel runtime, planned automatically.

Runs headless in this process on the real ComfyUI (the one containing the pack, else COMFYUI_PATH, else
/work/ComfyUI; see comfy_host.py): txt2img at the model's native 256x256, then a block-noise relay to 2x
(512x512), both passes sampled by ``parallel.submit.run_sampling`` with ``--mode auto`` (default): the planner
picks, for each pass, how many of the ``--devices`` CPU ranks to use and how (exact bands, batch / CFG
parallel, or one process when splitting would not pay), from the measured step time and link, and the
command prints its choice and reason; and the same two passes on 1 rank. The two sides run interleaved (parallel, one rank,
parallel, one rank, ...) ``--repeats`` times after a warm-up, so a change of load on the machine hits both
sides alike; the time per step of each side is the minimum over the repeats (the least disturbed run), and
the speed-up is the ratio of those minima. With ``--repeats 1`` no speed-up is printed: one run of each side
swings with the load (0.5x to 6.5x were seen for the same command).
Writes the PNG of the parallel run and one line "wrote <png> ...; timing: {json}".

When models/hires_shapes.safetensors is missing it says how to train it and, in a clone with tests/, runs
the small seeded random-weight test model instead (its picture is noise).

    python -m hires_parallel.embedded.run_default --out out/shapes_2x.png   # the pack installed with pip
    python embedded/run_default.py --out out/shapes_2x.png                 # from the pack's folder, any copy
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import sys
import time

PACK = pathlib.Path(__file__).resolve().parents[1]


def _import_pack_as_hires_parallel() -> None:
    """Run as a script (``python <pack>/embedded/run_default.py``), the copy of the pack that holds this file is
    the code that runs, pip-installed or not (e.g. ComfyUI/custom_nodes/<pack> from the Registry): register its
    folder as the package ``hires_parallel``, as the worker bootstrap does. Under ``python -m
    hires_parallel.embedded.run_default`` the package is already imported and stays as it is."""
    if "hires_parallel" in sys.modules:
        return
    import importlib.util

    spec = importlib.util.spec_from_file_location("hires_parallel", PACK / "__init__.py",
                                                  submodule_search_locations=[str(PACK)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["hires_parallel"] = module
    spec.loader.exec_module(module)


def _subject_counter():
    """benchmarks/metrics.py counts subjects; it is in a clone, not in a Registry install (then: None)."""
    bench = PACK / "benchmarks"
    if not (bench / "metrics.py").is_file():
        return None
    if str(bench) not in sys.path:
        sys.path.insert(0, str(bench))
    try:
        import metrics
    except ImportError:
        return None
    return metrics


def _load_average() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):  # Windows
        return None


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
    ap.add_argument("--devices", type=int, default=0,
                    help="CPU ranks the parallel run may use (0: one per core, at most 4)")
    ap.add_argument("--mode", default="auto", choices=["auto", "auto_approximate", "exact", "displaced", "partial",
                                                       "batch"],
                    help="auto: the planner picks devices and mode (never a plan it predicts slower than 1 device)")
    ap.add_argument("--repeats", type=int, default=3,
                    help="interleaved timed runs of each side; the minimum of each is reported (1: no speed-up)")
    ap.add_argument("--no-compare", action="store_true", help="skip the 1-rank runs (no speed-up figure)")
    ap.add_argument("--model", default="", help="model file (default: models/hires_shapes.safetensors)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads of the 1-rank run (0: all cores)")
    args = ap.parse_args(argv)
    if args.repeats < 1:
        ap.error("--repeats must be at least 1")

    _import_pack_as_hires_parallel()
    from hires_parallel.comfy_host import ensure_comfy

    ensure_comfy(cpu=True)
    import torch

    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    import comfy.sample
    import comfy.samplers
    import nodes as comfy_nodes

    from hires_parallel.algorithms.block_noise import relay_noise
    from hires_parallel.embedded import shapes_model
    from hires_parallel.nodes.relay import relay_sigmas, relay_upscale
    from hires_parallel.parallel.runtime import submit
    from hires_parallel.parallel.runtime.pool import shutdown_pool
    from hires_parallel.parallel.runtime.sampling_job import SamplerSpec

    try:
        model, clip, vae = shapes_model.load_shapes_model(args.model or None)
        model_name = pathlib.Path(args.model or shapes_model.MODEL_PATH).name
    except shapes_model.ShapesModelMissing as e:
        if not (PACK / "tests" / "support" / "tiny_models.py").is_file():
            print(f"{e}\n(The random-weight test model is in a clone's tests/, not in this copy of the pack.)",
                  file=sys.stderr)
            return 1
        print(f"{e}\nRunning the seeded random-weight test model instead: its picture is noise.", file=sys.stderr)
        sys.path.insert(0, str(PACK / "tests"))
        from support.tiny_models import build_sd15, build_tiny_clip, build_tiny_vae

        model, clip, vae = build_sd15(seed=0), build_tiny_clip(seed=0), build_tiny_vae(seed=0)
        model_name = "random test model (trained model missing)"

    pos = comfy_nodes.CLIPTextEncode().encode(clip, args.prompt)[0]
    neg = comfy_nodes.CLIPTextEncode().encode(clip, "")[0]
    side = args.size // 8
    ms = model.get_model_object("model_sampling")
    first_sigmas = comfy.samplers.calculate_sigmas(ms, "karras", args.steps).cpu()
    first_noise = comfy.sample.prepare_noise(torch.zeros(1, 4, side, side), args.seed)  # KSampler's noise

    plans: list[dict] = []  # what the parallel side ran, pass by pass (the planner's choice and reason)

    def sample(devices: list[str], noise, latent, sigmas) -> tuple[torch.Tensor, float, float]:
        t0 = time.perf_counter()
        mode = args.mode if len(devices) > 1 else "exact"
        out = submit.run_sampling(model, pos, neg, args.cfg, noise, latent, sigmas, SamplerSpec(name="euler"),
                                  args.seed, None, devices, mode=mode)
        wall = time.perf_counter() - t0
        step_s = submit.LAST_RUN["ranks"][0]["step_s"]
        if len(devices) > 1:
            plans.append({"devices": submit.LAST_RUN["world_size"], "mode": submit.LAST_RUN["mode"],
                          "cfg_parallel": submit.LAST_RUN["cfg_parallel"],
                          "reason": (submit.LAST_RUN.get("plan") or {}).get("reason", "mode set by --mode")})
        return out, statistics.median(step_s[1:] or step_s), wall  # the first step carries the set-up

    def pipeline(devices: list[str]) -> dict:
        low, first_step, first_wall = sample(devices, first_noise, torch.zeros(1, 4, side, side), first_sigmas)
        z_up = relay_upscale(low, args.scale, "nearest (latent)")
        sigmas = relay_sigmas(model, "karras", args.relay_steps, "timestep", 500.0 if args.scale <= 2 else 600.0)
        noise = relay_noise(tuple(z_up.shape), args.seed, 4, 0.3)
        high, relay_step, relay_wall = sample(devices, noise, z_up, sigmas)
        return {"latent": high, "first_s_per_step": first_step, "relay_s_per_step": relay_step,
                "first_wall_s": first_wall, "relay_wall_s": relay_wall}

    started = time.perf_counter()
    load_before = _load_average()
    ranks = submit.resolve_devices(args.devices, "cpu", auto=args.mode in submit.AUTO_MODES)
    compare = not args.no_compare and len(ranks) > 1
    if len(ranks) > 1:
        pipeline(ranks)  # start the worker pool and ship the model once: start-up is not what is measured
    par_runs: list[dict] = []
    one_runs: list[dict] = []
    for r in range(args.repeats):
        # Interleaved, and the order alternates (P1, 1P, P1, ...), so neither side always runs first.
        order = ["par", "one"] if r % 2 == 0 else ["one", "par"]
        for side_name in order:
            if side_name == "par":
                par_runs.append(pipeline(ranks))
            elif compare:
                one_runs.append(pipeline(["cpu"]))
    shutdown_pool()
    par = par_runs[0]
    image = vae.decode(par["latent"])[0]

    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    from PIL import Image

    Image.fromarray((image.clamp(0, 1) * 255).round().byte().cpu().numpy()).save(out)
    h, w = image.shape[:2]

    def fastest(runs: list[dict], key: str) -> float:
        return min(run[key] for run in runs)

    timing = {
        "model": model_name, "pack": os.path.dirname(os.path.abspath(sys.modules["hires_parallel"].__file__)),
        "prompt": args.prompt, "size": f"{args.size}x{args.size} -> {w}x{h}",
        "ranks": len(ranks), "repeats": args.repeats, "mode": args.mode,
        "plan_first_pass": plans[-2] if len(plans) >= 2 else None, "plan_relay": plans[-1] if plans else None,
        "timed": f"{args.repeats} repeat(s), interleaved" if compare else f"{args.repeats} repeat(s)",
        "first_pass_s_per_step": round(fastest(par_runs, "first_s_per_step"), 4),
        "relay_s_per_step": round(fastest(par_runs, "relay_s_per_step"), 4),
        "total_s": round(min(p["first_wall_s"] + p["relay_wall_s"] for p in par_runs), 2),
    }
    if compare:
        one = one_runs[0]
        timing.update({
            "one_rank_threads": torch.get_num_threads(),
            "one_rank_first_pass_s_per_step": round(fastest(one_runs, "first_s_per_step"), 4),
            "one_rank_relay_s_per_step": round(fastest(one_runs, "relay_s_per_step"), 4),
            "max_abs_diff_vs_one_rank": float((par["latent"] - one["latent"]).abs().max()),
        })
        if args.repeats > 1:  # the ratio of the minima of interleaved runs
            timing["speedup_first_pass"] = round(timing["one_rank_first_pass_s_per_step"]
                                                 / timing["first_pass_s_per_step"], 2)
            timing["speedup_relay"] = round(timing["one_rank_relay_s_per_step"] / timing["relay_s_per_step"], 2)
        else:
            timing["speedup"] = "not measured: one run of each side swings with the load; use --repeats 3 or more"
    metrics = _subject_counter()
    words = args.prompt.split()
    if metrics is not None and len(words) == 3 and words[1] in metrics.COLORS:
        timing["subjects"] = metrics.subject_count(image, words[1])
    timing["all_runs_s"] = round(time.perf_counter() - started, 1)  # warm-up and every timed run
    # Other work on the machine moves both sides (a loaded machine hurts the multi-threaded 1-rank side most):
    # the 1-minute load average before and after the timed runs, against the core count, says how loaded.
    timing["machine"] = {"cores": os.cpu_count(), "load_1min_before": load_before, "load_1min_after": _load_average()}
    print(f"wrote {out} ({w}x{h}); timing: " + json.dumps(timing))
    return 0


if __name__ == "__main__":
    sys.exit(main())
