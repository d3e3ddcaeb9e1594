"""The per-device memory estimate of a parallel plan (parallel/split/memory_plan.py) and the preflight refusal.

No ComfyUI: UNet layouts are written out or walked from a small module tree shaped like openaimodel's
(the comfy layer walks a real UNet: tests/comfy/test_displaced_modes.py). The stale part of the estimate
is checked against the same formula that tests/unit/test_stale_engine.py checks the engine's buffers with.
"""
from __future__ import annotations

import pytest
import torch

from hires_parallel.parallel.split import memory_plan as mp
from hires_parallel.parallel.split.layout import split_rows
from support import stale_engine_cases as sc

# SD1.5-like: attention at factors 1, 2, 4 (two layers each on the way down, three up), 320/640/1280 channels.
SD15 = mp.UNetLayout(
    attn=[(1, 320)] * 5 + [(2, 640)] * 5 + [(4, 1280)] * 5 + [(8, 1280)],
    convs=[(1, 320)] * 12 + [(2, 640)] * 12 + [(4, 1280)] * 12 + [(8, 1280)] * 10,
    groupnorms=[(1, 32)] * 20 + [(2, 32)] * 20 + [(4, 32)] * 20 + [(8, 32)] * 12,
    skips=[(1, 320)] * 3 + [(2, 320), (2, 640), (2, 640), (4, 640), (4, 1280), (4, 1280)] + [(8, 1280)] * 3,
    levels=3,
)
GIB = 1024 ** 3


def est(**kw):
    base = dict(weights_bytes=int(1.7 * GIB), latent_shape=(1, 4, 256, 256), dtype=torch.float16, world=4,
                bands=4, cfg_parallel=False, mode="displaced", layout=SD15, fraction=0.3)
    base.update(kw)
    return mp.estimate_plan(**base)


def test_categories_and_total() -> None:
    e = est()
    assert set(e) >= {"weights", "activations", "exchange", "stale", "total"}
    assert e["total"] == e["weights"] + e["activations"] + e["exchange"] + e["stale"]
    assert e["weights"] == int(1.7 * GIB) and min(e["activations"], e["exchange"], e["stale"]) > 0
    assert est(mode="exact")["stale"] == 0 and est(world=1, bands=1)["stale"] == 0


def test_monotonic_in_image_size() -> None:
    for mode in ("exact", "displaced", "partial", "batch"):
        sizes = [est(mode=mode, latent_shape=(1, 4, s, s))["total"] for s in (64, 128, 256, 512)]
        assert sizes == sorted(sizes) and len(set(sizes)) == 4, (mode, sizes)
        batches = [est(mode=mode, latent_shape=(b, 4, 128, 128))["total"] for b in (1, 2, 4)]
        assert batches == sorted(batches) and len(set(batches)) == 3, (mode, batches)


def test_more_devices_never_need_more_per_device() -> None:
    for mode in ("exact", "displaced", "partial"):
        for part in ("activations", "total"):
            per = [est(mode=mode, world=n, bands=n)[part] for n in (2, 4, 8)]
            assert per[0] >= per[1] >= per[2], (mode, part, per)
    # partial: an inner band's neighbour windows shrink with the bands (with 2 bands each band has one
    # neighbour, so 2 and 4 bands keep about the same); displaced keeps one image's K/V per layer at any N
    part_stale = [est(mode="partial", world=n, bands=n)["stale"] for n in (2, 4, 8)]
    assert part_stale[1] > part_stale[2] and abs(part_stale[0] - part_stale[1]) < 0.1 * part_stale[1]
    disp_kv = [est(mode="displaced", world=n, bands=n, layout=mp.UNetLayout(attn=SD15.attn, levels=3))["stale"]
               for n in (2, 4, 8)]
    assert disp_kv[0] == disp_kv[1] == disp_kv[2]


def test_monotonic_in_fraction_and_mode_order() -> None:
    stale = [est(mode="partial", fraction=f)["stale"] for f in (0.1, 0.3, 0.6, 1.0)]
    assert stale == sorted(stale) and len(set(stale)) == 4
    assert est(mode="exact")["stale"] == 0 < est(mode="partial")["stale"] < est(mode="displaced")["stale"]
    # early / late fractions: sized for the larger one
    assert est(mode="partial", fraction=0.1, fraction_late=0.6)["stale"] == est(mode="partial", fraction=0.6)["stale"]
    assert est(mode="partial", fraction=0.6, fraction_late=0.1)["stale"] == est(mode="partial", fraction=0.6)["stale"]


