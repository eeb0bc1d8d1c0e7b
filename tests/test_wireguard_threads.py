"""The wireguard backend on the native threads engine, in one process, over real sockets.

Node B runs N data-plane threads (ThreadedWireguardForwarder: one compiled forwarder, one
"device" and one SO_REUSEPORT socket per thread) with its WireguardRuntime answering what the
threads signal on the engine's notify fd; node A is one forwarder driven from this thread as the
loop engine drives it. Both runtimes are the daemon's own (real WgDevice handshakes, timers);
the test loop (``pump``) plays the daemon's event loop. A's installed keys are recorded so that
B's output can be opened with an independent codec (wg_helpers).
"""

from __future__ import annotations

import os
import random
import select
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

import pytest
from engine_helpers import dataplane_threads, drain, reuseport_sockets, senders_to_each
from wg_helpers import (
    EXPIRY_REJECT_S,
    LoopExpiryDriver,
    check_expiry,
    expiry_packet,
    expiry_scenario,
    expiry_tables,
    expiry_timings,
    open_transport,
    seal_transport,
)

from overlayd.control.config import WireguardConfig
from overlayd.control.wg_noise import generate_private_key, public_key
from overlayd.control.wg_peers import PeerConfig, Send
from overlayd.dataplane.tables import LOCAL, ForwardingTables, PeerEntry
from overlayd.dataplane.wireguard_forwarder import EVENT_HANDSHAKE
from overlayd.runtime.wg_threads import ThreadedWireguardForwarder
from overlayd.runtime.wireguard import WG_TICK_SECONDS, WireguardRuntime
from overlayd.wire import ipv4
from overlayd.wire import wireguard as wg

_dataplane = pytest.importorskip("overlayd._dataplane")

A_IP, B_IP = "127.0.0.2", "127.0.0.3"
A_NET, B_NET = "10.0.1.0", "10.0.2.0"
MTU = 1440
DEADLINE = 10.0


def addr(text: str) -> int:
    return int(IPv4Address(text))


def packet(src: str, dst: str, payload: bytes) -> bytes:
    return ipv4.build_header(source=addr(src), destination=addr(dst),
                             payload_length=len(payload), protocol=17, ttl=64) + payload


def tables(me: str, peer_net: str, peer_ip: str, port: int, key: bytes) -> ForwardingTables:
    peer = PeerEntry(addr(peer_ip), port, MTU, "peer", public_key=key)
    return ForwardingTables(addr(me) + 1, (peer,), ((addr(me), 24, LOCAL),
                                                   (addr(peer_net), 24, 0)))


def device_pair() -> tuple[socket.socket, socket.socket]:
    app, dev = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    for s in (app, dev):
        s.setblocking(False)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    return app, dev


class RecordingForwarder:
    """A's real forwarder, passed through; remembers the keys installed into it."""

    def __init__(self, fw: Any) -> None:
        self.fw = fw
        self.installed: list[tuple[Any, ...]] = []

    def install_keypair(self, *args: Any) -> None:
        self.installed.append(args)
        self.fw.install_keypair(*args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.fw, name)


