"""Fuzzing the whole batch functions of each forwarder, both kernels, both directions.

1. A case (``draw_case``) is drawn from the input bytes: the forwarder's options (virtio-net
   header, UDP GSO, UDP GRO, batch size, ICMP tokens, path MTUs, a gateway peer owning
   0.0.0.0/0, extra tx sockets) and up to four steps, each an inside batch (device reads) or an
   outside batch (datagrams from peers or from a stranger). Every read and datagram comes from
   a named generator; the structured ones reach the deep paths: TCP superpackets with a TSO
   virtio header, checksums left to us, ICMP-triggering packets, valid VXLAN, runs of one TCP
   flow (coalesced on the way into the device) sent one by one or as one UDP GSO send that
   the receive socket takes as a GRO run; with a device that does USO (``uso_of``), some of
   those runs are of one UDP flow instead, merged into UDP superpackets.
2. ``FuzzRig`` runs a case on a fresh forwarder over long-lived fds: a datagram socketpair
   stands in for the device (one read = one packet, virtio header first), and real UDP sockets
   on 127.0.0.0/8 are the node and its peers, so the kernel really splits our GSO sends and
   really hands us GRO runs (the harness of tests/test_offload.py, kept open across cases).
3. ``check_case`` runs it on the Cython kernel and the Python twin and raises ``Finding`` when
   a batch raised, when the two differ in anything observable (datagrams per peer, device
   writes, counters, per-peer counters, FDB), or when an output breaks a rule any correct
   forwarder keeps (a datagram to a peer that is not a valid encapsulation of an IPv4 packet
   routed to it, a device write that is not a checked packet for us or an ICMP error of ours,
   a packet not accounted for exactly once per direction, a coalesced write - TCP or UDP -
   holding a segment the kernel's GRO would not have merged, or that the kernel would not
   cut back into what the peers sent).
4. A broken rule that KNOWN_OPEN names (a hole another branch is fixing) is returned as known,
   not raised, so the input's other checks and the comparison still run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import json
import select
import socket
import struct
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any, Final, Self

from overlayd.dataplane import offload
from overlayd.dataplane.counters import DROP_REASONS
from overlayd.dataplane.tables import LOCAL, ForwardingTables, PeerEntry, SwitchTables
from overlayd.fuzz import packets as P
from overlayd.fuzz.source import ByteSource

PATHS: Final = ("udp", "routed", "switched")
NODE_IP: Final = "127.0.0.2"
STRANGER_IP: Final = "127.0.0.250"
NPEERS: Final = 3
VNI: Final = 77
OUR_MAC: Final = bytes.fromhex("020000aa0001")
LOCAL_ADDRESS: Final = P.addr("10.0.0.1")
SOL_UDP, UDP_SEGMENT, UDP_GRO = 17, 103, 104
MAX_STEPS: Final = 4
MAX_ITEMS: Final = 8
FDB_MAX: Final = 8          # small, so the cap (fdb_full) is reached
SETTLE_SECONDS: Final = 1.0


def peer_ip(i: int) -> str:
    return f"127.0.0.{3 + i}"


def peer_mac(i: int) -> bytes:
    return bytes.fromhex(f"0200bb0000{i:02x}")


def overlay(i: int, host: int) -> bytes:
    """Host ``host`` in peer i's subnet 10.0.(i+1).0/24; i = -1 is our own 10.0.0.0/24."""
    return bytes((10, 0, i + 1, host & 0xFF))


# Addresses a generator picks from: ours, each peer's, an extra prefix of peer 2, nowhere,
# and the martians of RFC 1812 5.3.7 (with our own underlay address, which a kernel with
# accept_local would take as local).
MARTIANS: Final = tuple(P.addr(a) for a in ("127.0.0.1", "0.0.0.0", "224.0.0.1", "240.0.0.1",
                                            "255.255.255.255", NODE_IP))
# MACs of the switched path: a few unicast ones (learned here and there), peer 0's pinned one,
# broadcast, multicast, zero.
UNICAST_MACS: Final = tuple(bytes.fromhex(f"02000000000{i}") for i in range(1, 5))
STATIC_MAC: Final = bytes.fromhex("020000000f00")


def _macs_homed_at_the_end(count: int, slots: int) -> tuple[bytes, ...]:
    """Unicast MACs whose home in the compiled FDB's open-addressing table (Fibonacci hash,
    cext/fdb.pxi) is its last slot, so their probe cluster wraps to the start: the case
    a backward-shift delete or a remap gets wrong."""
    out: list[bytes] = []
    candidate = 0x020000001000
    while len(out) < count:
        candidate += 1
        if ((candidate * 0x9E3779B97F4A7C15) & (1 << 64) - 1) >> 32 & slots - 1 == slots - 1:
            out.append(candidate.to_bytes(6, "big"))
    return tuple(out)


WRAP_MACS: Final = _macs_homed_at_the_end(3, 32)   # FDB_MAX 8 -> 32 slots
MAC_POOL: Final = (*UNICAST_MACS, STATIC_MAC, b"\xff" * 6, bytes.fromhex("01005e000001"),
                   bytes(6), OUR_MAC, *WRAP_MACS)


class Finding(AssertionError):
    """A fuzz input broke a property: an exception, a divergence or a wrong output."""


# --- cases ------------------------------------------------------------------------------------

@dataclass
class Item:
    """One device read (inside) or one send from a peer (outside; several datagrams when
    ``gso_size`` is set: one UDP_SEGMENT send)."""

    generator: str
    data: bytes
    sender: int = 0          # outside: peer index, or -1 for the stranger
    gso_size: int = 0


@dataclass
class Step:
    direction: str           # "inside" | "outside" | "clock" | "tables"
    items: list[Item] = field(default_factory=list)
    now: float = 0.0
    order: list[int] = field(default_factory=list)   # tables: the peers, in table order


