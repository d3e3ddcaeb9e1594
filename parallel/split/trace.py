"""Per-layer exchange trace of a patch-parallel run (opt-in; off costs one attribute test per exchange).

For each rank and step it records every exchange: the layer that asked for it, its kind, bytes sent and
received, whether the rank blocked on it (exact exchanges, the synchronous parts of the stale modes) or
it ran in the background (displaced / partial buckets, overlapped exact exchanges), the compute time
between the end of the previous exchange (or the start of the model call) and this one, and the time
spent waiting in it. Times are ``time.perf_counter`` seconds, which on one machine is one clock for all
processes, so the ranks' timelines line up.

The trace rides on ``CommStats`` (``stats.trace``): the exchange primitives already time and count every
exchange there, so no primitive needs a second set of hooks. The model hooks name the layer before they
exchange (``note_layer``).
"""
from __future__ import annotations

import time as _time
from typing import Any

__all__ = ["ExchangeTrace", "note_layer", "summarize", "TRACE_ENV"]

TRACE_ENV = "HIRES_PARALLEL_TRACE"  # "1": every patch-parallel run keeps a trace (Pool Status prints it)


class ExchangeTrace:
    """One rank's exchanges, in the order they happened."""

    def __init__(self, rank: int) -> None:
        self.rank = int(rank)
        self.events: list[dict[str, Any]] = []
        self.calls: list[dict[str, Any]] = []
        self.names: dict[int, str] = {}  # id(module) -> its name in the model, for note_layer
        self.layer = ""
        self._call_start: float | None = None
        self._call_first = 0
        self._last_end = 0.0
        self._pending: dict[str, Any] | None = None

    # ------------------------------------------------------------------ the model call
    def begin_call(self) -> None:
        now = _time.perf_counter()
        self._call_start, self._last_end, self._call_first = now, now, len(self.events)
        self.layer, self._pending = "", None

    def end_call(self, step: int, slot: int) -> None:
        """Close the call begun last: its events get their step; the compute after its last exchange
        is the call's ``tail_s``."""
        if self._call_start is None:
            return
        now = _time.perf_counter()
        for ev in self.events[self._call_first:]:
            ev["step"], ev["slot"] = step, slot
        self.calls.append({"step": step, "slot": slot, "t0": self._call_start, "t1": now,
                           "tail_s": now - self._last_end, "events": len(self.events) - self._call_first})
        self._call_start, self._pending = None, None

    # ------------------------------------------------------------------ from CommStats
    def waited(self, kind: str, t0: float, t1: float, blocking: bool = True) -> None:
        """A wait of ``t1 - t0`` seconds in an exchange of ``kind`` (its bytes follow in ``counted``)."""
        ev = {"layer": self.layer, "kind": kind, "sent": 0, "received": 0, "blocking": blocking,
              "t0": t0, "compute_s": max(0.0, t0 - self._last_end), "wait_s": t1 - t0}
        self._append(ev)
        self._pending = ev
        self._last_end = t1

    def in_flight(self, seconds: float) -> None:
        """The background exchange just waited for travelled ``seconds`` while this rank computed."""
        if self._pending is not None:
            self._pending["in_flight_s"] = seconds

    def counted(self, kind: str, sent: int, received: int, blocking: bool = True) -> None:
        """Bytes of an exchange: those of the wait just recorded, or a background exchange started here
        (no wait yet: it is waited for later, maybe by another layer)."""
        ev = self._pending
        if ev is not None and ev["kind"] == kind and not ev["sent"] and not ev["received"]:
            ev["sent"], ev["received"] = int(sent), int(received)
            self._pending = None
            return
        now = _time.perf_counter()
        self._append({"layer": self.layer, "kind": kind, "sent": int(sent), "received": int(received),
                      "blocking": blocking, "t0": now, "compute_s": max(0.0, now - self._last_end), "wait_s": 0.0})
        self._last_end = now
        self._pending = None

    def _append(self, ev: dict[str, Any]) -> None:
        if self._call_start is None and self.calls:  # after the last call (the final drain): its step's
            ev["step"], ev["slot"] = self.calls[-1]["step"], self.calls[-1]["slot"]
            ev["compute_s"] = 0.0
        self.events.append(ev)

    def as_dict(self) -> dict[str, Any]:
        return {"rank": self.rank, "events": list(self.events), "calls": list(self.calls)}


def note_layer(stats: Any, module: Any = None, label: str | None = None) -> None:
    """Name the layer whose exchanges follow (no-op without a trace)."""
    tr = getattr(stats, "trace", None)
    if tr is not None:
        tr.layer = label if label is not None else tr.names.get(id(module), type(module).__name__)


def summarize(trace: dict[str, Any]) -> dict[str, Any]:
    """Per step and per kind totals of one rank's trace (``ExchangeTrace.as_dict``): compute and wait
    seconds, blocking and background exchanges, bytes, and the layers that waited longest."""
    steps: dict[int, dict[str, Any]] = {}
    kinds: dict[str, dict[str, Any]] = {}
    layers: dict[str, float] = {}
    def row(step: int) -> dict[str, Any]:
        if step not in steps:
            steps[step] = {"step": step, "compute_s": 0.0, "wait_s": 0.0, "hidden_s": 0.0, "blocking": 0,
                           "background": 0, "sent": 0}
        return steps[step]

    for ev in trace.get("events", []):
        st = row(ev.get("step", -1))
        st["compute_s"] += ev["compute_s"]
        st["wait_s"] += ev["wait_s"]
        st["blocking" if ev["blocking"] else "background"] += 1
        st["sent"] += ev["sent"]
        st["hidden_s"] += ev.get("in_flight_s", 0.0)
        k = kinds.setdefault(ev["kind"], {"count": 0, "blocking": 0, "sent": 0, "wait_s": 0.0})
        k["count"] += 1
        k["blocking"] += int(ev["blocking"])
        k["sent"] += ev["sent"]
        k["wait_s"] += ev["wait_s"]
        if ev["layer"]:
            layers[ev["layer"]] = layers.get(ev["layer"], 0.0) + ev["wait_s"]
    for call in trace.get("calls", []):
        row(call["step"])["compute_s"] += call["tail_s"]
    rows = [steps[k] for k in sorted(steps)]
    for r in rows:
        r["compute_s"], r["wait_s"], r["hidden_s"] = (round(r[k], 4) for k in ("compute_s", "wait_s", "hidden_s"))
    for k in kinds.values():
        k["wait_s"] = round(k["wait_s"], 4)
    top = sorted(layers.items(), key=lambda kv: -kv[1])[:5]
    n = max(1, len(rows))
    return {
        "rank": trace.get("rank"), "steps": rows, "kinds": kinds,
        "per_step": {"compute_s": round(sum(r["compute_s"] for r in rows) / n, 4),
                     "wait_s": round(sum(r["wait_s"] for r in rows) / n, 4),
                     "hidden_s": round(sum(r["hidden_s"] for r in rows) / n, 4),
                     "blocking": sum(r["blocking"] for r in rows) / n,
                     "background": sum(r["background"] for r in rows) / n,
                     "sent": sum(r["sent"] for r in rows) // n},
        "top_wait_layers": [{"layer": name, "wait_s": round(s, 4)} for name, s in top],
    }