class Rig:
    def __init__(self, threads: int, **timers: float) -> None:
        config = WireguardConfig(private_key_file=Path("/nonexistent"), **timers)
        ka, kb = generate_private_key(), generate_private_key()
        # A: one forwarder on this thread
        self.a_app, self.a_dev = device_pair()
        self.a_sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.a_sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 << 20)
        self.a_sock.bind((A_IP, 0))
        self.a_sock.setblocking(False)
        a_port = self.a_sock.getsockname()[1]
        self.a_fw = RecordingForwarder(_dataplane.WireguardForwarder(
            self.a_dev.fileno(), self.a_sock.fileno(), wg.mac_key(wg.LABEL_MAC1, public_key(ka))))
        # B: N threads on N devices and N sockets sharing one port
        self.b_apps, self.b_devs = [], []
        self.b_socks = reuseport_sockets(B_IP, threads)
        self.b_senders = senders_to_each(A_IP, self.b_socks)   # from "A", to thread i's socket
        for _ in range(threads):
            app, dev = device_pair()
            self.b_apps.append(app)
            self.b_devs.append(dev)
        b_port = self.b_socks[0].getsockname()[1]
        mac1_b = wg.mac_key(wg.LABEL_MAC1, public_key(kb))
        self.b_fw = ThreadedWireguardForwarder(
            [_dataplane.WireguardForwarder(d.fileno(), s.fileno(), mac1_b)
             for d, s in zip(self.b_devs, self.b_socks, strict=True)],
            [d.fileno() for d in self.b_devs], [s.fileno() for s in self.b_socks], 0)
        self.a_fw.set_tables(tables(A_NET, B_NET, B_IP, b_port, public_key(kb)))
        self.b_fw.set_tables(tables(B_NET, A_NET, A_IP, a_port, public_key(ka)))
        self.a_rt = WireguardRuntime(config, ka, None, self.a_fw, self.a_sock)
        self.b_rt = WireguardRuntime(config, kb, None, self.b_fw, self.b_socks[0])
        for rt, key, ip, port in ((self.a_rt, kb, B_IP, b_port), (self.b_rt, ka, A_IP, a_port)):
            rt.device.set_peers([PeerConfig(public_key(key), 0, (ip, port))])
            rt.device._rng = random.Random(ip)
        self.b_fw.start()
        self.next_tick = time.monotonic()

    def close(self) -> None:
        self.b_fw.stop()
        for s in [self.a_app, self.a_dev, self.a_sock, *self.b_apps, *self.b_devs,
                  *self.b_socks, *self.b_senders]:
            s.close()

    def pump(self, until: Callable[[], bool], timeout: float = DEADLINE,
             a_runs: bool = True) -> None:
        """The daemons' loops until ``until()``: A's batches and events, B's notify fd, both
        runtimes' ticks. ``a_runs=False``: A reads nothing (what reaches it waits)."""
        notify = self.b_fw.notify_fd
        deadline = time.monotonic() + timeout
        while not until():
            assert time.monotonic() < deadline, f"timed out: B {self.b_counters()}"
            fds = [notify] + ([self.a_sock, self.a_dev] if a_runs else [])
            ready = select.select(fds, [], [], 0.01)[0]
            if notify in ready:
                os.read(notify, 8)
                self.b_rt.after_batch()
            if self.a_dev in ready:
                self.a_fw.inside_batch()
                self.a_rt.after_batch()
            if self.a_sock in ready:
                self.a_fw.outside_batch()
                self.a_rt.after_batch()
            if time.monotonic() >= self.next_tick:
                self.next_tick = time.monotonic() + WG_TICK_SECONDS
                if a_runs:
                    self.a_rt.tick()
                self.b_rt.tick()

    def b_counters(self) -> dict[str, int]:
        return {k: v for k, v in self.b_fw.counters().items() if v}

    def a_counters(self) -> dict[str, int]:
        return {k: v for k, v in self.a_fw.counters().items() if v}

    def a_received(self, want: int) -> list[bytes]:
        got: list[bytes] = []
        self.pump(lambda: bool(got.extend(drain(self.a_app))) or len(got) >= want)
        return got

    def session(self) -> None:
        """B starts one by its first packet (the initiator's staging); A gets the packet."""
        self.b_apps[0].send(packet("10.0.2.9", "10.0.1.5", b"first"))
        assert len(self.a_received(1)) == 1

    def a_keys(self) -> tuple[Any, ...]:
        return self.a_fw.installed[-1]   # (peer, local, remote, send key, recv key, initiator)


@pytest.fixture
def rig2() -> Any:
    rig = Rig(2)
    yield rig
    rig.close()


def test_first_packet_is_held_by_the_initiating_thread_and_delivered(rig2: Rig) -> None:
    rig2.b_apps[1].send(packet("10.0.2.9", "10.0.1.5", b"the very first"))
    got = rig2.a_received(1)
    assert [p[20:] for p in got] == [b"the very first"]
    c = rig2.b_counters()
    assert c["wg_staged"] == 1 and c["wg_staged_sent"] == 1
    assert rig2.b_rt.device.stats.initiations_sent >= 1
    assert rig2.b_fw.threads()[1]["inside_packets"] == 1      # thread 1 held and sealed it


