# What every forwarder shares (twin: overlayd/dataplane/forwarder_base.py).
#
# 1. Batches: inside_batch() read()s up to batch_size packets/frames from the device into
#    preallocated slots, each with HEADROOM_C bytes in front for outer headers (EAGAIN ends
#    the batch, EINTR retries, another error is raised after the batch went out);
#    outside_batch() does one recvmmsg(MSG_DONTWAIT). The GIL is released for the whole
#    batch; each slot goes to the subclass's _inside_one/_outside_one (virtual, nogil).
# 2. Send queues, one per tunnel socket (the receive socket, or each of tx_fds): _queue adds
#    an mmsghdr pointing into a slot and at the peer's sockaddr; a full queue or the end of
#    the batch sends it with sendmmsg (looping on partial sends; a refused datagram is a
#    tx_error and the next one is tried). Copies of one frame share its slot.
# 3. Peers: a datagram is accepted only from a peer's IP (any source port, lower_bound over
#    peers sorted by IP); per-peer counters follow (ip, port) across table swaps.
# 4. Capture (overlayd capture): while set_capture(True), each forwarded packet (inside, as
#    queued for its peer; a flood once, peer -1) and each delivered one (outside, as written
#    to the device) is copied into a bounded ring allocated when capture is first enabled;
#    what does not fit is counted as capture_dropped. drain_capture (GIL held, never during
#    a batch) turns the ring into Python objects and empties it. While disabled, the cost is
#    one branch on capture_on. While enabled, each batch reads the wall clock once on entry
#    (the data plane's only clock, and only then) and stamps its records with it: a request
#    and its reply are read in different batches, so a capture shows their RTT.
# 5. _RoutedBase: the router shared by the udp and vxlan routed paths - martians (RFC 1812
#    5.3.7: 0/8, 127/8, 224/4, 240/4, 255.255.255.255 as source or destination, both
#    directions; on receive also this host's own addresses as source), LPM, TTL with an
#    RFC 1624 checksum update, ICMP errors under a token bucket (RFC 1812), and the IPv4
#    checks of the outside path.
#
# Invariants: the per-packet code allocates nothing, logs nothing, touches no Python object;
# a batch pins its table generation, and set_tables/age refuse to run during a batch; every
# packet lands in exactly one of forwarded/delivered/a drop reason (floods: one per copy);
# fds are the caller's and never closed here.

cdef enum:
    HEADROOM_C = 64            # room for outer headers of encapsulating paths
    SLOT_SIZE_C = 65536        # any IPv4 packet fits (total length is 16 bits)
    SLOT_STRIDE = HEADROOM_C + SLOT_SIZE_C
    MAX_BATCH_C = 512
    TX_QUEUE_C = 512           # datagrams per socket queue before it is sent mid-batch
    MAX_TX_SOCKETS_C = 64
    CAPTURE_BYTES_C = 4 << 20      # capture ring: packet bytes held between two drains
    CAPTURE_RECORDS_C = 4096       # ... and packets
    TX_CTRL_C = 32                 # >= CMSG_SPACE(sizeof(uint16_t))
    RX_CTRL_C = 32                 # >= CMSG_SPACE(sizeof(int))
    BAD_READ_C = 0xFFFFFFFF        # in_len of a read too short to hold a virtio-net header
    GSO_FLOOR_C = 576 - 28         # a GSO send of datagrams this small refused with EINVAL:
                                   # no path MTU is that small, the socket cannot do GSO
    STAGE_BYTES_C = 1 << 20        # UDP GSO staging: runs of single datagrams copied together
    ANY_SOURCE_C = 0x7FFFFFFF      # _outside_peer with any_source: "the path finds the peer"
    SEAL_TAG_C = 16                # bytes a sealing path appends to each packet (Poly1305 tag)

HEADROOM = HEADROOM_C
SLOT_SIZE = SLOT_SIZE_C
MAX_BATCH = MAX_BATCH_C
CAPTURE_BYTES = CAPTURE_BYTES_C
CAPTURE_RECORDS = CAPTURE_RECORDS_C

ctypedef struct peer_t:
    sockaddr_in addr           # ready for sendmmsg (network order)
    uint32_t ip
    uint32_t port
    uint32_t path_mtu
    unsigned char mac[6]       # vxlan: the peer's VTEP MAC (zeros where the map has none)
    bint has_mac
    uint32_t gso_max_seg       # UDP GSO: largest datagram merged into a GSO send to this peer
                               # (lowered when a send of larger ones "did not fit")
    uint64_t tx_packets
    uint64_t tx_bytes          # inner bytes: the datagrams less the outer header we wrote
    uint64_t rx_packets
    uint64_t rx_bytes          # inner bytes: the datagrams less encap_len (before validation)
    uint64_t rx_accepted       # datagrams that passed every check (rx_packets - these = drops)

ctypedef struct ip_index_t:    # peers sorted by (ip, index): source IP -> first peer index
    uint32_t ip
    int32_t peer

ctypedef struct fwd_tables_t:
    const lpm_t *lpm
    uint32_t local_address
    int32_t npeers
    peer_t *peers
    ip_index_t *by_ip
    int32_t nhost
    uint32_t *host_addrs       # this host's own addresses, sorted: never an inner source

ctypedef struct capture_rec_t:  # one captured packet: cap_buf[offset:offset + length]
    uint32_t offset
    uint32_t length
    int32_t peer
    int32_t direction
    double ts                  # Unix time of the batch that read the packet

ctypedef struct txq_t:         # one tunnel socket's send queue
    int fd
    int n
    mmsghdr *msgs
    iovec *iov
    int32_t *peer
    uint32_t *seg_size         # UDP GSO: size of the entry's first datagram
    uint32_t *segs             # ... datagrams in the entry (1: a plain datagram)
    unsigned char *open        # ... whether the next segment may still join it
    unsigned char *ctrl        # ... TX_CTRL_C bytes per entry: the UDP_SEGMENT cmsg


@cython.final
cdef class _TableGeneration:
    """Owns one fwd_tables_t and the RouteTable its lpm points into."""

    cdef fwd_tables_t t
    cdef RouteTable routes

    def __cinit__(self):
        self.t.peers = NULL
        self.t.by_ip = NULL
        self.t.host_addrs = NULL
        self.t.nhost = 0

    def __dealloc__(self):
        free(self.t.peers)
        free(self.t.by_ip)
        free(self.t.host_addrs)


cdef inline void txq_set_gso(txq_t *q, int k) noexcept nogil:
    """Give entry k its UDP_SEGMENT cmsg (segment size q.seg_size[k])."""
    cdef cmsghdr *cm
    cdef uint16_t seg = <uint16_t>q.seg_size[k]
    q.msgs[k].msg_hdr.msg_control = q.ctrl + <size_t>k * TX_CTRL_C
    q.msgs[k].msg_hdr.msg_controllen = CMSG_SPACE(sizeof(uint16_t))
    cm = CMSG_FIRSTHDR(&q.msgs[k].msg_hdr)
    cm.cmsg_level = SOL_UDP_C
    cm.cmsg_type = UDP_SEGMENT_C
    cm.cmsg_len = CMSG_LEN(sizeof(uint16_t))
    memcpy(CMSG_DATA(cm), &seg, sizeof(uint16_t))


