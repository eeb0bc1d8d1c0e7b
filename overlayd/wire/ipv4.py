"""IPv4 header facts (RFC 791), the Internet checksum (RFC 1071) and its incremental update.

Addresses are unsigned 32-bit integers in host byte order, as everywhere in the data plane.
The accessors read fixed offsets and assume the caller checked the length (``parse_header``
does the full validation the packet path needs and says why a header is rejected).
"""

from __future__ import annotations

import socket
import struct
import sys
from dataclasses import dataclass
from typing import Final

HEADER_MIN_LEN: Final = 20          # bytes, IHL = 5
MAX_PACKET_LEN: Final = 65535       # total length is a 16-bit field
PROTO_ICMP: Final = 1
FLAG_DF: Final = 0x4000             # in the flags/fragment-offset word
FLAG_MF: Final = 0x2000
FRAG_OFFSET_MASK: Final = 0x1FFF
_LITTLE_ENDIAN: Final = sys.byteorder == "little"

# Offsets into the header.
OFF_VERSION_IHL: Final = 0
OFF_TOS: Final = 1
OFF_TOTAL_LEN: Final = 2
OFF_ID: Final = 4
OFF_FLAGS_FRAG: Final = 6
OFF_TTL: Final = 8
OFF_PROTO: Final = 9
OFF_CHECKSUM: Final = 10
OFF_SRC: Final = 12
OFF_DST: Final = 16


# --- addresses -------------------------------------------------------------------------------

def addr_to_int(address: str) -> int:
    """'10.1.2.3' -> 0x0a010203."""
    # inet_aton alone accepts '10.1' and '0x0a.1'; a subnet map must not silently mean another host.
    parts = address.split(".")
    if len(parts) != 4 or not all(p.isascii() and p.isdigit() and len(p) <= 3 and int(p) <= 255 for p in parts):
        raise ValueError(f"not a dotted-quad IPv4 address: {address!r}")
    return int.from_bytes(socket.inet_aton(address), "big")


def int_to_addr(value: int) -> str:
    """0x0a010203 -> '10.1.2.3'."""
    if not 0 <= value <= 0xFFFFFFFF:
        raise ValueError(f"IPv4 address out of range: {value!r}")
    return socket.inet_ntoa(value.to_bytes(4, "big"))


def prefix_mask(length: int) -> int:
    """Netmask of a prefix length as u32: 24 -> 0xffffff00, 0 -> 0."""
    if not 0 <= length <= 32:
        raise ValueError(f"prefix length must be 0..32, got {length!r}")
    return (0xFFFFFFFF << (32 - length)) & 0xFFFFFFFF


def in_prefix(address: int, network: int, length: int) -> bool:
    return (address & prefix_mask(length)) == network


# --- checksum --------------------------------------------------------------------------------

def ones_sum(data: bytes | bytearray | memoryview) -> int:
    """One's complement sum of ``data`` as big-endian 16-bit words, folded to 16 bits but not
    inverted (an odd trailing byte is the high half of a zero-padded word)."""
    if len(data) % 2:
        data = bytes(data) + b"\x00"
    # Summing native-order words and swapping the folded result equals summing big-endian
    # words (RFC 1071 2(B), byte order independence), and memoryview.cast sums in C.
    total = sum(memoryview(data).cast("B").cast("H"))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    if _LITTLE_ENDIAN:
        total = ((total & 0xFF) << 8) | (total >> 8)
    return total


def checksum(data: bytes | bytearray | memoryview) -> int:
    """RFC 1071 Internet checksum: one's complement of the one's complement sum of 16-bit words.

    A buffer that already contains its correct checksum gives 0.
    """
    return ~ones_sum(data) & 0xFFFF


def ttl_decrement_checksum(old_checksum: int, ttl: int, protocol: int) -> int:
    """Header checksum after TTL -> TTL-1, by RFC 1624 eqn. 3: HC' = ~(~HC + ~m + m').

    m is the 16-bit word holding TTL and protocol. Eqn. 3 (not eqn. 2) so the result never turns
    into the 0xffff that a full recomputation cannot produce; for a header whose checksum was
    right it equals a full recomputation, bit for bit.
    """
    old_word = ((ttl & 0xFF) << 8) | (protocol & 0xFF)
    new_word = (((ttl - 1) & 0xFF) << 8) | (protocol & 0xFF)
    total = (~old_checksum & 0xFFFF) + (~old_word & 0xFFFF) + new_word
    total = (total & 0xFFFF) + (total >> 16)
    total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


# --- header accessors ------------------------------------------------------------------------

