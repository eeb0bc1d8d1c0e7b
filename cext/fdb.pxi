# The switched path's MAC table (FDB) in C (twin: overlayd/dataplane/fdb.py, which states the
# rules of learning, pinning, move dampening, per-port caps and ageing; this file keeps them).
#
# 1. Open addressing with linear probing over a power-of-two array of more than twice
#    max_entries slots (load <= 1/2 even with every static entry on top of a full learned
#    table), so a probe always meets an empty slot. 32 bytes a slot; calloc'd, so slots never
#    written cost no memory.
# 2. A slot's key is the 48-bit MAC | FDB_USED (| FDB_STATIC); 0 means empty. The home slot
#    is a multiplicative (Fibonacci) hash of the MAC.
# 3. Every entry is on one of two doubly linked lists threaded through the slots by index:
#    learned entries in order of last_seen, oldest first (a refresh at a new ``now`` moves one
#    to the tail; ageing pops the head), static entries in any order. Nothing walks the slot
#    array: ageing, table swaps and listings cost what the lists hold, never the capacity
#    (2^24 entries is 2^26 slots).
# 4. Deletion is backward-shift (no tombstones): later members of the cluster that may move
#    into the hole do, and each moved entry's list neighbours are re-pointed at its new slot.
#    So no slot index may be held across a delete: deleting walks consume a list from its
#    head instead (fdb_age, fdb_clear_statics, the second pass of fdb_remap).
# 5. port_macs[target + 1] counts learned entries per port (the tap is port 0): the per-port
#    cap. fdb_delete_at leaves the counts to its callers.
# All nogil and allocation-free except fdb_init/fdb_free and the remap's caller.

cdef enum:
    FDB_MISS = -2
    FDB_NO_PENDING = -2
    FDB_GONE = -3              # fdb_remap: the entry's peer left the map
    # fdb_learn's answers (overlayd/dataplane/fdb.py LEARNED .. DAMPENED)
    FDB_LEARNED = 0
    FDB_FULL = 1
    FDB_PORT_FULL = 2
    FDB_PINNED = 3
    FDB_DAMPENED = 4

cdef extern from *:
    """
    #define FDB_USED   (1ULL << 63)
    #define FDB_STATIC (1ULL << 62)
    #define FDB_MAC    ((1ULL << 48) - 1)
    #define FDB_NIL    0xFFFFFFFFU
    """
    const uint64_t FDB_USED
    const uint64_t FDB_STATIC
    const uint64_t FDB_MAC
    const uint32_t FDB_NIL

ctypedef struct fdb_entry_t:
    uint64_t key
    int32_t target
    int32_t pending            # learned at LOCAL: the peer it is waiting to move to
    uint32_t prev              # list neighbours, slot indices (FDB_NIL: none)
    uint32_t next
    double seen

ctypedef struct fdb_list_t:
    uint32_t head
    uint32_t tail

ctypedef struct fdb_t:
    fdb_entry_t *slots
    uint64_t mask
    uint32_t size              # learned + static
    uint32_t max_entries
    uint32_t port_max          # learned entries a port may hold
    double hold                # seconds a MAC seen behind the tap does not move to a peer
    fdb_list_t learned
    fdb_list_t statics
    uint32_t *port_macs        # nports counts
    int32_t nports


cdef int fdb_init(fdb_t *f, uint32_t max_entries, uint32_t port_max, double hold) except -1:
    cdef uint64_t nslots = 16
    while nslots <= 2 * <uint64_t>max_entries:
        nslots <<= 1
    f.slots = <fdb_entry_t *>calloc(nslots, sizeof(fdb_entry_t))
    f.port_macs = <uint32_t *>calloc(1, sizeof(uint32_t))
    if f.slots == NULL or f.port_macs == NULL:
        raise MemoryError()
    f.mask = nslots - 1
    f.size = 0
    f.max_entries = max_entries
    f.port_max = port_max
    f.hold = hold
    f.learned.head = f.learned.tail = FDB_NIL
    f.statics.head = f.statics.tail = FDB_NIL
    f.nports = 1
    return 0


cdef void fdb_free(fdb_t *f) noexcept:
    free(f.slots)
    free(f.port_macs)
    f.slots = NULL
    f.port_macs = NULL


