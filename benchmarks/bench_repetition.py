"""Repetition benchmark on the trained shapes model: does one subject stay one subject at 2x and 3x?

The same seeds and prompts ("a <color> <shape>", one subject each) at 1x, 2x and 3x per side
(256, 512, 768 pixels) with:

* plain: ComfyUI's sampling straight at the size;
* deep shrink: ComfyUI's built-in Kohya Deep Shrink (PatchModelAddDownscale; block 2 of this UNet is
  the first downsample, the place of SD1.5's block 3; factor = the scale; 0 to 35% of the steps);
* relay: the pack's block-noise relay (Relay Upscale Sampler's pieces) from the native-size plain result;
* structure guidance: the pack's Structure-Guided HiRes (ASGDiffusion) patch with its defaults, when
  ``hires_parallel.nodes.asg`` exists (the output says whether it was included);
* parallel <mode>: the relay's second pass (the native pass at 1x) on 2 CPU ranks through the
  Patch-Parallel runtime, for every mode in ``hires_parallel.parallel.runtime.submit.MODES`` with CFG parallel
  off (so the image is cut into two row bands, which is what the band modes differ in) and their default
  options; PSNR and max error against the same pass on one device.

At 1x the hires methods would only repeat the native pass (the relay starts from it), so they run at 2x
and 3x only; the grid shows the native image in their 1x column.

Metrics (benchmarks/metrics.py) on the decoded images: connected components of the prompt's colour
(mean count, share of images with exactly one), their size as a share of the canvas, and the background
texture: ``metrics.background_texture``, the mean squared Laplacian of the pixels outside every subject
component and more than 16 pixels (the VAE's ringing around edges) from one and from the border, a
per-pixel mean at the image's own pixel scale, so a 768-pixel background as finely grained as the
256-pixel one scores the same and one made of enlarged blotches scores lower.
Columns "bg tex" (median over the seeds: one seed's background may hold a pattern the others lack, such
as the VAE's 8-pixel lattice on striped backgrounds, and dominate a mean), "vs 1x" (against the same
seed's native image, plain at 1x) and "vs plain" (against plain sampling of the same seed at the same
size); the ratios are geometric means over the seeds of the per-seed ratios (seeds whose reference has
no background, or a zero one, are left out). The statistic grows with the pattern's contrast as well as
its fineness: coarse blotches of high contrast can outscore a faint fine grain. Prints a table, writes
JSON (rows and per image, with every image's texture and ratios) and one image grid (rows: methods;
columns: scales, for the first seeds).

Seeds and prompts. By default seeds 0..N-1, and seed s gets the (s mod 12)-th built-in colour/shape pair
("a red circle", "a red square", "a red triangle", "a green circle", ... "a yellow triangle"). Held-out
checks, on cases the defaults were not tuned on:

* ``--seed-offset K``: seeds K..K+N-1 (the noise of every method follows the seed); with the built-in
  prompts seed s still gets pair s mod 12, so a new seed also meets its prompt for the first time.
* ``--prompts "a blue triangle,a red circle"``: comma-separated prompts used instead of the built-in
  pairs; the i-th seed of the run (seed K+i) gets prompt i mod len(list). Each prompt must name exactly
  one subject colour (red, green, blue, yellow): the metrics count that colour. Shapes are free text
  (the model was trained on circle, square, triangle).

The table header and the JSON ("settings": seeds, seed_offset, prompts per seed, prompt_source, held_out)
say which seeds and prompts were used.

    python benchmarks/bench_repetition.py [--seeds 12] [--steps 20] [--relay-steps 12]
    python benchmarks/bench_repetition.py --seeds 4 --seed-offset 16 --prompts "a blue triangle,a yellow circle"
"""
from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import statistics
import sys
import time
from typing import Any, Callable

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from bench_common import machine, write_result  # noqa: E402 (benchmarks/ is on the path)