@dataclass
class Case:
    path: str
    vnet_hdr: bool
    udp_gso: bool
    udp_gro: bool
    batch_size: int
    icmp_burst: int
    mtus: tuple[int, ...]
    gateway: bool
    tx_sockets: int
    steps: list[Step]
    device_uso: bool = False      # the device takes UDP superpackets (offload.pxi 5. and 7.)

    @property
    def l2(self) -> int:
        return 14 if self.path == "switched" else 0

    def generators(self) -> Iterator[str]:
        for step in self.steps:
            if not step.items:
                yield f"step:{step.direction}"      # a map change or a clock tick
            for item in step.items:
                yield f"{step.direction}:{item.generator}"


def case_to_json(case: Case) -> str:
    """A case written out whole, so a regression input survives changes to the generators."""
    data = dataclasses.asdict(case)
    for step in data["steps"]:
        for item in step["items"]:
            item["data"] = item["data"].hex()
    return json.dumps(data, indent=1)


def case_from_json(text: str) -> Case:
    data = json.loads(text)
    steps = [Step(s["direction"], [Item(i["generator"], bytes.fromhex(i["data"]), i["sender"],
                                        i["gso_size"]) for i in s["items"]], s["now"],
                  s.get("order", []))
             for s in data.pop("steps")]
    data["mtus"] = tuple(data["mtus"])
    return Case(**data, steps=steps)


def _address(src: ByteSource, sender: int = 0) -> bytes:
    kind = src.below(10)
    if kind < 3:
        return overlay(-1, src.byte())                      # ours
    if kind < 6:
        return overlay(src.below(NPEERS), src.byte())       # a peer's
    if kind == 6:
        return overlay(sender, src.byte())                  # the sender's own
    if kind == 7:
        return bytes((172, 20, src.byte(), src.byte()))     # peer 2's extra prefix
    if kind == 8:
        return src.choice(MARTIANS)
    return src.take(4)


def _l4(src: ByteSource, s: bytes, d: bytes, size: int) -> tuple[int, bytes]:
    payload = bytes([src.byte()]) * size
    proto = src.choice((P.PROTO_UDP, P.PROTO_TCP, P.PROTO_ICMP, 47))
    if proto == P.PROTO_TCP:
        return proto, P.tcp(s, d, payload, seq=src.uint(4), flags=src.byte(),
                            byte12_low=src.byte())
    if proto == P.PROTO_UDP:
        return proto, P.udp(s, d, payload)
    if proto == P.PROTO_ICMP:
        return proto, P.icmp(src.choice((8, 0, 3, 11, 5, 13)), src.below(16), src.take(4) + payload)
    return proto, payload


def ip_packet(src: ByteSource, s: bytes | None = None, d: bytes | None = None,
               sender: int = 0) -> bytes:
    s = _address(src, sender) if s is None else s
    d = _address(src, sender) if d is None else d
    size = src.choice((0, 8, 50, 500, 1372, 1400, 1473, 1500, 3000))
    proto, body = _l4(src, s, d, size)
    options = src.take(4 * src.below(3)) if src.flag(10) else b""
    return P.ipv4(s, d, proto, body, ttl=src.choice((64, 64, 1, 0, 2, 255)), df=src.flag(),
                  frag=src.choice((0, 0, 0, 0x2000, 0x0010, src.uint(2) & 0x3FFF)),
                  tos=src.choice((0, 0, 3, src.byte())), ident=src.uint(2), options=options)


def icmp_trigger(src: ByteSource) -> bytes:
    """A packet a router must answer (or must not): TTL 0/1, no route, DF and too big, for our
    own subnet; or an ICMP error, a fragment or a broadcast, which must not be answered."""
    s = overlay(-1, src.between(2, 254))
    d = src.choice((overlay(src.below(NPEERS), 7), P.addr("192.168.9.9"), overlay(-1, 9)))
    kind = src.below(6)
    payload = bytes(src.choice((20, 600, 1500, 9000)))
    if kind == 4:   # an ICMP error: never answered with another
        inner = P.ipv4(d, s, P.PROTO_UDP, P.udp(d, s, b"x"))
        return P.ipv4(s, d, P.PROTO_ICMP, P.icmp(3, src.below(16), bytes(4) + inner),
                      ttl=src.choice((1, 64)))
    if kind == 5:   # a non-first fragment, or to a broadcast/multicast destination
        return P.ipv4(s, src.choice((d, P.addr("255.255.255.255"), P.addr("224.0.0.5"))),
                      P.PROTO_UDP, payload, ttl=src.choice((1, 64)),
                      frag=src.choice((0x0010, 0x2000, 0)))
    return P.ipv4(s, d, P.PROTO_UDP, P.udp(s, d, payload), ttl=src.choice((0, 1, 2, 64)),
                  df=kind != 3)


def _frame(src: ByteSource, packet: bytes) -> bytes:
    dst = src.choice(MAC_POOL)
    smac = src.choice(MAC_POOL[:5] + (bytes(6), b"\x01" * 6, src.take(6), src.take(6))
                      + WRAP_MACS)
    ethertype = src.choice((P.ETH_IPV4, P.ETH_IPV4, 0x0806, 0x86DD, src.uint(2)))
    return P.ethernet(dst, smac, packet, ethertype)


def _mutate_header(src: ByteSource, data: bytes, span: int) -> bytes:
    """``data`` with up to two drawn bytes of its first ``span`` bytes replaced: the headers,
    where a change decides what happens to the packet."""
    out = bytearray(data)
    for _ in range(src.below(3)):
        if out:
            out[src.below(min(span, len(out)))] = src.byte()
    return bytes(out)


