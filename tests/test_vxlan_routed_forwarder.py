"""VxlanRoutedForwarder, both implementations, over real sockets and without root.

The same rig as tests/test_forwarder.py (a socketpair "tun", loopback UDP peers), with VTEP
MACs, a VNI and a pool of tx sockets. The router (TTL, ICMP, LPM) is shared with the udp
path and tested there; here: the encapsulation, the decapsulation checks, the flow-hashed
source sockets, and parity between the Cython kernel and the twin. scapy decodes what went
out, as a dissector that shares no code with ours.
"""

from __future__ import annotations

import select
import struct
import time
from collections.abc import Iterator
from types import ModuleType
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.inet import IP
from scapy.layers.l2 import Ether
from scapy.layers.vxlan import VXLAN
from test_forwarder import (
    FIXTURE_OK,
    LOCAL_ADDRESS,
    NODE_IP,
    Rig,
    check_icmp,
    device_pair,
    inner_packets,
    nonzero,
    overlay,
    packet,
    peer_ip,
    udp_socket,
)

from overlayd.dataplane.counters import DROP_REASONS
from overlayd.dataplane.tables import ForwardingTables, PeerEntry
from overlayd.wire import ipv4, vxlan

OUR_MAC = bytes.fromhex("020000aa0001")
VNI = 0x123456
POOL = 4


def peer_mac(i: int) -> bytes:
    return bytes.fromhex(f"0200bb0000{i:02x}")


def encap(inner: bytes, dst: bytes = OUR_MAC, *, src: bytes = b"\x02\x00\xbb\x00\x00\x00",
          vni: int = VNI, flags: int = 0x08, ethertype: int = 0x0800) -> bytes:
    return (struct.pack("!BBHI", flags, 0, 0, vni << 8) + dst + src
            + struct.pack("!H", ethertype) + inner)


class VxRig(Rig):
    """Rig with a VxlanRoutedForwarder and POOL tx sockets on the node's address."""

    def __init__(self, kernels: ModuleType, *, pool: int = POOL, batch_size: int = 64,
                 icmp_burst: int = 100, mtus: tuple[int, ...] = (1400, 1400, 576),
                 peers: int = 3) -> None:
        self.app, self.dev = device_pair()
        self.local = udp_socket(NODE_IP)
        self.tx = [udp_socket(NODE_IP) for _ in range(pool)]
        self.peers = [udp_socket(peer_ip(i)) for i in range(peers)]
        self.stranger = udp_socket("127.0.0.99")
        self.mtus = mtus
        self.fwd = kernels.VxlanRoutedForwarder(
            self.dev.fileno(), self.local.fileno(), OUR_MAC, VNI,
            [s.fileno() for s in self.tx], batch_size, icmp_burst)
        self.fwd.set_tables(self.tables())

    def peer_entry(self, i: int) -> PeerEntry:
        entry = super().peer_entry(i)
        return PeerEntry(entry.ip, entry.port, entry.path_mtu, entry.name, peer_mac(i))

    def recv_from(self, i: int, count: int) -> list[tuple[bytes, int]]:
        """(datagram, source port) received by peer i."""
        out = []
        deadline = time.monotonic() + 5.0
        while len(out) < count and time.monotonic() < deadline:
            try:
                data, addr = self.peers[i].recvfrom(1 << 17)
            except BlockingIOError:
                select.select([self.peers[i]], [], [], 0.05)
                continue
            out.append((data, addr[1]))
        assert len(out) == count, (len(out), count)
        return out

    def close(self) -> None:
        super().close()
        for s in self.tx:
            s.close()


@pytest.fixture
def rig(kernels: ModuleType) -> Iterator[VxRig]:
    with VxRig(kernels) as r:
        yield r


def test_encapsulation_on_the_wire(rig: VxRig) -> None:
    original = packet(overlay(-1, 5), overlay(1), b"x" * 300, ttl=17, df=True)
    rig.send_inside(original)
    assert rig.drain_inside() == [1]
    (data, sport), = rig.recv_from(1, 1)
    assert rig.collect(rig.app) == []
    # Independent dissector: scapy parses the UDP payload as VXLAN / Ethernet / IPv4.
    frame = VXLAN(data)
    assert frame.flags == 0x08 and frame.vni == VNI
    assert bytes(data[:8]) == bytes([0x08, 0, 0, 0, 0x12, 0x34, 0x56, 0])   # reserved bits 0
    eth = frame[Ether]
    assert (eth.dst, eth.src, eth.type) == ("02:00:bb:00:00:01", "02:00:00:aa:00:01", 0x0800)
    ip = eth[IP]
    assert ip.ttl == 16 and bytes(ip) == bytes(ip.__class__(bytes(ip)))
    expected = bytearray(original)
    expected[8] = 16
    struct.pack_into("!H", expected, 10, 0)
    struct.pack_into("!H", expected, 10, ipv4.checksum(bytes(expected[:20])))
    assert data[22:] == bytes(expected)
    assert sport in {s.getsockname()[1] for s in rig.tx}
    c = nonzero(rig.fwd.counters())
    assert c == {"inside_packets": 1, "inside_bytes": len(original), "forwarded_packets": 1}
    # Per-peer bytes are inner bytes, like inside_bytes: not the 22 B of VXLAN + Ethernet.
    assert rig.fwd.peer_counters()[1][:2] == (1, len(original)) and len(data) == len(original) + 22