DEEP_SHRINK_BLOCK = 2  # input block after the first downsample of a num_res_blocks=1 UNet (SD1.5: block 3)
RELAY_TIMESTEP = {2: 500.0, 3: 600.0}  # README: 500 for 2x, 600 for 3x to 4x


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=HELD_OUT_HELP,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="", help="model file (default: models/hires_shapes.safetensors)")
    ap.add_argument("--seeds", type=int, default=12,
                    help="number of seeds N: seeds K..K+N-1 with K = --seed-offset (default: 0..N-1)")
    ap.add_argument("--seed-offset", type=int, default=0, metavar="K",
                    help="first seed (held-out check: seeds the defaults were not tuned on); default 0")
    ap.add_argument("--prompts", default="", metavar="P1,P2,...",
                    help="comma-separated prompts, each naming one subject colour; the i-th seed of the run "
                         "gets prompt i mod their number (default: seed s gets built-in pair s mod 12)")
    ap.add_argument("--scales", default="1,2,3")
    ap.add_argument("--steps", type=int, default=20, help="steps of plain / deep shrink / structure guidance")
    ap.add_argument("--relay-steps", type=int, default=12, help="steps after the relay point")
    ap.add_argument("--relay-block", type=int, default=4, help="relay block-noise block size (latent pixels)")
    ap.add_argument("--relay-strength", type=float, default=0.3, help="relay block-noise strength")
    ap.add_argument("--cfg", type=float, default=5.0)
    ap.add_argument("--sampler", default="euler")
    ap.add_argument("--scheduler", default="karras")
    ap.add_argument("--modes", default="", help="parallel modes, comma separated (default: every mode that exists)")
    ap.add_argument("--no-parallel", action="store_true")
    ap.add_argument("--threads", type=int, default=0, help="torch threads of the single-device runs (0: all cores)")
    ap.add_argument("--grid-seeds", type=int, default=2, help="seeds shown in the grid")
    ap.add_argument("--cell", type=int, default=144, help="grid cell side in pixels")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "repetition.json"))
    ap.add_argument("--grid", default=str(REPO / "docs" / "images" / "repetition_grid.png"))
    args = ap.parse_args(argv)
    if args.seeds < 1:
        ap.error(f"--seeds must be at least 1; got {args.seeds}")
    if args.seed_offset < 0:
        ap.error(f"--seed-offset must be >= 0; got {args.seed_offset}")
    try:
        parse_prompts(args.prompts)
    except ValueError as e:
        ap.error(str(e))
    return args


HELD_OUT_HELP = """held-out checks:
  --seed-offset 16              seeds 16..16+N-1; built-in prompts: seed s gets pair s mod 12
  --prompts "a blue triangle,a red circle"
                                the i-th seed (K+i) gets prompt i mod 2; each prompt names one colour
                                (red, green, blue, yellow), the colour whose subjects are counted
The table header and the JSON settings (seeds, seed_offset, prompts, prompt_source, held_out) say which."""


def builtin_pairs() -> list[tuple[str, str]]:
    """The built-in (colour, shape) pairs in their fixed order: red circle, red square, ..., yellow triangle."""
    import shapes_data

    return [(c, s) for c in shapes_data.COLORS for s in shapes_data.SHAPES]


def parse_prompts(text: str) -> list[tuple[str, str]]:
    """``--prompts``: [(prompt, colour)], in order; [] when empty. Each prompt names exactly one subject colour."""
    import shapes_data

    out = []
    for prompt in (p.strip() for p in text.split(",")):
        if not prompt:
            continue
        named = [w for w in prompt.lower().replace("-", " ").split() if w in shapes_data.COLORS]
        if len(set(named)) != 1:
            raise ValueError(f"--prompts: {prompt!r} must name exactly one of {list(shapes_data.COLORS)} "
                             f"(the colour whose subjects are counted)")
        out.append((prompt, named[0]))
    if text.strip() and not out:
        raise ValueError("--prompts: no prompt given")
    return out


