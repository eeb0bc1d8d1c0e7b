"""Wire formats: checksum, TTL update, ICMP errors, checked against naive code, dpkt and scapy.

The ICMP/checksum helpers exist twice: overlayd.wire (used by the Python twin) and the C copies
inside the Cython extension; the ``wire_impl`` fixture runs every test against both.
"""

from __future__ import annotations

import socket
import struct
from types import ModuleType, SimpleNamespace

import dpkt
import pytest
from checksum_helpers import naive_checksum
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scapy.layers.inet import ICMP, IP

from overlayd.wire import icmp, ipv4

A = ipv4.addr_to_int


@pytest.fixture
def wire_impl(kernels: ModuleType) -> SimpleNamespace:
    """The four wire helpers of one implementation: Python (overlayd.wire) or the C copies."""
    if kernels.IMPLEMENTATION == "cython":
        return SimpleNamespace(
            name="cython", checksum=kernels.checksum,
            ttl_decrement_checksum=kernels.ttl_decrement_checksum,
            build_icmp_error=kernels.build_icmp_error,
            icmp_error_allowed=kernels.icmp_error_allowed,
        )
    return SimpleNamespace(
        name="python", checksum=ipv4.checksum,
        ttl_decrement_checksum=ipv4.ttl_decrement_checksum,
        build_icmp_error=icmp.build_icmp_error, icmp_error_allowed=icmp.icmp_error_allowed,
    )


# --- addresses and prefixes -------------------------------------------------------------------

def test_address_round_trip() -> None:
    assert A("10.1.2.3") == 0x0A010203
    assert ipv4.int_to_addr(0x0A010203) == "10.1.2.3"
    assert A("255.255.255.255") == 0xFFFFFFFF
    assert ipv4.int_to_addr(0) == "0.0.0.0"


@pytest.mark.parametrize("bad", ["10.1", "0x0a.1.2.3", "256.1.1.1", "1.2.3.4.5", "", "a.b.c.d",
                                 "1.2.3.-4", "1.2.3.٣"])
def test_address_rejects(bad: str) -> None:
    with pytest.raises(ValueError):
        A(bad)


def test_int_to_addr_range() -> None:
    with pytest.raises(ValueError):
        ipv4.int_to_addr(2**32)
    with pytest.raises(ValueError):
        ipv4.int_to_addr(-1)


def test_prefix_mask() -> None:
    assert ipv4.prefix_mask(0) == 0
    assert ipv4.prefix_mask(8) == 0xFF000000
    assert ipv4.prefix_mask(24) == 0xFFFFFF00
    assert ipv4.prefix_mask(32) == 0xFFFFFFFF
    assert all(ipv4.prefix_mask(n) == int("1" * n + "0" * (32 - n), 2) for n in range(1, 33))
    for bad in (-1, 33):
        with pytest.raises(ValueError):
            ipv4.prefix_mask(bad)
    assert ipv4.in_prefix(A("10.1.2.3"), A("10.1.0.0"), 16)
    assert not ipv4.in_prefix(A("10.2.2.3"), A("10.1.0.0"), 16)


# --- checksum ---------------------------------------------------------------------------------

def test_checksum_rfc1071_example(wire_impl: SimpleNamespace) -> None:
    # RFC 1071 section 3: the words 0001 f203 f4f5 f6f7 sum to ddf2, so the checksum is 220d.
    assert wire_impl.checksum(bytes.fromhex("0001f203f4f5f6f7")) == 0x220D


def test_checksum_known_header(wire_impl: SimpleNamespace) -> None:
    # A textbook header (Wikipedia's IPv4 checksum example): checksum b861.
    header = bytes.fromhex("450000730000400040110000c0a80001c0a800c7")
    assert wire_impl.checksum(header) == 0xB861
    with_csum = header[:10] + b"\xb8\x61" + header[12:]
    assert wire_impl.checksum(with_csum) == 0


# The wire_impl fixture returns a module-level value, so sharing it across examples is safe.
FIXTURE_OK = [HealthCheck.function_scoped_fixture]


