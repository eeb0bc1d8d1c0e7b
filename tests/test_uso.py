"""USO on the device (cext/offload.pxi 5. and 7., twin overlayd/dataplane/offload.py), both
implementations.

1. Coalescing UDP datagrams into one VIRTIO_NET_HDR_GSO_UDP_L4 write: hand-built cases, then
   seeded random streams judged by a naive oracle written here: it plays the kernel (cuts each
   write at gso_size and finishes each datagram's checksum from the partial one written, as
   __udp_gso_segment does) and requires that (a) every flow's datagrams come back exactly as
   they were delivered, in order, (b) every merged write holds only what the kernel's UDP GRO
   would merge (one flow, TOS, TTL and DF word, ids counting up, nonzero checksums that
   verified, equal sizes but a shorter last); and the two implementations give the same bytes.
2. Cutting a UDP superpacket read from the device (segment_udp4), both implementations against
   hand-checked fields and each other, and through the forwarders (a socketpair for the device,
   real UDP sockets on 127.0.0.0/8).
"""

from __future__ import annotations

import random
import struct
from collections.abc import Callable, Iterator
from types import ModuleType
from typing import Any

import pytest
from checksum_helpers import naive_checksum
from test_offload import (  # noqa: F401 (fwd_kernels: a fixture)
    OffloadRig,
    _cython_module,
    eth,
    fwd_kernels,
    ip_checksum_ok,
    l4_checksum_ok,
    overlay,
    pseudo_header,
    tcp_packet,
    vnet,
)

from overlayd.dataplane import offload as py_offload
from overlayd.ops.tables import render_offloads

UDP_L4 = 5
GRO_MAX_SEGS = 64


@pytest.fixture(params=["cython", "python"])
def off(request: pytest.FixtureRequest) -> ModuleType:
    return _cython_module() if request.param == "cython" else py_offload


def udp(payload: bytes, *, ident: int = 1, sport: int = 5000, dport: int = 6000,
        src: str = "10.0.0.5", dst: str = "10.0.1.7", tos: int = 0, ttl: int = 64,
        df: bool = True, frag: int = 0, no_checksum: bool = False,
        bad_checksum: bool = False, ip_options: bytes = b"") -> bytes:
    """An IPv4/UDP packet built by hand, its checksums right unless asked otherwise."""
    body = bytearray(struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload)
    ihl = 20 + len(ip_options)
    ip = bytearray(struct.pack("!BBHHHBBH4s4s", 0x40 | ihl // 4, tos, ihl + len(body), ident,
                               (0x4000 if df else 0) | frag, ttl, 17, 0,
                               bytes(map(int, src.split("."))), bytes(map(int, dst.split("."))))
                   + ip_options)
    struct.pack_into("!H", ip, 10, naive_checksum(bytes(ip)))
    if not no_checksum:
        value = naive_checksum(pseudo_header(bytes(ip), len(body), 17) + bytes(body)) or 0xFFFF
        struct.pack_into("!H", body, 6, value ^ (0x0F0F if bad_checksum else 0))
    return bytes(ip + body)


def run(count: int, size: int = 64, last: int | None = None, ident: int = 100,
        **kw: Any) -> list[bytes]:
    """``count`` datagrams of one flow, ids counting up; ``last``: the size of one more."""
    out = [udp(bytes([i % 251]) * size, ident=ident + i, **kw) for i in range(count)]
    if last is not None:
        out.append(udp(b"L" * last, ident=ident + count, **kw))
    return out


def writes_of(off: ModuleType, packets: list[bytes], l2: int = 0,
              uso: bool = True) -> list[tuple[bytes, bytes]]:
    return [(bytes(h), bytes(d)) for h, d in off.coalesce(packets, l2, uso)]


def plain(packet: bytes) -> tuple[bytes, bytes]:
    return bytes(10), packet


# --- the oracle: the kernel's side of a write, and GRO's rules -----------------------------------