def seeds_and_prompts(count: int, offset: int, prompts_arg: str) -> tuple[list[int], list[str], list[str], str]:
    """(seeds, prompt per seed, colour per seed, where the prompts come from) for the run."""
    import shapes_data

    seeds = list(range(offset, offset + count))
    given = parse_prompts(prompts_arg)
    if given:
        chosen = [given[i % len(given)] for i in range(count)]
        source = f"--prompts ({len(given)}; the i-th seed gets prompt i mod {len(given)})"
    else:
        pairs = builtin_pairs()
        chosen = [(shapes_data.prompt_for(*pairs[s % len(pairs)]), pairs[s % len(pairs)][0]) for s in seeds]
        source = f"built-in colour/shape pairs (seed s gets pair s mod {len(pairs)})"
    return seeds, [p for p, _ in chosen], [c for _, c in chosen], source


def geometric_mean(values: list[float]) -> float | None:
    """Geometric mean of the finite positive values; None when there are none."""
    ok = [v for v in values if v is not None and math.isfinite(v) and v > 0]
    return math.exp(statistics.fmean(math.log(v) for v in ok)) if ok else None


def ratio(a: float, b: float) -> float | None:
    """a / b for finite values with b > 0 (a texture against its reference), else None."""
    return a / b if math.isfinite(a) and math.isfinite(b) and b > 0 else None


