"""The benchmark scripts run (tiny sizes); their figures come from full runs, not from tests."""
import json
import pathlib
import subprocess
import sys

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[2]


def test_exact_scaling_benchmark_prints_a_table_and_writes_json(tmp_path, comfy_root):
    out = tmp_path / "exact.json"
    r = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_exact_scaling.py"), "--size", "32", "--steps", "2",
                        "--channels", "32", "--repeats", "1", "--out", str(out)], capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "s/step" in r.stdout and "wait/step" in r.stdout and "exact overlapped" in r.stdout
    rows = json.loads(out.read_text())["rows"]
    assert [row["ranks"] for row in rows] == [1, 1, 2, 2, 2]
    for label in ("2 ranks x 1 thread, exact overlapped", "2 ranks x 1 thread, exact blocking"):
        bands = next(row for row in rows if row["config"] == label)
        assert bands["bytes_sent_per_step_rank0"]["kv"] > 0 and bands["s_per_step"] > 0
        assert bands["wait_s_per_step"] > 0
    assert all(row["max_abs_diff_vs_first"] < 1e-2 for row in rows)


def test_parataa_benchmark_prints_a_table_and_writes_json(tmp_path, comfy_root):
    out = tmp_path / "parataa.json"
    r = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_parataa.py"), "--steps", "3", "--size", "8",
                        "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "rounds m=2" in r.stdout and "trained model will follow" in r.stdout
    data = json.loads(out.read_text())
    (row,) = data["rows"]
    assert row["steps"] == 3 and 1 <= row["taa"]["rounds"] <= 3 and row["taa"]["converged"]
    assert row["warm_same"]["warm_start"] and row["warm_same"]["rounds"] <= 2
    assert row["taa"]["rel_diff_vs_euler"] < 1e-2 and row["sequential_s"] > 0


def test_asg_benchmark_prints_a_table_and_writes_json(tmp_path, comfy_root):
    out = tmp_path / "asg.json"
    r = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_asg.py"), "--native", "64", "--scale", "2",
                        "--steps", "2", "--channels", "32", "--out", str(out)], capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "s/step" in r.stdout and "ASG, 2 ranks x 1 thread" in r.stdout
    rows = json.loads(out.read_text())["rows"]
    assert [row["method"] for row in rows] == ["plain", "plain", "asg sync", "asg sync", "asg sync", "asg async"]
    two = next(row for row in rows if row["config"] == "ASG, 2 ranks x 1 thread")
    assert two["ranks"] == 2 and two["bytes_sent_per_step_rank0"]["batch"] > 0 and two["s_per_step"] > 0
    # the split changes rounding only: within 32 x the reference path's measured float noise (the larger of cfg
    # one ulp off and 2 threads instead of 1; floor: 8 ulps). Measured: 2 ranks 4.9e-3, noise 6.2e-3 (threads).
    noise = json.loads(out.read_text())["float_noise_asg_1rank_1thread"]
    tol = max(32 * noise, 8 * float(np.spacing(np.float32(two["max_abs"]))))
    print(f"\n[asg bench] 2 ranks vs 1: {two['max_abs_diff_vs_asg_1rank_1thread']:.3g}, noise {noise:.3g}, tol {tol:.3g}")
    assert 0 < noise and two["max_abs_diff_vs_asg_1rank_1thread"] <= tol


