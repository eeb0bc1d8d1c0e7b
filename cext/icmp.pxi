# IPv4 checksum and ICMP error construction in C (twin: overlayd/wire/ipv4.py, icmp.py).
#
# 1. csum_partial: RFC 1071 sum of big-endian 16-bit words, folded by csum_fold; csum_copy:
#    the same sum while copying the bytes (segmentation's checksum-while-copy).
# 2. ttl_decrement: RFC 1624 eqn. 3 incremental update; equals a full recomputation bit for bit
#    when the old checksum was right, never produces 0xffff.
# 3. icmp_allowed: RFC 1812 4.3.2.7 - never about an ICMP error, a non-initial fragment, a
#    non-unicast source or a multicast/broadcast destination.
# 4. build_icmp: into a caller-provided 576-byte buffer; quotes the packet as received.
# All hot helpers are nogil and allocation-free; they trust the caller for header bounds
# (icmp_allowed excepted, which checks what it reads).

cdef enum:
    IPV4_MIN_HEADER = 20
    ICMP_HEADER = 8
    ICMP_MAX_PACKET = 576                                        # RFC 1812 4.3.2.3
    ICMP_MAX_QUOTE = ICMP_MAX_PACKET - IPV4_MIN_HEADER - ICMP_HEADER
    ICMP_ERROR_TTL = 64
    ICMP_ERROR_TOS = 0xC0                                        # RFC 1812 4.3.2.5
    PROTO_ICMP = 1
    IP_DF = 0x4000
    IP_FRAG_OFFSET = 0x1FFF


cdef inline uint32_t rd16(const unsigned char *p) noexcept nogil:
    return (<uint32_t>p[0] << 8) | p[1]


cdef inline uint32_t rd32(const unsigned char *p) noexcept nogil:
    return (<uint32_t>p[0] << 24) | (<uint32_t>p[1] << 16) | (<uint32_t>p[2] << 8) | p[3]


cdef inline void wr16(unsigned char *p, uint32_t v) noexcept nogil:
    p[0] = (v >> 8) & 0xFF
    p[1] = v & 0xFF


cdef inline void wr32(unsigned char *p, uint32_t v) noexcept nogil:
    p[0] = v >> 24
    p[1] = (v >> 16) & 0xFF
    p[2] = (v >> 8) & 0xFF
    p[3] = v & 0xFF


cdef extern from *:
    uint32_t __builtin_bswap32(uint32_t x) nogil


cdef extern from *:
    """
    /* RFC 1071 sum of p[0:n], optionally copying p to dst on the way (checksum while copying:
       one pass over the bytes instead of a memcpy and then a sum). Native-order 64-bit words
       go into two 128-bit accumulators (add with carry, two independent chains); the 16-bit
       fold of a native-order sum, byte-swapped, is congruent mod 0xFFFF to the sum of the
       big-endian 16-bit words (RFC 1071 2(B)), and is 0 only when every byte is 0, so
       csum_fold gives the same result as a big-endian word-by-word sum, bit for bit. */
    #include <stdint.h>
    #include <string.h>
    static inline uint32_t ovd_csum_pass(unsigned char *dst, const unsigned char *p,
                                         size_t n, int copy) {
        unsigned __int128 a = 0, b = 0;
        uint64_t w0, w1, w2, w3, lo, hi, t;
        size_t i = 0;
        for (; i + 32 <= n; i += 32) {
            memcpy(&w0, p + i, 8); memcpy(&w1, p + i + 8, 8);
            memcpy(&w2, p + i + 16, 8); memcpy(&w3, p + i + 24, 8);
            if (copy) {
                memcpy(dst + i, &w0, 8); memcpy(dst + i + 8, &w1, 8);
                memcpy(dst + i + 16, &w2, 8); memcpy(dst + i + 24, &w3, 8);
            }
            a += w0; b += w1; a += w2; b += w3;
        }
        for (; i + 8 <= n; i += 8) {
            memcpy(&w0, p + i, 8);
            if (copy) memcpy(dst + i, &w0, 8);
            a += w0;
        }
        if (i < n) {               /* the tail in the low bytes of a zero word: positions kept */
            w0 = 0;
            memcpy(&w0, p + i, n - i);
            if (copy) memcpy(dst + i, p + i, n - i);
            a += w0;
        }
        a += b;
        lo = (uint64_t)a;
        hi = (uint64_t)(a >> 64);
        t = lo + hi;
        t += t < hi;               /* end-around carry: 2**64 == 1 (mod 0xFFFF) */
        t = (t & 0xFFFFFFFFu) + (t >> 32);
        t = (t & 0xFFFF) + (t >> 16);
        t = (t & 0xFFFF) + (t >> 16);
        t = (t & 0xFFFF) + (t >> 16);
    #if __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
        t = ((t & 0xFF) << 8) | (t >> 8);
    #endif
        return (uint32_t)t;
    }
    """
    uint32_t ovd_csum_pass(unsigned char *dst, const unsigned char *p, size_t n,
                           int copy) noexcept nogil


