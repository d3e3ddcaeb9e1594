"""Train the small shapes model on this machine's CPU (resumable, time-bounded).

An SD1.5-family UNet (ComfyUI's own architecture, small config) learns epsilon prediction on the SD1.x
discrete schedule (linear betas 0.00085..0.012, 1000 steps), on ``benchmarks/shapes_data.py`` images
mapped to latents by the fixed map of ``benchmarks/shapes_model.py`` (32x32 latent = 256x256 pixels),
conditioned by a frozen, seeded tiny SD1 CLIP on "a <color> <shape>" (10% empty prompt, for
classifier-free guidance). Min-SNR-5 loss weighting (Hang et al. 2023: it spends the few steps a CPU
affords on the noisy timesteps that decide the layout), AdamW, warm-up then cosine decay, EMA of the
weights (the EMA is saved).
Everything is seeded: data sample i, noise and timesteps of step k depend only on (seed, i / k).

A checkpoint (weights, EMA, optimizer, loss history, time spent) is written every few minutes and at
the end; running the same command again resumes from it. ``--minutes`` bounds the total wall time
(all runs together); the model is saved when the step budget or the time bound is reached.

    nice -n 10 python tools/train_shapes_model.py                 # about 36 min on 2 idle cores
    python tools/train_shapes_model.py --init-from models/hires_shapes.safetensors --steps 1000 --lr 3e-4 \
        --out /tmp/longer.safetensors                            # a second phase: train the saved model longer
    python tools/train_shapes_model.py --steps 3 --batch 2 --out /tmp/m.safetensors   # smoke
"""
from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import platform
import sys
import time
import zlib

REPO = pathlib.Path(__file__).resolve().parents[1]
SCRIPT_VERSION = "1"
COND_DROPOUT = 0.1


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(REPO / "models" / "hires_shapes.safetensors"), help="model file to write")
    ap.add_argument("--checkpoint", default="", help="resume file (default: out/train_shapes/<out name>.ckpt)")
    ap.add_argument("--steps", type=int, default=2500, help="optimisation steps")
    ap.add_argument("--minutes", type=float, default=50.0, help="bound on the total wall time, all resumes together")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--ema", type=float, default=0.999, help="EMA decay (ramped up over the first steps)")
    ap.add_argument("--min-snr", type=float, default=5.0, help="min-SNR loss weight gamma (0: plain MSE)")
    ap.add_argument("--channels", type=int, default=32, help="UNet model_channels (a multiple of 32: GroupNorm)")
    ap.add_argument("--res-blocks", type=int, default=1, help="UNet num_res_blocks")
    ap.add_argument("--latent", type=int, default=32, help="training latent side (pixels / 8)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0,
                    help="torch threads; 0: auto, all cores while the machine is otherwise idle, else 1")
    ap.add_argument("--layout-bias", type=float, default=1.0,
                    help="timesteps drawn as 1000 * u^(1/B): 1 = uniform, 2 = density growing linearly with the "
                         "noise level (more of the steps where the layout is decided)")
    ap.add_argument("--init-from", default="",
                    help="start from a saved shapes model's weights (a second training phase with its own "
                         "warm-up and cosine schedule; the text encoder and config are taken from that file)")
    ap.add_argument("--checkpoint-minutes", type=float, default=3.0)
    ap.add_argument("--fresh", action="store_true", help="ignore an existing checkpoint")
    ap.add_argument("--log-every", type=int, default=50)
    ap.add_argument("--export", action="store_true",
                    help="only write the model file from the checkpoint's EMA weights (no training)")
    ap.add_argument("--stop-after", type=int, default=0,
                    help="stop this run after N steps as if interrupted (checkpoint kept; run again to resume)")
    return ap.parse_args(argv)


def lr_at(step: int, args: argparse.Namespace) -> float:
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = min(1.0, (step - args.warmup) / max(1, args.steps - args.warmup))
    return args.lr * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress)))  # cosine down to 10%


def step_generator(seed: int, step: int):
    import torch

    return torch.Generator().manual_seed(zlib.crc32(f"train/{seed}/{step}".encode("ascii")))


def auto_threads(current: int) -> int:
    """All cores when nothing else runs, else 1: on a shared machine two OpenMP threads that wait for each
    other at every op are much slower than one (measured here: over 7 s/step instead of 2)."""
    cores = os.cpu_count() or 1
    others = os.getloadavg()[0] - current  # the 1-minute load average counts our own threads too
    return cores if others < 0.5 else 1


