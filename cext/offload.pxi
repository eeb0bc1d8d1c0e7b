# Offloads: TCP (and, with USO, UDP) segmentation of superpackets read from the device, UDP GSO
# on the tunnel socket, UDP GRO on receive, and TCP (and UDP) coalescing on writes into the
# device.
# Twin: overlayd/dataplane/offload.py (same functions, same bytes; tests compare them).
#
# Why: a per-packet userspace loop pays one read, one sendmsg, one recvmsg and one write per
# 1.4 kB packet. With the device opened with IFF_VNET_HDR + TUNSETOFFLOAD(CSUM|TSO4), the
# kernel hands us TCP superpackets of up to 64 kB; UDP_SEGMENT sends a run of equal-sized
# datagrams in one sendmsg, UDP_GRO receives such a run in one recvmsg, and a virtio-net GSO
# header lets us write a run of TCP segments into the device as one superpacket. Every datagram
# on the wire is still one complete inner packet with valid checksums (kernel VTEPs and flannel
# peers see no difference).
#
# The virtio-net header (10 bytes, host byte order, in front of every read and write when the
# device is opened with IFF_VNET_HDR):
#   u8 flags (1 = NEEDS_CSUM)  u8 gso_type (0 NONE, 1 TCPV4, 0x80 = ECN bit)  u16 hdr_len
#   u16 gso_size  u16 csum_start  u16 csum_offset
#
# 1. Reads (vnet_hdr_read): gso NONE: if NEEDS_CSUM, complete the checksum - store
#    csum_fold(sum of pkt[csum_start:n]) at csum_start + csum_offset (0 stored as 0xFFFF) - and
#    hand the packet on as one. gso TCPV4 (ECN bit ignored): segment (2). Anything else, or
#    offsets outside the packet: dropped as inside_bad_offload.
# 2. segment_tcp4(pkt, n, l2, mss, prefix): pkt is l2 bytes of link header (0 tun, 14 tap with
#    ethertype IPv4) + IPv4 (proto 6, total length == n - l2) + TCP + payload; H = l2 + ihl +
#    doff*4; segment i carries payload[i*mss : (i+1)*mss] after a copy of pkt[:H] with: IPv4
#    total length = H - l2 + its payload; id = id + i (mod 2**16); header checksum recomputed;
#    TCP seq = seq + i*mss (mod 2**32); FIN and PSH cleared on all but the last, CWR cleared on
#    all but the first; TCP checksum computed in full (pseudo-header + header + payload), the
#    payload's part while it is copied (one pass, csum_copy).
#    Segments are laid out contiguously, segment i at out + prefix + i*(prefix + H + mss), so
#    that the prefix bytes in front of each (room for the path's outer header) end exactly
#    where the previous segment ends: a run of them is one UDP GSO buffer. Refused (-1,
#    inside_bad_offload): not such a packet, mss 0, no payload, or more than the buffer holds.
# 3. UDP GSO (_queue in forwarder_base.pxi): a datagram queued right behind the previous entry
#    of the same socket queue, for the same peer, starting exactly where that entry's buffer
#    ends, no longer than its first datagram, is merged into it (UDP_SEGMENT = the first
#    datagram's size) while the entry stays under GSO_MAX_SEGS datagrams and GSO_MAX_BYTES; a
#    shorter datagram closes the entry. (Runs of superpackets start 16-byte aligned in one
#    arena, so the first segment of the next superpacket to the same peer may land right behind
#    and join too: harmless, the kernel still splits at the same boundaries.) A refused GSO send is resent datagram by datagram
#    (offload_gso_refused); EIO/EINVAL/ENOPROTOOPT/EOPNOTSUPP also turn GSO off for good.
# 4. UDP GRO (outside_batch): a receive whose cmsg (SOL_UDP, UDP_GRO) gives a segment size is
#    split into datagrams of that size (the last may be shorter); each is then counted and
#    handled exactly as a datagram received on its own.
# 5. Coalescing (gro_add / gro_flush): delivered packets are appended to a list of pending
#    items and written when the batch ends. A packet is *coalescable* when: (tap: ethertype
#    IPv4 at l2=14) IPv4 with ihl 5, proto 6, neither MF nor a fragment offset, total length ==
#    n - l2, header checksum right; TCP doff*4 >= 20 within the packet; payload > 0; flags ACK
#    or ACK|PSH only; TCP checksum right (what the kernel's inet_gro_receive and
#    tcp_gro_receive would not merge is written as it came). A *TCP packet* (coalescable or not) is (tap: ethertype IPv4) IPv4, ihl >=
#    20, proto 6, with its 4 port bytes inside the packet; its flow is (link header, IPv4
#    source, destination, TCP ports). Every item started by a TCP packet has a flow. The last
#    GRO_SCAN items are searched newest first for the first one of the same flow; it is merged
#    into when it is open and has: the same link header, TOS, TTL, DF/flags word, TCP byte 12
#    (doff and the reserved bits), options bytes, ack number and window; IPv4 id == the head's
#    id + the segments it holds (mod 2**16); seq == its next seq; payload <= its mss (the first
#    segment's payload); total length + payload <= 65535; fewer than GRO_MAX_SEGS segments.
#    Merging appends the payload; a payload shorter than the mss, or PSH, closes the item (PSH
#    is then set on the item's head). A same-flow item that cannot take the packet is closed,
#    and so is one met by a non-coalescable TCP packet of its flow; the packet then starts a
#    new item (open only if coalescable and without PSH). The item arrays are bounded
#    (GRO_MAX_ITEMS items, GRO_MAX_RECS appended payloads): when either is full, everything
#    pending is written first. Items are written in the order they were started:
#    one segment - a zero virtio header and the packet as it came; several - the head's total
#    length and header checksum fixed, its TCP checksum set to the folded pseudo-header sum
#    (not inverted, what CHECKSUM_PARTIAL expects), and the header {NEEDS_CSUM, TCPV4,
#    hdr_len = l2+20+doff*4, gso_size = mss, csum_start = l2+20, csum_offset = 16}.
# 6. Unfinished checksums on receipt (finish_partial_l4, forwarder_base _emit): a kernel VTEP
#    whose link leaves checksums to offload (a veth, many virtual NICs) sends inner TCP/UDP
#    segments with CHECKSUM_PARTIAL, whose checksum field holds only the folded pseudo-header
#    sum; a kernel receiver keeps that state, a tun/tap write cannot. A delivered IPv4 packet
#    (not a fragment, TCP or UDP with a nonzero UDP checksum) whose field is exactly that
#    pattern and whose whole does not verify is finished in place, as 1. does for reads, and
#    counted (offload_checksums_finished); anything else is left as it came.
# 7. USO (gro_t.uso / forwarder uso: the device took TUN_F_USO4 | TUN_F_USO6, kernel >= 6.2).
#    Reads with gso UDP_L4 (an application's UDP_SEGMENT send) are cut by uso_plan/uso_write
#    like 2., for a UDPv4 packet (total length == n - l2, payload > 0): datagram i carries
#    payload[i*mss : (i+1)*mss] after a copy of the headers with IPv4 total length, id + i,
#    header checksum, UDP length and the UDP checksum computed in full (0 stored as 0xFFFF);
#    without uso such a read is inside_bad_offload. Writes: in 5., a *UDP packet* (IPv4, ihl >=
#    20, proto 17, ports inside) also has a flow (the protocol is part of every flow, so TCP and
#    UDP of the same ports never meet), and is *coalescable* when: ihl 5, neither MF nor an
#    offset, total length == n - l2, UDP length == total - 20, payload > 0, header checksum
#    right, UDP checksum nonzero and right (what udp_gro_receive_segment merges). It is merged
#    into the open same-flow item when the TOS, TTL and DF/flags word equal the head's, its id is
#    the head's id + segments held, payload <= the first one's, total <= 65535, fewer than
#    GRO_MAX_SEGS; a shorter payload closes the item. Written: head's total length, header
#    checksum and UDP length set for the run, its UDP checksum field = the folded pseudo-header
#    sum of the run (not inverted), header {NEEDS_CSUM, UDP_L4, hdr_len = l2+28, gso_size = the
#    first payload, csum_start = l2+20, csum_offset = 6}; the kernel cuts it back at gso_size
#    with ids counting up, so the datagrams that come out are the ones that went in.

