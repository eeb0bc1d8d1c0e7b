# Longest-prefix-match route table (Cython kernel; twin: overlayd/dataplane/route_table.py).
#
# 1. Build (with the GIL, once per map change): validate every route, group by prefix length,
#    sort each group's networks, reject duplicates; lay all networks out in one uint32 array and
#    all targets in one int32 array, groups ordered longest prefix first.
# 2. Lookup (hot, nogil, allocation-free): for each present length, longest first, mask the
#    address and binary-search that group; the first hit is the longest match.
#
# Invariants: immutable after construction; the lpm_t struct and its arrays live exactly as long
# as the RouteTable object, so a holder of the object may use lpm_t* without the GIL.
# Memory is 8 bytes per route (10k routes: 80 KB): no DIR-24-8 style expansion, and at most
# 33 binary searches (in practice a handful of lengths) per lookup.

cdef enum:
    LOCAL_C = -1
    NO_ROUTE_C = -2
    MAX_PREFIX_LEVELS = 33

ctypedef struct lpm_level_t:
    uint32_t mask
    uint32_t count
    const uint32_t *networks     # sorted ascending
    const int32_t *targets       # targets[i] belongs to networks[i]

ctypedef struct lpm_t:
    int nlevels
    lpm_level_t levels[MAX_PREFIX_LEVELS]   # longest prefix first


cdef inline uint32_t mask_of(int prefix_len) noexcept nogil:
    # A shift by 32 is undefined in C, hence the special case.
    if prefix_len == 0:
        return 0
    return <uint32_t>(0xFFFFFFFF) << (32 - prefix_len)


cdef inline int lpm_lookup(const lpm_t *lpm, uint32_t addr) noexcept nogil:
    cdef int level
    cdef uint32_t key, lo, hi, mid, value
    cdef const uint32_t *networks
    for level in range(lpm.nlevels):
        key = addr & lpm.levels[level].mask
        networks = lpm.levels[level].networks
        lo = 0
        hi = lpm.levels[level].count
        while lo < hi:
            mid = (lo + hi) >> 1
            value = networks[mid]
            if value < key:
                lo = mid + 1
            elif value > key:
                hi = mid
            else:
                return lpm.levels[level].targets[mid]
    return NO_ROUTE_C


def _format_addr(uint32_t value):
    return f"{value >> 24}.{(value >> 16) & 255}.{(value >> 8) & 255}.{value & 255}"


@cython.final
cdef class RouteTable:
    """Immutable LPM table: ``lookup(addr)`` -> peer index, LOCAL (-1) or NO_ROUTE (-2)."""

    cdef lpm_t _lpm
    cdef uint32_t *_networks
    cdef int32_t *_targets
    cdef Py_ssize_t _size

    def __cinit__(self, routes):
        cdef Py_ssize_t count, i, pos
        cdef int plen, level
        groups = [[] for _ in range(MAX_PREFIX_LEVELS)]
        count = 0
        for route in routes:
            network, prefix_len, target = route
            network = operator_index(network)
            prefix_len = operator_index(prefix_len)
            target = operator_index(target)
            if not 0 <= prefix_len <= 32:
                raise ValueError(f"route {network!r}/{prefix_len!r}: prefix length must be 0..32")
            if not 0 <= network <= 0xFFFFFFFF:
                raise ValueError(
                    f"route {network!r}/{prefix_len}: network must be a u32 IPv4 address")
            if network & ~mask_of(prefix_len) & 0xFFFFFFFF:
                raise ValueError(
                    f"route {_format_addr(network)}/{prefix_len}: host bits set (did you mean "
                    f"{_format_addr(network & mask_of(prefix_len))}/{prefix_len}?)")
            if target < LOCAL_C:
                raise ValueError(
                    f"route {_format_addr(network)}/{prefix_len}: target {target} is neither a "
                    f"peer index (>= 0) nor LOCAL ({LOCAL_C})")
            if target > 0x7FFFFFFF:
                raise ValueError(
                    f"route {_format_addr(network)}/{prefix_len}: target {target} too large")
            groups[prefix_len].append((network, target))
            count += 1
        self._networks = <uint32_t *>malloc(max(count, 1) * sizeof(uint32_t))
        self._targets = <int32_t *>malloc(max(count, 1) * sizeof(int32_t))
        if self._networks == NULL or self._targets == NULL:
            raise MemoryError()
        self._size = count
        pos = 0
        level = 0
        for plen in range(32, -1, -1):
            group = groups[plen]
            if not group:
                continue
            group.sort()
            for i in range(1, len(group)):
                if group[i][0] == group[i - 1][0]:
                    raise ValueError(f"duplicate route {_format_addr(group[i][0])}/{plen}")
            self._lpm.levels[level].mask = mask_of(plen)
            self._lpm.levels[level].count = <uint32_t>len(group)
            self._lpm.levels[level].networks = self._networks + pos
            self._lpm.levels[level].targets = self._targets + pos
            for network, target in group:
                self._networks[pos] = network
                self._targets[pos] = target
                pos += 1
            level += 1
        self._lpm.nlevels = level

    def __dealloc__(self):
        free(self._networks)
        free(self._targets)

    cdef inline int lookup_c(self, uint32_t addr) noexcept nogil:
        return lpm_lookup(&self._lpm, addr)

    cdef inline const lpm_t *lpm(self) noexcept nogil:
        return &self._lpm

    def lookup(self, uint32_t addr) -> int:
        """Target of the longest prefix containing ``addr`` (u32), or NO_ROUTE."""
        return self.lookup_c(addr)

    def check_targets(self, Py_ssize_t npeers) -> None:
        """ValueError naming the first route whose target is not LOCAL or a peer index below
        ``npeers``. It reads the C arrays the packet path reads, so no route can slip past it
        however the table was built (an iterator of routes is consumed by the build)."""
        cdef int level
        cdef uint32_t i
        cdef const lpm_level_t *lv
        for level in range(self._lpm.nlevels):
            lv = &self._lpm.levels[level]
            for i in range(lv.count):
                if lv.targets[i] >= npeers:
                    raise ValueError(
                        f"route {_format_addr(lv.networks[i])}/{bin(lv.mask).count('1')}: "
                        f"target {lv.targets[i]} is not a peer index (there are {npeers} peers)")

    def __len__(self) -> int:
        return self._size

    def __repr__(self) -> str:
        return f"<RouteTable cython: {self._size} routes>"
