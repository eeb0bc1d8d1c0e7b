"""What every forwarder shares, pure-Python twin of cext/forwarder_base.pxi.

1. Batches: ``inside_batch`` reads up to batch_size packets/frames from the device into
   preallocated slots (each with HEADROOM bytes in front for outer headers; EAGAIN ends the
   batch, EINTR retries, another error is raised after the batch went out); ``outside_batch``
   receives up to batch_size datagrams (an error met after some datagrams is reported by the
   next call). Each slot is handed to the subclass's per-packet hook.
2. Send queues: one per tunnel socket (the receive socket, or each of ``tx_fds``); a datagram
   is queued with its peer and goes out when the queue is full or the batch ends (the Cython
   kernel: one sendmmsg per socket used). A refused datagram is a tx_error; the rest still go.
3. Peers: a received datagram is accepted only from a peer's IP (any source port); per-peer
   counters follow the peer's (ip, port) across table swaps.
4. Capture (``overlayd capture``): while ``set_capture(True)``, each forwarded packet (inside,
   as queued for its peer; a flood once, with peer -1) and each delivered one (outside, as
   written to the device) is copied into a buffer bounded like the Cython kernel's ring
   (CAPTURE_BYTES of packets, CAPTURE_RECORDS records); what does not fit is counted as
   capture_dropped. ``drain_capture`` returns the records and empties the buffer. While
   disabled, the cost is one test of ``_capture_on``; while enabled, each batch reads the wall
   clock once on entry and stamps its records with it (the data plane's only clock).
5. Routed helpers (RoutedForwarderBase): the router part of the inside path (martians, LPM,
   TTL, ICMP errors under a token bucket, RFC 1812) and the IPv4 checks of the outside path
   (martians - RFC 1812 5.3.7: 0/8, 127/8, 224/4, 240/4, 255.255.255.255 as source or
   destination - and this host's own addresses as source, before the prefix checks).
6. Offloads (cext/offload.pxi, twin offload.py), each off unless the constructor asks:
   ``vnet_hdr`` - every device read and write carries a virtio-net header; TCP superpackets
   are cut into segments, laid out back to back with the path's outer-header room in front
   of each in one arena per inside batch (each superpacket's run at the next 16-byte
   boundary, as in the Cython kernel), and delivered packets are coalesced into superpackets
   written when the outside batch ends. ``udp_gso`` - a datagram that starts where the
   previous entry of its queue ends in the arena (same peer, not longer) is merged into it
   and the entry goes out in one UDP_SEGMENT sendmsg. ``udp_gro`` - the caller enabled
   UDP_GRO on the receive socket; a receive that carries several datagrams is split and each
   is handled as if received alone. ``device_uso`` (with vnet_hdr) - the device took USO: UDP
   superpackets it hands over are cut into datagrams like TCP ones, and the coalescer merges
   runs of one UDP flow into UDP GSO writes (offload.py, spec point 7).

Invariants: the fds belong to the caller and are never closed here; a batch is not re-entrant;
tables are swapped whole; every counter index comes from counters.COUNTER_INDEX.
"""

from __future__ import annotations

import errno
import operator
import os
import socket
import struct
import time
from collections.abc import Sequence
from typing import Any, Final

from overlayd.dataplane import offload
from overlayd.dataplane.counters import BATCH_BUCKETS, COUNTER_INDEX, COUNTER_NAMES
from overlayd.dataplane.route_table import RouteTable
from overlayd.dataplane.tables import LOCAL, NO_ROUTE
from overlayd.wire import ethernet, icmp, ipv4, vxlan

HEADROOM: Final = 64          # bytes before each packet, for outer headers of encapsulating paths
SLOT_SIZE: Final = 65536      # any IPv4 packet (total length is 16 bits) fits one slot
MAX_BATCH: Final = 512
STAGE_BYTES: Final = 1 << 20    # UDP GSO staging: bytes of runs copied together per send
TX_QUEUE: Final = 512         # datagrams per socket queue before it is sent mid-batch
MAX_TX_SOCKETS: Final = 64
CAPTURE_BYTES: Final = 4 << 20    # capture buffer: packet bytes held between two drains
CAPTURE_RECORDS: Final = 4096     # ... and packets

# Receive errors that say something about one earlier datagram or a passing state of the
# underlay, not about the socket: the next readiness event may well succeed.
TRANSIENT_RECV_ERRORS: Final = frozenset({
    errno.EAGAIN, errno.EWOULDBLOCK, errno.EINTR, errno.ECONNREFUSED, errno.ECONNRESET,
    errno.EHOSTUNREACH, errno.EHOSTDOWN, errno.ENETUNREACH, errno.ENETDOWN, errno.ENOBUFS,
    errno.ENOMEM, errno.EMSGSIZE, errno.ETIMEDOUT, errno.EPROTO,
})