cdef enum:
    VNET_HDR_LEN_C = 10
    VNET_F_NEEDS_CSUM_C = 1
    VNET_GSO_NONE_C = 0
    VNET_GSO_TCPV4_C = 1
    VNET_GSO_UDP_L4_C = 5        # UDP GSO (USO): kernel >= 6.2, TUN_F_USO4 | TUN_F_USO6
    VNET_GSO_ECN_C = 0x80
    GSO_MAX_SEGS_C = 64          # UDP_MAX_SEGMENTS of older kernels
    GSO_MAX_BYTES_C = 65000      # one UDP payload: under 65535 - IPv4 - UDP headers
    GRO_SCAN_C = 8
    GRO_MAX_SEGS_C = 64
    GRO_MAX_ITEMS_C = 1024
    GRO_MAX_RECS_C = 4096
    TSO_MAX_SEGMENTS_C = 1024    # a 64 kB superpacket down to an MSS of 64 bytes
    SEG_ARENA_BYTES_C = 512 * 1024
    TAP_L2 = 14                  # Ethernet header in front of a tap device's frames
    ETHERTYPE_IP = 0x0800
    TCP_FIN = 0x01
    TCP_PSH = 0x08
    TCP_ACK = 0x10
    TCP_CWR = 0x80
    PROTO_TCP = 6
    PROTO_UDP = 17
    UDP_HEADER_C = 8
    SOL_UDP_C = 17
    UDP_SEGMENT_C = 103
    UDP_GRO_C = 104