def test_cfg_parallel_halves_the_call_batch() -> None:
    whole, split = est(world=4, bands=4), est(world=4, bands=2, cfg_parallel=True)
    assert whole["call_batch"] == 2 and split["call_batch"] == 1
    assert est(has_negative=False)["call_batch"] == 1


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("mode", ["displaced", "partial"])
def test_stale_part_is_the_engine_kept_bytes_formula(world: int, mode: str) -> None:
    """One self-attention layer at full resolution, K/V of D channels, float64: the estimate's stale part
    is what the engine keeps on the tallest band (test_stale_engine checks the engine against kv_formula)."""
    layout = mp.UNetLayout(attn=[(1, sc.D)], levels=1)
    e = mp.estimate_plan(weights_bytes=0, latent_shape=(1, 4, sc.ROWS, sc.WIDTH), dtype=torch.float64, world=world,
                         bands=world, cfg_parallel=False, mode=mode, layout=layout, fraction=sc.FRACTION,
                         has_negative=False)
    bands = split_rows(sc.ROWS, world, 2)
    heights = [e_ - s for s, e_ in bands]
    for rank in range(world):
        want = sc.kv_formula(world, rank, bands, mode)
        got = mp.kv_kept_bytes(mode, heights, rank, sc.WIDTH, sc.D, 1, 8, sc.FRACTION)
        assert got == {k: want[k] for k in ("stale", "send", "total")}, (rank, got, want)
    me = max(range(world), key=lambda j: (heights[j], 0 < j < world - 1))
    assert e["stale"] == sc.kv_formula(world, me, bands, mode)["total"]
    if mode == "displaced":  # one image's K/V per layer: (N-1)/N stale + 1/N in flight
        assert e["stale"] == sc.kv_formula(world, me, bands, mode)["full"]


def test_check_plan_fits_message_says_what_to_change() -> None:
    e = est()
    mp.check_plan_fits(e, {"cuda:0": e["total"] + 1, "cuda:1": 80 * GIB})
    with pytest.raises(mp.MemoryPlanError) as info:
        mp.check_plan_fits(e, {"cuda:0": 80 * GIB, "cuda:1": 512 * 1024 ** 2})
    msg = str(info.value)
    assert info.value.user_facing and isinstance(info.value, ValueError)
    assert "cuda:1" in msg and "512.0 MiB free" in msg and mp._gib(e["total"]) in msg
    for word in ("stale", "weights", "partial", "exact", "more devices", "smaller image"):
        assert word in msg, (word, msg)
    msg = pytest.raises(mp.MemoryPlanError, mp.check_plan_fits, est(mode="partial"), [1024]).value.args[0]
    assert "smaller partial_fraction" in msg


# ------------------------------------------------------------------------------------ the UNet walk
class Downsample(torch.nn.Module):
    def __init__(self, ch: int) -> None:
        super().__init__()
        self.op = torch.nn.Conv2d(ch, ch, 3, stride=2, padding=1)
        self.out_channels = ch


class Upsample(torch.nn.Module):
    def __init__(self, ch: int) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(ch, ch, 3, padding=1)
        self.out_channels = ch


class Res(torch.nn.Module):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.norm = torch.nn.GroupNorm(2, cin)
        self.conv = torch.nn.Conv2d(cin, cout, 3, padding=1)
        self.skip = torch.nn.Conv2d(cin, cout, 1)
        self.out_channels = cout


class Block(torch.nn.Module):
    def __init__(self, inner: int, self_attn: bool = True) -> None:
        super().__init__()
        self.attn1 = torch.nn.Module()
        self.attn1.to_k = torch.nn.Linear(inner, inner, bias=False)
        self.disable_self_attn = not self_attn


class Transformer(torch.nn.Module):
    def __init__(self, ch: int, blocks: int = 1, self_attn: bool = True) -> None:
        super().__init__()
        self.transformer_blocks = torch.nn.ModuleList([Block(ch, self_attn) for _ in range(blocks)])


