"""Offloads, pure-Python twin of cext/offload.pxi (same functions, same bytes; tests compare).

Why: a per-packet loop pays one read, one sendmsg, one recvmsg and one write per ~1.4 kB
packet. With the device opened with IFF_VNET_HDR and TSO, the kernel hands us TCP superpackets
of up to 64 kB, which ``segment_tcp4`` cuts into wire-sized segments; the ``Coalescer`` does
the reverse for packets we write into the device, so the guest stack sees one superpacket per
run of segments. The forwarders (forwarder_base.py) use UDP GSO/GRO around these. With USO
(``uso``: the device took TUN_F_USO4 | TUN_F_USO6), the same for UDP: ``segment_udp4`` cuts a
UDP superpacket an application sent with UDP_SEGMENT, and the Coalescer merges runs of one UDP
flow as the kernel's UDP GRO would (spec point 7 in cext/offload.pxi).

The virtio-net header (VNET_HDR_LEN bytes, host byte order - little-endian on the x86 hosts we
run on - in front of every read and write of a device opened with IFF_VNET_HDR):
  u8 flags (VNET_F_NEEDS_CSUM)  u8 gso_type (NONE, TCPV4, | ECN bit)  u16 hdr_len
  u16 gso_size  u16 csum_start  u16 csum_offset

Every function takes and returns whole packets (bytes); offsets are from the packet's first
byte, ``l2`` is the length of the link header in front of the IPv4 header (0 on a tun device,
14 on a tap device, where the ethertype must be IPv4).
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterable
from typing import Final, NamedTuple

from overlayd.wire.ipv4 import checksum, ones_sum

VNET_HDR_LEN: Final = 10
VNET_F_NEEDS_CSUM: Final = 1
VNET_GSO_NONE: Final = 0
VNET_GSO_TCPV4: Final = 1
VNET_GSO_UDP_L4: Final = 5       # UDP GSO (USO): kernel >= 6.2 with TUN_F_USO4 | TUN_F_USO6
VNET_GSO_ECN: Final = 0x80
GSO_MAX_SEGS: Final = 64         # datagrams in one UDP GSO send
GSO_MAX_BYTES: Final = 65000     # bytes in one UDP GSO send (under the 65507 a UDP packet holds)
GRO_SCAN: Final = 8              # pending items searched for a packet's flow, newest first
GRO_MAX_SEGS: Final = 64         # segments in one coalesced write
GRO_MAX_ITEMS: Final = 1024      # pending writes, and payloads appended to them, the Cython
GRO_MAX_RECS: Final = 4096       # coalescer has room for; when full, pending items are written
MAX_TSO_SEGMENTS: Final = 1024   # a 64 kB superpacket down to an MSS of 64 bytes
SEG_ARENA_BYTES: Final = 512 * 1024   # the forwarder's segmentation arena (see forwarder_base)
SEG_ARENA_ALIGN: Final = 16           # each superpacket's run starts on this boundary there

# Linux socket options (include/uapi/linux/udp.h), absent from Python's socket module.
UDP_SEGMENT: Final = 103
UDP_GRO: Final = 104

ZERO_VNET_HDR: Final = bytes(VNET_HDR_LEN)

_VNET_HDR: Final = struct.Struct("<BBHHHH")
_ETHERTYPE_IPV4: Final = b"\x08\x00"
_ETH_HEADER_LEN: Final = 14
_IPV4_MIN_HEADER: Final = 20
_TCP_MIN_HEADER: Final = 20
_PROTO_TCP: Final = 6
_PROTO_UDP: Final = 17
_UDP_HEADER: Final = 8
_UDP_CSUM_OFFSET: Final = 6
_MAX_IPV4_TOTAL: Final = 65535
_IP_MF_AND_OFFSET: Final = 0x3FFF
_TCP_FIN: Final = 0x01
_TCP_PSH: Final = 0x08
_TCP_ACK: Final = 0x10
_TCP_CWR: Final = 0x80
_TCP_CSUM_OFFSET: Final = 16     # the checksum's place in the TCP header


def parse_vnet_hdr(header: bytes | bytearray | memoryview
                   ) -> tuple[int, int, int, int, int, int]:
    """(flags, gso_type, hdr_len, gso_size, csum_start, csum_offset) of a virtio-net header."""
    return _VNET_HDR.unpack_from(header)


def build_vnet_hdr(flags: int, gso_type: int, hdr_len: int, gso_size: int, csum_start: int,
                   csum_offset: int) -> bytes:
    return _VNET_HDR.pack(flags, gso_type, hdr_len, gso_size, csum_start, csum_offset)


# --- checksums (RFC 1071) ----------------------------------------------------------------------

def fold_add(*sums: int) -> int:
    """One's complement sum of already folded 16-bit sums."""
    total = sum(sums)
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total