VNET_HDR_LEN = VNET_HDR_LEN_C
VNET_F_NEEDS_CSUM = VNET_F_NEEDS_CSUM_C
VNET_GSO_NONE = VNET_GSO_NONE_C
VNET_GSO_TCPV4 = VNET_GSO_TCPV4_C
VNET_GSO_UDP_L4 = VNET_GSO_UDP_L4_C
VNET_GSO_ECN = VNET_GSO_ECN_C
GSO_MAX_SEGS = GSO_MAX_SEGS_C
GSO_MAX_BYTES = GSO_MAX_BYTES_C
GRO_SCAN = GRO_SCAN_C
GRO_MAX_SEGS = GRO_MAX_SEGS_C
GRO_MAX_ITEMS = GRO_MAX_ITEMS_C
GRO_MAX_RECS = GRO_MAX_RECS_C

ctypedef struct vnet_hdr_t:      # struct virtio_net_hdr, host byte order (10 bytes, no padding)
    uint8_t flags
    uint8_t gso_type
    uint16_t hdr_len
    uint16_t gso_size
    uint16_t csum_start
    uint16_t csum_offset


# The header in front of a plain packet we write (no GSO, checksum complete): all zeros.
cdef vnet_hdr_t PLAIN_VNET_HDR
memset(&PLAIN_VNET_HDR, 0, sizeof(vnet_hdr_t))


cdef inline int complete_csum(unsigned char *pkt, uint32_t n, uint32_t start,
                              uint32_t offset) noexcept nogil:
    """Finish a CHECKSUM_PARTIAL packet: 0 or -1 (offsets outside the packet)."""
    cdef uint16_t c
    if <uint64_t>start + offset + 2 > n:
        return -1
    c = csum_fold(csum_partial(pkt + start, n - start, 0))
    wr16(pkt + start + offset, c if c != 0 else 0xFFFF)
    return 0


cdef inline bint finish_partial_l4(unsigned char *pkt, uint32_t n, uint32_t l2) noexcept nogil:
    """A delivered packet (tun: l2 = 0) or frame (tap: l2 = 14) whose inner TCP/UDP checksum
    a kernel VTEP left unfinished (see 6.): finish it in place; whether it did."""
    cdef unsigned char *ip = pkt + l2
    cdef uint32_t ihl, total, l4, where, need, proto
    cdef uint64_t pseudo
    cdef uint16_t field
    if n < l2 + IPV4_MIN_HEADER or (l2 and rd16(pkt + l2 - 2) != ETHERTYPE_IP):
        return False
    if (ip[0] >> 4) != 4 or (rd16(ip + 6) & 0x3FFF) != 0:
        return False
    ihl = (ip[0] & 0x0F) * 4
    total = rd16(ip + 2)                 # not n: a short frame may carry Ethernet padding
    proto = ip[9]
    if ihl < IPV4_MIN_HEADER or total < ihl or total > n - l2:
        return False
    if proto == PROTO_TCP:
        where = 16
        need = 20
    elif proto == PROTO_UDP:
        where = 6
        need = 8
    else:
        return False
    l4 = total - ihl
    if l4 < need:
        return False
    field = rd16(ip + ihl + where)
    if proto == PROTO_UDP and field == 0:
        return False                     # no checksum at all: nothing to finish
    pseudo = csum_partial(ip + 12, 8, 0) + proto + l4
    if field != (~csum_fold(pseudo) & 0xFFFF):
        return False                     # the cheap test, on every delivered packet
    if csum_fold(csum_partial(ip + ihl, l4, pseudo)) == 0:
        return False                     # a finished checksum that happens to look partial
    complete_csum(ip, total, ihl, where)
    return True


ctypedef struct tso_plan_t:
    uint32_t l2
    uint32_t ihl
    uint32_t doff
    uint32_t hdr           # l2 + ihl + doff
    uint32_t mss
    uint32_t payload
    uint32_t nseg
    uint32_t prefix
    uint32_t stride        # prefix + hdr + mss
    size_t need            # bytes of the laid-out run, prefix of segment 0 included