def superpacket(src: ByteSource, l2: int) -> bytes:
    """A TCP superpacket as a device with TSO hands it over: the virtio header, then the packet
    of up to 64 kB, its header sometimes broken, its MSS from tiny to bigger than the packet."""
    s, d = overlay(-1, src.between(2, 254)), overlay(src.below(NPEERS), src.byte())
    if src.flag(15):
        d = _address(src)
    mss = src.choice((1, 16, 100, 536, 1000, 1448, 1460, 8960, src.uint(2)))
    size = src.choice((mss * src.between(1, 45), src.between(1, 9000), 64000, mss + 1))
    size = min(size, 65535 - 80)
    options = src.choice((b"", b"\x01\x01\x08\x0a" + src.take(8), src.take(4)))
    flags = src.choice((P.ACK, P.ACK | P.PSH, P.ACK | P.FIN | P.PSH, 0xC0 | P.ACK, src.byte()))
    segment = P.tcp(s, d, bytes([src.byte()]) * size, seq=src.uint(4), flags=flags,
                    options=options, byte12_low=src.byte() if src.flag(10) else 0,
                    partial=src.flag(80))
    packet = P.ipv4(s, d, P.PROTO_TCP, segment, df=src.flag(80), ident=src.uint(2),
                    ttl=src.choice((64, 64, 64, 1)))
    if l2:
        packet = _frame(src, packet)
    if src.flag(20):
        packet = _mutate_header(src, packet, l2 + 60)
    ihl, doff = 20, 20 + len(options)
    gso_type = src.choice((1, 1, 1, 0x81, 3, 4, 5, src.byte()))
    hdr_len = src.choice((l2 + ihl + doff, 0, src.uint(2)))
    csum_start = src.choice((l2 + ihl, l2 + ihl, src.uint(2)))
    csum_offset = src.choice((16, 16, 6, src.uint(2)))
    return P.vnet_hdr(src.choice((1, 1, 0, src.byte())), gso_type, hdr_len, mss, csum_start,
                      csum_offset) + packet


def needs_csum(src: ByteSource, l2: int) -> bytes:
    """A packet whose TCP/UDP checksum the kernel left to us (VIRTIO_NET_HDR_F_NEEDS_CSUM)."""
    s, d = overlay(-1, src.between(2, 254)), overlay(src.below(NPEERS), src.byte())
    payload = bytes([src.byte()]) * src.choice((0, 1, 100, 1400))
    if src.flag():
        packet = P.ipv4(s, d, P.PROTO_TCP, P.tcp(s, d, payload, partial=True))
        offset = 16
    else:
        packet = P.ipv4(s, d, P.PROTO_UDP, P.udp(s, d, payload, partial=True))
        offset = 6
    if l2:
        packet = _frame(src, packet)
    start = src.choice((l2 + 20, l2 + 20, l2 + 20, src.uint(2), len(packet) - 1))
    offset = src.choice((offset, offset, src.uint(2)))
    return P.vnet_hdr(1, src.choice((0, 0, 0x80)), 0, 0, start, offset) + packet


def _inside_item(src: ByteSource, case: Case) -> Item:
    vnet = P.vnet_hdr() if case.vnet_hdr else b""
    kind = src.below(10)
    if kind == 0:
        raw = src.blob(src.choice((40, 300, 2000)))
        return Item("raw", (src.take(10) if case.vnet_hdr and src.flag() else vnet) + raw)
    if kind <= 3 or not case.vnet_hdr and kind >= 7:
        packet = ip_packet(src)
        if src.flag(30):
            packet = _mutate_header(src, packet, 24)
        data = _frame(src, packet) if case.l2 else packet
        return Item("ipv4", vnet + data)
    if kind <= 5:
        packet = icmp_trigger(src)
        return Item("icmp", vnet + (_frame(src, packet) if case.l2 else packet))
    if kind <= 8:
        return Item("tso", superpacket(src, case.l2))
    return Item("csum", needs_csum(src, case.l2))


def _encapsulate(src: ByteSource, case: Case, packet: bytes, sender: int) -> bytes:
    """What a peer sends for an inner packet on this path (sometimes with a bad header)."""
    if case.path == "udp":
        return packet
    flags = src.choice((P.VXLAN_FLAG_I,) * 6 + (0, 0x0C, src.byte()))
    vni = src.choice((VNI,) * 6 + (VNI + 1, 0, src.uint(3)))
    reserved = src.take(4) if src.flag(5) else b""
    if case.path == "routed":
        dst = src.choice((OUR_MAC,) * 5 + (b"\xff" * 6, peer_mac(0), src.take(6)))
        ethertype = src.choice((P.ETH_IPV4,) * 6 + (0x86DD, src.uint(2)))
        padding = bytes(src.choice((0, 0, 0, 10, 46)))
        inner = P.ethernet(dst, peer_mac(max(sender, 0)), packet + padding, ethertype)
    else:
        inner = _frame(src, packet)
    return P.vxlan(vni, inner, flags, reserved)


def _odd_segment(src: ByteSource, packet: bytes, headers: int) -> bytes:
    """One segment of a run made different in one header field a GRO engine must compare
    (TCP reserved bits, flags, IPv4 TOS/TTL/ID, a broken IPv4 or TCP checksum; a UDP
    datagram's checksum) or in random header bytes; mostly with its checksums redone, so that
    only the field differs."""
    out = bytearray(packet)
    kind = src.below(8)
    if out[9] == P.PROTO_UDP and kind in (0, 1, 6):
        out[26] ^= src.between(1, 255)                      # no TCP fields: a bad UDP checksum
        return bytes(out)
    if kind == 0:
        out[32] = out[32] & 0xF0 | src.between(1, 15)       # TCP reserved bits / AE
    elif kind == 1:
        out[33] ^= src.choice((P.PSH, P.FIN, P.SYN, P.RST, 0x20, 0x40, 0x80))
    elif kind == 2:
        out[1] ^= src.between(1, 255)                       # TOS
    elif kind == 3:
        out[8] = (out[8] + src.between(1, 255)) & 0xFF      # TTL
    elif kind == 4:
        out[4] ^= src.between(1, 255)                       # IPv4 ID
    elif kind == 5:
        out[10] ^= src.between(1, 255)                      # IPv4 header checksum
        return bytes(out)
    elif kind == 6:
        out[36] ^= src.between(1, 255)                      # TCP checksum
        return bytes(out)
    else:
        return _mutate_header(src, packet, headers)
    if src.flag(70):        # the changed packet is otherwise well formed
        out[10:12] = b"\0\0"
        out[10:12] = struct.pack("!H", P.inet_sum(bytes(out[:20])))
        if kind <= 1:
            out[36:38] = b"\0\0"
            pseudo = bytes(out[12:20]) + struct.pack("!BBH", 0, P.PROTO_TCP, len(out) - 20)
            out[36:38] = struct.pack("!H", P.inet_sum(pseudo + bytes(out[20:])))
    return bytes(out)