def init_unet_(unet, seed: int) -> None:
    """Seeded N(0, 1/fan_in) weights; zero the output convolutions as SD's training code does."""
    import torch

    sys.path.insert(0, str(REPO / "tests"))
    from support.tiny_models import seed_module_

    seed_module_(unet, seed)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if name.startswith("out.2.") or ".out_layers.3." in name or ".proj_out." in name:
                p.zero_()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sys.path.insert(0, str(REPO / "benchmarks"))
    from hires_parallel.comfy_host import ensure_comfy

    ensure_comfy(cpu=True)
    import torch

    torch.set_num_threads(args.threads or auto_threads(0))
    import comfy.latent_formats
    import shapes_data
    import shapes_model

    out = pathlib.Path(args.out)
    ckpt_path = pathlib.Path(args.checkpoint) if args.checkpoint else REPO / "out" / "train_shapes" / (out.stem + ".ckpt")
    unet_cfg = dict(shapes_model.DEFAULT_UNET, model_channels=args.channels, num_res_blocks=args.res_blocks)
    clip_cfg = dict(shapes_model.DEFAULT_CLIP)
    run_cfg = {"unet": unet_cfg, "clip": clip_cfg, "latent": args.latent, "batch": args.batch, "lr": args.lr,
               "warmup": args.warmup, "steps": args.steps, "ema": args.ema, "seed": args.seed,
               "min_snr": args.min_snr, "cond_dropout": COND_DROPOUT, "script_version": SCRIPT_VERSION,
               "init_from": pathlib.Path(args.init_from).name if args.init_from else "",
               "layout_bias": args.layout_bias}
    base_report = None
    if args.init_from:  # the earlier phase's record travels into this model's JSON
        earlier = pathlib.Path(args.init_from)
        if shapes_model.read_config(earlier)["unet"] != unet_cfg:
            raise SystemExit(f"--init-from {earlier}: its UNet config differs from --channels / --res-blocks")
        record = earlier.with_suffix(".json")
        base_report = json.loads(record.read_text()) if record.is_file() else {"model": earlier.name}

    # Frozen, seeded text encoder, rounded to fp16 first: the saved file gives exactly these conditionings.
    clip = shapes_model.build_clip(clip_cfg)
    sys.path.insert(0, str(REPO / "tests"))
    from support.tiny_models import seed_module_

    seed_module_(clip.cond_stage_model, args.seed + 1)
    with torch.no_grad():
        for p in clip.cond_stage_model.parameters():
            if p.is_floating_point() and p.ndim > 0:
                p.copy_(p.half().float())
    if args.init_from:  # the same seeded encoder; taken from the file so the conditionings match it exactly
        saved_unet, saved_clip = shapes_model.read_weights(args.init_from)
        clip.cond_stage_model.load_state_dict(saved_clip, strict=False)
    prompts = [shapes_data.prompt_for(c, s) for c in shapes_data.COLORS for s in shapes_data.SHAPES]
    conds = {p: clip.encode_from_tokens_scheduled(clip.tokenize(p))[0][0].float() for p in prompts + [""]}
    empty = conds[""]

    base = shapes_model.build_unet(unet_cfg)
    unet = base.diffusion_model
    init_unet_(unet, args.seed)
    if args.init_from:
        unet.load_state_dict(saved_unet, strict=True)
    unet.train().requires_grad_(True)
    ema = {k: v.detach().clone() for k, v in unet.state_dict().items()}
    opt = torch.optim.AdamW(unet.parameters(), lr=args.lr, weight_decay=0.01)
    latent_map = shapes_model.LatentMap()
    fmt = comfy.latent_formats.SD15()
    sigmas = base.model_sampling.sigmas.float()  # ComfyUI's SD1.x discrete schedule, one sigma per timestep
    alphas_cumprod = 1.0 / (1.0 + sigmas ** 2)

    step, spent, losses, runs = 0, 0.0, [], []
    if ckpt_path.is_file() and not args.fresh:
        state = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        if state["run_cfg"] != run_cfg:
            raise SystemExit(f"{ckpt_path} was made with other settings ({state['run_cfg']}); "
                             "pass the same settings, or --fresh to start again.")
        unet.load_state_dict(state["unet"])
        ema = state["ema"]
        opt.load_state_dict(state["opt"])
        step, spent, losses, runs = state["step"], state["spent_s"], state["losses"], state.get("runs", [])
        print(f"resumed {ckpt_path} at step {step} ({spent / 60:.1f} min spent)", flush=True)

    def save_checkpoint() -> None:
        ckpt_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = ckpt_path.with_name(ckpt_path.name + ".tmp")
        torch.save({"run_cfg": run_cfg, "unet": unet.state_dict(), "ema": ema, "opt": opt.state_dict(),
                    "step": step, "spent_s": spent, "losses": losses, "runs": runs + [this_run()]}, tmp)
        tmp.replace(ckpt_path)

    side_px = args.latent * shapes_model.LATENT_RATIO

    def this_run() -> dict:  # one record per run of the script, so resumed trainings say how they went
        return {"argv": argv if argv is not None else sys.argv[1:], "from_step": step0, "to_step": step,
                "minutes": round((spent - spent0) / 60, 2), "load_avg_1min": round(os.getloadavg()[0], 2)}

    t_run = time.perf_counter()
    spent0, step0 = spent, step
    last_ckpt = t_run
    window: list[float] = []
    stopped_by = "steps"
    if args.export:
        if not ckpt_path.is_file():
            raise SystemExit(f"--export needs a checkpoint; {ckpt_path} does not exist.")
        stopped_by = "export"
    while step < args.steps and not args.export:
        if spent >= args.minutes * 60:
            stopped_by = "minutes"
            break
        if args.stop_after and step - step0 >= args.stop_after:
            stopped_by = "stop-after"
            break
        g = step_generator(args.seed, step)
        images, batch_prompts = shapes_data.make_batch(args.seed, step * args.batch, args.batch, side_px)
        with torch.no_grad():
            x0 = fmt.process_in(latent_map.encode(images.permute(0, 3, 1, 2) * 2.0 - 1.0))
        drop = torch.rand(args.batch, generator=g) < COND_DROPOUT
        context = torch.cat([empty if d else conds[p] for p, d in zip(batch_prompts, drop.tolist())])
        if args.layout_bias == 1.0:
            t = torch.randint(0, alphas_cumprod.shape[0], (args.batch,), generator=g)
        else:
            u = torch.rand(args.batch, generator=g) ** (1.0 / args.layout_bias)
            t = (u * alphas_cumprod.shape[0]).long().clamp_(max=alphas_cumprod.shape[0] - 1)
        eps = torch.randn(x0.shape, generator=g)
        a = alphas_cumprod[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * eps  # VP form of ComfyUI's x0 + sigma * eps, scaled by its c_in
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args)
        per_sample = (unet(xt, timesteps=t.float(), context=context) - eps).square().mean(dim=(1, 2, 3))
        if args.min_snr > 0:  # eps-prediction form: weight min(SNR, gamma) / SNR
            snr = a.flatten() / (1 - a.flatten())
            per_sample = per_sample * snr.clamp(max=args.min_snr) / snr
        loss = per_sample.mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        decay = min(args.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            for k, v in unet.state_dict().items():
                if v.is_floating_point():
                    ema[k].mul_(decay).add_(v.detach(), alpha=1 - decay)
                else:
                    ema[k].copy_(v)
        step += 1
        window.append(float(loss.detach()))
        now = time.perf_counter()
        spent = spent0 + (now - t_run)
        if not args.threads and step % 25 == 0:
            torch.set_num_threads(auto_threads(torch.get_num_threads()))
        if len(window) == args.log_every or step == args.steps:
            losses.append({"step": step, "loss": round(sum(window) / len(window), 5), "minutes": round(spent / 60, 2)})
            print(f"step {step}/{args.steps} loss {losses[-1]['loss']:.4f} lr {lr_at(step - 1, args):.2e} "
                  f"threads {torch.get_num_threads()} "
                  f"{spent / 60:.1f} min ({(now - t_run) / (step - step0):.2f} s/step in this run)", flush=True)
            window = []
        if now - last_ckpt >= args.checkpoint_minutes * 60:
            save_checkpoint()
            last_ckpt = now
    if window:
        losses.append({"step": step, "loss": round(sum(window) / len(window), 5), "minutes": round(spent / 60, 2)})
    if not args.export:
        save_checkpoint()

    config = {"unet": unet_cfg, "clip": clip_cfg, "native_latent": args.latent, "native_px": side_px,
              "prediction": "eps", "schedule": "SD1.x discrete (linear betas 0.00085..0.012, 1000 steps)",
              "latent_map": "z = 3 * LATENT_BASIS @ avgpool8(rgb in [-1,1]) / 0.18215 (benchmarks/shapes_model.py)",
              "prompts": prompts, "script_version": SCRIPT_VERSION}
    shapes_model.save_shapes_model(out, ema, clip.cond_stage_model.state_dict(), config)
    curve = losses[:: max(1, len(losses) // 40)]  # about 40 points, and the last one
    curve += [p for p in losses[-1:] if p not in curve]
    report = {
        "model": out.name, "config": config, "seed": args.seed, "steps_done": step, "steps_planned": args.steps,
        "stopped_by": stopped_by, "batch": args.batch, "lr": args.lr, "warmup": args.warmup, "ema": args.ema,
        "cond_dropout": COND_DROPOUT, "min_snr_gamma": args.min_snr,
        "optimizer": "AdamW(weight_decay=0.01), grad clip 1.0, cosine to 10%",
        "parameters": sum(p.numel() for p in unet.parameters()),
        "wall_minutes": round(spent / 60, 2), "wall_seconds": round(spent, 2),
        "loss_first": losses[0]["loss"] if losses else None, "loss_final": losses[-1]["loss"] if losses else None,
        "loss_curve": curve,
        "machine": {"cpu_count": os.cpu_count(), "threads": args.threads or "auto (all cores when idle, else 1)",
                    "platform": platform.platform(),
                    "processor": platform.processor() or platform.machine(), "torch": torch.__version__},
        "command": " ".join(["python", "tools/train_shapes_model.py"] + (argv if argv is not None else sys.argv[1:])),
        "runs": runs + ([] if args.export else [this_run()]),
    }
    if base_report is not None:  # a second phase: say what it started from, and the whole budget
        report["init_from"] = base_report.get("model")
        report["earlier_phase"] = {k: base_report.get(k) for k in (
            "steps_done", "batch", "lr", "wall_minutes", "loss_final", "command", "earlier_phase")}
        report["total_steps"] = step + int(base_report.get("total_steps") or base_report.get("steps_done") or 0)
    out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB) after {step} steps, {spent / 60:.1f} min; "
          f"final loss {report['loss_final']}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
