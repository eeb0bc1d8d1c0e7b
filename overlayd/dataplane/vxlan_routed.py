"""Routed ``vxlan`` data path (flannel's vxlan backend), pure-Python twin of
cext/vxlan_routed.pxi.

The router is the udp path's (forwarder_base.RoutedForwarderBase); only the encapsulation
differs. On the wire (RFC 7348): outer IPv4/UDP to the peer's VXLAN port, the 8-byte VXLAN
header with our VNI, an inner Ethernet header built here (destination: the peer's VTEP MAC,
which a kernel flannel.1 requires; source: ours; type IPv4), then the IP packet.

Inside (tun -> underlay), per packet: route as the udp path does (LPM, TTL, ICMP errors,
frag-needed against the peer's path MTU = underlay - 50); write VXLAN + Ethernet into the
slot's headroom (no copy of the packet); queue it on tx socket ``flow_hash % len(tx_fds)``
so one inner flow always leaves from one source port and different flows spread.
Outside (underlay -> tun), per datagram: known peer; VXLAN header (long enough, I flag, our
VNI); inner Ethernet (destination our VTEP MAC or broadcast, type IPv4); trim Ethernet
padding of short frames; then the udp path's IPv4 checks (checksum, source in the sending
peer's prefixes, destination ours) and write the IP packet into the device.

Invariants: as the udp path's; and every peer has a 6-byte VTEP MAC (set_tables refuses
tables without one).
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from typing import Final

from overlayd.dataplane.forwarder_base import C, RoutedForwarderBase, State
from overlayd.wire import ethernet, ipv4, vxlan

IMPLEMENTATION: Final = "python"
_ENCAP: Final = vxlan.ROUTED_ENCAP_LEN


def check_mac(mac: bytes, what: str) -> bytes:
    mac = bytes(mac)
    if len(mac) != 6:
        raise ValueError(f"{what} must be 6 bytes, got {len(mac)}")
    return mac


def check_vni(vni: int) -> int:
    vni = operator.index(vni)
    if not 0 <= vni <= vxlan.MAX_VNI:
        raise ValueError(f"vni must be 0..{vxlan.MAX_VNI}, got {vni}")
    return vni


class VxlanRoutedForwarder(RoutedForwarderBase):
    """The routed vxlan data path over a tun fd and UDP socket fds, all owned by the caller.

    ``mac`` is our VTEP MAC (6 bytes), ``vni`` our VXLAN network identifier; ``tx_fds`` are
    the sockets datagrams leave from, chosen by flow hash (empty: the receive socket).
    """

    _name = "VxlanRoutedForwarder"
    _LINK_HEADER_LEN = 0        # tun
    _OUTER_PREFIX = _ENCAP      # VXLAN + inner Ethernet

    def __init__(self, tun_fd: int, sock_fd: int, mac: bytes, vni: int = 1,
                 tx_fds: Sequence[int] = (), batch_size: int = 64,
                 icmp_burst: int = 100, *, vnet_hdr: bool = False, udp_gso: bool = False,
                 udp_gro: bool = False, device_uso: bool = False) -> None:
        self._mac = check_mac(mac, "mac")
        self._vni = check_vni(vni)
        self._vxlan_header = vxlan.build_header(self._vni)
        super().__init__(tun_fd, sock_fd, tx_fds, batch_size, icmp_burst, vnet_hdr=vnet_hdr,
                         udp_gso=udp_gso, udp_gro=udp_gro,
                         device_uso=device_uso)

    def _check_tables(self, state: State) -> State:
        for index, mac in enumerate(state.peer_mac):
            check_mac(mac, f"peer {index}: mac")
        return state

    def _inside_one(self, state: State, buf: memoryview, start: int, length: int) -> None:
        """Hot: route one packet, put VXLAN + Ethernet in front of it, queue it."""
        pkt = buf[start:start + length]
        peer = self._route(state, pkt)
        if peer < 0:
            return
        if self._capture_on:
            self._capture(0, peer, pkt)
        datagram = buf[start - _ENCAP:start + length]
        datagram[:vxlan.HEADER_LEN] = self._vxlan_header
        datagram[8:14] = state.peer_mac[peer]
        datagram[14:20] = self._mac
        datagram[20] = ethernet.ETHERTYPE_IPV4 >> 8
        datagram[21] = ethernet.ETHERTYPE_IPV4 & 0xFF
        nsocks = len(self._queues)
        sock = vxlan.flow_hash_ipv4(pkt) % nsocks if nsocks > 1 else 0
        self._queue(state, buf, start - _ENCAP, start + length, peer, sock)

    def _outside_one(self, state: State, pkt: memoryview, flags: int, address: object) -> None:
        """Hot: check the VXLAN and Ethernet headers, then the inner packet; deliver it."""
        peer, frame = self._outside_vxlan(state, pkt, flags, address, self._vni)
        if frame is None:
            return
        ctr = self._counters
        dst = frame[:6]
        if dst != self._mac and dst != ethernet.BROADCAST:
            ctr[C["outside_wrong_inner_mac"]] += 1
            return
        if ethernet.ethertype(frame) != ethernet.ETHERTYPE_IPV4:
            ctr[C["outside_not_ipv4"]] += 1
            return
        inner = frame[ethernet.HEADER_LEN:]
        if len(inner) <= ethernet.MIN_PAYLOAD and len(inner) >= ipv4.HEADER_MIN_LEN:
            # A short frame may carry Ethernet padding after the packet: trust total length.
            total = ipv4.total_length(inner)
            if ipv4.HEADER_MIN_LEN <= total < len(inner):
                inner = inner[:total]
        self._deliver(state, inner, peer)
