"""Jobs for tests/unit/test_pool.py. They live here, not in the test file, because the workers must
import them by name (`support.pool_jobs`: tests/ is on sys.path in pytest and the pool passes the
controller's sys.path on to its workers)."""
from __future__ import annotations

import os
import time

import torch
import torch.distributed as dist

from hires_parallel.parallel.runtime.protocol import Job, WorkerContext


class UserFacingError(Exception):
    """Stands for an error whose message a node shows to the user as is."""

    user_facing = True


class RankSumJob(Job):
    """Every rank all_reduces its rank: checks the process group, and that rank 0's value comes back."""

    def run(self, ctx: WorkerContext) -> dict:
        t = torch.tensor([ctx.rank], dtype=torch.int64, device=ctx.collective_device)
        dist.all_reduce(t)
        ctx.stats.update(rank=ctx.rank, pid=os.getpid(), world_size=ctx.world_size)
        return {"sum": int(t.item()), "rank": ctx.rank, "world_size": ctx.world_size}


class ProgressJob(Job):
    def __init__(self, steps: int) -> None:
        self.steps = steps

    def run(self, ctx: WorkerContext) -> int:
        for i in range(self.steps):
            ctx.check_cancel()
            ctx.progress(step=i + 1, total=self.steps, preview=torch.full((2, 3), float(i)), rank=ctx.rank)
        return self.steps


class FailOnRankJob(Job):
    """Raises on one rank. `hold`: the other ranks keep calling check_cancel (a collective), so they
    wait forever for the failed rank: the case the pool must not let hang."""

    def __init__(self, rank: int, message: str, user_facing: bool = True, hold: bool = False) -> None:
        self.rank, self.message, self.user_facing, self.hold = rank, message, user_facing, hold

    def run(self, ctx: WorkerContext) -> str:
        if ctx.rank == self.rank:
            raise (UserFacingError if self.user_facing else ValueError)(self.message)
        while self.hold:
            ctx.check_cancel()
            time.sleep(0.02)
        return "ok"


class LoopJob(Job):
    """Loops calling check_cancel and sleeping, reporting each round, for at most `max_s`."""

    def __init__(self, max_s: float = 30.0, sleep_s: float = 0.05) -> None:
        self.max_s, self.sleep_s = max_s, sleep_s

    def run(self, ctx: WorkerContext) -> int:
        rounds, t0 = 0, time.monotonic()
        while time.monotonic() - t0 < self.max_s:
            ctx.check_cancel()
            rounds += 1
            ctx.progress(round=rounds)
            time.sleep(self.sleep_s)
        ctx.stats["rounds"] = rounds
        return rounds


class HangJob(Job):
    """Rank 0 sleeps (silently) far past any test timeout; the other ranks return at once."""

    def run(self, ctx: WorkerContext) -> None:
        if ctx.rank == 0:
            time.sleep(3600)


class ComfySettingsJob(Job):
    """What ComfyUI settings a worker runs with (tests/comfy/test_worker_settings.py)."""

    def run(self, ctx: WorkerContext) -> dict:
        import comfy.cli_args
        import comfy.ldm.modules.attention as attention

        args = comfy.cli_args.args
        return {"use_pytorch_cross_attention": args.use_pytorch_cross_attention,
                "reserve_vram": args.reserve_vram, "cpu": args.cpu,
                "attention": attention.optimized_attention.__name__}


class WeightBackingJob(Job):
    """Bytes of the cached base model's weights whose memory is a mapping of a file (Linux /proc/self/maps),
    and in all (tests/comfy/test_shared_weights.py)."""

    def run(self, ctx: WorkerContext) -> dict:
        ranges = []
        with open("/proc/self/maps") as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 6 and parts[5].endswith(".pt"):
                    lo, hi = (int(x, 16) for x in parts[0].split("-"))
                    ranges.append((lo, hi, parts[5]))
        base = ctx.cache["base_model"][1].model
        mapped = total = 0
        files = set()
        for t in base.state_dict().values():
            n = t.numel() * t.element_size()
            total += n
            ptr = t.data_ptr()
            hit = next((name for lo, hi, name in ranges if lo <= ptr < hi), None)
            if hit:
                mapped += n
                files.add(hit)
        return {"mapped": mapped, "total": total, "files": sorted(files)}