def _pseudo_header_sum(ip_header: bytes | bytearray | memoryview, tcp_length: int,
                       proto: int = _PROTO_TCP) -> int:
    """Folded sum of the TCP (or UDP) pseudo-header: source, destination, zero, protocol,
    TCP/UDP length."""
    return fold_add(ones_sum(ip_header[12:20]), proto, tcp_length)


def completed_checksum(packet: bytes | bytearray | memoryview, csum_start: int) -> int:
    """The value NEEDS_CSUM asks to store: the inverted folded sum of packet[csum_start:], whose
    checksum field holds the pseudo-header sum; 0 becomes 0xFFFF (a UDP checksum of 0 would
    mean "none", so Linux's skb_checksum_help stores CSUM_MANGLED_0 instead)."""
    return (~ones_sum(packet[csum_start:]) & 0xFFFF) or 0xFFFF


def complete_checksum(packet: bytes | bytearray | memoryview, csum_start: int,
                      csum_offset: int) -> bytes | None:
    """``packet`` with the checksum a NEEDS_CSUM virtio header asks for stored at
    csum_start + csum_offset; None when that field is not inside the packet."""
    where = csum_start + csum_offset
    if csum_start < 0 or csum_offset < 0 or where + 2 > len(packet):
        return None
    out = bytearray(packet)
    out[where:where + 2] = completed_checksum(packet, csum_start).to_bytes(2, "big")
    return bytes(out)


def _ipv4_header_checksum(header: bytearray, l2: int, ihl: int) -> None:
    """Recompute, in place, the header checksum of the IPv4 header at ``l2``."""
    header[l2 + 10:l2 + 12] = b"\x00\x00"
    header[l2 + 10:l2 + 12] = checksum(header[l2:l2 + ihl]).to_bytes(2, "big")


# --- 6. unfinished checksums on receipt ----------------------------------------------------------

def finish_partial_checksum(packet: bytes | bytearray | memoryview,
                            l2: int) -> tuple[bytes, bool]:
    """(``packet`` with an unfinished TCP/UDP checksum finished, whether it was one)."""
    out = bytearray(packet)
    done = finish_partial_in_place(out, l2)
    return bytes(out), done


