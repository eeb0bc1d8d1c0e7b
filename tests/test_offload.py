"""Offloads (cext/offload.pxi, twin overlayd/dataplane/offload.py), both implementations.

1. The pure functions - complete_checksum, segment_tcp4, coalesce - checked against packets
   and checksums built here by hand (RFC 1071 written out, not the code under test), then the
   two implementations against each other on seeded random input.
2. The forwarders with offloads on, over a datagram socketpair standing in for the device (one
   read = one virtio-net header + packet) and real UDP sockets on 127.0.0.0/8, so the kernel
   really splits our UDP GSO sends and really hands us UDP GRO runs.

The Cython parametrization fails (never skips) when the extension lacks the offload names.
"""

from __future__ import annotations

import importlib
import random
import select
import socket
import struct
import time
from collections.abc import Iterator
from types import ModuleType
from typing import Any

import pytest
from checksum_helpers import naive_checksum
from test_forwarder import NODE_IP, device_pair, peer_ip, udp_socket

from overlayd.dataplane import offload as py_offload
from overlayd.dataplane.counters import identity_violations
from overlayd.dataplane.tables import LOCAL, ForwardingTables, PeerEntry, SwitchTables
from overlayd.wire import ipv4

A = ipv4.addr_to_int
OFFLOAD_NAMES = (
    "complete_checksum", "segment_tcp4", "coalesce", "VNET_HDR_LEN", "VNET_F_NEEDS_CSUM",
    "VNET_GSO_NONE", "VNET_GSO_TCPV4", "VNET_GSO_ECN", "GSO_MAX_SEGS", "GSO_MAX_BYTES",
    "GRO_SCAN", "GRO_MAX_SEGS", "finish_partial_checksum",
)
FIN, SYN, RST, PSH, ACK, ECE, CWR = 0x01, 0x02, 0x04, 0x08, 0x10, 0x40, 0x80
SOL_UDP, UDP_SEGMENT, UDP_GRO = 17, 103, 104
SO_NO_CHECK = 11          # Linux: a socket that may not checksum cannot do UDP GSO (EINVAL)
MAC_A = bytes.fromhex("020000000001")
MAC_B = bytes.fromhex("020000000002")
OUR_MAC = bytes.fromhex("020000aa0001")
VNI = 77
LOCAL_ADDRESS = A("10.0.0.1")


def _cython_module() -> ModuleType:
    try:
        module = importlib.import_module("overlayd._dataplane")
    except ImportError as exc:
        pytest.fail(f"the Cython extension does not import: {exc}")
    missing = [name for name in OFFLOAD_NAMES if not hasattr(module, name)]
    if missing:
        pytest.fail(f"overlayd._dataplane lacks the offload names {missing}")
    return module


@pytest.fixture(params=["cython", "python"])
def off(request: pytest.FixtureRequest) -> ModuleType:
    """The module with the pure offload functions: the extension, then the twin."""
    return py_offload if request.param == "python" else _cython_module()


@pytest.fixture(params=["cython", "python"])
def fwd_kernels(request: pytest.FixtureRequest) -> ModuleType:
    """The forwarder classes: the extension's, then the twins."""
    if request.param == "python":
        return importlib.import_module("overlayd.dataplane.python_kernels")
    return _cython_module()


# --- packets and checksums, written out independently of the code under test -----------------

def pseudo_header(ip: bytes, length: int, proto: int = 6) -> bytes:
    return ip[12:20] + struct.pack("!BBH", 0, proto, length)


def l4_checksum_ok(ip: bytes) -> bool:
    ihl = (ip[0] & 0x0F) * 4
    return naive_checksum(pseudo_header(ip, len(ip) - ihl, ip[9]) + ip[ihl:]) == 0


def ip_checksum_ok(ip: bytes) -> bool:
    return naive_checksum(ip[:(ip[0] & 0x0F) * 4]) == 0


