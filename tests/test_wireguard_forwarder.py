"""WireguardForwarder (the transport data plane) over real loopback sockets, without root.

Two nodes, A (127.0.0.2, overlay 10.0.1.0/24) and B (127.0.0.3, overlay 10.0.2.0/24), each a
forwarder over a socketpair "tun" and a UDP socket; their keypairs come from a real handshake
between two WgDevices. The wire is checked with an independent codec (wg_helpers).
"""

from __future__ import annotations

import os
import random
import select
import socket
import struct
from collections.abc import Iterator
from types import ModuleType
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from wg_helpers import (
    LoopExpiryDriver,
    check_expiry,
    expiry_scenario,
    open_transport,
    seal_transport,
)

from overlayd.control.wg_noise import generate_private_key, public_key
from overlayd.control.wg_peers import Install, PeerConfig, Send, WgDevice
from overlayd.dataplane.counters import ALL_DROP_REASONS, identity_violations
from overlayd.dataplane.tables import LOCAL, ForwardingTables, PeerEntry
from overlayd.dataplane.wireguard_forwarder import (
    EVENT_ENDPOINT,
    EVENT_HANDSHAKE,
    EVENT_NEED_HANDSHAKE,
    EVENT_SESSION_CONFIRMED,
)
from overlayd.wire import ipv4
from overlayd.wire import wireguard as wg

A_IP, B_IP, ROAM_IP = "127.0.0.2", "127.0.0.3", "127.0.0.4"
MTU = 1440
UNIX_NS = 1_800_000_000 * 10**9


def packet(src: str, dst: str, payload: bytes = b"hello wireguard") -> bytes:
    return ipv4.build_header(source=ipv4.addr_to_int(src), destination=ipv4.addr_to_int(dst),
                             payload_length=len(payload), protocol=17, ttl=64) + payload


class Node:
    def __init__(self, kernels: ModuleType, ip: str, subnet: str, peer_ip: str,
                 peer_subnet: str, key: bytes, peer_key: bytes) -> None:
        self.app, self.dev = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        for s in (self.app, self.dev):
            s.setblocking(False)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((ip, 0))
        self.sock.setblocking(False)
        self.port = self.sock.getsockname()[1]
        self.key, self.peer_key = key, peer_key
        self.kernels = kernels
        self.device = WgDevice(key, rng=random.Random(ip))
        mac1 = wg.mac_key(wg.LABEL_MAC1, public_key(key))
        self.fw = kernels.WireguardForwarder(self.dev.fileno(), self.sock.fileno(), mac1)
        self.fw.set_now(100.0)
        self.subnet, self.peer_subnet, self.peer_ip = subnet, peer_subnet, peer_ip
        self.ip = ip

    def twin(self, peer_port: int) -> Node:
        """A second forwarder of this node (as a second data-plane thread has): its own device
        and socket, the same key and tables."""
        other = Node(self.kernels, self.ip, self.subnet, self.peer_ip, self.peer_subnet,
                     self.key, self.peer_key)
        other.connect(peer_port)
        return other

    def connect(self, peer_port: int) -> None:
        me = ipv4.addr_to_int(self.subnet.split("/")[0])
        peer = PeerEntry(ipv4.addr_to_int(self.peer_ip), peer_port, MTU, "peer",
                         public_key=public_key(self.peer_key))
        net, plen = self.peer_subnet.split("/")
        mynet, myplen = self.subnet.split("/")
        self.fw.set_tables(ForwardingTables(me + 1, (peer,), (
            (ipv4.addr_to_int(mynet), int(myplen), LOCAL),
            (ipv4.addr_to_int(net), int(plen), 0))))
        self.device.set_peers([PeerConfig(public_key(self.peer_key), 0,
                                          (self.peer_ip, peer_port))])

    def counters(self) -> dict[str, int]:
        return {k: v for k, v in self.fw.counters().items() if v}

    def close(self) -> None:
        for s in (self.app, self.dev, self.sock):
            s.close()


@pytest.fixture
def pair(kernels: ModuleType) -> Iterator[tuple[Node, Node]]:
    ka, kb = generate_private_key(), generate_private_key()
    a = Node(kernels, A_IP, "10.0.1.0/24", B_IP, "10.0.2.0/24", ka, kb)
    b = Node(kernels, B_IP, "10.0.2.0/24", A_IP, "10.0.1.0/24", kb, ka)
    a.connect(b.port)
    b.connect(a.port)
    yield a, b
    a.close()
    b.close()