cdef inline int tso_plan(tso_plan_t *p, const unsigned char *pkt, uint32_t n, uint32_t l2,
                         uint32_t mss, uint32_t prefix) noexcept nogil:
    """Check a TCPv4 superpacket and size its segmentation: 0, or -1 if refused."""
    cdef const unsigned char *ip = pkt + l2
    cdef const unsigned char *tcp
    cdef uint32_t last
    if mss == 0 or n < l2 + IPV4_MIN_HEADER + 20:
        return -1
    if l2 and rd16(pkt + l2 - 2) != ETHERTYPE_IP:
        return -1
    if (ip[0] >> 4) != 4 or ip[9] != PROTO_TCP:
        return -1
    p.ihl = (ip[0] & 0x0F) * 4
    if p.ihl < IPV4_MIN_HEADER or rd16(ip + 2) != n - l2 or l2 + p.ihl + 20 > n:
        return -1
    tcp = ip + p.ihl
    p.doff = (tcp[12] >> 4) * 4
    p.hdr = l2 + p.ihl + p.doff
    if p.doff < 20 or p.hdr >= n:
        return -1
    p.l2 = l2
    p.mss = mss
    p.payload = n - p.hdr
    p.nseg = (p.payload + mss - 1) // mss
    if p.nseg > TSO_MAX_SEGMENTS_C:
        return -1
    p.prefix = prefix
    p.stride = prefix + p.hdr + mss
    last = p.payload - (p.nseg - 1) * mss
    p.need = <size_t>(p.nseg - 1) * p.stride + prefix + p.hdr + last
    return 0


cdef inline uint32_t tso_segment_len(const tso_plan_t *p, uint32_t i) noexcept nogil:
    if i + 1 < p.nseg:
        return p.hdr + p.mss
    return p.hdr + p.payload - i * p.mss


cdef void tso_write(const tso_plan_t *p, const unsigned char *pkt,
                    unsigned char *out) noexcept nogil:
    """Lay the segments out (see 2.): segment i at out + prefix + i * stride."""
    cdef const unsigned char *ip = pkt + p.l2
    cdef const unsigned char *tcp = ip + p.ihl
    cdef uint32_t ip_id = rd16(ip + 4), seq = rd32(tcp + 4), flags = tcp[13]
    cdef uint64_t pseudo = csum_partial(ip + 12, 8, 0) + PROTO_TCP
    cdef uint32_t i, length, seg_flags
    cdef uint64_t payload_sum
    cdef unsigned char *seg
    cdef unsigned char *sip
    cdef unsigned char *stcp
    for i in range(p.nseg):
        seg = out + p.prefix + <size_t>i * p.stride
        length = tso_segment_len(p, i) - p.hdr
        memcpy(seg, pkt, p.hdr)
        # The payload is copied and summed in one pass (checksum while copying); the TCP
        # header is even-length (doff is a multiple of 4), so the sums add up word-aligned.
        payload_sum = csum_copy(seg + p.hdr, pkt + p.hdr + <size_t>i * p.mss, length, 0)
        sip = seg + p.l2
        wr16(sip + 2, p.ihl + p.doff + length)
        wr16(sip + 4, (ip_id + i) & 0xFFFF)
        wr16(sip + 10, 0)
        wr16(sip + 10, csum_fold(csum_partial(sip, p.ihl, 0)))
        stcp = sip + p.ihl
        wr32(stcp + 4, seq + i * p.mss)
        seg_flags = flags
        if i + 1 < p.nseg:
            seg_flags &= ~(TCP_FIN | TCP_PSH)
        if i > 0:
            seg_flags &= ~TCP_CWR
        stcp[13] = seg_flags
        wr16(stcp + 16, 0)
        wr16(stcp + 16, csum_fold(csum_partial(stcp, p.doff,
                                               pseudo + p.doff + length + payload_sum)))


cdef inline int uso_plan(tso_plan_t *p, const unsigned char *pkt, uint32_t n, uint32_t l2,
                         uint32_t mss, uint32_t prefix) noexcept nogil:
    """Check a UDPv4 superpacket (USO) and size its cutting (see 7.): 0, or -1 if refused.
    The plan is a tso_plan_t whose "doff" is the UDP header."""
    cdef const unsigned char *ip = pkt + l2
    cdef uint32_t last
    if mss == 0 or n < l2 + IPV4_MIN_HEADER + UDP_HEADER_C:
        return -1
    if l2 and rd16(pkt + l2 - 2) != ETHERTYPE_IP:
        return -1
    if (ip[0] >> 4) != 4 or ip[9] != PROTO_UDP:
        return -1
    p.ihl = (ip[0] & 0x0F) * 4
    p.doff = UDP_HEADER_C
    p.hdr = l2 + p.ihl + UDP_HEADER_C
    if p.ihl < IPV4_MIN_HEADER or rd16(ip + 2) != n - l2 or p.hdr >= n:
        return -1
    p.l2 = l2
    p.mss = mss
    p.payload = n - p.hdr
    p.nseg = (p.payload + mss - 1) // mss
    if p.nseg > TSO_MAX_SEGMENTS_C:
        return -1
    p.prefix = prefix
    p.stride = prefix + p.hdr + mss
    last = p.payload - (p.nseg - 1) * mss
    p.need = <size_t>(p.nseg - 1) * p.stride + prefix + p.hdr + last
    return 0


