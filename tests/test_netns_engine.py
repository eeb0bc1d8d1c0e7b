"""The native engine in real daemons: two data-plane threads on a multi-queue device and two
SO_REUSEPORT sockets, under TCP traffic, through a reload and a device recreation."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dpkt
import pytest
from engine_helpers import dataplane_threads
from netns_helpers import NETNS_MARKS, logs, wait_for

from overlayd.lab import HostSpec, Lab
from overlayd.ops import capture
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
    assert "2 native threads, steering flow" in text and "thread 1 (CPU" in text
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


def test_capture_during_two_thread_traffic_loses_nothing(lab: Lab, tmp_path: Path) -> None:
    """`overlayd capture` switched on and off on a daemon whose two threads forward a 400 MB
    transfer (on while it runs, off when it has its records): the transfer arrives whole, the capture holds the records it asked for, each a
    well-formed packet of this overlay from either direction, and copying stops afterwards."""
    host1, host2 = lab.host("host1"), lab.host("host2")
    n = 3000
    out_file = tmp_path / "threads.pcap"
    out: list[Any] = []
    sender = threading.Thread(target=lambda: out.append(
        lab.tcp_transfer("host1", "host2", 400 << 20, timeout_s=120.0)))
    sender.start()
    proc = None
    try:
        assert wait_for(lambda: lab.control("host1", "status")["traffic"]["inside_packets"]
                        > 1000, timeout_s=20.0), logs(lab)
        proc = subprocess.Popen([sys.executable, "-m", "overlayd", "capture", "--socket",
                                 str(host1.control_socket), "-w", str(out_file),
                                 "--count", str(n), "--seconds", "30"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        _, err = proc.communicate(timeout=40)
        toggled_off_during_traffic = sender.is_alive()
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(5)
        sender.join(timeout=150)
    assert proc.returncode == 0, err
    assert toggled_off_during_traffic, "the transfer ended before the capture had its records"
    (result,) = out
    assert result.bytes_ok and result.sha256_ok, (result, logs(lab))
    with open(out_file, "rb") as f:
        frames = [dpkt.sll.SLL(buf) for _, buf in dpkt.pcap.Reader(f)]
    assert len(frames) == n, err
    overlay = {host1.overlay_ip, host2.overlay_ip}
    kinds = set()
    for frame in frames:
        ip = dpkt.ip.IP(bytes(frame.data))
        assert {socket.inet_ntoa(ip.src), socket.inet_ntoa(ip.dst)} == overlay
        assert isinstance(ip.data, dpkt.tcp.TCP)
        kinds.add(frame.type)
    # Data toward host2 (read from the device) and its ACKs back (received from the peer).
    assert kinds == {capture.PACKET_OUTGOING, capture.PACKET_HOST}
    assert wait_for(lambda: lab.control("host1", "status")["capture"]["sessions"] == 0,
                    timeout_s=10.0)
    status = lab.control("host1", "status")
    assert len(status["engine"]["threads"]) == 2
    assert all(t["device_attached"] for t in status["engine"]["threads"])
    drops = {k: v for k, v in status["drops"].items() if v}
    assert not drops, drops


def test_stopped_daemon_joins_its_threads(lab: Lab) -> None:
    host = lab.host("host2")
    assert host.daemon.pid is not None
    assert lab.stop_daemon("host2") == 0
    text = host.log_path.read_text(errors="replace")
    assert "Traceback" not in text and "stopping" in text