def test_source_socket_follows_the_flow_hash(rig: VxRig) -> None:
    ports = [s.getsockname()[1] for s in rig.tx]
    flows = []
    for k in range(24):
        payload = struct.pack("!HHHH", 1000 + k, 53, 8, 0) + b"q"
        flows.append(packet(overlay(-1, 5), overlay(0), payload, proto=17))
    rig.send_inside(*flows, *flows)
    rig.drain_inside()
    got = rig.recv_from(0, 48)
    by_payload: dict[bytes, set[int]] = {}
    for data, sport in got:
        by_payload.setdefault(data[22 + 20:], set()).add(sport)
    for flow in flows:
        (sport,) = by_payload[flow[20:]]          # one flow, one source port
        assert sport == ports[vxlan.flow_hash_ipv4(flow) % POOL]
    assert len({p for ps in by_payload.values() for p in ps}) > 1     # flows spread


def test_no_tx_pool_sends_from_the_receive_socket(kernels: ModuleType) -> None:
    with VxRig(kernels, pool=0) as rig:
        rig.send_inside(packet(overlay(-1, 5), overlay(2)))
        rig.drain_inside()
        (_, sport), = rig.recv_from(2, 1)
        assert sport == rig.local.getsockname()[1]


def test_router_behaviour_is_the_udp_paths(rig: VxRig) -> None:
    """TTL expiry and frag-needed (path MTU of peer 2 is 576) are answered into the device."""
    expired = packet(overlay(-1, 5), overlay(0), ttl=1)
    too_big = packet(overlay(-1, 5), overlay(2), b"z" * 600, df=True)
    rig.send_inside(expired, too_big)
    rig.drain_inside()
    first, second = rig.collect(rig.app, 2)
    check_icmp(first, expired, 11, 0)
    check_icmp(second, too_big, 3, 4, 576)
    assert nonzero(rig.fwd.counters())["icmp_sent"] == 2


def test_deliver_valid_and_broadcast_mac(rig: VxRig) -> None:
    inner = packet(overlay(0), overlay(-1))
    rig.send_outside(rig.peers[0], encap(inner), encap(inner, b"\xff" * 6))
    rig.drain_outside(2)
    assert rig.collect(rig.app, 2) == [inner, inner]
    assert rig.fwd.counters()["delivered_packets"] == 2


def test_ethernet_padding_is_trimmed(rig: VxRig) -> None:
    inner = packet(overlay(0), overlay(-1), b"ab")             # 30 bytes, padded to 46
    rig.send_outside(rig.peers[0], encap(inner + b"\x00" * 16))
    rig.drain_outside(1)
    assert rig.collect(rig.app, 1) == [inner]


def _outside_cases() -> list[Any]:
    good = packet(overlay(0), overlay(-1))
    return [
        pytest.param(encap(good, flags=0x00), "outside_bad_vxlan_flags", id="no-I-flag"),
        pytest.param(encap(good, vni=VNI + 1), "outside_wrong_vni", id="wrong-vni"),
        pytest.param(encap(good)[:7], "outside_truncated_vxlan", id="short-header"),
        pytest.param(encap(good)[:21], "outside_truncated_vxlan", id="short-ethernet"),
        pytest.param(encap(good, peer_mac(9)), "outside_wrong_inner_mac", id="other-mac"),
        pytest.param(encap(good, b"\x01\x00\x5e\x00\x00\x01"), "outside_wrong_inner_mac",
                     id="multicast-mac"),
        pytest.param(encap(good, ethertype=0x86DD), "outside_not_ipv4", id="ipv6-type"),
        pytest.param(encap(good[:19]), "outside_too_short", id="short-ip"),
        pytest.param(encap(packet(overlay(0), overlay(-1), b"p" * 40) + b"x"),
                     "outside_length_mismatch", id="trailing-byte"),   # past padding size
        pytest.param(encap(packet(overlay(1), overlay(-1))), "outside_spoofed_source",
                     id="spoofed"),
        pytest.param(encap(packet(overlay(0), overlay(1))), "outside_not_for_us",
                     id="not-for-us"),
    ]


@pytest.mark.parametrize(("data", "reason"), _outside_cases())
def test_outside_drops(rig: VxRig, data: bytes, reason: str) -> None:
    rig.send_outside(rig.peers[0], data)
    rig.drain_outside(1)
    assert rig.collect(rig.app) == []
    assert nonzero(rig.fwd.counters()) == {"outside_packets": 1, "outside_bytes": len(data),
                                           reason: 1}