cdef void uso_write(const tso_plan_t *p, const unsigned char *pkt,
                    unsigned char *out) noexcept nogil:
    """Lay the datagrams out like tso_write: each with the headers, its own IPv4 total length,
    id + i, header checksum, UDP length and full UDP checksum (0 sent as 0xFFFF)."""
    cdef const unsigned char *ip = pkt + p.l2
    cdef uint32_t ip_id = rd16(ip + 4), i, length
    cdef uint64_t pseudo = csum_partial(ip + 12, 8, 0) + PROTO_UDP
    cdef uint64_t payload_sum
    cdef uint16_t c
    cdef unsigned char *seg
    cdef unsigned char *sip
    cdef unsigned char *sudp
    for i in range(p.nseg):
        seg = out + p.prefix + <size_t>i * p.stride
        length = tso_segment_len(p, i) - p.hdr
        memcpy(seg, pkt, p.hdr)
        payload_sum = csum_copy(seg + p.hdr, pkt + p.hdr + <size_t>i * p.mss, length, 0)
        sip = seg + p.l2
        wr16(sip + 2, p.ihl + UDP_HEADER_C + length)
        wr16(sip + 4, (ip_id + i) & 0xFFFF)
        wr16(sip + 10, 0)
        wr16(sip + 10, csum_fold(csum_partial(sip, p.ihl, 0)))
        sudp = sip + p.ihl
        wr16(sudp + 4, UDP_HEADER_C + length)
        wr16(sudp + 6, 0)
        c = csum_fold(csum_partial(sudp, UDP_HEADER_C,
                                   pseudo + UDP_HEADER_C + length + payload_sum))
        wr16(sudp + 6, c if c != 0 else 0xFFFF)


# --- coalescing on writes (5.) -------------------------------------------------------------

ctypedef struct gro_rec_t:       # one appended payload
    const unsigned char *data
    uint32_t length
    int32_t next


ctypedef struct gro_item_t:      # one pending write
    unsigned char *head          # the first packet, headers modified only when written
    uint32_t head_len
    uint32_t ip_len              # IPv4 total length with every appended payload
    uint32_t hdr_len             # l2 + 20 + doff
    uint32_t mss
    uint32_t next_seq
    uint32_t segs
    int32_t first_rec
    int32_t last_rec
    uint8_t proto                # PROTO_TCP or PROTO_UDP: the item has a flow; 0: it has none
    bint open


ctypedef struct gro_t:
    gro_item_t *items
    gro_rec_t *recs
    int32_t nitems
    int32_t nrecs
    uint32_t l2
    bint uso                     # the device takes UDP GSO writes: UDP runs are merged too


cdef int gro_init(gro_t *g, uint32_t l2, bint uso) except -1:
    g.items = <gro_item_t *>malloc(GRO_MAX_ITEMS_C * sizeof(gro_item_t))
    g.recs = <gro_rec_t *>malloc(GRO_MAX_RECS_C * sizeof(gro_rec_t))
    g.nitems = 0
    g.nrecs = 0
    g.l2 = l2
    g.uso = uso
    if g.items == NULL or g.recs == NULL:
        free(g.items)
        free(g.recs)
        g.items = NULL
        g.recs = NULL
        raise MemoryError()
    return 0


cdef void gro_release(gro_t *g) noexcept nogil:
    free(g.items)
    free(g.recs)
    g.items = NULL
    g.recs = NULL


cdef inline bint gro_full(const gro_t *g) noexcept nogil:
    return g.nitems >= GRO_MAX_ITEMS_C or g.nrecs >= GRO_MAX_RECS_C


cdef inline uint8_t gro_flow_proto(const unsigned char *pkt, uint32_t n, uint32_t l2,
                                   bint uso) noexcept nogil:
    """PROTO_TCP for a *TCP packet*, PROTO_UDP for a *UDP packet* (uso only), else 0."""
    cdef uint32_t ihl
    cdef uint8_t proto
    if n < l2 + IPV4_MIN_HEADER or (l2 and rd16(pkt + l2 - 2) != ETHERTYPE_IP):
        return 0
    ihl = (pkt[l2] & 0x0F) * 4
    proto = pkt[l2 + 9]
    if (pkt[l2] >> 4) != 4 or ihl < IPV4_MIN_HEADER or l2 + ihl + 4 > n:
        return 0
    if proto == PROTO_TCP or (proto == PROTO_UDP and uso):
        return proto
    return 0