cdef _TableGeneration build_generation(tables):
    """ForwardingTables (routed) or SwitchTables (no local address, no routes)."""
    cdef _TableGeneration gen = _TableGeneration()
    cdef Py_ssize_t npeers, i
    cdef const unsigned char[::1] mac_view
    if tables is None:
        local_address, peers, routes, host = 0, (), (), ()
    else:
        local_address = getattr(tables, "local_address", 0)
        peers = tuple(tables.peers)
        routes = getattr(tables, "routes", ())
        host = getattr(tables, "host_addresses", ())
    own = set()
    for address in host:
        address = operator_index(address)
        if not 0 <= address <= 0xFFFFFFFF:
            raise ValueError(f"host_addresses: {address!r} is not a u32 IPv4 address")
        own.add(address)
    host = sorted(own)
    local_address = operator_index(local_address)
    if not 0 <= local_address <= 0xFFFFFFFF:
        raise ValueError(f"local_address {local_address!r} is not a u32 IPv4 address")
    npeers = len(peers)
    if npeers > 0x7FFFFFFF:
        raise ValueError("too many peers")
    gen.t.host_addrs = <uint32_t *>calloc(max(len(host), 1), sizeof(uint32_t))
    if gen.t.host_addrs == NULL:
        raise MemoryError()
    for i, address in enumerate(host):
        gen.t.host_addrs[i] = address
    gen.t.nhost = <int32_t>len(host)
    gen.t.peers = <peer_t *>calloc(max(npeers, 1), sizeof(peer_t))
    gen.t.by_ip = <ip_index_t *>calloc(max(npeers, 1), sizeof(ip_index_t))
    if gen.t.peers == NULL or gen.t.by_ip == NULL:
        raise MemoryError()
    order = []
    for i, peer in enumerate(peers):
        ip = operator_index(peer.ip)
        port = operator_index(peer.port)
        mtu = operator_index(peer.path_mtu)
        mac = bytes(getattr(peer, "mac", b""))
        if not 0 <= ip <= 0xFFFFFFFF:
            raise ValueError(f"peer {i}: ip {ip!r} is not a u32 IPv4 address")
        if not 0 <= port <= 0xFFFF:
            raise ValueError(f"peer {i}: port {port!r} out of range")
        if not 0 <= mtu <= 0xFFFFFFFF:
            raise ValueError(f"peer {i}: path_mtu {mtu!r} out of range")
        if len(mac) not in (0, 6):
            raise ValueError(f"peer {i}: mac must be 6 bytes (or empty), got {len(mac)}")
        gen.t.peers[i].ip = ip
        gen.t.peers[i].port = port
        gen.t.peers[i].path_mtu = mtu
        gen.t.peers[i].has_mac = len(mac) == 6
        gen.t.peers[i].gso_max_seg = GSO_MAX_BYTES_C
        if gen.t.peers[i].has_mac:
            mac_view = mac
            memcpy(gen.t.peers[i].mac, &mac_view[0], 6)
        gen.t.peers[i].addr.sin_family = AF_INET
        gen.t.peers[i].addr.sin_port = htons(port)
        gen.t.peers[i].addr.sin_addr.s_addr = htonl(ip)
        order.append((ip, i))
    order.sort()
    for i, (ip, index) in enumerate(order):
        gen.t.by_ip[i].ip = ip
        gen.t.by_ip[i].peer = index
    gen.t.npeers = <int32_t>npeers
    gen.routes = RouteTable(routes)
    gen.routes.check_targets(npeers)
    gen.t.lpm = gen.routes.lpm()
    gen.t.local_address = local_address
    return gen


cdef dict peer_index_map(const fwd_tables_t *old, const fwd_tables_t *new):
    """Old peer index -> new index for peers whose (ip, port) is in both generations (a
    duplicate (ip, port) maps its first occurrence only)."""
    cdef int32_t i, j
    first_new = {}
    for i in range(new.npeers):
        first_new.setdefault((new.peers[i].ip, new.peers[i].port), i)
    out = {}
    for i in range(old.npeers):
        j = first_new.pop((old.peers[i].ip, old.peers[i].port), -1)
        if j >= 0:
            out[i] = j
    return out


cdef inline void seal_plan(tso_plan_t *p) noexcept nogil:
    """Room behind each segment for its padding to 16 and its tag, so that sealed full-size
    segments still lie back to back (one UDP GSO send); the last one may need up to 15 bytes
    of padding."""
    cdef uint32_t full = p.hdr + p.mss
    cdef uint32_t last = p.payload - (p.nseg - 1) * p.mss
    p.stride += ((full + 15) & ~(<uint32_t>15)) - full + SEAL_TAG_C
    p.need = <size_t>(p.nseg - 1) * p.stride + p.prefix + p.hdr + last + 15 + SEAL_TAG_C


cdef inline int32_t peer_by_ip(const fwd_tables_t *t, uint32_t ip) noexcept nogil:
    # lower_bound, so among peers sharing an IP the lowest index answers, like the twin's dict.
    cdef int32_t lo = 0, hi = t.npeers, mid
    while lo < hi:
        mid = (lo + hi) >> 1
        if t.by_ip[mid].ip < ip:
            lo = mid + 1
        else:
            hi = mid
    if lo < t.npeers and t.by_ip[lo].ip == ip:
        return t.by_ip[lo].peer
    return -1


cdef inline bint is_host_address(const fwd_tables_t *t, uint32_t ip) noexcept nogil:
    cdef int32_t lo = 0, hi = t.nhost, mid
    while lo < hi:
        mid = (lo + hi) >> 1
        if t.host_addrs[mid] < ip:
            lo = mid + 1
        else:
            hi = mid
    return lo < t.nhost and t.host_addrs[lo] == ip


cdef inline bint martian(uint32_t ip) noexcept nogil:
    """RFC 1812 5.3.7: 0/8, 127/8, and from 224.0.0.0 up (multicast, 240/4, broadcast)."""
    return (ip >> 24) == 0 or (ip >> 24) == 127 or ip >= 0xE0000000u


cdef extern from *:
    int __builtin_clz(unsigned int x) nogil


cdef inline int batch_bucket(int n) noexcept nogil:
    if n <= 1:
        return 0
    return 32 - __builtin_clz(<unsigned int>(n - 1))