def node_defaults(node_cls) -> dict[str, Any]:
    """A V3 node's widget defaults by input id (so the benchmark follows the node as it evolves)."""
    return {i.id: i.default for i in node_cls.define_schema().inputs if getattr(i, "default", None) is not None}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from hires_parallel.comfy_host import ensure_comfy

    ensure_comfy(cpu=True)
    import torch

    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    import comfy.sample
    import comfy.samplers
    import nodes as comfy_nodes
    from comfy_extras.nodes_model_downscale import PatchModelAddDownscale

    import metrics
    import shapes_model
    from hires_parallel.algorithms.block_noise import relay_noise
    from hires_parallel.nodes.relay import relay_sigmas, relay_upscale
    from hires_parallel.parallel.runtime import submit
    from hires_parallel.parallel.runtime.sampling_job import SamplerSpec

    try:
        import hires_parallel.nodes.asg as asg
    except ImportError:
        asg = None
    try:
        model, clip, vae = shapes_model.load_shapes_model(args.model or None)
    except shapes_model.ShapesModelMissing as e:
        print(e, file=sys.stderr)
        return 2
    scales = [int(s) for s in args.scales.split(",")]
    modes = [] if args.no_parallel else ([m for m in args.modes.split(",") if m] or list(submit.MODES))
    n = args.seeds
    seeds, prompts, colors, prompt_source = seeds_and_prompts(n, args.seed_offset, args.prompts)
    held_out = args.seed_offset != 0 or bool(args.prompts.strip())

    encoded = [comfy_nodes.CLIPTextEncode().encode(clip, p)[0][0] for p in prompts]
    positive = [[torch.cat([c for c, _ in encoded]), {"pooled_output": torch.cat([d["pooled_output"] for _, d in encoded])}]]
    negative = comfy_nodes.CLIPTextEncode().encode(clip, "")[0]
    ms = model.get_model_object("model_sampling")
    native = shapes_model.NATIVE_PX // shapes_model.LATENT_RATIO

    def seed_noise(side: int) -> torch.Tensor:  # KSampler's noise for each seed, stacked
        return torch.cat([comfy.sample.prepare_noise(torch.zeros(1, 4, side, side), s) for s in seeds])

    def guided(m, noise: torch.Tensor, latent: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
        guider = comfy.samplers.CFGGuider(m)
        guider.set_conds(positive, negative)
        guider.set_cfg(args.cfg)
        return guider.sample(noise, latent, comfy.samplers.sampler_object(args.sampler), sigmas, disable_pbar=True,
                             seed=seeds[0])

    def full_sigmas() -> torch.Tensor:
        return comfy.samplers.calculate_sigmas(ms, args.scheduler, args.steps).cpu()

    runs: dict[tuple[str, int], dict] = {}  # (method, scale) -> latents, seconds, reference key

    def timed(key: tuple[str, int], fn: Callable[[], torch.Tensor], reference: tuple[str, int] | None = None) -> None:
        t0 = time.perf_counter()
        latents = fn()
        runs[key] = {"latents": latents.float().cpu(), "seconds": time.perf_counter() - t0, "reference": reference}
        print(f"  {key[0]:28s} {key[1]}x  {runs[key]['seconds']:7.1f} s", flush=True)

    relay_inputs: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
    asg_status = "not included (hires_parallel.nodes.asg does not exist in this checkout)" if asg is None else "not run"
    for scale in scales:
        side = native * scale
        empty = torch.zeros(n, 4, side, side)
        print(f"scale {scale}x ({side * 8}x{side * 8} pixels, {n} seeds)", flush=True)
        timed(("plain", scale), lambda: guided(model, seed_noise(side), empty, full_sigmas()))
        if scale == 1:
            continue
        shrunk = PatchModelAddDownscale.execute(model, DEEP_SHRINK_BLOCK, float(scale), 0.0, 0.35, True, "bicubic",
                                                "bicubic").result[0]
        timed(("deep shrink", scale), lambda: guided(shrunk, seed_noise(side), empty, full_sigmas()))
        low = runs[("plain", 1)]["latents"] if ("plain", 1) in runs else guided(model, seed_noise(native),
                                                                              torch.zeros(n, 4, native, native),
                                                                              full_sigmas())
        z_up = relay_upscale(low, float(scale), "nearest (latent)")
        sigmas = relay_sigmas(model, args.scheduler, args.relay_steps, "timestep", RELAY_TIMESTEP.get(scale, 600.0))
        noise = torch.cat([relay_noise((1, *z_up.shape[1:]), s, args.relay_block, args.relay_strength) for s in seeds])
        relay_inputs[scale] = (noise, z_up, sigmas)
        timed(("relay", scale), lambda: guided(model, noise, z_up, sigmas))
        if asg is not None and not asg_status.startswith("failed"):
            try:  # another part of the pack, still moving: a failure is reported, not fatal
                options = node_defaults(asg.HiResParallelStructureGuidedHiRes)
                options.update(native_resolution=shapes_model.NATIVE_PX)
                patched = asg.HiResParallelStructureGuidedHiRes.execute(model, **options).result[0]
                timed(("structure guidance", scale), lambda: guided(patched, seed_noise(side), empty, full_sigmas()))
                # Its paired reference: a native run from the key view's own noise (the strided view it carries
                # to the size). The seed's 1x image starts from other noise, so it is another composition.
                key_noise = seed_noise(side)[..., ::scale, ::scale].contiguous()
                timed(("native from key view", scale), lambda: guided(model, key_noise, torch.zeros_like(key_noise),
                                                                       full_sigmas()))
                asg_status = "included (hires_parallel.nodes.asg, node defaults, native 256)"
            except Exception as e:  # noqa: BLE001
                asg_status = f"failed: {type(e).__name__}: {e}"

    for mode in modes:
        for scale in scales:
            if scale == 1:
                noise, start, sigmas, ref = seed_noise(native), torch.zeros(n, 4, native, native), full_sigmas(), ("plain", 1)
            else:
                (noise, start, sigmas), ref = relay_inputs[scale], ("relay", scale)
            timed((f"parallel {mode}", scale), lambda: submit.run_sampling(
                model, positive, negative, args.cfg, noise, start, sigmas, SamplerSpec(name=args.sampler), seeds[0],
                None, ["cpu", "cpu"], cfg_parallel="off", mode=mode), reference=ref)
    if modes:
        from hires_parallel.parallel.runtime.pool import shutdown_pool

        shutdown_pool()

    # ------------------------------------------------------------------ metrics
    images = {key: vae.decode(run["latents"]).clamp(0, 1) for key, run in runs.items()}
    texture = {key: [metrics.background_texture(imgs[i]) for i in range(n)] for key, imgs in images.items()}
    data_texture = {scale: data_background_texture(vae, native * scale * shapes_model.LATENT_RATIO)
                    for scale in scales}
    seam_period = shapes_model.NATIVE_PX // 2  # stage-2 windows of structure guidance step by half the native side

    def rounded(v: float | None, digits: int = 4) -> float | None:  # NaN (no background) -> null in the JSON
        return None if v is None or not math.isfinite(v) else float(f"{v:.{digits}g}")

    subject_sizes = {key: [metrics.subject_size(imgs[i], colors[i]) for i in range(n)] for key, imgs in images.items()}
    native_size = statistics.fmean(subject_sizes[("plain", 1)]) if ("plain", 1) in images else None
    rows, per_image = [], []
    for (method, scale), run in runs.items():
        imgs = images[(method, scale)]
        counts = [metrics.subject_count(imgs[i], colors[i]) for i in range(n)]
        sizes = subject_sizes[(method, scale)]
        tex = texture[(method, scale)]
        native_tex, plain_tex = texture.get(("plain", 1)), texture.get(("plain", scale))
        if ("plain", scale) in images and images[("plain", scale)].shape != imgs.shape:
            plain_tex = None  # a native-size reference row: plain at the size is another canvas
        vs_1x = [ratio(tex[i], native_tex[i]) if native_tex else None for i in range(n)]
        vs_plain = [ratio(tex[i], plain_tex[i]) if plain_tex else None for i in range(n)]
        finite_tex = [t for t in tex if math.isfinite(t)]
        seams = [metrics.seam_score(imgs[i], seam_period, metrics.background_mask(imgs[i])) for i in range(n)]
        seams = [v for v in seams if math.isfinite(v)]
        median_tex = statistics.median(finite_tex) if finite_tex else None
        data_tex = data_texture.get(scale) if imgs.shape[1] > native * shapes_model.LATENT_RATIO else data_texture.get(1)
        row = {"method": method, "scale": scale, "pixels": int(imgs.shape[1]), "images": n,
               "mean_count": round(statistics.fmean(counts), 3), "exactly_one": round(counts.count(1) / n, 3),
               "mean_size": round(statistics.fmean(sizes), 4),
               "size_vs_1x": rounded(ratio(statistics.fmean(sizes), native_size)),
               "seam_max": rounded(max(seams)) if seams else None,
               "bg_texture": rounded(median_tex),
               "bg_texture_vs_1x": rounded(geometric_mean(vs_1x)),
               "bg_texture_vs_plain": rounded(geometric_mean(vs_plain)),
               "bg_texture_vs_data": rounded(ratio(median_tex, data_tex)) if median_tex and data_tex else None,
               "s_per_image": round(run["seconds"] / n, 2), "psnr_min_db": None, "max_error": None}
        if method == "structure guidance" and ("native from key view", scale) in runs:
            ref_sizes = subject_sizes[("native from key view", scale)]
            row["size_vs_native_same_noise"] = rounded(ratio(statistics.fmean(sizes), statistics.fmean(ref_sizes)))
        if run["reference"] is not None:
            fids = [metrics.fidelity(imgs[i], images[run["reference"]][i]) for i in range(n)]
            worst = min(f["psnr"] for f in fids)
            row["psnr_min_db"] = "inf" if math.isinf(worst) else round(worst, 2)
            row["max_error"] = max(f["max_error"] for f in fids)
            row["reference"] = f"{run['reference'][0]} {run['reference'][1]}x on 1 device"
        rows.append(row)
        per_image += [{"method": method, "scale": scale, "seed": s, "prompt": prompts[i], "count": counts[i],
                       "size": round(sizes[i], 4), "bg_texture": rounded(tex[i]), "bg_texture_vs_1x": rounded(vs_1x[i]),
                       "bg_texture_vs_plain": rounded(vs_plain[i])} for i, s in enumerate(seeds)]
    order = {"plain": 0, "deep shrink": 1, "relay": 2, "structure guidance": 3, "native from key view": 4}
    rows.sort(key=lambda r: (order.get(r["method"], 4), r["method"], r["scale"]))

    print(f"\nrepetition: {n} seeds x {len(scales)} scales; {args.sampler}/{args.scheduler}, cfg {args.cfg}, "
          f"{args.steps} steps ({args.relay_steps} after the relay point)")
    kind = "HELD OUT" if held_out else "default"
    offset = f" (--seed-offset {args.seed_offset})" if args.seed_offset else ""
    print(f"seeds ({kind}): {seeds[0]}..{seeds[-1]}{offset}")
    print(f"prompts ({kind}): {prompt_source}: " + ", ".join(dict.fromkeys(prompts)))
    print("structure guidance: " + asg_status)
    print(f"relay: nearest latent upscale, block noise {args.relay_block} / {args.relay_strength}, timestep "
          + ", ".join(f"{v:g} at {k}x" for k, v in RELAY_TIMESTEP.items()))
    print(f"bg tex: mean squared Laplacian of the background (metrics.background_texture, margin "
          f"{metrics.EDGE_MARGIN} px), median over seeds; vs 1x / vs plain: geometric mean over seeds of the ratio "
          "to the same seed's plain 1x / plain image at that size")
    print("size/1x: mean subject share over the plain 1x images' (structure guidance also against native runs "
          "from its key view's noise: 'same noise'); seam: largest metrics.seam_score over seeds on the "
          f"{seam_period} px grid, background only (1 = no seam); vs data: bg tex over the data set's own backgrounds at that size")
    print(f"{'method':28s} {'scale':>5s} {'count':>6s} {'one':>5s} {'size':>6s} {'size/1x':>7s} {'seam':>5s} "
          f"{'bg tex':>8s} {'vs 1x':>6s} {'vs plain':>8s} {'vs data':>7s} {'PSNR min':>9s} {'max err':>8s} {'s/img':>6s}")

    def shown(v: float | None, fmt: str) -> str:
        return "-" if v is None else format(v, fmt)

    for r in rows:
        psnr = "-" if r["psnr_min_db"] is None else str(r["psnr_min_db"])
        err = "-" if r["max_error"] is None else f"{r['max_error']:.1e}"
        print(f"{r['method']:28s} {r['scale']:4d}x {r['mean_count']:6.2f} {r['exactly_one']:5.0%} {r['mean_size']:6.1%} "
              f"{shown(r['size_vs_1x'], '.2f'):>7s} {shown(r['seam_max'], '.2f'):>5s} "
              f"{shown(r['bg_texture'], '.2e'):>8s} {shown(r['bg_texture_vs_1x'], '.2f'):>6s} "
              f"{shown(r['bg_texture_vs_plain'], '.2f'):>8s} {shown(r['bg_texture_vs_data'], '.2f'):>7s} "
              f"{psnr:>9s} {err:>8s} {r['s_per_image']:6.2f}")
        if "size_vs_native_same_noise" in r:
            print(f"{'':28s} {'':5s} size / native runs from the key view's noise: "
                  f"{shown(r['size_vs_native_same_noise'], '.3f')}")

    model_json = pathlib.Path(shapes_model.MODEL_PATH if not args.model else args.model).with_suffix(".json")
    trained = json.loads(model_json.read_text()) if model_json.is_file() else {}
    result = {
        "benchmark": "repetition",
        "model": {"file": str(pathlib.Path(args.model or shapes_model.MODEL_PATH).name),
                  "steps_done": trained.get("steps_done"), "wall_minutes": trained.get("wall_minutes"),
                  "loss_final": trained.get("loss_final")},
        "settings": {"seeds": seeds, "seed_offset": args.seed_offset, "prompts": prompts, "colors": colors,
                     "prompt_source": prompt_source, "held_out": held_out, "scales": scales, "steps": args.steps,
                     "relay_steps": args.relay_steps, "relay_timestep": {str(k): v for k, v in RELAY_TIMESTEP.items()},
                     "cfg": args.cfg, "sampler": args.sampler, "scheduler": args.scheduler,
                     "deep_shrink": {"block_number": DEEP_SHRINK_BLOCK, "downscale_factor": "scale",
                                     "start_percent": 0.0, "end_percent": 0.35},
                     "relay": {"upscale": "nearest (latent)", "block_size": args.relay_block,
                               "strength": args.relay_strength},
                     "parallel": {"devices": 2, "device_kind": "cpu", "modes": modes},
                     "metrics": {"saturation": metrics.SATURATION, "min_fraction": metrics.MIN_FRACTION,
                                 "background_texture": {
                                     "statistic": "mean over background pixels and RGB channels of the squared "
                                                  "5-point Laplacian, image in [0, 1], at the image's own pixel scale",
                                     "background": "outside every counted subject component of every colour, "
                                                   "eroded by edge_margin_px (and that far from the border)",
                                     "edge_margin_px": metrics.EDGE_MARGIN,
                                     "row_value": "median over seeds (images without background left out)",
                                     "ratios": "geometric mean over seeds of per-seed ratios; vs_1x: plain at 1x, "
                                               "vs_plain: plain at the same scale; vs_data: row median over the "
                                               "median of DATA_TEXTURE_SAMPLES data-set images rendered at the "
                                               "row's size and passed through the latent map",
                                     "data_at_size": {str(k): rounded(v) for k, v in data_texture.items()}},
                                 "seam": {"statistic": "metrics.seam_score on the background (metrics.background_mask)",
                                          "period_px": seam_period, "row_value": "largest over seeds"}}},
        "structure_guidance": asg_status,
        "machine": machine(threads=torch.get_num_threads()),
        "rows": rows, "per_image": per_image,
    }
    write_result(args.out, result)
    if args.grid:
        grid_rows = [m for m in ("plain", "deep shrink", "relay", "structure guidance") if any(k[0] == m for k in runs)]
        grid_rows += [f"parallel {m}" for m in modes if m not in ("exact", "batch")]  # only modes that may differ
        write_grid(pathlib.Path(args.grid), images, grid_rows, scales, min(args.grid_seeds, n), prompts, args.cell)
        print(f"wrote {args.grid}")
    return 0


DATA_TEXTURE_SAMPLES = 24


def data_background_texture(vae, side: int) -> float:
    """Median background texture of data-set images (seed 0, from index 10000: not the training batches' order)
    rendered at ``side`` pixels and passed through the latent map: what a clean image of this world holds at
    that size (a 1x model image holds more: the model's own grain at its native size)."""
    import shapes_data

    import metrics

    values = []
    for i in range(DATA_TEXTURE_SAMPLES):
        image = shapes_data.make_sample(0, 10_000 + i, side).image[None]
        values.append(metrics.background_texture(vae.decode(vae.encode(image)).clamp(0, 1)[0]))
    finite = [v for v in values if math.isfinite(v)]
    return statistics.median(finite) if finite else math.nan


def write_grid(path: pathlib.Path, images: dict, methods: list[str], scales: list[int], shown: int, prompts: list[str],
               cell: int) -> None:
    """Rows: methods; columns: (seed, scale). Every image shrunk to `cell` pixels; missing cells stay blank."""
    from PIL import Image, ImageDraw

    label_w, head_h, pad = 112, 30, 4
    cols = [(i, s) for i in range(shown) for s in scales]
    width = label_w + len(cols) * (cell + pad)
    height = head_h + len(methods) * (cell + pad)
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for c, (i, s) in enumerate(cols):
        x = label_w + c * (cell + pad)
        draw.text((x + 2, 2), prompts[i], fill=(0, 0, 0))
        draw.text((x + 2, 15), f"{s}x ({s * 256}px)", fill=(0, 0, 0))
    for r, method in enumerate(methods):
        y = head_h + r * (cell + pad)
        draw.text((4, y + cell // 2 - 6), method, fill=(0, 0, 0))
        for c, (i, s) in enumerate(cols):
            key = (method, s) if (method, s) in images else ("plain", s) if s == 1 else None
            if key is None or key not in images:
                continue
            arr = (images[key][i].clamp(0, 1) * 255).round().byte().cpu().numpy()
            canvas.paste(Image.fromarray(arr).resize((cell, cell), Image.BILINEAR), (label_w + c * (cell + pad), y))
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path, optimize=True)


if __name__ == "__main__":
    sys.exit(main())