def test_responder_threads_hold_their_packets_until_the_session_is_confirmed(
        rig2: Rig) -> None:
    now = time.monotonic()
    rig2.a_rt._apply(rig2.a_rt.device.want_handshake(0, now, time.time_ns()))
    # B answers (its keypair is "next" in both forwarders) while A reads nothing yet
    rig2.pump(lambda: rig2.b_rt.device.stats.responses_sent == 1, a_runs=False)
    for i, app in enumerate(rig2.b_apps):
        app.send(packet("10.0.2.9", "10.0.1.5", f"held on thread {i}".encode()))
    rig2.pump(lambda: rig2.b_counters().get("wg_staged", 0) == 2, a_runs=False)
    assert "forwarded_packets" not in rig2.b_counters()        # nothing sealed unconfirmed
    got = rig2.a_received(2)      # A: response -> keepalive -> B confirms -> sends the held
    assert sorted(p[20:] for p in got) == [b"held on thread 0", b"held on thread 1"]
    c = rig2.b_counters()
    # (staging also asked for B's own handshake: its completion sends a keepalive)
    assert c["wg_staged_sent"] == 2
    assert c["forwarded_packets"] == 2 + c.get("wg_keepalives_sent", 0)
    assert all(t["inside_packets"] == 1 for t in rig2.b_fw.threads())


def test_two_threads_sealing_for_one_peer_never_repeat_a_nonce(rig2: Rig) -> None:
    rig2.session()
    per_thread = 2000

    def push(app: socket.socket, i: int) -> None:
        for seq in range(per_thread):
            data = packet("10.0.2.9", f"10.0.1.{10 + i}", f"{i}:{seq}".encode())
            while True:
                try:
                    app.send(data)
                    break
                except BlockingIOError:
                    time.sleep(0.001)

    pushers = [threading.Thread(target=push, args=(app, i))
               for i, app in enumerate(rig2.b_apps)]
    for t in pushers:
        t.start()
    for t in pushers:
        t.join()
    total = 1 + 2 * per_thread
    # A reads nothing: its socket keeps B's output for the independent codec
    rig2.pump(lambda: rig2.b_counters().get("forwarded_packets", 0)
              - rig2.b_counters().get("wg_keepalives_sent", 0) == total, a_runs=False)
    threads = rig2.b_fw.threads()
    assert [t["inside_packets"] for t in threads] == [1 + per_thread, per_thread]
    recv_key = rig2.a_keys()[4]
    counters, payloads = [], set()
    for datagram in drain(rig2.a_sock):
        _, counter, plain = open_transport(datagram, recv_key)
        counters.append(counter)
        if plain:
            payloads.add(plain[20:ipv4.total_length(plain)])
    assert len(counters) == len(set(counters)), "a nonce was used twice"
    assert len(payloads) == 2 * per_thread        # every packet arrived, opened with the key
    assert max(counters) < len(counters) + 8      # one counter sequence, no gaps to speak of


def test_a_replay_reaching_the_other_thread_is_refused_and_counted(rig2: Rig) -> None:
    rig2.session()
    _, _, remote_index, a_send_key, _, _ = rig2.a_keys()[:6]
    datagram = seal_transport(remote_index, 1_000_000, a_send_key,
                              packet("10.0.1.5", "10.0.2.9", b"once"))
    # 32 source ports: SO_REUSEPORT hashes them over both threads' sockets
    senders = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(32)]
    try:
        for s in senders:
            s.bind((A_IP, 0))
            s.sendto(datagram, (B_IP, rig2.b_socks[0].getsockname()[1]))
            time.sleep(0.001)
        rig2.pump(lambda: rig2.b_counters().get("wg_replay", 0)
                  + rig2.b_counters().get("delivered_packets", 0) >= 32)
    finally:
        for s in senders:
            s.close()
    delivered = [p for app in rig2.b_apps for p in drain(app)]
    assert [p[20:] for p in delivered] == [b"once"]
    assert rig2.b_counters()["wg_replay"] == 31
    per_thread = [f.counters() for f in rig2.b_fw.forwarders]
    refused_elsewhere = [c["wg_replay"] for c in per_thread if not c["delivered_packets"]]
    assert refused_elsewhere and refused_elsewhere[0] > 0     # another thread's socket