cdef inline bint transient_recv_error(int e) noexcept nogil:
    # Errors about one earlier datagram or a passing underlay state, not about the socket.
    return (e == EAGAIN or e == EWOULDBLOCK or e == EINTR or e == ECONNREFUSED
            or e == ECONNRESET or e == EHOSTUNREACH or e == EHOSTDOWN or e == ENETUNREACH
            or e == ENETDOWN or e == ENOBUFS or e == ENOMEM or e == EMSGSIZE
            or e == ETIMEDOUT or e == EPROTO)


cdef class _ForwarderBase:
    """Batches, send queues, peers and counters over a device fd and UDP socket fds, all
    owned by the caller. Subclasses call _setup() from their __cinit__ and implement
    _inside_one and _outside_one."""

    cdef int dev_fd
    cdef int sock_fd
    cdef int batch_size
    cdef bint busy
    cdef uint64_t ctr[N_COUNTERS]
    cdef uint64_t hist_inside[BATCH_BUCKETS_C]
    cdef uint64_t hist_outside[BATCH_BUCKETS_C]
    cdef _TableGeneration gen
    cdef object name
    # inside
    cdef unsigned char *in_buf
    cdef uint32_t *in_len
    cdef int ntx
    cdef txq_t txq[MAX_TX_SOCKETS_C]
    # outside
    cdef unsigned char *out_buf
    cdef mmsghdr *rx_msgs
    cdef iovec *rx_iov
    cdef sockaddr_in *rx_names
    # offloads (offload.pxi)
    cdef bint vnet             # device reads and writes carry a virtio-net header
    cdef bint gso              # UDP_SEGMENT on sends (turned off if the kernel refuses)
    cdef bint gro              # the receive socket has UDP_GRO: split coalesced receives
    cdef bint uso              # the device does USO (TUN_F_USO4/6): UDP superpackets are read
                               # from it and runs of one UDP flow written to it as one
    cdef uint32_t encap_len    # outer header bytes the path writes in front of a packet
    cdef uint32_t l2_len       # 0 (tun) or 14 (tap): link header in front of IPv4
    cdef unsigned char *arena  # segments of superpackets, until the queues are sent
    cdef unsigned char *stage  # runs of queued single datagrams, copied for one GSO send
    cdef size_t arena_used
    cdef unsigned char *rx_ctrl
    cdef gro_t pending         # coalescer of delivered packets, written at the end of a batch
    # capture
    cdef bint capture_on
    cdef unsigned char *cap_buf
    cdef capture_rec_t *cap_recs
    cdef uint32_t cap_n
    cdef uint32_t cap_used
    cdef double cap_time       # wall clock at the start of the running batch (capture on)
    # wireguard: datagrams are accepted from any source (the path authenticates them by key)
    # and each sealed packet grows by padding and a tag, so segments need room behind them too
    cdef bint any_source
    cdef const sockaddr_in *rx_from    # any_source: the source of the datagram being handled
    cdef bint seal_tail

    def __cinit__(self, *args, **kwargs):
        self.in_buf = NULL
        self.out_buf = NULL
        self.arena = NULL
        self.stage = NULL
        self.rx_ctrl = NULL
        self.pending.items = NULL
        self.pending.recs = NULL
        self.vnet = False
        self.gso = False
        self.gro = False
        self.uso = False
        self.capture_on = False
        self.cap_buf = NULL
        self.cap_recs = NULL
        self.cap_n = 0
        self.cap_used = 0
        self.ntx = 0
        self.busy = False
        memset(self.ctr, 0, sizeof(self.ctr))
        memset(self.hist_inside, 0, sizeof(self.hist_inside))
        memset(self.hist_outside, 0, sizeof(self.hist_outside))
        memset(self.txq, 0, sizeof(self.txq))

    cdef int _setup(self, str name, dev_fd, sock_fd, tx_fds, batch_size, offloads,
                    uint32_t encap_len, uint32_t l2_len) except -1:
        """offloads: (vnet_hdr, udp_gso, udp_gro, device_uso) as the caller configured the
        fds (device_uso needs vnet_hdr)."""
        cdef int i, k
        self.name = name
        vnet_hdr, udp_gso, udp_gro, device_uso = offloads
        self.vnet = bool(vnet_hdr)
        self.gso = bool(udp_gso)
        self.gro = bool(udp_gro)
        self.uso = bool(device_uso) and self.vnet
        self.encap_len = encap_len
        self.l2_len = l2_len
        dev_fd = operator_index(dev_fd)
        sock_fd = operator_index(sock_fd)
        batch_size = operator_index(batch_size)
        fds = [operator_index(fd) for fd in tx_fds]
        if not 1 <= batch_size <= MAX_BATCH_C:
            raise ValueError(f"batch_size must be 1..{MAX_BATCH_C}, got {batch_size}")
        if dev_fd < 0 or sock_fd < 0:
            raise ValueError("the device fd and sock_fd must be open file descriptors")
        if len(fds) > MAX_TX_SOCKETS_C:
            raise ValueError(f"at most {MAX_TX_SOCKETS_C} tx_fds, got {len(fds)}")
        if any(fd < 0 for fd in fds):
            raise ValueError("tx_fds must be open file descriptors")
        self.dev_fd = dev_fd
        self.sock_fd = sock_fd
        self.batch_size = batch_size
        # malloc, not calloc, for the slots: untouched pages cost no RSS until packets use them.
        self.in_buf = <unsigned char *>malloc(<size_t>SLOT_STRIDE * batch_size)
        self.out_buf = <unsigned char *>malloc(<size_t>SLOT_STRIDE * batch_size)
        self.in_len = <uint32_t *>calloc(batch_size, sizeof(uint32_t))
        self.rx_msgs = <mmsghdr *>calloc(batch_size, sizeof(mmsghdr))
        self.rx_iov = <iovec *>calloc(batch_size, sizeof(iovec))
        self.rx_names = <sockaddr_in *>calloc(batch_size, sizeof(sockaddr_in))
        if (self.in_buf == NULL or self.out_buf == NULL or self.in_len == NULL
                or self.rx_msgs == NULL or self.rx_iov == NULL or self.rx_names == NULL):
            raise MemoryError()
        if self.vnet:
            self.arena = <unsigned char *>malloc(SEG_ARENA_BYTES_C)
            if self.arena == NULL:
                raise MemoryError()
            gro_init(&self.pending, l2_len, self.uso)
        if self.gso:
            # malloc: untouched pages cost no RSS until runs of datagrams fill them.
            self.stage = <unsigned char *>malloc(STAGE_BYTES_C)
            if self.stage == NULL:
                raise MemoryError()
        if self.gro:
            self.rx_ctrl = <unsigned char *>calloc(batch_size, RX_CTRL_C)
            if self.rx_ctrl == NULL:
                raise MemoryError()
        for i in range(batch_size):
            self.rx_iov[i].iov_base = self.out_buf + <size_t>i * SLOT_STRIDE + HEADROOM_C
            self.rx_iov[i].iov_len = SLOT_SIZE_C
            self.rx_msgs[i].msg_hdr.msg_iov = &self.rx_iov[i]
            self.rx_msgs[i].msg_hdr.msg_iovlen = 1
            self.rx_msgs[i].msg_hdr.msg_name = &self.rx_names[i]
        self.ntx = max(1, len(fds))
        for k in range(self.ntx):
            self.txq[k].fd = fds[k] if fds else sock_fd
            self.txq[k].msgs = <mmsghdr *>calloc(TX_QUEUE_C, sizeof(mmsghdr))
            self.txq[k].iov = <iovec *>calloc(TX_QUEUE_C, sizeof(iovec))
            self.txq[k].peer = <int32_t *>calloc(TX_QUEUE_C, sizeof(int32_t))
            self.txq[k].seg_size = <uint32_t *>calloc(TX_QUEUE_C, sizeof(uint32_t))
            self.txq[k].segs = <uint32_t *>calloc(TX_QUEUE_C, sizeof(uint32_t))
            self.txq[k].open = <unsigned char *>calloc(TX_QUEUE_C, 1)
            self.txq[k].ctrl = <unsigned char *>calloc(TX_QUEUE_C, TX_CTRL_C)
            if (self.txq[k].msgs == NULL or self.txq[k].iov == NULL or self.txq[k].peer == NULL
                    or self.txq[k].seg_size == NULL or self.txq[k].segs == NULL
                    or self.txq[k].open == NULL or self.txq[k].ctrl == NULL):
                raise MemoryError()
            for i in range(TX_QUEUE_C):
                self.txq[k].msgs[i].msg_hdr.msg_iov = &self.txq[k].iov[i]
                self.txq[k].msgs[i].msg_hdr.msg_iovlen = 1
                self.txq[k].msgs[i].msg_hdr.msg_namelen = sizeof(sockaddr_in)
        self.gen = build_generation(None)
        return 0

    def __dealloc__(self):
        cdef int k
        free(self.in_buf)
        free(self.out_buf)
        free(self.in_len)
        free(self.rx_msgs)
        free(self.rx_iov)
        free(self.rx_names)
        free(self.cap_buf)
        free(self.cap_recs)
        free(self.arena)
        free(self.stage)
        free(self.rx_ctrl)
        gro_release(&self.pending)
        for k in range(MAX_TX_SOCKETS_C):
            free(self.txq[k].msgs)
            free(self.txq[k].iov)
            free(self.txq[k].peer)
            free(self.txq[k].seg_size)
            free(self.txq[k].segs)
            free(self.txq[k].open)
            free(self.txq[k].ctrl)

    # --- control (GIL held) ----------------------------------------------------------------

    def counters(self) -> dict:
        return {name: self.ctr[i] for i, name in enumerate(COUNTER_NAMES)}

    def peer_counters(self) -> list:
        cdef const fwd_tables_t *t = &self.gen.t
        return [(t.peers[i].tx_packets, t.peers[i].tx_bytes,
                 t.peers[i].rx_packets, t.peers[i].rx_bytes) for i in range(t.npeers)]

    def peer_rx_accepted(self) -> list:
        """Per peer: received datagrams that passed every check and went to the device."""
        cdef const fwd_tables_t *t = &self.gen.t
        return [t.peers[i].rx_accepted for i in range(t.npeers)]

    def offloads(self) -> dict:
        """Which offloads are in use now (udp_gso turns off if the kernel refused it)."""
        return {"vnet_hdr": bool(self.vnet), "udp_gso": bool(self.gso), "udp_gro": bool(self.gro),
                "device_uso": bool(self.uso)}

    def batch_histogram(self) -> tuple:
        return ([self.hist_inside[i] for i in range(BATCH_BUCKETS_C)],
                [self.hist_outside[i] for i in range(BATCH_BUCKETS_C)])

    def set_capture(self, enabled) -> None:
        """Start or stop copying packets for capture; what was copied stays until drained."""
        if enabled and self.cap_buf == NULL:
            # malloc: untouched pages of the ring cost no RSS until packets fill them.
            self.cap_buf = <unsigned char *>malloc(CAPTURE_BYTES_C)
            self.cap_recs = <capture_rec_t *>malloc(CAPTURE_RECORDS_C * sizeof(capture_rec_t))
            if self.cap_buf == NULL or self.cap_recs == NULL:
                free(self.cap_buf)
                free(self.cap_recs)
                self.cap_buf = NULL
                self.cap_recs = NULL
                raise MemoryError()
        self.capture_on = bool(enabled)

    def drain_capture(self) -> list:
        """[(direction, peer, packet, ts)] copied since the last drain, oldest first; empties
        the ring. direction 0 = inside (to ``peer``), 1 = outside (from ``peer``); peer -1 = a
        flood; ts = Unix time the batch that read it began."""
        cdef uint32_t i
        cdef capture_rec_t *r
        if self.cap_n == 0:
            return []
        self._enter()
        try:
            out = []
            for i in range(self.cap_n):
                r = &self.cap_recs[i]
                out.append((r.direction, r.peer,
                            (<char *>self.cap_buf)[r.offset:r.offset + r.length], r.ts))
            self.cap_n = 0
            self.cap_used = 0
        finally:
            self.busy = False
        return out

    cdef int _enter(self) except -1:
        # Batches share buffers, counters and (switched) the FDB; a second thread must not run
        # one concurrently, nor change the FDB while one runs. Check-and-set is atomic here:
        # no Python code runs between them.
        if self.busy:
            raise RuntimeError(f"{self.name}: a batch is already running (not re-entrant)")
        self.busy = True
        return 0

    cdef dict _swap(self, _TableGeneration new):
        """Carry per-peer counters over by (ip, port), swap the generation in; the index map."""
        cdef _TableGeneration old = self.gen
        cdef int32_t i, j
        index_map = peer_index_map(&old.t, &new.t)
        for i, j in index_map.items():
            new.t.peers[j].tx_packets = old.t.peers[i].tx_packets
            new.t.peers[j].tx_bytes = old.t.peers[i].tx_bytes
            new.t.peers[j].rx_packets = old.t.peers[i].rx_packets
            new.t.peers[j].rx_bytes = old.t.peers[i].rx_bytes
            new.t.peers[j].rx_accepted = old.t.peers[i].rx_accepted
        self.gen = new
        return index_map

    @cython.final
    cdef inline void _capture(self, int direction, int32_t peer, const unsigned char *data,
                              uint32_t n) noexcept nogil:
        """Hot: copy one packet into the capture ring, or count it as not captured. Call only
        while capture_on (the caller's branch is the whole cost of a disabled capture)."""
        cdef capture_rec_t *r
        if self.cap_n >= CAPTURE_RECORDS_C or n > CAPTURE_BYTES_C - self.cap_used:
            self.ctr[CTR_CAPTURE_DROPPED] += 1
            return
        r = &self.cap_recs[self.cap_n]
        r.offset = self.cap_used
        r.length = n
        r.peer = peer
        r.direction = direction
        r.ts = self.cap_time
        memcpy(self.cap_buf + self.cap_used, data, n)
        self.cap_used += n
        self.cap_n += 1

    # --- inside: device -> underlay --------------------------------------------------------

    def inside_batch(self) -> int:
        cdef _TableGeneration gen = self.gen     # pinned for the whole batch
        cdef const fwd_tables_t *t = &gen.t
        cdef int n = 0
        cdef int err = 0
        self._enter()
        if self.capture_on:
            self.cap_time = wall_clock()
        try:
            with nogil:
                n = self._inside_run(t, &err)
        finally:
            self.busy = False
        if err:
            raise OSError(err, strerror(err))
        return n

    cdef int _inside_run(self, const fwd_tables_t *t, int *err) noexcept nogil:
        cdef int n = 0, i
        cdef ssize_t r
        cdef unsigned char *slot
        cdef size_t hdr = VNET_HDR_LEN_C if self.vnet else 0
        while n < self.batch_size:
            # With a virtio-net header, it lands in the last bytes of the headroom.
            slot = self.in_buf + <size_t>n * SLOT_STRIDE + HEADROOM_C
            r = read(self.dev_fd, slot - hdr, SLOT_SIZE_C + hdr)
            if r < 0:
                if errno == EINTR:
                    continue
                if errno != EAGAIN and errno != EWOULDBLOCK:
                    err[0] = errno
                break
            self.in_len[n] = <uint32_t>(r - hdr) if <size_t>r >= hdr else BAD_READ_C
            n += 1
        self.arena_used = 0
        for i in range(n):
            slot = self.in_buf + <size_t>i * SLOT_STRIDE + HEADROOM_C
            if self.vnet:
                self._inside_offloaded(t, slot, self.in_len[i])
            else:
                self._inside_one(t, slot, self.in_len[i])
        self._flush(t)
        if n:
            self.hist_inside[batch_bucket(n)] += 1
        return n

    cdef void _inside_one(self, const fwd_tables_t *t, unsigned char *pkt,
                          uint32_t n) noexcept nogil:
        pass

    @cython.final
    cdef void _inside_offloaded(self, const fwd_tables_t *t, unsigned char *pkt,
                                uint32_t n) noexcept nogil:
        """A read with a virtio-net header in front: finish its checksum, or cut a TCP
        superpacket into segments laid out for UDP GSO; each goes to _inside_one."""
        cdef vnet_hdr_t h
        cdef tso_plan_t plan
        cdef unsigned char *run
        cdef uint32_t i, gso_type
        cdef int refused
        # A read the offload path refuses is still a read: counted as one inside packet, so
        # that inside_packets = forwarded + tx_error + the inside drops holds exactly.
        if n == BAD_READ_C:
            self.ctr[CTR_INSIDE_PACKETS] += 1
            self.ctr[CTR_INSIDE_BAD_OFFLOAD] += 1
            return
        memcpy(&h, pkt - VNET_HDR_LEN_C, VNET_HDR_LEN_C)
        gso_type = h.gso_type & ~VNET_GSO_ECN_C
        if gso_type == VNET_GSO_NONE_C:
            if (h.flags & VNET_F_NEEDS_CSUM_C) and complete_csum(pkt, n, h.csum_start,
                                                                 h.csum_offset) < 0:
                self._bad_offload(n)
                return
            self._inside_one(t, pkt, n)
            return
        if gso_type == VNET_GSO_TCPV4_C:
            refused = tso_plan(&plan, pkt, n, self.l2_len, h.gso_size, self.encap_len)
        elif gso_type == VNET_GSO_UDP_L4_C and self.uso:
            refused = uso_plan(&plan, pkt, n, self.l2_len, h.gso_size, self.encap_len)
        else:
            refused = -1
        if refused < 0:
            self._bad_offload(n)
            return
        if self.seal_tail:
            seal_plan(&plan)
        if plan.need > SEG_ARENA_BYTES_C:
            self._bad_offload(n)
            return
        if plan.need > SEG_ARENA_BYTES_C - self.arena_used:
            self._flush(t)          # queued datagrams may point into the arena
            self.arena_used = 0
        run = self.arena + self.arena_used
        self.arena_used += (plan.need + 15) & ~(<size_t>15)
        if gso_type == VNET_GSO_TCPV4_C:
            tso_write(&plan, pkt, run)
            self.ctr[CTR_OFFLOAD_SUPERPACKETS] += 1
            self.ctr[CTR_OFFLOAD_SEGMENTS] += plan.nseg
        else:
            uso_write(&plan, pkt, run)
            self.ctr[CTR_OFFLOAD_UDP_SUPERPACKETS] += 1
            self.ctr[CTR_OFFLOAD_UDP_SEGMENTS] += plan.nseg
        for i in range(plan.nseg):
            self._inside_one(t, run + plan.prefix + <size_t>i * plan.stride,
                             tso_segment_len(&plan, i))

    @cython.final
    cdef inline void _bad_offload(self, uint32_t n) noexcept nogil:
        self.ctr[CTR_INSIDE_PACKETS] += 1
        self.ctr[CTR_INSIDE_BYTES] += n
        self.ctr[CTR_INSIDE_BAD_OFFLOAD] += 1

    @cython.final
    cdef void _queue(self, const fwd_tables_t *t, unsigned char *data, size_t n,
                            int32_t peer, int sock) noexcept nogil:
        cdef txq_t *q = &self.txq[sock]
        cdef int k = q.n - 1
        if (self.gso and k >= 0 and q.open[k] and q.peer[k] == peer
                and <unsigned char *>q.iov[k].iov_base + q.iov[k].iov_len == data
                and n <= q.seg_size[k] and q.seg_size[k] <= t.peers[peer].gso_max_seg
                and q.segs[k] < GSO_MAX_SEGS_C
                and q.iov[k].iov_len + n <= GSO_MAX_BYTES_C):
            # The next segment of the same superpacket to the same peer: one GSO send.
            q.iov[k].iov_len += n
            q.segs[k] += 1
            if n < q.seg_size[k]:
                q.open[k] = False
            if q.segs[k] == 2:
                txq_set_gso(q, k)
            return
        k = q.n
        q.iov[k].iov_base = data
        q.iov[k].iov_len = n
        q.msgs[k].msg_hdr.msg_name = <void *>&t.peers[peer].addr
        q.msgs[k].msg_hdr.msg_control = NULL
        q.msgs[k].msg_hdr.msg_controllen = 0
        q.peer[k] = peer
        q.seg_size[k] = n
        q.segs[k] = 1
        q.open[k] = True
        q.n += 1
        if q.n == TX_QUEUE_C:
            self._send(t, q)

    @cython.final
    cdef void _flush(self, const fwd_tables_t *t) noexcept nogil:
        cdef int k
        for k in range(self.ntx):
            if self.txq[k].n:
                self._send(t, &self.txq[k])

    @cython.final
    cdef void _stage_runs(self, const fwd_tables_t *t, txq_t *q) noexcept nogil:
        """UDP GSO for datagrams that do not lie back to back: copy each run of single
        datagrams to one peer (all of the first one's size, the last may be shorter) into the
        staging buffer and make it one GSO entry. A memcpy of a packet costs far less than the
        kernel's per-datagram trip through UDP, IP and the device that one send saves."""
        cdef int i = 0, j, w = 0, k
        cdef size_t used = 0, total, size, first
        cdef unsigned char *dst
        while i < q.n:
            j = i + 1
            first = q.iov[i].iov_len
            total = first
            if q.segs[i] == 1 and first <= t.peers[q.peer[i]].gso_max_seg:
                while (j < q.n and q.segs[j] == 1 and q.peer[j] == q.peer[i]
                       and j - i < GSO_MAX_SEGS_C):
                    size = q.iov[j].iov_len
                    if (size > first or total + size > GSO_MAX_BYTES_C
                            or used + total + size > STAGE_BYTES_C):
                        break
                    total += size
                    j += 1
                    if size < first:
                        break
            if j - i >= 2:
                dst = self.stage + used
                for k in range(i, j):
                    memcpy(dst, q.iov[k].iov_base, q.iov[k].iov_len)
                    dst += q.iov[k].iov_len
                q.iov[w].iov_base = self.stage + used
                q.iov[w].iov_len = total
                used += total
                q.segs[w] = j - i
                q.seg_size[w] = first
            else:                # as it was (perhaps already a GSO run from the arena)
                q.iov[w] = q.iov[i]
                q.segs[w] = q.segs[i]
                q.seg_size[w] = q.seg_size[i]
            q.msgs[w].msg_hdr.msg_name = q.msgs[i].msg_hdr.msg_name
            q.peer[w] = q.peer[i]
            q.open[w] = False
            if q.segs[w] > 1:
                txq_set_gso(q, w)
            else:
                q.msgs[w].msg_hdr.msg_control = NULL
                q.msgs[w].msg_hdr.msg_controllen = 0
            w += 1
            i = j
        q.n = w

    @cython.final
    cdef void _send(self, const fwd_tables_t *t, txq_t *q) noexcept nogil:
        cdef int i = 0, k, sent
        cdef peer_t *peer
        if self.gso and q.n > 1:
            self._stage_runs(t, q)
        while i < q.n:
            sent = sendmmsg(q.fd, &q.msgs[i], q.n - i, MSG_DONTWAIT)
            if sent < 0 and errno == EINTR:
                continue
            if sent <= 0:
                # The kernel refused msgs[i] (sendmmsg reports an error only when the first
                # datagram fails): count it and go on with the rest.
                if q.segs[i] > 1:
                    self._send_gso_singly(t, q, i, errno)
                else:
                    self.ctr[CTR_TX_ERROR] += 1
                i += 1
                continue
            for k in range(i, i + sent):
                peer = &t.peers[q.peer[k]]
                peer.tx_packets += q.segs[k]
                peer.tx_bytes += q.iov[k].iov_len - <size_t>q.segs[k] * self.encap_len
                self.ctr[CTR_FORWARDED_PACKETS] += q.segs[k]
                if q.segs[k] > 1:
                    self.ctr[CTR_OFFLOAD_GSO_SENDS] += 1
            i += sent
        q.n = 0

    @cython.final
    cdef void _send_gso_singly(self, const fwd_tables_t *t, txq_t *q, int i,
                               int error) noexcept nogil:
        """The kernel refused GSO entry i: send its datagrams one by one. EINVAL (EMSGSIZE
        on newer kernels) for datagrams larger than GSO_FLOOR_C says this send did not fit (with
        IP_PMTUDISC_DONT the kernel refuses a GSO segment larger than the egress MTU, which
        it would fragment if sent alone): datagrams of that size go to this peer singly from
        now on, until the map changes. Anything else that says the socket or route cannot do
        GSO at all (EIO, ENOPROTOOPT, EOPNOTSUPP, or EINVAL for small datagrams) turns GSO
        off for good."""
        cdef unsigned char *data = <unsigned char *>q.iov[i].iov_base
        cdef size_t left = q.iov[i].iov_len, size
        cdef peer_t *peer = &t.peers[q.peer[i]]
        cdef ssize_t r
        self.ctr[CTR_OFFLOAD_GSO_REFUSED] += 1
        if (error == EINVAL or error == EMSGSIZE) and q.seg_size[i] > GSO_FLOOR_C:
            if peer.gso_max_seg >= q.seg_size[i]:
                peer.gso_max_seg = q.seg_size[i] - 1
        elif error == EIO or error == EINVAL or error == ENOPROTOOPT or error == EOPNOTSUPP:
            self.gso = False
        while left:
            size = q.seg_size[i] if left > q.seg_size[i] else left
            r = sendto(q.fd, data, size, MSG_DONTWAIT, &peer.addr, sizeof(sockaddr_in))
            if r < 0 and errno == EINTR:
                continue
            if r < 0:
                self.ctr[CTR_TX_ERROR] += 1
            else:
                peer.tx_packets += 1
                peer.tx_bytes += size - self.encap_len
                self.ctr[CTR_FORWARDED_PACKETS] += 1
            data += size
            left -= size

    @cython.final
    cdef ssize_t _write_device(self, const unsigned char *data, size_t n) noexcept nogil:
        cdef ssize_t r
        cdef iovec iov[2]
        iov[0].iov_base = &PLAIN_VNET_HDR
        iov[0].iov_len = VNET_HDR_LEN_C
        iov[1].iov_base = <void *>data
        iov[1].iov_len = n
        while True:
            r = writev(self.dev_fd, iov, 2) if self.vnet else write(self.dev_fd, data, n)
            if r >= 0 or errno != EINTR:
                return r

    # --- outside: underlay -> device -------------------------------------------------------

    def outside_batch(self) -> int:
        cdef _TableGeneration gen = self.gen     # pinned for the whole batch
        cdef const fwd_tables_t *t = &gen.t
        cdef int n = 0
        cdef int err = 0
        self._enter()
        if self.capture_on:
            self.cap_time = wall_clock()
        try:
            with nogil:
                n = self._outside_run(t, &err)
        finally:
            self.busy = False
        if err:
            raise OSError(err, strerror(err))
        return n

    cdef int _outside_run(self, const fwd_tables_t *t, int *err) noexcept nogil:
        cdef int n, i
        cdef int32_t peer
        cdef uint32_t size, offset, length
        cdef unsigned char *data
        for i in range(self.batch_size):
            # The kernel overwrites these on every receive.
            self.rx_msgs[i].msg_hdr.msg_namelen = sizeof(sockaddr_in)
            self.rx_msgs[i].msg_hdr.msg_flags = 0
            if self.gro:
                self.rx_msgs[i].msg_hdr.msg_control = self.rx_ctrl + <size_t>i * RX_CTRL_C
                self.rx_msgs[i].msg_hdr.msg_controllen = RX_CTRL_C
        n = recvmmsg(self.sock_fd, self.rx_msgs, self.batch_size, MSG_DONTWAIT, NULL)
        if n < 0:
            if not transient_recv_error(errno):
                err[0] = errno
            return 0
        for i in range(n):
            data = <unsigned char *>self.rx_iov[i].iov_base
            length = self.rx_msgs[i].msg_len
            size = self._gro_size(i) if self.gro else 0
            if size == 0 or length <= size or (self.rx_msgs[i].msg_hdr.msg_flags & MSG_TRUNC):
                peer = self._outside_peer(t, i, length)
                if peer >= 0:
                    self._outside_one(t, data, length, peer)
                continue
            # UDP GRO: a run of datagrams of `size` bytes (the last may be shorter).
            self.ctr[CTR_OFFLOAD_GRO_RECEIVES] += 1
            offset = 0
            while offset < length:
                size = min(size, length - offset)
                peer = self._outside_peer(t, i, size)
                if peer >= 0:
                    self._outside_one(t, data + offset, size, peer)
                offset += size
        if self.vnet:
            self._pending_flush()
        if n:
            self.hist_outside[batch_bucket(n)] += 1
        return n

    @cython.final
    cdef uint32_t _gro_size(self, int i) noexcept nogil:
        """The UDP_GRO segment size of receive i, or 0. Without a whole UDP_GRO cmsg, a
        control message cut short (the kernel's MSG_CTRUNC: another cmsg took the room) or a
        UDP_GRO cmsg too short for its int leaves the run's datagram boundaries unknown: the
        receive is then marked MSG_TRUNC, and dropped and counted as truncated, rather than
        handled as one datagram."""
        cdef msghdr *hdr = &self.rx_msgs[i].msg_hdr
        cdef cmsghdr *cm = CMSG_FIRSTHDR(hdr)
        cdef int size
        while cm != NULL:
            if cm.cmsg_level == SOL_UDP_C and cm.cmsg_type == UDP_GRO_C:
                if cm.cmsg_len < CMSG_LEN(sizeof(int)):
                    break
                memcpy(&size, CMSG_DATA(cm), sizeof(int))
                return <uint32_t>size if size > 0 else 0
            cm = CMSG_NXTHDR(hdr, cm)
        else:
            if not (hdr.msg_flags & MSG_CTRUNC):
                return 0
        hdr.msg_flags |= MSG_TRUNC
        return 0

    @cython.final
    cdef int32_t _outside_peer(self, const fwd_tables_t *t, int i, uint32_t n) noexcept nogil:
        """Count a datagram of n bytes from receive i; the peer it came from, or -1 (dropped
        and counted as truncated or from an unknown source)."""
        cdef msghdr *hdr = &self.rx_msgs[i].msg_hdr
        cdef const sockaddr_in *name = &self.rx_names[i]
        cdef int32_t peer = -1
        cdef bint ok
        self.ctr[CTR_OUTSIDE_PACKETS] += 1
        self.ctr[CTR_OUTSIDE_BYTES] += n
        if hdr.msg_flags & MSG_TRUNC:
            self.ctr[CTR_OUTSIDE_TRUNCATED] += 1
            return -1
        if self.any_source:
            ok = hdr.msg_namelen >= sizeof(sockaddr_in) and name.sin_family == AF_INET
            self.rx_from = name if ok else NULL
            return ANY_SOURCE_C
        if hdr.msg_namelen >= sizeof(sockaddr_in) and name.sin_family == AF_INET:
            peer = peer_by_ip(t, ntohl(name.sin_addr.s_addr))
        if peer < 0:
            self.ctr[CTR_OUTSIDE_UNKNOWN_PEER] += 1
            return -1
        t.peers[peer].rx_packets += 1
        t.peers[peer].rx_bytes += n - self.encap_len if n > self.encap_len else 0
        return peer

    cdef void _outside_one(self, const fwd_tables_t *t, unsigned char *pkt, uint32_t n,
                           int32_t peer) noexcept nogil:
        pass

    @cython.final
    cdef void _emit(self, const fwd_tables_t *t, unsigned char *pkt, uint32_t n,
                    int32_t peer) noexcept nogil:
        """Deliver a checked packet (tun) or frame (tap) into the device: at once, or with a
        virtio-net header through the coalescer, written when the batch ends. A checksum a
        kernel VTEP left unfinished is finished first (offload.pxi 6.)."""
        if finish_partial_l4(pkt, n, self.l2_len):
            self.ctr[CTR_OFFLOAD_CHECKSUMS_FINISHED] += 1
        t.peers[peer].rx_accepted += 1
        if not self.vnet:
            if self._write_device(pkt, n) >= 0:
                self.ctr[CTR_DELIVERED_PACKETS] += 1
                if self.capture_on:
                    self._capture(1, peer, pkt, n)
            else:
                self.ctr[CTR_DEVICE_WRITE_ERROR] += 1
            return
        if self.capture_on:
            self._capture(1, peer, pkt, n)
        if gro_full(&self.pending):
            self._pending_flush()
        gro_add(&self.pending, pkt, n)

    @cython.final
    cdef void _pending_flush(self) noexcept nogil:
        cdef vnet_hdr_t hdr
        cdef iovec iov[GRO_MAX_SEGS_C + 2]
        cdef int32_t i
        cdef int niov
        cdef uint32_t segs
        cdef ssize_t r
        for i in range(self.pending.nitems):
            niov = gro_prepare(&self.pending, i, &hdr, iov)
            segs = self.pending.items[i].segs
            while True:
                r = writev(self.dev_fd, iov, niov)
                if r >= 0 or errno != EINTR:
                    break
            if r < 0:
                self.ctr[CTR_DEVICE_WRITE_ERROR] += segs
                continue
            self.ctr[CTR_DELIVERED_PACKETS] += segs
            if segs > 1 and self.pending.items[i].proto == PROTO_UDP:
                self.ctr[CTR_OFFLOAD_UDP_COALESCED_WRITES] += 1
                self.ctr[CTR_OFFLOAD_UDP_COALESCED_SEGMENTS] += segs
            elif segs > 1:
                self.ctr[CTR_OFFLOAD_COALESCED_WRITES] += 1
                self.ctr[CTR_OFFLOAD_COALESCED_SEGMENTS] += segs
        self.pending.nitems = 0
        self.pending.nrecs = 0


