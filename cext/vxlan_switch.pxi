# Switched ``vxlan`` data path: an L2 switch over a tap device.
# Twin: overlayd/dataplane/vxlan_switch.py (the stages and counters are described there).
#
# Inside, per frame: runt? bad source MAC? learn source -> LOCAL (pinned to a peer: drop);
#   destination known LOCAL -> not sent; known at a peer -> that peer; broadcast/multicast/
#   unknown -> a token of the tap's storm bucket, then one queued copy per peer, all sharing
#   the slot and its VXLAN header (head-end replication). The tx socket is
#   flow_hash_frame % ntx.
# Outside, per datagram: known peer; vxlan_check (header + Ethernet header, I flag, our VNI);
#   bad source MAC?; learn source -> that peer (pinned elsewhere or dampened: drop); destination
#   known at a peer -> not ours (split horizon); broadcast/multicast/unknown -> a token of the
#   peer's storm bucket; write the frame into the tap.
# The FDB (fdb.pxi) is touched only by batches, by the clock step and by set_tables/age,
# which refuse to run while a batch does; learning stamps entries with the last set_now(),
# which also refills the storm buckets (per port: storm_tokens[target + 1]).
# Ageing: age(now, max_age) from the loop's timer; or, after set_ageing(max_age, period), by
# the clock step itself (_clock: set_now, or the native engine's step before each batch and
# when age_due comes), one age() pass per period at most and only once the oldest entry is
# older than max_age - so a thread ages its own table unpaused (cext/engine.pxi item 10).

cdef enum:
    AGE_LIMIT_C = 16384     # entries one age() pass removes at most (a tick: ~10 ms at 1 Mi)

AGE_LIMIT = AGE_LIMIT_C
cdef double AGE_NEVER = 1e300      # _age_due with nothing to age


