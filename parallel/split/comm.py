"""Communication primitives of patch parallelism, with byte and wait-time accounting.

A ``BandGroup`` is the set of ranks that hold the row bands of one image. Every rank runs the
same model on its own band in lockstep (SPMD), so every method here must be called by all
ranks of the group in the same order with the same arguments (except the tensors). A group of
size 1 never touches torch.distributed, so single-device runs go through the same code.

Byte accounting (``CommStats``) follows a ring model, per rank, of what actually travels:
  * point-to-point: the bytes of each tensor sent and received;
  * all_gather of n equal tensors of b bytes (uneven ones are zero-padded to the largest,
    and the padded size is what is counted): sent = (n - 1) * b, received = (n - 1) * b
    (a ring forwards n - 1 chunks and receives n - 1 chunks);
  * all_reduce of b bytes: sent = received = 2 * (n - 1) * b // n (ring reduce-scatter
    followed by ring all-gather).
Size exchanges done on the way (one int64 per rank) are counted under the same kind.
"""
from __future__ import annotations

import time as _time
from contextlib import contextmanager
from math import gcd
from typing import Any, Iterator, Mapping, Sequence

import torch
import torch.distributed as dist

__all__ = ["CommStats", "BandGroup", "PendingExchange", "gather_batch", "tensor_bytes", "all_reduce", "all_gather",
           "batch_isend_irecv", "set_host_staging"]

# ---------------------------------------------------------------------------------- host staging
# gloo (Windows, torch builds without NCCL) moves host tensors only. A GPU rank on gloo turns this on
# (worker.py): every exchange below then goes through host memory (pinned where CUDA can pin), device
# tensors are copied out before a send and back after a receive completes. Byte and wait accounting
# are the callers' and count the same bytes either way.
_STAGING = {"on": False, "host_too": False}


def set_host_staging(on: bool, host_too: bool = False) -> None:
    """Stage device tensors through host memory (``host_too``: host tensors as well, so that tests on
    machines without a GPU run the very same copies)."""
    _STAGING["on"], _STAGING["host_too"] = bool(on), bool(on and host_too)


def host_staging() -> bool:
    return _STAGING["on"]


def _staged(t: torch.Tensor) -> bool:
    return _STAGING["on"] and (t.device.type != "cpu" or _STAGING["host_too"])


def _host_copy(t: torch.Tensor) -> torch.Tensor:
    """A host copy of ``t`` (pinned when CUDA is there to pin it, for fast copies both ways)."""
    out = torch.empty(t.shape, dtype=t.dtype, pin_memory=torch.cuda.is_available())
    out.copy_(t)
    return out


class _StagedWork:
    """A receive through a host buffer: ``wait`` finishes it and copies the data to its device tensor."""

    def __init__(self, work: Any, host: torch.Tensor | None, target: torch.Tensor | None) -> None:
        self.work, self.host, self.target = work, host, target

    def wait(self, *args: Any) -> bool:
        done = self.work.wait(*args)
        if self.target is not None:
            self.target.copy_(self.host)
            self.target = None
        return done

    def is_completed(self) -> bool:
        return self.work.is_completed()


def all_reduce(t: torch.Tensor, op: Any = None, group: Any = None) -> torch.Tensor:
    """dist.all_reduce in place (SUM by default), through host memory when staging is on."""
    op = dist.ReduceOp.SUM if op is None else op
    if not _staged(t):
        dist.all_reduce(t, op=op, group=group)
        return t
    host = _host_copy(t)
    dist.all_reduce(host, op=op, group=group)
    t.copy_(host)
    return t


def all_gather(bufs: list[torch.Tensor], t: torch.Tensor, group: Any = None) -> None:
    """dist.all_gather into ``bufs``, through host memory when staging is on."""
    if not _staged(t):
        dist.all_gather(bufs, t, group=group)
        return
    host = [torch.empty(b.shape, dtype=b.dtype, pin_memory=torch.cuda.is_available()) for b in bufs]
    dist.all_gather(host, _host_copy(t), group=group)
    for b, h in zip(bufs, host):
        b.copy_(h)


