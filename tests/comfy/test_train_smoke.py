"""tools/train_shapes_model.py at a tiny size: it trains, resumes exactly, and its file is a real ComfyUI model."""
import json
import pathlib
import subprocess
import sys

import pytest
import torch

REPO = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))
TINY = ["--steps", "4", "--batch", "2", "--channels", "32", "--latent", "8", "--warmup", "2", "--log-every", "1",
        "--threads", "1"]


def train(out: pathlib.Path, *extra: str) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, str(REPO / "tools" / "train_shapes_model.py"), "--out", str(out),
                        "--checkpoint", str(out.with_suffix(".ckpt")), *TINY, *extra],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    interrupted = root / "in_two_runs.safetensors"
    first = train(interrupted, "--stop-after", "2")
    second = train(interrupted)
    straight = root / "in_one_run.safetensors"
    train(straight)
    return {"resumed": interrupted, "straight": straight, "first": first, "second": second}


def test_training_reports_and_resumes(trained):
    assert "resumed " not in trained["first"].stdout and "resumed " in trained["second"].stdout
    report = json.loads(trained["resumed"].with_suffix(".json").read_text())
    assert report["steps_done"] == 4 and report["stopped_by"] == "steps" and report["seed"] == 0
    assert [p["step"] for p in report["loss_curve"]] == [1, 2, 3, 4]
    assert all(0.0 < p["loss"] < 10.0 for p in report["loss_curve"])
    assert report["config"]["unet"]["model_channels"] == 32 and report["config"]["script_version"]
    assert report["machine"]["cpu_count"] >= 1 and report["wall_seconds"] > 0


def test_a_resumed_run_equals_an_uninterrupted_one(trained):
    from safetensors.torch import load_file

    a, b = load_file(str(trained["resumed"])), load_file(str(trained["straight"]))
    assert a.keys() == b.keys()
    assert any(k.startswith("cond_stage_model.") for k in a) and any(k.startswith("model.diffusion_model.") for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_the_file_loads_into_a_real_model_that_samples(trained):
    import comfy.model_patcher
    import comfy.sample
    import comfy.sd
    import nodes

    import shapes_model

    model, clip, vae = shapes_model.load_shapes_model(trained["straight"])
    assert isinstance(model, comfy.model_patcher.ModelPatcher) and isinstance(clip, comfy.sd.CLIP)
    assert isinstance(vae, comfy.sd.VAE)
    assert model.model.model_config.unet_config["model_channels"] == 32
    # the saved weights are the EMA of the checkpoint, rounded to fp16
    ema = torch.load(trained["straight"].with_suffix(".ckpt"), map_location="cpu", weights_only=False)["ema"]
    sd = model.model.diffusion_model.state_dict()
    assert all(torch.equal(sd[k], v.half().float()) for k, v in ema.items() if v.is_floating_point())

    pos = nodes.CLIPTextEncode().encode(clip, "a red circle")[0]
    neg = nodes.CLIPTextEncode().encode(clip, "")[0]
    assert pos[0][0].shape == (1, 77, 64) and not torch.equal(pos[0][0], neg[0][0])
    # CLIPTextEncode on the saved text encoder gives exactly what training used (seeded, fp16-rounded)
    sys.path.insert(0, str(REPO / "tests"))
    from support.tiny_models import seed_module_

    fresh = shapes_model.build_clip(shapes_model.DEFAULT_CLIP)
    seed_module_(fresh.cond_stage_model, 0 + 1)  # the script seeds the text encoder with seed + 1
    with torch.no_grad():
        for p in fresh.cond_stage_model.parameters():
            if p.ndim > 0:
                p.copy_(p.half().float())
    assert torch.equal(nodes.CLIPTextEncode().encode(fresh, "a red circle")[0][0][0], pos[0][0])
    latent = torch.zeros(1, 4, 16, 16)
    noise = comfy.sample.prepare_noise(latent, 0)
    out = comfy.sample.sample(model, noise, 3, 4.0, "euler", "karras", pos, neg, latent, disable_pbar=True, seed=0)
    assert out.shape == (1, 4, 16, 16) and torch.isfinite(out).all() and out.abs().max() > 0
    image = nodes.VAEDecode().decode(vae, {"samples": out})[0]
    assert image.shape == (1, 128, 128, 3)


def test_a_second_phase_starts_from_a_saved_model_and_records_it(trained, tmp_path):
    """--init-from: the UNet and text encoder start as the saved file's (zero learning rate keeps them), the
    report carries the earlier phase; --layout-bias only changes which timesteps are drawn."""
    from safetensors.torch import load_file

    start = trained["straight"]
    kept = tmp_path / "kept.safetensors"
    train(kept, "--init-from", str(start), "--lr", "0", "--steps", "2")
    a, b = load_file(str(start)), load_file(str(kept))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    report = json.loads(kept.with_suffix(".json").read_text())
    assert report["init_from"] == start.name and report["earlier_phase"]["steps_done"] == 4
    assert report["total_steps"] == 6 and report["steps_done"] == 2
    moved = tmp_path / "moved.safetensors"
    train(moved, "--init-from", str(start), "--steps", "2", "--layout-bias", "2")
    c = load_file(str(moved))
    assert any(not torch.equal(a[k], c[k]) for k in a if k.startswith("model.diffusion_model."))
    assert all(torch.equal(a[k], c[k]) for k in a if k.startswith("cond_stage_model."))  # the encoder stays frozen
    with pytest.raises(AssertionError):  # another UNet size than the file's is refused
        train(tmp_path / "bad.safetensors", "--init-from", str(start), "--channels", "64")


def test_missing_file_says_how_to_train(tmp_path):
    import shapes_model

    with pytest.raises(shapes_model.ShapesModelMissing, match="train_shapes_model.py"):
        shapes_model.load_shapes_model(tmp_path / "nothing.safetensors")