def finish_partial_in_place(packet: memoryview | bytearray, l2: int) -> bool:
    """Finish, in place, the inner TCP/UDP checksum of a delivered packet (tun: l2 = 0) or
    frame (tap: l2 = 14) that a kernel VTEP left unfinished: its checksum field holds exactly
    the folded pseudo-header sum (CHECKSUM_PARTIAL, as a veth or a virtual NIC sends it) and
    the whole does not verify. Only IPv4, not a fragment, TCP, or UDP with a checksum; whether
    it did."""
    n = len(packet)
    if n < l2 + _IPV4_MIN_HEADER or (l2 and packet[l2 - 2:l2] != _ETHERTYPE_IPV4):
        return False
    ip = l2
    ihl = (packet[ip] & 0x0F) * 4
    total = int.from_bytes(packet[ip + 2:ip + 4], "big")   # a short frame may carry padding
    if (packet[ip] >> 4 != 4 or ihl < _IPV4_MIN_HEADER or not ihl <= total <= n - l2
            or int.from_bytes(packet[ip + 6:ip + 8], "big") & _IP_MF_AND_OFFSET):
        return False
    proto = packet[ip + 9]
    if proto == _PROTO_TCP:
        where, need = _TCP_CSUM_OFFSET, _TCP_MIN_HEADER
    elif proto == _PROTO_UDP:
        where, need = _UDP_CSUM_OFFSET, _UDP_HEADER
    else:
        return False
    length = total - ihl
    at = ip + ihl + where
    if length < need:
        return False
    field = int.from_bytes(packet[at:at + 2], "big")
    if proto == _PROTO_UDP and field == 0:
        return False                        # no checksum at all: nothing to finish
    if field != fold_add(ones_sum(packet[ip + 12:ip + 20]), proto, length):
        return False                        # the cheap test, on every delivered packet
    segment = packet[ip + ihl:ip + total]
    whole = ones_sum(segment)               # the field holds the pseudo-header sum already
    if fold_add(whole, field) == 0xFFFF:    # segment + pseudo-header verify as they are:
        return False                        # a finished checksum that happens to look partial
    packet[at:at + 2] = ((~whole & 0xFFFF) or 0xFFFF).to_bytes(2, "big")
    return True


# --- 2. TCP segmentation of a TSO superpacket --------------------------------------------------

