"""The native engine (cext/engine.pxi + runtime/engine.py) over real sockets, in one process.

Each data-plane thread gets its own "device" (an AF_UNIX datagram socketpair: one read = one
packet, as a tun queue) and its own receive socket on one shared port (SO_REUSEPORT, as the
daemon opens them). The same traffic goes through 1 and through N threads: the same packets
must come out (each flow in its order), and the counters summed over the threads must equal
the single thread's.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

import pytest
from engine_helpers import drain, reuseport_sockets

from overlayd.dataplane.counters import COUNTER_NAMES, DROP_REASONS
from overlayd.dataplane.tables import LOCAL, ForwardingTables, PeerEntry
from overlayd.errors import EX_CONFIG, StartupError
from overlayd.runtime.engine import ThreadedForwarder, choose_engine
from overlayd.wire import ipv4

_dataplane = pytest.importorskip("overlayd._dataplane")

NODE_IP = "127.0.0.2"
LOCAL_ADDRESS = int(IPv4Address("10.0.0.1"))
DEADLINE = 10.0


def A(text: str) -> int:
    return int(IPv4Address(text))


def packet(src: str, dst: str, payload: bytes, ttl: int = 64) -> bytes:
    return ipv4.build_header(source=A(src), destination=A(dst), payload_length=len(payload),
                             protocol=17, ttl=ttl, identification=0) + payload


class EngineRig:
    """N forwarders with their device pairs and receive sockets, two peers, one engine."""

    def __init__(self, threads: int, busy_poll_us: int = 0) -> None:
        self.apps: list[socket.socket] = []
        self.devs: list[socket.socket] = []
        self.socks = reuseport_sockets(NODE_IP, threads)
        for _ in range(threads):
            app, dev = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
            for s in (app, dev):
                s.setblocking(False)
                s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
                s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
            self.apps.append(app)
            self.devs.append(dev)
        self.peers = []
        for i in range(2):
            peer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            peer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
            peer.bind((f"127.0.0.{3 + i}", 0))
            peer.setblocking(False)
            self.peers.append(peer)
        forwarders = [_dataplane.UdpForwarder(d.fileno(), s.fileno(), 64, 1000)
                      for d, s in zip(self.devs, self.socks)]
        self.fwd = ThreadedForwarder(forwarders, [d.fileno() for d in self.devs],
                                     [s.fileno() for s in self.socks], busy_poll_us)
        self.fwd.set_tables(self.tables())
        self.fwd.start()

    def tables(self, reverse: bool = False) -> ForwardingTables:
        order = [1, 0] if reverse else [0, 1]
        peers = tuple(PeerEntry(A(f"127.0.0.{3 + i}"), self.peers[i].getsockname()[1], 1400,
                                name=f"peer{i}") for i in order)
        routes = [(A("10.0.0.0"), 24, LOCAL)]
        routes += [(A(f"10.0.{i + 1}.0"), 24, k) for k, i in enumerate(order)]
        return ForwardingTables(LOCAL_ADDRESS, peers, tuple(routes))

    def close(self) -> None:
        self.fwd.stop()
        for s in self.apps + self.devs + self.socks + self.peers:
            s.close()

    def wait_counts(self, inside: int, outside: int) -> dict[str, int]:
        deadline = time.monotonic() + DEADLINE
        while time.monotonic() < deadline:
            ctr = self.fwd.counters()
            if ctr["inside_packets"] >= inside and ctr["outside_packets"] >= outside:
                return ctr
            time.sleep(0.005)
        raise AssertionError(f"engine did not take the traffic: {self.fwd.counters()}")


def traffic() -> tuple[list[tuple[int, bytes]], list[tuple[int, bytes]]]:
    """(flow, packet) inside and outside: 16 flows, forwarded ones and drops of each kind."""
    inside, outside = [], []
    for seq in range(40):
        for flow in range(16):
            dst = f"10.0.{1 + flow % 2}.{10 + flow}"
            payload = f"f{flow} s{seq}".encode()
            ttl = 1 if (flow == 5 and seq % 4 == 0) else 64            # time exceeded
            inside.append((flow, packet(f"10.0.0.{20 + flow}", dst, payload, ttl)))
            if flow == 7 and seq % 5 == 0:
                inside.append((flow, packet("10.0.0.9", "10.9.0.1", payload)))   # no route
            # outside: peer (flow % 2) sends its subnet's packet to our subnet
            src = f"10.0.{1 + flow % 2}.{10 + flow}"
            bad = flow == 3 and seq % 3 == 0
            outside.append((flow, packet(src if not bad else "10.0.9.9",
                                         f"10.0.0.{20 + flow}", payload)))
    return inside, outside


def run_traffic(threads: int, busy_poll_us: int = 0) -> tuple[Counter, Counter, dict, dict]:
    rig = EngineRig(threads, busy_poll_us)
    try:
        inside, outside = traffic()
        for flow, pkt in inside:            # the tun's flow hash: one flow, one queue
            rig.apps[flow % threads].send(pkt)
        for flow, pkt in outside:
            rig.peers[flow % 2].sendto(pkt, rig.socks[0].getsockname())
        ctr = rig.wait_counts(len(inside), len(outside))
        time.sleep(0.05)
        sent: Counter = Counter()
        order: dict = {}
        for i, peer in enumerate(rig.peers):
            for datagram in drain(peer):
                sent[(i, datagram)] += 1
                order.setdefault(("in", i, datagram[20:].split(b" ")[0]), []).append(datagram)
        delivered: Counter = Counter()
        for app in rig.apps:
            for got in drain(app):
                delivered[got] += 1
                if got[9] == 17:
                    order.setdefault(("out", got[20:].split(b" ")[0]), []).append(got)
        ctr = rig.fwd.counters()
        peers = rig.fwd.peer_counters()
        return sent, delivered, {"ctr": ctr, "peers": peers}, order
    finally:
        rig.close()


def test_one_and_several_threads_forward_the_same_packets_and_count_the_same() -> None:
    one = run_traffic(1)
    two = run_traffic(2)
    four = run_traffic(4)
    for other in (two, four):
        assert other[0] == one[0]                      # same datagrams to the same peers
        assert other[1] == one[1]                      # same packets into the device
        assert other[2]["ctr"] == one[2]["ctr"]        # same counters, summed over threads
        assert other[2]["peers"] == one[2]["peers"]
        for key, packets in other[3].items():          # every flow in its order
            assert packets == one[3][key], key
    ctr = one[2]["ctr"]
    assert ctr["forwarded_packets"] == 630 and ctr["inside_ttl_expired"] == 10
    assert ctr["inside_no_route"] == 8 and ctr["outside_spoofed_source"] == 14
    assert ctr["delivered_packets"] == 640 - 14


def test_busy_poll_forwards_the_same() -> None:
    base = run_traffic(2)
    polled = run_traffic(2, busy_poll_us=200)
    assert polled[0] == base[0] and polled[1] == base[1] and polled[2] == base[2]


def test_table_swaps_and_capture_during_full_rate_traffic_lose_nothing() -> None:
    """Swap the tables 200 times (peer order reversed each time) and drain the capture while
    two threads forward: every packet read is counted once, per-peer counters follow their
    peer, every forwarded packet reaches the peer its destination routes to."""
    rig = EngineRig(2)
    stop = threading.Event()
    sent = [0]

    def push() -> None:
        flow = 0
        while not stop.is_set() and sent[0] < 400_000:
            pkt = packet(f"10.0.0.{20 + flow % 16}", f"10.0.{1 + flow % 2}.7", b"x" * 64)
            try:
                rig.apps[flow % 2].send(pkt)
            except BlockingIOError:
                time.sleep(0.0005)
                continue
            flow += 1
            sent[0] += 1

    pusher = threading.Thread(target=push)
    try:
        rig.fwd.set_capture(True)
        pusher.start()
        captured = 0
        for k in range(200):
            rig.fwd.set_tables(rig.tables(reverse=k % 2 == 0))
            if k % 10 == 0:
                captured += len(rig.fwd.drain_capture())
        rig.fwd.set_tables(rig.tables())
        stop.set()
        pusher.join()
        ctr = rig.wait_counts(sent[0], 0)
        rig.fwd.set_capture(False)
        captured += len(rig.fwd.drain_capture())
        ctr = rig.fwd.counters()
        got = [len(drain(p)) for p in rig.peers]
        drops = sum(ctr[r] for r in DROP_REASONS if r.startswith("inside_"))
        assert ctr["inside_packets"] == sent[0]
        assert ctr["inside_packets"] == ctr["forwarded_packets"] + ctr["tx_error"] + drops
        peers = rig.fwd.peer_counters()
        assert sum(p[0] for p in peers) == ctr["forwarded_packets"]
        assert captured + ctr["capture_dropped"] == ctr["forwarded_packets"]
        if ctr["tx_error"] == 0 and drops == 0:
            # datagrams may be lost only in the peers' receive buffers, never counted twice
            assert sum(got) <= ctr["forwarded_packets"]
            assert peers[0][0] >= got[0] and peers[1][0] >= got[1]
        assert set(COUNTER_NAMES) == set(ctr)
    finally:
        stop.set()
        pusher.join()
        rig.close()


def _tasks() -> set[str]:
    return set(os.listdir("/proc/self/task"))


def _names(tasks: set[str]) -> list[str]:
    out = []
    for task in tasks:
        try:
            with open(f"/proc/self/task/{task}/comm") as f:
                out.append(f.read().strip())
        except FileNotFoundError:
            pass
    return out


def test_no_thread_outlives_the_engine() -> None:
    before = _tasks()
    rig = EngineRig(3)
    started = _tasks() - before
    assert sorted(_names(started)) == ["overlayd-dp0", "overlayd-dp1", "overlayd-dp2"]
    stats = rig.fwd.threads()
    assert [t["thread"] for t in stats] == [0, 1, 2] and all(t["running"] for t in stats)
    rig.close()
    assert not (_tasks() - before)
    rig.fwd.stop()                            # idempotent
    assert not any(t["running"] for t in rig.fwd.threads())


def test_threads_report_their_share() -> None:
    rig = EngineRig(2)
    try:
        for seq in range(300):
            rig.apps[0 if seq < 200 else 1].send(packet("10.0.0.5", "10.0.1.5", b"s"))
        rig.wait_counts(300, 0)
        shares = rig.fwd.threads()
        assert [t["inside_packets"] for t in shares] == [200, 100]
        assert abs(shares[0]["share"] - 2 / 3) < 1e-9
        assert all(t["wakeups"] >= 1 for t in shares)
    finally:
        rig.close()


def test_device_error_detaches_and_attach_restores() -> None:
    """A failing device read takes the device out of that thread's poll set (no spin) and is
    reported; attach_device puts it back once the fd works again."""
    rig = EngineRig(1)
    try:
        spare = os.dup(rig.devs[0].fileno())
        # A listening-less stream socket on the fd number: read() fails with ENOTCONN.
        broken = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        broken.setblocking(False)
        os.dup2(broken.fileno(), rig.devs[0].fileno())
        rig.fwd.detach_device()
        rig.fwd.attach_device()                 # level-triggered: EPOLLHUP at once
        deadline = time.monotonic() + DEADLINE
        while not rig.fwd.device_error() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert rig.fwd.device_error() != 0
        assert not rig.fwd.threads()[0]["device_attached"]
        os.dup2(spare, rig.devs[0].fileno())
        os.close(spare)
        broken.close()
        rig.fwd.attach_device()
        assert rig.fwd.device_error() == 0 and rig.fwd.threads()[0]["device_attached"]
        rig.apps[0].send(packet("10.0.0.5", "10.0.1.5", b"again"))
        rig.wait_counts(1, 0)
        assert rig.fwd.counters()["forwarded_packets"] == 1
    finally:
        rig.close()


def test_auto_threads_follow_the_daemons_cpu_affinity() -> None:
    """Under taskset (or a cpuset, or systemd's CPUAffinity=) "auto" counts the CPUs the daemon
    may use, not the host's: more threads would only take turns on the same CPU."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        pytest.skip("needs 2 usable CPUs to tell the affinity from the host's count")
    probe = ("from overlayd.runtime.engine import choose_engine; "
             "print(choose_engine('auto', 0, 'cython', False)[1])")
    out = subprocess.run(["taskset", "-c", str(cpus[0]), sys.executable, "-c", probe],
                         capture_output=True, text=True, timeout=30, check=True,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.stdout.strip() == "1"


def test_choose_engine() -> None:
    assert choose_engine("auto", 0, "python", False) == ("loop", 1, None)
    assert choose_engine("auto", 0, "cython", False, cpus=2) == ("threads", 2, None)
    assert choose_engine("auto", 0, "cython", False, cpus=16) == ("threads", 4, None)
    assert choose_engine("threads", 6, "cython", False, cpus=2) == ("threads", 6, None)
    assert choose_engine("loop", 4, "cython", False) == ("loop", 1, None)
    engine, count, note = choose_engine("threads", 4, "cython", True)
    assert (engine, count) == ("threads", 1) and note and "switched" in note
    with pytest.raises(StartupError, match="overlayd.toml: dataplane.engine: .*Cython") as e:
        choose_engine("threads", 0, "python", False, where="overlayd.toml")
    assert e.value.exit_code == EX_CONFIG


def test_engine_refuses_bad_arguments() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        fwd: Any = _dataplane.UdpForwarder(b.fileno(), sock.fileno())
        with pytest.raises(ValueError, match="one device fd"):
            _dataplane.NativeEngine([fwd], [b.fileno(), b.fileno()], [sock.fileno()])
        with pytest.raises(ValueError, match="busy_poll_us"):
            _dataplane.NativeEngine([fwd], [b.fileno()], [sock.fileno()], -1)
        with pytest.raises(TypeError):
            _dataplane.NativeEngine([object()], [b.fileno()], [sock.fileno()])
        with pytest.raises(ValueError):
            _dataplane.NativeEngine([], [], [])
    finally:
        for s in (a, b, sock):
            s.close()


def test_a_running_threads_forwarder_refuses_batches_from_python() -> None:
    """Only its thread runs batches: a direct call from Python raises instead of racing it."""
    rig = EngineRig(1)
    try:
        fwd = rig.fwd.forwarders[0]
        with pytest.raises(RuntimeError, match="already running"):
            fwd.inside_batch()
        with pytest.raises(RuntimeError, match="already running"):
            fwd.outside_batch()
        fwd.set_capture(True)       # capture_on is read by the thread; drains need a pause
        rig.apps[0].send(packet("10.0.0.5", "10.0.1.5", b"cap"))
        rig.wait_counts(1, 0)
        with pytest.raises(RuntimeError, match="already running"):
            fwd.drain_capture()
        assert [r[1] for r in rig.fwd.drain_capture()] == [0]
        rig.fwd.stop()
        assert fwd.inside_batch() == 0      # stopped: Python may drive it again
    finally:
        rig.close()


def test_prepared_tables_are_refused_before_any_thread_swaps() -> None:
    """A map the data plane refuses (here: vxlan routed needs every peer's MAC) raises in
    prepare_tables, while every thread still forwards on the old generation."""
    devs = [socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM) for _ in range(2)]
    socks = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(2)]
    try:
        fwds = [_dataplane.VxlanRoutedForwarder(d[1].fileno(), s.fileno(), b"\x02" * 6)
                for d, s in zip(devs, socks)]
        engine = ThreadedForwarder(fwds, [d[1].fileno() for d in devs],
                                   [s.fileno() for s in socks], 0)
        good = ForwardingTables(LOCAL_ADDRESS, (PeerEntry(A("127.0.0.3"), 4789, 1400,
                                                          mac=b"\x02\x00\x00\x00\x00\x03"),),
                                ((A("10.0.1.0"), 24, 0),))
        engine.set_tables(good)
        engine.start()
        bad = ForwardingTables(LOCAL_ADDRESS, (PeerEntry(A("127.0.0.4"), 4789, 1400),), ())
        with pytest.raises(ValueError, match="mac"):
            engine.set_tables(bad)
        assert [len(f.peer_counters()) for f in fwds] == [1, 1]
        engine.stop()
    finally:
        for a, b in devs:
            a.close()
            b.close()
        for s in socks:
            s.close()