cdef class _RoutedBase(_ForwarderBase):
    """The router shared by the routed paths (udp, vxlan routed) over a tun device."""

    cdef int64_t tokens
    # one ICMP error at a time, written before the next is built
    cdef unsigned char icmp_buf[ICMP_MAX_PACKET]

    cdef int _setup_routed(self, str name, tun_fd, sock_fd, tx_fds, batch_size,
                           icmp_burst, offloads, uint32_t encap_len) except -1:
        icmp_burst = operator_index(icmp_burst)
        batch_size = operator_index(batch_size)
        if icmp_burst < 0:
            raise ValueError(f"icmp_burst must be >= 0, got {icmp_burst}")
        self._setup(name, tun_fd, sock_fd, tx_fds, batch_size, offloads, encap_len, 0)
        self.tokens = icmp_burst
        return 0

    def set_tables(self, tables) -> None:
        """Build the new generation on the side, carry per-peer counters over by (ip, port),
        then swap it in with one assignment."""
        self.commit_tables(self.prepare_tables(tables))

    def prepare_tables(self, tables) -> _TableGeneration:
        """set_tables' first half, which reads nothing of the running batches: the threads
        engine builds while the thread forwards, and pauses it for commit_tables only."""
        cdef _TableGeneration new = build_generation(tables)
        self._check_generation(new)
        return new

    def commit_tables(self, _TableGeneration new) -> None:
        """set_tables' second half: carry the counters over and swap (never during a batch)."""
        self._swap(new)

    cdef int _check_generation(self, _TableGeneration gen) except -1:
        return 0

    def add_icmp_tokens(self, n, cap) -> None:
        n = operator_index(n)
        cap = operator_index(cap)
        if n < 0 or cap < 0:
            raise ValueError("add_icmp_tokens: n and cap must be >= 0")
        self.tokens = min(cap, self.tokens + n)

    @cython.final
    cdef int32_t _route(self, const fwd_tables_t *t, unsigned char *pkt,
                        uint32_t n) noexcept nogil:
        """Route one IPv4 packet read from the device; fix its TTL and return its peer, or
        -1 if dropped (counted, maybe answered)."""
        cdef uint32_t ihl, ttl, csum
        cdef int32_t target
        cdef uint64_t *ctr = self.ctr
        ctr[CTR_INSIDE_PACKETS] += 1
        ctr[CTR_INSIDE_BYTES] += n
        if n < IPV4_MIN_HEADER:
            ctr[CTR_INSIDE_TOO_SHORT] += 1
            return -1
        if (pkt[0] >> 4) != 4:
            ctr[CTR_INSIDE_NOT_IPV4] += 1
            return -1
        ihl = (pkt[0] & 0x0F) * 4
        if ihl < IPV4_MIN_HEADER or ihl > n or rd16(pkt + 2) != n:
            ctr[CTR_INSIDE_BAD_HEADER] += 1
            return -1
        # Martians go nowhere and are never answered (RFC 1812 5.3.7, 4.3.2.7).
        if martian(rd32(pkt + 12)):
            ctr[CTR_INSIDE_MARTIAN_SOURCE] += 1
            return -1
        if martian(rd32(pkt + 16)):
            ctr[CTR_INSIDE_MARTIAN_DESTINATION] += 1
            return -1
        target = lpm_lookup(t.lpm, rd32(pkt + 16))
        if target == NO_ROUTE_C:
            ctr[CTR_INSIDE_NO_ROUTE] += 1
            self._icmp(t, pkt, n, 3, 0, 0)
            return -1
        if target == LOCAL_C:
            ctr[CTR_INSIDE_LOCAL_DESTINATION] += 1
            self._icmp(t, pkt, n, 3, 1, 0)
            return -1
        ttl = pkt[8]
        if ttl <= 1:
            ctr[CTR_INSIDE_TTL_EXPIRED] += 1
            self._icmp(t, pkt, n, 11, 0, 0)
            return -1
        if (rd16(pkt + 6) & IP_DF) and n > t.peers[target].path_mtu:
            ctr[CTR_INSIDE_TOO_BIG] += 1
            self._icmp(t, pkt, n, 3, 4, t.peers[target].path_mtu)
            return -1
        csum = ttl_decrement_csum(rd16(pkt + 10), ttl, pkt[9])
        pkt[8] = ttl - 1
        wr16(pkt + 10, csum)
        return target

    @cython.final
    cdef void _icmp(self, const fwd_tables_t *t, const unsigned char *pkt, uint32_t n,
                    int icmp_type, int code, uint32_t mtu) noexcept nogil:
        cdef size_t length
        if not icmp_allowed(pkt, n):
            return
        if self.tokens <= 0:
            self.ctr[CTR_ICMP_RATE_LIMITED] += 1
            return
        self.tokens -= 1
        length = build_icmp(self.icmp_buf, t.local_address, pkt, n, icmp_type, code, mtu)
        if self._write_device(self.icmp_buf, length) >= 0:
            self.ctr[CTR_ICMP_SENT] += 1
        else:
            # Not device_write_error: that one counts delivered packets the device refused.
            self.ctr[CTR_ICMP_WRITE_ERROR] += 1

    @cython.final
    cdef void _deliver(self, const fwd_tables_t *t, const unsigned char *pkt, uint32_t n,
                       int32_t peer) noexcept nogil:
        """Check an inner IPv4 packet from ``peer`` and write it into the device."""
        cdef uint64_t *ctr = self.ctr
        cdef uint32_t ihl
        if n < IPV4_MIN_HEADER:
            ctr[CTR_OUTSIDE_TOO_SHORT] += 1
            return
        if (pkt[0] >> 4) != 4:
            ctr[CTR_OUTSIDE_NOT_IPV4] += 1
            return
        ihl = (pkt[0] & 0x0F) * 4
        if ihl < IPV4_MIN_HEADER or ihl > n:
            ctr[CTR_OUTSIDE_BAD_HEADER] += 1
            return
        if rd16(pkt + 2) != n:
            ctr[CTR_OUTSIDE_LENGTH_MISMATCH] += 1
            return
        if csum_fold(csum_partial(pkt, ihl, 0)) != 0:
            ctr[CTR_OUTSIDE_BAD_CHECKSUM] += 1
            return
        # Before the prefix checks: a peer owning 0.0.0.0/0 owns every martian too.
        if martian(rd32(pkt + 12)):
            ctr[CTR_OUTSIDE_MARTIAN_SOURCE] += 1
            return
        if is_host_address(t, rd32(pkt + 12)):
            ctr[CTR_OUTSIDE_LOCAL_SOURCE] += 1
            return
        if lpm_lookup(t.lpm, rd32(pkt + 12)) != peer:
            ctr[CTR_OUTSIDE_SPOOFED_SOURCE] += 1
            return
        if martian(rd32(pkt + 16)):
            ctr[CTR_OUTSIDE_MARTIAN_DESTINATION] += 1
            return
        if lpm_lookup(t.lpm, rd32(pkt + 16)) != LOCAL_C:
            ctr[CTR_OUTSIDE_NOT_FOR_US] += 1
            return
        self._emit(t, <unsigned char *>pkt, n, peer)
