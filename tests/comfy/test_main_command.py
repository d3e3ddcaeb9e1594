"""README's main command works as written (fewer steps to keep the suite fast), from a clone and from the
pack as the Registry ships it (everything .comfyignore drops left out)."""
import ast
import fnmatch
import json
import os
import pathlib
import shutil
import subprocess
import sys

from PIL import Image

REPO = pathlib.Path(__file__).resolve().parents[2]
FAST = ("--steps", "3", "--relay-steps", "2", "--prompt", "a blue square")


def run_command(script: pathlib.Path, *args: str, cwd=None, env=None) -> tuple[subprocess.CompletedProcess, dict]:
    r = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, timeout=600, cwd=cwd,
                       env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    line = next(l for l in r.stdout.splitlines() if l.startswith("wrote "))
    return r, json.loads(line.split("timing: ", 1)[1])


def run_default(*args: str) -> tuple[subprocess.CompletedProcess, dict]:
    return run_command(REPO / "tools" / "run_default.py", *args)  # the old path: a shim that runs embedded/


def test_run_default_renders_the_shapes_model_on_two_ranks_and_compares_with_one(tmp_path, comfy_root):
    out = tmp_path / "shapes.png"
    _, timing = run_default("--out", str(out), *FAST, "--repeats", "2")
    assert Image.open(out).size == (512, 512)
    assert timing["model"] == "hires_shapes.safetensors" and timing["size"] == "256x256 -> 512x512"
    assert timing["ranks"] == 2 and timing["relay_s_per_step"] > 0 and timing["one_rank_relay_s_per_step"] > 0
    assert timing["repeats"] == 2 and timing["timed"] == "2 repeat(s), interleaved"
    # the ratio of the minima over the interleaved repeats
    assert timing["speedup_relay"] == round(timing["one_rank_relay_s_per_step"] / timing["relay_s_per_step"], 2)
    assert timing["max_abs_diff_vs_one_rank"] < 1e-2  # exact mode: the same image as one rank
    assert isinstance(timing["subjects"], int)


def test_one_repeat_prints_no_speed_up(tmp_path, comfy_root):
    _, timing = run_command(REPO / "embedded" / "run_default.py", "--out", str(tmp_path / "one.png"), *FAST,
                            "--repeats", "1", "--size", "128")
    assert "speedup_relay" not in timing and "speedup_first_pass" not in timing
    assert timing["speedup"].startswith("not measured") and timing["one_rank_relay_s_per_step"] > 0


def test_run_default_says_how_to_train_when_the_model_is_missing(tmp_path, comfy_root):
    out = tmp_path / "fallback.png"
    r, timing = run_default("--out", str(out), "--model", str(tmp_path / "missing.safetensors"), "--size", "128",
                            "--steps", "2", "--relay-steps", "2", "--devices", "1")
    assert "tools/train_shapes_model.py" in r.stderr and "random-weight test model" in r.stderr
    assert timing["model"].startswith("random test model") and Image.open(out).size == (256, 256)
    assert "speedup_relay" not in timing


# ------------------------------------------------------------------ the pack as the Registry ships it


def _comfyignore() -> list[str]:
    lines = (REPO / ".comfyignore").read_text().splitlines()
    return [l.strip() for l in lines if l.strip() and not l.startswith("#")]


def _ignored(rel: str, patterns: list[str]) -> bool:
    parts = rel.split("/")
    for pat in patterns:
        if pat.endswith("/"):  # a folder of that name at any depth
            if pat.rstrip("/") in parts[:-1]:
                return True
        elif fnmatch.fnmatch(parts[-1], pat) or fnmatch.fnmatch(rel, pat):
            return True
    return False


def shipped_files() -> list[str]:
    """The files a Registry install gets: tracked and new (not git-ignored) files minus .comfyignore."""
    r = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                       capture_output=True, text=True, check=True)
    patterns = _comfyignore()
    return sorted(f for f in r.stdout.splitlines() if (REPO / f).is_file() and not _ignored(f, patterns))


def _pack_imports(path: pathlib.Path) -> set[str]:
    """Modules of the pack a file imports (absolute hires_parallel.* and relative), as pack-relative paths."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("hires_parallel"):
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("hires_parallel"))
    return found


def test_the_embedded_model_and_the_main_command_are_shipped():
    shipped = set(shipped_files())
    assert "models/hires_shapes.safetensors" in shipped and "embedded/shapes_model.py" in shipped
    assert "embedded/run_default.py" in shipped and "embedded/__init__.py" in shipped
    for src in ("embedded/shapes_model.py", "embedded/run_default.py"):
        for module in _pack_imports(REPO / src):
            rel = module.split(".", 1)[1].replace(".", "/") if "." in module else ""
            if not rel:
                continue
            candidates = {rel + ".py", rel + "/__init__.py"}
            if not candidates & shipped:  # `from pkg import name` may name a function, not a module
                parent = rel.rsplit("/", 1)[0]
                assert {parent + ".py", parent + "/__init__.py"} & shipped, f"{src} imports {module}: not shipped"
    pyproject = (REPO / "pyproject.toml").read_text()
    assert '"hires_parallel.embedded"' in pyproject and '"models/*"' in pyproject


def test_the_main_command_runs_from_the_pack_as_shipped(tmp_path, comfy_root):
    pack = tmp_path / "custom_nodes_copy" / "hires-parallel"  # not under a ComfyUI: COMFYUI_PATH is used
    for rel in shipped_files():
        dest = pack / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / rel, dest)
    assert not (pack / "tools").exists() and not (pack / "benchmarks").exists() and not (pack / "tests").exists()
    out = tmp_path / "shipped.png"
    env = {**os.environ, "COMFYUI_PATH": comfy_root}
    _, timing = run_command(pack / "embedded" / "run_default.py", "--out", str(out), *FAST, "--size", "128",
                            "--repeats", "1", "--no-compare", cwd=tmp_path, env=env)  # cwd: not the clone
    assert os.path.samefile(timing["pack"], pack), timing["pack"]  # the copy ran, not the clone
    assert timing["model"] == "hires_shapes.safetensors" and Image.open(out).size == (256, 256)
    assert "subjects" not in timing  # benchmarks/metrics.py is not shipped; the command still runs