def wait(sock: socket.socket, timeout: float = 2.0) -> None:
    assert select.select([sock], [], [], timeout)[0], "nothing arrived"


def handshake(a: Node, b: Node, a_twins: tuple[Node, ...] = (),
              b_twins: tuple[Node, ...] = ()) -> tuple[Any, Any]:
    """A real handshake A -> B, through both data planes' handshake queues; each side's keys
    also go into its twins' forwarders with one KeypairShare (as the threads engine does)."""
    init = next(x for x in a.device.want_handshake(0, 100.0, UNIX_NS) if isinstance(x, Send))
    a.sock.sendto(init.datagram, (B_IP, b.port))
    wait(b.sock)
    b.fw.outside_batch()
    events = b.fw.drain_events()
    assert [e[0] for e in events] == [EVENT_HANDSHAKE]
    actions = b.device.handle(events[0][2], events[0][3], 100.0, UNIX_NS)
    b_keys = next(x for x in actions if isinstance(x, Install)).keys
    response = next(x for x in actions if isinstance(x, Send))
    install(b, b_twins, b_keys)
    b.sock.sendto(response.datagram, (A_IP, a.port))
    wait(a.sock)
    a.fw.outside_batch()
    events = a.fw.drain_events()
    actions = a.device.handle(events[0][2], events[0][3], 100.0, UNIX_NS)
    a_keys = next(x for x in actions if isinstance(x, Install)).keys
    install(a, a_twins, a_keys)
    return a_keys, b_keys


def install(node: Node, twins: tuple[Node, ...], keys: Any) -> None:
    share = node.kernels.KeypairShare() if twins else None
    for n in (node, *twins):
        n.fw.install_keypair(0, keys.local_index, keys.remote_index, keys.send_key,
                             keys.recv_key, keys.initiator, share)


def a_to_b(a: Node, b: Node, *packets: bytes) -> list[bytes]:
    for p in packets:
        a.app.send(p)
    a.fw.inside_batch()
    wait(b.sock)
    b.fw.outside_batch()
    out = []
    while select.select([b.app], [], [], 0.2)[0]:
        out.append(b.app.recv(65536))
    return out


def test_sealed_packets_cross_and_arrive_exactly(pair: tuple[Node, Node]) -> None:
    a, b = pair
    a_keys, _ = handshake(a, b)
    sent = [packet("10.0.1.5", "10.0.2.9", os.urandom(n)) for n in (0, 1, 13, 100, 1000)]
    for p in sent:
        a.app.send(p)
    a.fw.inside_batch()
    wire = []
    while select.select([b.sock], [], [], 0.3)[0]:
        wire.append(b.sock.recv(65536))
    assert len(wire) == len(sent)
    for counter, (datagram, p) in enumerate(zip(wire, sent, strict=True)):
        # independent codec: header, counter nonce, padding to 16, ChaCha20-Poly1305
        receiver, got_counter, plain = open_transport(datagram, a_keys.send_key)
        assert receiver == a_keys.remote_index and got_counter == counter
        assert len(plain) % 16 == 0 and plain[:len(p)] == bytes(packet_ttl(p, 63))
        assert len(p) < 20 + 13 or p[20:] not in datagram       # confidential
    # and through B's data plane: B is the responder, so A's first message confirms it
    got = a_to_b(a, b, *sent)
    assert got == [packet_ttl(p, 63) for p in sent]
    assert b.fw.drain_events()[0][0] == EVENT_SESSION_CONFIRMED


def packet_ttl(p: bytes, ttl: int) -> bytes:
    out = bytearray(p)
    out[8] = ttl
    out[10:12] = b"\0\0"
    out[10:12] = ipv4.checksum(out[:20]).to_bytes(2, "big")
    return bytes(out)


