"""The pack loads the way ComfyUI loads custom nodes: by path, under a path-derived module name."""
from __future__ import annotations

import asyncio
import pathlib
import sys

REPO = pathlib.Path(__file__).resolve().parents[2]

EXPECTED_NODES = {
    "HiResParallelBlockNoise",
    "HiResParallelRelayUpscaleLatent",
    "HiResParallelRelaySigmas",
    "HiResParallelLinearRelaySampler",
    "HiResParallelRelayUpscaleSampler",
    "HiResParallelPatchParallelKSampler",
    "HiResParallelPatchParallelGuider",
    "HiResParallelPoolStatus",
    "HiResParallelPoolShutdown",
    "HiResParallelStructureGuidedHiRes",
    "HiResParallelParaTAASampler",
    "HiResParallelCoopGuider",
    "HiResParallelTimeDecoupledGuider",
}


def test_comfyui_loader_lists_our_nodes(tmp_path):
    import nodes  # ComfyUI's own nodes.py (the loader lives there)

    folder = tmp_path / "custom_nodes" / "ComfyUI-HiRes.Parallel"  # a dot, as in many real pack folders
    folder.parent.mkdir()
    folder.symlink_to(REPO, target_is_directory=True)
    before = set(nodes.NODE_CLASS_MAPPINGS)
    ok = asyncio.run(nodes.load_custom_node(str(folder)))
    assert ok, "ComfyUI's loader refused the pack (see the log above)"
    added = set(nodes.NODE_CLASS_MAPPINGS) - before
    assert EXPECTED_NODES <= added, f"missing: {EXPECTED_NODES - added}"
    assert all(n.startswith("HiResParallel") for n in added)
    # Every node has a display name, a category and a tooltip on every input.
    for node_id in EXPECTED_NODES:
        cls = nodes.NODE_CLASS_MAPPINGS[node_id]
        schema = cls.GET_SCHEMA()
        assert nodes.NODE_DISPLAY_NAME_MAPPINGS[node_id] == schema.display_name
        assert schema.category and schema.description
        for inp in schema.inputs:
            assert inp.tooltip, (node_id, inp.id)
    # The web folder is registered under the folder's own name.
    web = nodes.EXTENSION_WEB_DIRS.get("ComfyUI-HiRes.Parallel")
    assert web is not None and pathlib.Path(web).resolve() == REPO / "web"
    # The module was loaded under ComfyUI's path-derived name, and is reachable as hires_parallel too.
    sys_name = str(folder).replace(".", "_x_")
    assert sys_name in sys.modules
    assert "hires_parallel" in sys.modules
