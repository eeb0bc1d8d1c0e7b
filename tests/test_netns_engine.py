"""The native engine in real daemons: two data-plane threads on a multi-queue device and two
SO_REUSEPORT sockets, under TCP traffic, through a reload and a device recreation."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from engine_helpers import dataplane_threads
from netns_helpers import NETNS_MARKS, logs, wait_for

from overlayd.lab import HostSpec, Lab
from overlayd.ops.tables import render_status

pytestmark = [*NETNS_MARKS,
              pytest.mark.skipif(os.environ.get("OVERLAYD_DATAPLANE") == "python",
                                 reason="the threads engine drives the compiled data plane")]

THREADS = {"dataplane": {"engine": "threads", "threads": 2}, "map": {"poll_seconds": 0.2}}


@pytest.fixture(params=[("udp", {}), ("vxlan", {"mode": "routed"})], ids=["udp", "vxlan"])
def lab(request: Any) -> Iterator[Lab]:
    backend, extra = request.param
    with Lab([HostSpec(config_extra=THREADS), HostSpec(config_extra=THREADS)],
             backend=backend, backend_extra=extra,
             cidr="10.79.0.0/16", underlay="192.168.79.0/24") as lab:
        lab.wait_mesh(timeout_s=20.0)
        yield lab


def test_two_threads_forward_tcp_and_status_shows_their_share(lab: Lab) -> None:
    pid = lab.host("host1").daemon.pid
    assert pid is not None and dataplane_threads(pid) == ["overlayd-dp0", "overlayd-dp1"]
    result = lab.tcp_transfer("host1", "host2", 20 << 20)
    assert result.bytes_ok and result.sha256_ok, result
    status = lab.control("host1", "status")
    engine = status["engine"]
    assert engine["kind"] == "threads" and len(engine["threads"]) == 2
    threads = engine["threads"]
    assert sum(t["inside_packets"] for t in threads) == status["traffic"]["inside_packets"]
    assert sum(t["outside_packets"] for t in threads) == status["traffic"]["outside_packets"]
    assert abs(sum(t["share"] for t in threads) - 1.0) < 1e-6
    text = render_status(status)
    assert "2 native threads" in text and "thread 1:" in text
    drops = {k: v for k, v in status["drops"].items() if v}
    assert not drops, drops


def test_reload_and_device_recreation_during_traffic(lab: Lab) -> None:
    """A 60 MB transfer through a SIGHUP reload and a deleted-and-recreated device on the
    receiving side arrives whole (TCP retransmits what the missing device dropped)."""
    out: list[Any] = []
    sender = threading.Thread(target=lambda: out.append(
        lab.tcp_transfer("host1", "host2", 60 << 20, timeout_s=90.0)))
    sender.start()
    try:
        time.sleep(0.5)
        for _ in range(5):
            os.kill(lab.host("host2").daemon.pid, signal.SIGHUP)   # type: ignore[arg-type]
            time.sleep(0.1)
        lab.exec("host2", ["ip", "link", "del", "overlay0"])
        assert wait_for(lambda: lab.control("host2", "status")["device"]["recreations"] == 1,
                        timeout_s=5.0), logs(lab)
    finally:
        sender.join(timeout=120)
    (result,) = out
    assert result.bytes_ok and result.sha256_ok, (result, logs(lab))
    status = lab.control("host2", "status")
    assert all(t["device_attached"] for t in status["engine"]["threads"])
    assert lab.ping("host1", "host2", count=3, interval_s=0.05).ok


def test_stopped_daemon_joins_its_threads(lab: Lab) -> None:
    host = lab.host("host2")
    assert host.daemon.pid is not None
    assert lab.stop_daemon("host2") == 0
    text = host.log_path.read_text(errors="replace")
    assert "Traceback" not in text and "stopping" in text