def ones_add(a: int, b: int) -> int:
    total = a + b
    return (total & 0xFFFF) + (total >> 16)


def kernel_cut(header: bytes, data: bytes, l2: int) -> list[bytes]:
    """What the kernel makes of one write: a plain packet as it is; a UDP_L4 GSO write cut
    into gso_size payloads, each with its IPv4 total length, id + i, header checksum, UDP
    length and a checksum finished from the partial one in the write (the kernel adjusts the
    partial sum for the new length and adds the datagram's bytes)."""
    flags, gso_type, hdr_len, gso_size, csum_start, csum_offset = struct.unpack("<BBHHHH",
                                                                               header)
    if gso_type == 0:
        assert flags == 0, header
        return [data]
    assert (flags, gso_type, hdr_len, csum_start, csum_offset) == (1, UDP_L4, l2 + 28, l2 + 20,
                                                                   6), header
    ip = data[l2:]
    assert ip[0] == 0x45 and ip_checksum_ok(ip) and int.from_bytes(ip[2:4], "big") == len(ip)
    assert int.from_bytes(ip[24:26], "big") == len(ip) - 20       # the run's UDP length
    partial = int.from_bytes(ip[26:28], "big")
    payload = data[hdr_len:]
    assert len(payload) > gso_size > 0          # a GSO write of one datagram is refused
    out = []
    for i, at in enumerate(range(0, len(payload), gso_size)):
        piece = payload[at:at + gso_size]
        head = bytearray(data[:hdr_len])
        seg = memoryview(head)[l2:]
        struct.pack_into("!HH", seg, 2, 28 + len(piece), (int.from_bytes(ip[4:6], "big") + i)
                         & 0xFFFF)
        struct.pack_into("!H", seg, 10, 0)
        struct.pack_into("!H", seg, 10, naive_checksum(bytes(seg[:20])))
        struct.pack_into("!H", seg, 24, 8 + len(piece))
        # The partial sum holds the run's UDP length: take it out, put this datagram's in,
        # then the checksum over the datagram with that sum in its field.
        own = ones_add(ones_add(partial, ~(len(ip) - 20) & 0xFFFF), 8 + len(piece))
        struct.pack_into("!H", seg, 26, own)
        value = naive_checksum(bytes(seg[20:28]) + piece)
        struct.pack_into("!H", seg, 26, value or 0xFFFF)
        out.append(bytes(head) + piece)
    return out


def udp_flow(packet: bytes, l2: int) -> tuple[bytes, ...] | None:
    ip = packet[l2:]
    if len(ip) < 28 or ip[0] >> 4 != 4 or ip[9] != 17 or (l2 and packet[12:14] != b"\x08\x00"):
        return None
    ihl = (ip[0] & 0x0F) * 4
    return (packet[:l2], ip[12:20], ip[ihl:ihl + 4])


def gro_would_merge(parts: list[bytes], l2: int) -> bool:
    """The kernel's UDP GRO rules, written out: one flow, TOS, TTL, DF word; ids counting up;
    IHL 5, no fragment; nonzero checksums that verify; equal payloads but a shorter last."""
    first = parts[0][l2:]
    sizes = [len(p) - l2 - 28 for p in parts]
    for i, p in enumerate(parts):
        ip = p[l2:]
        if (udp_flow(p, l2) != udp_flow(parts[0], l2) or ip[0] != 0x45 or ip[1] != first[1]
                or ip[8] != first[8] or ip[6:8] != first[6:8] or ip[6:8] not in (b"\0\0",
                                                                                 b"\x40\0")
                or int.from_bytes(ip[4:6], "big") != (int.from_bytes(first[4:6], "big") + i)
                & 0xFFFF or ip[26:28] == b"\0\0" or not l4_checksum_ok(ip)
                or not ip_checksum_ok(ip) or sizes[i] <= 0):
            return False
    return all(s == sizes[0] for s in sizes[:-1]) and sizes[-1] <= sizes[0]