def tcp_packet(payload: bytes = b"", *, seq: int = 1000, ack: int = 777, flags: int = ACK,
               src: str = "10.0.0.5", dst: str = "10.0.1.7", sport: int = 40000,
               dport: int = 5201, window: int = 512, options: bytes = b"", tos: int = 0,
               ttl: int = 64, ident: int = 1, df: bool = True, frag: int = 0,
               ip_options: bytes = b"", bad_checksum: bool = False,
               partial: bool = False, reserved: int = 0,
               bad_ip_checksum: bool = False) -> bytes:
    """An IPv4/TCP packet with right checksums (``partial``: the TCP checksum field holds the
    folded pseudo-header sum, as a CHECKSUM_PARTIAL packet from the kernel does; ``reserved``:
    the low nibble of TCP byte 12, the reserved and AE bits)."""
    assert len(options) % 4 == 0 and len(ip_options) % 4 == 0
    doff = 20 + len(options)
    tcp = bytearray(struct.pack("!HHIIBBHHH", sport, dport, seq & 0xFFFFFFFF, ack,
                                (doff // 4) << 4 | reserved, flags, window, 0, 0)
                    + options + payload)
    ihl = 20 + len(ip_options)
    ip = bytearray(struct.pack("!BBHHHBBH4s4s", 0x40 | ihl // 4, tos, ihl + len(tcp), ident,
                               (0x4000 if df else 0) | frag, ttl, 6, 0,
                               socket.inet_aton(src), socket.inet_aton(dst)) + ip_options)
    struct.pack_into("!H", ip, 10, naive_checksum(bytes(ip)) ^ (0x0101 if bad_ip_checksum else 0))
    if partial:
        struct.pack_into("!H", tcp, 16, ~naive_checksum(pseudo_header(bytes(ip), len(tcp))) & 0xFFFF)
    else:
        value = naive_checksum(pseudo_header(bytes(ip), len(tcp)) + bytes(tcp))
        struct.pack_into("!H", tcp, 16, value ^ (0x5555 if bad_checksum else 0))
    return bytes(ip + tcp)


def udp_packet(payload: bytes, *, src: str = "10.0.0.5", dst: str = "10.0.1.7",
               partial: bool = False) -> bytes:
    udp = bytearray(struct.pack("!HHHH", 5000, 6000, 8 + len(payload), 0) + payload)
    ip = ipv4.build_header(source=A(src), destination=A(dst), payload_length=len(udp),
                           protocol=17, identification=9)
    pseudo = pseudo_header(ip, len(udp), 17)
    value = (~naive_checksum(pseudo) & 0xFFFF) if partial else (naive_checksum(pseudo + bytes(udp)) or 0xFFFF)
    struct.pack_into("!H", udp, 6, value)
    return ip + bytes(udp)


def eth(packet: bytes, dst: bytes = MAC_B, src: bytes = MAC_A, ethertype: int = 0x0800) -> bytes:
    return dst + src + struct.pack("!H", ethertype) + packet


def vnet(flags: int = 0, gso_type: int = 0, hdr_len: int = 0, gso_size: int = 0,
         csum_start: int = 0, csum_offset: int = 0) -> bytes:
    return struct.pack("<BBHHHH", flags, gso_type, hdr_len, gso_size, csum_start, csum_offset)


def tso(packet: bytes, mss: int, l2: int = 0, gso_type: int = 1) -> bytes:
    """What a tun/tap device with TSO hands over: the virtio header, then the superpacket."""
    ihl = (packet[l2] & 0x0F) * 4
    doff = (packet[l2 + ihl + 12] >> 4) * 4
    return vnet(1, gso_type, l2 + ihl + doff, mss, l2 + ihl, 16) + packet


def flow(count: int, size: int = 1000, *, seq: int = 1000, **kw: Any) -> list[bytes]:
    """``count`` consecutive full segments of one flow."""
    return [tcp_packet(bytes([i % 251]) * size, seq=seq + i * size, ident=i + 1, **kw)
            for i in range(count)]


def tcp_fields(ip: bytes) -> dict[str, int]:
    ihl = (ip[0] & 0x0F) * 4
    tcp = ip[ihl:]
    return {"total": int.from_bytes(ip[2:4], "big"), "id": int.from_bytes(ip[4:6], "big"),
            "seq": int.from_bytes(tcp[4:8], "big"), "ack": int.from_bytes(tcp[8:12], "big"),
            "flags": tcp[13], "window": int.from_bytes(tcp[14:16], "big"),
            "doff": (tcp[12] >> 4) * 4}


def payload_of(ip: bytes) -> bytes:
    ihl = (ip[0] & 0x0F) * 4
    return ip[ihl + (ip[ihl + 12] >> 4) * 4:]


def kernel_accepts(header: bytes, data: bytes, l2: int = 0) -> bool:
    """Do what the kernel does with a NEEDS_CSUM GSO write: add the rest of the sum to the
    partial pseudo-header sum, store it, then the whole TCP checksum must verify."""
    csum_start, csum_offset = struct.unpack_from("<HH", header, 6)
    packet = bytearray(data)
    where = csum_start + csum_offset
    packet[where:where + 2] = struct.pack("!H", naive_checksum(bytes(packet[csum_start:])) or 0xFFFF)
    return l4_checksum_ok(bytes(packet[l2:]))


# --- complete_checksum ------------------------------------------------------------------------

@pytest.mark.parametrize("size", [0, 1, 999, 1000])
def test_complete_checksum_tcp_and_udp(off: ModuleType, size: int) -> None:
    payload = bytes((i * 7) % 256 for i in range(size))
    for partial, full, where in ((tcp_packet(payload, partial=True), tcp_packet(payload), 16),
                                 (udp_packet(payload, partial=True), udp_packet(payload), 6)):
        out = off.complete_checksum(partial, 20, where)
        assert out == full
        assert l4_checksum_ok(out)


def test_complete_checksum_zero_is_stored_as_ffff(off: ModuleType) -> None:
    # The data sums to 0xffff, so the checksum is 0 - which a UDP header cannot carry.
    assert off.complete_checksum(b"\x00\x00\xff\xff", 0, 0) == b"\xff\xff\xff\xff"
    assert off.complete_checksum(b"\x12\x34\x00\x00\x56\x78", 2, 0) == (
        b"\x12\x34" + struct.pack("!H", naive_checksum(b"\x00\x00\x56\x78")) + b"\x56\x78")


@pytest.mark.parametrize(("length", "start", "offset", "ok"), [
    (40, 20, 18, True), (40, 20, 19, False), (40, 38, 0, True), (40, 39, 0, False),
    (40, 41, 0, False), (0, 0, 0, False), (40, 0, 100, False),
])
def test_complete_checksum_offsets(off: ModuleType, length: int, start: int, offset: int,
                                   ok: bool) -> None:
    result = off.complete_checksum(bytes(range(length)), start, offset)
    assert (result is not None) == ok
    if ok:
        assert len(result) == length
        assert result[:start + offset] == bytes(range(length))[:start + offset]


# --- segment_tcp4 ---------------------------------------------------------------------------

@pytest.mark.parametrize("l2", [0, 14])
@pytest.mark.parametrize(("size", "mss"), [(5000, 1400), (4200, 1400), (1, 1400), (1400, 1400),
                                           (1000, 1)])
def test_segments_fields_and_checksums(off: ModuleType, l2: int, size: int, mss: int) -> None:
    payload = bytes((i * 13 + 5) % 256 for i in range(size))
    options = bytes([1, 1, 8, 10]) + struct.pack("!II", 11, 22)      # NOP NOP timestamps
    inner = tcp_packet(payload, seq=0xFFFFFF00, ident=0xFFFE, flags=ACK | PSH | FIN,
                       options=options, ip_options=b"\x01\x01\x01\x00", tos=0x10, ttl=9,
                       partial=True)
    superpacket = eth(inner) if l2 else inner
    segments = off.segment_tcp4(superpacket, l2, mss)
    count = -(-size // mss)
    assert segments is not None and len(segments) == count
    assert b"".join(payload_of(s[l2:]) for s in segments) == payload
    for i, segment in enumerate(segments):
        assert segment[:l2] == superpacket[:l2]
        ip = segment[l2:]
        fields = tcp_fields(ip)
        expected_payload = min(mss, size - i * mss)
        assert fields["total"] == len(ip) == 24 + 32 + expected_payload
        assert fields["id"] == (0xFFFE + i) & 0xFFFF
        assert fields["seq"] == (0xFFFFFF00 + i * mss) & 0xFFFFFFFF
        assert fields["flags"] == (ACK | PSH | FIN if i == count - 1 else ACK)
        assert (fields["ack"], fields["window"], fields["doff"]) == (777, 512, 32)
        assert ip[1] == 0x10 and ip[8] == 9 and ip[20:24] == b"\x01\x01\x01\x00"
        assert ip[24 + 20:24 + 32] == options
        assert ip_checksum_ok(ip) and l4_checksum_ok(ip)


def test_segments_cwr_only_on_the_first_ece_on_all(off: ModuleType) -> None:
    inner = tcp_packet(b"x" * 3000, flags=CWR | ECE | ACK | PSH)
    segments = off.segment_tcp4(inner, 0, 1000)
    assert [tcp_fields(s)["flags"] for s in segments] == [
        CWR | ECE | ACK, ECE | ACK, ECE | ACK | PSH]
    assert all(l4_checksum_ok(s) for s in segments)


def test_segments_ignore_the_partial_checksum_they_were_given(off: ModuleType) -> None:
    # A TSO superpacket's checksum field is whatever the kernel left; segments are computed.
    inner = bytearray(tcp_packet(b"y" * 2500))
    inner[36:38] = b"\xde\xad"
    assert all(l4_checksum_ok(s) for s in off.segment_tcp4(bytes(inner), 0, 1000))


def test_segment_count_limit(off: ModuleType) -> None:
    assert len(off.segment_tcp4(tcp_packet(b"z" * 1024), 0, 1)) == 1024
    assert off.segment_tcp4(tcp_packet(b"z" * 1025), 0, 1) is None


def _refused() -> list[Any]:
    good = tcp_packet(b"p" * 3000)
    wrong_length = bytearray(good)
    wrong_length[2:4] = struct.pack("!H", len(good) - 1)
    ihl4 = bytearray(good)
    ihl4[0] = 0x44
    doff4 = bytearray(good)
    doff4[32] = 0x40
    return [
        pytest.param(good, 0, 0, id="mss-0"),
        pytest.param(tcp_packet(b""), 0, 1000, id="no-payload"),
        pytest.param(udp_packet(b"u" * 3000), 0, 1000, id="udp"),
        pytest.param(b"\x60" + good[1:], 0, 1000, id="ipv6-version"),
        pytest.param(bytes(wrong_length), 0, 1000, id="total-length-short"),
        pytest.param(good + b"\x00", 0, 1000, id="trailing-byte"),
        pytest.param(bytes(ihl4), 0, 1000, id="ihl-4"),
        pytest.param(bytes(doff4), 0, 1000, id="doff-4"),
        pytest.param(good[:20] + good[20:30], 0, 1000, id="tcp-header-cut"),
        pytest.param(good[:19], 0, 1000, id="short"),
        pytest.param(eth(good, ethertype=0x0806), 14, 1000, id="tap-arp"),
        pytest.param(eth(good)[:30], 14, 1000, id="tap-short"),
        pytest.param(tcp_packet(b"options", options=b"\x01" * 40)[:60], 0, 1000,
                     id="options-past-end"),
    ]


@pytest.mark.parametrize(("packet", "l2", "mss"), _refused())
def test_segment_refusals(off: ModuleType, packet: bytes, l2: int, mss: int) -> None:
    assert off.segment_tcp4(packet, l2, mss) is None


# --- coalesce -------------------------------------------------------------------------------

def writes_of(off: ModuleType, packets: list[bytes], l2: int = 0) -> list[tuple[bytes, bytes]]:
    return [(bytes(h), bytes(d)) for h, d in off.coalesce(packets, l2)]


def check_merged(header: bytes, data: bytes, parts: list[bytes], l2: int = 0) -> None:
    """``data`` is ``parts`` (consecutive segments of one flow) as one GSO superpacket."""
    head = parts[0][l2:]
    mss = len(payload_of(head))
    doff = tcp_fields(head)["doff"]
    assert struct.unpack("<BBHHHH", header) == (1, 1, l2 + 20 + doff, mss, l2 + 20, 16)
    ip = data[l2:]
    assert data[:l2] == parts[0][:l2]
    total = 20 + doff + sum(len(payload_of(p[l2:])) for p in parts)
    assert tcp_fields(ip)["total"] == total == len(ip)
    assert ip_checksum_ok(ip)
    assert ip[:2] == head[:2] and ip[4:10] == head[4:10] and ip[12:20] == head[12:20]
    assert payload_of(ip) == b"".join(payload_of(p[l2:]) for p in parts)
    # CHECKSUM_PARTIAL: the pseudo-header sum, folded, not inverted.
    partial = ~naive_checksum(pseudo_header(ip, total - 20)) & 0xFFFF
    assert struct.unpack("!H", ip[36:38])[0] == partial
    psh = any(tcp_fields(p[l2:])["flags"] & PSH for p in parts)
    assert tcp_fields(ip)["flags"] == (ACK | PSH if psh else ACK)
    assert ip[20:36] == head[20:33] + ip[33:34] + head[34:36]
    assert kernel_accepts(header, data, l2)


def plain(packet: bytes) -> tuple[bytes, bytes]:
    return bytes(10), packet


@pytest.mark.parametrize("l2", [0, 14])
def test_contiguous_segments_merge(off: ModuleType, l2: int) -> None:
    parts = flow(5, options=bytes([1, 1, 8, 10]) + struct.pack("!II", 5, 6))
    if l2:
        parts = [eth(p) for p in parts]
    writes = writes_of(off, parts, l2)
    assert len(writes) == 1
    check_merged(*writes[0], parts, l2)


def test_single_segment_is_written_as_it_came(off: ModuleType) -> None:
    one = tcp_packet(b"a" * 100)
    assert writes_of(off, [one]) == [plain(one)]


def test_short_segment_ends_the_run(off: ModuleType) -> None:
    parts = flow(3)
    short = tcp_packet(b"s" * 400, seq=4000, ident=4)
    after = tcp_packet(b"t" * 1000, seq=4400, ident=5)
    writes = writes_of(off, [*parts, short, after])
    assert len(writes) == 2
    check_merged(*writes[0], [*parts, short])
    assert writes[1] == plain(after)


def test_psh_ends_the_run_and_lands_on_the_head(off: ModuleType) -> None:
    parts = flow(2) + [tcp_packet(b"p" * 1000, seq=3000, flags=ACK | PSH, ident=3)]
    after = tcp_packet(b"q" * 1000, seq=4000, ident=4)
    writes = writes_of(off, [*parts, after])
    assert len(writes) == 2
    check_merged(*writes[0], parts)
    assert writes[1] == plain(after)


def test_psh_on_the_first_segment_closes_it(off: ModuleType) -> None:
    first = tcp_packet(b"p" * 1000, seq=1000, flags=ACK | PSH, ident=0)
    rest = flow(2, seq=2000)
    writes = writes_of(off, [first, *rest])
    assert writes[0] == plain(first)
    assert len(writes) == 2
    check_merged(*writes[1], rest)


@pytest.mark.parametrize("change", [
    {"seq": 2500}, {"seq": 1999}, {"ack": 778}, {"window": 513}, {"tos": 2}, {"ttl": 63},
    {"df": False}, {"options": b"\x01\x01\x01\x01"},
    # What the kernel's GRO also refuses to merge: another value in the low nibble of TCP
    # byte 12 (reserved, AE), an IPv4 id that does not count up (the same id included).
    {"reserved": 1}, {"reserved": 8}, {"ident": 5}, {"ident": 1},
])
def test_a_segment_that_does_not_continue_starts_a_new_write(off: ModuleType,
                                                             change: dict[str, Any]) -> None:
    first = tcp_packet(b"a" * 1000, seq=1000, ident=1)
    kw: dict[str, Any] = {"seq": 2000, "ident": 2, **change}
    second = tcp_packet(b"b" * 1000, **kw)
    third = tcp_packet(b"c" * 1000, seq=kw["seq"] + 1000, ident=kw["ident"] + 1,
                       **{k: v for k, v in kw.items() if k not in ("seq", "ident")})
    writes = writes_of(off, [first, second, third])
    # The first item was closed by the misfit; the misfit starts a run of its own.
    assert writes[0] == plain(first)
    assert len(writes) == 2
    check_merged(*writes[1], [second, third])


@pytest.mark.parametrize("misfit", [
    pytest.param(tcp_packet(b"f" * 1000, seq=3000, flags=ACK | FIN), id="fin"),
    pytest.param(tcp_packet(b"", seq=3000), id="pure-ack"),
    pytest.param(tcp_packet(b"r" * 1000, seq=3000, bad_checksum=True), id="bad-checksum"),
    pytest.param(tcp_packet(b"g" * 1000, seq=3000, flags=ACK | 0x20), id="urg"),
    pytest.param(tcp_packet(b"h" * 1000, seq=3000, flags=PSH), id="no-ack"),
    pytest.param(tcp_packet(b"i" * 1000, seq=3000, ip_options=b"\x01\x01\x01\x00"),
                 id="ip-options"),
    pytest.param(tcp_packet(b"j" * 1000, seq=3000, frag=0x2000), id="more-fragments"),
    pytest.param(tcp_packet(b"l" * 1000, seq=3000, ident=3, bad_ip_checksum=True),
                 id="bad-ip-checksum"),
])
def test_non_coalescable_packet_of_the_flow_closes_its_run(off: ModuleType,
                                                           misfit: bytes) -> None:
    parts = flow(2)
    after = flow(2, seq=3000 + len(payload_of(misfit)))
    writes = writes_of(off, [*parts, misfit, *after])
    # A bad IPv4 header checksum in particular reaches the device as it came, not repaired.
    assert len(writes) == 3
    check_merged(*writes[0], parts)
    assert writes[1] == plain(misfit)
    check_merged(*writes[2], after)


def test_segment_longer_than_the_mss_starts_its_own_run(off: ModuleType) -> None:
    parts = flow(2)
    longer = tcp_packet(b"k" * 1200, seq=3000, ident=3)
    after = [tcp_packet(bytes([i]) * 1000, seq=4200 + 1000 * i, ident=4 + i) for i in range(2)]
    writes = writes_of(off, [*parts, longer, *after])
    # The 1200-byte segment cannot join a 1000-byte run; it starts one with mss 1200, which
    # the next (shorter: 1000) joins and closes.
    assert len(writes) == 3
    check_merged(*writes[0], parts)
    check_merged(*writes[1], [longer, after[0]])
    assert writes[2] == plain(after[1])


def test_interleaved_flows_each_merge_in_order_of_start(off: ModuleType) -> None:
    a = flow(3, sport=1111)
    b = flow(3, sport=2222, seq=50_000)
    writes = writes_of(off, [a[0], b[0], a[1], b[1], a[2], b[2]])
    assert len(writes) == 2
    check_merged(*writes[0], a)
    check_merged(*writes[1], b)


def test_non_tcp_packets_keep_their_place(off: ModuleType) -> None:
    a = flow(2)
    udp = udp_packet(b"u" * 300)
    icmp = ipv4.build_header(source=A("10.0.0.5"), destination=A("10.0.1.7"),
                             payload_length=8, protocol=1) + b"\x08\x00\xf7\xff\x00\x00\x00\x00"
    runt = b"\x45\x00"
    writes = writes_of(off, [udp, a[0], icmp, a[1], runt])
    assert writes[0] == plain(udp)
    check_merged(*writes[1], a)
    assert writes[2:] == [plain(icmp), plain(runt)]


@pytest.mark.parametrize(("others", "merged"), [(7, True), (8, False)])
def test_flow_search_looks_back_gro_scan_items(off: ModuleType, others: int,
                                               merged: bool) -> None:
    a = flow(2)
    # Item 0 is the flow's; with GRO_SCAN = 8, the next segment finds it only when it is
    # among the last 8 items. The noise items are PSH segments of other flows (closed).
    noise = [tcp_packet(b"n" * 10, sport=3000 + i, flags=ACK | PSH) for i in range(others)]
    assert off.GRO_SCAN == 8
    writes = writes_of(off, [a[0], *noise, a[1]])
    if merged:
        assert len(writes) == 1 + others
        check_merged(*writes[0], a)
    else:
        assert writes == [plain(a[0]), *map(plain, noise), plain(a[1])]


def test_at_most_gro_max_segs_segments(off: ModuleType) -> None:
    parts = flow(70, size=100)
    writes = writes_of(off, parts)
    assert off.GRO_MAX_SEGS == 64 and len(writes) == 2
    check_merged(*writes[0], parts[:64])
    check_merged(*writes[1], parts[64:])


def test_at_most_65535_bytes(off: ModuleType) -> None:
    parts = flow(50, size=1460)
    writes = writes_of(off, parts)
    # 40 + 44 * 1460 = 64280 fits; a 45th segment would make 65740.
    assert len(writes) == 2
    check_merged(*writes[0], parts[:44])
    check_merged(*writes[1], parts[44:])
    assert len(writes[0][1]) == 64280


def test_tap_frames_flow_includes_the_link_header(off: ModuleType) -> None:
    a = flow(4)
    frames = [eth(a[0]), eth(a[1], src=OUR_MAC), eth(a[2], src=OUR_MAC), eth(a[3], src=OUR_MAC)]
    writes = writes_of(off, frames, 14)
    assert len(writes) == 2
    assert writes[0] == plain(frames[0])
    check_merged(*writes[1], frames[1:], 14)
    arp = eth(a[0], ethertype=0x0806)
    assert writes_of(off, [arp, arp], 14) == [plain(arp), plain(arp)]


def test_seq_wraps(off: ModuleType) -> None:
    parts = flow(3, seq=0xFFFFFC00)
    writes = writes_of(off, parts)
    assert len(writes) == 1
    check_merged(*writes[0], parts)


def test_full_coalescer_writes_what_is_pending_first(off: ModuleType) -> None:
    # 1023 items pending plus the first segment fill the 1024 items: the second segment comes
    # after a flush and cannot join the first.
    noise = [udp_packet(bytes([i % 256])) for i in range(1023)]
    a = flow(2)
    writes = writes_of(off, [*noise, *a])
    assert writes == [plain(p) for p in [*noise, *a]]


# --- parity of the two implementations on random input ----------------------------------------

def refresh_checksums(ip: bytearray | memoryview) -> None:
    """Recompute, in place, the IPv4 header and TCP checksums of a TCP packet (as far as its
    lengths allow), so that a packet with a changed header byte may still be coalescable."""
    if len(ip) < 20:
        return
    ihl = (ip[0] & 0x0F) * 4
    if ihl < 20 or ihl > len(ip):
        return
    ip[10:12] = b"\x00\x00"
    ip[10:12] = struct.pack("!H", naive_checksum(bytes(ip[:ihl])))
    if ip[9] == 6 and len(ip) >= ihl + 18:
        ip[ihl + 16:ihl + 18] = b"\x00\x00"
        ip[ihl + 16:ihl + 18] = struct.pack(
            "!H", naive_checksum(pseudo_header(bytes(ip), len(ip) - ihl) + bytes(ip[ihl:])))


def mutate_header_byte(rng: random.Random, packet: bytes, l2: int) -> bytes:
    """``packet`` with one byte of its link, IPv4 or TCP header (options included) set to a
    random value; usually with its checksums made right again, so that only the byte differs
    and the coalescer must judge that byte itself."""
    ip_len = 20 if len(packet) < l2 + 20 else (packet[l2] & 0x0F) * 4
    tcp_len = (packet[l2 + ip_len + 12] >> 4) * 4 if len(packet) > l2 + ip_len + 12 else 20
    end = min(len(packet), l2 + ip_len + max(tcp_len, 20))
    if end == 0:
        return packet
    out = bytearray(packet)
    out[rng.randrange(end)] = rng.randrange(256)
    if rng.random() < 0.8:
        refresh_checksums(memoryview(out)[l2:])
    return bytes(out)


def random_stream(rng: random.Random, l2: int, src: str = "10.0.0.5",
                  dst: str = "10.0.1.7") -> list[bytes]:
    """Segments of a few flows from ``src`` to ``dst``, interleaved, with the mishaps the
    coalescer must handle: any header byte changed now and then (checksums made right again,
    mostly), checksums left partial as a kernel VTEP on a veth sends them."""
    flows = [{"sport": 1000 + i, "seq": rng.randrange(1 << 32), "ack": rng.randrange(1 << 32),
              "ident": rng.randrange(1 << 16)}
             for i in range(rng.randint(1, 4))]
    mss = rng.choice([10, 536, 1000, 1448])
    out: list[bytes] = []
    for _ in range(rng.randint(1, 150)):
        f = rng.choice(flows)
        roll = rng.random()
        size = mss if roll < 0.8 else rng.randint(0, mss + 10)
        flags = ACK
        if rng.random() < 0.05:
            flags |= PSH
        if rng.random() < 0.02:
            flags = rng.choice([ACK | FIN, SYN, RST | ACK, ACK | 0x20, ACK | ECE])
        kw: dict[str, Any] = {}
        if rng.random() < 0.03:
            kw["window"] = rng.randrange(1 << 16)
        if rng.random() < 0.03:
            f["ack"] = rng.randrange(1 << 32)
        if rng.random() < 0.02:
            kw["bad_checksum"] = True
        if rng.random() < 0.02:
            kw["options"] = b"\x01\x01\x01\x01"
        seq = f["seq"] if rng.random() > 0.03 else rng.randrange(1 << 32)
        if rng.random() < 0.03:
            kw["bad_ip_checksum"] = True
        if rng.random() < 0.03:
            kw["reserved"] = rng.randrange(1, 16)
        if rng.random() < 0.03:
            f["ident"] = rng.randrange(1 << 16)
        if rng.random() < 0.05 and not kw.get("bad_checksum"):
            kw["partial"] = True
        packet = tcp_packet(bytes([rng.randrange(256)]) * size, seq=seq, ack=f["ack"],
                            flags=flags, sport=f["sport"], ident=f["ident"], src=src, dst=dst,
                            **kw)
        f["seq"] = (seq + size) & 0xFFFFFFFF
        f["ident"] = (f["ident"] + 1) & 0xFFFF
        if rng.random() < 0.03:
            packet = udp_packet(b"u" * rng.randint(0, 50), src=src, dst=dst,
                                partial=rng.random() < 0.3)
        if rng.random() < 0.01:
            packet = packet[:rng.randint(0, 40)]
        if l2:
            packet = eth(packet, src=MAC_A if rng.random() < 0.95 else OUR_MAC)
        if rng.random() < 0.1:
            packet = mutate_header_byte(rng, packet, l2)
        out.append(packet)
    return out


@pytest.mark.parametrize("l2", [0, 14])
def test_coalesce_parity(l2: int) -> None:
    cython = _cython_module()
    rng = random.Random(20240601 + l2)
    for _ in range(300):
        stream = random_stream(rng, l2)
        expected = writes_of(py_offload, stream, l2)
        assert writes_of(cython, stream, l2) == expected
        for header, data in expected:
            if header != bytes(10):
                assert kernel_accepts(header, data, l2)


@pytest.mark.parametrize("l2", [0, 14])
def test_partial_checksums_are_finished(off: ModuleType, l2: int) -> None:
    for packet in (tcp_packet(b"t" * 999, partial=True), udp_packet(b"u" * 33, partial=True),
                   tcp_packet(b"", partial=True, flags=ACK | PSH)):
        frame = eth(packet) if l2 else packet
        finished, done = off.finish_partial_checksum(frame + b"\0" * 7 * bool(l2), l2)
        assert done and l4_checksum_ok(finished[l2:len(frame)])
        assert finished[:l2 + 20] == frame[:l2 + 20]      # nothing else changes


@pytest.mark.parametrize("packet", [
    pytest.param(tcp_packet(b"t" * 99), id="finished"),
    pytest.param(tcp_packet(b"t" * 99, bad_checksum=True), id="wrong-not-partial"),
    pytest.param(udp_packet(b"u" * 33)[:26] + b"\0\0" + udp_packet(b"u" * 33)[28:],
                 id="udp-without-checksum"),
    pytest.param(tcp_packet(b"t" * 99, partial=True, frag=0x2000), id="fragment"),
    pytest.param(tcp_packet(b"t" * 99, partial=True)[:30], id="truncated"),
    pytest.param(eth(tcp_packet(b"t" * 99, partial=True), ethertype=0x86DD), id="not-ipv4"),
])
def test_other_checksums_are_left_alone(off: ModuleType, packet: bytes) -> None:
    l2 = 14 if packet[12:14] == b"\x86\xdd" else 0
    assert off.finish_partial_checksum(packet, l2) == (packet, False)


def finished_checksum_that_looks_partial() -> bytes:
    """A TCP packet whose finished (valid) checksum happens to equal the folded pseudo-header sum,
    the pattern of an unfinished one: only a full verify tells them apart (a fuzz finding: the
    twin finished such packets and counted them, the compiled kernel rightly did not)."""
    base = tcp_packet(b"t" * 98 + b"\0\0")
    pseudo = py_offload.fold_add(ipv4.ones_sum(base[12:20]), 6, len(base) - 20)
    c0 = int.from_bytes(base[36:38], "big")
    # The checksum falls by the last payload word (one's complement): choose the word that
    # brings it to the pseudo-header sum.
    word = py_offload.fold_add(c0, ~pseudo & 0xFFFF)
    packet = tcp_packet(b"t" * 98 + word.to_bytes(2, "big"))
    assert int.from_bytes(packet[36:38], "big") == pseudo and l4_checksum_ok(packet)
    return packet


def test_a_finished_checksum_that_looks_partial_is_left_alone(off: ModuleType) -> None:
    packet = finished_checksum_that_looks_partial()
    assert off.finish_partial_checksum(packet, 0) == (packet, False)


def test_segment_and_checksum_parity() -> None:
    cython = _cython_module()
    rng = random.Random(7)
    for _ in range(300):
        l2 = rng.choice([0, 14])
        inner = tcp_packet(bytes(rng.randrange(256) for _ in range(rng.randint(0, 3000))),
                           seq=rng.randrange(1 << 32), ident=rng.randrange(1 << 16),
                           flags=rng.randrange(256), options=b"\x01" * rng.choice([0, 4, 12]))
        packet = eth(inner) if l2 else inner
        if rng.random() < 0.1:
            packet = packet[:rng.randint(0, len(packet))]
        mss = rng.choice([0, 1, 7, 100, 536, 1448, 4000])
        assert cython.segment_tcp4(packet, l2, mss) == py_offload.segment_tcp4(packet, l2, mss)
        start, offset = rng.randint(0, len(packet) + 2), rng.choice([6, 16, 0, 1])
        assert (cython.complete_checksum(packet, start, offset)
                == py_offload.complete_checksum(packet, start, offset))
        partial = eth(tcp_packet(payload_of(inner), partial=True)) if l2 else tcp_packet(
            payload_of(inner), partial=True)
        for candidate in (packet, partial, mutate_header_byte(rng, partial, l2)):
            assert (cython.finish_partial_checksum(candidate, l2)
                    == py_offload.finish_partial_checksum(candidate, l2))


# --- forwarders with offloads -----------------------------------------------------------------

def overlay(i: int, host: int = 7) -> str:
    return f"10.0.{i + 1}.{host}"


class OffloadRig:
    """One forwarder (path "udp", "routed" or "switched") with offloads, its fake device, the
    node's UDP socket on 127.0.0.2 and peers on 127.0.0.3+."""

    def __init__(self, kernels: ModuleType, path: str, *, vnet_hdr: bool = True,
                 udp_gso: bool = True, udp_gro: bool = False, peers: int = 2,
                 mtu: int = 1500, batch_size: int = 64, static_peer0: bool = True,
                 device_uso: bool = False) -> None:
        self.path = path
        self.l2 = 14 if path == "switched" else 0
        self.app, self.dev = device_pair()
        self.local = udp_socket(NODE_IP)
        if udp_gro:
            self.local.setsockopt(SOL_UDP, UDP_GRO, 1)
        self.peers = [udp_socket(peer_ip(i)) for i in range(peers)]
        for s in self.peers:    # room for a few thousand small datagrams: none may be lost
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 22)
        kw = {"vnet_hdr": vnet_hdr, "udp_gso": udp_gso, "udp_gro": udp_gro,
              "device_uso": device_uso}
        entries = tuple(PeerEntry(A(peer_ip(i)), s.getsockname()[1], mtu, f"peer{i}",
                                  bytes.fromhex(f"0200bb0000{i:02x}"))
                        for i, s in enumerate(self.peers))
        dev, sock = self.dev.fileno(), self.local.fileno()
        if path == "udp":
            self.fwd = kernels.UdpForwarder(dev, sock, batch_size, 100, **kw)
        elif path == "routed":
            self.fwd = kernels.VxlanRoutedForwarder(dev, sock, OUR_MAC, VNI, (), batch_size,
                                                    100, **kw)
        else:
            self.fwd = kernels.VxlanSwitchForwarder(dev, sock, VNI, (), batch_size, 16384, **kw)
        if path == "switched":
            static = ((MAC_B, 0),) if static_peer0 else ()
            self.fwd.set_tables(SwitchTables(entries, static))
        else:
            routes = [(A("10.0.0.0"), 24, LOCAL)]
            routes += [(A(overlay(i, 0)), 24, i) for i in range(peers)]
            self.fwd.set_tables(ForwardingTables(LOCAL_ADDRESS, entries, tuple(routes)))

    @property
    def prefix(self) -> int:
        return {"udp": 0, "routed": 22, "switched": 8}[self.path]

    def frame(self, packet: bytes) -> bytes:
        """What the device carries for an inner packet on this path."""
        return eth(packet) if self.l2 else packet

    def wire(self, inner: bytes) -> bytes:
        """The datagram a peer sends for an inner packet (tun) or frame (tap) on this path."""
        return rig_wire(self.path, inner)

    def inner(self, datagram: bytes) -> bytes:
        """The inner packet (tun) or frame (tap) a datagram carries."""
        return datagram[self.prefix:]

    def read(self, *reads: bytes) -> int:
        for data in reads:
            self.app.send(data)
        total = 0
        while (n := self.fwd.inside_batch()) > 0:
            total += n
        return total

    def received(self, i: int, count: int, timeout: float = 5.0) -> list[bytes]:
        out: list[bytes] = []
        deadline = time.monotonic() + timeout
        while len(out) < count and time.monotonic() < deadline:
            try:
                out.append(self.peers[i].recv(1 << 17))
            except BlockingIOError:
                select.select([self.peers[i]], [], [], 0.05)
        time.sleep(0.02)
        while True:          # and nothing more
            try:
                out.append(self.peers[i].recv(1 << 17))
            except BlockingIOError:
                return out

    def all_received(self, total: int) -> list[list[bytes]]:
        """What each peer got, once ``total`` datagrams arrived altogether (or 5 s passed)."""
        got: list[list[bytes]] = [[] for _ in self.peers]
        deadline = time.monotonic() + 5
        while sum(map(len, got)) < total and time.monotonic() < deadline:
            for i, s in enumerate(self.peers):
                try:
                    got[i].append(s.recv(1 << 17))
                except BlockingIOError:
                    select.select(self.peers, [], [], 0.01)
        return got

    def outside(self, expected: int) -> int:
        handled = 0
        deadline = time.monotonic() + 5
        while handled < expected and time.monotonic() < deadline:
            n = self.fwd.outside_batch()
            handled += n
            if not n:
                select.select([self.local], [], [], 0.05)
        return handled

    def device_writes(self) -> list[bytes]:
        out = []
        while True:
            try:
                out.append(self.app.recv(1 << 17))
            except BlockingIOError:
                return out

    def send_gso(self, sender: int, datagrams: list[bytes]) -> None:
        """Send a run of datagrams (all but the last of one size) in one UDP_SEGMENT send."""
        self.peers[sender].sendmsg([b"".join(datagrams)],
                                   [(SOL_UDP, UDP_SEGMENT, struct.pack("=H", len(datagrams[0])))],
                                   0, self.local.getsockname())

    def counters(self) -> dict[str, int]:
        return {k: v for k, v in self.fwd.counters().items() if v}

    def close(self) -> None:
        del self.fwd
        for s in (self.app, self.dev, self.local, *self.peers):
            s.close()


@pytest.fixture
def make(fwd_kernels: ModuleType) -> Iterator[Any]:
    rigs: list[OffloadRig] = []

    def build(path: str, **kw: Any) -> OffloadRig:
        rig = OffloadRig(fwd_kernels, path, **kw)
        rigs.append(rig)
        return rig

    yield build
    for rig in rigs:
        rig.close()


PATHS = ["udp", "routed", "switched"]


def expected_segments(rig: OffloadRig, superpacket: bytes, mss: int) -> list[bytes]:
    """The segments the peer must get: cut here by hand-checked rules, TTL one less on the
    routed paths (a router), unchanged on the switched one."""
    segments = py_offload.segment_tcp4(superpacket, rig.l2, mss)
    assert segments is not None
    if rig.l2:
        return segments
    out = []
    for s in segments:
        ip = bytearray(s)
        ip[8] -= 1
        ip[10:12] = b"\x00\x00"
        ip[10:12] = struct.pack("!H", naive_checksum(bytes(ip[:20])))
        out.append(bytes(ip))
    return out


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("gso", [True, False])
def test_superpacket_goes_out_as_segments(make: Any, path: str, gso: bool) -> None:
    rig = make(path, udp_gso=gso)
    payload = bytes((i * 31) % 256 for i in range(5 * 1360 + 500))
    superpacket = rig.frame(tcp_packet(payload, dst=overlay(0), partial=True))
    assert rig.read(tso(superpacket, 1360, rig.l2)) == 1
    got = [rig.inner(d) for d in rig.received(0, 6)]
    assert got == expected_segments(rig, superpacket, 1360)
    for segment in got:
        assert ip_checksum_ok(segment[rig.l2:]) and l4_checksum_ok(segment[rig.l2:])
    assert b"".join(payload_of(s[rig.l2:]) for s in got) == payload
    expected = {"inside_packets": 6, "inside_bytes": sum(len(s) for s in got),
                "forwarded_packets": 6, "offload_superpackets": 1, "offload_segments": 6}
    if gso:
        expected["offload_gso_sends"] = 1
    assert rig.counters() == expected
    # Per-peer bytes are inner bytes: the same as inside_bytes, without the outer headers.
    assert rig.fwd.peer_counters()[0] == (6, expected["inside_bytes"], 0, 0)
    assert rig.received(1, 0) == []


def test_gso_runs_break_at_the_peer_queue_and_size_limits(make: Any) -> None:
    rig = make("udp")
    # Two superpackets to two peers, one read each, and one of 100 segments: the queue entry
    # of peer 0 holds at most 64 datagrams.
    big = tcp_packet(bytes(100 * 500), dst=overlay(0))
    other = tcp_packet(bytes(3 * 500), dst=overlay(1))
    rig.read(tso(big, 500), tso(other, 500))
    assert len(rig.received(0, 100)) == 100
    assert len(rig.received(1, 3)) == 3
    c = rig.counters()
    assert (c["offload_gso_sends"], c["forwarded_packets"], c["offload_segments"]) == (3, 103, 103)


@pytest.mark.parametrize(("mss", "sends"), [(1000, 1), (1001, 2)])
def test_superpackets_back_to_back_in_the_arena_share_a_gso_send(make: Any, mss: int,
                                                                 sends: int) -> None:
    # The segments of a batch's superpackets share one arena, each run starting on a 16-byte
    # boundary. Runs of 3 * (40 + 1000) bytes end on one, so the second superpacket's first
    # datagram starts where the first's last ends: one entry, one send. With mss 1001 there is
    # a gap and each superpacket has its own send.
    rig = make("udp")
    first = tcp_packet(bytes(3 * mss), dst=overlay(0), seq=0)
    second = tcp_packet(bytes(3 * mss), dst=overlay(0), seq=3 * mss)
    rig.read(tso(first, mss), tso(second, mss))
    assert len(rig.received(0, 6)) == 6
    c = rig.counters()
    assert (c["offload_gso_sends"], c["forwarded_packets"]) == (sends, 6)


def test_flooded_segments_are_not_merged(make: Any) -> None:
    rig = make("switched", static_peer0=False)
    superpacket = eth(tcp_packet(bytes(3000), dst=overlay(0)))
    rig.read(tso(superpacket, 1000, 14))
    for i in range(2):
        assert [rig.inner(d) for d in rig.received(i, 3)] == py_offload.segment_tcp4(
            superpacket, 14, 1000)
    c = rig.counters()
    assert c["flooded_copies"] == 6 and c["forwarded_packets"] == 6
    assert "offload_gso_sends" not in c


@pytest.mark.parametrize("path", ["udp", "routed"])
def test_segments_are_routed_one_by_one(make: Any, path: str) -> None:
    rig = make(path, mtu=1400)
    # DF and 40 + 1400 > the path MTU: every full segment is too big, the short last one goes.
    superpacket = tcp_packet(bytes(2 * 1400 + 100), dst=overlay(0))
    rig.read(tso(superpacket, 1400))
    got = [rig.inner(d) for d in rig.received(0, 1)]
    assert [len(g) for g in got] == [140]
    c = rig.counters()
    assert (c["inside_packets"], c["inside_too_big"], c["forwarded_packets"]) == (3, 2, 1)
    assert (c["icmp_sent"], c["offload_segments"]) == (2, 3)
    writes = rig.device_writes()
    assert len(writes) == 2 and all(w[:10] == bytes(10) for w in writes)
    assert all(w[10 + 20] == 3 and w[10 + 21] == 4 for w in writes)   # frag needed


def _bad_reads() -> list[Any]:
    good = tcp_packet(b"x" * 3000, dst=overlay(0))
    return [
        pytest.param(b"\x00" * 9, id="shorter-than-vnet-header"),
        pytest.param(b"", id="empty"),
        pytest.param(vnet(1, 0, 0, 0, 20, len(good) - 21) + good, id="csum-offset-outside"),
        pytest.param(vnet(1, 0, 0, 0, len(good), 0) + good, id="csum-start-outside"),
        pytest.param(vnet(0, 3, 40, 1000) + good, id="gso-udp"),
        pytest.param(vnet(0, 4, 40, 1000) + good, id="gso-tcpv6"),
        pytest.param(vnet(0, 1, 40, 0) + good, id="mss-0"),
        pytest.param(vnet(0, 1, 28, 1000) + udp_packet(b"u" * 3000, dst=overlay(0)),
                     id="tcpv4-not-tcp"),
        pytest.param(vnet(0, 1, 40, 1) + tcp_packet(b"x" * 1100, dst=overlay(0)),
                     id="too-many-segments"),
    ]


@pytest.mark.parametrize("read", _bad_reads())
def test_bad_offload_is_counted_once(make: Any, read: bytes) -> None:
    rig = make("udp")
    assert rig.read(read) == 1
    # Refused, and still a read: inside_packets = forwarded + tx_error + inside drops.
    expected = {"inside_bad_offload": 1, "inside_packets": 1}
    if len(read) > 10:
        expected["inside_bytes"] = len(read) - 10
    assert rig.counters() == expected
    assert rig.received(0, 0) == []


def test_ecn_bit_is_ignored(make: Any) -> None:
    rig = make("udp")
    superpacket = tcp_packet(bytes(2000), dst=overlay(0), flags=ACK | CWR | ECE)
    rig.read(tso(superpacket, 1000, gso_type=0x81))
    assert [tcp_fields(d)["flags"] for d in rig.received(0, 2)] == [ACK | CWR | ECE, ACK | ECE]


@pytest.mark.parametrize("path", PATHS)
def test_needs_csum_is_completed(make: Any, path: str) -> None:
    rig = make(path)
    inner = udp_packet(b"q" * 333, dst=overlay(0), partial=True)
    frame = rig.frame(inner)
    rig.read(vnet(1, 0, 0, 0, rig.l2 + 20, 6) + frame)
    got = [rig.inner(d)[rig.l2:] for d in rig.received(0, 1)]
    assert len(got) == 1 and l4_checksum_ok(got[0])
    assert got[0][20:] == udp_packet(b"q" * 333, dst=overlay(0))[20:]
    assert rig.counters()["forwarded_packets"] == 1


@pytest.mark.parametrize("path", ["udp", "routed"])
def test_icmp_errors_carry_a_vnet_header(make: Any, path: str) -> None:
    rig = make(path)
    rig.read(bytes(10) + tcp_packet(b"x", dst="192.168.9.9"))
    writes = rig.device_writes()
    assert len(writes) == 1 and writes[0][:10] == bytes(10)
    assert writes[0][10 + 9] == 1 and writes[0][10 + 20:10 + 22] == b"\x03\x00"
    assert rig.counters() == {"inside_packets": 1, "inside_bytes": 41, "inside_no_route": 1,
                              "icmp_sent": 1}


def test_gso_refused_goes_singly_and_turns_gso_off(make: Any) -> None:
    rig = make("udp")
    rig.local.setsockopt(socket.SOL_SOCKET, SO_NO_CHECK, 1)   # GSO sends now fail: EINVAL
    superpacket = tcp_packet(bytes(3000), dst=overlay(0))
    rig.read(tso(superpacket, 1000))
    assert len(rig.received(0, 3)) == 3
    # EINVAL for 1040-byte datagrams may mean only that they did not fit this peer's path
    # (IP_PMTUDISC_DONT): GSO stays on, and datagrams that large go to that peer singly.
    assert rig.fwd.offloads()["udp_gso"] is True
    rig.read(tso(superpacket, 1000))
    assert len(rig.received(0, 3)) == 3
    c = rig.counters()
    assert (c["offload_gso_refused"], c["forwarded_packets"], c.get("tx_error", 0)) == (1, 6, 0)
    # EINVAL for datagrams no path is too small for: the socket cannot do GSO at all.
    small = tcp_packet(bytes(1500), dst=overlay(0))
    rig.read(tso(small, 500))
    assert len(rig.received(0, 3)) == 3
    assert rig.fwd.offloads()["udp_gso"] is False
    c = rig.counters()
    assert (c["offload_gso_refused"], c["forwarded_packets"], c.get("tx_error", 0)) == (2, 9, 0)
    assert "offload_gso_sends" not in c
    assert rig.fwd.peer_counters()[0][:2] == (9, 6 * 1040 + 3 * 540)


def test_gso_refused_for_one_peer_still_merges_for_the_others(make: Any) -> None:
    rig = make("udp")
    rig.local.setsockopt(socket.SOL_SOCKET, SO_NO_CHECK, 1)
    rig.read(tso(tcp_packet(bytes(3000), dst=overlay(0)), 1000))
    assert len(rig.received(0, 3)) == 3
    rig.local.setsockopt(socket.SOL_SOCKET, SO_NO_CHECK, 0)   # GSO works again
    rig.read(tso(tcp_packet(bytes(3000), dst=overlay(1)), 1000),
             tso(tcp_packet(bytes(3000), dst=overlay(0)), 1000),
             tso(tcp_packet(bytes(3000), dst=overlay(0)), 900))
    assert len(rig.received(0, 7)) == 7 and len(rig.received(1, 3)) == 3
    c = rig.counters()
    # Peer 1's run and peer 0's run of smaller datagrams went as GSO sends; peer 0's run of
    # the refused size went singly.
    assert (c["offload_gso_refused"], c["offload_gso_sends"], c["forwarded_packets"]) == (1, 2, 13)


def test_without_vnet_hdr_reads_are_plain_packets(make: Any) -> None:
    rig = make("udp", vnet_hdr=False, udp_gso=True)
    packets = [tcp_packet(bytes(1000), dst=overlay(0), seq=1000 * i) for i in range(3)]
    rig.read(*packets)
    assert [d[12:] for d in rig.received(0, 3)] == [p[12:] for p in packets]
    # Three datagrams of one size to one peer: staged into one GSO send.
    assert rig.counters() == {"inside_packets": 3, "inside_bytes": 3 * 1040,
                              "forwarded_packets": 3, "offload_gso_sends": 1}


@pytest.mark.parametrize("gso", [True, False])
def test_single_datagrams_are_staged_into_gso_runs(make: Any, gso: bool) -> None:
    """Plain packets read one by one (not back to back in memory) still share GSO sends:
    a run is one peer's datagrams of the first one's size, closed by a shorter one; a longer
    one or another peer starts a new run. What arrives is the same datagrams, in order."""
    rig = make("udp", vnet_hdr=False, udp_gso=gso)
    sizes_and_peers = [(1000, 0), (1000, 0), (400, 0), (1000, 0), (1000, 1), (1000, 0),
                       (1200, 0), (1200, 0)]
    packets = [tcp_packet(bytes(size), dst=overlay(peer), seq=i)
               for i, (size, peer) in enumerate(sizes_and_peers)]
    rig.read(*packets)
    to0 = [p for p, (_, peer) in zip(packets, sizes_and_peers, strict=True) if peer == 0]
    assert [d[12:] for d in rig.received(0, len(to0))] == [p[12:] for p in to0]
    assert [d[12:] for d in rig.received(1, 1)] == [packets[4][12:]]
    c = rig.counters()
    assert c["forwarded_packets"] == len(packets)
    # Runs: [1000 1000 400] [1000] | [1000 @1] | [1000] [1200 1200] -> two GSO sends (a run
    # of one is a plain send).
    assert c.get("offload_gso_sends", 0) == (2 if gso else 0)


# --- receive side: UDP GRO and coalesced writes ---------------------------------------------

def inner_from(peer: int, count: int, size: int = 1000, **kw: Any) -> list[bytes]:
    """Consecutive TCP segments from peer ``peer``'s subnet to our own."""
    return flow(count, size, src=overlay(peer), dst="10.0.0.9", **kw)


@pytest.mark.parametrize("vnet_hdr", [False, True])
def test_gro_receive_is_split_into_datagrams(make: Any, vnet_hdr: bool) -> None:
    rig = make("udp", udp_gro=True, vnet_hdr=vnet_hdr)
    packets = [udp_packet(bytes([i]) * 300, src=overlay(0), dst="10.0.0.9") for i in range(3)]
    packets.append(udp_packet(b"\x07" * 100, src=overlay(0), dst="10.0.0.9"))
    rig.send_gso(0, packets)
    assert rig.outside(1) == 1
    writes = rig.device_writes()
    assert writes == [bytes(10) * vnet_hdr + p for p in packets]
    size = sum(map(len, packets))
    assert rig.counters() == {"outside_packets": 4, "outside_bytes": size,
                              "delivered_packets": 4, "offload_gro_receives": 1}
    assert rig.fwd.peer_counters()[0] == (0, 0, 4, size)


SO_TIMESTAMPNS = 35


@pytest.mark.parametrize("vnet_hdr", [False, True])
def test_gro_run_whose_cmsg_was_cut_short_is_dropped_as_truncated(make: Any,
                                                                  vnet_hdr: bool) -> None:
    # A timestamp cmsg comes first and takes the room the UDP_GRO one needed (MSG_CTRUNC):
    # the run's boundaries are unknown, so it must not be taken for one datagram.
    rig = make("udp", udp_gro=True, vnet_hdr=vnet_hdr)
    rig.local.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
    packets = [udp_packet(bytes([i]) * 300, src=overlay(0), dst="10.0.0.9") for i in range(3)]
    rig.send_gso(0, packets)
    assert rig.outside(1) == 1
    assert rig.device_writes() == []
    assert rig.counters() == {"outside_packets": 1, "outside_bytes": 3 * len(packets[0]),
                              "outside_truncated": 1}


def test_gro_pieces_are_checked_one_by_one(make: Any) -> None:
    rig = make("udp", udp_gro=True, vnet_hdr=False)
    good = udp_packet(b"g" * 300, src=overlay(0), dst="10.0.0.9")
    spoofed = udp_packet(b"s" * 300, src=overlay(1), dst="10.0.0.9")
    rig.send_gso(0, [good, spoofed, good])
    rig.outside(1)
    assert rig.device_writes() == [good, good]
    c = rig.counters()
    assert (c["outside_packets"], c["outside_spoofed_source"], c["delivered_packets"]) == (3, 1, 2)


@pytest.mark.parametrize("path", PATHS)
def test_delivered_segments_are_coalesced(make: Any, path: str) -> None:
    rig = make(path, udp_gro=True, static_peer0=False)
    parts = [rig.frame(p) for p in inner_from(0, 4)]
    wire = [rig.wire(p) for p in parts]
    rig.fwd.set_capture(True)
    rig.send_gso(0, wire)
    assert rig.outside(1) == 1
    writes = rig.device_writes()
    assert len(writes) == 1
    check_merged(writes[0][:10], writes[0][10:], parts, rig.l2)
    assert [r[2] for r in rig.fwd.drain_capture()] == parts
    c = rig.counters()
    assert (c["delivered_packets"], c["offload_coalesced_writes"],
            c["offload_coalesced_segments"], c["offload_gro_receives"]) == (4, 1, 4, 1)


@pytest.mark.parametrize("path", PATHS)
def test_unfinished_checksums_from_a_kernel_vtep_are_finished(make: Any, path: str) -> None:
    """What a kernel VTEP on a veth sends: segments whose checksum holds the pseudo-header sum
    only. They reach the device finished (and, finished, are coalesced)."""
    rig = make(path, udp_gro=True, static_peer0=False)
    parts = [rig.frame(p) for p in inner_from(0, 3, partial=True)]
    parts.append(rig.frame(udp_packet(b"u" * 50, src=overlay(0), dst="10.0.0.9", partial=True)))
    wire = [rig.wire(p) for p in parts]
    for datagram in wire:
        rig.peers[0].sendto(datagram, rig.local.getsockname())
    assert rig.outside(4) == 4
    writes = rig.device_writes()
    assert len(writes) == 2
    finished = [rig.frame(p) for p in inner_from(0, 3)]
    check_merged(writes[0][:10], writes[0][10:], finished, rig.l2)
    assert writes[1] == bytes(10) + rig.frame(udp_packet(b"u" * 50, src=overlay(0),
                                                         dst="10.0.0.9"))
    c = rig.counters()
    assert (c["offload_checksums_finished"], c["delivered_packets"]) == (4, 4)


def test_coalesced_write_error_counts_every_segment(make: Any) -> None:
    rig = make("udp", udp_gro=True)
    rig.app.shutdown(socket.SHUT_RD)
    rig.send_gso(0, inner_from(0, 3))
    rig.outside(1)
    c = rig.counters()
    assert (c["device_write_error"], c.get("delivered_packets", 0)) == (3, 0)
    assert "offload_coalesced_writes" not in c


# --- the two forwarders against each other ----------------------------------------------------

def random_reads(rng: random.Random, l2: int) -> list[bytes]:
    """A batch of device reads: superpackets of random sizes to random peers (some with a
    payload that makes their run a multiple of 16 bytes), plain packets, bad headers."""
    reads = []
    for _ in range(rng.randint(1, 6)):
        roll = rng.random()
        dst = overlay(rng.randrange(2)) if rng.random() < 0.9 else "192.168.1.1"
        mss = rng.choice([16, 100, 536, 1000, 1448])
        size = rng.choice([rng.randint(1, 9000), mss * rng.randint(1, 40), 8 * rng.randint(1, 500)])
        payload = bytes([rng.randrange(256)]) * min(size, 20000)
        packet = tcp_packet(payload, dst=dst, seq=rng.randrange(1 << 32),
                            flags=rng.choice([ACK, ACK | PSH, ACK | FIN | PSH]))
        if l2:
            packet = eth(packet)
        if rng.random() < 0.15:
            packet = mutate_header_byte(rng, packet, l2)
        if roll < 0.7:
            reads.append(tso(packet, mss, l2))
        elif roll < 0.85:
            reads.append(bytes(10) + packet[:1400 + l2])
        else:
            reads.append(vnet(0, rng.choice([1, 3, 5]), 0, rng.randrange(2000)) + packet)
    return reads


@pytest.mark.parametrize("path", PATHS)
def test_forwarder_parity(path: str) -> None:
    kernels = (_cython_module(), importlib.import_module("overlayd.dataplane.python_kernels"))
    rng = random.Random(99)
    for _ in range(15):
        reads = random_reads(rng, 14 if path == "switched" else 0)
        results = []
        for module in kernels:
            rig = OffloadRig(module, path, batch_size=4, static_peer0=False)
            try:
                rig.read(*reads)
                results.append((rig.all_received(rig.fwd.counters()["forwarded_packets"]),
                                rig.fwd.counters(), rig.fwd.peer_counters(),
                                rig.device_writes()))
            finally:
                rig.close()
        assert results[0] == results[1]


def send_as_runs(rig: OffloadRig, rng: random.Random, sender: int,
                 datagrams: list[bytes]) -> int:
    """Send ``datagrams`` in order: runs of equal size (the last may be shorter) as one UDP
    GSO send, which the receiver's UDP GRO hands over as one receive, the rest singly. How
    many receives the forwarder will see."""
    receives, i = 0, 0
    while i < len(datagrams):
        j = i + 1
        if rng.random() < 0.7:
            while (j < len(datagrams) and j - i < 16
                   and len(datagrams[j]) <= len(datagrams[i])):
                j += 1
                if len(datagrams[j - 1]) < len(datagrams[i]):
                    break
        if j - i > 1:
            rig.send_gso(sender, datagrams[i:j])
        else:
            rig.peers[sender].sendto(datagrams[i], rig.local.getsockname())
        receives += 1
        i = j
    return receives


@pytest.mark.parametrize("path", PATHS)
def test_outside_forwarder_parity(path: str) -> None:
    """Whole forwarders, offloads on, on random outside traffic: UDP GRO runs split, each
    datagram checked, partial checksums finished, segments coalesced into device writes; the
    Cython kernel and the twin must write the same bytes and count the same."""
    kernels = (_cython_module(), importlib.import_module("overlayd.dataplane.python_kernels"))
    rng = random.Random(4242)
    l2 = 14 if path == "switched" else 0
    for _ in range(40):
        streams = [(peer, [rig_wire(path, p) for p in random_stream(
            rng, l2, src=overlay(peer), dst="10.0.0.9")]) for peer in range(2)]
        seed = rng.randrange(1 << 30)
        results = []
        for module in kernels:
            rig = OffloadRig(module, path, udp_gro=True, batch_size=4, static_peer0=False)
            # Room for the whole stream: a receive the socket dropped would only time out.
            rig.local.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 23)
            try:
                runs = random.Random(seed)
                receives = sum(send_as_runs(rig, runs, peer, stream)
                               for peer, stream in streams)
                assert rig.outside(receives) == receives
                results.append((rig.device_writes(), rig.fwd.counters(),
                                rig.fwd.peer_counters()))
            finally:
                rig.close()
        assert results[0] == results[1]
        counters = results[0][1]
        assert counters["delivered_packets"] > 0
        assert identity_violations(counters, results[0][2]) == []


def rig_wire(path: str, inner: bytes) -> bytes:
    header = struct.pack("!BBHI", 8, 0, 0, VNI << 8)
    if path == "routed":
        return header + eth(inner, dst=OUR_MAC)
    return header + inner if path == "switched" else inner