def batch_isend_irecv(ops: list) -> list:
    """dist.batch_isend_irecv; with staging, sends go from host copies and receives land in host buffers
    that each returned work copies to the device tensor when waited on."""
    if not ops:
        return []
    if not any(_staged(op.tensor) for op in ops):
        return dist.batch_isend_irecv(ops)
    staged, targets = [], []
    for op in ops:
        t = op.tensor
        host, target = t, None
        if _staged(t):
            host = _host_copy(t) if op.op is dist.isend else torch.empty(t.shape, dtype=t.dtype,
                                                                         pin_memory=torch.cuda.is_available())
            target = t if op.op is not dist.isend else None
        staged.append(dist.P2POp(op.op, host, op.peer, op.group, op.tag))
        targets.append((host, target))
    works = dist.batch_isend_irecv(staged)  # gloo (the only staged backend): one work per operation
    return [_StagedWork(w, h, t) for w, (h, t) in zip(works, targets, strict=True)]


def tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _ring_all_reduce_bytes(nbytes: int, size: int) -> int:
    return 2 * (size - 1) * nbytes // size


class CommStats:
    """Bytes sent / received and seconds spent waiting, per kind of traffic.

    Kinds are free strings; the primitives use "halo", "groupnorm", "kv", "output", "batch".
    Seconds are host wall-clock time inside ``time(kind)``; on asynchronous backends (NCCL)
    that is the time to enqueue and wait on the work handles, not the device transfer time.
    """

    def __init__(self) -> None:
        self.sent: dict[str, int] = {}
        self.received: dict[str, int] = {}
        self.seconds: dict[str, float] = {}
        self.calls: dict[str, int] = {}
        self.trace: Any = None  # trace.ExchangeTrace when tracing (opt-in), else None

    def add(self, kind: str, sent: int, received: int, blocking: bool = True) -> None:
        self.sent[kind] = self.sent.get(kind, 0) + int(sent)
        self.received[kind] = self.received.get(kind, 0) + int(received)
        self.calls[kind] = self.calls.get(kind, 0) + 1
        if self.trace is not None:
            self.trace.counted(kind, sent, received, blocking)

    def add_wait(self, kind: str, t0: float, t1: float, blocking: bool = True) -> None:
        """A wait measured by the caller (a background exchange waited for later)."""
        self.seconds[kind] = self.seconds.get(kind, 0.0) + (t1 - t0)
        if self.trace is not None:
            self.trace.waited(kind, t0, t1, blocking)

    @contextmanager
    def time(self, kind: str, blocking: bool = True) -> Iterator[None]:
        t0 = _time.perf_counter()
        try:
            yield
        finally:
            self.add_wait(kind, t0, _time.perf_counter(), blocking)

    def reset(self) -> None:
        self.sent.clear()
        self.received.clear()
        self.seconds.clear()
        self.calls.clear()

    @property
    def total_sent(self) -> int:
        return sum(self.sent.values())

    @property
    def total_received(self) -> int:
        return sum(self.received.values())

    def as_dict(self) -> dict[str, Any]:
        """JSON-friendly snapshot; ``merge`` accepts it back (e.g. after crossing processes)."""
        return {
            "bytes_sent": dict(self.sent),
            "bytes_received": dict(self.received),
            "seconds": dict(self.seconds),
            "calls": dict(self.calls),
            "total_bytes_sent": self.total_sent,
            "total_bytes_received": self.total_received,
            "total_seconds": sum(self.seconds.values()),
        }

    def merge(self, other: "CommStats | Mapping[str, Any]") -> "CommStats":
        """Add another rank's (or another step's) counts into this one; returns self."""
        if isinstance(other, CommStats):
            other = other.as_dict()
        for mine, key in ((self.sent, "bytes_sent"), (self.received, "bytes_received"), (self.calls, "calls")):
            for kind, value in other.get(key, {}).items():
                mine[kind] = mine.get(kind, 0) + int(value)
        for kind, value in other.get("seconds", {}).items():
            self.seconds[kind] = self.seconds.get(kind, 0.0) + float(value)
        return self

    def __repr__(self) -> str:
        return f"CommStats(sent={self.sent}, received={self.received}, seconds={self.seconds})"