cdef inline uint64_t fdb_home(const fdb_t *f, uint64_t mac) noexcept nogil:
    return ((mac * <uint64_t>0x9E3779B97F4A7C15ULL) >> 32) & f.mask


cdef inline fdb_entry_t *fdb_find(const fdb_t *f, uint64_t mac) noexcept nogil:
    cdef uint64_t i = fdb_home(f, mac)
    cdef uint64_t key
    while True:
        key = f.slots[i].key
        if key == 0:
            return NULL
        if (key & FDB_MAC) == mac:
            return &f.slots[i]
        i = (i + 1) & f.mask


cdef inline fdb_list_t *fdb_list_of(fdb_t *f, const fdb_entry_t *e) noexcept nogil:
    return &f.statics if e.key & FDB_STATIC else &f.learned


cdef inline void fdb_link_tail(fdb_t *f, fdb_list_t *l, uint32_t i) noexcept nogil:
    f.slots[i].prev = l.tail
    f.slots[i].next = FDB_NIL
    if l.tail != FDB_NIL:
        f.slots[l.tail].next = i
    else:
        l.head = i
    l.tail = i


cdef inline void fdb_link_head(fdb_t *f, fdb_list_t *l, uint32_t i) noexcept nogil:
    f.slots[i].next = l.head
    f.slots[i].prev = FDB_NIL
    if l.head != FDB_NIL:
        f.slots[l.head].prev = i
    else:
        l.tail = i
    l.head = i


cdef inline void fdb_unlink(fdb_t *f, fdb_list_t *l, uint32_t i) noexcept nogil:
    cdef fdb_entry_t *e = &f.slots[i]
    if e.prev != FDB_NIL:
        f.slots[e.prev].next = e.next
    else:
        l.head = e.next
    if e.next != FDB_NIL:
        f.slots[e.next].prev = e.prev
    else:
        l.tail = e.prev


cdef inline void fdb_repoint(fdb_t *f, uint32_t i) noexcept nogil:
    """The entry now at slot i came from another slot: its neighbours must say i."""
    cdef fdb_entry_t *e = &f.slots[i]
    cdef fdb_list_t *l = fdb_list_of(f, e)
    if e.prev != FDB_NIL:
        f.slots[e.prev].next = i
    else:
        l.head = i
    if e.next != FDB_NIL:
        f.slots[e.next].prev = i
    else:
        l.tail = i


cdef inline uint32_t fdb_insert_new(fdb_t *f, uint64_t mac) noexcept nogil:
    """A fresh, unlinked slot for a MAC known to be absent (the caller checked there is room)."""
    cdef uint64_t i = fdb_home(f, mac)
    while f.slots[i].key != 0:
        i = (i + 1) & f.mask
    f.slots[i].key = mac | FDB_USED
    f.slots[i].pending = FDB_NO_PENDING
    f.size += 1
    return <uint32_t>i


cdef void fdb_delete_at(fdb_t *f, uint64_t hole) noexcept nogil:
    cdef uint64_t j = hole, home
    fdb_unlink(f, fdb_list_of(f, &f.slots[hole]), <uint32_t>hole)
    while True:
        j = (j + 1) & f.mask
        if f.slots[j].key == 0:
            break
        home = fdb_home(f, f.slots[j].key & FDB_MAC)
        # The entry at j stays if its home lies cyclically in (hole, j].
        if hole <= j:
            if hole < home <= j:
                continue
        elif home > hole or home <= j:
            continue
        f.slots[hole] = f.slots[j]
        fdb_repoint(f, <uint32_t>hole)
        hole = j
    f.slots[hole].key = 0
    f.size -= 1


cdef inline bint fdb_move(fdb_t *f, fdb_entry_t *e, int32_t target) noexcept nogil:
    """Move a learned entry to another port unless that port is at its cap."""
    if f.port_macs[target + 1] >= f.port_max:
        return False
    f.port_macs[e.target + 1] -= 1
    f.port_macs[target + 1] += 1
    e.target = target
    e.pending = FDB_NO_PENDING
    return True


cdef inline int32_t fdb_lookup(fdb_t *f, uint64_t mac, double now) noexcept nogil:
    """The MAC's target, or FDB_MISS; a pending move whose hold is over happens here."""
    cdef fdb_entry_t *e = fdb_find(f, mac)
    if e == NULL:
        return FDB_MISS
    if e.pending != FDB_NO_PENDING and now - e.seen >= f.hold:
        fdb_move(f, e, e.pending)
    return e.target