cdef inline bint gro_same_flow(const unsigned char *a, const unsigned char *b,
                               uint32_t l2) noexcept nogil:
    """Both TCP or UDP packets (gro_flow_proto): same link header, protocol, addresses, ports."""
    cdef const unsigned char *ipa = a + l2
    cdef const unsigned char *ipb = b + l2
    return (ipa[9] == ipb[9] and memcmp(a, b, l2) == 0 and memcmp(ipa + 12, ipb + 12, 8) == 0
            and memcmp(ipa + (ipa[0] & 0x0F) * 4, ipb + (ipb[0] & 0x0F) * 4, 4) == 0)


cdef inline uint32_t gro_payload(const unsigned char *pkt, uint32_t n, uint32_t l2) noexcept nogil:
    """The TCP payload length of a coalescable packet (a TCP packet), or 0 if it is not one."""
    cdef const unsigned char *ip = pkt + l2
    cdef const unsigned char *tcp = ip + IPV4_MIN_HEADER
    cdef uint32_t doff, flags
    if ip[0] != 0x45 or (rd16(ip + 6) & 0x3FFF) != 0 or rd16(ip + 2) != n - l2:
        return 0
    if n < l2 + IPV4_MIN_HEADER + 20:
        return 0
    # A bad header checksum must reach the device as it came: merging would rewrite it.
    if csum_fold(csum_partial(ip, IPV4_MIN_HEADER, 0)) != 0:
        return 0
    doff = (tcp[12] >> 4) * 4
    if doff < 20 or l2 + IPV4_MIN_HEADER + doff >= n:
        return 0
    flags = tcp[13]
    if (flags & ~(TCP_ACK | TCP_PSH)) or not (flags & TCP_ACK):
        return 0
    if csum_fold(csum_partial(tcp, n - l2 - IPV4_MIN_HEADER,
                              csum_partial(ip + 12, 8, 0) + PROTO_TCP
                              + n - l2 - IPV4_MIN_HEADER)) != 0:
        return 0
    return n - l2 - IPV4_MIN_HEADER - doff


cdef inline uint32_t gro_udp_payload(const unsigned char *pkt, uint32_t n,
                                     uint32_t l2) noexcept nogil:
    """The UDP payload length of a coalescable UDP packet (a UDP packet), or 0 if it is not
    one: what the kernel's UDP GRO would merge (udp_gro_receive_segment wants a nonzero
    checksum, and a bad one must reach the device as it came)."""
    cdef const unsigned char *ip = pkt + l2
    cdef const unsigned char *udp = ip + IPV4_MIN_HEADER
    cdef uint32_t length
    if ip[0] != 0x45 or (rd16(ip + 6) & 0x3FFF) != 0 or rd16(ip + 2) != n - l2:
        return 0
    if n <= l2 + IPV4_MIN_HEADER + UDP_HEADER_C:
        return 0
    length = n - l2 - IPV4_MIN_HEADER
    if rd16(udp + 4) != length or rd16(udp + 6) == 0:
        return 0
    if csum_fold(csum_partial(ip, IPV4_MIN_HEADER, 0)) != 0:
        return 0
    if csum_fold(csum_partial(udp, length,
                              csum_partial(ip + 12, 8, 0) + PROTO_UDP + length)) != 0:
        return 0
    return length - UDP_HEADER_C


cdef inline bint gro_udp_mergeable(const gro_item_t *it, const unsigned char *pkt,
                                   uint32_t payload, uint32_t l2) noexcept nogil:
    # TOS, TTL and the DF word equal, IPv4 ids counting up from the head's (the kernel's UDP
    # segmentation numbers the datagrams that way), no payload longer than the first.
    cdef const unsigned char *ip = pkt + l2
    cdef const unsigned char *hip = it.head + l2
    return (it.open and ip[1] == hip[1] and ip[8] == hip[8] and rd16(ip + 6) == rd16(hip + 6)
            and rd16(ip + 4) == ((rd16(hip + 4) + it.segs) & 0xFFFF)
            and payload <= it.mss and it.ip_len + payload <= 0xFFFF
            and it.segs < GRO_MAX_SEGS_C)


cdef inline bint gro_mergeable(const gro_item_t *it, const unsigned char *pkt, uint32_t payload,
                               uint32_t l2) noexcept nogil:
    cdef const unsigned char *ip = pkt + l2
    cdef const unsigned char *hip = it.head + l2
    cdef const unsigned char *tcp = ip + IPV4_MIN_HEADER
    cdef const unsigned char *htcp = hip + IPV4_MIN_HEADER
    cdef uint32_t doff = (tcp[12] >> 4) * 4
    # Byte 12 whole (doff and the reserved/AE bits); IPv4 ids counting up from the head's, so
    # the kernel re-cutting the superpacket gives back exactly the segments that came.
    return (it.open and ip[1] == hip[1] and ip[8] == hip[8] and rd16(ip + 6) == rd16(hip + 6)
            and tcp[12] == htcp[12] and doff == it.hdr_len - l2 - IPV4_MIN_HEADER
            and rd16(ip + 4) == ((rd16(hip + 4) + it.segs) & 0xFFFF)
            and memcmp(tcp + 20, htcp + 20, doff - 20) == 0
            and memcmp(tcp + 8, htcp + 8, 4) == 0 and memcmp(tcp + 14, htcp + 14, 2) == 0
            and rd32(tcp + 4) == it.next_seq and payload <= it.mss
            and it.ip_len + payload <= 0xFFFF and it.segs < GRO_MAX_SEGS_C)


