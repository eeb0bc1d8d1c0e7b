"""Packet builders for the fuzz generators, written out here rather than taken from the code
under test (overlayd.wire, dataplane.offload), so a bug there cannot make a case and its check
agree by accident."""

from __future__ import annotations

import socket
import struct
from typing import Final

# The lab's RFC 1071 checksum, written out independently of overlayd.wire as this module is.
from overlayd.lab.agents import checksum as inet_sum

ETH_IPV4: Final = 0x0800
PROTO_ICMP, PROTO_TCP, PROTO_UDP = 1, 6, 17
VXLAN_FLAG_I: Final = 0x08
ACK, PSH, FIN, SYN, RST = 0x10, 0x08, 0x01, 0x02, 0x04


def addr(text: str) -> bytes:
    return socket.inet_aton(text)


def ipv4(src: bytes, dst: bytes, proto: int, payload: bytes, *, ttl: int = 64,
         df: bool = False, frag: int = 0, tos: int = 0, ident: int = 1,
         options: bytes = b"") -> bytes:
    """An IPv4 packet with a right header checksum."""
    ihl = 20 + len(options)
    header = bytearray(struct.pack("!BBHHHBBH4s4s", 0x40 | ihl // 4, tos,
                                   (ihl + len(payload)) & 0xFFFF, ident & 0xFFFF,
                                   (0x4000 if df else 0) | frag, ttl & 0xFF, proto, 0, src,
                                   dst) + options)
    struct.pack_into("!H", header, 10, inet_sum(bytes(header)))
    return bytes(header) + payload


def _pseudo(src: bytes, dst: bytes, proto: int, length: int) -> bytes:
    return src + dst + struct.pack("!BBH", 0, proto, length)


def tcp(src: bytes, dst: bytes, payload: bytes, *, sport: int = 40000, dport: int = 5201,
        seq: int = 1000, ack: int = 1, flags: int = ACK, window: int = 512,
        options: bytes = b"", byte12_low: int = 0, partial: bool = False) -> bytes:
    """A TCP segment with a right checksum (``partial``: only the pseudo-header sum, as a
    kernel leaves it for CHECKSUM_PARTIAL)."""
    doff = 20 + len(options)
    segment = bytearray(struct.pack("!HHIIBBHHH", sport, dport, seq & 0xFFFFFFFF,
                                    ack & 0xFFFFFFFF, (doff // 4) << 4 | byte12_low & 0x0F,
                                    flags & 0xFF, window, 0, 0) + options + payload)
    pseudo = _pseudo(src, dst, PROTO_TCP, len(segment))
    value = (~inet_sum(pseudo) & 0xFFFF) if partial else inet_sum(pseudo + bytes(segment))
    struct.pack_into("!H", segment, 16, value)
    return bytes(segment)


def udp(src: bytes, dst: bytes, payload: bytes, *, sport: int = 5000, dport: int = 6000,
        partial: bool = False) -> bytes:
    datagram = bytearray(struct.pack("!HHHH", sport, dport, (8 + len(payload)) & 0xFFFF, 0)
                         + payload)
    pseudo = _pseudo(src, dst, PROTO_UDP, len(datagram))
    value = (~inet_sum(pseudo) & 0xFFFF) if partial else (inet_sum(pseudo + bytes(datagram))
                                                          or 0xFFFF)
    struct.pack_into("!H", datagram, 6, value)
    return bytes(datagram)


def icmp(icmp_type: int, code: int, body: bytes) -> bytes:
    message = bytearray(struct.pack("!BBH", icmp_type, code, 0) + body)
    struct.pack_into("!H", message, 2, inet_sum(bytes(message)))
    return bytes(message)


def ethernet(dst: bytes, src: bytes, payload: bytes, ethertype: int = ETH_IPV4) -> bytes:
    return dst + src + struct.pack("!H", ethertype) + payload


def vxlan(vni: int, payload: bytes, flags: int = VXLAN_FLAG_I, reserved: bytes = b"") -> bytes:
    """The RFC 7348 header; ``reserved`` (up to 4 bytes) overrides the reserved fields."""
    header = bytearray(struct.pack("!B3xI", flags, (vni & 0xFFFFFF) << 8))
    header[1:1 + min(3, len(reserved))] = reserved[:3]
    if len(reserved) > 3:
        header[7] = reserved[3]
    return bytes(header) + payload


def vnet_hdr(flags: int = 0, gso_type: int = 0, hdr_len: int = 0, gso_size: int = 0,
             csum_start: int = 0, csum_offset: int = 0) -> bytes:
    """struct virtio_net_hdr (little endian, as a tun/tap device uses it by default)."""
    return struct.pack("<BBHHHH", flags & 0xFF, gso_type & 0xFF, hdr_len & 0xFFFF,
                       gso_size & 0xFFFF, csum_start & 0xFFFF, csum_offset & 0xFFFF)


def header_checksum_ok(packet: bytes) -> bool:
    ihl = (packet[0] & 0x0F) * 4
    return len(packet) >= ihl >= 20 and inet_sum(packet[:ihl]) == 0
