# Switched ``vxlan`` data path: an L2 switch over a tap device.
# Twin: overlayd/dataplane/vxlan_switch.py (the stages and counters are described there).
#
# Inside, per frame: runt? bad source MAC? learn source -> LOCAL; destination known LOCAL ->
#   not sent; known at a peer -> that peer; broadcast/multicast/unknown -> one queued copy per
#   peer, all sharing the slot and its VXLAN header (head-end replication). The tx socket is
#   flow_hash_frame % ntx.
# Outside, per datagram: known peer; vxlan_check (header + Ethernet header, I flag, our VNI);
#   bad source MAC?; learn source -> that peer (moves at once); destination known at a peer
#   -> not ours (split horizon); else write the frame into the tap.
# The FDB (fdb.pxi) is touched only by batches and by set_tables/age, which refuse to run
# while a batch does; learning stamps entries with the last set_now().


@cython.final
cdef class VxlanSwitchForwarder(_ForwarderBase):
    """The switched vxlan data path over a tap fd and UDP socket fds, all owned by the caller.

    Drive it from one thread: inside_batch/outside_batch on readiness, set_now and age from
    a timer, set_tables (SwitchTables) on map changes.
    """

    cdef uint32_t vni
    cdef fdb_t fdb
    cdef double now

    def __cinit__(self, tap_fd, sock_fd, vni=1, tx_fds=(), batch_size=64,
                  fdb_max_entries=16384, *, vnet_hdr=False, udp_gso=False, udp_gro=False):
        self.fdb.slots = NULL
        self.vni = check_vni_arg(vni)
        fdb_max_entries = operator_index(fdb_max_entries)
        if not 1 <= fdb_max_entries <= (1 << 24):
            raise ValueError(f"fdb_max_entries must be 1..{1 << 24}, got {fdb_max_entries}")
        self.now = 0.0
        self._setup("VxlanSwitchForwarder", tap_fd, sock_fd, tx_fds, batch_size,
                    (vnet_hdr, udp_gso, udp_gro), VXLAN_HEADER, ETH_HEADER)
        fdb_init(&self.fdb, fdb_max_entries)

    def __dealloc__(self):
        free(self.fdb.slots)

    # --- control (GIL held) ----------------------------------------------------------------

    def set_tables(self, tables) -> None:
        """Swap in new peers and static MACs; learned MACs follow their peer by (ip, port)."""
        cdef _TableGeneration new = build_generation(tables)
        cdef uint64_t i
        cdef fdb_entry_t *e
        static = self._check_static(getattr(tables, "static_macs", ()), new.t.npeers)
        self._enter()
        try:
            index_map = self._swap(new)
            fdb_remove_if(&self.fdb, True, False, 0.0, 0.0)
            i = 0
            while i <= self.fdb.mask:
                e = &self.fdb.slots[i]
                if e.key != 0 and e.target >= 0:
                    target = index_map.get(e.target)
                    if target is None:
                        fdb_delete_at(&self.fdb, i)
                        continue
                    e.target = target
                i += 1
            for mac, target in static:
                e = fdb_find(&self.fdb, mac)
                if e == NULL:
                    e = fdb_insert_new(&self.fdb, mac)
                e.key = mac | FDB_USED | FDB_STATIC
                e.target = target
                e.seen = 0.0
        finally:
            self.busy = False

    cdef list _check_static(self, static, int32_t npeers):
        cdef uint64_t mac
        out = {}
        for mac_bytes, target in static:
            mac_bytes = bytes(mac_bytes)
            target = operator_index(target)
            if len(mac_bytes) != 6:
                raise ValueError(f"static MAC must be 6 bytes, got {len(mac_bytes)}")
            mac = int.from_bytes(mac_bytes, "big")
            text = ":".join(f"{b:02x}" for b in mac_bytes)
            if not valid_source_mac(mac):
                raise ValueError(f"static MAC {text}: not a unicast MAC")
            if not (target == LOCAL_C or 0 <= target < npeers):
                raise ValueError(f"static MAC {text}: target {target} is neither LOCAL nor a "
                                 f"peer index (there are {npeers} peers)")
            if mac in out:
                raise ValueError(f"static MAC {text} given twice")
            out[mac] = target
        if len(out) > self.fdb.max_entries:
            raise ValueError(f"{len(out)} static MACs exceed fdb_max_entries "
                             f"{self.fdb.max_entries}")
        return list(out.items())

    def set_now(self, double now) -> None:
        self.now = now

    def age(self, double now, double max_age) -> int:
        """Remove learned entries not seen for more than ``max_age`` seconds; how many."""
        cdef uint32_t removed
        self._enter()
        try:
            removed = fdb_remove_if(&self.fdb, False, True, now, max_age)
        finally:
            self.busy = False
        return removed

    def fdb_entries(self) -> list:
        """(mac, target, static, last_seen) per entry, sorted by MAC."""
        cdef uint64_t i
        out = []
        for i in range(self.fdb.mask + 1):
            e = self.fdb.slots[i]
            if e.key != 0:
                out.append(((e.key & FDB_MAC).to_bytes(6, "big"), e.target,
                            bool(e.key & FDB_STATIC), e.seen))
        out.sort()
        return out

    def fdb_size(self) -> int:
        return self.fdb.size

    # --- packet path (nogil) ---------------------------------------------------------------

    cdef inline void _learn(self, uint64_t mac, int32_t target) noexcept nogil:
        if not fdb_learn(&self.fdb, mac, target, self.now):
            self.ctr[CTR_FDB_FULL] += 1

    cdef void _inside_one(self, const fwd_tables_t *t, unsigned char *frame,
                          uint32_t n) noexcept nogil:
        cdef uint64_t src, dst
        cdef int32_t target, peer
        cdef unsigned char *out
        cdef int sock = 0
        self.ctr[CTR_INSIDE_PACKETS] += 1
        self.ctr[CTR_INSIDE_BYTES] += n
        if n < ETH_HEADER:
            self.ctr[CTR_INSIDE_RUNT_FRAME] += 1
            return
        src = rd48(frame + 6)
        if not valid_source_mac(src):
            self.ctr[CTR_INSIDE_BAD_SOURCE_MAC] += 1
            return
        self._learn(src, LOCAL_C)
        dst = rd48(frame)
        target = FDB_MISS if (dst >> 40) & 1 else fdb_lookup(&self.fdb, dst)
        if target == LOCAL_C:
            self.ctr[CTR_INSIDE_LOCAL_DESTINATION] += 1
            return
        if target == FDB_MISS and t.npeers == 0:
            self.ctr[CTR_INSIDE_NO_ROUTE] += 1
            return
        out = frame - VXLAN_HEADER
        vxlan_header(out, self.vni)
        if self.ntx > 1:
            sock = flow_hash_frame_c(frame, n) % <uint32_t>self.ntx
        if self.capture_on:
            self._capture(0, target if target >= 0 else -1, frame, n)
        if target >= 0:
            self._queue(t, out, n + VXLAN_HEADER, target, sock)
            return
        self.ctr[CTR_FLOODED_COPIES] += t.npeers
        for peer in range(t.npeers):
            self._queue(t, out, n + VXLAN_HEADER, peer, sock)

    cdef void _outside_one(self, const fwd_tables_t *t, unsigned char *pkt, uint32_t n,
                           int32_t peer) noexcept nogil:
        cdef int reason = vxlan_check(pkt, n, self.vni, ETH_HEADER)
        cdef const unsigned char *frame = pkt + VXLAN_HEADER
        cdef uint64_t src, dst
        if reason >= 0:
            self.ctr[reason] += 1
            return
        src = rd48(frame + 6)
        if not valid_source_mac(src):
            self.ctr[CTR_OUTSIDE_BAD_SOURCE_MAC] += 1
            return
        self._learn(src, peer)
        dst = rd48(frame)
        if not ((dst >> 40) & 1) and fdb_lookup(&self.fdb, dst) >= 0:
            self.ctr[CTR_OUTSIDE_NOT_FOR_US] += 1
            return
        self._emit(t, <unsigned char *>frame, n - VXLAN_HEADER, peer)