def run_traffic(threads: int) -> tuple[Counter, Counter, dict[str, int]]:
    rig = Rig(threads)
    try:
        rig.session()
        outgoing = [(flow, packet("10.0.2.9", f"10.0.1.{10 + flow}", f"{flow}:{seq}".encode()))
                    for seq in range(50) for flow in range(8)]
        incoming = [packet("10.0.1.5", f"10.0.2.{10 + flow}", f"in {flow}:{seq}".encode())
                    for seq in range(50) for flow in range(8)]
        for flow, data in outgoing:             # the tun's flow hash: one flow, one queue
            rig.b_apps[flow % threads].send(data)
        for data in incoming:
            rig.a_app.send(data)
        got_a = Counter(p[20:] for p in rig.a_received(len(outgoing)))
        got_b: Counter = Counter()
        rig.pump(lambda: bool(got_b.update(p[20:] for app in rig.b_apps for p in drain(app)))
                 or sum(got_b.values()) >= len(incoming))
        return got_a, got_b, rig.b_counters()
    finally:
        rig.close()


def test_one_and_two_threads_deliver_the_same_and_count_the_same() -> None:
    one = run_traffic(1)
    two = run_traffic(2)
    assert one[0] == two[0] and sum(one[0].values()) == 400
    assert one[1] == two[1] and sum(one[1].values()) == 400
    assert one[2] == two[2]


def test_rekey_on_a_short_timer_while_two_threads_carry_traffic() -> None:
    rig = Rig(2, rekey_after_seconds=0.5, rekey_timeout_seconds=0.2)
    stop = threading.Event()
    sent = [0, 0]

    def push(i: int) -> None:
        while not stop.is_set():
            rig.b_apps[i].send(packet("10.0.2.9", f"10.0.1.{10 + i}", f"{i}".encode()))
            sent[i] += 1
            time.sleep(0.002)

    try:
        rig.session()
        pushers = [threading.Thread(target=push, args=(i,)) for i in range(2)]
        for t in pushers:
            t.start()
        rig.pump(lambda: rig.b_rt.device.stats.handshakes_completed >= 5, timeout=15.0)
        stop.set()
        for t in pushers:
            t.join()
        got = rig.a_received(sum(sent))                   # (the first one came in session())
        assert len(got) == sum(sent)                      # nothing lost across the rekeys
        assert all(t["inside_packets"] > 50 for t in rig.b_fw.threads())
        a = rig.a_counters()
        for reason in ("wg_replay", "wg_decrypt_failed", "wg_unknown_index", "wg_stale_keypair"):
            assert reason not in a, a
        assert len(rig.a_fw.installed) >= 5              # A took every new keypair
    finally:
        stop.set()
        rig.close()


def test_no_wireguard_thread_outlives_its_engine() -> None:
    rig = Rig(2)
    try:
        rig.session()
        assert dataplane_threads() == ["overlayd-dp0", "overlayd-dp1"]
    finally:
        rig.close()
    assert dataplane_threads() == []


