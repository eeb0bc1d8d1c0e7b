"""Routed ``udp`` data path (flannel's udp backend), pure-Python twin of the Cython kernel.

Inside (device -> underlay), one ``inside_batch`` call:
  1. read up to batch_size packets from the tun fd into preallocated slots (stop at EAGAIN);
  2. per packet, in order: validate the IPv4 header; look up the destination (no route ->
     net unreachable, our own prefix -> host unreachable); TTL <= 1 -> time exceeded; DF and
     longer than the peer's path MTU -> fragmentation needed; else TTL-1, incremental checksum
     fix, queue the packet (in place, no copy) for its peer;
  3. send the queue (the Cython kernel: one sendmmsg); a refused datagram is a tx_error and
     the rest still go;
  4. a read error other than EAGAIN/EINTR is raised only after the packets read before it went.
Outside (underlay -> device), one ``outside_batch`` call:
  1. one non-blocking receive of up to batch_size datagrams;
  2. per datagram: truncated? from a known peer (by source IP)? a valid IPv4 packet with a
     right header checksum? inner source routed to that same peer (anti-spoofing)? inner
     destination ours? then write it to the device unchanged.

Invariants: the UDP payload is the inner IPv4 packet byte for byte; every packet is counted
exactly once as forwarded, delivered or under one drop reason; ICMP errors go only into the
device, never to the underlay, quote the packet as received and obey RFC 1812 4.3.2.7 and the
token bucket; the fds belong to the caller and are never closed here; tables are swapped whole.
"""

from __future__ import annotations

import errno
import operator
import os
import socket
from typing import Final

from overlayd.dataplane.counters import BATCH_BUCKETS, COUNTER_INDEX, COUNTER_NAMES
from overlayd.dataplane.route_table import RouteTable
from overlayd.dataplane.tables import LOCAL, NO_ROUTE, ForwardingTables
from overlayd.wire import icmp, ipv4

IMPLEMENTATION: Final = "python"

HEADROOM: Final = 64          # bytes before each packet, for outer headers of encapsulating paths
SLOT_SIZE: Final = 65536      # any IPv4 packet (total length is 16 bits) fits one slot
MAX_BATCH: Final = 512

# Receive errors that say something about one earlier datagram or a passing state of the
# underlay, not about the socket: the next readiness event may well succeed.
TRANSIENT_RECV_ERRORS: Final = frozenset({
    errno.EAGAIN, errno.EWOULDBLOCK, errno.EINTR, errno.ECONNREFUSED, errno.ECONNRESET,
    errno.EHOSTUNREACH, errno.EHOSTDOWN, errno.ENETUNREACH, errno.ENETDOWN, errno.ENOBUFS,
    errno.ENOMEM, errno.EMSGSIZE, errno.ETIMEDOUT, errno.EPROTO,
})

_C = COUNTER_INDEX
_INSIDE_DROP: Final = {
    ipv4.TOO_SHORT: _C["inside_too_short"],
    ipv4.NOT_IPV4: _C["inside_not_ipv4"],
    ipv4.BAD_HEADER: _C["inside_bad_header"],
    ipv4.LENGTH_MISMATCH: _C["inside_bad_header"],
}
_OUTSIDE_DROP: Final = {
    ipv4.TOO_SHORT: _C["outside_too_short"],
    ipv4.NOT_IPV4: _C["outside_not_ipv4"],
    ipv4.BAD_HEADER: _C["outside_bad_header"],
    ipv4.LENGTH_MISMATCH: _C["outside_length_mismatch"],
    ipv4.BAD_CHECKSUM: _C["outside_bad_checksum"],
}
# Per-peer counter positions.
_TX_PACKETS, _TX_BYTES, _RX_PACKETS, _RX_BYTES = range(4)


def batch_bucket(n: int) -> int:
    """Histogram bucket of a batch of n >= 1 packets: 2**(i-1) < n <= 2**i."""
    return (n - 1).bit_length()