def check_writes(writes: list[tuple[bytes, bytes]], stream: list[bytes], l2: int) -> None:
    """The oracle: per flow, the kernel gives back exactly what was delivered, in order; every
    merged write is one GRO would make."""
    def by_flow(packets: list[bytes]) -> dict[Any, list[bytes]]:
        out: dict[Any, list[bytes]] = {}
        for p in packets:
            out.setdefault(udp_flow(p, l2) if p[l2 + 9:l2 + 10] == b"\x11" else None,
                           []).append(p)
        return out
    delivered: list[bytes] = []
    for header, data in writes:
        parts = kernel_cut(header, data, l2)
        if len(parts) > 1:
            assert len(parts) <= GRO_MAX_SEGS and len(data) - l2 <= 0xFFFF
            assert gro_would_merge(parts, l2), parts
        delivered += parts
    assert sorted(delivered) == sorted(stream)
    assert by_flow(delivered) == by_flow(stream)


# --- coalescing: hand-built cases -----------------------------------------------------------------

@pytest.mark.parametrize("l2", [0, 14])
def test_a_run_of_one_flow_is_one_write_the_kernel_cuts_back(off: ModuleType, l2: int) -> None:
    parts = run(5, 64, last=40)
    if l2:
        parts = [eth(p) for p in parts]
    writes = writes_of(off, parts, l2)
    assert len(writes) == 1
    header, data = writes[0]
    assert struct.unpack("<BBHHHH", header) == (1, UDP_L4, l2 + 28, 64, l2 + 20, 6)
    assert len(data) == l2 + 28 + 5 * 64 + 40
    assert kernel_cut(header, data, l2) == parts


def test_without_uso_udp_is_written_as_it_came(off: ModuleType) -> None:
    parts = run(5)
    assert writes_of(off, parts, uso=False) == [plain(p) for p in parts]


def test_a_single_datagram_is_written_as_it_came(off: ModuleType) -> None:
    parts = run(1)
    assert writes_of(off, parts) == [plain(parts[0])]


@pytest.mark.parametrize("change", [
    pytest.param({"tos": 0x20}, id="tos"),
    pytest.param({"ttl": 63}, id="ttl"),
    pytest.param({"df": False}, id="df"),
    pytest.param({"sport": 5001}, id="source-port"),
    pytest.param({"dport": 6001}, id="destination-port"),
    pytest.param({"src": "10.0.0.6"}, id="source"),
    pytest.param({"dst": "10.0.1.8"}, id="destination"),
])
def test_a_datagram_that_differs_starts_a_new_write(off: ModuleType,
                                                    change: dict[str, Any]) -> None:
    a = run(3)
    b = run(3, ident=103, **change)
    writes = writes_of(off, [*a, *b])
    flows_differ = any(k in change for k in ("sport", "dport", "src", "dst"))
    assert len(writes) == 2
    assert [kernel_cut(h, d, 0) for h, d in writes] == [a, b]
    check_writes(writes, [*a, *b], 0)
    if not flows_differ:
        # The same flow: the first run was closed by the misfit, not merged across it.
        assert writes[0][1][2:4] == (28 + 3 * 64).to_bytes(2, "big")


@pytest.mark.parametrize("misfit", [
    pytest.param({"no_checksum": True}, id="zero-checksum"),
    pytest.param({"bad_checksum": True}, id="bad-checksum"),
    pytest.param({"frag": 0x2000}, id="more-fragments"),
    pytest.param({"ip_options": b"\x01\x01\x01\x01"}, id="ip-options"),
])
def test_a_datagram_gro_would_not_merge_goes_alone_and_ends_the_run(
        off: ModuleType, misfit: dict[str, Any]) -> None:
    a = run(3)
    odd = udp(b"x" * 64, ident=103, **misfit)
    b = run(2, ident=104)
    writes = writes_of(off, [*a, odd, *b])
    assert [kernel_cut(h, d, 0) for h, d in writes] == [a, [odd], b]