def test_modes_benchmark_prints_tables_and_writes_json(tmp_path, comfy_root):
    out = tmp_path / "modes.json"
    r = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_modes.py"), "--steps", "3", "--worlds", "1,2,64",
                        "--families", "sd15", "--sd-size", "24", "--channels", "32", "--out", str(out)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "MEASURED" in r.stdout and "ANALYTIC" in r.stdout and "skipped: sd15 64 ranks" in r.stdout
    data = json.loads(out.read_text())
    measured = [row for row in data["measured"] if "skipped" not in row]
    assert [(row["ranks"], row["mode"]) for row in measured] == [
        (1, "single device"), (1, "single device"), (2, "exact"), (2, "displaced"), (2, "partial")]
    by_mode = {row["mode"]: row for row in measured if row["ranks"] == 2}
    assert by_mode["exact"]["psnr_db"] > 100  # exact: float rounding only
    assert by_mode["displaced"]["steady_steps"] == 2 and by_mode["displaced"]["warmup"] == 1
    assert by_mode["partial"]["sent_per_step_rank0"]["kv"] < by_mode["displaced"]["sent_per_step_rank0"]["kv"]
    # The analytic table reproduces METHODS.md's SDXL K/V volume per CFG branch: 1.68 GB at 2048^2, 6.71 at 4096^2.
    vol = {row["pixels"]: row["kv_volume_per_call"] for row in data["analytic_sdxl"]}
    assert abs(vol[2048] / 1e9 - 1.68) < 0.01 and abs(vol[4096] / 1e9 - 6.71) < 0.01
    assert {(row["pixels"], row["n"], row["mode"]) for row in data["analytic_sdxl"]} == {
        (p, n, m) for p in (2048, 4096) for n in (2, 4, 8) for m in ("exact", "displaced", "partial")}


def test_repetition_benchmark_counts_subjects_and_compares_parallel_modes(tmp_path, comfy_root):
    """Tiny settings on the trained shapes model (models/hires_shapes.safetensors), held out (--seed-offset 3):
    every method runs, the table and JSON are written with the seeds and prompts used and the background
    texture columns, exact parallel modes match the single-device pass."""
    import pytest

    out, grid = tmp_path / "repetition.json", tmp_path / "grid.png"
    r = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_repetition.py"), "--seeds", "2", "--scales", "1,2",
                        "--seed-offset", "3", "--steps", "3", "--relay-steps", "2", "--modes", "exact,batch",
                        "--out", str(out), "--grid", str(grid), "--grid-seeds", "1", "--cell", "64"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "structure guidance: " in r.stdout and "PSNR min" in r.stdout
    assert "bg tex" in r.stdout and "vs 1x" in r.stdout and "vs plain" in r.stdout
    # held out: seeds 3 and 4, and with the built-in prompts seed s gets pair s mod 12 (3: green circle, 4: green square)
    assert "seeds (HELD OUT): 3..4 (--seed-offset 3)" in r.stdout, r.stdout
    assert "a green circle, a green square" in r.stdout
    result = json.loads(out.read_text())
    settings = result["settings"]
    assert settings["seeds"] == [3, 4] and settings["seed_offset"] == 3 and settings["held_out"] is True
    assert settings["prompts"] == ["a green circle", "a green square"] and settings["colors"] == ["green", "green"]
    assert settings["prompt_source"].startswith("built-in")
    assert settings["metrics"]["background_texture"]["edge_margin_px"] > 0
    rows = {(row["method"], row["scale"]): row for row in result["rows"]}
    expected = {("plain", 1), ("plain", 2), ("deep shrink", 2), ("relay", 2), ("parallel exact", 1), ("parallel exact", 2),
                ("parallel batch", 1), ("parallel batch", 2)}
    assert expected <= set(rows)
    assert (("structure guidance", 2) in rows) == result["structure_guidance"].startswith("included")
    assert any(row["seam_max"] is not None for row in rows.values())
    if ("structure guidance", 2) in rows:  # with its paired reference: native runs from the key view's noise
        assert rows[("native from key view", 2)]["pixels"] == 256
        assert rows[("structure guidance", 2)]["size_vs_native_same_noise"] is not None
    for (method, scale), row in rows.items():
        native_row = method == "native from key view"
        assert row["images"] == 2 and row["pixels"] == 256 * (1 if native_row else scale) and row["mean_count"] >= 0
        assert 0.0 <= row["mean_size"] <= 1.0 and 0.0 <= row["exactly_one"] <= 1.0
        if native_row:  # 3 steps from noise at 256 px: specks everywhere may leave no background to measure
            continue
        assert row["bg_texture"] is not None and row["bg_texture"] >= 0.0, row
        assert row["bg_texture_vs_1x"] is not None and row["bg_texture_vs_1x"] > 0, row
        assert row["bg_texture_vs_data"] is not None and row["bg_texture_vs_data"] > 0, row
        assert row["seam_max"] is None or row["seam_max"] > 0, row  # None: no background pixel on a grid line
        native_size = rows[("plain", 1)]["mean_size"]
        if native_size > 0.01:  # the ratio of the rounded shares, up to their rounding
            assert row["size_vs_1x"] == pytest.approx(row["mean_size"] / native_size, rel=0.02, abs=1e-3), row
        assert row["bg_texture_vs_plain"] is not None and row["bg_texture_vs_plain"] > 0, row
        if method.startswith("parallel"):
            assert row["psnr_min_db"] == "inf" or row["psnr_min_db"] > 60, row  # float rounding only
            reference = rows[("plain", 1) if scale == 1 else ("relay", scale)]
            assert abs(row["bg_texture"] / reference["bg_texture"] - 1) < 0.05, (row, reference)
    assert rows[("plain", 1)]["bg_texture_vs_1x"] == rows[("plain", 1)]["bg_texture_vs_plain"] == 1.0
    assert rows[("plain", 2)]["bg_texture_vs_plain"] == 1.0
    assert rows[("relay", 2)]["bg_texture_vs_1x"] == pytest.approx(
        rows[("relay", 2)]["bg_texture_vs_plain"] * rows[("plain", 2)]["bg_texture_vs_1x"], rel=0.02)
    per_image = result["per_image"]
    assert len(per_image) == 2 * len(rows) and {p["seed"] for p in per_image} == {3, 4}
    assert all({"bg_texture", "bg_texture_vs_1x", "bg_texture_vs_plain"} <= set(p) for p in per_image)
    from PIL import Image

    assert Image.open(grid).size[0] > 2 * 64  # two columns (scales 1, 2) of 64-pixel cells plus labels
    # --prompts (no run needed): the i-th seed gets prompt i mod their number; each must name one colour
    sys.path.insert(0, str(REPO / "benchmarks"))
    import bench_repetition

    seeds, prompts, colors, source = bench_repetition.seeds_and_prompts(3, 7, "a blue triangle, a yellow circle")
    assert seeds == [7, 8, 9] and prompts == ["a blue triangle", "a yellow circle", "a blue triangle"]
    assert colors == ["blue", "yellow", "blue"] and source.startswith("--prompts")
    assert bench_repetition.seeds_and_prompts(2, 0, "")[1] == ["a red circle", "a red square"]  # the defaults
    for bad in (["--prompts", "a purple circle"], ["--prompts", "a red and blue circle"], ["--seed-offset", "-1"]):
        with pytest.raises(SystemExit):
            bench_repetition.parse_args(bad)