@cython.final
cdef class VxlanSwitchForwarder(_ForwarderBase):
    """The switched vxlan data path over a tap fd and UDP socket fds, all owned by the caller.

    Drive it from one thread: inside_batch/outside_batch on readiness, set_now and age from
    a timer, set_tables (SwitchTables) on map changes.
    """

    cdef uint32_t vni
    cdef fdb_t fdb
    cdef double now
    cdef double storm_rate     # frames per second per port; 0: storm control off
    cdef double storm_burst
    cdef double *storm_tokens  # per port (the tap, then each peer): the bucket
    cdef double *storm_stamp   # ... and the now it was last refilled at
    cdef double age_max        # the clock step's ageing (set_ageing): 0, off
    cdef double age_period     # ... one pass per period at most
    cdef double age_last       # ... the now of its last pass

    def __cinit__(self, tap_fd, sock_fd, vni=1, tx_fds=(), batch_size=64,
                  fdb_max_entries=16384, *, vnet_hdr=False, udp_gso=False, udp_gro=False,
                  device_uso=False, fdb_port_max_entries=None, mac_move_hold=0.0, storm_rate=0.0,
                  storm_burst=1.0):
        self.fdb.slots = NULL
        self.fdb.port_macs = NULL
        self.storm_tokens = NULL
        self.storm_stamp = NULL
        self.vni = check_vni_arg(vni)
        fdb_max_entries = operator_index(fdb_max_entries)
        if not 1 <= fdb_max_entries <= (1 << 24):
            raise ValueError(f"fdb_max_entries must be 1..{1 << 24}, got {fdb_max_entries}")
        port_max = (fdb_max_entries if fdb_port_max_entries is None
                    else operator_index(fdb_port_max_entries))
        if not 1 <= port_max <= fdb_max_entries:
            raise ValueError(f"fdb_port_max_entries must be 1..{fdb_max_entries}, got {port_max}")
        hold = float(mac_move_hold)
        if not 0.0 <= hold <= 3600.0:
            raise ValueError(f"mac_move_hold must be 0..3600 seconds, got {hold}")
        self.storm_rate = float(storm_rate)
        self.storm_burst = float(storm_burst)
        if not 0.0 <= self.storm_rate <= 1e9:
            raise ValueError(f"storm_rate must be 0..1e9 frames per second, got {self.storm_rate}")
        if not 1.0 <= self.storm_burst <= 1e9:
            raise ValueError(f"storm_burst must be 1..1e9 frames, got {self.storm_burst}")
        self.now = 0.0
        self.age_max = 0.0
        self.age_period = 0.0
        self.age_last = -AGE_NEVER
        self._setup("VxlanSwitchForwarder", tap_fd, sock_fd, tx_fds, batch_size,
                    (vnet_hdr, udp_gso, udp_gro, device_uso), VXLAN_HEADER, ETH_HEADER)
        fdb_init(&self.fdb, fdb_max_entries, port_max, hold)
        self.storm_tokens = <double *>malloc(sizeof(double))
        self.storm_stamp = <double *>malloc(sizeof(double))
        if self.storm_tokens == NULL or self.storm_stamp == NULL:
            raise MemoryError()
        self.storm_tokens[0] = self.storm_burst
        self.storm_stamp[0] = 0.0

    def __dealloc__(self):
        fdb_free(&self.fdb)
        free(self.storm_tokens)
        free(self.storm_stamp)

    # --- control (GIL held) ----------------------------------------------------------------

    def set_tables(self, tables) -> None:
        """Swap in new peers and static MACs; learned MACs follow their peer by (ip, port)."""
        cdef _TableGeneration new = build_generation(tables)
        cdef int32_t nold = self.gen.t.npeers, nports = new.t.npeers + 1, k
        cdef int32_t *imap
        cdef uint32_t *port_macs
        cdef double *tokens
        cdef double *stamps
        static = self._check_static(getattr(tables, "static_macs", ()), new.t.npeers)
        index_map = peer_index_map(&self.gen.t, &new.t)
        # Everything allocated before anything changes, so a MemoryError leaves the old state.
        imap = <int32_t *>malloc(max(nold, 1) * sizeof(int32_t))
        port_macs = <uint32_t *>calloc(nports, sizeof(uint32_t))
        tokens = <double *>malloc(nports * sizeof(double))
        stamps = <double *>malloc(nports * sizeof(double))
        if imap == NULL or port_macs == NULL or tokens == NULL or stamps == NULL:
            free(imap)
            free(port_macs)
            free(tokens)
            free(stamps)
            raise MemoryError()
        for k in range(nold):
            imap[k] = FDB_GONE
        for k in range(nports):
            tokens[k] = self.storm_burst
            stamps[k] = self.now
        # Storm buckets follow their peer like its counters; a new peer starts full.
        for old, target in [(-1, -1), *index_map.items()]:
            tokens[target + 1] = self.storm_tokens[old + 1]
            stamps[target + 1] = self.storm_stamp[old + 1]
            if old >= 0:
                imap[old] = target
        try:
            self._enter()
        except BaseException:
            free(imap)
            free(port_macs)
            free(tokens)
            free(stamps)
            raise
        try:
            self._swap(new)
            fdb_clear_statics(&self.fdb)
            free(self.fdb.port_macs)
            fdb_remap(&self.fdb, imap, port_macs, nports)
            for mac, target in static:
                fdb_pin(&self.fdb, mac, target)
            free(self.storm_tokens)
            free(self.storm_stamp)
            self.storm_tokens = tokens
            self.storm_stamp = stamps
        finally:
            free(imap)
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
        """The data plane's clock (monotonic seconds); a value below the last one is ignored.
        After set_ageing, also the ageing pass when one is due (_clock)."""
        self._clock(now)

    def set_ageing(self, double max_age, double period) -> None:
        """Let the clock step age the table: what age(now, max_age) every ``period`` seconds
        does (entries not seen for more than max_age go, oldest first, AGE_LIMIT per pass),
        in the step itself; max_age 0 turns it off (the loop engine's timer calls age())."""
        if not (max_age == 0.0 or 0.0 < max_age <= 1e9) or not 0.0 < period <= 3600.0:
            raise ValueError(f"set_ageing: max_age 0 or 0..1e9 s and period 0..3600 s, got "
                             f"{max_age}, {period}")
        self.age_max = max_age
        self.age_period = period
        self.age_last = -AGE_NEVER

    @property
    def age_due(self) -> float:
        """When the clock step's next ageing pass is due (inf: none is)."""
        due = self._age_due()
        return float("inf") if due >= AGE_NEVER else due

    cdef inline double _age_due(self) noexcept nogil:
        """Nothing learned (or ageing off): never. Else when the oldest entry gets older than
        age_max - the only moment an age() pass could remove anything - but not sooner than
        a period after the last pass (what a timer of that period gives). One comparison per
        step: the learned list is oldest first, so its head alone decides."""
        if self.age_max <= 0.0 or self.fdb.learned.head == FDB_NIL:
            return AGE_NEVER
        return max(self.age_last + self.age_period,
                   self.fdb.slots[self.fdb.learned.head].seen + self.age_max)

    cdef inline void _clock(self, double now) noexcept nogil:
        if now > self.now:
            self.now = now
        if self.now >= self._age_due():
            self.age_last = self.now
            fdb_age(&self.fdb, self.now, self.age_max, AGE_LIMIT_C)

    def age(self, double now, double max_age, limit=AGE_LIMIT) -> int:
        """Remove learned entries not seen for more than ``max_age`` seconds, oldest first and
        at most ``limit`` of them (the rest go at the next call); how many."""
        cdef uint32_t removed
        limit = operator_index(limit)
        if limit < 0:
            raise ValueError(f"limit must be >= 0, got {limit}")
        self._enter()
        try:
            removed = fdb_age(&self.fdb, now, max_age, min(limit, 0xFFFFFFFF))
        finally:
            self.busy = False
        return removed

    def port_entries(self) -> list:
        """Learned MACs per port: [behind the tap, peer 0, peer 1, ...]."""
        return [self.fdb.port_macs[k] for k in range(self.fdb.nports)]

    def fdb_entries(self) -> list:
        """(mac, target, static, last_seen) per entry, sorted by MAC."""
        cdef uint32_t i
        cdef fdb_entry_t *e
        out = []
        for i in (self.fdb.learned.head, self.fdb.statics.head):
            while i != FDB_NIL:
                e = &self.fdb.slots[i]
                out.append(((e.key & FDB_MAC).to_bytes(6, "big"), e.target,
                            bool(e.key & FDB_STATIC), e.seen))
                i = e.next
        out.sort()
        return out

    def fdb_size(self) -> int:
        return self.fdb.size

    # --- packet path (nogil) ---------------------------------------------------------------

    cdef inline bint _learn(self, uint64_t mac, int32_t target) noexcept nogil:
        """Learn a frame's source; False when the frame must be dropped (counted)."""
        cdef int code = fdb_learn(&self.fdb, mac, target, self.now)
        if code == FDB_LEARNED:
            return True
        if code == FDB_FULL:
            self.ctr[CTR_FDB_FULL] += 1
        elif code == FDB_PORT_FULL:
            self.ctr[CTR_FDB_PORT_FULL] += 1
        elif code == FDB_PINNED:
            self.ctr[CTR_INSIDE_PINNED_MAC if target < 0 else CTR_OUTSIDE_PINNED_MAC] += 1
            return False
        else:
            self.ctr[CTR_OUTSIDE_MAC_MOVE_DAMPENED] += 1
            return False
        return True

    cdef inline bint _storm_take(self, int32_t port) noexcept nogil:
        """Spend one token of ``port``'s storm bucket (port = target + 1); False if empty."""
        cdef double tokens
        if self.storm_rate <= 0.0:
            return True
        tokens = self.storm_tokens[port]
        if self.now > self.storm_stamp[port]:
            tokens = min(self.storm_burst,
                         tokens + (self.now - self.storm_stamp[port]) * self.storm_rate)
            self.storm_stamp[port] = self.now
        if tokens >= 1.0:
            self.storm_tokens[port] = tokens - 1.0
            return True
        self.storm_tokens[port] = tokens
        return False

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
        if not self._learn(src, LOCAL_C):
            return
        dst = rd48(frame)
        target = FDB_MISS if (dst >> 40) & 1 else fdb_lookup(&self.fdb, dst, self.now)
        if target == LOCAL_C:
            self.ctr[CTR_INSIDE_LOCAL_DESTINATION] += 1
            return
        if target == FDB_MISS:
            if t.npeers == 0:
                self.ctr[CTR_INSIDE_NO_ROUTE] += 1
                return
            if not self._storm_take(0):
                self.ctr[CTR_INSIDE_STORM_CONTROL] += 1
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
        self.ctr[CTR_FLOODED_FRAMES] += 1
        self.ctr[CTR_FLOODED_COPIES] += t.npeers
        for peer in range(t.npeers):
            self._queue(t, out, n + VXLAN_HEADER, peer, sock)

    cdef void _outside_one(self, const fwd_tables_t *t, unsigned char *pkt, uint32_t n,
                           int32_t peer) noexcept nogil:
        cdef int reason = vxlan_check(pkt, n, self.vni, ETH_HEADER)
        cdef const unsigned char *frame = pkt + VXLAN_HEADER
        cdef uint64_t src, dst
        cdef int32_t target
        if reason >= 0:
            self.ctr[reason] += 1
            return
        src = rd48(frame + 6)
        if not valid_source_mac(src):
            self.ctr[CTR_OUTSIDE_BAD_SOURCE_MAC] += 1
            return
        if not self._learn(src, peer):
            return
        dst = rd48(frame)
        target = FDB_MISS if (dst >> 40) & 1 else fdb_lookup(&self.fdb, dst, self.now)
        if target >= 0:
            self.ctr[CTR_OUTSIDE_NOT_FOR_US] += 1
            return
        if target == FDB_MISS and not self._storm_take(peer + 1):
            self.ctr[CTR_OUTSIDE_STORM_CONTROL] += 1
            return
        self._emit(t, <unsigned char *>frame, n - VXLAN_HEADER, peer)