def _flow_run(src: ByteSource, case: Case, sender: int) -> list[bytes]:
    """Consecutive segments of one TCP flow from ``sender`` to us, as a kernel's TSO would cut
    them: the coalescer's input. One segment now and then differs in a header byte (TCP flags,
    options, reserved bits, IPv4 ID/TOS/TTL, a broken checksum): it must end the run. With
    device_uso, a run whose first sequence number is odd is one of UDP datagrams instead (same
    draws, same payloads; the odd one's changed bytes then fall on its IPv4 header or its
    payload, a broken UDP checksum among them)."""
    s = overlay(sender if src.flag(90) else src.below(NPEERS), src.between(2, 254))
    d = overlay(-1, src.between(2, 254))
    count, size = src.between(2, 16), src.choice((1, 100, 536, 1000, 1400, src.between(1, 1400)))
    seq, ident = src.uint(4), src.uint(2)
    first_seq = seq
    options = src.choice((b"", b"\x01\x01\x08\x0a" + src.take(8)))
    odd = src.below(count + 4)   # which segment is unusual (>= count: none)
    last_short = src.flag(30)
    dmac = src.choice((UNICAST_MACS[0], b"\xff" * 6, OUR_MAC))
    smac = src.choice((UNICAST_MACS[1 + sender % 3], *WRAP_MACS))
    out = []
    for i in range(count):
        length = size // 2 + 1 if last_short and i == count - 1 else size
        payload = bytes([(i * 7 + src.byte()) & 0xFF]) * length
        flags = P.ACK | (P.PSH if i == count - 1 and src.flag() else 0)
        if case.device_uso and first_seq & 1:
            proto, segment = P.PROTO_UDP, P.udp(s, d, payload)
        else:
            proto, segment = P.PROTO_TCP, P.tcp(s, d, payload, seq=seq, flags=flags,
                                                options=options)
        packet = P.ipv4(s, d, proto, segment, df=True,
                        ident=ident + i if src.flag(90) else src.uint(2))
        if i == odd:
            packet = _odd_segment(src, packet, 20 + 20 + len(options))
        if case.path == "udp":
            out.append(packet)
        elif case.path == "routed":
            out.append(P.vxlan(VNI, P.ethernet(OUR_MAC, peer_mac(sender), packet)))
        else:
            out.append(P.vxlan(VNI, P.ethernet(dmac, smac, packet)))
        seq += length
    return out


def outside_items(src: ByteSource, case: Case) -> list[Item]:
    sender = src.choice((0, 1, 2, 0, 1, -1)) if src.flag(95) else -1
    kind = src.below(10)
    if kind == 0:
        return [Item("raw", src.blob(src.choice((30, 300, 2000))), sender)]
    if kind <= 4:
        own = max(sender, 0)
        s = overlay(own, src.byte()) if src.flag(70) else None
        d = overlay(-1, src.byte()) if src.flag(70) else None
        packet = ip_packet(src, s, d, own)
        if src.flag(25):
            packet = _mutate_header(src, packet, 24)
        return [Item("valid", _encapsulate(src, case, packet, own), sender)]
    run = _flow_run(src, case, max(sender, 0))
    if kind <= 6 or not case.udp_gro:
        return [Item("run", datagram, sender) for datagram in run]
    # One UDP GSO send: all datagrams of the first one's size (the last may be shorter).
    size = len(run[0])
    run = [d for d in run if len(d) <= size]
    return [Item("gro", b"".join(run), sender, gso_size=size)]


def uso_of(data: bytes, vnet_hdr: bool) -> bool:
    """Whether a case's device does USO: from the input's hash, not drawn from it, so that
    every other draw (and what the seeds reach) stays as it was before USO existed."""
    return vnet_hdr and zlib.crc32(data) % 3 != 0


def draw_case(data: bytes, path: str) -> Case:
    src = ByteSource(data)
    vxlan = path != "udp"
    case = Case(path=path, vnet_hdr=src.flag(85), udp_gso=src.flag(75), udp_gro=src.flag(75),
                batch_size=src.choice((64, 64, 8, 4, 2, 1)),
                icmp_burst=src.choice((100, 100, 1, 0)),
                mtus=tuple(src.choice((1400, 1500, 576, 9000, 68)) for _ in range(NPEERS)),
                gateway=src.flag(20), tx_sockets=src.choice((0, 0, 2, 3)) if vxlan else 0,
                steps=[])
    case.device_uso = uso_of(data, case.vnet_hdr)
    for _ in range(src.between(1, MAX_STEPS)):
        kind = src.below(12)
        if kind >= 10:
            # A map change: the peers in another order, one of them maybe gone (learned MACs
            # must follow their peer to its new index, or go with it).
            order = sorted(range(NPEERS), key=lambda _: src.byte())
            step = Step("tables", order=order[:NPEERS - src.below(2)])
        elif kind < 4:
            step = Step("inside")
            for _ in range(src.between(1, MAX_ITEMS)):
                step.items.append(_inside_item(src, case))
        elif kind < 9 or path != "switched":
            step = Step("outside")
            while len(step.items) < MAX_ITEMS:
                step.items.extend(outside_items(src, case))
                if not src.flag(60):
                    break
        else:
            step = Step("clock", now=float(src.below(1000)))
        case.steps.append(step)
    return case


