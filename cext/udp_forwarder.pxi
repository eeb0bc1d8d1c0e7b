# Routed ``udp`` data path (flannel's udp backend). Twin: overlayd/dataplane/udp_forwarder.py.
#
# Inside (device -> underlay), one inside_batch() call, GIL released throughout:
#   1. read() up to batch_size packets from the tun fd into preallocated slots (EAGAIN ends
#      the batch, EINTR retries, another error ends it and is raised after step 3);
#   2. per packet: header checks; LPM on the destination (no route -> net unreachable, LOCAL
#      -> host unreachable); TTL <= 1 -> time exceeded; DF and longer than the peer's path MTU
#      -> fragmentation needed; else TTL-1 with an RFC 1624 checksum update, in place, and an
#      mmsghdr pointing at the slot and at the peer's sockaddr;
#   3. one sendmmsg for the whole queue, looping on partial sends; a datagram the kernel
#      refuses is a tx_error and the next one is tried.
# Outside (underlay -> device), one outside_batch() call:
#   1. one recvmmsg(MSG_DONTWAIT) of up to batch_size datagrams;
#   2. per datagram: truncated? known peer by source IP? valid IPv4 with a right checksum?
#      inner source routed to that same peer? inner destination LOCAL? then write() it.
#
# Invariants: the per-packet code allocates nothing, logs nothing, touches no Python object;
# a batch pins its table generation (fwd_gen) so set_tables from elsewhere cannot free what
# the loop reads; every packet lands in exactly one of forwarded/delivered/a drop reason;
# ICMP errors go only into the device and obey RFC 1812 and the token bucket; fds are the
# caller's and never closed here.

cdef enum:
    HEADROOM_C = 64            # room for outer headers of encapsulating paths
    SLOT_SIZE_C = 65536        # any IPv4 packet fits (total length is 16 bits)
    SLOT_STRIDE = HEADROOM_C + SLOT_SIZE_C
    MAX_BATCH_C = 512

HEADROOM = HEADROOM_C
SLOT_SIZE = SLOT_SIZE_C
MAX_BATCH = MAX_BATCH_C

ctypedef struct peer_t:
    sockaddr_in addr           # ready for sendmmsg (network order)
    uint32_t ip
    uint32_t port
    uint32_t path_mtu
    uint64_t tx_packets
    uint64_t tx_bytes
    uint64_t rx_packets
    uint64_t rx_bytes

ctypedef struct ip_index_t:    # peers sorted by (ip, index): source IP -> first peer index
    uint32_t ip
    int32_t peer

ctypedef struct fwd_tables_t:
    const lpm_t *lpm
    uint32_t local_address
    int32_t npeers
    peer_t *peers
    ip_index_t *by_ip


@cython.final
cdef class _TableGeneration:
    """Owns one fwd_tables_t and the RouteTable its lpm points into."""

    cdef fwd_tables_t t
    cdef RouteTable routes

    def __cinit__(self):
        self.t.peers = NULL
        self.t.by_ip = NULL

    def __dealloc__(self):
        free(self.t.peers)
        free(self.t.by_ip)


cdef _TableGeneration build_generation(tables):
    cdef _TableGeneration gen = _TableGeneration()
    cdef Py_ssize_t npeers, i
    if tables is None:
        local_address, peers, routes = 0, (), ()
    else:
        local_address, peers, routes = tables.local_address, tuple(tables.peers), tables.routes
    local_address = operator_index(local_address)
    if not 0 <= local_address <= 0xFFFFFFFF:
        raise ValueError(f"local_address {local_address!r} is not a u32 IPv4 address")
    npeers = len(peers)
    if npeers > 0x7FFFFFFF:
        raise ValueError("too many peers")
    gen.t.peers = <peer_t *>calloc(max(npeers, 1), sizeof(peer_t))
    gen.t.by_ip = <ip_index_t *>calloc(max(npeers, 1), sizeof(ip_index_t))
    if gen.t.peers == NULL or gen.t.by_ip == NULL:
        raise MemoryError()
    order = []
    for i, peer in enumerate(peers):
        ip = operator_index(peer.ip)
        port = operator_index(peer.port)
        mtu = operator_index(peer.path_mtu)
        if not 0 <= ip <= 0xFFFFFFFF:
            raise ValueError(f"peer {i}: ip {ip!r} is not a u32 IPv4 address")
        if not 0 <= port <= 0xFFFF:
            raise ValueError(f"peer {i}: port {port!r} out of range")
        if not 0 <= mtu <= 0xFFFFFFFF:
            raise ValueError(f"peer {i}: path_mtu {mtu!r} out of range")
        gen.t.peers[i].ip = ip
        gen.t.peers[i].port = port
        gen.t.peers[i].path_mtu = mtu
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
    for network, prefix_len, target in routes:
        if target >= npeers:
            raise ValueError(
                f"route {_format_addr(network)}/{prefix_len}: target {target} is not a peer "
                f"index (there are {npeers} peers)")
    gen.t.lpm = gen.routes.lpm()
    gen.t.local_address = local_address
    return gen


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