cdef inline int fdb_learn(fdb_t *f, uint64_t mac, int32_t target, double now) noexcept nogil:
    cdef fdb_entry_t *e = fdb_find(f, mac)
    cdef uint32_t i
    if e == NULL:
        if f.size >= f.max_entries:
            return FDB_FULL
        if f.port_macs[target + 1] >= f.port_max:
            return FDB_PORT_FULL
        i = fdb_insert_new(f, mac)
        f.slots[i].target = target
        f.slots[i].seen = now
        fdb_link_tail(f, &f.learned, i)
        f.port_macs[target + 1] += 1
        return FDB_LEARNED
    if e.key & FDB_STATIC:
        return FDB_LEARNED if e.target == target else FDB_PINNED
    if e.target != target:
        if e.target == LOCAL_C and now - e.seen < f.hold:
            e.pending = target
            return FDB_DAMPENED
        if not fdb_move(f, e, target):
            return FDB_PORT_FULL
    e.pending = FDB_NO_PENDING
    if e.seen != now:
        e.seen = now
        i = <uint32_t>(e - f.slots)
        fdb_unlink(f, &f.learned, i)
        fdb_link_tail(f, &f.learned, i)
    return FDB_LEARNED


cdef uint32_t fdb_age(fdb_t *f, double now, double max_age, uint32_t limit) noexcept nogil:
    """Remove up to ``limit`` learned entries with now - seen > max_age, oldest first."""
    cdef uint32_t removed = 0
    cdef fdb_entry_t *e
    while f.learned.head != FDB_NIL and removed < limit:
        e = &f.slots[f.learned.head]
        if not now - e.seen > max_age:
            break
        f.port_macs[e.target + 1] -= 1
        fdb_delete_at(f, f.learned.head)
        removed += 1
    return removed


cdef void fdb_clear_statics(fdb_t *f) noexcept nogil:
    while f.statics.head != FDB_NIL:
        fdb_delete_at(f, f.statics.head)


cdef void fdb_remap(fdb_t *f, const int32_t *index_map, uint32_t *port_macs,
                    int32_t nports) noexcept nogil:
    """Learned entries follow their peer to index_map[old] (FDB_GONE: deleted); port_macs
    (nports zeroed counts) becomes the table's, the old array is the caller's to free.
    Pass 1 retargets in place and moves the gone to the head of the list (moving nothing in
    the slot array); pass 2 deletes them from the head."""
    cdef uint32_t i = f.learned.head, nxt
    cdef fdb_entry_t *e
    while i != FDB_NIL:
        e = &f.slots[i]
        nxt = e.next
        if e.target >= 0:
            e.target = index_map[e.target]
        if e.target == FDB_GONE:
            fdb_unlink(f, &f.learned, i)
            fdb_link_head(f, &f.learned, i)
        else:
            if e.pending >= 0:
                e.pending = index_map[e.pending]
                if e.pending == FDB_GONE:
                    e.pending = FDB_NO_PENDING
            port_macs[e.target + 1] += 1
        i = nxt
    while f.learned.head != FDB_NIL and f.slots[f.learned.head].target == FDB_GONE:
        fdb_delete_at(f, f.learned.head)
    f.port_macs = port_macs
    f.nports = nports


cdef void fdb_pin(fdb_t *f, uint64_t mac, int32_t target) noexcept nogil:
    """Make ``mac`` static at ``target`` (a learned entry of it stops being learned)."""
    cdef fdb_entry_t *e = fdb_find(f, mac)
    cdef uint32_t i
    if e != NULL:
        i = <uint32_t>(e - f.slots)
        fdb_unlink(f, fdb_list_of(f, e), i)
        if not (e.key & FDB_STATIC):
            f.port_macs[e.target + 1] -= 1
    else:
        i = fdb_insert_new(f, mac)
    f.slots[i].key = mac | FDB_USED | FDB_STATIC
    f.slots[i].target = target
    f.slots[i].pending = FDB_NO_PENDING
    f.slots[i].seen = 0.0
    fdb_link_tail(f, &f.statics, i)
