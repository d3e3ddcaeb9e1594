"""The pure parts import without ComfyUI; ComfyUI-facing parts say what is missing."""
import subprocess
import sys
import textwrap


def _run(code: str, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    import os

    env = {k: v for k, v in os.environ.items() if k != "COMFYUI_PATH"}
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=env, cwd="/")


def test_pure_parts_import_without_comfyui():
    r = _run(
        """
        import sys
        import hires_parallel, hires_parallel.algorithms, hires_parallel.parallel
        assert "comfy" not in sys.modules, "importing the pure parts pulled in ComfyUI"
        print("ok")
        """,
        {"COMFYUI_PATH": "/nonexistent"},
    )
    assert r.returncode == 0, r.stderr
    assert "ok" in r.stdout


def test_nodes_without_comfyui_give_a_clear_message():
    r = _run(
        """
        try:
            import hires_parallel.nodes
        except ImportError as e:
            print(type(e).__name__, e)
        else:
            print("imported")
        """,
        {"COMFYUI_PATH": "/nonexistent"},
    )
    assert "ComfyUINotFound" in r.stdout, r.stdout + r.stderr
    assert "COMFYUI_PATH" in r.stdout
