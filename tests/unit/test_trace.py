"""The per-layer exchange trace (parallel/split/trace.py) through CommStats, without torch.distributed."""
from __future__ import annotations

from hires_parallel.parallel.split.comm import CommStats
from hires_parallel.parallel.split.trace import ExchangeTrace, note_layer, summarize


def test_blocking_and_background_exchanges_are_recorded_per_layer_and_step():
    stats = CommStats()
    stats.trace = ExchangeTrace(rank=1)
    for step in range(2):
        stats.trace.begin_call()
        note_layer(stats, label="input_blocks.1.0.in_layers.2")
        with stats.time("halo"):  # a blocking exchange: its wait, then its bytes
            pass
        stats.add("halo", 100, 80)
        note_layer(stats, label="input.1.0.attn1")
        stats.add("kv", 1000, 1000, blocking=False)  # a background exchange started, waited for later
        stats.add_wait("kv", 10.0, 10.5, blocking=False)
        stats.trace.in_flight(0.25)
        stats.trace.end_call(step, 0)
    trace = stats.trace.as_dict()
    assert [e["step"] for e in trace["events"]] == [0, 0, 0, 1, 1, 1]
    halo = [e for e in trace["events"] if e["kind"] == "halo"]
    assert all(e["blocking"] and e["sent"] == 100 and e["received"] == 80 for e in halo)
    assert all(e["layer"] == "input_blocks.1.0.in_layers.2" for e in halo)
    waits = [e for e in trace["events"] if e["kind"] == "kv" and e["wait_s"] > 0]
    assert all(not e["blocking"] and e["in_flight_s"] == 0.25 and e["layer"] == "input.1.0.attn1" for e in waits)
    s = summarize(trace)
    assert s["rank"] == 1 and len(s["steps"]) == 2
    assert s["per_step"]["hidden_s"] == 0.25 and s["per_step"]["sent"] == 1100
    assert s["per_step"]["blocking"] == 1 and s["per_step"]["background"] == 2
    assert s["kinds"]["kv"]["sent"] == 2000 and s["kinds"]["halo"]["blocking"] == 2
    assert s["top_wait_layers"][0]["layer"] == "input.1.0.attn1"
    assert stats.sent == {"halo": 200, "kv": 2000} and abs(stats.seconds["kv"] - 1.0) < 1e-12


def test_no_trace_no_records():
    stats = CommStats()
    note_layer(stats, label="x")  # no trace: nothing to name
    with stats.time("groupnorm"):
        pass
    stats.add("groupnorm", 8, 8)
    assert stats.trace is None and stats.calls == {"groupnorm": 1}
