# VXLAN header checks and the outer flow hash in C (twin: overlayd/wire/vxlan.py, ethernet.py).
#
# 1. vxlan_check: RFC 7348 - long enough for the header plus the inner headers the path needs,
#    I flag set, our VNI; reserved bits ignored. Returns the counter to drop under, or -1.
# 2. flow_hash_ipv4 / flow_hash_frame: FNV-1a over the inner flow's fields (IPv4 addresses,
#    protocol and, unless a fragment, TCP/UDP ports; else the Ethernet header), finished by
#    MurmurHash3's fmix32 so `% n` spreads. The tx socket is flow_hash % len(tx_fds).
# All nogil and allocation-free; callers guarantee the minimum lengths noted.

cdef enum:
    VXLAN_HEADER = 8
    ETH_HEADER = 14
    ETH_MIN_PAYLOAD = 46
    VXLAN_FLAG_I = 0x08
    ROUTED_ENCAP = VXLAN_HEADER + ETH_HEADER
    ETHERTYPE_IPV4 = 0x0800
    MAX_VNI_C = 0xFFFFFF

cdef enum:
    FNV_OFFSET = 0x811C9DC5
    FNV_PRIME = 0x01000193


cdef inline int vxlan_check(const unsigned char *pkt, uint32_t n, uint32_t vni,
                            uint32_t inner_min) noexcept nogil:
    if n < VXLAN_HEADER:
        return CTR_OUTSIDE_TRUNCATED_VXLAN
    if not (pkt[0] & VXLAN_FLAG_I):
        return CTR_OUTSIDE_BAD_VXLAN_FLAGS
    if ((<uint32_t>pkt[4] << 16) | (<uint32_t>pkt[5] << 8) | pkt[6]) != vni:
        return CTR_OUTSIDE_WRONG_VNI
    if n - VXLAN_HEADER < inner_min:
        return CTR_OUTSIDE_TRUNCATED_VXLAN
    return -1


cdef inline void vxlan_header(unsigned char *out, uint32_t vni) noexcept nogil:
    out[0] = VXLAN_FLAG_I
    out[1] = 0
    out[2] = 0
    out[3] = 0
    out[4] = (vni >> 16) & 0xFF
    out[5] = (vni >> 8) & 0xFF
    out[6] = vni & 0xFF
    out[7] = 0


cdef inline uint32_t fnv1a(uint32_t h, const unsigned char *p, size_t n) noexcept nogil:
    cdef size_t i
    for i in range(n):
        h = (h ^ p[i]) * <uint32_t>FNV_PRIME
    return h


cdef inline uint32_t fmix32(uint32_t h) noexcept nogil:
    h ^= h >> 16
    h *= <uint32_t>0x85EBCA6B
    h ^= h >> 13
    h *= <uint32_t>0xC2B2AE35
    h ^= h >> 16
    return h


cdef inline uint32_t flow_hash_ipv4_c(const unsigned char *pkt, size_t n) noexcept nogil:
    """n >= 20."""
    cdef uint32_t h = fnv1a(FNV_OFFSET, pkt + 12, 8)
    cdef uint32_t proto = pkt[9]
    cdef size_t ihl = (pkt[0] & 0x0F) * 4
    h = fnv1a(h, pkt + 9, 1)
    if ((proto == 6 or proto == 17) and ((pkt[6] & 0x3F) | pkt[7]) == 0
            and ihl >= IPV4_MIN_HEADER and ihl + 4 <= n):
        h = fnv1a(h, pkt + ihl, 4)
    return fmix32(h)


cdef inline uint32_t flow_hash_frame_c(const unsigned char *frame, size_t n) noexcept nogil:
    """n >= 14."""
    if (rd16(frame + 12) == ETHERTYPE_IPV4 and n >= ETH_HEADER + IPV4_MIN_HEADER
            and (frame[ETH_HEADER] >> 4) == 4):
        return flow_hash_ipv4_c(frame + ETH_HEADER, n - ETH_HEADER)
    return fmix32(fnv1a(FNV_OFFSET, frame, ETH_HEADER))


cdef inline uint64_t rd48(const unsigned char *p) noexcept nogil:
    return ((<uint64_t>p[0] << 40) | (<uint64_t>p[1] << 32) | (<uint64_t>p[2] << 24)
            | (<uint64_t>p[3] << 16) | (<uint64_t>p[4] << 8) | p[5])


cdef inline bint valid_source_mac(uint64_t mac) noexcept nogil:
    return mac != 0 and not ((mac >> 40) & 1)


cdef object check_vni_arg(vni):
    vni = operator_index(vni)
    if not 0 <= vni <= MAX_VNI_C:
        raise ValueError(f"vni must be 0..{MAX_VNI_C}, got {vni}")
    return vni


# Python entry points to the C code above, for tests (not used by the packet path).

def flow_hash_ipv4(packet) -> int:
    cdef const unsigned char[::1] view = bytes(packet)
    if view.shape[0] < IPV4_MIN_HEADER:
        raise ValueError("flow_hash_ipv4 needs at least an IPv4 header")
    return flow_hash_ipv4_c(&view[0], view.shape[0])


def flow_hash_frame(frame) -> int:
    cdef const unsigned char[::1] view = bytes(frame)
    if view.shape[0] < ETH_HEADER:
        raise ValueError("flow_hash_frame needs at least an Ethernet header")
    return flow_hash_frame_c(&view[0], view.shape[0])