# A refused UDP GSO send: EINVAL (EMSGSIZE on newer kernels) for datagrams larger than
# GSO_FLOOR says this send did not fit (with IP_PMTUDISC_DONT the kernel refuses a GSO segment
# larger than the egress MTU, which it would fragment if sent alone): datagrams of that size go
# to that peer singly until the map changes. These, or EINVAL for datagrams that small (no
# path MTU is), say the socket or route cannot do GSO at all: stop trying.
GSO_UNSUPPORTED_ERRORS: Final = frozenset({
    errno.EIO, errno.EINVAL, errno.ENOPROTOOPT, errno.EOPNOTSUPP,
})
GSO_DID_NOT_FIT_ERRORS: Final = frozenset({errno.EINVAL, errno.EMSGSIZE})
GSO_FLOOR: Final = 576 - 28
_GRO_CMSG_SPACE: Final = socket.CMSG_SPACE(4)
_GRO_SIZE: Final = struct.Struct("=i")

C = COUNTER_INDEX
_INSIDE_DROP: Final = {
    ipv4.TOO_SHORT: C["inside_too_short"],
    ipv4.NOT_IPV4: C["inside_not_ipv4"],
    ipv4.BAD_HEADER: C["inside_bad_header"],
    ipv4.LENGTH_MISMATCH: C["inside_bad_header"],
}
_OUTSIDE_DROP: Final = {
    ipv4.TOO_SHORT: C["outside_too_short"],
    ipv4.NOT_IPV4: C["outside_not_ipv4"],
    ipv4.BAD_HEADER: C["outside_bad_header"],
    ipv4.LENGTH_MISMATCH: C["outside_length_mismatch"],
    ipv4.BAD_CHECKSUM: C["outside_bad_checksum"],
}
_VXLAN_DROP: Final = {
    vxlan.TRUNCATED: C["outside_truncated_vxlan"],
    vxlan.BAD_FLAGS: C["outside_bad_vxlan_flags"],
    vxlan.WRONG_VNI: C["outside_wrong_vni"],
}
# Per-peer counter positions.
# Per-peer counters. Bytes are inner bytes (the datagram less the outer header the path writes),
# so they compare with inside_bytes and with the peer's own counters; RX_ACCEPTED counts what
# passed every check (RX_PACKETS - RX_ACCEPTED: dropped).
TX_PACKETS, TX_BYTES, RX_PACKETS, RX_BYTES, RX_ACCEPTED = range(5)


def martian(address: int) -> bool:
    """RFC 1812 5.3.7: 0/8, 127/8, and from 224.0.0.0 up (multicast, 240/4, broadcast)."""
    return address >> 24 in (0, 127) or address >= 0xE0000000


def batch_bucket(n: int) -> int:
    """Histogram bucket of a batch of n >= 1 packets: 2**(i-1) < n <= 2**i."""
    return (n - 1).bit_length()


class State:
    """One generation of forwarding state; replaced whole by set_tables, never mutated except
    for its per-peer counters. Reads ``local_address`` and ``routes`` where the tables have
    them (ForwardingTables), so the switched path's SwitchTables builds one too."""

    __slots__ = (
        "host_addresses",
        "local_address",
        "peer_addr",
        "peer_by_ip",
        "peer_counters",
        "peer_gso_max",
        "peer_keys",
        "peer_mac",
        "peer_mtu",
        "routes",
    )

    def __init__(self, tables: Any) -> None:
        peers = tables.peers if tables is not None else ()
        routes = getattr(tables, "routes", ())
        local_address = getattr(tables, "local_address", 0)
        host = frozenset(operator.index(a) for a in getattr(tables, "host_addresses", ()))
        for address in host:
            if not 0 <= address <= 0xFFFFFFFF:
                raise ValueError(f"host_addresses: {address!r} is not a u32 IPv4 address")
        self.host_addresses: frozenset[int] = host
        self.local_address: int = operator.index(local_address)
        if not 0 <= self.local_address <= 0xFFFFFFFF:
            raise ValueError(f"local_address {local_address!r} is not a u32 IPv4 address")
        self.peer_keys: list[tuple[int, int]] = []
        self.peer_mtu: list[int] = []
        self.peer_mac: list[bytes] = []
        self.peer_addr: list[tuple[str, int]] = []
        self.peer_by_ip: dict[int, int] = {}
        for index, peer in enumerate(peers):
            ip, port, mtu = (operator.index(v) for v in (peer.ip, peer.port, peer.path_mtu))
            mac = bytes(getattr(peer, "mac", b""))
            check_peer(index, ip, port, mtu, mac)
            self.peer_keys.append((ip, port))
            self.peer_mtu.append(mtu)
            self.peer_mac.append(mac)
            self.peer_addr.append((ipv4.int_to_addr(ip), port))
            self.peer_by_ip.setdefault(ip, index)  # several ports on one IP: the first wins
        self.routes = RouteTable(routes)
        self.routes.check_targets(len(self.peer_keys))
        self.peer_counters: list[list[int]] = [[0, 0, 0, 0, 0] for _ in self.peer_keys]
        # UDP GSO: the largest datagram merged into a GSO send to each peer (lowered when a
        # send of larger ones did not fit).
        self.peer_gso_max: list[int] = [offload.GSO_MAX_BYTES] * len(self.peer_keys)

    def index_map(self, old: State) -> dict[int, int]:
        """Old peer index -> new index, for peers whose (ip, port) is in both generations
        (a duplicate (ip, port) maps its first occurrence only)."""
        first_new: dict[tuple[int, int], int] = {}
        for index, key in enumerate(self.peer_keys):
            first_new.setdefault(key, index)
        out: dict[int, int] = {}
        for index, key in enumerate(old.peer_keys):
            new = first_new.pop(key, None)
            if new is not None:
                out[index] = new
        return out

    def inherit_counters(self, old: State) -> None:
        """Per-peer counters follow the peer's (ip, port) across a table swap."""
        for old_index, new_index in self.index_map(old).items():
            self.peer_counters[new_index] = list(old.peer_counters[old_index])


