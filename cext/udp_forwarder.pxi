# Routed ``udp`` data path (flannel's udp backend). Twin: overlayd/dataplane/udp_forwarder.py.
#
# Inside (device -> underlay), one inside_batch() call, GIL released throughout:
#   1. read() up to batch_size packets from the tun fd into preallocated slots;
#   2. per packet: _RoutedBase._route (header checks; LPM - no route -> net unreachable,
#      LOCAL -> host unreachable; TTL <= 1 -> time exceeded; DF and longer than the peer's
#      path MTU -> fragmentation needed; else TTL-1 in place) and queue the slot for the peer;
#   3. one sendmmsg for the whole queue.
# Outside (underlay -> device), one outside_batch() call:
#   1. one recvmmsg(MSG_DONTWAIT) of up to batch_size datagrams;
#   2. per datagram: truncated? known peer by source IP? then _RoutedBase._deliver: valid
#      IPv4 with a right checksum, inner source routed to that same peer, inner destination
#      LOCAL; write() it.
#
# The UDP payload is the inner IPv4 packet byte for byte. Batching, queues, ICMP and the IPv4
# checks are forwarder_base.pxi's (shared with the vxlan paths).


@cython.final
cdef class UdpForwarder(_RoutedBase):
    """The routed udp data path over a tun fd and a UDP socket fd, both owned by the caller.

    Drive it from one thread: inside_batch when the tun fd is readable, outside_batch when the
    socket is, add_icmp_tokens from a timer, set_tables on map changes.
    """

    def __cinit__(self, tun_fd, sock_fd, batch_size=64, icmp_burst=100, *, vnet_hdr=False,
                  udp_gso=False, udp_gro=False, device_uso=False):
        self._setup_routed("UdpForwarder", tun_fd, sock_fd, (), batch_size, icmp_burst,
                           (vnet_hdr, udp_gso, udp_gro, device_uso), 0)

    cdef void _inside_one(self, const fwd_tables_t *t, unsigned char *pkt,
                          uint32_t n) noexcept nogil:
        cdef int32_t peer = self._route(t, pkt, n)
        if peer >= 0:
            if self.capture_on:
                self._capture(0, peer, pkt, n)
            self._queue(t, pkt, n, peer, 0)

    cdef void _outside_one(self, const fwd_tables_t *t, unsigned char *pkt, uint32_t n,
                           int32_t peer) noexcept nogil:
        self._deliver(t, pkt, n, peer)