@cython.final
cdef class UdpForwarder:
    """The routed udp data path over a tun fd and a UDP socket fd, both owned by the caller.

    Drive it from one thread: inside_batch when the tun fd is readable, outside_batch when the
    socket is, add_icmp_tokens from a timer, set_tables on map changes.
    """

    cdef int tun_fd
    cdef int sock_fd
    cdef int batch_size
    cdef int64_t tokens
    cdef bint busy
    cdef uint64_t ctr[N_COUNTERS]
    cdef uint64_t hist_inside[BATCH_BUCKETS_C]
    cdef uint64_t hist_outside[BATCH_BUCKETS_C]
    cdef _TableGeneration gen
    # inside
    cdef unsigned char *in_buf
    cdef uint32_t *in_len
    cdef mmsghdr *tx_msgs
    cdef iovec *tx_iov
    cdef int32_t *tx_peer
    # outside
    cdef unsigned char *out_buf
    cdef mmsghdr *rx_msgs
    cdef iovec *rx_iov
    cdef sockaddr_in *rx_names
    # one ICMP error at a time, written before the next is built
    cdef unsigned char icmp_buf[ICMP_MAX_PACKET]

    def __cinit__(self, tun_fd, sock_fd, batch_size=64, icmp_burst=100):
        cdef int i
        tun_fd = operator_index(tun_fd)
        sock_fd = operator_index(sock_fd)
        batch_size = operator_index(batch_size)
        icmp_burst = operator_index(icmp_burst)
        if not 1 <= batch_size <= MAX_BATCH_C:
            raise ValueError(f"batch_size must be 1..{MAX_BATCH_C}, got {batch_size}")
        if tun_fd < 0 or sock_fd < 0:
            raise ValueError("tun_fd and sock_fd must be open file descriptors")
        if icmp_burst < 0:
            raise ValueError(f"icmp_burst must be >= 0, got {icmp_burst}")
        self.tun_fd = tun_fd
        self.sock_fd = sock_fd
        self.batch_size = batch_size
        self.tokens = icmp_burst
        self.busy = False
        memset(self.ctr, 0, sizeof(self.ctr))
        memset(self.hist_inside, 0, sizeof(self.hist_inside))
        memset(self.hist_outside, 0, sizeof(self.hist_outside))
        # malloc, not calloc, for the slots: untouched pages cost no RSS until packets use them.
        self.in_buf = <unsigned char *>malloc(<size_t>SLOT_STRIDE * batch_size)
        self.out_buf = <unsigned char *>malloc(<size_t>SLOT_STRIDE * batch_size)
        self.in_len = <uint32_t *>calloc(batch_size, sizeof(uint32_t))
        self.tx_msgs = <mmsghdr *>calloc(batch_size, sizeof(mmsghdr))
        self.tx_iov = <iovec *>calloc(batch_size, sizeof(iovec))
        self.tx_peer = <int32_t *>calloc(batch_size, sizeof(int32_t))
        self.rx_msgs = <mmsghdr *>calloc(batch_size, sizeof(mmsghdr))
        self.rx_iov = <iovec *>calloc(batch_size, sizeof(iovec))
        self.rx_names = <sockaddr_in *>calloc(batch_size, sizeof(sockaddr_in))
        if (self.in_buf == NULL or self.out_buf == NULL or self.in_len == NULL
                or self.tx_msgs == NULL or self.tx_iov == NULL or self.tx_peer == NULL
                or self.rx_msgs == NULL or self.rx_iov == NULL or self.rx_names == NULL):
            raise MemoryError()
        for i in range(batch_size):
            self.rx_iov[i].iov_base = self.out_buf + <size_t>i * SLOT_STRIDE + HEADROOM_C
            self.rx_iov[i].iov_len = SLOT_SIZE_C
            self.rx_msgs[i].msg_hdr.msg_iov = &self.rx_iov[i]
            self.rx_msgs[i].msg_hdr.msg_iovlen = 1
            self.rx_msgs[i].msg_hdr.msg_name = &self.rx_names[i]
            self.tx_msgs[i].msg_hdr.msg_iov = &self.tx_iov[i]
            self.tx_msgs[i].msg_hdr.msg_iovlen = 1
            self.tx_msgs[i].msg_hdr.msg_namelen = sizeof(sockaddr_in)
        self.gen = build_generation(None)

    def __dealloc__(self):
        free(self.in_buf)
        free(self.out_buf)
        free(self.in_len)
        free(self.tx_msgs)
        free(self.tx_iov)
        free(self.tx_peer)
        free(self.rx_msgs)
        free(self.rx_iov)
        free(self.rx_names)

    # --- control (GIL held) ----------------------------------------------------------------

    def set_tables(self, tables) -> None:
        """Build the new generation on the side, carry per-peer counters over by (ip, port),
        then swap it in with one assignment."""
        cdef _TableGeneration new = build_generation(tables)
        cdef _TableGeneration old = self.gen
        cdef int32_t i, j
        first_old = {}
        for i in range(old.t.npeers):
            first_old.setdefault((old.t.peers[i].ip, old.t.peers[i].port), i)
        for i in range(new.t.npeers):
            j = first_old.pop((new.t.peers[i].ip, new.t.peers[i].port), -1)
            if j >= 0:
                new.t.peers[i].tx_packets = old.t.peers[j].tx_packets
                new.t.peers[i].tx_bytes = old.t.peers[j].tx_bytes
                new.t.peers[i].rx_packets = old.t.peers[j].rx_packets
                new.t.peers[i].rx_bytes = old.t.peers[j].rx_bytes
        self.gen = new

    def add_icmp_tokens(self, n, cap) -> None:
        n = operator_index(n)
        cap = operator_index(cap)
        if n < 0 or cap < 0:
            raise ValueError("add_icmp_tokens: n and cap must be >= 0")
        self.tokens = min(cap, self.tokens + n)

    def counters(self) -> dict:
        return {name: self.ctr[i] for i, name in enumerate(COUNTER_NAMES)}

    def peer_counters(self) -> list:
        cdef const fwd_tables_t *t = &self.gen.t
        return [(t.peers[i].tx_packets, t.peers[i].tx_bytes,
                 t.peers[i].rx_packets, t.peers[i].rx_bytes) for i in range(t.npeers)]

    def batch_histogram(self) -> tuple:
        return ([self.hist_inside[i] for i in range(BATCH_BUCKETS_C)],
                [self.hist_outside[i] for i in range(BATCH_BUCKETS_C)])

    cdef int _enter(self) except -1:
        # Batches share buffers and counters; a second thread must not run one concurrently.
        # Check-and-set is atomic here: no Python code runs between them.
        if self.busy:
            raise RuntimeError("UdpForwarder: a batch is already running (not re-entrant)")
        self.busy = True
        return 0

    # --- inside: device -> underlay --------------------------------------------------------

    def inside_batch(self) -> int:
        cdef _TableGeneration gen = self.gen     # pinned for the whole batch
        cdef const fwd_tables_t *t = &gen.t
        cdef int n = 0
        cdef int err = 0
        self._enter()
        try:
            with nogil:
                n = self._inside_run(t, &err)
        finally:
            self.busy = False
        if err:
            raise OSError(err, strerror(err))
        return n

    cdef int _inside_run(self, const fwd_tables_t *t, int *err) noexcept nogil:
        cdef int n = 0, queued = 0, i
        cdef ssize_t r
        cdef unsigned char *slot
        cdef int32_t peer
        while n < self.batch_size:
            slot = self.in_buf + <size_t>n * SLOT_STRIDE + HEADROOM_C
            r = read(self.tun_fd, slot, SLOT_SIZE_C)
            if r < 0:
                if errno == EINTR:
                    continue
                if errno != EAGAIN and errno != EWOULDBLOCK:
                    err[0] = errno
                break
            self.in_len[n] = <uint32_t>r
            n += 1
        for i in range(n):
            slot = self.in_buf + <size_t>i * SLOT_STRIDE + HEADROOM_C
            peer = self._inside_one(t, slot, self.in_len[i])
            if peer >= 0:
                self.tx_iov[queued].iov_base = slot
                self.tx_iov[queued].iov_len = self.in_len[i]
                self.tx_msgs[queued].msg_hdr.msg_name = <void *>&t.peers[peer].addr
                self.tx_peer[queued] = peer
                queued += 1
        if queued:
            self._send(t, queued)
        if n:
            self.hist_inside[batch_bucket(n)] += 1
        return n

    cdef int32_t _inside_one(self, const fwd_tables_t *t, unsigned char *pkt,
                             uint32_t n) noexcept nogil:
        """Classify one packet; fix its TTL and return its peer, or -1 if dropped."""
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

    cdef void _send(self, const fwd_tables_t *t, int queued) noexcept nogil:
        cdef int i = 0, k, sent
        cdef peer_t *peer
        while i < queued:
            sent = sendmmsg(self.sock_fd, &self.tx_msgs[i], queued - i, MSG_DONTWAIT)
            if sent < 0 and errno == EINTR:
                continue
            if sent <= 0:
                # The kernel refused tx_msgs[i] (sendmmsg reports an error only when the first
                # datagram fails): count it and go on with the rest.
                self.ctr[CTR_TX_ERROR] += 1
                i += 1
                continue
            for k in range(i, i + sent):
                peer = &t.peers[self.tx_peer[k]]
                peer.tx_packets += 1
                peer.tx_bytes += self.tx_iov[k].iov_len
            self.ctr[CTR_FORWARDED_PACKETS] += sent
            i += sent

    cdef void _icmp(self, const fwd_tables_t *t, const unsigned char *pkt, uint32_t n,
                    int icmp_type, int code, uint32_t mtu) noexcept nogil:
        cdef size_t length
        cdef ssize_t r
        if not icmp_allowed(pkt, n):
            return
        if self.tokens <= 0:
            self.ctr[CTR_ICMP_RATE_LIMITED] += 1
            return
        self.tokens -= 1
        length = build_icmp(self.icmp_buf, t.local_address, pkt, n, icmp_type, code, mtu)
        r = self._write_device(self.icmp_buf, length)
        if r < 0:
            self.ctr[CTR_DEVICE_WRITE_ERROR] += 1
        else:
            self.ctr[CTR_ICMP_SENT] += 1

    cdef inline ssize_t _write_device(self, const unsigned char *data, size_t n) noexcept nogil:
        cdef ssize_t r
        while True:
            r = write(self.tun_fd, data, n)
            if r >= 0 or errno != EINTR:
                return r

    # --- outside: underlay -> device -------------------------------------------------------

    def outside_batch(self) -> int:
        cdef _TableGeneration gen = self.gen     # pinned for the whole batch
        cdef const fwd_tables_t *t = &gen.t
        cdef int n = 0
        cdef int err = 0
        self._enter()
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
        cdef msghdr *hdr
        for i in range(self.batch_size):
            # The kernel overwrites both on every receive.
            self.rx_msgs[i].msg_hdr.msg_namelen = sizeof(sockaddr_in)
            self.rx_msgs[i].msg_hdr.msg_flags = 0
        n = recvmmsg(self.sock_fd, self.rx_msgs, self.batch_size, MSG_DONTWAIT, NULL)
        if n < 0:
            if not transient_recv_error(errno):
                err[0] = errno
            return 0
        for i in range(n):
            hdr = &self.rx_msgs[i].msg_hdr
            self._outside_one(t, <unsigned char *>self.rx_iov[i].iov_base,
                              self.rx_msgs[i].msg_len, hdr.msg_flags, &self.rx_names[i],
                              hdr.msg_namelen)
        if n:
            self.hist_outside[batch_bucket(n)] += 1
        return n

    cdef void _outside_one(self, const fwd_tables_t *t, const unsigned char *pkt, uint32_t n,
                           int flags, const sockaddr_in *name,
                           socklen_t namelen) noexcept nogil:
        cdef uint64_t *ctr = self.ctr
        cdef int32_t peer = -1
        cdef uint32_t ihl
        ctr[CTR_OUTSIDE_PACKETS] += 1
        ctr[CTR_OUTSIDE_BYTES] += n
        if flags & MSG_TRUNC:
            ctr[CTR_OUTSIDE_TRUNCATED] += 1
            return
        if namelen >= sizeof(sockaddr_in) and name.sin_family == AF_INET:
            peer = peer_by_ip(t, ntohl(name.sin_addr.s_addr))
        if peer < 0:
            ctr[CTR_OUTSIDE_UNKNOWN_PEER] += 1
            return
        t.peers[peer].rx_packets += 1
        t.peers[peer].rx_bytes += n
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
        if lpm_lookup(t.lpm, rd32(pkt + 12)) != peer:
            ctr[CTR_OUTSIDE_SPOOFED_SOURCE] += 1
            return
        if lpm_lookup(t.lpm, rd32(pkt + 16)) != LOCAL_C:
            ctr[CTR_OUTSIDE_NOT_FOR_US] += 1
            return
        if self._write_device(pkt, n) < 0:
            ctr[CTR_DEVICE_WRITE_ERROR] += 1
        else:
            ctr[CTR_DELIVERED_PACKETS] += 1