def test_dit_benchmark_prints_tables_and_writes_json(tmp_path, comfy_root):
    out = tmp_path / "dit.json"
    r = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_dit.py"), "--size", "16", "--hidden", "64",
                        "--steps", "3", "--repeat", "1", "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "MEASURED" in r.stdout and "ANALYTIC" in r.stdout and "xDiT published" in r.stdout
    data = json.loads(out.read_text())
    by = {row["mode"]: row for row in data["measured"] if row["ranks"] == 2}
    assert set(by) == {"gathered_kv", "ulysses", "displaced", "partial"}
    assert by["gathered_kv"]["attention"] == ["gathered_kv"] and by["ulysses"]["attention"] == ["ulysses"]
    assert by["gathered_kv"]["psnr_db"] > 100 and by["ulysses"]["psnr_db"] > 100  # exact: float rounding only
    assert by["partial"]["sent_per_step_rank0"]["kv"] < by["displaced"]["sent_per_step_rank0"]["kv"]
    # Flux.1-dev at 2048^2 on 2 devices, gathered K/V: 57 layers x 8192 tokens x 2 x 3072 x 2 bytes
    flux = next(row for row in data["analytic"] if row["model"] == "Flux.1-dev" and row["image"] == "2048^2"
                and row["n"] == 2 and row["mode"] == "gathered_kv")
    assert flux["sent"]["kv"] == 57 * 8192 * 2 * 3072 * 2
    wan = {row["n"]: row["axis"] for row in data["analytic"] if row["model"] == "Wan 2.2 14B"}
    assert set(wan) == {2, 4, 8}