class PendingExchange:
    """An exchange in flight: ``wait()`` blocks until it is done and returns its result. Bytes and the wait
    are counted when it is waited for; a background exchange also tells the trace how long it travelled
    while this rank computed (``in_flight_s``: what the overlap hid)."""

    def __init__(self, stats: CommStats, kind: str, works: list, result: Any, blocking: bool,
                 parts: dict[int, tuple[list[int], int, int]] | None = None) -> None:
        self.stats, self.kind, self.works, self.result = stats, kind, works, result
        self.blocking = blocking
        self.parts = parts or {}  # key -> (indices of its works, bytes sent, bytes received)
        self.started = _time.perf_counter()

    def _finish(self, key: int) -> None:
        idx, sent, received = self.parts.pop(key)
        t0 = _time.perf_counter()
        for i in idx:
            if self.works[i] is not None:
                self.works[i].wait()
                self.works[i] = None
        t1 = _time.perf_counter()
        self.stats.add_wait(self.kind, t0, t1, self.blocking)
        if self.stats.trace is not None and not self.blocking:
            self.stats.trace.in_flight(t0 - self.started)
        self.stats.add(self.kind, sent, received, self.blocking)

    def wait(self, peer: int | None = None) -> Any:
        """Everything (None), or only band ``peer``'s part of a peer exchange."""
        if peer is not None:
            if peer in self.parts:
                self._finish(peer)
            return self.result[peer]
        for key in sorted(self.parts):
            self._finish(key)
        return self.result


