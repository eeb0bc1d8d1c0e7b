# The switched path's MAC table (FDB) in C (twin: overlayd/dataplane/fdb.py).
#
# 1. Open addressing with linear probing over a power-of-two array of more than twice
#    max_entries slots (load <= 1/2 even with every static entry on top of a full learned
#    table), so a probe always meets an empty slot. 24 bytes a slot: 100,000 MACs take 6 MB.
# 2. A slot's key is the 48-bit MAC | FDB_USED (| FDB_STATIC); 0 means empty. The home slot
#    is a multiplicative (Fibonacci) hash of the MAC.
# 3. Deletion is backward-shift (no tombstones): later members of the cluster that may move
#    into the hole do, so lookups never probe past an empty slot they should not.
# 4. fdb_learn: a known MAC moves to the new target and is refreshed (static ones are left
#    alone); a new MAC is refused at max_entries learned+static entries.
# All nogil and allocation-free except fdb_init.

cdef enum:
    FDB_MISS = -2

cdef extern from *:
    """
    #define FDB_USED   (1ULL << 63)
    #define FDB_STATIC (1ULL << 62)
    #define FDB_MAC    ((1ULL << 48) - 1)
    """
    const uint64_t FDB_USED
    const uint64_t FDB_STATIC
    const uint64_t FDB_MAC

ctypedef struct fdb_entry_t:
    uint64_t key
    int32_t target
    uint32_t _pad
    double seen

ctypedef struct fdb_t:
    fdb_entry_t *slots
    uint64_t mask
    uint32_t size
    uint32_t max_entries


cdef int fdb_init(fdb_t *f, uint32_t max_entries) except -1:
    cdef uint64_t nslots = 16
    while nslots <= 2 * <uint64_t>max_entries:
        nslots <<= 1
    f.slots = <fdb_entry_t *>calloc(nslots, sizeof(fdb_entry_t))
    if f.slots == NULL:
        raise MemoryError()
    f.mask = nslots - 1
    f.size = 0
    f.max_entries = max_entries
    return 0


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


cdef inline int32_t fdb_lookup(const fdb_t *f, uint64_t mac) noexcept nogil:
    cdef fdb_entry_t *e = fdb_find(f, mac)
    return FDB_MISS if e == NULL else e.target


cdef inline fdb_entry_t *fdb_insert_new(fdb_t *f, uint64_t mac) noexcept nogil:
    """A fresh slot for a MAC known to be absent (the caller checked there is room)."""
    cdef uint64_t i = fdb_home(f, mac)
    while f.slots[i].key != 0:
        i = (i + 1) & f.mask
    f.slots[i].key = mac | FDB_USED
    f.size += 1
    return &f.slots[i]


cdef inline bint fdb_learn(fdb_t *f, uint64_t mac, int32_t target, double now) noexcept nogil:
    """False only when ``mac`` is new and the table is full."""
    cdef fdb_entry_t *e = fdb_find(f, mac)
    if e != NULL:
        if not (e.key & FDB_STATIC):
            e.target = target
            e.seen = now
        return True
    if f.size >= f.max_entries:
        return False
    e = fdb_insert_new(f, mac)
    e.target = target
    e.seen = now
    return True


cdef void fdb_delete_at(fdb_t *f, uint64_t hole) noexcept nogil:
    cdef uint64_t j = hole, home
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
        hole = j
    f.slots[hole].key = 0
    f.size -= 1


cdef uint32_t fdb_remove_if(fdb_t *f, bint statics, bint expired, double now,
                            double max_age) noexcept nogil:
    """Remove static entries (statics) or learned entries older than max_age (expired).
    Scanning with backward-shift deletion: after a delete the same slot is looked at again
    (something may have moved into it). No entry is skipped, but one may be looked at twice:
    a cluster that wraps from the end of the table to its start shifts entries already seen
    at low slots into the high slot being scanned. That is harmless here (the same test
    gives the same answer); a scan that changes entries must not delete as it goes."""
    cdef uint64_t i = 0
    cdef uint32_t removed = 0
    cdef fdb_entry_t *e
    while i <= f.mask:
        e = &f.slots[i]
        if e.key != 0 and (
                (statics and (e.key & FDB_STATIC))
                or (expired and not (e.key & FDB_STATIC) and now - e.seen > max_age)):
            fdb_delete_at(f, i)
            removed += 1
            continue
        i += 1
    return removed