cdef inline uint64_t csum_partial(const unsigned char *p, size_t n, uint64_t total) noexcept nogil:
    # At memory speed over the 64 kB superpackets the offload paths checksum (see above).
    return total + ovd_csum_pass(NULL, p, n, 0)


cdef inline uint64_t csum_copy(unsigned char *dst, const unsigned char *src, size_t n,
                               uint64_t total) noexcept nogil:
    """memcpy(dst, src, n) and csum_partial(src, n, total) in one pass."""
    return total + ovd_csum_pass(dst, src, n, 1)


cdef inline uint16_t csum_fold(uint64_t total) noexcept nogil:
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return <uint16_t>(~total & 0xFFFF)


cdef inline uint16_t ttl_decrement_csum(uint32_t old_csum, uint32_t ttl, uint32_t proto) noexcept nogil:
    cdef uint32_t old_word = ((ttl & 0xFF) << 8) | (proto & 0xFF)
    cdef uint32_t new_word = (((ttl - 1) & 0xFF) << 8) | (proto & 0xFF)
    cdef uint32_t total = (~old_csum & 0xFFFF) + (~old_word & 0xFFFF) + new_word
    total = (total & 0xFFFF) + (total >> 16)
    total = (total & 0xFFFF) + (total >> 16)
    return <uint16_t>(~total & 0xFFFF)


cdef inline bint icmp_allowed(const unsigned char *pkt, size_t n) noexcept nogil:
    cdef uint32_t src, dst, ihl, icmp_type
    if n < IPV4_MIN_HEADER:
        return False
    if rd16(pkt + 6) & IP_FRAG_OFFSET:
        return False
    src = rd32(pkt + 12)
    if (src >> 24) == 0 or (src >> 24) == 127 or (src >> 28) >= 0xE:
        return False
    dst = rd32(pkt + 16)
    if (dst >> 28) == 0xE or dst == <uint32_t>0xFFFFFFFF:
        return False
    if pkt[9] == PROTO_ICMP:
        ihl = (pkt[0] & 0x0F) * 4
        if ihl < IPV4_MIN_HEADER or ihl >= n:
            return False                  # too short to tell: assume it is an error
        icmp_type = pkt[ihl]
        if icmp_type == 3 or icmp_type == 4 or icmp_type == 5 or icmp_type == 11 or icmp_type == 12:
            return False
    return True


cdef inline size_t build_icmp(unsigned char *out, uint32_t local_address,
                              const unsigned char *pkt, size_t n, int icmp_type, int code,
                              uint32_t next_hop_mtu) noexcept nogil:
    """Write the whole error packet into ``out`` (>= 576 bytes); return its length."""
    cdef size_t quote = n if n < ICMP_MAX_QUOTE else ICMP_MAX_QUOTE
    cdef size_t total = IPV4_MIN_HEADER + ICMP_HEADER + quote
    cdef unsigned char *icmp = out + IPV4_MIN_HEADER
    out[0] = 0x45
    out[1] = ICMP_ERROR_TOS
    wr16(out + 2, <uint32_t>total)
    wr32(out + 4, 0)                      # ID 0, no flags, offset 0
    out[8] = ICMP_ERROR_TTL
    out[9] = PROTO_ICMP
    wr16(out + 10, 0)
    wr32(out + 12, local_address)
    memcpy(out + 16, pkt + 12, 4)         # back to whoever sent the offending packet
    wr16(out + 10, csum_fold(csum_partial(out, IPV4_MIN_HEADER, 0)))
    icmp[0] = icmp_type & 0xFF
    icmp[1] = code & 0xFF
    wr16(icmp + 2, 0)
    wr16(icmp + 4, 0)
    wr16(icmp + 6, next_hop_mtu & 0xFFFF)  # RFC 1191: low 16 bits of the unused word
    memcpy(icmp + ICMP_HEADER, pkt, quote)
    wr16(icmp + 2, csum_fold(csum_partial(icmp, ICMP_HEADER + quote, 0)))
    return total


# Python entry points to the C code above, for tests (not used by the packet path).

def icmp_error_allowed(packet) -> bool:
    cdef const unsigned char[::1] view = bytes(packet)
    if view.shape[0] == 0:
        return False
    return icmp_allowed(&view[0], view.shape[0])


def build_icmp_error(uint32_t local_address, offending, int icmp_type, int code,
                     uint32_t next_hop_mtu=0) -> bytes:
    cdef const unsigned char[::1] view = bytes(offending)
    cdef unsigned char out[ICMP_MAX_PACKET]
    cdef size_t length
    if view.shape[0] < IPV4_MIN_HEADER:
        raise ValueError("the offending packet must hold at least an IPv4 header")
    length = build_icmp(out, local_address, &view[0], view.shape[0], icmp_type, code,
                        next_hop_mtu)
    return out[:length]


def checksum(data) -> int:
    cdef const unsigned char[::1] view = bytes(data)
    if view.shape[0] == 0:
        return 0xFFFF
    return csum_fold(csum_partial(&view[0], view.shape[0], 0))


def ttl_decrement_checksum(uint32_t old_checksum, uint32_t ttl, uint32_t protocol) -> int:
    return ttl_decrement_csum(old_checksum, ttl, protocol)