class PauseCount:
    """The engine as ThreadedForwarder uses it, counting the pauses it asks for per thread."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self.pauses: Counter = Counter()

    def pause(self, i: int) -> None:
        self.pauses[i] += 1
        self.engine.pause(i)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.engine, name)


def test_the_control_tick_pauses_no_thread(rig2: Rig) -> None:
    """The 0.1 s tick (the clock, the activity times, the timers) and a drain leave the
    threads running; before, each tick paused every thread once, and a drain each thread
    with events queued."""
    rig2.session()
    counting = PauseCount(rig2.b_fw.engine)
    rig2.b_fw.engine = counting
    for _ in range(20):
        rig2.b_rt.tick()
        rig2.b_rt.after_batch()
    assert counting.pauses == Counter()
    # a handshake message reaching thread 1 only: drained whole, with no pause (the ring)
    senders = rig2.b_senders
    init = next(a for a in rig2.a_rt.device.want_handshake(0, time.monotonic(), time.time_ns())
                if isinstance(a, Send))
    senders[1].sendto(init.datagram, rig2.b_socks[0].getsockname())
    deadline = time.monotonic() + DEADLINE
    while not rig2.b_fw.forwarders[1].queued_events:
        assert time.monotonic() < deadline
        time.sleep(0.001)
    events = rig2.b_fw.drain_events()
    assert [(kind, len(message)) for kind, _, message, _ in events] == [
        (EVENT_HANDSHAKE, wg.INITIATION_LEN)]
    assert rig2.b_fw.forwarders[1].queued_events == 0
    assert counting.pauses == Counter()


class RaceOnInstall:
    """Forwarder 0 of B, passed through, except that right after its keypair went in (its held
    packet left) the peer's answer under that keypair is sent to thread 1's socket, and thread
    1 is given the time to take it, as a fast peer's answer would be."""

    def __init__(self, rig: Rig) -> None:
        self.fw = rig.b_fw.forwarders[0]
        self.rig = rig
        self.answered = False

    def install_keypair(self, *args: Any) -> None:
        self.fw.install_keypair(*args)
        if self.answered:
            return
        self.answered = True
        local_index, recv_key = args[1], args[4]
        other = self.rig.b_fw.forwarders[1]
        before = other.counters()["outside_packets"]
        self.rig.b_senders[1].sendto(
            seal_transport(local_index, 0, recv_key, packet("10.0.1.5", "10.0.2.9", b"answer")),
            self.rig.b_socks[0].getsockname())
        deadline = time.monotonic() + 0.3     # a running thread takes it within microseconds
        while other.counters()["outside_packets"] == before and time.monotonic() < deadline:
            time.sleep(0.001)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.fw, name)


def test_an_answer_reaching_another_thread_during_the_install_is_delivered(rig2: Rig) -> None:
    """The install race of issue 12, in process: B's thread 0 holds the first packet; its
    keypair install sends it, and the peer's answer arrives on thread 1's socket before the
    install returns. Installed into every thread at once, thread 1 is paused until it has the
    keypair too and delivers the answer; installed thread by thread, thread 1 would take the
    answer first and refuse it (wg_unknown_index): the first ping lost."""
    race = RaceOnInstall(rig2)
    rig2.b_fw.forwarders[0] = race
    rig2.b_apps[0].send(packet("10.0.2.9", "10.0.1.5", b"first"))
    assert [p[20:] for p in rig2.a_received(1)] == [b"first"]
    assert race.answered
    got: list[bytes] = []
    rig2.pump(lambda: bool(got.extend(drain(rig2.b_apps[1]))) or bool(got)
              or "wg_unknown_index" in rig2.b_counters())
    assert "wg_unknown_index" not in rig2.b_counters(), rig2.b_counters()
    assert [p[20:] for p in got] == [b"answer"]
    assert rig2.b_fw.forwarders[1].counters()["delivered_packets"] == 1    # on thread 1


class ThreadExpiryDriver:
    """The expiry scenario on N native threads: no set_now drives the clock, each thread steps
    its own (before each batch, and when a keypair falls due while it sleeps). set_now comes
    only where the runtime gives it: before an install (after_batch) and before sessions()
    (the tick), with no pause of its own."""

    def __init__(self, threads: int) -> None:
        self.forwarders = threads
        self.apps, self.devs = zip(*(device_pair() for _ in range(threads)), strict=True)
        self.socks = reuseport_sockets(B_IP, threads)
        self.senders = senders_to_each(A_IP, self.socks)
        self.sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sink.bind((A_IP, 0))
        mac1 = wg.mac_key(wg.LABEL_MAC1, bytes(32))
        self.fw = ThreadedWireguardForwarder(
            [_dataplane.WireguardForwarder(d.fileno(), s.fileno(), mac1)
             for d, s in zip(self.devs, self.socks, strict=True)],
            [d.fileno() for d in self.devs], [s.fileno() for s in self.socks], 0)
        self.fw.set_timings(*expiry_timings())
        self.fw.set_tables(expiry_tables(*self.sink.getsockname()))
        self.fw.start()
        self.t0 = time.monotonic()

    def close(self) -> None:
        self.fw.stop()
        for s in (*self.apps, *self.devs, *self.socks, *self.senders, self.sink):
            s.close()

    def at(self, t: float) -> None:
        time.sleep(max(0.0, self.t0 + t * EXPIRY_REJECT_S - time.monotonic()))

    def install(self, local: int, remote: int, send_key: bytes, recv_key: bytes) -> Any:
        self.fw.set_now(time.monotonic())
        return self.fw.install_keypair(0, local, remote, send_key, recv_key, True)

    def _wait(self, name: str, want: int) -> None:
        deadline = time.monotonic() + DEADLINE
        while self.fw.counters()[name] < want:
            assert time.monotonic() < deadline, f"{name} stays below {want}"
            time.sleep(0.001)

    def probe(self, local: int, counters: list[int], recv_key: bytes) -> None:
        want = self.fw.counters()["outside_packets"] + len(counters)
        for i, counter in enumerate(counters):
            datagram = seal_transport(local, counter, recv_key, expiry_packet(
                "10.0.1.5", "10.0.2.9", counter.to_bytes(2, "big")))
            self.senders[i % len(self.senders)].sendto(datagram, self.socks[0].getsockname())
        self._wait("outside_packets", want)

    def inside(self) -> None:
        want = self.fw.counters()["inside_packets"] + len(self.apps)
        for i, app in enumerate(self.apps):
            app.send(expiry_packet("10.0.2.9", "10.0.1.5", bytes([i])))
        self._wait("inside_packets", want)

    def counters(self) -> dict[str, int]:
        return {k: v for k, v in self.fw.counters().items() if v}

    def sessions(self) -> list[tuple[int, float]]:
        self.fw.set_now(time.monotonic())
        return self.fw.sessions()