class TinyUNet(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.model_channels = 4
        seq = torch.nn.Sequential
        self.input_blocks = torch.nn.ModuleList([
            seq(torch.nn.Conv2d(4, 4, 3, padding=1)),
            seq(Res(4, 4)),
            seq(Downsample(4)),
            seq(Res(4, 8), Transformer(8, blocks=2)),
            seq(Res(8, 8), Transformer(8, self_attn=False)),
        ])
        self.middle_block = seq(Res(8, 8), Transformer(8))
        self.output_blocks = torch.nn.ModuleList([
            seq(Res(16, 8), Transformer(8)),
            seq(Res(16, 8), Upsample(8)),
            seq(Res(12, 4)),
        ])


def test_unet_layout_walks_levels_channels_and_self_attention() -> None:
    lay = mp.unet_layout(TinyUNet())
    assert lay.levels == 1
    assert lay.attn == [(2, 8), (2, 8), (2, 8), (2, 8)]  # 2 down, middle, 1 up; the text-only block has none
    assert lay.skips == [(1, 4), (1, 4), (2, 4), (2, 8), (2, 8)]
    assert (1, 4) in lay.convs and (2, 16) in lay.convs and all(f in (1, 2) for f, _ in lay.convs)
    assert len(lay.groupnorms) == 7


# ------------------------------------------------------------------------------------ preflight check
class FakePatcher:
    """What check_preflight_memory reads from a ModelPatcher."""

    def __init__(self, unet: torch.nn.Module, size: int) -> None:
        self.unet, self.size = unet, size
        self.model = torch.nn.Module()

    def get_model_object(self, name: str) -> torch.nn.Module:
        assert name == "diffusion_model"
        return self.unet

    def model_size(self) -> int:
        return self.size


class Spec:
    mode, cfg_parallel, partial_fraction, partial_fraction_late, weights = "displaced", False, 0.3, None, None


class Plan:
    bands_per_group = 2


def test_preflight_memory_refuses_small_cuda_devices(monkeypatch) -> None:
    from hires_parallel.parallel.runtime.submit import ParallelInputError

    asked = []

    def mem_get_info(dev):
        asked.append(str(dev))
        return (64 * 1024 ** 2, 24 * GIB)

    monkeypatch.setattr(torch.cuda, "mem_get_info", mem_get_info)
    model, latent = FakePatcher(TinyUNet(), 1 * GIB), torch.zeros(1, 4, 64, 64)
    with pytest.raises(ParallelInputError) as info:
        mp.check_preflight_memory(model, latent, ["cuda:0", "cuda:1"], Spec(), Plan(), True)
    assert "64.0 MiB free" in str(info.value) and "per device" in str(info.value) and info.value.user_facing
    assert asked == ["cuda:0", "cuda:1"]
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda dev: (40 * GIB, 80 * GIB))
    got = mp.check_preflight_memory(model, latent, ["cuda:0", "cuda:1"], Spec(), Plan(), True)
    assert got is not None and got["weights"] == 1 * GIB
    monkeypatch.setenv(mp.SKIP_ENV, "1")
    monkeypatch.setattr(torch.cuda, "mem_get_info", mem_get_info)
    assert mp.check_preflight_memory(model, latent, ["cuda:0", "cuda:1"], Spec(), Plan(), True) is None


def test_preflight_memory_on_cpu_counts_the_shared_host(monkeypatch) -> None:
    """CPU ranks share the host: weights once (shared memory) plus every rank's working memory."""
    model, latent = FakePatcher(TinyUNet(), 1 * GIB), torch.zeros(1, 4, 64, 64)
    monkeypatch.setattr(mp, "_host_available", lambda: 64 * GIB)
    est = mp.check_preflight_memory(model, latent, ["cpu", "cpu"], Spec(), Plan(), True)
    need = est["weights"] + 2 * (est["total"] - est["weights"])
    monkeypatch.setattr(mp, "_host_available", lambda: need - 1)
    with pytest.raises(ValueError, match="the host"):
        mp.check_preflight_memory(model, latent, ["cpu", "cpu"], Spec(), Plan(), True)
    monkeypatch.setattr(mp, "_host_available", lambda: need)
    mp.check_preflight_memory(model, latent, ["cpu", "cpu"], Spec(), Plan(), True)