def _tcp4_layout(packet: bytes | bytearray | memoryview, l2: int, mss: int) -> tuple[int, int, int] | None:
    """(offset of the TCP header, H = length of all headers, number of segments) of a
    superpacket segment_tcp4 accepts, or None."""
    n = len(packet)
    if not 0 < mss <= 0xFFFF or l2 not in (0, _ETH_HEADER_LEN) or n < l2 + _IPV4_MIN_HEADER:
        return None
    if l2 and packet[12:14] != _ETHERTYPE_IPV4:
        return None
    if packet[l2] >> 4 != 4 or packet[l2 + 9] != _PROTO_TCP:
        return None
    ihl = (packet[l2] & 0x0F) * 4
    if ihl < _IPV4_MIN_HEADER or int.from_bytes(packet[l2 + 2:l2 + 4], "big") != n - l2:
        return None
    tcp = l2 + ihl
    if tcp + _TCP_MIN_HEADER > n:
        return None
    doff = (packet[tcp + 12] >> 4) * 4
    headers = tcp + doff
    if doff < _TCP_MIN_HEADER or headers >= n:       # headers == n: no payload to cut
        return None
    count = -(-(n - headers) // mss)
    if count > MAX_TSO_SEGMENTS:
        return None
    return tcp, headers, count


class Tcp4Plan(NamedTuple):
    """How a superpacket segment_tcp4 accepts is cut (spec point 2)."""
    tcp: int            # offset of the TCP header
    headers: int        # H: link + IPv4 + TCP header bytes
    nseg: int           # segments
    mss: int
    length: int         # the superpacket's length

    def segment_length(self, i: int) -> int:
        return self.headers + min(self.mss, self.length - self.headers - i * self.mss)

    def need(self, prefix: int) -> int:
        """Bytes of the laid-out run: each segment behind ``prefix`` free bytes."""
        return self.nseg * prefix + self.nseg * self.headers + self.length - self.headers


def tcp4_plan(packet: bytes | bytearray | memoryview, l2: int, mss: int) -> Tcp4Plan | None:
    """The plan of a superpacket segment_tcp4 accepts, or None when it is not one (not
    TCP/IPv4 with a total length matching the buffer, no payload, mss 0, more than
    MAX_TSO_SEGMENTS segments)."""
    layout = _tcp4_layout(packet, l2, mss)
    if layout is None:
        return None
    return Tcp4Plan(*layout, mss, len(packet))


def segment_tcp4_into(packet: bytes | bytearray | memoryview, l2: int, plan: Tcp4Plan,
                      out: memoryview, offset: int, prefix: int) -> None:
    """Write the segments of ``packet`` (as ``plan`` cuts it) into ``out``: segment i after
    ``prefix`` free bytes, right behind segment i - 1, from ``out[offset]`` on (the caller
    has checked that ``plan.need(prefix)`` bytes fit). The payload goes from the packet to
    ``out`` in one slice assignment and is summed where it lies, never copied on the side.

    Each segment: the headers copied with total length, IPv4 id + i, header checksum, seq +
    i*mss set; FIN and PSH only on the last, CWR only on the first; TCP checksum in full.
    """
    view = memoryview(packet)
    tcp, headers, count, mss = plan.tcp, plan.headers, plan.nseg, plan.mss
    ihl = tcp - l2
    doff = headers - tcp
    ident = int.from_bytes(view[l2 + 4:l2 + 6], "big")
    seq = int.from_bytes(view[tcp + 4:tcp + 8], "big")
    tcp_flags = view[tcp + 13]
    template = bytearray(view[:headers])
    template[tcp + 16:tcp + 18] = b"\x00\x00"
    for i in range(count):
        payload = view[headers + i * mss:min(headers + (i + 1) * mss, plan.length)]
        head = bytearray(template)
        head[l2 + 2:l2 + 4] = (ihl + doff + len(payload)).to_bytes(2, "big")
        head[l2 + 4:l2 + 6] = ((ident + i) & 0xFFFF).to_bytes(2, "big")
        _ipv4_header_checksum(head, l2, ihl)
        head[tcp + 4:tcp + 8] = ((seq + i * mss) & 0xFFFFFFFF).to_bytes(4, "big")
        flags = tcp_flags
        if i < count - 1:
            flags &= ~(_TCP_FIN | _TCP_PSH)
        if i > 0:
            flags &= ~_TCP_CWR
        head[tcp + 13] = flags
        total = fold_add(_pseudo_header_sum(head[l2:], doff + len(payload)),
                         ones_sum(head[tcp:]), ones_sum(payload))
        # head[tcp:] is even-length (doff is a multiple of 4), so the payload's words line up.
        head[tcp + 16:tcp + 18] = (~total & 0xFFFF).to_bytes(2, "big")
        offset += prefix
        out[offset:offset + headers] = head
        out[offset + headers:offset + headers + len(payload)] = payload
        offset += headers + len(payload)


def segment_tcp4(packet: bytes | bytearray | memoryview, l2: int,
                 mss: int) -> list[bytes] | None:
    """The segments a TCP/IPv4 superpacket stands for (spec point 2), or None when it is not
    one (see tcp4_plan)."""
    plan = tcp4_plan(packet, l2, mss)
    return None if plan is None else _cut(packet, l2, plan, segment_tcp4_into)


def _cut(packet: bytes | bytearray | memoryview, l2: int, plan: Tcp4Plan,
         into: Callable[[bytes | bytearray | memoryview, int, Tcp4Plan, memoryview, int, int],
                        None]) -> list[bytes]:
    """The segments ``into`` (segment_tcp4_into or segment_udp4_into) lays out, apart."""
    out = memoryview(bytearray(plan.need(0)))
    into(packet, l2, plan, out, 0, 0)
    segments, offset = [], 0
    for i in range(plan.nseg):
        size = plan.segment_length(i)
        segments.append(bytes(out[offset:offset + size]))
        offset += size
    return segments


# --- 7. UDP segmentation of a USO superpacket --------------------------------------------------

def udp4_plan(packet: bytes | bytearray | memoryview, l2: int, mss: int) -> Tcp4Plan | None:
    """How a UDPv4 superpacket (USO) is cut, in a Tcp4Plan whose ``tcp`` is the UDP header's
    offset, or None when it is not one (not UDP/IPv4 with a total length matching the
    buffer, no payload, mss 0, more than MAX_TSO_SEGMENTS datagrams)."""
    n = len(packet)
    if not 0 < mss <= 0xFFFF or l2 not in (0, _ETH_HEADER_LEN) or n < l2 + _IPV4_MIN_HEADER:
        return None
    if l2 and packet[12:14] != _ETHERTYPE_IPV4:
        return None
    if packet[l2] >> 4 != 4 or packet[l2 + 9] != _PROTO_UDP:
        return None
    ihl = (packet[l2] & 0x0F) * 4
    headers = l2 + ihl + _UDP_HEADER
    if (ihl < _IPV4_MIN_HEADER or int.from_bytes(packet[l2 + 2:l2 + 4], "big") != n - l2
            or headers >= n):
        return None
    count = -(-(n - headers) // mss)
    if count > MAX_TSO_SEGMENTS:
        return None
    return Tcp4Plan(l2 + ihl, headers, count, mss, n)


def segment_udp4_into(packet: bytes | bytearray | memoryview, l2: int, plan: Tcp4Plan,
                      out: memoryview, offset: int, prefix: int) -> None:
    """As segment_tcp4_into, for a USO superpacket: each datagram gets the headers with its
    own IPv4 total length, id + i, header checksum, UDP length and a full UDP checksum (0 is
    sent as 0xFFFF: 0 would mean "no checksum")."""
    view = memoryview(packet)
    udp, headers, count, mss = plan.tcp, plan.headers, plan.nseg, plan.mss
    ihl = udp - l2
    ident = int.from_bytes(view[l2 + 4:l2 + 6], "big")
    template = bytearray(view[:headers])
    template[udp + _UDP_CSUM_OFFSET:udp + _UDP_CSUM_OFFSET + 2] = b"\x00\x00"
    for i in range(count):
        payload = view[headers + i * mss:min(headers + (i + 1) * mss, plan.length)]
        head = bytearray(template)
        head[l2 + 2:l2 + 4] = (ihl + _UDP_HEADER + len(payload)).to_bytes(2, "big")
        head[l2 + 4:l2 + 6] = ((ident + i) & 0xFFFF).to_bytes(2, "big")
        _ipv4_header_checksum(head, l2, ihl)
        head[udp + 4:udp + 6] = (_UDP_HEADER + len(payload)).to_bytes(2, "big")
        total = fold_add(_pseudo_header_sum(head[l2:], _UDP_HEADER + len(payload), _PROTO_UDP),
                         ones_sum(head[udp:]), ones_sum(payload))
        head[udp + _UDP_CSUM_OFFSET:udp + _UDP_CSUM_OFFSET + 2] = (
            (~total & 0xFFFF) or 0xFFFF).to_bytes(2, "big")
        offset += prefix
        out[offset:offset + headers] = head
        out[offset + headers:offset + headers + len(payload)] = payload
        offset += headers + len(payload)


def segment_udp4(packet: bytes | bytearray | memoryview, l2: int,
                 mss: int) -> list[bytes] | None:
    """The datagrams a UDP/IPv4 superpacket stands for (spec point 7), or None (udp4_plan)."""
    plan = udp4_plan(packet, l2, mss)
    return None if plan is None else _cut(packet, l2, plan, segment_udp4_into)


# --- 5. coalescing TCP segments written into the device ---------------------------------------

def _flow(packet: bytes, l2: int, uso: bool) -> bytes | None:
    """The flow of a *TCP packet* (IPv4, IHL >= 5, protocol TCP, its ports inside the packet;
    coalescable or not) or, with ``uso``, of a *UDP packet* (the same with protocol UDP) -
    link header, protocol, addresses, ports - or None for anything else, which is written as
    it came and never merged with."""
    if len(packet) < l2 + _IPV4_MIN_HEADER:
        return None
    if l2 and packet[12:14] != _ETHERTYPE_IPV4:
        return None
    ihl = (packet[l2] & 0x0F) * 4
    proto = packet[l2 + 9]
    if (packet[l2] >> 4 != 4 or ihl < _IPV4_MIN_HEADER
            or not (proto == _PROTO_TCP or (proto == _PROTO_UDP and uso))
            or l2 + ihl + 4 > len(packet)):
        return None
    return (packet[:l2] + packet[l2 + 9:l2 + 10] + packet[l2 + 12:l2 + 20]
            + packet[l2 + ihl:l2 + ihl + 4])


class _Segment:
    """What a coalescable packet brings to an item."""

    __slots__ = ("headers", "ident", "match", "payload_len", "psh", "seq", "udp")

    def __init__(self, headers: int, match: bytes, ident: int, seq: int, payload_len: int,
                 psh: bool, udp: bool = False) -> None:
        self.headers = headers          # l2 + 20 + doff*4 (UDP: + 8): where the payload starts
        self.match = match              # what must equal between merged segments
        self.ident = ident              # IPv4 id: must count up along a run
        self.seq = seq                  # (UDP: 0, unused)
        self.payload_len = payload_len
        self.psh = psh
        self.udp = udp


def _udp_coalescable(packet: bytes, l2: int) -> _Segment | None:
    """A UDP packet (see _flow) the kernel's UDP GRO would merge with its neighbours: IHL 5,
    not a fragment, total length and UDP length right, payload, header checksum right, a
    nonzero UDP checksum that verifies (udp_gro_receive_segment wants one)."""
    n = len(packet)
    ip = l2
    udp = ip + _IPV4_MIN_HEADER
    if packet[ip] != 0x45:
        return None
    if int.from_bytes(packet[ip + 6:ip + 8], "big") & _IP_MF_AND_OFFSET:
        return None
    length = n - udp
    if (int.from_bytes(packet[ip + 2:ip + 4], "big") != n - l2 or length <= _UDP_HEADER
            or int.from_bytes(packet[udp + 4:udp + 6], "big") != length
            or packet[udp + 6:udp + 8] == b"\x00\x00"):
        return None
    if ones_sum(packet[ip:udp]) != 0xFFFF:
        return None
    if fold_add(_pseudo_header_sum(packet[ip:], length, _PROTO_UDP),
                ones_sum(packet[udp:])) != 0xFFFF:
        return None
    match = packet[ip + 1:ip + 2] + packet[ip + 8:ip + 9] + packet[ip + 6:ip + 8]
    return _Segment(udp + _UDP_HEADER, match, int.from_bytes(packet[ip + 4:ip + 6], "big"), 0,
                    length - _UDP_HEADER, False, udp=True)


def _coalescable(packet: bytes, l2: int) -> _Segment | None:
    """A TCP packet (see _tcp_flow) that may be merged with its neighbours: IHL 5, not a
    fragment, total length and header checksum right, a whole TCP header, payload, ACK or
    ACK|PSH only, right TCP checksum: what the kernel's GRO would merge. A bad IPv4 header
    checksum must reach the device as it came: merging would rewrite it."""
    n = len(packet)
    ip = l2
    tcp = ip + _IPV4_MIN_HEADER
    if packet[ip] != 0x45:
        return None
    if int.from_bytes(packet[ip + 6:ip + 8], "big") & _IP_MF_AND_OFFSET:
        return None
    if int.from_bytes(packet[ip + 2:ip + 4], "big") != n - l2 or tcp + _TCP_MIN_HEADER > n:
        return None
    doff = (packet[tcp + 12] >> 4) * 4
    headers = tcp + doff
    if doff < _TCP_MIN_HEADER or headers >= n:
        return None
    flags = packet[tcp + 13]
    if flags not in (_TCP_ACK, _TCP_ACK | _TCP_PSH):
        return None
    if ones_sum(packet[ip:tcp]) != 0xFFFF:
        return None
    if fold_add(_pseudo_header_sum(packet[ip:], n - tcp), ones_sum(packet[tcp:])) != 0xFFFF:
        return None
    match = (packet[ip + 1:ip + 2] + packet[ip + 8:ip + 9]    # TOS, TTL
             + packet[ip + 6:ip + 8]                          # DF / flags word
             + packet[tcp + 12:tcp + 13]                      # doff (and the bits beside it)
             + packet[tcp + 8:tcp + 12]                       # ack
             + packet[tcp + 14:tcp + 16]                      # window
             + packet[tcp + _TCP_MIN_HEADER:headers])         # options
    return _Segment(headers, match, int.from_bytes(packet[ip + 4:ip + 6], "big"),
                    int.from_bytes(packet[tcp + 4:tcp + 8], "big"), n - headers,
                    bool(flags & _TCP_PSH))


class _Item:
    """One pending write: a packet as it came, or a run of segments of one flow."""

    __slots__ = ("first", "first_ident", "flow", "headers", "match", "mss", "next_seq", "open",
                 "payloads", "psh", "total_length", "udp")

    def __init__(self, packet: bytes, flow: bytes | None, segment: _Segment | None,
                 l2: int) -> None:
        self.first = packet
        self.flow = flow
        # A PSH segment ends what the sender had to say: nothing is appended behind it.
        self.open = segment is not None and not segment.psh
        self.payloads: list[bytes] = []
        self.psh = False
        self.udp = segment is not None and segment.udp
        if segment is not None:
            self.headers = segment.headers
            self.match = segment.match
            self.first_ident = segment.ident
            self.mss = segment.payload_len
            self.next_seq = (segment.seq + segment.payload_len) & 0xFFFFFFFF
            self.total_length = len(packet) - l2

    def take(self, packet: bytes, segment: _Segment) -> bool:
        """Append ``segment`` if it continues this open item; whether it did."""
        # IPv4 ids must count up from the head's, so the kernel re-cutting the superpacket
        # gives back exactly the segments that came.
        if (segment.udp != self.udp or segment.match != self.match
                or (not segment.udp and segment.seq != self.next_seq)
                or segment.ident != (self.first_ident + 1 + len(self.payloads)) & 0xFFFF
                or segment.payload_len > self.mss
                or self.total_length + segment.payload_len > _MAX_IPV4_TOTAL
                or len(self.payloads) + 1 >= GRO_MAX_SEGS):
            return False
        self.payloads.append(packet[segment.headers:])
        self.next_seq = (self.next_seq + segment.payload_len) & 0xFFFFFFFF
        self.total_length += segment.payload_len
        if segment.psh:
            self.psh = True
        if segment.payload_len < self.mss or segment.psh:
            self.open = False
        return True

    def write(self, l2: int) -> tuple[bytes, bytes, int]:
        segments = 1 + len(self.payloads)
        if segments == 1:
            return ZERO_VNET_HDR, self.first, 1
        head = bytearray(self.first[:self.headers])
        tcp = l2 + _IPV4_MIN_HEADER
        head[l2 + 2:l2 + 4] = self.total_length.to_bytes(2, "big")
        _ipv4_header_checksum(head, l2, _IPV4_MIN_HEADER)
        if self.udp:
            # The UDP length of the whole run; the kernel gives each datagram its own.
            udp_length = self.total_length - _IPV4_MIN_HEADER
            head[tcp + 4:tcp + 6] = udp_length.to_bytes(2, "big")
            partial = _pseudo_header_sum(head[l2:], udp_length, _PROTO_UDP)
            head[tcp + _UDP_CSUM_OFFSET:tcp + _UDP_CSUM_OFFSET + 2] = partial.to_bytes(2, "big")
            header = build_vnet_hdr(VNET_F_NEEDS_CSUM, VNET_GSO_UDP_L4, self.headers, self.mss,
                                    tcp, _UDP_CSUM_OFFSET)
            data = b"".join([bytes(head), self.first[self.headers:], *self.payloads])
            return header, data, segments
        if self.psh:
            head[tcp + 13] |= _TCP_PSH
        # CHECKSUM_PARTIAL: the field holds the pseudo-header sum, folded and not inverted; the
        # kernel adds the rest when (if ever) it needs the real checksum.
        partial = _pseudo_header_sum(head[l2:], self.total_length - _IPV4_MIN_HEADER)
        head[tcp + _TCP_CSUM_OFFSET:tcp + _TCP_CSUM_OFFSET + 2] = partial.to_bytes(2, "big")
        header = build_vnet_hdr(VNET_F_NEEDS_CSUM, VNET_GSO_TCPV4, self.headers, self.mss, tcp,
                                _TCP_CSUM_OFFSET)
        data = b"".join([bytes(head), self.first[self.headers:], *self.payloads])
        return header, data, segments


class Coalescer:
    """Pending writes into a device opened with IFF_VNET_HDR (spec point 5): ``add`` each
    delivered packet, ``flush`` at the end of the batch for the writes, in order."""

    __slots__ = ("_appended", "_items", "_l2", "_uso")

    def __init__(self, l2: int, uso: bool = False) -> None:
        if l2 not in (0, _ETH_HEADER_LEN):
            raise ValueError(f"l2 must be 0 (tun) or {_ETH_HEADER_LEN} (tap), got {l2!r}")
        self._l2 = l2
        self._uso = uso         # the device takes UDP GSO writes: UDP runs are merged too
        self._items: list[_Item] = []
        self._appended = 0      # payloads merged into items, bounded like the Cython arrays

    def __len__(self) -> int:
        return len(self._items)

    @property
    def full(self) -> bool:
        """Whether the Cython coalescer's arrays would be full: flush before the next add."""
        return len(self._items) >= GRO_MAX_ITEMS or self._appended >= GRO_MAX_RECS

    def add(self, packet: bytes | bytearray | memoryview) -> None:
        """Queue one packet (copied): merged into the item of its flow, or a new item. Call
        only when not ``full``."""
        data = bytes(packet)
        l2 = self._l2
        flow = _flow(data, l2, self._uso)
        if flow is None:
            self._items.append(_Item(data, None, None, l2))
            return
        udp = data[l2 + 9] == _PROTO_UDP
        segment = _udp_coalescable(data, l2) if udp else _coalescable(data, l2)
        for item in reversed(self._items[-GRO_SCAN:]):
            if item.flow == flow:
                if item.open:
                    if segment is not None and item.take(data, segment):
                        self._appended += 1
                        return
                    # Whatever comes next for this flow must not be merged in front of this
                    # packet: the item is done.
                    item.open = False
                break
        self._items.append(_Item(data, flow, segment, l2))

    def flush(self) -> list[tuple[bytes, bytes, int]]:
        """(virtio-net header, data, segments) per write, in the order the items started;
        empties the coalescer."""
        items, self._items = self._items, []
        self._appended = 0
        return [item.write(self._l2) for item in items]


def coalesce(packets: Iterable[bytes | bytearray | memoryview],
             l2: int, uso: bool = False) -> list[tuple[bytes, bytes]]:
    """The (virtio-net header, data) writes that delivering ``packets`` in this order, then
    flushing once, produces (plus the early flushes a full coalescer makes); ``uso``: UDP
    runs are merged too."""
    coalescer = Coalescer(l2, uso)
    writes: list[tuple[bytes, bytes, int]] = []
    for packet in packets:
        if coalescer.full:
            writes += coalescer.flush()
        coalescer.add(packet)
    writes += coalescer.flush()
    return [(header, data) for header, data, _ in writes]