def test_ids_that_do_not_count_up_are_not_merged(off: ModuleType) -> None:
    parts = [udp(b"a" * 64, ident=7), udp(b"b" * 64, ident=7), udp(b"c" * 64, ident=8)]
    writes = writes_of(off, parts)
    assert [kernel_cut(h, d, 0) for h, d in writes] == [[parts[0]], parts[1:]]


def test_a_short_datagram_ends_the_run_and_a_longer_one_starts_its_own(off: ModuleType) -> None:
    parts = [*run(3, 64), udp(b"s" * 10, ident=103), udp(b"t" * 64, ident=104),
             udp(b"u" * 64, ident=105), udp(b"v" * 100, ident=106)]
    writes = writes_of(off, parts)
    assert [kernel_cut(h, d, 0) for h, d in writes] == [parts[:4], parts[4:6], parts[6:]]


def test_udp_and_tcp_with_the_same_ports_are_different_flows(off: ModuleType) -> None:
    a = run(2, sport=40000, dport=5201)
    t = tcp_packet(b"z" * 64, sport=40000, dport=5201, ident=102, flags=0x02)
    b = run(2, ident=102, sport=40000, dport=5201)
    writes = writes_of(off, [*a, t, *b])
    # the TCP packet neither joins nor closes the UDP run
    assert [kernel_cut(h, d, 0) for h, d in writes] == [[*a, *b], [t]]


def test_interleaved_flows_each_merge_in_order_of_start(off: ModuleType) -> None:
    a, b = run(4, sport=1), run(4, sport=2, ident=500)
    stream = [p for pair in zip(a, b, strict=True) for p in pair]
    writes = writes_of(off, stream)
    assert [kernel_cut(h, d, 0) for h, d in writes] == [a, b]


def test_at_most_gro_max_segs_and_65535_bytes(off: ModuleType) -> None:
    parts = run(GRO_MAX_SEGS + 3, 16)
    writes = writes_of(off, parts)
    assert [len(kernel_cut(h, d, 0)) for h, d in writes] == [GRO_MAX_SEGS, 3]
    big = run(50, 1400)        # 46 fit under 65535 bytes
    writes = writes_of(off, big)
    assert all(len(d) <= 0xFFFF for _, d in writes)
    assert [p for h, d in writes for p in kernel_cut(h, d, 0)] == big
    assert len(writes) == 2


def test_tap_frames_flow_includes_the_link_header(off: ModuleType) -> None:
    a = [eth(p) for p in run(2)]
    b = [eth(p, src=bytes(6)) for p in run(2, ident=102)]
    writes = writes_of(off, [*a, *b], 14)
    assert [kernel_cut(h, d, 14) for h, d in writes] == [a, b]


# --- coalescing: random streams against the oracle, and the two implementations ----------------

def random_udp_stream(rng: random.Random, l2: int) -> list[bytes]:
    flows = [{"sport": 1000 + i, "ident": rng.randrange(1 << 16), "tos": 0, "ttl": 64}
             for i in range(rng.randint(1, 5))]
    size = rng.choice([1, 18, 64, 500, 1400])
    out: list[bytes] = []
    for _ in range(rng.randint(1, 200)):
        f = rng.choice(flows)
        kw: dict[str, Any] = {}
        roll = rng.random()
        if roll < 0.03:
            f["tos"] = rng.choice([0, 0x20, 0xB8])
        elif roll < 0.06:
            f["ttl"] = rng.randint(1, 255)
        elif roll < 0.08:
            f["ident"] = rng.randrange(1 << 16)
        elif roll < 0.10:
            kw["no_checksum"] = True
        elif roll < 0.12:
            kw["bad_checksum"] = True
        elif roll < 0.13:
            kw["df"] = False
        length = size if rng.random() < 0.85 else rng.randint(0, size + 8)
        packet = udp(bytes([rng.randrange(256)]) * length, ident=f["ident"], sport=f["sport"],
                     tos=f["tos"], ttl=f["ttl"], **kw)
        f["ident"] = (f["ident"] + 1) & 0xFFFF
        if rng.random() < 0.02:
            packet = tcp_packet(b"t" * rng.randint(0, 30), sport=f["sport"], dport=6000,
                                flags=0x02)
        if rng.random() < 0.01:
            packet = packet[:rng.randint(0, 40)]
        if l2:
            packet = eth(packet, src=bytes(6) if rng.random() < 0.05 else bytes([2] * 6))
        out.append(packet)
    return out