@settings(max_examples=200, deadline=None, suppress_health_check=FIXTURE_OK)
@given(data=st.binary(max_size=300))
def test_checksum_matches_naive(wire_impl: SimpleNamespace, data: bytes) -> None:
    assert wire_impl.checksum(data) == naive_checksum(data)


# Superpacket sizes, and bytes that make every word carry: the C sum takes 64-bit words into
# 128-bit accumulators, whose carries and end-around fold a short input never exercises.
@settings(max_examples=60, deadline=None, suppress_health_check=FIXTURE_OK)
@given(size=st.integers(0, 66000), offset=st.integers(0, 7),
       fill=st.sampled_from([b"\xff", b"\x00", b"\xff\xfe", b"\x80\x01\xff"]),
       noise=st.binary(max_size=64))
def test_checksum_of_long_carry_heavy_data(wire_impl: SimpleNamespace, size: int,
                                           offset: int, fill: bytes, noise: bytes) -> None:
    data = ((fill * (size // len(fill) + 1))[:size] + noise)[offset:]
    assert wire_impl.checksum(data) == naive_checksum(data)


# --- headers and the incremental TTL update ---------------------------------------------------

headers = st.builds(
    lambda tos, ident, frag, ttl, proto, src, dst, opts, payload: _header(
        tos, ident, frag, ttl, proto, src, dst, opts, payload),
    tos=st.integers(0, 255), ident=st.integers(0, 0xFFFF), frag=st.integers(0, 0xFFFF),
    ttl=st.integers(1, 255), proto=st.integers(0, 255),
    src=st.integers(0, 2**32 - 1), dst=st.integers(0, 2**32 - 1),
    opts=st.integers(0, 10).flatmap(lambda n: st.binary(min_size=4 * n, max_size=4 * n)),
    payload=st.binary(max_size=40),
)


def _header(tos: int, ident: int, frag: int, ttl: int, proto: int, src: int, dst: int,
            opts: bytes, payload: bytes) -> bytes:
    ihl = 5 + len(opts) // 4
    total = ihl * 4 + len(payload)
    header = bytearray(struct.pack("!BBHHHBBHII", 0x40 | ihl, tos, total, ident, frag, ttl,
                                   proto, 0, src, dst) + opts)
    struct.pack_into("!H", header, 10, naive_checksum(bytes(header)))
    return bytes(header) + payload


@settings(max_examples=300, deadline=None, suppress_health_check=FIXTURE_OK)
@given(packet=headers)
def test_ttl_decrement_equals_full_recomputation(wire_impl: SimpleNamespace,
                                                 packet: bytes) -> None:
    ihl = (packet[0] & 0x0F) * 4
    ttl, proto = packet[8], packet[9]
    old = (packet[10] << 8) | packet[11]
    decremented = bytearray(packet[:ihl])
    decremented[8] = ttl - 1
    decremented[10:12] = b"\x00\x00"
    assert wire_impl.ttl_decrement_checksum(old, ttl, proto) == naive_checksum(bytes(decremented))


@settings(max_examples=100, deadline=None)
@given(packet=headers)
def test_parse_header_reads_every_field(packet: bytes) -> None:
    parsed = dpkt.ip.IP(packet)
    header = ipv4.parse_header(packet)
    assert header.header_length == parsed.hl * 4
    assert header.total_length == parsed.len == len(packet)
    assert header.ttl == parsed.ttl
    assert header.protocol == parsed.p
    assert header.checksum == parsed.sum
    assert header.source == int.from_bytes(parsed.src, "big")
    assert header.destination == int.from_bytes(parsed.dst, "big")
    assert header.dont_fragment == bool(parsed.df)
    assert header.fragment_offset == parsed.off & dpkt.ip.IP_OFFMASK
    assert ipv4.validate(packet, verify_checksum=True) is None


def test_validate_reasons() -> None:
    good = ipv4.build_header(source=A("10.0.0.1"), destination=A("10.0.0.2"),
                             payload_length=4, protocol=17) + b"abcd"
    assert ipv4.validate(good, verify_checksum=True) is None
    assert ipv4.validate(good[:19]) == ipv4.TOO_SHORT
    assert ipv4.validate(b"\x60" + good[1:]) == ipv4.NOT_IPV4
    assert ipv4.validate(b"\x44" + good[1:]) == ipv4.BAD_HEADER
    assert ipv4.validate(b"\x4f" + good[1:]) == ipv4.BAD_HEADER
    assert ipv4.validate(good + b"x") == ipv4.LENGTH_MISMATCH
    corrupt = good[:12] + b"\x0b" + good[13:]
    assert ipv4.validate(corrupt) is None
    assert ipv4.validate(corrupt, verify_checksum=True) == ipv4.BAD_CHECKSUM
    with pytest.raises(ValueError, match="too_short"):
        ipv4.parse_header(b"\x45")


# --- ICMP errors ------------------------------------------------------------------------------

def _offending(size: int, *, src: str = "10.0.1.5", dst: str = "10.0.9.9", proto: int = 17,
               ttl: int = 64) -> bytes:
    payload = bytes(range(256)) * (size // 256 + 1)
    return ipv4.build_header(source=A(src), destination=A(dst), payload_length=size - 20,
                             protocol=proto, ttl=ttl) + payload[:size - 20]


@pytest.mark.parametrize(("icmp_type", "code", "mtu"), [
    (3, 0, 0), (3, 1, 0), (11, 0, 0), (3, 4, 1400), (3, 4, 65535),
])
@pytest.mark.parametrize("size", [20, 21, 100, 548, 549, 1500, 65535])
def test_build_icmp_error_parsed_by_dpkt_and_scapy(
    wire_impl: SimpleNamespace, icmp_type: int, code: int, mtu: int, size: int,
) -> None:
    offending = _offending(size)
    local = A("10.0.1.1")
    packet = wire_impl.build_icmp_error(local, offending, icmp_type, code, mtu)
    assert isinstance(packet, bytes)
    quote_len = min(size, 576 - 28)
    assert len(packet) == 28 + quote_len <= 576

    ip = dpkt.ip.IP(packet)
    assert (ip.v, ip.hl, ip.tos, ip.len, ip.id, ip.off, ip.ttl, ip.p) == (
        4, 5, 0xC0, len(packet), 0, 0, 64, 1)
    assert ip.src == socket.inet_aton("10.0.1.1")
    assert ip.dst == socket.inet_aton("10.0.1.5")
    assert naive_checksum(packet[:20]) == 0
    assert naive_checksum(packet[20:]) == 0
    message = ip.data
    assert isinstance(message, dpkt.icmp.ICMP)
    assert (message.type, message.code) == (icmp_type, code)
    assert packet[28:] == offending[:quote_len]
    rest = packet[24:28]
    assert rest == struct.pack("!HH", 0, mtu)

    sp = IP(packet)
    assert sp[ICMP].type == icmp_type and sp[ICMP].code == code
    if icmp_type == 3 and code == 4:
        assert sp[ICMP].nexthopmtu == mtu
    # scapy recomputes both checksums from scratch when asked to rebuild without them.
    rebuilt = IP(packet)
    del rebuilt.chksum
    del rebuilt[ICMP].chksum
    assert bytes(rebuilt) == packet


def test_build_icmp_error_rejects_short(wire_impl: SimpleNamespace) -> None:
    with pytest.raises(ValueError):
        wire_impl.build_icmp_error(1, b"\x45" * 19, 3, 0)


def test_build_icmp_error_parity_on_odd_lengths(wire_impl: SimpleNamespace) -> None:
    for size in (20, 21, 33, 547, 548, 549, 600):
        offending = _offending(size, proto=6)
        for args in ((3, 0, 0), (11, 0, 0), (3, 4, 1280)):
            assert (wire_impl.build_icmp_error(A("10.0.1.1"), offending, *args)
                    == icmp.build_icmp_error(A("10.0.1.1"), offending, *args))


def _icmp_packet(icmp_type: int, *, src: str = "10.0.1.5", dst: str = "10.0.9.9") -> bytes:
    body = bytes([icmp_type, 0, 0, 0, 0, 0, 0, 0])
    return ipv4.build_header(source=A(src), destination=A(dst), payload_length=len(body),
                             protocol=1) + body


@pytest.mark.parametrize(("packet", "allowed"), [
    (_offending(60), True),
    (_icmp_packet(8), True),                 # echo request: a query, answer it
    (_icmp_packet(0), True),                 # echo reply
    (_icmp_packet(3), False),
    (_icmp_packet(4), False),
    (_icmp_packet(5), False),
    (_icmp_packet(11), False),
    (_icmp_packet(12), False),
    (_icmp_packet(8)[:20], False),           # ICMP too short to tell its type
    (_offending(60, src="0.1.2.3"), False),
    (_offending(60, src="127.0.0.1"), False),
    (_offending(60, src="224.0.0.5"), False),
    (_offending(60, src="239.255.255.255"), False),
    (_offending(60, src="240.0.0.1"), False),
    (_offending(60, src="255.255.255.255"), False),
    (_offending(60, src="1.2.3.4"), True),
    (_offending(60, dst="224.0.0.1"), False),
    (_offending(60, dst="239.1.2.3"), False),
    (_offending(60, dst="255.255.255.255"), False),
    (_offending(60, dst="223.255.255.255"), True),
    (b"\x45" * 19, False),
], ids=lambda v: v.hex()[:12] if isinstance(v, bytes) else str(v))
def test_icmp_error_allowed(wire_impl: SimpleNamespace, packet: bytes, allowed: bool) -> None:
    assert wire_impl.icmp_error_allowed(packet) is allowed


@pytest.mark.parametrize("offset_word", [0x0001, 0x2001, 0x4000 | 0x1FFF, 0x0100])
def test_icmp_not_about_non_initial_fragments(wire_impl: SimpleNamespace,
                                              offset_word: int) -> None:
    packet = bytearray(_offending(60))
    struct.pack_into("!H", packet, 6, offset_word)
    assert wire_impl.icmp_error_allowed(bytes(packet)) is False
    struct.pack_into("!H", packet, 6, 0x2000 | 0x4000)   # MF/DF alone: an initial fragment
    assert wire_impl.icmp_error_allowed(bytes(packet)) is True


@settings(max_examples=300, deadline=None, suppress_health_check=FIXTURE_OK)
@given(data=st.one_of(
    st.binary(max_size=64),
    st.builds(lambda p, b: p[:9] + b"\x01" + p[10:] + b, headers, st.binary(max_size=8)),
))
def test_icmp_error_allowed_matches_oracle(wire_impl: SimpleNamespace, data: bytes) -> None:
    assert wire_impl.icmp_error_allowed(data) is _allowed_oracle(data)


def _allowed_oracle(data: bytes) -> bool:
    """RFC 1812 4.3.2.7 restated with dpkt doing the parsing."""
    if len(data) < 20:
        return False
    ip = dpkt.ip.IP.__new__(dpkt.ip.IP)
    dpkt.Packet.unpack(ip, data[:20])   # header fields only: no payload parsing, no length checks
    src, dst = int.from_bytes(ip.src, "big"), int.from_bytes(ip.dst, "big")
    if ip.off & dpkt.ip.IP_OFFMASK:
        return False
    if src >> 24 in (0, 127) or src >= A("224.0.0.0"):
        return False
    if A("224.0.0.0") <= dst <= A("239.255.255.255") or dst == A("255.255.255.255"):
        return False
    if ip.p == 1:
        ihl = (data[0] & 0x0F) * 4
        if ihl < 20 or len(data) <= ihl or data[ihl] in (3, 4, 5, 11, 12):
            return False
    return True


# --- VXLAN and Ethernet ------------------------------------------------------------------------

def test_vxlan_header_is_rfc7348() -> None:
    from scapy.layers.vxlan import VXLAN

    from overlayd.wire import vxlan
    header = vxlan.build_header(0xABCDEF)
    assert header == bytes([0x08, 0, 0, 0, 0xAB, 0xCD, 0xEF, 0])
    parsed = VXLAN(header)
    assert (parsed.flags, parsed.vni) == (0x08, 0xABCDEF)
    with pytest.raises(ValueError):
        vxlan.build_header(1 << 24)
    assert vxlan.check(header + b"\0" * 14, 0xABCDEF, 14) is None
    assert vxlan.check(header + b"\0" * 13, 0xABCDEF, 14) == vxlan.TRUNCATED
    assert vxlan.check(header, 0xABCDEE, 0) == vxlan.WRONG_VNI
    assert vxlan.check(b"\x00" + header[1:], 0xABCDEF, 0) == vxlan.BAD_FLAGS
    assert vxlan.check(header[:7], 0xABCDEF, 0) == vxlan.TRUNCATED


def test_ethernet_helpers() -> None:
    from overlayd.wire import ethernet
    mac = ethernet.parse_mac("02:AB:00:00:00:01")
    assert mac == bytes.fromhex("02ab00000001") and ethernet.format_mac(mac) == "02:ab:00:00:00:01"
    assert ethernet.mac_to_int(mac) == 0x02AB00000001 and ethernet.int_to_mac(0x02AB00000001) == mac
    for bad in ("02:ab:00:00:00", "02-ab-00-00-00-01", "zz:ab:00:00:00:01"):
        with pytest.raises(ValueError):
            ethernet.parse_mac(bad)
    assert ethernet.is_valid_source(mac)
    assert not ethernet.is_valid_source(ethernet.BROADCAST)
    assert not ethernet.is_valid_source(ethernet.ZERO)
    assert ethernet.is_multicast(bytes.fromhex("01005e000001"))
    frame = ethernet.build_header(ethernet.BROADCAST, mac, ethernet.ETHERTYPE_ARP)
    assert (ethernet.destination(frame), ethernet.source(frame), ethernet.ethertype(frame)) == (
        ethernet.BROADCAST, mac, 0x0806)


@settings(max_examples=300, deadline=None, suppress_health_check=FIXTURE_OK)
@given(data=st.one_of(
    st.binary(min_size=20, max_size=64),
    st.builds(lambda p, b: p + b, headers, st.binary(max_size=8)),
), frame_prefix=st.sampled_from([b"", b"\x02" * 12 + b"\x08\x00", b"\x02" * 12 + b"\x08\x06"]))
def test_flow_hash_c_equals_python(kernel_pair: tuple[ModuleType, ModuleType], data: bytes,
                                   frame_prefix: bytes) -> None:
    from overlayd.wire import vxlan
    cython_kernels, _ = kernel_pair
    if frame_prefix:
        frame = frame_prefix + data
        assert cython_kernels.flow_hash_frame(frame) == vxlan.flow_hash_frame(frame)
    else:
        assert cython_kernels.flow_hash_ipv4(data) == vxlan.flow_hash_ipv4(data)


def test_flow_hash_is_a_flow_property() -> None:
    """Same 5-tuple, other payload/TTL/ID: same hash; other ports: (here) another hash;
    fragments hash without ports."""
    from overlayd.wire import vxlan

    def udp(sport: int, payload: bytes, ttl: int = 64, frag: int = 0) -> bytes:
        body = struct.pack("!HHHH", sport, 53, 8 + len(payload), 0) + payload
        return ipv4.build_header(source=A("10.0.0.1"), destination=A("10.0.1.1"),
                                 payload_length=len(body), protocol=17, ttl=ttl,
                                 flags_fragment=frag) + body
    assert vxlan.flow_hash_ipv4(udp(1000, b"a")) == vxlan.flow_hash_ipv4(udp(1000, b"bb", 3))
    assert len({vxlan.flow_hash_ipv4(udp(p, b"a")) for p in range(1000, 1016)}) == 16
    assert vxlan.flow_hash_ipv4(udp(1000, b"a", frag=0x2000)) == \
        vxlan.flow_hash_ipv4(udp(2000, b"a", frag=0x2000))