cdef void gro_add(gro_t *g, unsigned char *pkt, uint32_t n) noexcept nogil:
    """Add one delivered packet; the caller has made room (not gro_full). ``pkt`` must stay
    valid and untouched until the item is written."""
    cdef uint32_t l2 = g.l2
    cdef uint8_t proto = gro_flow_proto(pkt, n, l2, g.uso)
    cdef uint32_t payload = 0
    cdef int32_t j, stop = g.nitems - GRO_SCAN_C
    cdef gro_item_t *it
    cdef gro_rec_t *rec
    cdef uint32_t flags = 0
    cdef bint fits
    if proto == PROTO_TCP:
        payload = gro_payload(pkt, n, l2)
        if payload:             # (then the whole TCP header is inside the packet)
            flags = pkt[l2 + IPV4_MIN_HEADER + 13]
    elif proto == PROTO_UDP:
        payload = gro_udp_payload(pkt, n, l2)
    if proto:
        j = g.nitems - 1
        while j >= 0 and j >= stop:
            it = &g.items[j]
            if it.proto and gro_same_flow(it.head, pkt, l2):
                if proto == PROTO_TCP:
                    fits = payload and gro_mergeable(it, pkt, payload, l2)
                else:
                    fits = payload and gro_udp_mergeable(it, pkt, payload, l2)
                if fits:
                    rec = &g.recs[g.nrecs]
                    rec.data = pkt + (n - payload)
                    rec.length = payload
                    rec.next = -1
                    if it.last_rec >= 0:
                        g.recs[it.last_rec].next = g.nrecs
                    else:
                        it.first_rec = g.nrecs
                    it.last_rec = g.nrecs
                    g.nrecs += 1
                    it.segs += 1
                    it.next_seq += payload      # (UDP: unused)
                    it.ip_len += payload
                    if payload < it.mss or (flags & TCP_PSH):
                        it.open = False
                    if flags & TCP_PSH:
                        it.head[l2 + IPV4_MIN_HEADER + 13] |= TCP_PSH
                    return
                it.open = False
                break
            j -= 1
    it = &g.items[g.nitems]
    g.nitems += 1
    it.head = pkt
    it.head_len = n
    it.segs = 1
    it.first_rec = -1
    it.last_rec = -1
    it.proto = proto
    it.open = payload > 0 and not (flags & TCP_PSH)
    if payload:
        it.mss = payload
        it.hdr_len = n - payload
        it.ip_len = n - l2
        if proto == PROTO_TCP:
            it.next_seq = rd32(pkt + l2 + IPV4_MIN_HEADER + 4) + payload


cdef int gro_prepare(const gro_t *g, int32_t index, vnet_hdr_t *hdr, iovec *iov) noexcept nogil:
    """Make item ``index`` ready to write: fill ``hdr`` and iov[0..] (iov[0] = hdr, room for
    GRO_MAX_SEGS_C + 1 entries); the number of iov entries."""
    cdef gro_item_t *it = &g.items[index]
    cdef unsigned char *ip
    cdef int32_t r
    cdef int k = 2
    memset(hdr, 0, sizeof(vnet_hdr_t))
    iov[0].iov_base = hdr
    iov[0].iov_len = VNET_HDR_LEN_C
    iov[1].iov_base = it.head
    iov[1].iov_len = it.head_len
    if it.segs == 1:
        return 2
    ip = it.head + g.l2
    wr16(ip + 2, it.ip_len)
    wr16(ip + 10, 0)
    wr16(ip + 10, csum_fold(csum_partial(ip, IPV4_MIN_HEADER, 0)))
    hdr.flags = VNET_F_NEEDS_CSUM_C
    hdr.hdr_len = it.hdr_len
    hdr.gso_size = it.mss
    hdr.csum_start = g.l2 + IPV4_MIN_HEADER
    if it.proto == PROTO_UDP:
        # The UDP length of the whole run; the kernel gives each datagram its own.
        wr16(ip + IPV4_MIN_HEADER + 4, it.ip_len - IPV4_MIN_HEADER)
        hdr.gso_type = VNET_GSO_UDP_L4_C
        hdr.csum_offset = 6
    else:
        hdr.gso_type = VNET_GSO_TCPV4_C
        hdr.csum_offset = 16
    # CHECKSUM_PARTIAL: the folded pseudo-header sum, not inverted; the kernel adds the rest.
    wr16(ip + IPV4_MIN_HEADER + hdr.csum_offset,
         (~csum_fold(csum_partial(ip + 12, 8, 0) + it.proto + it.ip_len - IPV4_MIN_HEADER))
         & 0xFFFF)
    r = it.first_rec
    while r >= 0:
        iov[k].iov_base = <void *>g.recs[r].data
        iov[k].iov_len = g.recs[r].length
        k += 1
        r = g.recs[r].next
    return k