@pytest.mark.parametrize("l2", [0, 14])
def test_random_udp_streams_against_the_oracle_and_parity(l2: int) -> None:
    cython = _cython_module()
    rng = random.Random(20261201 + l2)
    merged = 0
    for _ in range(300):
        stream = random_udp_stream(rng, l2)
        expected = writes_of(py_offload, stream, l2)
        assert writes_of(cython, stream, l2) == expected
        check_writes(expected, stream, l2)
        merged += sum(1 for h, _ in expected if h != bytes(10))
    assert merged > 300          # the streams do exercise merging


# --- cutting a UDP superpacket read from the device ------------------------------------------------

def superpacket(sizes: int, mss: int, l2: int = 0, ident: int = 40) -> bytes:
    payload = bytes(range(256)) * (sizes // 256 + 1)
    packet = udp(payload[:sizes], ident=ident)
    return eth(packet) if l2 else packet


@pytest.mark.parametrize("l2", [0, 14])
@pytest.mark.parametrize(("size", "mss"), [(1000, 100), (1050, 100), (1, 100), (100, 100),
                                           (46 * 1400, 1400)])
def test_udp_superpacket_cut_into_datagrams(off: ModuleType, l2: int, size: int,
                                            mss: int) -> None:
    packet = superpacket(size, mss, l2)
    segments = off.segment_udp4(packet, l2, mss)
    payload = packet[l2 + 28:]
    assert len(segments) == -(-size // mss)
    for i, seg in enumerate(segments):
        ip = seg[l2:]
        piece = payload[i * mss:(i + 1) * mss]
        assert seg[:l2] == packet[:l2] and ip[28:] == piece
        assert int.from_bytes(ip[2:4], "big") == 28 + len(piece) == len(ip)
        assert int.from_bytes(ip[4:6], "big") == 40 + i
        assert int.from_bytes(ip[24:26], "big") == 8 + len(piece)
        assert ip_checksum_ok(ip) and l4_checksum_ok(ip) and ip[26:28] != b"\0\0"
        assert ip[:2] == packet[l2:l2 + 2] and ip[6:10] == packet[l2 + 6:l2 + 10]


@pytest.mark.parametrize(("packet", "l2", "mss"), [
    pytest.param(tcp_packet(b"x" * 100), 0, 10, id="tcp"),
    pytest.param(udp(b""), 0, 10, id="no-payload"),
    pytest.param(superpacket(100, 10)[:-1], 0, 10, id="length-mismatch"),
    pytest.param(superpacket(100, 10), 0, 0, id="mss-0"),
    pytest.param(superpacket(2000, 1), 0, 1, id="too-many"),
    pytest.param(eth(superpacket(100, 10), ethertype=0x86DD), 14, 10, id="not-ipv4-frame"),
])
def test_udp_superpacket_refusals(off: ModuleType, packet: bytes, l2: int, mss: int) -> None:
    assert off.segment_udp4(packet, l2, mss) is None


def test_cut_then_coalesced_gives_the_superpacket_back(off: ModuleType) -> None:
    packet = superpacket(1000, 64)
    segments = off.segment_udp4(packet, 0, 64)
    ((header, data),) = writes_of(off, segments)
    assert kernel_cut(header, data, 0) == segments
    assert data[28:] == packet[28:]


def test_segment_udp4_parity() -> None:
    cython = _cython_module()
    rng = random.Random(11)
    for _ in range(300):
        l2 = rng.choice([0, 14])
        packet = superpacket(rng.randint(0, 3000), 0, l2, ident=rng.randrange(1 << 16))
        if rng.random() < 0.1:
            packet = packet[:rng.randint(0, len(packet))]
        mss = rng.choice([0, 1, 7, 100, 536, 1448, 4000])
        assert cython.segment_udp4(packet, l2, mss) == py_offload.segment_udp4(packet, l2, mss)


# --- through the forwarders -------------------------------------------------------------------------

@pytest.fixture
def make(fwd_kernels: ModuleType) -> Iterator[Callable[..., OffloadRig]]:  # noqa: F811
    rigs: list[OffloadRig] = []

    def build(path: str, **kw: Any) -> OffloadRig:
        rigs.append(OffloadRig(fwd_kernels, path, **kw))
        return rigs[-1]

    yield build
    for rig in rigs:
        rig.close()


def uso_read(packet: bytes, mss: int, l2: int = 0) -> bytes:
    """What a tun/tap device with USO hands over for an application's UDP_SEGMENT send."""
    return vnet(1, UDP_L4, l2 + 28, mss, l2 + 20, 6) + packet


@pytest.mark.parametrize("path", ["udp", "routed", "switched"])
def test_forwarders_cut_udp_superpackets_from_the_device(make: Any, path: str) -> None:
    rig = make(path, device_uso=True)
    packet = udp(bytes(range(250)) * 4, dst=overlay(0), ident=9)
    rig.read(uso_read(rig.frame(packet), 100, rig.l2))
    got = [rig.inner(d) for d in rig.received(0, 10)]
    expected = py_offload.segment_udp4(rig.frame(packet), rig.l2, 100)
    assert expected is not None and len(got) == 10
    if not rig.l2:        # routed: the TTL is one less, the header checksum follows
        assert [g[20:] for g in got] == [e[20:] for e in expected]
        assert all(g[8] == 63 and ip_checksum_ok(g) for g in got)
    else:
        assert got == expected
    c = rig.counters()
    assert (c["offload_udp_superpackets"], c["offload_udp_segments"],
            c["forwarded_packets"]) == (1, 10, 10)


def test_without_device_uso_a_udp_superpacket_is_a_bad_offload(make: Any) -> None:
    rig = make("udp")
    rig.read(uso_read(udp(b"x" * 300, dst=overlay(0)), 100))
    assert rig.counters()["inside_bad_offload"] == 1
    assert rig.received(0, 0) == []


def test_forwarder_writes_a_udp_run_into_the_device_as_one(make: Any) -> None:
    rig = make("udp", device_uso=True)
    parts = run(6, 64, last=20, src=overlay(0), dst="10.0.0.9")
    for p in parts:
        rig.peers[0].sendto(rig.wire(p), rig.local.getsockname())
    assert rig.outside(len(parts)) == len(parts)
    writes = rig.device_writes()
    assert len(writes) == 1
    assert kernel_cut(writes[0][:10], writes[0][10:], 0) == parts
    c = rig.counters()
    assert (c["delivered_packets"], c["offload_udp_coalesced_writes"],
            c["offload_udp_coalesced_segments"]) == (7, 1, 7)
    assert rig.fwd.offloads()["device_uso"] is True


def test_status_line_says_uso_and_what_it_did() -> None:
    on = {"vnet_hdr": True, "udp_gso": True, "udp_gro": True, "device_uso": True}
    line = render_offloads(on, {"offload_udp_coalesced_writes": 31,
                                "offload_udp_superpackets": 2})
    assert " uso;" in line and "31 UDP superpackets written, 2 cut" in line
    off = render_offloads({**on, "device_uso": False}, {"offload_udp_coalesced_writes": 31})
    assert "uso" not in off and "UDP superpackets" not in off
