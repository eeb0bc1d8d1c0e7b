"""VXLAN (RFC 7348) header and the outer flow hash, stdlib only.

Header (8 bytes): flags (0x08 = I, "VNI valid"), 24 reserved bits, the 24-bit VNI, 8 reserved
bits. We send exactly that, reserved bits zero; on receive we require the I bit and our VNI and,
as RFC 7348 section 5 asks, ignore the reserved bits.

``flow_hash`` is the entropy RFC 7348 section 5 wants in the outer UDP source port: the same
for every packet of one inner flow, spread across flows. The Cython kernels carry a C copy
(cext/vxlan_common.pxi); tests hold both to the same values.
"""

from __future__ import annotations

import struct
from typing import Final

from overlayd.wire import ethernet

HEADER_LEN: Final = 8
FLAG_I: Final = 0x08
MAX_VNI: Final = (1 << 24) - 1
# Bytes in front of an inner IPv4 packet on the routed path: VXLAN + inner Ethernet.
ROUTED_ENCAP_LEN: Final = HEADER_LEN + ethernet.HEADER_LEN
# Outer IPv4 (20) + UDP (8) + VXLAN (8) + inner Ethernet (14): device MTU = underlay MTU - 50.
OVERHEAD_IPV4: Final = 50

# Why ``check`` rejected a datagram; the data plane counts outside_<reason>.
TRUNCATED: Final = "truncated_vxlan"
BAD_FLAGS: Final = "bad_vxlan_flags"
WRONG_VNI: Final = "wrong_vni"

_PROTO_TCP = 6
_PROTO_UDP = 17
_FNV_OFFSET = 0x811C9DC5
_FNV_PRIME = 0x01000193


def build_header(vni: int) -> bytes:
    if not 0 <= vni <= MAX_VNI:
        raise ValueError(f"VNI must be 0..{MAX_VNI}, got {vni!r}")
    return struct.pack("!BBHI", FLAG_I, 0, 0, vni << 8)


def vni_of(datagram: bytes | bytearray | memoryview) -> int:
    return int.from_bytes(datagram[4:7], "big")


def check(datagram: bytes | bytearray | memoryview, vni: int, inner_min: int) -> str | None:
    """Why ``datagram`` is not a VXLAN datagram for ``vni`` carrying at least ``inner_min``
    bytes of inner frame, or None. The order is the order the data plane counts in."""
    if len(datagram) < HEADER_LEN:
        return TRUNCATED
    if not datagram[0] & FLAG_I:
        return BAD_FLAGS
    if vni_of(datagram) != vni:
        return WRONG_VNI
    if len(datagram) - HEADER_LEN < inner_min:
        return TRUNCATED
    return None


def _fnv1a(h: int, data: bytes | bytearray | memoryview) -> int:
    for byte in data:
        h = ((h ^ byte) * _FNV_PRIME) & 0xFFFFFFFF
    return h


def _fmix32(h: int) -> int:
    """MurmurHash3's finaliser: FNV-1a alone leaves the low bits (the ones `% n` uses) weak."""
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & 0xFFFFFFFF
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & 0xFFFFFFFF
    h ^= h >> 16
    return h


def flow_hash_ipv4(packet: bytes | bytearray | memoryview) -> int:
    """32-bit hash of an IPv4 packet's flow: addresses and protocol, plus the TCP/UDP ports
    when the packet is not a fragment (as Linux's flow dissector). Needs >= 20 bytes."""
    h = _fnv1a(_FNV_OFFSET, packet[12:20])
    proto = packet[9]
    h = _fnv1a(h, bytes([proto]))
    ihl = (packet[0] & 0x0F) * 4
    unfragmented = ((packet[6] & 0x3F) | packet[7]) == 0
    if (proto in (_PROTO_TCP, _PROTO_UDP) and unfragmented and ihl >= 20
            and ihl + 4 <= len(packet)):
        h = _fnv1a(h, packet[ihl:ihl + 4])
    return _fmix32(h)


def flow_hash_frame(frame: bytes | bytearray | memoryview) -> int:
    """32-bit hash of an Ethernet frame's flow: its IPv4 flow when it carries IPv4 (with a
    version-4 header that fits), else the MACs and ethertype. Needs >= 14 bytes."""
    if (ethernet.ethertype(frame) == ethernet.ETHERTYPE_IPV4
            and len(frame) >= ethernet.HEADER_LEN + 20 and frame[14] >> 4 == 4):
        return flow_hash_ipv4(frame[ethernet.HEADER_LEN:])
    return _fmix32(_fnv1a(_FNV_OFFSET, frame[:ethernet.HEADER_LEN]))

