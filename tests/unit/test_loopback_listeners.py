"""Nothing of a warm pool listens beyond this machine: the rendezvous store, gloo's pairs and the control
socket are on loopback only (torch's own tcp:// rendezvous would listen on every interface)."""
from __future__ import annotations

import ipaddress
import os

import psutil

from hires_parallel.parallel.runtime.pool import WorkerPool
from support.pool_jobs import RankSumJob


def _listeners(pid: int) -> list[str]:
    return [c.laddr.ip for c in psutil.Process(pid).net_connections("inet") if c.status == psutil.CONN_LISTEN]


def _loopback(ip: str) -> bool:
    addr = ipaddress.ip_address(ip.split("%")[0])
    mapped = getattr(addr, "ipv4_mapped", None)
    return (mapped or addr).is_loopback


def test_warm_pool_listens_on_loopback_only() -> None:
    with WorkerPool(["cpu", "cpu", "cpu"], threads_per_worker=1) as pool:
        assert pool.run(RankSumJob()).value["sum"] == 3
        rank0 = pool.pids[0]
        seen = {pid: _listeners(pid) for pid in pool.pids}
        seen[os.getpid()] = _listeners(os.getpid())
    print(f"\n[listen] {seen}")
    assert seen[rank0], "rank 0 should hold the rendezvous store's listener"
    outside = {pid: [ip for ip in ips if not _loopback(ip)] for pid, ips in seen.items()}
    assert not any(outside.values()), f"listeners on non-loopback addresses: {outside}"


def test_loopback_check_itself() -> None:
    assert _loopback("127.0.0.1") and _loopback("::1") and _loopback("::ffff:127.0.0.1")
    assert not _loopback("0.0.0.0") and not _loopback("::") and not _loopback("192.168.1.4")