class _State:
    """One generation of forwarding state; replaced whole by set_tables, never mutated except
    for its per-peer counters."""

    __slots__ = (
        "local_address",
        "peer_addr",
        "peer_by_ip",
        "peer_counters",
        "peer_keys",
        "peer_mtu",
        "routes",
    )

    def __init__(self, tables: ForwardingTables | None) -> None:
        peers = tables.peers if tables is not None else ()
        routes = tables.routes if tables is not None else ()
        local_address = tables.local_address if tables is not None else 0
        self.local_address: int = operator.index(local_address)
        if not 0 <= self.local_address <= 0xFFFFFFFF:
            raise ValueError(f"local_address {local_address!r} is not a u32 IPv4 address")
        self.peer_keys: list[tuple[int, int]] = []
        self.peer_mtu: list[int] = []
        self.peer_addr: list[tuple[str, int]] = []
        self.peer_by_ip: dict[int, int] = {}
        for index, peer in enumerate(peers):
            ip, port, mtu = (operator.index(v) for v in (peer.ip, peer.port, peer.path_mtu))
            _check_peer(index, ip, port, mtu)
            self.peer_keys.append((ip, port))
            self.peer_mtu.append(mtu)
            self.peer_addr.append((ipv4.int_to_addr(ip), port))
            self.peer_by_ip.setdefault(ip, index)  # several ports on one IP: the first wins
        self.routes = RouteTable(routes)
        for network, prefix_len, target in routes:
            if target >= len(self.peer_keys):
                raise ValueError(
                    f"route {ipv4.int_to_addr(network)}/{prefix_len}: target {target} is not "
                    f"a peer index (there are {len(self.peer_keys)} peers)"
                )
        self.peer_counters: list[list[int]] = [[0, 0, 0, 0] for _ in self.peer_keys]

    def inherit_counters(self, old: _State) -> None:
        """Per-peer counters follow the peer's (ip, port) across a table swap."""
        by_key: dict[tuple[int, int], list[int]] = {}
        for key, counts in zip(old.peer_keys, old.peer_counters, strict=True):
            by_key.setdefault(key, counts)
        for index, key in enumerate(self.peer_keys):
            inherited = by_key.pop(key, None)   # pop: a duplicate (ip, port) starts at zero
            if inherited is not None:
                self.peer_counters[index] = list(inherited)


def _check_peer(index: int, ip: int, port: int, mtu: int) -> None:
    if not 0 <= ip <= 0xFFFFFFFF:
        raise ValueError(f"peer {index}: ip {ip!r} is not a u32 IPv4 address")
    if not 0 <= port <= 0xFFFF:
        raise ValueError(f"peer {index}: port {port!r} out of range")
    if not 0 <= mtu <= 0xFFFFFFFF:
        raise ValueError(f"peer {index}: path_mtu {mtu!r} out of range")