def test_thread_clocks_zero_keypairs_as_set_now_does() -> None:
    """Parity of expiry between the engines: the scenario on 2 threads (their own clocks; an
    idle thread zeroes a keypair on time, unpaused) gives what one forwarder driven by set_now
    gives: the same refusals by reason, the same counters, the same sessions."""
    loop = LoopExpiryDriver(_dataplane)
    try:
        by_set_now = expiry_scenario(loop)
    finally:
        loop.close()
    threads = ThreadExpiryDriver(2)
    try:
        by_clock = expiry_scenario(threads)
        assert all(t["running"] for t in threads.fw.threads())
    finally:
        threads.close()
    check_expiry(by_set_now)
    check_expiry(by_clock, age_slack=0.25)      # real time: ages read at some point of a step
    for (held, counters, _), (held2, counters2, _) in zip(by_set_now, by_clock, strict=True):
        assert held == held2 and counters == counters2


def engine_pauses(fw: Any) -> int:
    """Pauses the threads acknowledged so far (the engine's own count)."""
    return sum(t["pauses"] for t in fw.threads())


def senders_to_thread(rig: Rig, thread: int, ip: str, key: Any, counter: list[int]) -> Any:
    """A UDP socket on ``ip`` whose datagrams reach B's thread ``thread`` (found by sending
    keepalives sealed under A's keypair and watching which thread counted it)."""
    for _ in range(256):
        sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sender.bind((ip, 0))
        before = [f.counters()["wg_keepalives_received"] for f in rig.b_fw.forwarders]
        sender.sendto(seal_transport(key[2], counter[0], key[3], b""),
                      rig.b_socks[0].getsockname())
        counter[0] += 1
        deadline = time.monotonic() + DEADLINE
        while True:
            after = [f.counters()["wg_keepalives_received"] for f in rig.b_fw.forwarders]
            if after != before:
                break
            assert time.monotonic() < deadline, "a keepalive was not taken"
            time.sleep(0.001)
        if after[thread] > before[thread]:
            return sender
        sender.close()
    raise AssertionError(f"no source port of {ip} reaches thread {thread}")


