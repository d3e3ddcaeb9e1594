"""Workers on one machine share one copy of the base weights: their parameters are the weight file's
memory-mapped pages (payload.build_model loads with assign=True), not a private copy each. Checked with
where each worker's cached weights live (their storages' file), with the unique memory (USS) printed.""" 
from __future__ import annotations

import sys

import psutil
import pytest
import torch

from support.tiny_models import build_sd15, make_conds


@pytest.fixture(autouse=True)
def _pool_stopped_after():
    yield
    from hires_parallel.parallel.runtime.pool import shutdown_pool

    shutdown_pool()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")
def test_workers_map_the_weight_file_instead_of_copying_it(comfy_root):
    import nodes

    from hires_parallel.nodes.parallel_sampler import HiResParallelPatchParallelKSampler
    from hires_parallel.parallel.runtime.pool import current_pool

    model = build_sd15(seed=2, model_channels=128)  # about 100 MB of fp32 weights: visible against the rest
    weights = sum(t.numel() * t.element_size() for t in model.model.state_dict().values())
    conds = make_conds(model, seed=1)
    latent = {"samples": torch.zeros(1, 4, 16, 16)}
    from hires_parallel.parallel.runtime.pool import get_pool
    from support.pool_jobs import ComfySettingsJob, WeightBackingJob

    get_pool(["cpu", "cpu"]).run(ComfySettingsJob())  # workers with ComfyUI imported, no model yet
    before = {pid: psutil.Process(pid).memory_full_info() for pid in current_pool().pids}
    out = HiResParallelPatchParallelKSampler.execute(model, 1, 1, 5.0, "euler", "normal", conds[0], conds[1], latent,
                                                     1.0, 2, "cpu", "exact", "off").result[0]["samples"]
    ref = nodes.common_ksampler(model, 1, 1, 5.0, "euler", "normal", conds[0], conds[1], latent)[0]["samples"]
    assert (out - ref).abs().max() <= 1e-4 * ref.abs().max()  # a smoke check; exactness is tested elsewhere
    assert list(before) == current_pool().pids  # the same workers ran the job
    backing = get_pool(["cpu", "cpu"]).run(WeightBackingJob()).value  # rank 0's cached base model
    print(f"\n[shared weights] rank 0: {backing['mapped'] / 2**20:.1f} of {backing['total'] / 2**20:.1f} MiB mapped "
          f"from {backing['files']}")
    assert backing["mapped"] == backing["total"] >= weights and len(backing["files"]) == 1
    mem = {pid: psutil.Process(pid).memory_full_info() for pid in current_pool().pids}
    grown = {pid: (mem[pid].uss - before[pid].uss) / 2**20 for pid in mem}
    shared = {pid: (mem[pid].shared - before[pid].shared) / 2**20 for pid in mem}
    print(f"\n[shared weights] weights {weights / 2**20:.0f} MiB; per worker, unique memory grown by (MiB) {grown}, "
          f"shared memory grown by (MiB) {shared}")
    # Printed for the reader (allocator and import noise make these loose): measured here, unique memory grew by
    # about 160 MiB per worker with mapped weights against 258 MiB with a private copy (100 MiB of weights).
