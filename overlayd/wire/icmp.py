"""ICMP error messages a router sends (RFC 792, RFC 1191, RFC 1812 §4.3.2).

``build_icmp_error`` returns a whole IPv4 packet ready to write into the device;
``icmp_error_allowed`` says whether RFC 1812 §4.3.2.7 lets us answer a packet at all.
The Cython kernel carries its own C copy of both; tests hold the two against dpkt and scapy.
"""

from __future__ import annotations

import struct
from typing import Final

from overlayd.wire import ipv4

# Types and codes we send.
DEST_UNREACHABLE: Final = 3
TIME_EXCEEDED: Final = 11
CODE_NET_UNREACHABLE: Final = 0
CODE_HOST_UNREACHABLE: Final = 1
CODE_FRAGMENTATION_NEEDED: Final = 4     # with the next-hop MTU, RFC 1191
CODE_TTL_EXCEEDED: Final = 0

# Types that are themselves errors; answering them could loop between routers (RFC 1812 4.3.2.7).
ERROR_TYPES: Final = frozenset({3, 4, 5, 11, 12})

ICMP_HEADER_LEN: Final = 8
MAX_ERROR_PACKET: Final = 576          # RFC 1812 4.3.2.3: the whole error fits the minimum MTU
MAX_QUOTE: Final = MAX_ERROR_PACKET - ipv4.HEADER_MIN_LEN - ICMP_HEADER_LEN
ERROR_TTL: Final = 64
ERROR_TOS: Final = 0xC0                # internetwork control precedence, RFC 1812 4.3.2.5


def icmp_error_allowed(packet: bytes | bytearray | memoryview) -> bool:
    """False when RFC 1812 forbids an ICMP error about ``packet``.

    Not about: an ICMP error (or an ICMP packet too short to tell), a non-initial fragment,
    a packet whose source is not a unicast host (0/8, 127/8, 224/4, 240/4) or that was sent to
    multicast or limited broadcast. Anything shorter than an IPv4 header is not answered either.
    """
    if len(packet) < ipv4.HEADER_MIN_LEN:
        return False
    if ipv4.fragment_offset(packet) != 0:
        return False
    src = ipv4.source(packet)
    if src >> 24 in (0, 127) or src >> 28 >= 0xE:
        return False
    dst = ipv4.destination(packet)
    if dst >> 28 == 0xE or dst == 0xFFFFFFFF:
        return False
    if ipv4.protocol(packet) == ipv4.PROTO_ICMP:
        ihl = ipv4.header_length(packet)
        if ihl < ipv4.HEADER_MIN_LEN or ihl >= len(packet):
            return False
        if packet[ihl] in ERROR_TYPES:
            return False
    return True


def build_icmp_error(
    local_address: int,
    offending: bytes | bytearray | memoryview,
    icmp_type: int,
    code: int,
    next_hop_mtu: int = 0,
) -> bytes:
    """An IPv4 packet from ``local_address`` to the source of ``offending`` carrying an ICMP
    error that quotes ``offending`` as received, cut so the whole packet is <= 576 bytes.

    ``next_hop_mtu`` goes in the low 16 bits of the rest-of-header word (RFC 1191); it is 0 for
    every error but fragmentation needed.
    """
    if len(offending) < ipv4.HEADER_MIN_LEN:
        raise ValueError("the offending packet must hold at least an IPv4 header")
    quote = bytes(offending[:MAX_QUOTE])
    icmp = bytearray(struct.pack("!BBHHH", icmp_type & 0xFF, code & 0xFF, 0, 0,
                                 next_hop_mtu & 0xFFFF))
    icmp += quote
    struct.pack_into("!H", icmp, 2, ipv4.checksum(icmp))
    header = ipv4.build_header(
        source=local_address,
        destination=ipv4.source(offending),
        payload_length=len(icmp),
        protocol=ipv4.PROTO_ICMP,
        ttl=ERROR_TTL,
        tos=ERROR_TOS,
    )
    return header + bytes(icmp)