def test_responder_sends_only_after_the_session_is_confirmed(pair: tuple[Node, Node]) -> None:
    a, b = pair
    handshake(a, b)
    b.app.send(packet("10.0.2.9", "10.0.1.5", b"held"))
    b.fw.inside_batch()
    assert b.counters()["wg_staged"] == 1        # held: B's keypair is only "next" yet
    assert not select.select([a.sock], [], [], 0.2)[0]
    assert identity_violations(b.fw.counters(), b.fw.peer_counters()) == []
    a.fw.send_keepalive(0)
    wait(b.sock)
    b.fw.outside_batch()
    assert b.counters()["wg_keepalives_received"] == 1
    assert EVENT_SESSION_CONFIRMED in [e[0] for e in b.fw.drain_events()]
    assert b.fw.send_staged(0) == 1             # what the runtime does on that event
    wait(a.sock)
    a.fw.outside_batch()
    assert a.app.recv(65536) == packet_ttl(packet("10.0.2.9", "10.0.1.5", b"held"), 63)
    assert b.counters()["wg_staged_sent"] == 1
    b.app.send(packet("10.0.2.9", "10.0.1.5"))
    b.fw.inside_batch()
    wait(a.sock)
    a.fw.outside_batch()
    assert a.app.recv(65536) == packet_ttl(packet("10.0.2.9", "10.0.1.5"), 63)
    for node in (a, b):     # keepalives and handshakes included
        assert identity_violations(node.fw.counters(), node.fw.peer_counters()) == []


def test_replayed_datagram_is_dropped_and_counted(pair: tuple[Node, Node]) -> None:
    a, b = pair
    handshake(a, b)
    a.app.send(packet("10.0.1.5", "10.0.2.9"))
    a.fw.inside_batch()
    wait(b.sock)
    datagram = b.sock.recv(65536)
    attacker = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    attacker.bind((A_IP, 0))
    for _ in range(3):
        attacker.sendto(datagram, (B_IP, b.port))
    attacker.close()
    wait(b.sock)
    b.fw.outside_batch()
    c = b.counters()
    assert c["delivered_packets"] == 1 and c["wg_replay"] == 2


def test_forgeries_are_dropped_by_reason(pair: tuple[Node, Node]) -> None:
    a, b = pair
    a_keys, _ = handshake(a, b)
    forged = seal_transport(a_keys.remote_index, 5, os.urandom(32),
                            packet("10.0.1.5", "10.0.2.9"))
    unknown = seal_transport(a_keys.remote_index ^ 1, 5, a_keys.send_key,
                             packet("10.0.1.5", "10.0.2.9"))
    bad_mac1 = bytes([1, 0, 0, 0]) + os.urandom(144)
    junk = [b"", b"\x04", b"\x05\0\0\0" + bytes(40), b"\x04\x01\0\0" + bytes(40)]
    stranger = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    stranger.bind(("127.0.0.9", 0))
    for d in [forged, unknown, bad_mac1, *junk]:
        stranger.sendto(d, (B_IP, b.port))
    stranger.close()
    wait(b.sock)
    b.fw.outside_batch()
    c = b.counters()
    assert c["wg_decrypt_failed"] == 1 and c["wg_unknown_index"] == 1
    assert c["wg_bad_mac1"] == 1 and c["wg_bad_message"] == 4
    assert "delivered_packets" not in c and b.fw.drain_events() == []


def test_inner_source_outside_allowed_ips_is_dropped(pair: tuple[Node, Node]) -> None:
    a, b = pair
    handshake(a, b)
    # A's key, A's session, but an inner source A does not own (B's own subnet / elsewhere)
    got = a_to_b(a, b, packet("10.0.3.5", "10.0.2.9"))
    assert got == []
    assert b.counters()["outside_spoofed_source"] == 1


def test_spoofed_inner_source_counted(pair: tuple[Node, Node]) -> None:
    a, b = pair
    a_keys, _ = handshake(a, b)
    # the real key holder seals a packet whose inner source is in no prefix of A
    datagram = seal_transport(a_keys.remote_index, 0, a_keys.send_key,
                              packet("10.0.9.5", "10.0.2.9"))
    a.sock.sendto(datagram, (B_IP, b.port))
    wait(b.sock)
    b.fw.outside_batch()
    assert b.counters()["outside_spoofed_source"] == 1


def test_no_session_asks_for_one_handshake_per_batch(pair: tuple[Node, Node]) -> None:
    a, _ = pair
    for _ in range(5):
        a.app.send(packet("10.0.1.5", "10.0.2.9"))
    a.fw.inside_batch()
    assert a.counters()["wg_staged"] == 5
    assert a.fw.drain_events() == [(EVENT_NEED_HANDSHAKE, 0, b"", None)]


