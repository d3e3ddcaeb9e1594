"""The benchmark scripts run (tiny sizes); their figures come from full runs, not from tests."""
import json
import pathlib
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[2]


def test_exact_scaling_benchmark_prints_a_table_and_writes_json(tmp_path, comfy_root):
    out = tmp_path / "exact.json"
    r = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_exact_scaling.py"), "--size", "32", "--steps", "2",
                        "--channels", "32", "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "s/step" in r.stdout and "2 ranks x 1 thread" in r.stdout
    rows = json.loads(out.read_text())["rows"]
    assert [row["ranks"] for row in rows] == [1, 1, 2, 2]
    bands = next(row for row in rows if row["config"] == "2 ranks x 1 thread")
    assert bands["bytes_sent_per_step_rank0"]["kv"] > 0 and bands["s_per_step"] > 0
    assert all(row["max_abs_diff_vs_first"] < 1e-2 for row in rows)
