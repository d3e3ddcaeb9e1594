"""A real ComfyUI server (started with --listen 127.0.0.1, as the harness does) with a warm worker pool: no
process of it, server or worker, listens on anything but loopback (the rendezvous store included)."""
from __future__ import annotations

import ipaddress

import psutil

from .test_web_routes import _prompt


def _non_loopback_listeners(pid: int) -> list[str]:
    out = []
    for c in psutil.Process(pid).net_connections("inet"):
        if c.status != psutil.CONN_LISTEN:
            continue
        addr = ipaddress.ip_address(c.laddr.ip.split("%")[0])
        if not (getattr(addr, "ipv4_mapped", None) or addr).is_loopback:
            out.append(f"{c.laddr.ip}:{c.laddr.port}")
    return out


def test_server_and_warm_workers_listen_on_loopback_only(comfy_server, test_pack):
    comfy_server.run(_prompt(steps=1), timeout=300)
    workers = comfy_server.get("/hires_parallel/status").json()["pool"]["pids"]
    assert len(workers) == 2
    pids = [comfy_server.proc.pid, *workers]
    seen = {pid: _non_loopback_listeners(pid) for pid in pids}
    listening = {pid: [f"{c.laddr.ip}:{c.laddr.port}" for c in psutil.Process(pid).net_connections("inet")
                       if c.status == psutil.CONN_LISTEN] for pid in pids}
    print(f"\n[listen] server {pids[0]}, workers {workers}: {listening}")
    assert any(listening[w] for w in workers), "rank 0 should hold the rendezvous store"
    assert not any(seen.values()), seen