def check_peer(index: int, ip: int, port: int, mtu: int, mac: bytes = b"") -> None:
    if not 0 <= ip <= 0xFFFFFFFF:
        raise ValueError(f"peer {index}: ip {ip!r} is not a u32 IPv4 address")
    if not 0 <= port <= 0xFFFF:
        raise ValueError(f"peer {index}: port {port!r} out of range")
    if not 0 <= mtu <= 0xFFFFFFFF:
        raise ValueError(f"peer {index}: path_mtu {mtu!r} out of range")
    if len(mac) not in (0, 6):
        raise ValueError(f"peer {index}: mac must be 6 bytes (or empty), got {len(mac)}")


class TxEntry:
    """One send-queue entry: ``buf[start:end]`` for ``peer``, ``count`` datagrams of
    ``segment_size`` bytes (the last may be shorter) - more than one only after UDP GSO merged
    segments that lie back to back in one segmentation arena."""

    __slots__ = ("buf", "count", "end", "open", "peer", "segment_size", "start")

    def __init__(self, buf: memoryview, start: int, end: int, peer: int) -> None:
        self.buf = buf
        self.start = start
        self.end = end
        self.peer = peer
        self.segment_size = end - start
        self.count = 1
        self.open = True


def check_tx_fds(tx_fds: Sequence[int]) -> list[int]:
    fds = [operator.index(fd) for fd in tx_fds]
    if len(fds) > MAX_TX_SOCKETS:
        raise ValueError(f"at most {MAX_TX_SOCKETS} tx_fds, got {len(fds)}")
    if any(fd < 0 for fd in fds):
        raise ValueError("tx_fds must be open file descriptors")
    return fds