def test_packets_held_without_a_session_leave_when_the_keypair_is_installed(
        pair: tuple[Node, Node]) -> None:
    # the first packets to a peer (a ping after start) are held, not lost, and go out sealed
    # in the very call that installs our keypair, in order
    a, b = pair
    sent = [packet("10.0.1.5", "10.0.2.9", bytes([i]) * (i * 100)) for i in range(5)]
    for p in sent:
        a.app.send(p)
    a.fw.inside_batch()
    c = a.counters()
    assert c["wg_staged"] == 5 and "forwarded_packets" not in c
    assert identity_violations(a.fw.counters(), a.fw.peer_counters()) == []
    assert not select.select([b.sock], [], [], 0.1)[0]
    assert a.fw.drain_events() == [(EVENT_NEED_HANDSHAKE, 0, b"", None)]
    handshake(a, b)                                 # ends with A's install_keypair
    assert a.counters()["wg_staged_sent"] == 5 and a.counters()["forwarded_packets"] == 5
    wait(b.sock)
    b.fw.outside_batch()
    got = []
    while select.select([b.app], [], [], 0.2)[0]:
        got.append(b.app.recv(65536))
    assert got == [packet_ttl(p, 63) for p in sent]
    assert a.fw.send_staged(0) == 0                 # nothing held twice
    for node in (a, b):
        assert identity_violations(node.fw.counters(), node.fw.peer_counters()) == []


def test_held_packets_are_bounded_the_oldest_dropped(pair: tuple[Node, Node]) -> None:
    a, b = pair
    sent = [packet("10.0.1.5", "10.0.2.9", struct.pack("!I", i)) for i in range(130)]
    for chunk in (sent[:60], sent[60:120], sent[120:]):
        for p in chunk:
            a.app.send(p)
        while a.fw.inside_batch():
            pass
    c = a.counters()
    assert c["wg_staged"] == 130 and c["wg_staged_overflow"] == 2
    assert identity_violations(a.fw.counters(), a.fw.peer_counters()) == []
    a.fw.drain_events()
    handshake(a, b)
    assert a.counters()["wg_staged_sent"] == 128
    got = []
    while select.select([b.sock], [], [], 0.2)[0]:
        while b.fw.outside_batch():
            pass
        while select.select([b.app], [], [], 0.05)[0]:
            got.append(b.app.recv(65536))
    assert got == [packet_ttl(p, 63) for p in sent[2:]]
    assert identity_violations(a.fw.counters(), a.fw.peer_counters()) == []


def test_held_packets_are_dropped_when_the_handshake_gives_up(pair: tuple[Node, Node]) -> None:
    a, b = pair
    for _ in range(3):
        a.app.send(packet("10.0.1.5", "10.0.2.9"))
    a.fw.inside_batch()
    assert a.fw.drop_staged(0) == 3
    assert a.counters()["wg_staged_expired"] == 3
    assert identity_violations(a.fw.counters(), a.fw.peer_counters()) == []
    a.fw.drain_events()
    handshake(a, b)
    assert "wg_staged_sent" not in a.counters()
    assert not select.select([b.sock], [], [], 0.2)[0]
    # a peer that leaves the map takes what was held for it
    a.fw.set_now(100.0 + 200.0)                     # past REJECT_AFTER_TIME: held again
    a.app.send(packet("10.0.1.5", "10.0.2.9"))
    a.fw.inside_batch()
    a.fw.set_tables(ForwardingTables(ipv4.addr_to_int("10.0.1.1"), (), (
        (ipv4.addr_to_int("10.0.1.0"), 24, LOCAL),)))
    assert a.counters()["wg_staged_expired"] == 4
    assert identity_violations(a.fw.counters()) == []


