"""Small traffic tools the lab runs *inside* a namespace, as `python agents.py COMMAND ...`.

Stdlib only and run by file path (not `-m`), so they work whatever the namespace's process can
import and need no external tools (iperf3, socat, tcpdump). Each prints "READY" when a caller may
go on (listening / sniffing), then exactly one JSON line with its result, and exits. Every wait is
bounded by the TIMEOUT/SECONDS argument.

  tcp-recv BIND_IP PORT TIMEOUT                         accept one connection, hash it to EOF
  tcp-send SRC_IP DST_IP PORT NBYTES SEED TIMEOUT       send NBYTES of seeded pseudo-random data
  sniff IFACE MARKER_HEX SECONDS                        count packets arriving on IFACE with MARKER
  inject SRC_IP DST_IP DST_PORT IN_SRC IN_DST IN_DPORT MARKER_HEX
        send one UDP datagram from SRC_IP to DST_IP:DST_PORT whose payload is a hand-built
        IPv4/UDP packet IN_SRC -> IN_DST:IN_DPORT carrying MARKER (the flannel udp wire format)
  garp IFACE IP                                         broadcast one gratuitous ARP for IP from
        IFACE's MAC (what a VM does when it comes up on a new host)
  udp-send SRC_IP DST_IP PORT FLOWS BURSTS SIZE SEED GSO TIMEOUT
        BURSTS bursts over FLOWS connected UDP sockets: per flow 16 datagrams of SIZE bytes and
        a shorter last one, the flows interleaved (GSO=1: each flow's burst in one UDP_SEGMENT
        send); TOS and TTL change from burst to burst (without GSO, also mid-burst). Every datagram says what it is (flow,
        seq, TOS, TTL) and carries bytes derived from SEED, flow and seq.
  udp-recv BIND_IP PORT EXPECTED SEED TIMEOUT            receive udp-send's datagrams and check
        each one's bytes, TOS and TTL, and each flow's order
"""

from __future__ import annotations

import hashlib
import json
import random
import select
import socket
import struct
import sys
import time
from collections.abc import Callable

CHUNK = 256 * 1024
ETH_P_ALL = 0x0003
PACKET_OUTGOING = 4     # <linux/if_packet.h>: sll_pkttype of packets we send


def _ready() -> None:
    print("READY", flush=True)


def _result(**fields: object) -> int:
    print(json.dumps(fields), flush=True)
    return 0


def tcp_recv(bind_ip: str, port: str, timeout: str) -> int:
    deadline = time.monotonic() + float(timeout)
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind((bind_ip, int(port)))
    srv.listen(1)
    srv.settimeout(float(timeout))
    _ready()
    conn, peer = srv.accept()
    digest = hashlib.sha256()
    total = 0
    first: float | None = None
    with conn:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return _result(error="timeout", bytes=total)
            conn.settimeout(left)
            data = conn.recv(CHUNK)
            if not data:
                break
            if first is None:
                first = time.monotonic()
            digest.update(data)
            total += len(data)
    seconds = time.monotonic() - (first or time.monotonic())
    return _result(bytes=total, sha256=digest.hexdigest(), seconds=seconds, peer=peer[0])


def tcp_send(src_ip: str, dst_ip: str, port: str, nbytes: str, seed: str, timeout: str) -> int:
    rng = random.Random(int(seed))    # both ends can reproduce the stream; no big buffers
    digest = hashlib.sha256()
    left = int(nbytes)
    deadline = time.monotonic() + float(timeout)
    sock = socket.create_connection((dst_ip, int(port)), timeout=float(timeout),
                                    source_address=(src_ip, 0))
    start = time.monotonic()
    with sock:
        while left > 0:
            if time.monotonic() > deadline:
                return _result(error="timeout", bytes=int(nbytes) - left)
            chunk = rng.randbytes(min(CHUNK, left))
            sock.sendall(chunk)
            digest.update(chunk)
            left -= len(chunk)
        sock.shutdown(socket.SHUT_WR)
        # Wait for the receiver's close so `seconds` covers delivery, not just buffering.
        sock.recv(1)
    return _result(bytes=int(nbytes), sha256=digest.hexdigest(),
                   seconds=time.monotonic() - start)