# --- running a case ---------------------------------------------------------------------------

@dataclass
class Outcome:
    """Everything a forwarder did with a case that anyone could observe."""

    error: str | None = None
    to_peers: list[list[bytes]] = field(default_factory=list)
    to_stranger: list[bytes] = field(default_factory=list)
    device: list[bytes] = field(default_factory=list)
    counters: dict[str, int] = field(default_factory=dict)
    peer_counters: list[tuple[int, int, int, int]] = field(default_factory=list)
    fdb: list[tuple[bytes, int, bool, float]] = field(default_factory=list)
    sent_datagrams: int = 0
    sent_inner: list[bytes] = field(default_factory=list)   # IPv4 packets peers sent us
    # per step: (peers in the tables, what the counters moved by)
    steps: list[tuple[int, dict[str, int]]] = field(default_factory=list)
    offloads: dict[str, bool] = field(default_factory=dict)

    def comparable(self) -> dict[str, Any]:
        return {"error": self.error, "to_peers": self.to_peers, "device": self.device,
                "counters": self.counters, "peer_counters": self.peer_counters,
                "fdb": self.fdb, "to_stranger": self.to_stranger, "offloads": self.offloads}


def _udp_socket(ip: str, rcvbuf: int = 1 << 22) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.bind((ip, 0))
    sock.setblocking(False)
    return sock


def _drain(sock: socket.socket) -> list[bytes]:
    out = []
    while True:
        try:
            out.append(sock.recv(1 << 17))
        except BlockingIOError:
            return out


