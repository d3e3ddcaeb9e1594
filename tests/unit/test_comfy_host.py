"""comfy_host.find_comfyui: the ComfyUI that contains the pack, then COMFYUI_PATH, then the default folder."""
from __future__ import annotations

import pathlib
import subprocess

import pytest

from hires_parallel import comfy_host

REPO = pathlib.Path(__file__).resolve().parents[2]


def _comfy(root: pathlib.Path) -> pathlib.Path:
    (root / "comfy").mkdir(parents=True)
    (root / "main.py").write_text("")
    return root


@pytest.fixture()
def no_default(monkeypatch, tmp_path):
    monkeypatch.setattr(comfy_host, "DEFAULT_COMFYUI_PATH", str(tmp_path / "no-default-here"))


def test_the_comfyui_containing_the_pack_comes_first(tmp_path, no_default):
    outer = _comfy(tmp_path / "ComfyUI")
    pack = outer / "custom_nodes" / "hires-parallel"
    pack.mkdir(parents=True)
    other = _comfy(tmp_path / "other")
    assert comfy_host.find_comfyui(str(pack), env=str(other)) == str(outer)  # before COMFYUI_PATH
    assert comfy_host.find_comfyui(str(pack), env="") == str(outer)
    assert comfy_host.containing_comfyui(str(pack)) == str(outer)


def test_then_comfyui_path_then_the_default(tmp_path, monkeypatch):
    clone = tmp_path / "clone"  # a pack cloned outside any ComfyUI
    clone.mkdir()
    env = _comfy(tmp_path / "elsewhere")
    default = _comfy(tmp_path / "default")
    monkeypatch.setattr(comfy_host, "DEFAULT_COMFYUI_PATH", str(default))
    assert comfy_host.containing_comfyui(str(clone)) is None
    assert comfy_host.find_comfyui(str(clone), env=str(env)) == str(env)
    assert comfy_host.find_comfyui(str(clone), env="") == str(default)  # the last resort
    # a COMFYUI_PATH that is no ComfyUI is reported (None -> HOW_TO), not silently replaced by the default
    assert comfy_host.find_comfyui(str(clone), env=str(tmp_path / "nothing")) is None
    monkeypatch.setattr(comfy_host, "DEFAULT_COMFYUI_PATH", str(tmp_path / "gone"))
    assert comfy_host.find_comfyui(str(clone), env="") is None


def test_a_custom_nodes_folder_without_comfyui_is_not_taken(tmp_path, no_default):
    pack = tmp_path / "notcomfy" / "custom_nodes" / "pack"  # no main.py / comfy/ above custom_nodes
    pack.mkdir(parents=True)
    assert comfy_host.containing_comfyui(str(pack)) is None
    assert comfy_host.find_comfyui(str(pack), env="") is None


def test_the_message_gives_the_order_and_speaks_of_the_pack_and_comfyui_only():
    how = comfy_host.HOW_TO
    assert how.index("custom_nodes") < how.index("COMFYUI_PATH") < how.index(comfy_host.DEFAULT_COMFYUI_PATH)
    assert "shared" not in how and "tools" not in how


def test_ci_run_says_the_same_order_and_no_workplace_folders(tmp_path):
    text = (REPO / ".ci" / "run").read_text()
    assert "/work/shared" not in text and "../shared" not in text and "tools/" not in text
    if comfy_host.containing_comfyui() is not None:  # inside a ComfyUI, .ci/run would go on and run everything
        pytest.skip("this pack sits in a ComfyUI's custom_nodes: .ci/run finds that ComfyUI")
    r = subprocess.run(["bash", str(REPO / ".ci" / "run")], capture_output=True, text=True, timeout=60,
                       env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "COMFYUI_PATH": str(tmp_path / "none")})
    assert r.returncode == 2, r.stderr
    msg = r.stderr
    assert "custom_nodes" in msg and "COMFYUI_PATH" in msg and "git clone" in msg
    assert "shared" not in msg and "fetch" not in msg