class ForwarderBase:
    """Batches, send queues, peers and counters over a device fd and UDP socket fds, all owned
    by the caller. Subclasses implement ``_inside_one(state, buf, start, length)`` and
    ``_outside_one(state, pkt, flags, address)``, and say how long the device's link header is
    (``_LINK_HEADER_LEN``) and how much room their outer header needs (``_OUTER_PREFIX``)."""

    _name = "Forwarder"
    _LINK_HEADER_LEN = 0
    _OUTER_PREFIX = 0

    def __init__(self, dev_fd: int, sock_fd: int, tx_fds: Sequence[int],
                 batch_size: int, *, vnet_hdr: bool = False, udp_gso: bool = False,
                 udp_gro: bool = False, device_uso: bool = False) -> None:
        dev_fd, sock_fd = operator.index(dev_fd), operator.index(sock_fd)
        batch_size = operator.index(batch_size)
        if not 1 <= batch_size <= MAX_BATCH:
            raise ValueError(f"batch_size must be 1..{MAX_BATCH}, got {batch_size}")
        if dev_fd < 0 or sock_fd < 0:
            raise ValueError("the device fd and sock_fd must be open file descriptors")
        fds = check_tx_fds(tx_fds)
        self._dev_fd = dev_fd
        # Socket objects only to reach sendto/recvmsg_into; detached in __del__ so the caller's
        # fds are never closed by us.
        self._sock: socket.socket | None = socket.socket(fileno=sock_fd)
        self._tx_socks: list[socket.socket] = [socket.socket(fileno=fd) for fd in fds]
        self._batch_size = batch_size
        self._busy = False
        self._pending_recv_error = 0
        self._counters = [0] * len(COUNTER_NAMES)
        self._hist_inside = [0] * BATCH_BUCKETS
        self._hist_outside = [0] * BATCH_BUCKETS
        self._state = State(None)
        self._capture_on = False
        self._captured: list[tuple[int, int, bytes, float]] = []
        self._capture_time = 0.0     # wall clock at the start of the running batch (capture on)
        self._captured_bytes = 0
        self._queues: list[list[TxEntry]] = [[] for _ in range(max(1, len(fds)))]
        self._vnet_hdr = bool(vnet_hdr)
        self._gso_on = bool(udp_gso)
        self._gro_cmsg_space = _GRO_CMSG_SPACE if udp_gro else 0
        # USO (TUN_F_USO4/6): UDP superpackets come from the device, UDP runs go into it.
        self._uso = bool(device_uso) and self._vnet_hdr
        self._coalescer = (offload.Coalescer(self._LINK_HEADER_LEN, self._uso) if vnet_hdr
                           else None)
        # Segments of the batch's superpackets, laid out as the Cython kernel's arena is: one
        # buffer, each superpacket's run at the next aligned offset, so that which datagrams
        # lie back to back (and UDP GSO merges) is the same in both kernels.
        self._arena = memoryview(bytearray(offload.SEG_ARENA_BYTES if vnet_hdr else 0))
        self._arena_used = 0
        stride = HEADROOM + SLOT_SIZE
        self._inside_buf = bytearray(stride * batch_size)
        self._outside_buf = bytearray(stride * batch_size)
        self._inside_mv = memoryview(self._inside_buf)
        outside = memoryview(self._outside_buf)
        self._outside_slots = [outside[i * stride + HEADROOM:(i + 1) * stride]
                               for i in range(batch_size)]

    def __del__(self) -> None:
        for sock in [getattr(self, "_sock", None), *getattr(self, "_tx_socks", [])]:
            if sock is not None:
                sock.detach()
        self._sock = None
        self._tx_socks = []

    # --- control ---------------------------------------------------------------------------

    def counters(self) -> dict[str, int]:
        return dict(zip(COUNTER_NAMES, self._counters, strict=True))

    def peer_counters(self) -> list[tuple[int, int, int, int]]:
        return [(c[0], c[1], c[2], c[3]) for c in self._state.peer_counters]

    def peer_rx_accepted(self) -> list[int]:
        """Per peer: received datagrams that passed every check and went to the device."""
        return [c[RX_ACCEPTED] for c in self._state.peer_counters]

    def offloads(self) -> dict[str, bool]:
        """Which offloads are in use now (udp_gso turns off if the kernel refused it)."""
        return {"vnet_hdr": self._vnet_hdr, "udp_gso": self._gso_on,
                "udp_gro": bool(self._gro_cmsg_space), "device_uso": self._uso}

    def batch_histogram(self) -> tuple[list[int], list[int]]:
        return list(self._hist_inside), list(self._hist_outside)

    def set_capture(self, enabled: bool) -> None:
        """Start or stop copying packets for capture; what was copied stays until drained."""
        self._capture_on = bool(enabled)

    def drain_capture(self) -> list[tuple[int, int, bytes, float]]:
        """[(direction, peer, packet, ts)] copied since the last drain, oldest first; empties
        the buffer. direction 0 = inside (to ``peer``), 1 = outside (from ``peer``); peer -1 =
        a flood; ts = Unix time the batch that read it began."""
        if not self._captured:
            return []
        self._enter()
        try:
            out, self._captured, self._captured_bytes = self._captured, [], 0
        finally:
            self._busy = False
        return out

    def _capture(self, direction: int, peer: int, data: memoryview | bytes) -> None:
        """Hot: copy one packet for capture, or count it as not captured. Call only while
        ``_capture_on``."""
        n = len(data)
        if (len(self._captured) >= CAPTURE_RECORDS
                or n > CAPTURE_BYTES - self._captured_bytes):
            self._counters[C["capture_dropped"]] += 1
            return
        self._captured.append((direction, peer, bytes(data), self._capture_time))
        self._captured_bytes += n

    def _enter(self) -> None:
        # Batches share buffers, counters and (switched) the FDB; a second thread must not run
        # one concurrently, nor change the FDB while one runs.
        if self._busy:
            raise RuntimeError(f"{self._name}: a batch is already running (not re-entrant)")
        self._busy = True

    # --- inside: device -> underlay --------------------------------------------------------

    @staticmethod
    def _slot_start(index: int) -> int:
        """Where slot ``index``'s packet starts in the inside buffer (HEADROOM in front)."""
        return index * (HEADROOM + SLOT_SIZE) + HEADROOM

    def _slot(self, index: int, length: int, headroom: int = 0) -> memoryview:
        """Slot ``index``'s packet of ``length`` bytes, with ``headroom`` bytes in front."""
        start = self._slot_start(index)
        return self._inside_mv[start - headroom:start + length]

    def inside_batch(self) -> int:
        self._enter()
        if self._capture_on:      # the data plane's only clock, and only while capturing
            self._capture_time = time.time()
        try:
            return self._inside_batch()
        finally:
            self._busy = False

    def _inside_batch(self) -> int:
        state = self._state
        lengths: list[int] = []
        read_error = 0
        # With a virtio-net header, the read puts it in the headroom right before the packet.
        vnet_len = offload.VNET_HDR_LEN if self._vnet_hdr else 0
        while len(lengths) < self._batch_size:
            try:
                lengths.append(os.readv(self._dev_fd,
                                        [self._slot(len(lengths), SLOT_SIZE, vnet_len)]))
            except InterruptedError:
                continue
            except BlockingIOError:
                break
            except OSError as exc:
                read_error = exc.errno or errno.EIO
                break
        buf = self._inside_mv
        self._arena_used = 0
        for index, length in enumerate(lengths):
            if vnet_len:
                self._inside_offloaded(state, index, length)
            else:
                self._inside_one(state, buf, self._slot_start(index), length)
        self._flush(state)
        if lengths:
            self._hist_inside[batch_bucket(len(lengths))] += 1
        if read_error:
            raise OSError(read_error, os.strerror(read_error))
        return len(lengths)

    def _inside_one(self, state: State, buf: memoryview, start: int, length: int) -> None:
        """Hot: handle the packet ``buf[start:start + length]``; ``_OUTER_PREFIX`` bytes in
        front of it are free for the outer header."""
        raise NotImplementedError

    def _inside_offloaded(self, state: State, index: int, read_length: int) -> None:
        """Hot: a read of ``read_length`` bytes that starts with a virtio-net header: complete
        a checksum the kernel left to us, or cut a TCP superpacket into segments; each packet
        then goes through ``_inside_one``."""
        ctr = self._counters
        # A read the offload path refuses is still a read: counted as one inside packet, so
        # that inside_packets = forwarded + tx_error + the inside drops holds exactly.
        if read_length < offload.VNET_HDR_LEN:
            ctr[C["inside_packets"]] += 1
            ctr[C["inside_bad_offload"]] += 1
            return
        buf = self._inside_mv
        start = self._slot_start(index)
        length = read_length - offload.VNET_HDR_LEN
        flags, gso_type, _, gso_size, csum_start, csum_offset = offload.parse_vnet_hdr(
            buf[start - offload.VNET_HDR_LEN:start])
        gso_type &= ~offload.VNET_GSO_ECN
        if gso_type == offload.VNET_GSO_NONE:
            if flags & offload.VNET_F_NEEDS_CSUM:
                where = csum_start + csum_offset
                if where + 2 > length:
                    self._bad_offload(length)
                    return
                pkt = buf[start:start + length]
                value = offload.completed_checksum(pkt, csum_start)
                pkt[where] = value >> 8
                pkt[where + 1] = value & 0xFF
            self._inside_one(state, buf, start, length)
            return
        plan = None
        udp = gso_type == offload.VNET_GSO_UDP_L4 and self._uso
        if gso_type == offload.VNET_GSO_TCPV4:
            plan = offload.tcp4_plan(buf[start:start + length], self._LINK_HEADER_LEN, gso_size)
        elif udp:
            plan = offload.udp4_plan(buf[start:start + length], self._LINK_HEADER_LEN, gso_size)
        # Each segment with the outer-header room in front, that room ending where the
        # previous segment ends: a run of encapsulated segments is one UDP GSO buffer.
        prefix = self._OUTER_PREFIX
        need = plan.need(prefix) if plan is not None else 0
        if plan is None or need > offload.SEG_ARENA_BYTES:
            self._bad_offload(length)
            return
        if need > offload.SEG_ARENA_BYTES - self._arena_used:
            self._flush(state)          # queued datagrams point into the arena
            self._arena_used = 0
        offset = self._arena_used
        align = offload.SEG_ARENA_ALIGN
        self._arena_used += (need + align - 1) // align * align
        ctr[C["offload_udp_superpackets" if udp else "offload_superpackets"]] += 1
        ctr[C["offload_udp_segments" if udp else "offload_segments"]] += plan.nseg
        arena = self._arena
        # Straight from the read slot into the arena: the payload is copied once.
        cut = offload.segment_udp4_into if udp else offload.segment_tcp4_into
        cut(buf[start:start + length], self._LINK_HEADER_LEN, plan, arena, offset, prefix)
        for i in range(plan.nseg):
            offset += prefix
            size = plan.segment_length(i)
            self._inside_one(state, arena, offset, size)
            offset += size

    def _bad_offload(self, length: int) -> None:
        ctr = self._counters
        ctr[C["inside_packets"]] += 1
        ctr[C["inside_bytes"]] += length
        ctr[C["inside_bad_offload"]] += 1

    def _queue(self, state: State, buf: memoryview, start: int, end: int, peer: int,
               sock: int) -> None:
        """Hot: queue the datagram ``buf[start:end]`` for ``peer`` on tx socket ``sock``;
        with UDP GSO, merged into the previous entry when it continues it (spec point 3)."""
        queue = self._queues[sock]
        if self._gso_on and queue:
            last = queue[-1]
            length = end - start
            if (last.open and last.buf is buf and last.end == start and last.peer == peer
                    and length <= last.segment_size
                    and last.segment_size <= state.peer_gso_max[peer] and last.count < offload.GSO_MAX_SEGS
                    and last.end - last.start + length <= offload.GSO_MAX_BYTES):
                last.end = end
                last.count += 1
                if length < last.segment_size:
                    last.open = False       # a short datagram can only be a run's last
                return
        queue.append(TxEntry(buf, start, end, peer))
        if len(queue) >= TX_QUEUE:
            self._send(state, sock)

    def _flush(self, state: State) -> None:
        for sock in range(len(self._queues)):
            if self._queues[sock]:
                self._send(state, sock)

    @staticmethod
    def _stage_runs(state: State, queue: list[TxEntry]) -> list[TxEntry]:
        """UDP GSO for datagrams that do not lie back to back: each run of single datagrams
        to one peer (all of the first one's size, the last may be shorter) is copied into one
        staging buffer and becomes one GSO entry (as the Cython kernel's _stage_runs, which
        bounds the copies by STAGE_BYTES per send)."""
        out: list[TxEntry] = []
        used = 0
        i, n = 0, len(queue)
        while i < n:
            head = queue[i]
            first = head.end - head.start
            total, j = first, i + 1
            if head.count == 1 and first <= state.peer_gso_max[head.peer]:
                while j < n and j - i < offload.GSO_MAX_SEGS:
                    nxt = queue[j]
                    size = nxt.end - nxt.start
                    if (nxt.count != 1 or nxt.peer != head.peer or size > first
                            or total + size > offload.GSO_MAX_BYTES
                            or used + total + size > STAGE_BYTES):
                        break
                    total += size
                    j += 1
                    if size < first:
                        break
            if j - i >= 2:
                staged = memoryview(b"".join(e.buf[e.start:e.end] for e in queue[i:j]))
                entry = TxEntry(staged, 0, total, head.peer)
                entry.segment_size = first
                entry.count = j - i
                used += total
                head = entry
            head.open = False
            out.append(head)
            i = j
        return out

    def _send(self, state: State, sock_index: int) -> None:
        sock = self._tx_socks[sock_index] if self._tx_socks else self._sock
        assert sock is not None
        ctr = self._counters
        queue = self._queues[sock_index]
        if self._gso_on and len(queue) > 1:
            queue = self._stage_runs(state, queue)
        for entry in queue:
            peer = entry.peer
            address = state.peer_addr[peer]
            data = entry.buf[entry.start:entry.end]
            # An entry merged before GSO was turned off still goes as one send first (the
            # Cython kernel has already built its cmsg).
            if entry.count > 1:
                try:
                    sock.sendmsg([data], [(socket.SOL_UDP, offload.UDP_SEGMENT,
                                           struct.pack("=H", entry.segment_size))],
                                 socket.MSG_DONTWAIT, address)
                except OSError as exc:
                    ctr[C["offload_gso_refused"]] += 1
                    size = entry.segment_size
                    if exc.errno in GSO_DID_NOT_FIT_ERRORS and size > GSO_FLOOR:
                        state.peer_gso_max[peer] = min(state.peer_gso_max[peer], size - 1)
                    elif exc.errno in GSO_UNSUPPORTED_ERRORS:
                        self._gso_on = False
                else:
                    ctr[C["offload_gso_sends"]] += 1
                    ctr[C["forwarded_packets"]] += entry.count
                    counts = state.peer_counters[peer]
                    counts[TX_PACKETS] += entry.count
                    counts[TX_BYTES] += len(data) - entry.count * self._OUTER_PREFIX
                    continue
            # One datagram, or a merged entry GSO did not take: datagram by datagram.
            size = entry.segment_size
            for offset in range(0, len(data), size):
                datagram = data[offset:offset + size]
                try:
                    sock.sendto(datagram, socket.MSG_DONTWAIT, address)
                except OSError:
                    ctr[C["tx_error"]] += 1
                    continue
                ctr[C["forwarded_packets"]] += 1
                counts = state.peer_counters[peer]
                counts[TX_PACKETS] += 1
                counts[TX_BYTES] += len(datagram) - self._OUTER_PREFIX
        self._queues[sock_index].clear()

    def _write_device(self, data: memoryview | bytes) -> bool:
        """Write one packet we made (an ICMP error) or deliver (no vnet_hdr) into the device;
        whether the device took it (the caller counts a refusal)."""
        try:
            if self._vnet_hdr:
                os.writev(self._dev_fd, [offload.ZERO_VNET_HDR, data])
            else:
                os.write(self._dev_fd, data)
        except OSError:
            return False
        return True

    def _deliver_to_device(self, pkt: memoryview, peer: int) -> None:
        """Hot: write a checked packet/frame from ``peer`` into the device - with vnet_hdr,
        hand it to the coalescer, written when the outside batch ends. A checksum a kernel
        VTEP left unfinished is finished first (offload.finish_partial_in_place)."""
        if offload.finish_partial_in_place(pkt, self._LINK_HEADER_LEN):
            self._counters[C["offload_checksums_finished"]] += 1
        self._state.peer_counters[peer][RX_ACCEPTED] += 1
        coalescer = self._coalescer
        if coalescer is not None:
            if self._capture_on:
                self._capture(1, peer, pkt)
            if coalescer.full:
                self._flush_device()
            coalescer.add(pkt)
            return
        if self._write_device(pkt):
            self._counters[C["delivered_packets"]] += 1
            if self._capture_on:
                self._capture(1, peer, pkt)
        else:
            self._counters[C["device_write_error"]] += 1

    def _flush_device(self) -> None:
        """Write what the coalescer holds; each write counts for the segments in it."""
        assert self._coalescer is not None
        ctr = self._counters
        for header, data, segments in self._coalescer.flush():
            try:
                os.writev(self._dev_fd, [header, data])
            except OSError:
                ctr[C["device_write_error"]] += segments
                continue
            ctr[C["delivered_packets"]] += segments
            if segments > 1 and header[1] == offload.VNET_GSO_UDP_L4:
                ctr[C["offload_udp_coalesced_writes"]] += 1
                ctr[C["offload_udp_coalesced_segments"]] += segments
            elif segments > 1:
                ctr[C["offload_coalesced_writes"]] += 1
                ctr[C["offload_coalesced_segments"]] += segments

    # --- outside: underlay -> device -------------------------------------------------------

    def outside_batch(self) -> int:
        self._enter()
        if self._capture_on:
            self._capture_time = time.time()
        try:
            return self._outside_batch()
        finally:
            self._busy = False

    def _outside_batch(self) -> int:
        assert self._sock is not None
        if self._pending_recv_error:
            # recvmmsg reports an error met after some datagrams on the following call.
            error, self._pending_recv_error = self._pending_recv_error, 0
            return self._recv_failed(error)
        received: list[tuple[int, int, object, int]] = []
        slots = self._outside_slots
        cmsg_space = self._gro_cmsg_space
        while len(received) < self._batch_size:
            try:
                nbytes, ancdata, flags, address = self._sock.recvmsg_into(
                    [slots[len(received)]], cmsg_space, socket.MSG_DONTWAIT)
            except BlockingIOError:
                break
            except OSError as exc:
                error = exc.errno or errno.EIO
                if not received:
                    return self._recv_failed(error)
                self._pending_recv_error = error
                break
            gro_size = _gro_segment_size(ancdata) if cmsg_space else 0
            if gro_size < 0 or (gro_size == 0 and cmsg_space and flags & socket.MSG_CTRUNC):
                # No whole UDP_GRO cmsg, and the control message was cut short: the run's
                # datagram boundaries are unknown, so it is dropped as truncated rather than
                # handled as one datagram.
                flags |= socket.MSG_TRUNC
                gro_size = 0
            received.append((nbytes, flags, address, gro_size))
        state = self._state
        ctr = self._counters
        for slot, (nbytes, flags, address, gro_size) in enumerate(received):
            pkt = slots[slot][:nbytes]
            if gro_size and nbytes > gro_size and not flags & socket.MSG_TRUNC:
                # A run of datagrams UDP GRO received as one: each as if received alone.
                ctr[C["offload_gro_receives"]] += 1
                for offset in range(0, nbytes, gro_size):
                    self._outside_one(state, pkt[offset:offset + gro_size], flags, address)
            else:
                self._outside_one(state, pkt, flags, address)
        if self._coalescer is not None:
            self._flush_device()
        if received:
            self._hist_outside[batch_bucket(len(received))] += 1
        return len(received)

    @staticmethod
    def _recv_failed(error: int) -> int:
        if error in TRANSIENT_RECV_ERRORS:
            return 0
        raise OSError(error, os.strerror(error))

    def _outside_one(self, state: State, pkt: memoryview, flags: int, address: object) -> None:
        raise NotImplementedError

    def _outside_vxlan(self, state: State, pkt: memoryview, flags: int, address: object,
                       vni: int) -> tuple[int, memoryview | None]:
        """Hot: (peer, inner Ethernet frame) of a VXLAN datagram for ``vni``; frame None when
        dropped and counted (truncated, unknown peer, short, I flag clear, another VNI)."""
        peer = self._outside_peer(state, pkt, flags, address)
        if peer < 0:
            return peer, None
        reason = vxlan.check(pkt, vni, ethernet.HEADER_LEN)
        if reason is not None:
            self._counters[_VXLAN_DROP[reason]] += 1
            return peer, None
        return peer, pkt[vxlan.HEADER_LEN:]

    def _outside_peer(self, state: State, pkt: memoryview, flags: int, address: object) -> int:
        """Hot: count a received datagram; the index of the peer it came from, or -1 (dropped
        as truncated or from an unknown source, and counted)."""
        ctr = self._counters
        ctr[C["outside_packets"]] += 1
        ctr[C["outside_bytes"]] += len(pkt)
        if flags & socket.MSG_TRUNC:
            ctr[C["outside_truncated"]] += 1
            return -1
        peer = -1
        if isinstance(address, tuple) and len(address) == 2:
            source_ip = int.from_bytes(socket.inet_aton(address[0]), "big")
            peer = state.peer_by_ip.get(source_ip, -1)
        if peer < 0:
            ctr[C["outside_unknown_peer"]] += 1
            return -1
        counts = state.peer_counters[peer]
        counts[RX_PACKETS] += 1
        counts[RX_BYTES] += max(0, len(pkt) - self._OUTER_PREFIX)
        return peer