def test_endpoint_roams_to_the_last_authenticated_source(pair: tuple[Node, Node]) -> None:
    a, b = pair
    a_keys, _ = handshake(a, b)
    roamed = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    roamed.bind((ROAM_IP, 0))
    roamed.sendto(seal_transport(a_keys.remote_index, 0, a_keys.send_key,
                                 packet("10.0.1.5", "10.0.2.9")), (B_IP, b.port))
    wait(b.sock)
    b.fw.outside_batch()
    events = b.fw.drain_events()
    assert (EVENT_ENDPOINT, 0, b"", roamed.getsockname()) in events
    assert b.fw.endpoints() == [roamed.getsockname()]
    # a forged datagram from elsewhere does not move it
    stranger = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    stranger.bind(("127.0.0.9", 0))
    stranger.sendto(seal_transport(a_keys.remote_index, 1, os.urandom(32), b"x" * 20),
                    (B_IP, b.port))
    wait(b.sock)
    b.fw.outside_batch()
    assert b.fw.endpoints() == [roamed.getsockname()]
    roamed.close()
    stranger.close()


def test_keypair_past_reject_after_time_is_refused_both_ways(pair: tuple[Node, Node]) -> None:
    a, b = pair
    a_keys, _ = handshake(a, b)
    for fw in (a.fw, b.fw):
        fw.set_timings(120.0, 180.0, 1 << 60, (1 << 64) - (1 << 13) - 1, 165.0)
        fw.set_now(100.0 + 181.0)
    a.app.send(packet("10.0.1.5", "10.0.2.9"))
    a.fw.inside_batch()
    assert a.counters()["wg_staged"] == 1           # held until a new handshake
    a.sock.sendto(seal_transport(a_keys.remote_index, 0, a_keys.send_key,
                                 packet("10.0.1.5", "10.0.2.9")), (B_IP, b.port))
    wait(b.sock)
    b.fw.outside_batch()
    assert b.counters()["wg_stale_keypair"] == 1


def test_keypairs_are_zeroed_at_three_times_reject_after_time_alike(
        kernel_pair: tuple[ModuleType, ModuleType]) -> None:
    """Parity of expiry: past REJECT_AFTER_TIME a keypair is refused (stale) and its peer's
    packets held; at 3 x REJECT_AFTER_TIME set_now zeroes it (unknown index, no holder left,
    not in sessions()); the same counters and sessions on both kernels, step by step."""
    results = []
    for kernels in kernel_pair:
        driver = LoopExpiryDriver(kernels)
        try:
            results.append(expiry_scenario(driver))
        finally:
            driver.close()
    check_expiry(results[0])
    assert results[0] == results[1]


def test_the_clock_never_goes_back(pair: tuple[Node, Node]) -> None:
    a, b = pair
    handshake(a, b)
    a.fw.set_now(100.0 + 50.0)
    a.fw.set_now(100.0)                 # older than what the data plane already saw: ignored
    assert a.fw.sessions() == [(1, 50.0)]


def test_initiator_asks_for_rekey_after_rekey_after_time(pair: tuple[Node, Node]) -> None:
    a, b = pair
    handshake(a, b)
    a.fw.set_now(100.0 + 121.0)
    a.app.send(packet("10.0.1.5", "10.0.2.9"))
    a.fw.inside_batch()
    assert a.fw.drain_events() == [(EVENT_NEED_HANDSHAKE, 0, b"", None)]
    assert a.counters()["forwarded_packets"] == 1      # still sent on the old session


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=300), kind=st.sampled_from([None, 1, 2, 3, 4]))
def test_any_datagram_is_a_counted_drop_never_an_exception(pair: tuple[Node, Node],
                                                           data: bytes, kind: int | None) -> None:
    a, b = pair
    if kind is not None:
        data = bytes([kind, 0, 0, 0]) + data
    before = b.fw.counters()
    a.sock.sendto(data, (B_IP, b.port))
    wait(b.sock)
    b.fw.outside_batch()
    b.fw.drain_events()
    after = b.fw.counters()
    assert after["delivered_packets"] == before["delivered_packets"]
    dropped = sum(after[r] - before[r] for r in ALL_DROP_REASONS)
    queued = after["wg_handshake_messages"] - before["wg_handshake_messages"]
    assert dropped + queued == 1
    assert identity_violations(after, b.fw.peer_counters()) == []


