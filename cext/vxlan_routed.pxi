# Routed ``vxlan`` data path (flannel's vxlan backend). Twin: overlayd/dataplane/vxlan_routed.py.
#
# The router is _RoutedBase's (as the udp path); only the encapsulation differs:
#   inside, per packet: _route (LPM, TTL, ICMP errors, frag-needed against the peer's path
#     MTU = underlay - 50); write VXLAN (our VNI) + Ethernet (dst = the peer's VTEP MAC, src =
#     ours, type IPv4) into the slot's headroom - the packet is not copied; queue it on tx
#     socket flow_hash % ntx, so one inner flow keeps one outer source port;
#   outside, per datagram: known peer; vxlan_check (header + Ethernet header present, I flag,
#     our VNI); inner destination MAC ours or broadcast; ethertype IPv4; Ethernet padding of a
#     short frame trimmed by the IPv4 total length; then _deliver (the udp path's checks).
# Every peer has a 6-byte VTEP MAC: set_tables refuses tables without one.


@cython.final
cdef class VxlanRoutedForwarder(_RoutedBase):
    """The routed vxlan data path over a tun fd and UDP socket fds, all owned by the caller.

    ``mac`` is our VTEP MAC (6 bytes), ``vni`` our VXLAN network identifier; ``tx_fds`` are
    the sockets datagrams leave from, chosen by flow hash (empty: the receive socket).
    """

    cdef unsigned char mac[6]
    cdef uint32_t vni

    def __cinit__(self, tun_fd, sock_fd, mac, vni=1, tx_fds=(), batch_size=64,
                  icmp_burst=100, *, vnet_hdr=False, udp_gso=False, udp_gro=False,
                  device_uso=False):
        cdef const unsigned char[::1] view
        mac = bytes(mac)
        if len(mac) != 6:
            raise ValueError(f"mac must be 6 bytes, got {len(mac)}")
        self.vni = check_vni_arg(vni)
        view = mac
        memcpy(self.mac, &view[0], 6)
        self._setup_routed("VxlanRoutedForwarder", tun_fd, sock_fd, tx_fds, batch_size,
                           icmp_burst, (vnet_hdr, udp_gso, udp_gro, device_uso), ROUTED_ENCAP)

    cdef int _check_generation(self, _TableGeneration gen) except -1:
        cdef int32_t i
        for i in range(gen.t.npeers):
            if not gen.t.peers[i].has_mac:
                raise ValueError(f"peer {i}: mac must be 6 bytes, got 0")
        return 0

    cdef void _inside_one(self, const fwd_tables_t *t, unsigned char *pkt,
                          uint32_t n) noexcept nogil:
        cdef int32_t peer = self._route(t, pkt, n)
        cdef unsigned char *out
        cdef int sock = 0
        if peer < 0:
            return
        if self.capture_on:
            self._capture(0, peer, pkt, n)
        if self.ntx > 1:
            sock = flow_hash_ipv4_c(pkt, n) % <uint32_t>self.ntx
        out = pkt - ROUTED_ENCAP
        vxlan_header(out, self.vni)
        memcpy(out + VXLAN_HEADER, t.peers[peer].mac, 6)
        memcpy(out + VXLAN_HEADER + 6, self.mac, 6)
        wr16(out + VXLAN_HEADER + 12, ETHERTYPE_IPV4)
        self._queue(t, out, n + ROUTED_ENCAP, peer, sock)

    cdef void _outside_one(self, const fwd_tables_t *t, unsigned char *pkt, uint32_t n,
                           int32_t peer) noexcept nogil:
        cdef int reason = vxlan_check(pkt, n, self.vni, ETH_HEADER)
        cdef const unsigned char *frame = pkt + VXLAN_HEADER
        cdef const unsigned char *inner = frame + ETH_HEADER
        cdef uint32_t inner_n, total
        if reason >= 0:
            self.ctr[reason] += 1
            return
        if (memcmp(frame, self.mac, 6) != 0
                and rd48(frame) != <uint64_t>0xFFFFFFFFFFFF):
            self.ctr[CTR_OUTSIDE_WRONG_INNER_MAC] += 1
            return
        if rd16(frame + 12) != ETHERTYPE_IPV4:
            self.ctr[CTR_OUTSIDE_NOT_IPV4] += 1
            return
        inner_n = n - ROUTED_ENCAP
        if IPV4_MIN_HEADER <= inner_n <= ETH_MIN_PAYLOAD:
            # A short frame may carry Ethernet padding after the packet: trust total length.
            total = rd16(inner + 2)
            if IPV4_MIN_HEADER <= total < inner_n:
                inner_n = total
        self._deliver(t, inner, inner_n, peer)