def test_reserved_bits_are_ignored(rig: VxRig) -> None:
    """RFC 7348 section 5: reserved fields are ignored on receipt."""
    inner = packet(overlay(0), overlay(-1))
    data = bytearray(encap(inner, flags=0xFF))
    data[1:4] = b"\xff\xff\xff"
    data[7] = 0xFF
    rig.send_outside(rig.peers[0], bytes(data))
    rig.drain_outside(1)
    assert rig.collect(rig.app, 1) == [inner]


def test_unknown_peer_dropped(rig: VxRig) -> None:
    rig.send_outside(rig.stranger, encap(packet(overlay(0), overlay(-1))))
    rig.drain_outside(1)
    assert rig.fwd.counters()["outside_unknown_peer"] == 1


def test_tables_need_peer_macs(rig: VxRig) -> None:
    tables = rig.tables()
    no_mac = PeerEntry(tables.peers[0].ip, tables.peers[0].port, 1400)
    for bad in (no_mac, PeerEntry(1, 1, 1400, mac=b"\x02" * 5)):
        with pytest.raises(ValueError):
            rig.fwd.set_tables(ForwardingTables(LOCAL_ADDRESS, (bad, *tables.peers[1:]),
                                                tables.routes))
    rig.send_inside(packet(overlay(-1, 5), overlay(0)))
    rig.drain_inside()
    assert len(rig.recv_from(0, 1)) == 1                      # old tables still in force


@pytest.mark.parametrize("kwargs", [
    {"mac": b"\x02" * 5}, {"vni": -1}, {"vni": 1 << 24}, {"batch_size": 0},
    {"icmp_burst": -1}, {"tx_fds": [-1]}, {"tx_fds": [3] * 65},
])
def test_constructor_rejects(kernels: ModuleType, kwargs: dict[str, Any]) -> None:
    args: dict[str, Any] = {"mac": OUR_MAC, **kwargs}
    with pytest.raises(ValueError):
        kernels.VxlanRoutedForwarder(0, 1, **args)


# --- parity ------------------------------------------------------------------------------------

def _results(rig: VxRig) -> dict[str, Any]:
    peer_counts = rig.fwd.peer_counters()
    c = rig.fwd.counters()
    assert c["inside_packets"] == c["forwarded_packets"] + c["tx_error"] + sum(
        c[r] for r in DROP_REASONS if r.startswith("inside"))
    assert c["outside_packets"] == c["delivered_packets"] + sum(
        c[r] for r in DROP_REASONS if r.startswith("outside"))
    ports = {s.getsockname()[1]: k for k, s in enumerate(rig.tx)}
    return {
        "device": rig.collect(rig.app),
        "peers": [sorted((d, ports[p]) for d, p in rig.recv_from(i, peer_counts[i][0]))
                  for i in range(len(rig.peers))],
        "counters": c,
        "peer_counters": peer_counts,
    }


@settings(max_examples=40, deadline=None, suppress_health_check=FIXTURE_OK)
@given(batch=st.lists(inner_packets(), max_size=16), batch_size=st.integers(1, 8))
def test_inside_parity(kernel_pair: tuple[ModuleType, ModuleType], batch: list[bytes],
                       batch_size: int) -> None:
    results = []
    for kernels in kernel_pair:
        with VxRig(kernels, batch_size=batch_size, icmp_burst=2) as rig:
            rig.send_inside(*batch)
            rig.drain_inside()
            results.append(_results(rig))
    assert results[0] == results[1]


@st.composite
def datagrams(draw: st.DrawFn) -> bytes:
    inner = draw(st.one_of(inner_packets(), st.builds(
        lambda s, d, k: packet(overlay(s), overlay(d, k)),
        st.integers(-1, 2), st.integers(-1, 2), st.integers(1, 254))))
    data = encap(inner, draw(st.sampled_from([OUR_MAC, b"\xff" * 6, peer_mac(1)])),
                 vni=draw(st.sampled_from([VNI, VNI, 1])),
                 flags=draw(st.sampled_from([0x08, 0x08, 0x00, 0x0C])),
                 ethertype=draw(st.sampled_from([0x0800, 0x0800, 0x0806])))
    if draw(st.integers(0, 5)) == 0:
        data = data[:draw(st.integers(0, len(data)))]
    if draw(st.integers(0, 5)) == 0:
        data += b"\x00" * draw(st.integers(1, 20))
    return data


@settings(max_examples=40, deadline=None, suppress_health_check=FIXTURE_OK)
@given(traffic=st.lists(st.tuples(st.integers(-1, 2), datagrams()), max_size=16),
       batch_size=st.integers(1, 8))
def test_outside_parity(kernel_pair: tuple[ModuleType, ModuleType],
                        traffic: list[tuple[int, bytes]], batch_size: int) -> None:
    results = []
    for kernels in kernel_pair:
        with VxRig(kernels, batch_size=batch_size) as rig:
            for sender, data in traffic:
                rig.send_outside(rig.stranger if sender < 0 else rig.peers[sender], data)
            rig.drain_outside(len(traffic))
            results.append(_results(rig))
    assert results[0] == results[1]