def sniff(iface: str, marker_hex: str, seconds: str) -> int:
    marker = bytes.fromhex(marker_hex)
    # SOCK_DGRAM: the network-layer packet whether the device is tun (no L2) or tap.
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(ETH_P_ALL))
    sock.bind((iface, ETH_P_ALL))
    _ready()
    deadline = time.monotonic() + float(seconds)
    frames = matches = sent_matches = 0
    while (left := deadline - time.monotonic()) > 0:
        readable, _, _ = select.select([sock], [], [], left)
        if not readable:
            break
        data, addr = sock.recvfrom(65535)
        frames += 1
        if marker in data:
            # Outgoing packets can quote the marker too (an ICMP error about the packet we are
            # looking for): count them apart, "matches" is only what came in.
            if addr[2] == PACKET_OUTGOING:
                sent_matches += 1
            else:
                matches += 1
    return _result(frames=frames, matches=matches, sent_matches=sent_matches)


def checksum(data: bytes) -> int:
    """RFC 1071 internet checksum."""
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def ipv4_udp(src: str, dst: str, sport: int, dport: int, payload: bytes, ttl: int = 64) -> bytes:
    """A complete IPv4/UDP packet with valid header checksum (UDP checksum 0: allowed on IPv4)."""
    udp = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload
    header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 0x1234, 0, ttl,
                         socket.IPPROTO_UDP, 0, socket.inet_aton(src), socket.inet_aton(dst))
    header = header[:10] + struct.pack("!H", checksum(header)) + header[12:]
    return header + udp


def inject(src_ip: str, dst_ip: str, dst_port: str, in_src: str, in_dst: str, in_dport: str,
           marker_hex: str) -> int:
    packet = ipv4_udp(in_src, in_dst, 40000, int(in_dport), bytes.fromhex(marker_hex))
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((src_ip, 0))
        sent = sock.sendto(packet, (dst_ip, int(dst_port)))
    return _result(sent=sent)


def garp(iface: str, ip: str) -> int:
    with socket.socket(socket.AF_PACKET, socket.SOCK_RAW) as sock:
        sock.bind((iface, 0))
        mac = sock.getsockname()[4][:6]
        addr = socket.inet_aton(ip)
        arp = struct.pack("!HHBBH6s4s6s4s", 1, 0x0800, 6, 4, 1, mac, addr, b"\0" * 6, addr)
        sent = sock.send(b"\xff" * 6 + mac + struct.pack("!H", 0x0806) + arp)
    return _result(sent=sent, mac=mac.hex(":"))


UDP_BURST = 16                   # full-size datagrams per flow and burst, then a shorter one
UDP_SHORT = 24                   # bytes the last datagram of a burst is shorter by
UDP_HEAD = struct.Struct("!HIBBH")   # flow, seq, TOS, TTL, size
SOL_UDP = 17
UDP_SEGMENT = 103
IP_RECVTOS = 13
IP_RECVTTL = 12


