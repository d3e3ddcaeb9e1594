"""A model's per-step exchange pattern under a patch-parallel plan, from its layer shapes.

A ``ModelDescription`` lists a model's layers at one latent size (one sample, full image): kind, FLOPs, and
the geometry that decides what a band exchanges (rows and row width at the layer's level, channels, conv
halo). Layers of equal geometry are merged (``count``). Built analytically from a published config
(``unet_description`` with ``SDXL_CONFIG``, ``flux_description`` with ``FLUX_DEV_CONFIG``) or from a real
ComfyUI module (comfy_shapes.describe_module).

``step_pattern`` turns a description into what ONE rank (the busiest: the tallest interior band) computes and
sends in one step (one model call of the step's batch), with the runtime's counting rules (comm.py): P2P
bytes as sent; ring all_gather (n-1)*b (padded to the largest band); ring all_reduce 2(n-1)b/n; stale
(displaced / partial) K/V and GroupNorm sums sent to every peer, (n-1)*b. Messages count link latencies:
one per P2P exchange, n-1 per ring all_gather, 2(n-1) per ring all_reduce; stale exchanges travel in
``buckets`` async messages per stream (displaced.py).

Exact mode overlaps its exchanges with compute, per layer (``overlap=True``, the runtime's default; band_ops
``conv_band_rows_overlapped``, ring_attention ``overlapped_kv_attention``, seq_attention ``ring_kv_attention``):
a conv's halo travels while the conv computes its interior output rows; a self-attention's K/V go point to
point to every other band (this band's own block, not padded) while it attends to its own block, and each
later block's transfer hides behind the blocks before it. Such an exchange carries ``hide_flops`` (this rank's
compute before its first wait) and ``ring_flops`` over ``pieces`` (blocks, each waiting for one more piece);
cost_model turns them into the exposed time of that layer. GroupNorm all-reduces, the output gather and the
CFG / batch gather stay blocking with nothing to hide behind. ``overlap=False``: the blocking variant (padded
K/V all_gather, halo before the conv).
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Mapping

from ..split.displaced import resolve_groupnorm, window_rows
from ..split.memory_plan import _band_heights, _level_heights

__all__ = ["TILE", "KINDS", "MODES", "Layer", "ModelDescription", "Exchange", "StepPattern", "SDXL_CONFIG",
           "FLUX_DEV_CONFIG", "unet_description", "flux_description", "step_pattern", "plan_shape"]

KINDS = ("conv_in", "conv_halo", "conv_local", "groupnorm", "norm", "self_attn", "cross_attn", "token_mlp",
         "shared")
MODES = ("exact", "displaced", "partial", "batch")
STALE = ("displaced", "partial")
TILE = 128  # rows / columns of one GEMM or attention tile a streaming multiprocessor computes (cost_model waves)

# ComfyUI's SDXL unet_config (comfy/model_detection.py, the SDXL entry; supported_models.SDXL).
SDXL_CONFIG: dict[str, Any] = dict(in_channels=4, out_channels=4, model_channels=320, channel_mult=[1, 2, 4],
                                   num_res_blocks=[2, 2, 2], transformer_depth=[0, 0, 2, 2, 10, 10],
                                   transformer_depth_middle=10, transformer_depth_output=[0, 0, 0, 2, 2, 2, 10, 10, 10],
                                   context_dim=2048, num_head_channels=64, adm_in_channels=2816, groups=32)
# Flux.1-dev (comfy.ldm.flux FluxParams of the released checkpoint).
FLUX_DEV_CONFIG: dict[str, Any] = dict(in_channels=16, out_channels=16, vec_in_dim=768, context_in_dim=4096,
                                       hidden_size=3072, mlp_ratio=4.0, num_heads=24, depth=19,
                                       depth_single_blocks=38, patch_size=2, guidance_embed=True)


@dataclass(frozen=True)
class Layer:
    """``count`` layers of one geometry. ``flops``: all of them, one sample, full image (2 per multiply-add);
    self_attn: the image queries against all keys (``rows * width + extra_keys``). ``rows`` / ``width``: the
    full image at the layer's level (``factor``: UNet downsampling; 1 for DiT token rows). ``channels``: conv
    input channels (halo), K (= V) channels (self_attn), groups (groupnorm). Kind ``shared``: work every
    rank repeats whole (text tokens, embeddings); ``conv_in``: halo read from the full latent, no exchange."""

    name: str
    kind: str
    flops: float
    count: int = 1
    rows: int = 0
    width: int = 0
    factor: int = 1
    channels: int = 0
    halo: tuple[int, int] = (0, 0)
    extra_keys: int = 0
    tiles_n: int = 1


@dataclass(frozen=True)
class ModelDescription:
    """``rows`` x ``width``: the split grid (UNet: latent rows; DiT: token rows); ``align``: band alignment in
    rows; ``out_channels``: output values per grid element (the gathered model output)."""

    name: str
    family: str
    rows: int
    width: int
    align: int
    itemsize: int
    out_channels: int
    layers: tuple[Layer, ...]

    @property
    def flops(self) -> float:
        """FLOPs of one sample's model call on one device."""
        return sum(lay.flops for lay in self.layers)

    @property
    def kernels(self) -> int:
        return sum(lay.count for lay in self.layers)

    def by_kind(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for lay in self.layers:
            out[lay.kind] = out.get(lay.kind, 0.0) + lay.flops
        return out


class _Builder:
    """Collects layers, merging equal names (same geometry by construction of the name)."""

    def __init__(self) -> None:
        self.layers: dict[str, Layer] = {}

    def add(self, name: str, kind: str, flops: float, **geo: Any) -> None:
        old = self.layers.get(name)
        if old is None:
            self.layers[name] = Layer(name, kind, float(flops), **geo)
        else:
            self.layers[name] = replace(old, flops=old.flops + flops, count=old.count + 1)

    def done(self) -> tuple[Layer, ...]:
        return tuple(self.layers.values())


def _ceil(a: int, b: int) -> int:
    return -(-int(a) // int(b))


# ------------------------------------------------------------------------------------ analytic: UNet
def unet_description(config: Mapping[str, Any], latent_hw: tuple[int, int], *, context_tokens: int = 77,
                     itemsize: int = 2, name: str = "SDXL") -> ModelDescription:
    """An openaimodel UNet (ComfyUI's construction order) from its config; GEGLU feed-forward, linear
    proj_in/out, heads of ``num_head_channels`` (inner dim = channels)."""
    h, w = (int(v) for v in latent_hw)
    mc, g = int(config["model_channels"]), int(config.get("groups", 32))
    ctx_dim, temb = int(config["context_dim"]), 4 * mc
    depth_in = list(config["transformer_depth"])
    depth_out = list(config["transformer_depth_output"])
    b = _Builder()

    def geo(f: int) -> dict[str, int]:
        return {"rows": _ceil(h, f), "width": _ceil(w, f), "factor": f}

    def tokens(f: int) -> int:
        return _ceil(h, f) * _ceil(w, f)

    def conv3(cin: int, cout: int, f: int, stride: int = 1, kind: str = "conv_halo") -> None:
        fo = f * stride
        halo = (1, 1) if stride == 1 else (1, 0)
        b.add(f"conv3x3/{stride} {cin}->{cout} @{f}", kind, 2 * cin * cout * 9 * tokens(fo), channels=cin,
              tiles_n=_ceil(cout, TILE),
              halo=halo if kind == "conv_halo" else (0, 0), **geo(f))

    def gn(c: int, f: int) -> None:
        b.add(f"groupnorm {c} @{f}", "groupnorm", 0, channels=g, **geo(f))

    def linear(i: int, o: int, f: int, n: int | None = None) -> None:
        if n is None:
            b.add(f"linear {i}->{o} @{f}", "token_mlp", 2 * i * o * tokens(f), tiles_n=_ceil(o, TILE), **geo(f))
        else:  # on text tokens or the embedding vector: every rank repeats it
            b.add(f"shared linear {i}->{o} x{n}", "shared", 2 * i * o * n)

    def resblock(cin: int, cout: int, f: int) -> None:
        gn(cin, f)
        conv3(cin, cout, f)
        linear(temb, cout, f, 1)
        gn(cout, f)
        conv3(cout, cout, f)
        if cin != cout:
            b.add(f"conv1x1 {cin}->{cout} @{f}", "conv_local", 2 * cin * cout * tokens(f), tiles_n=_ceil(cout, TILE),
                  **geo(f))

    def transformer(c: int, depth: int, f: int) -> None:
        t = tokens(f)
        gn(c, f)
        linear(c, c, f)
        for _ in range(depth):
            for _ in range(3):
                b.add(f"layernorm {c} @{f}", "norm", 0, **geo(f))
            for _ in range(4):
                linear(c, c, f)  # attn1 q, k, v, out
            heads = c // int(config["num_head_channels"])
            b.add(f"self_attn {c} @{f}", "self_attn", 4 * t * t * c, channels=c, tiles_n=heads, **geo(f))
            for _ in range(2):
                linear(c, c, f)  # attn2 q, out
            for _ in range(2):
                linear(ctx_dim, c, f, context_tokens)  # attn2 k, v on the text
            b.add(f"cross_attn {c} @{f}", "cross_attn", 4 * t * context_tokens * c, tiles_n=heads, **geo(f))
            linear(c, 8 * c, f)  # GEGLU
            linear(4 * c, c, f)
        linear(c, c, f)

    linear(mc, temb, 1, 1)
    linear(temb, temb, 1, 1)
    if config.get("adm_in_channels"):
        linear(int(config["adm_in_channels"]), temb, 1, 1)
        linear(temb, temb, 1, 1)
    conv3(int(config["in_channels"]), mc, 1, kind="conv_in")
    ch, f, chans = mc, 1, [mc]
    mult = list(config["channel_mult"])
    nres = list(config["num_res_blocks"])
    for level, m in enumerate(mult):
        for _ in range(nres[level]):
            resblock(ch, m * mc, f)
            ch = m * mc
            d = depth_in.pop(0)
            if d > 0:
                transformer(ch, d, f)
            chans.append(ch)
        if level != len(mult) - 1:
            conv3(ch, ch, f, stride=2)
            chans.append(ch)
            f *= 2
    resblock(ch, ch, f)
    if int(config.get("transformer_depth_middle", -1)) >= 0:
        transformer(ch, int(config["transformer_depth_middle"]), f)
    resblock(ch, ch, f)
    for level, m in list(enumerate(mult))[::-1]:
        for i in range(nres[level] + 1):
            resblock(ch + chans.pop(), m * mc, f)
            ch = m * mc
            d = depth_out.pop()
            if d > 0:
                transformer(ch, d, f)
            if level and i == nres[level]:
                f //= 2
                conv3(ch, ch, f)  # Upsample: nearest x2, then the conv at the finer level
    gn(ch, 1)
    conv3(ch, int(config["out_channels"]), 1)
    levels = len(mult) - 1
    return ModelDescription(name, "unet", h, w, 2 ** levels, itemsize, int(config["out_channels"]), b.done())


# ------------------------------------------------------------------------------------ analytic: Flux
def flux_description(config: Mapping[str, Any], latent_hw: tuple[int, int], *, text_tokens: int = 512,
                     itemsize: int = 2, name: str = "Flux.1-dev") -> ModelDescription:
    """Flux (double-stream + single-stream blocks, joint attention over text + image tokens). Image tokens
    are split by token rows; text tokens, modulation and embeddings are repeated on every rank."""
    p, hd = int(config["patch_size"]), int(config["hidden_size"])
    rows, width = _ceil(int(latent_hw[0]), p), _ceil(int(latent_hw[1]), p)
    t, txt, mlp = rows * width, int(text_tokens), int(hd * float(config["mlp_ratio"]))
    grid = {"rows": rows, "width": width}
    b = _Builder()

    def img(i: int, o: int) -> None:
        b.add(f"linear {i}->{o}", "token_mlp", 2 * i * o * t, tiles_n=_ceil(o, TILE), **grid)

    def shared(i: int, o: int, n: int) -> None:
        b.add(f"shared linear {i}->{o} x{n}", "shared", 2 * i * o * n)

    def attention() -> None:
        b.add(f"self_attn {hd}", "self_attn", 4 * t * (t + txt) * hd, channels=hd, extra_keys=txt,
              tiles_n=int(config["num_heads"]), **grid)
        b.add(f"text queries {hd}", "shared", 4 * txt * (t + txt) * hd)

    img(int(config["in_channels"]) * p * p, hd)
    shared(int(config["context_in_dim"]), hd, txt)
    for i in [256, int(config["vec_in_dim"])] + ([256] if config.get("guidance_embed") else []):
        shared(i, hd, 1)
        shared(hd, hd, 1)
    for _ in range(int(config["depth"])):
        for _ in range(2):  # image and text streams: same shapes
            shared(hd, 6 * hd, 1)
        img(hd, 3 * hd), img(hd, hd), img(hd, mlp), img(mlp, hd)
        shared(hd, 3 * hd, txt), shared(hd, hd, txt), shared(hd, mlp, txt), shared(mlp, hd, txt)
        for _ in range(2):  # the image stream's (the text stream's are shared, 0 FLOPs)
            b.add(f"layernorm {hd}", "norm", 0, **grid)
        attention()
    for _ in range(int(config["depth_single_blocks"])):
        shared(hd, 3 * hd, 1)
        img(hd, 3 * hd + mlp), img(hd + mlp, hd)
        shared(hd, 3 * hd + mlp, txt), shared(hd + mlp, hd, txt)
        b.add(f"layernorm {hd}", "norm", 0, **grid)
        attention()
    shared(hd, 2 * hd, 1)
    out = p * p * int(config["out_channels"])
    img(hd, out)
    return ModelDescription(name, "dit", rows, width, 1, itemsize, out, b.done())


# ------------------------------------------------------------------------------------ per-step pattern
@dataclass(frozen=True)
class Exchange:
    """What one rank sends for ``layer`` (all of its ``count`` layers) in one step."""

    layer: str
    kind: str
    sent: int
    messages: int
    blocking: bool
    hide_flops: float = 0.0  # this rank's FLOPs of ``layer`` that run while it travels, before the first wait
    ring_flops: float = 0.0  # FLOPs of ``layer`` in ``pieces`` equal blocks, block j after piece j arrived
    pieces: int = 1

    @property
    def overlaps(self) -> bool:
        """A blocking (in-layer) exchange that hides behind part of its own layer's compute."""
        return self.blocking and (self.hide_flops > 0 or self.ring_flops > 0)


@dataclass
class StepPattern:
    """One rank's share of one step: FLOPs (one device would do ``description.flops * batch``), kernels
    launched, and its exchanges. ``world`` devices = ``groups`` CFG groups x ``bands`` row bands (mode batch:
    ``world`` devices each with ``call_batch`` samples)."""

    description: ModelDescription
    world: int
    mode: str
    cfg_parallel: bool
    bands: int
    groups: int
    call_batch: int
    steady: bool
    flops: float
    kernels: int
    exchanges: list[Exchange] = field(default_factory=list)
    work: list[tuple[Layer, float, int]] = field(default_factory=list)  # (layer, FLOPs, tokens) on this rank
    copy_bytes: int = 0  # device-memory traffic of assembling the K/V of all bands (written, then read)
    overlap: bool = False  # exact exchanges overlapped with their layer's compute (see the module docstring)

    @property
    def bytes_sent(self) -> int:
        return sum(e.sent for e in self.exchanges)

    @property
    def blocking_bytes(self) -> int:
        return sum(e.sent for e in self.exchanges if e.blocking)

    @property
    def overlapped_bytes(self) -> int:
        return sum(e.sent for e in self.exchanges if not e.blocking)

    def sent_by_kind(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for e in self.exchanges:
            out[e.kind] = out.get(e.kind, 0) + e.sent
        return out


def plan_shape(world: int, mode: str, cfg_parallel: bool, batch: int) -> tuple[int, int, int]:
    """(groups, bands, call_batch) of a plan: CFG parallel puts each half of the batch on world / 2 devices."""
    world = max(1, int(world))
    if mode == "batch":
        return world, 1, _ceil(batch, world)
    if cfg_parallel and world > 1:
        if world % 2 or batch < 2:
            raise ValueError(f"CFG parallel needs an even world and a batch of 2 or more; got {world}, {batch}")
        return 2, world // 2, _ceil(batch, 2)
    return 1, world, batch


def step_pattern(desc: ModelDescription, world: int, mode: str = "exact", *, batch: int = 2,
                 cfg_parallel: bool = False, fraction: float = 0.3, groupnorm: str = "auto", buckets: int = 4,
                 steady: bool = True, overlap: bool = True) -> StepPattern:
    """One step of ``desc`` on ``world`` devices. ``mode``: exact, displaced, partial or batch; ``steady``:
    False gives a warmup step of displaced / partial (exact exchanges, blocking: the stale engine's warmup
    does not take the overlapped path); ``groupnorm``: the stale engine's policy (auto: sync, i.e. blocking,
    on small latents, as displaced.resolve_groupnorm); ``overlap``: exact mode overlaps its halo and K/V
    exchanges with the layer's compute (False: the blocking variant)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}; got {mode!r}")
    groups, bands, cb = plan_shape(world, mode, cfg_parallel, batch)
    if desc.rows < bands * desc.align:
        raise ValueError(f"{desc.rows} rows cannot make {bands} bands aligned to {desc.align}")
    stale = mode in STALE and steady and bands > 1
    ovl = bool(overlap) and mode == "exact" and bands > 1
    partial = stale and mode == "partial"
    gn_sync = (not stale) or resolve_groupnorm(groupnorm, desc.rows, desc.width) == "sync"
    heights = _band_heights(desc.rows, bands, desc.align, None)
    me = max(range(bands), key=lambda j: (heights[j], 0 < j < bands - 1))  # tallest, interior first
    up, down = me > 0, me < bands - 1
    item, n = desc.itemsize, bands
    flops, ex, work, copy = 0.0, [], [], 0
    stale_streams: set[str] = set()
    for lay in desc.layers:
        if lay.kind == "shared":
            flops += lay.flops * cb
            work.append((lay, lay.flops * cb, 0))
            continue
        hs = _level_heights(heights, lay.factor) if bands > 1 else [lay.rows]
        own = hs[me]
        share = own / max(1, lay.rows)
        if lay.kind == "self_attn" and bands > 1:
            keys = lay.rows * lay.width
            if partial:
                win = [window_rows(fraction, x) for x in hs]
                keys = (own + (win[me - 1] if up else 0) + (win[me + 1] if down else 0)) * lay.width
                share *= (keys + lay.extra_keys) / (lay.rows * lay.width + lay.extra_keys)
            if not ovl:  # the blocking gather concatenates every band's K/V; the ring reads the blocks as they are
                copy += lay.count * 2 * keys * cb * 2 * lay.channels * item
        mine = lay.flops * share * cb
        flops += mine
        work.append((lay, mine, cb * own * lay.width))
        if bands < 2:
            continue
        if lay.kind == "conv_halo":
            top, bottom = lay.halo
            sent = lay.count * (top * down + bottom * up) * cb * lay.channels * lay.width * item
            # overlapped: the output rows that read only this band's rows (all but ~top + bottom border rows)
            interior = mine * max(0, own - top - bottom) / max(1, own) if ovl else 0.0
            ex.append(Exchange(lay.name, "halo", sent, 0 if stale else lay.count, not stale, hide_flops=interior))
            if stale:
                stale_streams.add("p2p")
        elif lay.kind == "groupnorm":
            b = (2 * cb * lay.channels + 1) * 8  # float64 sums, sums of squares, count
            if gn_sync:
                ex.append(Exchange(lay.name, "groupnorm", lay.count * (2 * (n - 1) * b // n),
                                   lay.count * 2 * (n - 1), True))
            else:
                ex.append(Exchange(lay.name, "groupnorm", lay.count * (n - 1) * b, 0, False))
                stale_streams.add("peers64")
        elif lay.kind == "self_attn":
            per_row = cb * lay.width * 2 * lay.channels * item
            if partial:
                win = window_rows(fraction, own)
                ex.append(Exchange(lay.name, "kv", lay.count * win * (up + down) * per_row, 0, False))
                stale_streams.add("p2p")
            elif stale:
                ex.append(Exchange(lay.name, "kv", lay.count * (n - 1) * own * per_row, 0, False))
                stale_streams.add("peers")
            elif ovl:  # own block to every peer, point to point; own-block attention first, then one block per peer
                first = mine * (own * lay.width + lay.extra_keys) / (lay.rows * lay.width + lay.extra_keys)
                ex.append(Exchange(lay.name, "kv", lay.count * (n - 1) * own * per_row, lay.count * (n - 1), True,
                                   hide_flops=first, ring_flops=mine - first, pieces=n - 1))
            else:
                ex.append(Exchange(lay.name, "kv", lay.count * (n - 1) * max(hs) * per_row, lay.count * (n - 1), True))
    out_row = desc.width * desc.out_channels * item
    if bands > 1:  # the output rows of every band, on every rank of the group
        ex.append(Exchange("output", "output", (n - 1) * max(heights) * cb * out_row, n - 1, True))
    if groups > 1:  # CFG parallel / batch mode: every group's samples
        ex.append(Exchange("batch", "batch", (groups - 1) * cb * desc.rows * out_row, groups - 1, True))
    if stale_streams:
        ex.append(Exchange("stale buckets", "latency", 0, buckets * len(stale_streams), False))
    return StepPattern(desc, int(world), mode, bool(cfg_parallel and groups > 1 and mode != "batch"), bands, groups,
                       cb, stale, flops, desc.kernels, ex, work, copy, ovl)