class FuzzRig:
    """Long-lived fds for many cases; each case gets a fresh forwarder of its own."""

    def __init__(self) -> None:
        self.app, self.dev = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        for s in (self.app, self.dev):
            s.setblocking(False)
            for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
                s.setsockopt(socket.SOL_SOCKET, opt, 1 << 22)
        self.local_plain = _udp_socket(NODE_IP)
        self.local_gro = _udp_socket(NODE_IP)
        self.local_gro.setsockopt(SOL_UDP, UDP_GRO, 1)
        self.tx = [_udp_socket(NODE_IP) for _ in range(3)]
        self.peers = [_udp_socket(peer_ip(i)) for i in range(NPEERS)]
        self.stranger = _udp_socket(STRANGER_IP)
        self.kernels = {
            "cython": importlib.import_module("overlayd._dataplane"),
            "python": importlib.import_module("overlayd.dataplane.python_kernels"),
        }

    def close(self) -> None:
        for s in (self.app, self.dev, self.local_plain, self.local_gro, *self.tx, *self.peers,
                  self.stranger):
            s.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _all_sockets(self) -> list[socket.socket]:
        return [self.app, self.local_plain, self.local_gro, *self.tx, *self.peers,
                self.stranger]

    def _entries(self, case: Case) -> tuple[PeerEntry, ...]:
        return tuple(PeerEntry(int.from_bytes(P.addr(peer_ip(i)), "big"), s.getsockname()[1],
                               case.mtus[i], f"peer{i}", peer_mac(i))
                     for i, s in enumerate(self.peers))

    def _forwarder(self, kernels: ModuleType, case: Case, local: socket.socket) -> Any:
        kw = {"vnet_hdr": case.vnet_hdr, "udp_gso": case.udp_gso, "udp_gro": case.udp_gro,
              "device_uso": case.device_uso}
        dev, sock = self.dev.fileno(), local.fileno()
        tx_fds = tuple(s.fileno() for s in self.tx[:case.tx_sockets])
        if case.path == "switched":
            fwd = kernels.VxlanSwitchForwarder(dev, sock, VNI, tx_fds, case.batch_size, FDB_MAX,
                                               **kw)
        elif case.path == "udp":
            fwd = kernels.UdpForwarder(dev, sock, case.batch_size, case.icmp_burst, **kw)
        else:
            fwd = kernels.VxlanRoutedForwarder(dev, sock, OUR_MAC, VNI, tx_fds, case.batch_size,
                                               case.icmp_burst, **kw)
        fwd.set_tables(self._tables(case, list(range(NPEERS))))
        return fwd

    def _tables(self, case: Case, order: list[int]) -> Any:
        """The tables with the peers ``order`` names (peer sockets by number), in that order;
        each keeps its own prefixes (peer 2: also 172.20.0.0/16, and 0.0.0.0/0 when it is the
        gateway), and peer 0 the pinned MAC."""
        entries = self._entries(case)
        peers = tuple(entries[p] for p in order)
        if case.path == "switched":
            static = ((STATIC_MAC, order.index(0)),) if 0 in order else ()
            return SwitchTables(peers, static)
        routes = [(int.from_bytes(overlay(-1, 0), "big"), 24, LOCAL)]
        routes += [(int.from_bytes(overlay(p, 0), "big"), 24, i) for i, p in enumerate(order)]
        if 2 in order:
            routes.append((int.from_bytes(P.addr("172.20.0.0"), "big"), 16, order.index(2)))
            if case.gateway:
                routes.append((0, 0, order.index(2)))
        return ForwardingTables(int.from_bytes(LOCAL_ADDRESS, "big"), peers, tuple(routes))

    def run(self, kernel: str, case: Case) -> Outcome:
        for s in self._all_sockets():
            _drain(s)
        local = self.local_gro if case.udp_gro else self.local_plain
        fwd = self._forwarder(self.kernels[kernel], case, local)
        out = Outcome()
        npeers = NPEERS
        before = fwd.counters()
        try:
            for step in case.steps:
                if step.direction == "inside":
                    self._inside(fwd, step)
                elif step.direction == "outside":
                    out.sent_datagrams += self._outside(fwd, step, local)
                    out.sent_inner += _inner_packets(case, step)
                elif step.direction == "tables":
                    fwd.set_tables(self._tables(case, step.order))
                    npeers = len(step.order)
                else:
                    fwd.set_now(step.now)
                    fwd.age(step.now, 300.0)
                after = fwd.counters()
                out.steps.append((npeers, {k: after[k] - before[k] for k in after}))
                before = after
        except Exception as exc:  # noqa: BLE001 -- any exception from a batch is the finding
            out.error = f"{type(exc).__name__}: {exc}"
        out.to_peers = [_drain(s) for s in self.peers]
        out.to_stranger = _drain(self.stranger)
        out.device = _drain(self.app)
        out.counters = fwd.counters()
        out.peer_counters = fwd.peer_counters()
        out.offloads = fwd.offloads()
        if case.path == "switched":
            out.fdb = fwd.fdb_entries()
        del fwd
        return out

    def _inside(self, fwd: Any, step: Step) -> None:
        for item in step.items:
            self.app.send(item.data)
        for _ in range(len(step.items) + 2):
            if fwd.inside_batch() == 0:
                return
        raise Finding("inside_batch still reads after the device was drained")

    def _outside(self, fwd: Any, step: Step, local: socket.socket) -> int:
        """Send the step's datagrams, then run outside batches until the forwarder has counted
        all of them (bounded in time); how many datagrams were sent."""
        target = local.getsockname()
        senders = [*self.peers, self.stranger]
        sent = 0
        for item in step.items:
            sock = senders[item.sender]
            try:
                if item.gso_size:
                    sock.sendmsg([item.data], [(SOL_UDP, UDP_SEGMENT,
                                                struct.pack("=H", item.gso_size))], 0, target)
                    sent += -(-len(item.data) // item.gso_size)
                else:
                    sock.sendto(item.data, target)
                    sent += 1
            except OSError:
                continue        # too big for one datagram, or a GSO size the kernel refuses
        before = fwd.counters()["outside_packets"]
        deadline = time.monotonic() + SETTLE_SECONDS
        while fwd.counters()["outside_packets"] - before < sent:
            if fwd.outside_batch() == 0:
                if time.monotonic() > deadline:
                    break
                select.select([local], [], [], 0.01)
        return sent


def _inner_packets(case: Case, step: Step) -> list[bytes]:
    """The IPv4 packets inside a step's datagrams (where there are any)."""
    out = []
    for item in step.items:
        size = item.gso_size or len(item.data) or 1
        for offset in range(0, len(item.data), size):
            datagram = item.data[offset:offset + size]
            packet = datagram if case.path == "udp" else datagram[22:]
            if case.path == "udp" or datagram[20:22] == b"\x08\x00":
                out.append(packet)
    return out


# --- properties -------------------------------------------------------------------------------

# Findings whose fix is under way on another branch (issue 10): reported as known, they do not
# fail a run unless it is strict. Delete an entry when its fix is merged.
KNOWN_OPEN: Final[dict[str, str]] = {}


def known_issue(message: str) -> str | None:
    """The open issue a finding's message belongs to, or None for a new finding."""
    for prefix, issue in KNOWN_OPEN.items():
        if prefix in message:
            return issue
    return None

def _describe(case: Case, a: Outcome, b: Outcome) -> str:
    lines = [f"path {case.path}, generators {sorted(set(case.generators()))}"]
    ca, cb = a.comparable(), b.comparable()
    for key in ca:
        if ca[key] != cb[key]:
            if key == "fdb" and any(s.direction == "tables" for s in case.steps):
                lines.append(f"fdb differ after a map change (set_tables remap): cython "
                             f"{a.fdb} / python {b.fdb}")
            elif key == "counters":
                diff = {k: (a.counters[k], b.counters.get(k)) for k in a.counters
                        if a.counters[k] != b.counters.get(k)}
                lines.append(f"counters differ (cython, python): {diff}")
            else:
                lines.append(f"{key} differ: cython {str(ca[key])[:300]} / python "
                             f"{str(cb[key])[:300]}")
    return "; ".join(lines)


def _check_outputs(case: Case, out: Outcome, known: list[str]) -> None:
    """Rules any correct forwarder keeps, whatever the input. A broken rule that a known open
    finding explains is appended to ``known`` and the other rules are still checked."""
    ctr = out.counters
    if out.error is not None:
        raise Finding(f"a batch raised: {out.error}")
    if out.to_stranger:
        raise Finding(f"{len(out.to_stranger)} datagrams went to an address not in the map")
    if ctr["outside_packets"] != out.sent_datagrams:
        raise Finding(f"{out.sent_datagrams} datagrams sent, outside_packets "
                      f"{ctr['outside_packets']}")
    for npeers, moved in out.steps:
        with unless_known(known):
            _check_accounting(moved, npeers)
    with unless_known(known):
        _check_packets(case, out)


@contextlib.contextmanager
def unless_known(known: list[str]) -> Iterator[None]:
    try:
        yield
    except Finding as exc:
        if known_issue(str(exc)) is None:
            raise
        known.append(str(exc))


def _check_packets(case: Case, out: Outcome) -> None:
    vnet = 10 if case.vnet_hdr else 0
    for peer, datagrams in enumerate(out.to_peers):
        for datagram in datagrams:
            _check_datagram(case, peer, datagram)
    for write in out.device:
        _check_device_write(case, write[vnet:] if vnet else write)
        if vnet and write[1] & 0x7F == 1:
            check_coalesced(case, write, out.sent_inner)
        elif vnet and write[1] == offload.VNET_GSO_UDP_L4:
            check_udp_coalesced(case, write, out.sent_inner)


def _check_accounting(ctr: dict[str, int], npeers: int) -> None:
    """Every packet is accounted for once, per direction: each datagram received is delivered
    or dropped for one reason; each packet read (a superpacket's segments one by one) is sent
    (to one peer, or flooded to all), or dropped for one reason."""
    outside_drops = sum(ctr[r] for r in DROP_REASONS if r.startswith("outside_"))
    outside = ctr["delivered_packets"] + ctr["device_write_error"] + outside_drops
    if ctr["outside_packets"] != outside:
        raise Finding(f"outside accounting: {ctr['outside_packets']} received, {outside} "
                      "delivered or dropped")
    copies = ctr["flooded_copies"]
    sent = ctr["forwarded_packets"] + ctr["tx_error"] - copies + (copies // npeers if npeers
                                                                  else 0)
    inside = sent + sum(ctr[r] for r in DROP_REASONS if r.startswith("inside_"))
    if inside != ctr["inside_packets"]:
        if inside - ctr["inside_packets"] == ctr["inside_bad_offload"]:
            raise Finding("inside_bad_offload is counted as a drop, not as a read: "
                          f"{ctr['inside_packets']} read, {inside} sent or dropped")
        raise Finding(f"inside accounting: {ctr['inside_packets']} read, {inside} sent or "
                      "dropped")


def _tcp_view(packet: bytes) -> tuple[bytes, int, int, int] | None:
    """(flow, seq, payload length, IPv4 header length) of an IPv4/TCP packet."""
    if len(packet) < 40 or packet[9] != P.PROTO_TCP:
        return None
    ihl = (packet[0] & 0x0F) * 4
    if len(packet) < ihl + 20:
        return None
    doff = (packet[ihl + 12] >> 4) * 4
    flow = packet[12:20] + packet[ihl:ihl + 4]
    seq = struct.unpack_from("!I", packet, ihl + 4)[0]
    return flow, seq, len(packet) - ihl - doff, ihl


def check_coalesced(case: Case, write: bytes, sent: list[bytes], *,
                    suspicious: bool = False) -> None:
    """A superpacket written into the device may only hold segments a kernel's GRO would have
    merged with its first one: the same TCP header byte 12 (data offset, reserved bits), a
    valid IPv4 header checksum, the same TOS and TTL, IPv4 IDs counting up unless DF.

    The members are found again among the packets peers sent: the one whose sequence number
    and payload fill the superpacket at each offset in turn (a dropped look-alike is not one).
    When several fit (a retransmission), one that may be merged clears the offset, unless
    ``suspicious``: then any that may not is reported (used only to name the cause of a
    divergence already found)."""
    head = write[10 + case.l2:]
    view = _tcp_view(head)
    if view is None:
        raise Finding(f"a TCPv4 GSO write that holds no TCP packet: {write[:40].hex()}")
    flow, seq, length, ihl = view
    payload = head[len(head) - length:]
    first_id = struct.unpack_from("!H", head, 4)[0]
    cursor = 0
    while cursor < length:
        candidates = []
        for packet in sent:
            v = _tcp_view(packet)
            if (v is not None and v[0] == flow and v[3] == ihl and v[2]
                    and (v[1] - seq) % (1 << 32) == cursor
                    and packet[len(packet) - v[2]:] == payload[cursor:cursor + v[2]]):
                candidates.append((packet, v[2]))
        if not candidates:
            return          # not attributable to what was sent (e.g. a raw datagram)
        problems = [_merge_problem(packet, head, ihl, cursor, first_id)
                    for packet, _ in candidates]
        if all(problems) or suspicious and any(problems):
            raise Finding(next(p for p in problems if p))
        cursor += candidates[problems.index(None)][1]


def check_udp_coalesced(case: Case, write: bytes, sent: list[bytes]) -> None:
    """A UDP superpacket written into the device (USO) may hold only what the kernel's UDP GRO
    would have merged, and the kernel must cut it back into datagrams peers sent: cut at
    gso_size (what __udp_gso_segment does), datagram i must be one a peer sent with the head's
    flow, TOS, TTL and DF word, the head's IPv4 id + i, that payload, and a nonzero checksum
    that verified (as sent, or once the kernel VTEP's partial one was finished)."""
    l2 = case.l2
    flags, _, hdr_len, gso_size, csum_start, csum_offset = struct.unpack_from("<BBHHHH", write)
    data = write[10:]
    head = data[l2:]
    if (flags != 1 or hdr_len != l2 + 28 or csum_start != l2 + 20 or csum_offset != 6
            or len(head) < 28 or head[0] != 0x45 or head[9] != P.PROTO_UDP or not gso_size
            or len(data) - hdr_len <= gso_size or len(head) > 0xFFFF):
        raise Finding(f"a UDP GSO write the kernel would refuse or misread: {write[:48].hex()}")
    if struct.unpack_from("!H", head, 2)[0] != len(head) or not P.header_checksum_ok(head):
        raise Finding("a UDP superpacket whose IPv4 total length or header checksum is wrong")
    payload = data[hdr_len:]
    pieces = [payload[at:at + gso_size] for at in range(0, len(payload), gso_size)]
    if len(pieces) > 64:
        raise Finding(f"a UDP superpacket of {len(pieces)} datagrams (at most 64)")
    first_id = struct.unpack_from("!H", head, 4)[0]
    for i, piece in enumerate(pieces):
        ident = struct.pack("!H", (first_id + i) & 0xFFFF)
        if not any(_gro_member(p, head, ident, piece) for p in sent):
            raise Finding(f"a UDP superpacket holds, as datagram {i}, one no peer sent that GRO "
                          "would merge (flow, TOS, TTL, DF, id, payload or checksum differ)")


def _gro_member(packet: bytes, head: bytes, ident: bytes, piece: bytes) -> bool:
    if (len(packet) != 28 + len(piece) or packet[:2] != head[:2] or packet[4:6] != ident
            or packet[6:10] != head[6:10] or packet[12:24] != head[12:24]
            or packet[28:] != piece or packet[26:28] == b"\0\0"
            or not P.header_checksum_ok(packet)):
        return False
    finished, _ = offload.finish_partial_checksum(packet, 0)
    pseudo = finished[12:20] + struct.pack("!BBH", 0, P.PROTO_UDP, len(finished) - 20)
    return P.inet_sum(pseudo + finished[20:]) == 0


def _known_cause(case: Case, *outcomes: Outcome) -> str | None:
    """A known open finding that explains a divergence, if a merge in it could be one."""
    vnet = 10 if case.vnet_hdr else 0
    for out in outcomes:
        for write in out.device:
            if vnet and write[1] & 0x7F == 1:
                try:
                    check_coalesced(case, write, out.sent_inner, suspicious=True)
                except Finding as exc:
                    if known_issue(str(exc)):
                        return str(exc)
    return None


def _merge_problem(packet: bytes, head: bytes, ihl: int, offset: int,
                   first_id: int) -> str | None:
    if packet[ihl + 12] != head[ihl + 12]:
        return ("merged a TCP segment whose reserved bits (TCP byte 12) differ from the "
                f"head's: {packet[ihl + 12]:#04x} != {head[ihl + 12]:#04x}")
    if not P.header_checksum_ok(packet):
        return ("merged a segment with a bad IPv4 header checksum into a valid superpacket "
                f"(offset {offset})")
    if offset and (packet[1] != head[1] or packet[8] != head[8]):
        return "merged a segment whose TOS or TTL differs from the head's"
    if offset and struct.unpack_from("!H", packet, 4)[0] == first_id and not packet[6] & 0x40:
        return "merged a segment whose IPv4 ID does not count up (no DF)"
    return None


def _check_datagram(case: Case, peer: int, datagram: bytes) -> None:
    if case.path == "switched":
        if len(datagram) < 8 + 14 or datagram[:8] != P.vxlan(VNI, b""):
            raise Finding(f"to peer {peer}: not a VXLAN frame of our VNI: {datagram[:30].hex()}")
        if datagram[14] & 1 or datagram[14:20] == bytes(6):
            raise Finding(f"to peer {peer}: a frame with a bad source MAC went out")
        return
    packet = datagram
    if case.path == "routed":
        expect = P.vxlan(VNI, P.ethernet(peer_mac(peer), OUR_MAC, b""))
        if datagram[:22] != expect:
            raise Finding(f"to peer {peer}: bad VXLAN/Ethernet header {datagram[:22].hex()}")
        packet = datagram[22:]
    # The inside path trusts the header checksum of what its own kernel wrote (it only adjusts
    # it for the TTL), so the checksum is not a rule here; the rest of the header is.
    if (len(packet) < 20 or packet[0] >> 4 != 4 or packet[0] & 0x0F < 5
            or struct.unpack_from("!H", packet, 2)[0] != len(packet)):
        raise Finding(f"to peer {peer}: not a sane IPv4 packet: {packet[:24].hex()}")
    if packet[8] == 0:
        raise Finding(f"to peer {peer}: forwarded with TTL 0")
    if len(packet) > case.mtus[peer] and packet[6] & 0x40:
        raise Finding(f"to peer {peer}: a DF packet of {len(packet)} > path MTU "
                      f"{case.mtus[peer]} went out")
    dst = packet[16:20]
    owner = _owner(case, dst)
    # A subnet whose peer left the map goes to the gateway (peer 2) by the default route.
    dropped = {p for s in case.steps if s.direction == "tables" for p in range(NPEERS)
               if p not in s.order}
    if owner != peer and not (case.gateway and peer == 2 and owner in dropped):
        raise Finding(f"to peer {peer}: destination {socket.inet_ntoa(dst)} routes to {owner}")


def _owner(case: Case, address: bytes) -> int | None:
    if address[:3] == overlay(-1, 0)[:3]:
        return LOCAL
    for i in range(NPEERS):
        if address[:3] == overlay(i, 0)[:3]:
            return i
    if address[:2] == b"\xac\x14":
        return 2
    return 2 if case.gateway else None


def _check_device_write(case: Case, data: bytes) -> None:
    if case.path == "switched":
        if len(data) < 14:
            raise Finding(f"a runt frame was written into the tap: {data.hex()}")
        return
    if not P.header_checksum_ok(data):
        raise Finding(f"written into the device: not a valid IPv4 packet: {data[:24].hex()}")
    src, dst = data[12:16], data[16:20]
    if src == LOCAL_ADDRESS and data[9] == P.PROTO_ICMP:    # an ICMP error of ours
        if len(data) > 576 or len(data) < 20 + 8 + 20 or P.inet_sum(data[20:]):
            raise Finding(f"a malformed ICMP error went into the device: {data[:40].hex()}")
        if data[20] not in (3, 11) or data[16:20] != data[20 + 8 + 12:20 + 8 + 16]:
            raise Finding("an ICMP error not of type 3/11, or not sent to the source of the "
                          f"packet it quotes: {data[:60].hex()}")
        return
    if _owner(case, dst) != LOCAL:
        raise Finding(f"written into the device: destination {socket.inet_ntoa(dst)} is "
                      "not ours")


def check_case(rig: FuzzRig, case: Case) -> tuple[Outcome, Outcome, list[str]]:
    """Run ``case`` on both kernels; raise Finding on an exception, a divergence or a wrong
    output that no known open finding explains. Returns the (cython, python) outcomes and the
    known findings the case showed."""
    cython = rig.run("cython", case)
    python = rig.run("python", case)
    known: list[str] = []
    _check_outputs(case, cython, known)
    _check_outputs(case, python, known)
    if cython.comparable() != python.comparable():
        # Loopback delivery can in principle straggle past the settle time: a divergence must
        # repeat to count.
        again = rig.run("cython", case), rig.run("python", case)
        if again[0].comparable() != again[1].comparable():
            message = "cython and python differ: " + _describe(case, *again)
            cause = _known_cause(case, *again) or (message if known_issue(message) else None)
            if cause is None:
                raise Finding(message)
            known.append(message if cause == message else f"{cause}, seen as: {message}")
    return cython, python, known


@contextlib.contextmanager
def open_rig() -> Iterator[FuzzRig]:
    rig = FuzzRig()
    try:
        yield rig
    finally:
        rig.close()