def test_status_reads_a_roaming_endpoint_whole_without_pausing(rig2: Rig) -> None:
    """Thread 0 roams B's peer between two addresses (different IP and port) under a stream of
    keepalives while status reads endpoints() in a tight loop: every value read is one of the
    addresses whole (a torn read would mix one's IP with the other's port), roams are seen, and
    no thread is paused (before, each read paused thread 0)."""
    rig2.session()
    key, counter = rig2.a_keys(), [1 << 20]
    roamers = [senders_to_thread(rig2, 0, ip, key, counter) for ip in ("127.0.0.5", "127.0.0.6")]
    whole = {(ip, s.getsockname()[1]) for s, ip in zip(roamers, ("127.0.0.5", "127.0.0.6"))}
    counting = PauseCount(rig2.b_fw.engine)
    rig2.b_fw.engine = counting
    pauses_before = engine_pauses(rig2.b_fw)
    seen: Counter = Counter()
    deadline = time.monotonic() + 1.5
    for k in range(4000):
        roamers[k % 2].sendto(seal_transport(key[2], counter[0], key[3], b""),
                              rig2.b_socks[0].getsockname())
        counter[0] += 1
        for _ in range(20):
            seen[rig2.b_fw.endpoints()[0]] += 1
            rig2.b_fw.sessions()
        if time.monotonic() > deadline:
            break
    assert set(seen) <= whole | {(A_IP, rig2.a_sock.getsockname()[1])}, seen
    assert len(set(seen) & whole) == 2, seen          # both addresses were read as current
    assert counting.pauses == Counter()
    assert engine_pauses(rig2.b_fw) == pauses_before
    for s in roamers:
        s.close()


def test_status_reads_a_confirmation_whole_without_pausing(rig2: Rig) -> None:
    """Rounds of: a responder keypair goes in as "next" (the install pauses), then a datagram
    under it reaches thread 0, whose batch promotes it (drops the previous one, moves the
    slots) while status reads sessions() in a tight loop. Each read is a whole state: the
    older current's age with the new one still "next" (three keypairs held), or the new one's
    age with two held - never a mix - and the reads pause no thread."""
    fw = rig2.b_fw
    gap = 0.2                                          # between two installs: ages differ
    rng = random.Random(7)
    states: Counter = Counter()
    for r in range(6):
        fw.set_now(time.monotonic())
        recv_key = rng.randbytes(32)
        fw.install_keypair(0, 5000 + r, 6000 + r, rng.randbytes(32), recv_key, r == 0)
        before = engine_pauses(fw)
        promoted = False
        deadline = time.monotonic() + DEADLINE
        reads = 0
        while reads < 2000 or not promoted:
            assert time.monotonic() < deadline, states
            if reads == 200:                           # the promotion lands amid the reads
                rig2.b_senders[0].sendto(seal_transport(5000 + r, 0, recv_key, b""),
                                         rig2.b_socks[0].getsockname())
            fw.set_now(time.monotonic())
            ((usable, age),) = fw.sessions()
            reads += 1
            if r == 0:                                 # the initiator's: current at once
                assert (usable, age < gap / 2) == (1, True), (usable, age)
                promoted = True
                continue
            if usable == 2 and age < gap / 2:
                promoted = True
                states["after"] += 1
            else:
                # before: the current one and the new "next" (and from round 2 the previous)
                assert not promoted and usable == min(r + 1, 3) and age >= gap * 0.9, \
                    (r, usable, age)
                states["before"] += 1
        assert engine_pauses(fw) == before, r
        time.sleep(gap)
    assert states["before"] >= 5 * 200 and states["after"] > 0, states


def handshake_pauses(threads: int, b_starts: bool) -> int:
    rig = Rig(threads)
    try:
        counting = PauseCount(rig.b_fw.engine)
        rig.b_fw.engine = counting
        if b_starts:
            rig.session()
        else:
            rig.a_app.send(packet("10.0.1.5", "10.0.2.9", b"first"))
            got: list[bytes] = []
            rig.pump(lambda: bool(got.extend(drain(rig.b_apps[0]) + drain(rig.b_apps[1])))
                     or bool(got))
        end = time.monotonic() + 0.5                   # the confirmation's drain included
        rig.pump(lambda: time.monotonic() > end)
        assert rig.b_fw.sessions()[0][0] >= 1
        return sum(counting.pauses.values())
    finally:
        rig.close()


def test_a_handshake_pauses_only_the_threads_it_changes() -> None:
    """Two threads. B responding: the install (every thread at once) and the confirmation of
    the thread that did not see the first message: 3 (10 before: the drains of the initiation
    and of the confirmation paused their thread, the handshake's endpoint, already B's, was set
    on both, both were confirmed, both asked for packets neither held). B initiating: the
    install and the keepalive: 3 (7 before)."""
    assert handshake_pauses(2, b_starts=False) == 2 + 1
    assert handshake_pauses(2, b_starts=True) == 2 + 1