def test_window_accepts_reordering_within_2048(pair: tuple[Node, Node]) -> None:
    a, b = pair
    a_keys, _ = handshake(a, b)
    order = [3000, 1000, 2999, 953, 952, 3000, 5]
    for counter in order:
        a.sock.sendto(seal_transport(a_keys.remote_index, counter, a_keys.send_key,
                                     packet("10.0.1.5", "10.0.2.9", struct.pack("!I", counter))),
                      (B_IP, b.port))
    wait(b.sock)
    b.fw.outside_batch()
    c = b.counters()
    # 3000, 1000, 2999, 953 new; 952 is 2048 behind 3000: too old; 3000 again; 5: too old
    assert c["delivered_packets"] == 4 and c["wg_replay"] == 3


def test_cython_and_twin_seal_the_same_bytes_and_count_the_same(
        kernel_pair: tuple[ModuleType, ModuleType]) -> None:
    """Parity: the same keypair and inputs give byte-identical datagrams (ChaCha20-Poly1305 is
    deterministic for a key and counter) and identical counters, junk included."""
    ka, kb = generate_private_key(), generate_private_key()
    nodes = [Node(k, A_IP, "10.0.1.0/24", B_IP, "10.0.2.0/24", ka, kb) for k in kernel_pair]
    sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sink.bind((B_IP, 0))
    send_key, recv_key = os.urandom(32), os.urandom(32)
    rng = random.Random(5)
    inner = [packet("10.0.1.5", "10.0.2.9", rng.randbytes(rng.randrange(0, 1400)))
             for _ in range(40)]
    junk = [rng.randbytes(rng.randrange(0, 200)) for _ in range(30)]
    junk += [bytes([t, 0, 0, 0]) + rng.randbytes(n) for t, n in ((1, 144), (2, 88), (3, 60))]
    incoming = [seal_transport(1234, c, recv_key, packet("10.0.2.9", "10.0.1.5", bytes(c)))
                for c in (0, 5, 3, 5, 2100, 40)]     # replays and one too old among them
    outputs, counters = [], []
    try:
        for node in nodes:
            node.connect(sink.getsockname()[1])
            node.fw.install_keypair(0, 1234, 777, send_key, recv_key, True)
            for p in inner:
                node.app.send(p)
            node.fw.inside_batch()
            got = []
            while select.select([sink], [], [], 0.3)[0]:
                got.append(sink.recv(65536))
            outputs.append(got)
            sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sender.bind((B_IP, 0))
            for d in junk + incoming:
                sender.sendto(d, (A_IP, node.port))
            sender.close()
            wait(node.sock)
            while node.fw.outside_batch():
                pass
            events = node.fw.drain_events()
            counters.append((node.counters(), [e[0] for e in events]))
            # every packet of the mix landed in exactly one place (README: counter identities)
            assert identity_violations(node.fw.counters(), node.fw.peer_counters()) == []
    finally:
        sink.close()
        for node in nodes:
            node.close()
    assert len(outputs[0]) == len(inner) and outputs[0] == outputs[1]
    assert counters[0] == counters[1], counters
    assert counters[0][0]["wg_replay"] == 2 and counters[0][0]["delivered_packets"] == 4


def test_cython_and_twin_hold_and_release_alike(
        kernel_pair: tuple[ModuleType, ModuleType]) -> None:
    """Parity of staging: the same packets held (past the bound), then sealed on install,
    byte for byte, with the same counters; and the same drops when given up."""
    ka, kb = generate_private_key(), generate_private_key()
    nodes = [Node(k, A_IP, "10.0.1.0/24", B_IP, "10.0.2.0/24", ka, kb) for k in kernel_pair]
    sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sink.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)   # 128 at once
    sink.bind((B_IP, 0))
    send_key, recv_key = os.urandom(32), os.urandom(32)
    rng = random.Random(7)
    inner = [packet("10.0.1.5", "10.0.2.9", rng.randbytes(rng.randrange(0, 400)))
             for _ in range(140)]
    outputs, counters = [], []
    try:
        for node in nodes:
            node.connect(sink.getsockname()[1])
            for start in range(0, len(inner), 50):
                for p in inner[start:start + 50]:
                    node.app.send(p)
                while node.fw.inside_batch():
                    pass
            held = node.counters()
            node.fw.install_keypair(0, 1234, 777, send_key, recv_key, True)
            got = []
            while select.select([sink], [], [], 0.3)[0]:
                got.append(sink.recv(65536))
            outputs.append(got)
            node.fw.set_now(100.0 + 200.0)          # the keypair expires: held again
            for p in inner[:3]:
                node.app.send(p)
            node.fw.inside_batch()
            dropped = node.fw.drop_staged(0)
            counters.append((held, node.counters(), dropped,
                             [e[0] for e in node.fw.drain_events()]))
            assert identity_violations(node.fw.counters(), node.fw.peer_counters()) == []
    finally:
        sink.close()
        for node in nodes:
            node.close()
    assert len(outputs[0]) == 128 and outputs[0] == outputs[1]
    for counter, datagram in enumerate(outputs[0]):
        receiver, got_counter, plain = open_transport(datagram, send_key)
        assert receiver == 777 and got_counter == counter
        assert plain[:len(inner[12 + counter])] == packet_ttl(inner[12 + counter], 63)
    assert counters[0] == counters[1], counters
    held, after, dropped, _ = counters[0]
    assert held["wg_staged"] == 140 and held["wg_staged_overflow"] == 12
    assert after["wg_staged_sent"] == 128 and after["wg_staged_expired"] == 3 and dropped == 3