class BandGroup:
    """The ranks holding the row bands of one image, and the exchanges between them.

    ``ranks`` are global ranks in band order, ``rank`` is this process's global rank,
    ``bands`` are the ``[start, end)`` rows of each band at full latent resolution (as from
    ``layout.split_rows``), ``group`` a process group covering exactly ``ranks`` (None: the
    default group). Tensors at lower UNet levels are handled from their own height: a band
    never needs to be told its level.
    """

    def __init__(
        self,
        ranks: Sequence[int],
        rank: int,
        bands: Sequence[tuple[int, int]],
        group: Any = None,
        stats: CommStats | None = None,
    ) -> None:
        self.ranks = [int(r) for r in ranks]
        self.rank = int(rank)
        self.bands = [(int(s), int(e)) for s, e in bands]
        self.group = group
        self.stats = stats if stats is not None else CommStats()
        if not self.ranks or len(self.ranks) != len(self.bands):
            raise ValueError(f"need one band per rank, got {len(self.ranks)} ranks and {len(self.bands)} bands")
        if len(set(self.ranks)) != len(self.ranks):
            raise ValueError(f"ranks must be distinct, got {self.ranks}")
        if self.rank not in self.ranks:
            raise ValueError(f"rank {self.rank} is not in the band group {self.ranks}")
        prev_end = 0
        for i, (s, e) in enumerate(self.bands):
            if s != prev_end or e <= s:
                raise ValueError(f"bands must be non-empty, contiguous and start at row 0; band {i} is {(s, e)}")
            prev_end = e
        self._index = self.ranks.index(self.rank)
        self._level_cache: dict[tuple[int, int | None], list[int] | None] = {}
        if self.size > 1:
            if not (dist.is_available() and dist.is_initialized()):
                raise RuntimeError(f"a band group of {self.size} ranks needs torch.distributed to be initialised")
            gsize = dist.get_world_size(group)
            if gsize != self.size:
                raise ValueError(f"the process group has {gsize} ranks but the band group lists {self.size}")
            if dist.get_rank() != self.rank:
                raise ValueError(f"this process is global rank {dist.get_rank()}, not {self.rank}")

    # ----------------------------------------------------------------- properties
    @property
    def size(self) -> int:
        return len(self.ranks)

    @property
    def index(self) -> int:
        return self._index

    @property
    def is_first(self) -> bool:
        return self._index == 0

    @property
    def is_last(self) -> bool:
        return self._index == self.size - 1

    @property
    def prev_rank(self) -> int | None:
        return None if self.is_first else self.ranks[self._index - 1]

    @property
    def next_rank(self) -> int | None:
        return None if self.is_last else self.ranks[self._index + 1]

    @property
    def rows(self) -> tuple[int, int]:
        """This band's ``[start, end)`` at full latent resolution."""
        return self.bands[self._index]

    @property
    def heights(self) -> list[int]:
        """Every band's height at full latent resolution."""
        return [e - s for s, e in self.bands]

    @property
    def full_height(self) -> int:
        return self.bands[-1][1]

    def __repr__(self) -> str:
        return f"BandGroup(index={self.index}/{self.size}, rank={self.rank}, rows={self.rows})"

    # ------------------------------------------------------------ level geometry
    def level_heights(self, local_height: int, full_height: int | None = None) -> list[int] | None:
        """Every band's height at the level of a local tensor of ``local_height`` rows.

        A level downsampled by f holds rows ``[s/f, e/f)`` of a non-last band and the
        ``ceil`` rule for the last one. Non-last bands read f off their own height; the last
        band reads it off ``full_height`` (the whole tensor's height at that level) when
        given, else off its own height when that is unambiguous; otherwise None.
        Meant for validation: a None on one rank must never change which collectives run.
        """
        key = (int(local_height), None if full_height is None else int(full_height))
        if key not in self._level_cache:
            self._level_cache[key] = self._level_heights(*key)
        found = self._level_cache[key]
        return None if found is None else list(found)

    def _level_heights(self, h: int, full_height: int | None) -> list[int] | None:
        if self.size == 1:
            return [h]
        heights = self.heights
        inner, last = heights[:-1], heights[-1]
        if h <= 0:
            return None
        if not self.is_last:
            own = heights[self._index]
            factors = [own // h] if own % h == 0 else []
        elif full_height is not None and full_height > h:
            start = self.bands[-1][0]
            factors = [start // (full_height - h)] if start % (full_height - h) == 0 else []
        else:
            g = 0
            for r in inner:
                g = gcd(g, r)
            factors = [f for f in range(1, g + 1) if g % f == 0 and -(-last // f) == h]
        if len(factors) != 1:
            return None
        f = factors[0]
        if any(r % f for r in inner) or (self.is_last and -(-last // f) != h):
            return None
        return [r // f for r in inner] + [-(-last // f)]

    def _check_halo(self, h: int, top: int, bottom: int) -> None:
        # Ranks that can see the whole level check every band, so they all raise together
        # (and before any exchange, so none is left waiting on a neighbour that gave up).
        heights = self.level_heights(h) or []
        if heights:
            heights[self._index] = h
        else:
            heights = [h if j == self._index else 1 << 62 for j in range(self.size)]
        for j, hj in enumerate(heights):
            need = max(bottom if j > 0 else 0, top if j < self.size - 1 else 0)
            if hj < need:
                raise ValueError(
                    f"band {j} has {hj} rows at this level but its neighbours need {need} halo rows; "
                    f"use fewer devices or a taller image"
                )

    # ------------------------------------------------------------ point to point
    def halo(self, x: torch.Tensor, top: int, bottom: int, kind: str = "halo") -> torch.Tensor:
        """``x`` with ``top`` rows of the previous band above and ``bottom`` rows of the next
        band below (dim -2); zeros stand in beyond the image edges. Neighbours only."""
        above, below = self.halo_parts(x, top, bottom, kind)
        shape = list(x.shape)
        parts = []
        if top:
            parts.append(above if above is not None else x.new_zeros(shape[:-2] + [top, shape[-1]]))
        parts.append(x)
        if bottom:
            parts.append(below if below is not None else x.new_zeros(shape[:-2] + [bottom, shape[-1]]))
        return torch.cat(parts, dim=-2) if len(parts) > 1 else x

    def halo_parts(
        self, x: torch.Tensor, top: int, bottom: int, kind: str = "halo"
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(``top`` rows of the previous band, ``bottom`` rows of the next band); None where
        there is no neighbour (image edge) or nothing was asked for."""
        return self.start_halo(x, top, bottom, kind, blocking=True).wait()

    def start_halo(self, x: torch.Tensor, top: int, bottom: int, kind: str = "halo",
                   blocking: bool = False) -> "PendingExchange":
        """Start the exchange of ``halo_parts`` and return at once; ``wait()`` gives (above, below).
        What this band computes between the two (its interior rows) hides the transfer."""
        top, bottom = int(top), int(bottom)
        if top < 0 or bottom < 0:
            raise ValueError(f"halo sizes must be >= 0, got top={top}, bottom={bottom}")
        if x.dim() < 2:
            raise ValueError(f"halo needs a tensor with rows at dim -2, got shape {tuple(x.shape)}")
        h = x.shape[-2]
        self._check_halo(h, top, bottom)
        shape = list(x.shape)
        above: torch.Tensor | None = None
        below: torch.Tensor | None = None
        if self.size == 1 or not (top or bottom):
            return PendingExchange(self.stats, kind, [], (above, below), blocking)
        ops = []
        sent = received = 0
        if top and not self.is_first:
            above = x.new_empty(shape[:-2] + [top, shape[-1]])
            ops.append(dist.P2POp(dist.irecv, above, self.prev_rank, self.group))
            received += tensor_bytes(above)
        if top and not self.is_last:
            out = x[..., h - top:, :].contiguous()
            ops.append(dist.P2POp(dist.isend, out, self.next_rank, self.group))
            sent += tensor_bytes(out)
        if bottom and not self.is_last:
            below = x.new_empty(shape[:-2] + [bottom, shape[-1]])
            ops.append(dist.P2POp(dist.irecv, below, self.next_rank, self.group))
            received += tensor_bytes(below)
        if bottom and not self.is_first:
            out = x[..., :bottom, :].contiguous()
            ops.append(dist.P2POp(dist.isend, out, self.prev_rank, self.group))
            sent += tensor_bytes(out)
        works = batch_isend_irecv(ops)
        return PendingExchange(self.stats, kind, works, (above, below), blocking,
                               {0: (list(range(len(works))), sent, received)})

    def start_peer_exchange(self, send: torch.Tensor, shapes: Sequence[Sequence[int]],
                            kind: str = "kv") -> "PendingExchange":
        """Send ``send`` to every other band and receive each band's tensor (of ``shapes[j]``), point to
        point, without waiting; ``wait(j)`` gives band j's tensor once it is here (bands may be waited for
        one by one, in any order), ``wait()`` all of them in band order (this band's own: ``send``)."""
        me = self._index
        send = send.contiguous()
        out = [send if j == me else send.new_empty(tuple(shapes[j])) for j in range(self.size)]
        if self.size == 1:
            return PendingExchange(self.stats, kind, [], out, False)
        parts: dict[int, tuple[list[int], int, int]] = {}
        ops = []
        for j, peer in enumerate(self.ranks):
            if j == me:
                continue
            parts[j] = ([len(ops), len(ops) + 1], tensor_bytes(send), tensor_bytes(out[j]))
            ops.append(dist.P2POp(dist.irecv, out[j], peer, self.group))
            ops.append(dist.P2POp(dist.isend, send, peer, self.group))
        return PendingExchange(self.stats, kind, batch_isend_irecv(ops), out, False, parts)

    # ---------------------------------------------------------------- collectives
    def all_reduce_sum(self, t: torch.Tensor, kind: str = "groupnorm") -> torch.Tensor:
        """Sum ``t`` over the group, in place; returns ``t``."""
        if self.size == 1:
            return t
        with self.stats.time(kind):
            all_reduce(t, dist.ReduceOp.SUM, self.group)
        nbytes = _ring_all_reduce_bytes(tensor_bytes(t), self.size)
        self.stats.add(kind, nbytes, nbytes)
        return t

    def _all_gather_equal(self, t: torch.Tensor, kind: str) -> list[torch.Tensor]:
        t = t.contiguous()
        bufs = [torch.empty_like(t) for _ in range(self.size)]
        with self.stats.time(kind):
            all_gather(bufs, t, self.group)
        nbytes = (self.size - 1) * tensor_bytes(t)
        self.stats.add(kind, nbytes, nbytes)
        return bufs

    def exchange_sizes(self, n: int, device: torch.device | str = "cpu", kind: str = "output") -> list[int]:
        """Every band's value of a local integer (e.g. its token count), in band order."""
        if self.size == 1:
            return [int(n)]
        bufs = self._all_gather_equal(torch.tensor([int(n)], dtype=torch.int64, device=device), kind)
        return [int(b.item()) for b in bufs]

    def _gather_uneven(self, x: torch.Tensor, dim: int, kind: str, sizes: Sequence[int] | None) -> torch.Tensor:
        if self.size == 1:
            return x
        dim = dim % x.dim()
        own = x.shape[dim]
        if sizes is None:
            sizes = self.exchange_sizes(own, x.device, kind)
        sizes = [int(s) for s in sizes]
        if len(sizes) != self.size or sizes[self._index] != own:
            raise ValueError(f"sizes {sizes} do not fit band {self.index} with {own} entries along dim {dim}")
        m = max(sizes)
        if own < m:
            pad_shape = list(x.shape)
            pad_shape[dim] = m - own
            x = torch.cat([x, x.new_zeros(pad_shape)], dim=dim)  # gloo wants equal shapes
        bufs = self._all_gather_equal(x, kind)
        return torch.cat([b.narrow(dim, 0, s) for b, s in zip(bufs, sizes)], dim=dim)

    def gather_rows(self, x: torch.Tensor, kind: str = "output", sizes: Sequence[int] | None = None) -> torch.Tensor:
        """The full tensor on every rank: bands concatenated along dim -2 in band order.

        ``sizes`` (every band's row count) saves one small collective when the caller knows
        them, e.g. ``band.heights`` at full resolution; otherwise they are exchanged.
        """
        return self._gather_uneven(x, -2, kind, sizes)

    def gather_tokens(
        self, t: torch.Tensor, dim: int = 1, kind: str = "kv", sizes: Sequence[int] | None = None
    ) -> torch.Tensor:
        """All bands' tokens concatenated along ``dim`` in band order (lengths may differ)."""
        return self._gather_uneven(t, dim, kind, sizes)

    def all_to_all(self, chunks: Sequence[torch.Tensor], shapes: Sequence[Sequence[int]],
                   kind: str = "kv") -> list[torch.Tensor]:
        """Send ``chunks[j]`` to band j and receive band j's chunk for this band, of shape ``shapes[j]``
        (sizes may differ per band; point to point, so any backend and uneven bands work). Returns the
        received chunks in band order, this band's own chunk as it is."""
        if len(chunks) != self.size or len(shapes) != self.size:
            raise ValueError(f"all_to_all needs one chunk and one shape per band ({self.size})")
        me = self._index
        out = [chunks[me] if j == me else chunks[me].new_empty(tuple(shapes[j])) for j in range(self.size)]
        if self.size == 1:
            return out
        ops, sent, received = [], 0, 0
        for j, peer in enumerate(self.ranks):
            if j == me:
                continue
            send = chunks[j].contiguous()
            ops.append(dist.P2POp(dist.irecv, out[j], peer, self.group))
            ops.append(dist.P2POp(dist.isend, send, peer, self.group))
            sent, received = sent + tensor_bytes(send), received + tensor_bytes(out[j])
        with self.stats.time(kind):
            for work in batch_isend_irecv(ops):
                work.wait()
        self.stats.add(kind, sent, received)
        return out


def gather_batch(
    x: torch.Tensor, group: Any = None, stats: CommStats | None = None, kind: str = "batch",
    sizes: list[int] | None = None,
) -> torch.Tensor:
    """All-gather along dim 0 between batch groups (CFG parallel: cond on one group, uncond
    on another), in the group's rank order. ``sizes`` gives every group's batch when they differ
    (padded to the largest for the collective, trimmed after). ``group`` covers the peer ranks
    (``ParallelPlan.peer_ranks``); without torch.distributed or with a group of one, ``x`` comes
    back unchanged."""
    if not (dist.is_available() and dist.is_initialized()):
        return x
    size = dist.get_world_size(group)
    if size == 1:
        return x
    if sizes is not None and len(set(sizes)) > 1:
        pad = max(sizes) - x.shape[0]
        xp = torch.cat([x, x.new_zeros((pad, *x.shape[1:]))]) if pad else x
        full = gather_batch(xp, group, stats, kind)
        chunks = full.split(max(sizes), dim=0)
        return torch.cat([c[:n] for c, n in zip(chunks, sizes)], dim=0)
    x = x.contiguous()
    bufs = [torch.empty_like(x) for _ in range(size)]
    if stats is not None:
        with stats.time(kind):
            all_gather(bufs, x, group)
        nbytes = (size - 1) * tensor_bytes(x)
        stats.add(kind, nbytes, nbytes)
    else:
        all_gather(bufs, x, group)
    return torch.cat(bufs, dim=0)