# Python entry points to the C code above, for tests against the twin (not the packet path).

def complete_checksum(packet, csum_start, csum_offset):
    """The packet with its partial checksum completed, or None if the offsets are outside."""
    buf = bytearray(packet)
    cdef unsigned char[::1] view = buf
    if len(buf) == 0:
        return None
    if complete_csum(&view[0], len(buf), operator_index(csum_start),
                     operator_index(csum_offset)) < 0:
        return None
    return bytes(buf)


def finish_partial_checksum(packet, l2):
    """(the packet with an unfinished TCP/UDP checksum finished, whether it was), as 6."""
    buf = bytearray(packet) + b"\0"      # one spare byte keeps &view[0] valid for b""
    cdef unsigned char[::1] view = buf
    done = finish_partial_l4(&view[0], len(buf) - 1, operator_index(l2))
    return bytes(buf[:len(buf) - 1]), bool(done)


def segment_tcp4(packet, l2, mss):
    """The segments (without prefix) of a TCPv4 superpacket, or None if refused."""
    cdef const unsigned char[::1] view = bytes(packet)
    cdef tso_plan_t plan
    cdef uint32_t i, offset
    if view.shape[0] == 0 or not 0 <= mss <= 0xFFFF or l2 not in (0, TAP_L2):
        return None
    if tso_plan(&plan, &view[0], view.shape[0], l2, mss, 0) < 0:
        return None
    out = bytearray(plan.need)
    cdef unsigned char[::1] out_view = out
    tso_write(&plan, &view[0], &out_view[0])
    segments = []
    for i in range(plan.nseg):
        offset = i * plan.stride
        segments.append(bytes(out[offset:offset + tso_segment_len(&plan, i)]))
    return segments


def segment_udp4(packet, l2, mss):
    """The datagrams (without prefix) of a UDPv4 superpacket, or None if refused (7.)."""
    cdef const unsigned char[::1] view = bytes(packet)
    cdef tso_plan_t plan
    cdef uint32_t i, offset
    if view.shape[0] == 0 or not 0 <= mss <= 0xFFFF or l2 not in (0, TAP_L2):
        return None
    if uso_plan(&plan, &view[0], view.shape[0], l2, mss, 0) < 0:
        return None
    out = bytearray(plan.need)
    cdef unsigned char[::1] out_view = out
    uso_write(&plan, &view[0], &out_view[0])
    segments = []
    for i in range(plan.nseg):
        offset = i * plan.stride
        segments.append(bytes(out[offset:offset + tso_segment_len(&plan, i)]))
    return segments


def coalesce(packets, l2, uso=False):
    """The (virtio header, data) writes the coalescer makes of ``packets`` delivered in this
    order (written early whenever its arrays fill, as in the forwarder); ``uso``: UDP runs are
    merged too."""
    cdef gro_t g
    cdef unsigned char[::1] view
    if l2 not in (0, TAP_L2):
        raise ValueError("l2 must be 0 (tun) or 14 (tap)")
    # The coalescer edits heads in place; one spare byte keeps &view[0] valid for b"".
    buffers = [bytearray(p) + b"\0" for p in packets]
    writes = []
    gro_init(&g, l2, uso)
    try:
        for buf in buffers:
            if gro_full(&g):
                _coalesce_drain(&g, writes)
            view = buf
            gro_add(&g, &view[0], len(buf) - 1)
        _coalesce_drain(&g, writes)
    finally:
        gro_release(&g)
    return writes


cdef _coalesce_drain(gro_t *g, list writes):
    cdef vnet_hdr_t hdr
    cdef iovec iov[GRO_MAX_SEGS_C + 2]
    cdef int32_t i
    cdef int k, niov
    for i in range(g.nitems):
        niov = gro_prepare(g, i, &hdr, iov)
        data = b"".join([(<char *>iov[k].iov_base)[:iov[k].iov_len] for k in range(1, niov)])
        writes.append(((<char *>&hdr)[:VNET_HDR_LEN_C], data))
    g.nitems = 0
    g.nrecs = 0
