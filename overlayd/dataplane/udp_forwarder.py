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
Batching, queues, ICMP and the IPv4 checks live in forwarder_base.py (shared with vxlan), and
so do the offloads (virtio-net header, TSO segments, UDP GSO/GRO, coalesced writes: point 6).
"""

from __future__ import annotations

from typing import Final

from overlayd.dataplane.forwarder_base import RoutedForwarderBase, State

IMPLEMENTATION: Final = "python"


class UdpForwarder(RoutedForwarderBase):
    """The routed udp data path over a tun fd and a UDP socket fd, both owned by the caller.

    Drive it from one thread: ``inside_batch`` when the tun fd is readable, ``outside_batch``
    when the socket is, ``add_icmp_tokens`` from a timer, ``set_tables`` on map changes.
    """

    _name = "UdpForwarder"
    _LINK_HEADER_LEN = 0    # tun
    _OUTER_PREFIX = 0       # the datagram is the packet

    def __init__(self, tun_fd: int, sock_fd: int, batch_size: int = 64,
                 icmp_burst: int = 100, *, vnet_hdr: bool = False, udp_gso: bool = False,
                 udp_gro: bool = False, device_uso: bool = False) -> None:
        super().__init__(tun_fd, sock_fd, (), batch_size, icmp_burst, vnet_hdr=vnet_hdr,
                         udp_gso=udp_gso, udp_gro=udp_gro,
                         device_uso=device_uso)

    def _inside_one(self, state: State, buf: memoryview, start: int, length: int) -> None:
        """Hot: route one packet and queue it, unchanged but for its TTL."""
        pkt = buf[start:start + length]
        peer = self._route(state, pkt)
        if peer >= 0:
            if self._capture_on:
                self._capture(0, peer, pkt)
            self._queue(state, buf, start, start + length, peer, 0)

    def _outside_one(self, state: State, pkt: memoryview, flags: int, address: object) -> None:
        """Hot: the datagram is the inner packet; check it and deliver it."""
        peer = self._outside_peer(state, pkt, flags, address)
        if peer >= 0:
            self._deliver(state, pkt, peer)