class UdpForwarder:
    """The routed udp data path over a tun fd and a UDP socket fd, both owned by the caller.

    Drive it from one thread: ``inside_batch`` when the tun fd is readable, ``outside_batch``
    when the socket is, ``add_icmp_tokens`` from a timer, ``set_tables`` on map changes.
    """

    def __init__(self, tun_fd: int, sock_fd: int, batch_size: int = 64,
                 icmp_burst: int = 100) -> None:
        tun_fd, sock_fd = operator.index(tun_fd), operator.index(sock_fd)
        batch_size, icmp_burst = operator.index(batch_size), operator.index(icmp_burst)
        if not 1 <= batch_size <= MAX_BATCH:
            raise ValueError(f"batch_size must be 1..{MAX_BATCH}, got {batch_size}")
        if tun_fd < 0 or sock_fd < 0:
            raise ValueError("tun_fd and sock_fd must be open file descriptors")
        if icmp_burst < 0:
            raise ValueError(f"icmp_burst must be >= 0, got {icmp_burst}")
        self._tun_fd = tun_fd
        # A socket object only to reach sendto/recvmsg_into; detached in __del__ so the caller's
        # fd is never closed by us.
        self._sock: socket.socket | None = socket.socket(fileno=sock_fd)
        self._batch_size = batch_size
        self._tokens = icmp_burst
        self._busy = False
        self._pending_recv_error = 0
        self._counters = [0] * len(COUNTER_NAMES)
        self._hist_inside = [0] * BATCH_BUCKETS
        self._hist_outside = [0] * BATCH_BUCKETS
        self._state = _State(None)
        stride = HEADROOM + SLOT_SIZE
        self._inside_buf = bytearray(stride * batch_size)
        self._outside_buf = bytearray(stride * batch_size)
        inside, outside = memoryview(self._inside_buf), memoryview(self._outside_buf)
        self._inside_slots = [inside[i * stride + HEADROOM:(i + 1) * stride]
                              for i in range(batch_size)]
        self._outside_slots = [outside[i * stride + HEADROOM:(i + 1) * stride]
                               for i in range(batch_size)]

    def __del__(self) -> None:
        sock = getattr(self, "_sock", None)
        if sock is not None:
            sock.detach()
            self._sock = None

    # --- control ---------------------------------------------------------------------------

    def set_tables(self, tables: ForwardingTables) -> None:
        """Build the new state on the side, then swap it in with one assignment."""
        state = _State(tables)
        state.inherit_counters(self._state)
        self._state = state

    def add_icmp_tokens(self, n: int, cap: int) -> None:
        n, cap = operator.index(n), operator.index(cap)
        if n < 0 or cap < 0:
            raise ValueError("add_icmp_tokens: n and cap must be >= 0")
        self._tokens = min(cap, self._tokens + n)

    def counters(self) -> dict[str, int]:
        return dict(zip(COUNTER_NAMES, self._counters, strict=True))

    def peer_counters(self) -> list[tuple[int, int, int, int]]:
        return [(c[0], c[1], c[2], c[3]) for c in self._state.peer_counters]

    def batch_histogram(self) -> tuple[list[int], list[int]]:
        return list(self._hist_inside), list(self._hist_outside)

    # --- inside: device -> underlay --------------------------------------------------------

    def inside_batch(self) -> int:
        self._enter()
        try:
            return self._inside_batch()
        finally:
            self._busy = False

    def _inside_batch(self) -> int:
        state, slots = self._state, self._inside_slots
        lengths: list[int] = []
        read_error = 0
        while len(lengths) < self._batch_size:
            try:
                lengths.append(os.readv(self._tun_fd, [slots[len(lengths)]]))
            except InterruptedError:
                continue
            except BlockingIOError:
                break
            except OSError as exc:
                read_error = exc.errno or errno.EIO
                break
        queued: list[tuple[int, int, int]] = []   # (slot, length, peer)
        for slot, length in enumerate(lengths):
            peer = self._inside_one(state, slots[slot][:length])
            if peer >= 0:
                queued.append((slot, length, peer))
        self._send(state, queued)
        if lengths:
            self._hist_inside[batch_bucket(len(lengths))] += 1
        if read_error:
            raise OSError(read_error, os.strerror(read_error))
        return len(lengths)

    def _inside_one(self, state: _State, pkt: memoryview) -> int:
        """Hot: classify one packet; return the peer to send it to (after fixing TTL) or -1."""
        ctr = self._counters
        length = len(pkt)
        ctr[_C["inside_packets"]] += 1
        ctr[_C["inside_bytes"]] += length
        reason = ipv4.validate(pkt)
        if reason is not None:
            ctr[_INSIDE_DROP[reason]] += 1
            return -1
        target = state.routes.lookup(ipv4.destination(pkt))
        if target == NO_ROUTE:
            ctr[_C["inside_no_route"]] += 1
            self._icmp(state, pkt, icmp.DEST_UNREACHABLE, icmp.CODE_NET_UNREACHABLE)
            return -1
        if target == LOCAL:
            ctr[_C["inside_local_destination"]] += 1
            self._icmp(state, pkt, icmp.DEST_UNREACHABLE, icmp.CODE_HOST_UNREACHABLE)
            return -1
        ttl = ipv4.ttl(pkt)
        if ttl <= 1:
            ctr[_C["inside_ttl_expired"]] += 1
            self._icmp(state, pkt, icmp.TIME_EXCEEDED, icmp.CODE_TTL_EXCEEDED)
            return -1
        mtu = state.peer_mtu[target]
        if ipv4.dont_fragment(pkt) and length > mtu:
            ctr[_C["inside_too_big"]] += 1
            self._icmp(state, pkt, icmp.DEST_UNREACHABLE, icmp.CODE_FRAGMENTATION_NEEDED, mtu)
            return -1
        csum = ipv4.ttl_decrement_checksum(ipv4.header_checksum(pkt), ttl, ipv4.protocol(pkt))
        pkt[ipv4.OFF_TTL] = ttl - 1
        pkt[ipv4.OFF_CHECKSUM] = csum >> 8
        pkt[ipv4.OFF_CHECKSUM + 1] = csum & 0xFF
        return target

    def _send(self, state: _State, queued: list[tuple[int, int, int]]) -> None:
        assert self._sock is not None
        ctr, slots = self._counters, self._inside_slots
        for slot, length, peer in queued:
            try:
                self._sock.sendto(slots[slot][:length], socket.MSG_DONTWAIT,
                                  state.peer_addr[peer])
            except OSError:
                ctr[_C["tx_error"]] += 1
                continue
            ctr[_C["forwarded_packets"]] += 1
            counts = state.peer_counters[peer]
            counts[_TX_PACKETS] += 1
            counts[_TX_BYTES] += length

    def _icmp(self, state: _State, pkt: memoryview, icmp_type: int, code: int,
              mtu: int = 0) -> None:
        ctr = self._counters
        if not icmp.icmp_error_allowed(pkt):
            return
        if self._tokens <= 0:
            ctr[_C["icmp_rate_limited"]] += 1
            return
        self._tokens -= 1
        message = icmp.build_icmp_error(state.local_address, pkt, icmp_type, code, mtu)
        try:
            os.write(self._tun_fd, message)
        except OSError:
            ctr[_C["device_write_error"]] += 1
        else:
            ctr[_C["icmp_sent"]] += 1

    # --- outside: underlay -> device -------------------------------------------------------

    def outside_batch(self) -> int:
        self._enter()
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
        received: list[tuple[int, int, object]] = []
        slots = self._outside_slots
        while len(received) < self._batch_size:
            try:
                nbytes, _, flags, address = self._sock.recvmsg_into(
                    [slots[len(received)]], 0, socket.MSG_DONTWAIT)
            except BlockingIOError:
                break
            except OSError as exc:
                error = exc.errno or errno.EIO
                if not received:
                    return self._recv_failed(error)
                self._pending_recv_error = error
                break
            received.append((nbytes, flags, address))
        state = self._state
        for slot, (nbytes, flags, address) in enumerate(received):
            self._outside_one(state, slots[slot][:nbytes], flags, address)
        if received:
            self._hist_outside[batch_bucket(len(received))] += 1
        return len(received)

    @staticmethod
    def _recv_failed(error: int) -> int:
        if error in TRANSIENT_RECV_ERRORS:
            return 0
        raise OSError(error, os.strerror(error))

    def _outside_one(self, state: _State, pkt: memoryview, flags: int, address: object) -> None:
        """Hot: check one received datagram and deliver its inner packet or count the drop."""
        ctr = self._counters
        ctr[_C["outside_packets"]] += 1
        ctr[_C["outside_bytes"]] += len(pkt)
        if flags & socket.MSG_TRUNC:
            ctr[_C["outside_truncated"]] += 1
            return
        peer = -1
        if isinstance(address, tuple) and len(address) == 2:
            source_ip = int.from_bytes(socket.inet_aton(address[0]), "big")
            peer = state.peer_by_ip.get(source_ip, -1)
        if peer < 0:
            ctr[_C["outside_unknown_peer"]] += 1
            return
        counts = state.peer_counters[peer]
        counts[_RX_PACKETS] += 1
        counts[_RX_BYTES] += len(pkt)
        reason = ipv4.validate(pkt, verify_checksum=True)
        if reason is not None:
            ctr[_OUTSIDE_DROP[reason]] += 1
            return
        if state.routes.lookup(ipv4.source(pkt)) != peer:
            ctr[_C["outside_spoofed_source"]] += 1
            return
        if state.routes.lookup(ipv4.destination(pkt)) != LOCAL:
            ctr[_C["outside_not_for_us"]] += 1
            return
        try:
            os.write(self._tun_fd, pkt)
        except OSError:
            ctr[_C["device_write_error"]] += 1
        else:
            ctr[_C["delivered_packets"]] += 1

    def _enter(self) -> None:
        # Batches share buffers and counters; a second thread must not run one concurrently.
        if self._busy:
            raise RuntimeError("UdpForwarder: a batch is already running (not re-entrant)")
        self._busy = True