def version(packet: bytes | bytearray | memoryview) -> int:
    return packet[OFF_VERSION_IHL] >> 4


def header_length(packet: bytes | bytearray | memoryview) -> int:
    """IHL in bytes."""
    return (packet[OFF_VERSION_IHL] & 0x0F) * 4


def total_length(packet: bytes | bytearray | memoryview) -> int:
    return (packet[OFF_TOTAL_LEN] << 8) | packet[OFF_TOTAL_LEN + 1]


def flags_fragment(packet: bytes | bytearray | memoryview) -> int:
    return (packet[OFF_FLAGS_FRAG] << 8) | packet[OFF_FLAGS_FRAG + 1]


def dont_fragment(packet: bytes | bytearray | memoryview) -> bool:
    return bool(flags_fragment(packet) & FLAG_DF)


def fragment_offset(packet: bytes | bytearray | memoryview) -> int:
    """In 8-byte units, as on the wire."""
    return flags_fragment(packet) & FRAG_OFFSET_MASK


def ttl(packet: bytes | bytearray | memoryview) -> int:
    return packet[OFF_TTL]


def protocol(packet: bytes | bytearray | memoryview) -> int:
    return packet[OFF_PROTO]


def header_checksum(packet: bytes | bytearray | memoryview) -> int:
    return (packet[OFF_CHECKSUM] << 8) | packet[OFF_CHECKSUM + 1]


def source(packet: bytes | bytearray | memoryview) -> int:
    return int.from_bytes(packet[OFF_SRC:OFF_SRC + 4], "big")


def destination(packet: bytes | bytearray | memoryview) -> int:
    return int.from_bytes(packet[OFF_DST:OFF_DST + 4], "big")


# --- validation ------------------------------------------------------------------------------

# Why parse_header rejected a packet. The names match the data plane's counter suffixes.
TOO_SHORT: Final = "too_short"
NOT_IPV4: Final = "not_ipv4"
BAD_HEADER: Final = "bad_header"            # IHL < 5 or IHL*4 > length
LENGTH_MISMATCH: Final = "length_mismatch"  # total length != length of the buffer
BAD_CHECKSUM: Final = "bad_checksum"


@dataclass(frozen=True, slots=True)
class Header:
    """The fields of a validated IPv4 header that routing needs."""

    header_length: int
    total_length: int
    flags_fragment: int
    ttl: int
    protocol: int
    checksum: int
    source: int
    destination: int

    @property
    def dont_fragment(self) -> bool:
        return bool(self.flags_fragment & FLAG_DF)

    @property
    def fragment_offset(self) -> int:
        return self.flags_fragment & FRAG_OFFSET_MASK


def validate(packet: bytes | bytearray | memoryview, *, verify_checksum: bool = False) -> str | None:
    """The first reason ``packet`` (exactly one datagram, nothing after it) is not a usable IPv4
    packet, or None. Checks run in the order the data plane counts them."""
    length = len(packet)
    if length < HEADER_MIN_LEN:
        return TOO_SHORT
    if version(packet) != 4:
        return NOT_IPV4
    ihl = header_length(packet)
    if ihl < HEADER_MIN_LEN or ihl > length:
        return BAD_HEADER
    if total_length(packet) != length:
        return LENGTH_MISMATCH
    if verify_checksum and checksum(packet[:ihl]) != 0:
        return BAD_CHECKSUM
    return None


def parse_header(packet: bytes | bytearray | memoryview) -> Header:
    """The header of ``packet``; ValueError naming the reason if ``validate`` rejects it."""
    reason = validate(packet)
    if reason is not None:
        raise ValueError(f"invalid IPv4 packet: {reason}")
    return Header(
        header_length=header_length(packet),
        total_length=total_length(packet),
        flags_fragment=flags_fragment(packet),
        ttl=ttl(packet),
        protocol=protocol(packet),
        checksum=header_checksum(packet),
        source=source(packet),
        destination=destination(packet),
    )


def build_header(
    *,
    source: int,
    destination: int,
    payload_length: int,
    protocol: int,
    ttl: int = 64,
    tos: int = 0,
    identification: int = 0,
    flags_fragment: int = 0,
) -> bytes:
    """A 20-byte IPv4 header (no options) with a correct checksum."""
    header = bytearray(struct.pack(
        "!BBHHHBBHII", 0x45, tos, HEADER_MIN_LEN + payload_length, identification,
        flags_fragment, ttl, protocol, 0, source, destination,
    ))
    struct.pack_into("!H", header, OFF_CHECKSUM, checksum(header))
    return bytes(header)
