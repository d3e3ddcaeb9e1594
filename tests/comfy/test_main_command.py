"""README's main command works as written (fewer steps to keep the suite fast)."""
import json
import pathlib
import subprocess
import sys

from PIL import Image

REPO = pathlib.Path(__file__).resolve().parents[2]


def run_default(*args: str) -> tuple[subprocess.CompletedProcess, dict]:
    r = subprocess.run([sys.executable, str(REPO / "tools" / "run_default.py"), *args], capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    line = next(l for l in r.stdout.splitlines() if l.startswith("wrote "))
    return r, json.loads(line.split("timing: ", 1)[1])


def test_run_default_renders_the_shapes_model_on_two_ranks_and_compares_with_one(tmp_path, comfy_root):
    out = tmp_path / "shapes.png"
    _, timing = run_default("--out", str(out), "--steps", "3", "--relay-steps", "2", "--prompt", "a blue square")
    assert Image.open(out).size == (512, 512)
    assert timing["model"] == "hires_shapes.safetensors" and timing["size"] == "256x256 -> 512x512"
    assert timing["ranks"] == 2 and timing["relay_s_per_step"] > 0 and timing["one_rank_relay_s_per_step"] > 0
    assert timing["speedup_relay"] == round(timing["one_rank_relay_s_per_step"] / timing["relay_s_per_step"], 2)
    assert timing["max_abs_diff_vs_one_rank"] < 1e-2  # exact mode: the same image as one rank
    assert isinstance(timing["subjects"], int)


def test_run_default_says_how_to_train_when_the_model_is_missing(tmp_path, comfy_root):
    out = tmp_path / "fallback.png"
    r, timing = run_default("--out", str(out), "--model", str(tmp_path / "missing.safetensors"), "--size", "128",
                            "--steps", "2", "--relay-steps", "2", "--devices", "1")
    assert "tools/train_shapes_model.py" in r.stderr and "random-weight test model" in r.stderr
    assert timing["model"].startswith("random test model") and Image.open(out).size == (256, 256)
    assert "speedup_relay" not in timing
