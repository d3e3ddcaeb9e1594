"""Exact mode with overlapped exchanges, and the per-layer trace, on spawned gloo ranks.

Overlapped (the default) and blocking exact runs of the same cases both equal single-device ComfyUI sampling
to float rounding: max |parallel - single| <= 1e-5 x max |single| (the tolerance of the exactness tests, see
test_unet_parallel.py; measured here: printed per case, 0 to 3.2e-6 relative). The trace shows what moved: the
same bytes by kind either way (K/V: fewer with uneven bands, no padding), the K/V and conv halos in the background with the time they travelled while
the rank computed, GroupNorm statistics and the output gather blocking.
"""
from __future__ import annotations

from typing import Any

import pytest
import torch

from support import overlap_cases as oc
from support.gloo import spawn_run

TOL_REL = 1e-5
_REFS: dict[str, torch.Tensor] = {}


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[int, list[dict[Any, Any]]]:
    return {w: spawn_run(oc.run_world, w, tmp_path_factory.mktemp(f"overlap{w}"), 200) for w in oc.CASES}


def reference(c: dict[str, Any]) -> torch.Tensor:
    if c["name"] not in _REFS:
        _REFS[c["name"]] = oc.sample_case(oc.build_model(c), c)
    return _REFS[c["name"]]


def _events(trace: dict, **match: Any) -> list[dict]:
    return [e for e in trace["events"] if all(e.get(k) == v for k, v in match.items())]


@pytest.mark.parametrize("world", sorted(oc.CASES))
def test_overlapped_and_blocking_exact_match_single_device(runs, one_thread, world: int) -> None:
    for c in oc.CASES[world]:
        ref = reference(c)
        scale = ref.abs().max().item()
        for overlap in (True, False):
            for rank, res in enumerate(runs[world]):
                err = (res[(c["name"], overlap)]["out"] - ref).abs().max().item()
                print(f"{c['name']} overlap={overlap} rank {rank}: max err {err:.3g} ({err / scale:.2g} relative)")
                assert err <= TOL_REL * scale, (c["name"], overlap, rank, err, scale)


@pytest.mark.parametrize("world", sorted(oc.CASES))
def test_trace_shows_what_the_overlap_hid(runs, world: int) -> None:
    from hires_parallel.parallel.split.trace import summarize

    for c in oc.CASES[world]:
        for rank, res in enumerate(runs[world]):
            over, block = res[(c["name"], True)], res[(c["name"], False)]
            # the same data moves either way; the gathered K/V pads uneven bands to the largest (gloo wants
            # equal shapes), the overlapped point-to-point exchange sends each band's own size
            for key in ("bytes_sent", "bytes_received"):
                o, b = over["stats"][key], block["stats"][key]
                assert set(o) == set(b) and all(o[k] == b[k] for k in o if k != "kv"), (c["name"], key)
                assert 0 < o["kv"] <= b["kv"], (c["name"], key)
            # blocking: every exchange blocks; overlapped: K/V (and UNet halos) travel in the background
            assert not _events(block["trace"], blocking=False), c["name"]
            kv = _events(over["trace"], kind="kv")
            assert kv and all(not e["blocking"] and "in_flight_s" in e for e in kv), c["name"]
            assert all(e["sent"] > 0 and e["layer"] for e in kv)
            if c["kind"] == "unet":
                halos = _events(over["trace"], kind="halo")
                assert halos and all(not e["blocking"] for e in halos), c["name"]
                assert all(e["blocking"] for e in _events(over["trace"], kind="groupnorm"))
                assert any(".attn1" in e["layer"] for e in kv)
                assert any(e["layer"].endswith("in_layers.2") for e in halos)
            s_over, s_block = summarize(over["trace"]), summarize(block["trace"])
            assert s_over["per_step"]["hidden_s"] > 0 and s_block["per_step"]["hidden_s"] == 0
            assert 0 < s_over["per_step"]["sent"] <= s_block["per_step"]["sent"]
            assert s_over["per_step"]["background"] > 0 and s_block["per_step"]["background"] == 0
            steps = {e["step"] for e in over["trace"]["events"]}
            assert steps == set(range(c["steps"])), (c["name"], steps)
            print(f"{c['name']} rank {rank}: per step overlapped {s_over['per_step']}, blocking {s_block['per_step']}")


def test_trace_is_off_by_default() -> None:
    from hires_parallel.parallel.split.layout import ParallelPlan
    from hires_parallel.parallel.split.unet_parallel import BandParallelRuntime

    rt = BandParallelRuntime(ParallelPlan(1, False), 0, 4)
    assert rt.stats.trace is None and rt.overlap


def test_trace_tool_writes_json_and_a_timeline(tmp_path, comfy_root) -> None:
    """tools/trace_timeline.py: a traced 2-rank run as JSON (every exchange of both ranks) and a PNG with one row
    per rank; --from-json draws the saved trace again."""
    import json
    import pathlib
    import subprocess
    import sys

    from PIL import Image

    tool = pathlib.Path(__file__).resolve().parents[2] / "tools" / "trace_timeline.py"
    out = tmp_path / "trace"
    r = subprocess.run([sys.executable, str(tool), "--model", "test", "--size", "256", "--steps", "2", "--out", str(out)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    data = json.loads(out.with_suffix(".json").read_text())
    assert sorted(t["rank"] for t in data["traces"]) == [0, 1] and data["overlap"]
    for t in data["traces"]:
        kinds = {e["kind"] for e in t["events"]}
        assert {"halo", "groupnorm", "kv", "output"} <= kinds, kinds
        assert {c["step"] for c in t["calls"]} == {0, 1}
    assert "per step" in r.stdout and len(data["summary"]) == 2
    assert Image.open(out.with_suffix(".png")).size[1] > 60
    again = tmp_path / "again"
    r = subprocess.run([sys.executable, str(tool), "--from-json", str(out.with_suffix(".json")), "--out", str(again)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and again.with_suffix(".png").exists(), r.stderr[-2000:]