def udp_datagram(seed: int, flow: int, seq: int, tos: int, ttl: int, size: int) -> bytes:
    head = UDP_HEAD.pack(flow, seq, tos, ttl, size)
    fill = hashlib.sha256(f"{seed}:{flow}:{seq}".encode()).digest()
    body = (fill * (size // len(fill) + 1))[:size - len(head)]
    return head + body


def udp_send(src_ip: str, dst_ip: str, port: str, flows: str, bursts: str, size: str,
             seed: str, gso: str, timeout: str) -> int:
    deadline = time.monotonic() + float(timeout)
    n, full, use_gso = int(flows), int(size), gso == "1"
    short = full - UDP_SHORT
    socks = []
    for _ in range(n):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind((src_ip, 0))
        s.connect((dst_ip, int(port)))     # connected: IPv4 ids count up per socket
        socks.append(s)
    sent = shorts = 0
    seq = [0] * n
    def marks(phase: int) -> tuple[int, int]:
        return (phase % 2) * 0x20, 64 - phase % 3        # TOS, TTL

    def set_marks(phase: int) -> None:
        tos, ttl = marks(phase)
        for s in socks:
            s.setsockopt(socket.IPPROTO_IP, socket.IP_TOS, tos)
            s.setsockopt(socket.IPPROTO_IP, socket.IP_TTL, ttl)

    for burst in range(int(bursts)):
        if time.monotonic() > deadline:
            return _result(error="timeout", sent=sent)
        # Without GSO, TOS and TTL change in the middle of a burst too, between full-size
        # datagrams of one flow: a run merged across the change would lose the later marks.
        runs: list[list[bytes]] = [[] for _ in range(n)]
        for i in range(UDP_BURST + 1):
            phase = burst * 2 + (0 if use_gso or i < UDP_BURST // 2 else 1)
            for flow in range(n):
                runs[flow].append(udp_datagram(int(seed), flow, seq[flow], *marks(phase),
                                               short if i == UDP_BURST else full))
                seq[flow] += 1
        set_marks(burst * 2)
        if use_gso:
            for flow, s in enumerate(socks):
                s.sendmsg([b"".join(runs[flow])],
                          [(SOL_UDP, UDP_SEGMENT, struct.pack("=H", full))])
        else:
            for i in range(UDP_BURST + 1):
                if i == UDP_BURST // 2:
                    set_marks(burst * 2 + 1)
                for flow, s in enumerate(socks):
                    s.send(runs[flow][i])
        sent += n * (UDP_BURST + 1)
        shorts += n
        time.sleep(0.001)      # bursts, not a flood: the receiving socket never overflows
    for s in socks:
        s.close()
    return _result(sent=sent, shorts=shorts)


def udp_recv(bind_ip: str, port: str, expected: str, seed: str, timeout: str) -> int:
    deadline = time.monotonic() + float(timeout)
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
    sock.setsockopt(socket.IPPROTO_IP, IP_RECVTOS, 1)
    sock.setsockopt(socket.IPPROTO_IP, IP_RECVTTL, 1)
    sock.bind((bind_ip, int(port)))
    _ready()
    seen: set[tuple[int, int]] = set()
    last: dict[int, int] = {}
    bad_bytes = bad_tos = out_of_order = duplicates = shorts = 0
    ttl_deltas: set[int] = set()
    idle_until = deadline
    while len(seen) < int(expected):
        left = min(deadline, idle_until) - time.monotonic()
        if left <= 0:
            break
        readable, _, _ = select.select([sock], [], [], left)
        if not readable:
            break
        data, ancillary, _, _ = sock.recvmsg(65535, 256)
        idle_until = time.monotonic() + 3.0
        if len(data) < UDP_HEAD.size:
            bad_bytes += 1
            continue
        flow, seq, tos, ttl, size = UDP_HEAD.unpack_from(data)
        if len(data) != size or data != udp_datagram(int(seed), flow, seq, tos, ttl, size):
            bad_bytes += 1
            continue
        got = {(level, kind): value for level, kind, value in ancillary}
        got_tos = got.get((socket.IPPROTO_IP, socket.IP_TOS), b"\xff")[0]
        got_ttl = int.from_bytes(got.get((socket.IPPROTO_IP, socket.IP_TTL), b"\0\0\0\0"),
                                 sys.byteorder)
        if got_tos != tos:
            bad_tos += 1
        ttl_deltas.add(ttl - got_ttl)
        if (flow, seq) in seen:
            duplicates += 1
            continue
        seen.add((flow, seq))
        if seq < last.get(flow, -1):
            out_of_order += 1
        last[flow] = seq
        if (seq + 1) % (UDP_BURST + 1) == 0:
            shorts += 1
    return _result(received=len(seen), bad_bytes=bad_bytes, bad_tos=bad_tos,
                   ttl_deltas=sorted(ttl_deltas), out_of_order=out_of_order,
                   duplicates=duplicates, shorts=shorts)


COMMANDS: dict[str, Callable[..., int]] = {"tcp-recv": tcp_recv, "tcp-send": tcp_send,
                                           "sniff": sniff, "inject": inject, "garp": garp,
                                           "udp-send": udp_send, "udp-recv": udp_recv}


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in COMMANDS:
        print(__doc__, file=sys.stderr)
        return 2
    try:
        return COMMANDS[argv[0]](*argv[1:])
    except (OSError, ValueError, TypeError) as exc:
        _result(error=f"{type(exc).__name__}: {exc}")
        return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