def test_two_forwarders_of_one_keypair_never_use_a_nonce_twice(pair: tuple[Node, Node]) -> None:
    a, b = pair
    a2 = a.twin(b.port)
    try:
        a_keys, _ = handshake(a, b, a_twins=(a2,))
        sent = 0
        for round_ in range(3):         # interleaved, as two threads would seal
            for node in (a, a2, a2, a):
                for i in range(5):
                    node.app.send(packet("10.0.1.5", "10.0.2.9", bytes([round_, i])))
                    sent += 1
                node.fw.inside_batch()
        counters = []
        while select.select([b.sock], [], [], 0.3)[0]:
            _, counter, _ = open_transport(b.sock.recv(65536), a_keys.send_key)
            counters.append(counter)
        assert sorted(counters) == list(range(sent))      # each nonce once, none skipped
    finally:
        a2.close()


def test_a_datagram_one_forwarder_accepted_is_a_replay_for_its_twin(
        pair: tuple[Node, Node]) -> None:
    a, b = pair
    b2 = b.twin(a.port)
    try:
        handshake(a, b, b_twins=(b2,))
        a.app.send(packet("10.0.1.5", "10.0.2.9"))
        a.fw.inside_batch()
        wait(b.sock)
        datagram = b.sock.recv(65536)
        a.sock.sendto(datagram, (B_IP, b.port))
        a.sock.sendto(datagram, (B_IP, b2.port))    # another source port: another socket
        for node in (b, b2):
            wait(node.sock)
            node.fw.outside_batch()
        assert b.counters()["delivered_packets"] == 1 and "wg_replay" not in b.counters()
        assert b2.counters()["wg_replay"] == 1 and "delivered_packets" not in b2.counters()
    finally:
        b2.close()


def test_a_session_confirmed_in_one_forwarder_is_confirmed_in_its_twin(
        pair: tuple[Node, Node]) -> None:
    a, b = pair
    b2 = b.twin(a.port)
    try:
        _, b_keys = handshake(a, b, b_twins=(b2,))
        b2.app.send(packet("10.0.2.9", "10.0.1.5", b"held by the twin"))
        b2.fw.inside_batch()
        assert b2.counters()["wg_staged"] == 1          # only "next" there too
        a.fw.send_keepalive(0)
        wait(b.sock)
        b.fw.outside_batch()
        confirmed = [e for e in b.fw.drain_events() if e[0] == EVENT_SESSION_CONFIRMED]
        index = int.from_bytes(confirmed[0][2], "little")
        assert index == b_keys.local_index                  # which keypair, for the twins
        assert not b2.fw.confirm_session(0, index ^ 1)      # not its next keypair
        assert b2.fw.confirm_session(0, index)
        assert not b2.fw.confirm_session(0, index)          # once
        assert b2.fw.send_staged(0) == 1
        wait(a.sock)
        a.fw.outside_batch()
        assert a.app.recv(65536) == packet_ttl(packet("10.0.2.9", "10.0.1.5",
                                                      b"held by the twin"), 63)
        assert b2.fw.drain_events() == [(EVENT_NEED_HANDSHAKE, 0, b"", None)]   # staging's
    finally:
        b2.close()