def _gro_segment_size(ancdata: list[tuple[int, int, bytes]]) -> int:
    """The segment size a UDP_GRO control message gives, 0 when there is none, or -1 when
    it is too short to hold its int."""
    for level, kind, data in ancdata:
        if level == socket.SOL_UDP and kind == offload.UDP_GRO:
            if len(data) < _GRO_SIZE.size:
                return -1
            return max(0, _GRO_SIZE.unpack_from(data)[0])
    return 0


class RoutedForwarderBase(ForwarderBase):
    """The router shared by the routed paths (udp, vxlan routed) over a tun device."""

    def __init__(self, tun_fd: int, sock_fd: int, tx_fds: Sequence[int], batch_size: int,
                 icmp_burst: int, *, vnet_hdr: bool = False, udp_gso: bool = False,
                 udp_gro: bool = False, device_uso: bool = False) -> None:
        icmp_burst = operator.index(icmp_burst)
        if icmp_burst < 0:
            raise ValueError(f"icmp_burst must be >= 0, got {icmp_burst}")
        super().__init__(tun_fd, sock_fd, tx_fds, batch_size, vnet_hdr=vnet_hdr,
                         udp_gso=udp_gso, udp_gro=udp_gro,
                         device_uso=device_uso)
        self._tokens = icmp_burst

    def set_tables(self, tables: Any) -> None:
        """Build the new state on the side, then swap it in with one assignment."""
        self.commit_tables(self.prepare_tables(tables))

    def prepare_tables(self, tables: Any) -> State:
        """set_tables' first half (the Cython kernel's threads engine builds while forwarding)."""
        return self._check_tables(State(tables))

    def commit_tables(self, state: State) -> None:
        """set_tables' second half: carry the counters over and swap."""
        state.inherit_counters(self._state)
        self._state = state

    def _check_tables(self, state: State) -> State:
        return state

    def add_icmp_tokens(self, n: int, cap: int) -> None:
        n, cap = operator.index(n), operator.index(cap)
        if n < 0 or cap < 0:
            raise ValueError("add_icmp_tokens: n and cap must be >= 0")
        self._tokens = min(cap, self._tokens + n)

    def _route(self, state: State, pkt: memoryview) -> int:
        """Hot: route one IPv4 packet read from the device; return the peer to send it to
        (after decrementing its TTL in place) or -1 (dropped, counted, maybe answered)."""
        ctr = self._counters
        length = len(pkt)
        ctr[C["inside_packets"]] += 1
        ctr[C["inside_bytes"]] += length
        reason = ipv4.validate(pkt)
        if reason is not None:
            ctr[_INSIDE_DROP[reason]] += 1
            return -1
        # Martians go nowhere and are never answered (RFC 1812 5.3.7, 4.3.2.7).
        if martian(ipv4.source(pkt)):
            ctr[C["inside_martian_source"]] += 1
            return -1
        if martian(ipv4.destination(pkt)):
            ctr[C["inside_martian_destination"]] += 1
            return -1
        target = state.routes.lookup(ipv4.destination(pkt))
        if target == NO_ROUTE:
            ctr[C["inside_no_route"]] += 1
            self._icmp(state, pkt, icmp.DEST_UNREACHABLE, icmp.CODE_NET_UNREACHABLE)
            return -1
        if target == LOCAL:
            ctr[C["inside_local_destination"]] += 1
            self._icmp(state, pkt, icmp.DEST_UNREACHABLE, icmp.CODE_HOST_UNREACHABLE)
            return -1
        ttl = ipv4.ttl(pkt)
        if ttl <= 1:
            ctr[C["inside_ttl_expired"]] += 1
            self._icmp(state, pkt, icmp.TIME_EXCEEDED, icmp.CODE_TTL_EXCEEDED)
            return -1
        mtu = state.peer_mtu[target]
        if ipv4.dont_fragment(pkt) and length > mtu:
            ctr[C["inside_too_big"]] += 1
            self._icmp(state, pkt, icmp.DEST_UNREACHABLE, icmp.CODE_FRAGMENTATION_NEEDED, mtu)
            return -1
        csum = ipv4.ttl_decrement_checksum(ipv4.header_checksum(pkt), ttl, ipv4.protocol(pkt))
        pkt[ipv4.OFF_TTL] = ttl - 1
        pkt[ipv4.OFF_CHECKSUM] = csum >> 8
        pkt[ipv4.OFF_CHECKSUM + 1] = csum & 0xFF
        return target

    def _icmp(self, state: State, pkt: memoryview, icmp_type: int, code: int,
              mtu: int = 0) -> None:
        ctr = self._counters
        if not icmp.icmp_error_allowed(pkt):
            return
        if self._tokens <= 0:
            ctr[C["icmp_rate_limited"]] += 1
            return
        self._tokens -= 1
        if self._write_device(icmp.build_icmp_error(state.local_address, pkt, icmp_type, code,
                                                    mtu)):
            ctr[C["icmp_sent"]] += 1
        else:
            # Not device_write_error: that one counts delivered packets the device refused.
            ctr[C["icmp_write_error"]] += 1

    def _deliver(self, state: State, pkt: memoryview, peer: int) -> None:
        """Hot: check an inner IPv4 packet from ``peer`` and write it into the device."""
        ctr = self._counters
        reason = ipv4.validate(pkt, verify_checksum=True)
        if reason is not None:
            ctr[_OUTSIDE_DROP[reason]] += 1
            return
        source = ipv4.source(pkt)
        # Before the prefix checks: a peer owning 0.0.0.0/0 owns every martian too.
        if martian(source):
            ctr[C["outside_martian_source"]] += 1
            return
        if source in state.host_addresses:
            ctr[C["outside_local_source"]] += 1
            return
        if state.routes.lookup(source) != peer:
            ctr[C["outside_spoofed_source"]] += 1
            return
        if martian(ipv4.destination(pkt)):
            ctr[C["outside_martian_destination"]] += 1
            return
        if state.routes.lookup(ipv4.destination(pkt)) != LOCAL:
            ctr[C["outside_not_for_us"]] += 1
            return
        self._deliver_to_device(pkt, peer)
