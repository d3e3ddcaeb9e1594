"""README's main command works as written (smaller sizes to keep the suite fast)."""
import json
import pathlib
import subprocess
import sys

from PIL import Image

REPO = pathlib.Path(__file__).resolve().parents[2]


def test_run_default_writes_an_image_and_a_timing_line(tmp_path, comfy_root):
    out = tmp_path / "relay.png"
    r = subprocess.run([sys.executable, str(REPO / "tools" / "run_default.py"), "--out", str(out), "--size", "128",
                        "--steps", "2", "--relay-steps", "2"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert Image.open(out).size == (256, 256)
    line = next(l for l in r.stdout.splitlines() if l.startswith("wrote "))
    timing = json.loads(line.split("timing: ", 1)[1])
    assert timing["relay_s_per_step"] > 0 and timing["size"] == "128x128 -> 256x256"
