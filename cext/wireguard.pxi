# Routed ``wireguard`` data path. Twin: overlayd/dataplane/wireguard_forwarder.py (its docstring
# is the specification: the same stages, drops and events).
#
# Inside (tun -> underlay), per packet or TSO segment, GIL released:
#   1. _RoutedBase._route;
#   2. the peer's session's current keypair, usable (younger than REJECT_AFTER_TIME, counter
#      below REJECT_AFTER_MESSAGES), else one NEED_HANDSHAKE event and the packet is copied
#      into the session's staging ring (STAGED_MAX_C slots, allocated with the session; full:
#      the oldest is wg_staged_overflow; too big for a slot: wg_no_session). The ring is
#      sealed and sent, in its slots, by the call that makes a keypair current
#      (install_keypair, send_staged), or dropped (drop_staged, the peer leaving the map);
#   3. in place: zero padding to 16 (not past the path MTU) behind the packet, ChaCha20-Poly1305
#      with the keypair's send context (set up once, at install) and the counter as nonce, the
#      tag behind, the 16-byte header in the headroom in front; queue it. TSO segments got room
#      behind each (seal_plan), so a superpacket's sealed segments are still one UDP GSO send.
# Outside (underlay -> tun), per datagram from any source (any_source: no peer-by-IP check):
#   1. type/length/reserved -> wg_bad_message; 2. handshake: MAC1 (BLAKE2s-MAC keyed once) ->
#   wg_bad_mac1, else copied into the event ring; 3. transport: index (hash table) -> window
#   check -> open in place -> window update -> next->current, roaming -> keepalive or deliver
#   through _RoutedBase._deliver (allowed IPs = the sending peer's routes).
#
# Clock (_clock, before each batch on the threads engine, from set_now on the loop): the time
# never goes back; a keypair 3 x REJECT_AFTER_TIME old is zeroed (contexts freed, its index
# out of the table) by the first clock step past it. expiry_due, the earliest such moment, makes
# that one comparison per step; the engine also sleeps no longer than it (cext/engine.pxi), so
# an idle thread zeroes its keys on time without being paused.
#
# Invariants: no allocation and no Python in the per-packet path; keypairs, sessions and the
# index table change only between batches (install_keypair, set_tables, the clock step); a
# session follows its peer's public key across table swaps.
#
# Read beside a running batch (the threads engine's control thread, no pause): the events, a
# single-producer single-consumer ring (_event); a peer's endpoint and a session's keypair
# slots, which a batch changes only inside the session's sequence counter (WG_SEQ_*: endpoints,
# sessions(now), confirming); the activity times and counters (aligned, one writer).
#
# Several forwarders, one keypair (the native engine's N threads, each with its own forwarder,
# tun queue and SO_REUSEPORT socket): what must be one per key is shared, the rest is not.
# A keypair's send counter and replay window live in a KeypairShare (wg_shared_t) that every
# forwarder's keypair_t points to: a nonce is taken by an atomic fetch-add (never used twice
# for one key, whichever thread seals) and the window is checked and updated under its
# spinlock (a datagram replayed from another source port reaches another thread's socket and
# is still refused). Cipher contexts are not thread-safe: each forwarder keys its own from the
# same key. The share is reference-counted (the Python object holds one reference, each
# forwarder's keypair one) and freed by whoever lets go last, in or outside a batch.

from libc.stdlib cimport realloc
from socket import inet_aton


cdef uint32_t _parse_addr(ip) except? 0:
    return int.from_bytes(inet_aton(ip), "big")


cdef extern from "<openssl/evp.h>" nogil:
    ctypedef struct EVP_CIPHER_CTX:
        pass
    ctypedef struct EVP_CIPHER:
        pass
    ctypedef struct EVP_MAC:
        pass
    ctypedef struct EVP_MAC_CTX:
        pass
    ctypedef struct OSSL_PARAM:
        pass
    const int EVP_CTRL_AEAD_GET_TAG
    const int EVP_CTRL_AEAD_SET_TAG
    EVP_CIPHER_CTX *EVP_CIPHER_CTX_new()
    void EVP_CIPHER_CTX_free(EVP_CIPHER_CTX *ctx)
    const EVP_CIPHER *EVP_chacha20_poly1305()
    int EVP_EncryptInit_ex(EVP_CIPHER_CTX *ctx, const EVP_CIPHER *cipher, void *impl,
                           const unsigned char *key, const unsigned char *iv)
    int EVP_DecryptInit_ex(EVP_CIPHER_CTX *ctx, const EVP_CIPHER *cipher, void *impl,
                           const unsigned char *key, const unsigned char *iv)
    int EVP_EncryptUpdate(EVP_CIPHER_CTX *ctx, unsigned char *out, int *outl,
                          const unsigned char *inp, int inl)
    int EVP_DecryptUpdate(EVP_CIPHER_CTX *ctx, unsigned char *out, int *outl,
                          const unsigned char *inp, int inl)
    int EVP_EncryptFinal_ex(EVP_CIPHER_CTX *ctx, unsigned char *out, int *outl)
    int EVP_DecryptFinal_ex(EVP_CIPHER_CTX *ctx, unsigned char *out, int *outl)
    int EVP_CIPHER_CTX_ctrl(EVP_CIPHER_CTX *ctx, int type, int arg, void *ptr)
    EVP_MAC *EVP_MAC_fetch(void *libctx, const char *algorithm, const char *properties)
    void EVP_MAC_free(EVP_MAC *mac)
    EVP_MAC_CTX *EVP_MAC_CTX_new(EVP_MAC *mac)
    void EVP_MAC_CTX_free(EVP_MAC_CTX *ctx)
    int EVP_MAC_init(EVP_MAC_CTX *ctx, const unsigned char *key, size_t keylen,
                     const OSSL_PARAM *params)
    int EVP_MAC_update(EVP_MAC_CTX *ctx, const unsigned char *data, size_t datalen)
    int EVP_MAC_final(EVP_MAC_CTX *ctx, unsigned char *out, size_t *outl, size_t outsize)

cdef extern from "<openssl/params.h>" nogil:
    OSSL_PARAM OSSL_PARAM_construct_size_t(const char *key, size_t *buf)
    OSSL_PARAM OSSL_PARAM_construct_end()

cdef enum:
    WG_INITIATION = 1
    WG_RESPONSE = 2
    WG_COOKIE_REPLY = 3
    WG_TRANSPORT = 4
    WG_INITIATION_LEN = 148
    WG_RESPONSE_LEN = 92
    WG_COOKIE_REPLY_LEN = 64
    WG_HEADER_LEN = 16
    WG_TAG_LEN = 16
    WG_MAC_LEN = 16
    WG_MAX_EVENTS = 1024           # wireguard_forwarder.MAX_EVENTS
    WG_EVENT_HANDSHAKE = 1
    WG_EVENT_NEED_HANDSHAKE = 2
    WG_EVENT_ENDPOINT = 3
    WG_EVENT_SESSION_CONFIRMED = 4
    REPLAY_BLOCKS = 33             # wg_replay.BLOCKS: 2048 counters behind the newest
    REPLAY_WINDOW = (REPLAY_BLOCKS - 1) * 64
    STAGED_MAX_C = 128             # wireguard_forwarder.STAGED_MAX
    STAGED_PACKET_MAX_C = 9216     # wireguard_forwarder.STAGED_PACKET_MAX (16-aligned)
    # a slot: header room, the packet and its padding, the tag, and a gap so that two sealed
    # slots never lie back to back (the twin's held packets never merge into one GSO send)
    STAGED_STRIDE_C = WG_HEADER_LEN + STAGED_PACKET_MAX_C + WG_TAG_LEN + 16

cdef double WG_NEVER = -1e300
cdef double WG_FOREVER = 1e300     # expiry_due with no keypair held

cdef extern from "<pthread.h>" nogil:
    ctypedef int pthread_spinlock_t
    int pthread_spin_init(pthread_spinlock_t *lock, int pshared)
    int pthread_spin_destroy(pthread_spinlock_t *lock)
    int pthread_spin_lock(pthread_spinlock_t *lock)
    int pthread_spin_unlock(pthread_spinlock_t *lock)

cdef extern from *:
    """
    #define WG_FETCH_ADD64(p) __atomic_fetch_add((p), (uint64_t)1, __ATOMIC_RELAXED)
    #define WG_LOAD64(p) __atomic_load_n((p), __ATOMIC_RELAXED)
    #define WG_LOAD32(p) __atomic_load_n((p), __ATOMIC_RELAXED)
    #define WG_ACQ64(p) __atomic_load_n((p), __ATOMIC_ACQUIRE)
    #define WG_REL64(p, v) __atomic_store_n((p), (v), __ATOMIC_RELEASE)
    #define WG_REF(p) __atomic_add_fetch((p), 1, __ATOMIC_ACQ_REL)
    #define WG_UNREF(p) __atomic_sub_fetch((p), 1, __ATOMIC_ACQ_REL)
    """
    uint64_t WG_FETCH_ADD64(uint64_t *p) nogil
    uint64_t WG_LOAD64(uint64_t *p) nogil
    uint64_t WG_ACQ64(uint64_t *p) nogil
    void WG_REL64(uint64_t *p, uint64_t v) nogil
    int32_t WG_LOAD32(int32_t *p) nogil
    int32_t WG_REF(int32_t *p) nogil
    int32_t WG_UNREF(int32_t *p) nogil

# A session's sequence counter (session_t.seq), so that status reads (endpoints, sessions) need
# no pause. Its one writer is the thread running the forwarder's batches: roaming (the peer's
# 16-byte endpoint), a confirmation and an expiry (the three keypair slots, and a dropped
# keypair's fields) happen between WG_SEQ_BEGIN (seq odd) and WG_SEQ_END (even again). A
# reader on the control thread loads seq (acquire), copies what it needs, and keeps the copy
# only if seq was even and is unchanged after an acquire fence: were any of the copied bytes
# written after the writer's release fence, that fence pair makes the second load see the odd
# value (or later) and the reader tries again. Writes are rare (a roam, a handshake, an
# expiry) and short (a few stores), so a retry is rare and brief. Control calls that change a
# session (install_keypair, set_endpoint, confirm_session, a table swap) run on the reader's
# own thread with the writer paused, so they need no counter (they bump it where they share
# code with the batch: _promote_next). The data are plain loads and stores as in the kernel's
# seqcount; the fences keep the compiler (and the CPU) from moving them across.
cdef extern from *:
    """
    #define WG_SEQ_BEGIN(p) do { __atomic_store_n((p), *(p) + 1, __ATOMIC_RELAXED); \
                                 __atomic_thread_fence(__ATOMIC_RELEASE); } while (0)
    #define WG_SEQ_END(p) __atomic_store_n((p), *(p) + 1, __ATOMIC_RELEASE)
    #define WG_SEQ_READ(p) __atomic_load_n((p), __ATOMIC_ACQUIRE)
    #define WG_SEQ_CHANGED(p, v) (__atomic_thread_fence(__ATOMIC_ACQUIRE), \
                                  __atomic_load_n((p), __ATOMIC_RELAXED) != (v))
    """
    void WG_SEQ_BEGIN(uint32_t *p) nogil
    void WG_SEQ_END(uint32_t *p) nogil
    uint32_t WG_SEQ_READ(uint32_t *p) nogil
    bint WG_SEQ_CHANGED(uint32_t *p, uint32_t v) nogil


ctypedef struct replay_t:
    uint64_t bits[REPLAY_BLOCKS]
    uint64_t greatest
    bint seen


cdef inline bint replay_check(const replay_t *w, uint64_t counter, uint64_t limit) noexcept nogil:
    if counter >= limit:
        return False
    if not w.seen or counter > w.greatest:
        return True
    if w.greatest - counter >= REPLAY_WINDOW:
        return False
    return not ((w.bits[(counter >> 6) % REPLAY_BLOCKS] >> (counter & 63)) & 1)


cdef inline bint replay_update(replay_t *w, uint64_t counter, uint64_t limit) noexcept nogil:
    cdef uint64_t block = counter >> 6, current, step, steps
    if not replay_check(w, counter, limit):
        return False
    if not w.seen or counter > w.greatest:
        if w.seen:
            current = w.greatest >> 6
            steps = min(block - current, <uint64_t>REPLAY_BLOCKS)
            for step in range(1, steps + 1):
                w.bits[(current + step) % REPLAY_BLOCKS] = 0
        else:
            memset(w.bits, 0, sizeof(w.bits))
        w.greatest = counter
        w.seen = True
    w.bits[block % REPLAY_BLOCKS] |= (<uint64_t>1) << (counter & 63)
    return True


ctypedef struct wg_shared_t:
    uint64_t send_counter          # atomic fetch-add: the next nonce, for every forwarder
    int32_t refs                   # atomic
    pthread_spinlock_t lock        # guards window
    replay_t window


cdef inline void wg_shared_release(wg_shared_t *sh) noexcept nogil:
    if sh != NULL and WG_UNREF(&sh.refs) == 0:
        pthread_spin_destroy(&sh.lock)
        free(sh)


cdef inline bint wg_window_check(wg_shared_t *sh, uint64_t counter,
                                 uint64_t limit) noexcept nogil:
    cdef bint ok
    pthread_spin_lock(&sh.lock)
    ok = replay_check(&sh.window, counter, limit)
    pthread_spin_unlock(&sh.lock)
    return ok


cdef inline bint wg_window_update(wg_shared_t *sh, uint64_t counter,
                                  uint64_t limit) noexcept nogil:
    cdef bint ok
    pthread_spin_lock(&sh.lock)
    ok = replay_update(&sh.window, counter, limit)
    pthread_spin_unlock(&sh.lock)
    return ok


@cython.final
cdef class KeypairShare:
    """What one keypair's copies in several forwarders share: the send counter and the replay
    window (install_keypair(..., share=) with the same object in each forwarder)."""

    cdef wg_shared_t *sh

    def __cinit__(self):
        self.sh = <wg_shared_t *>calloc(1, sizeof(wg_shared_t))
        if self.sh == NULL:
            raise MemoryError()
        self.sh.refs = 1
        pthread_spin_init(&self.sh.lock, 0)

    def __dealloc__(self):
        wg_shared_release(self.sh)

    @property
    def send_counter(self) -> int:
        """Nonces taken so far (by every forwarder holding this keypair)."""
        return WG_LOAD64(&self.sh.send_counter)

    @property
    def holders(self) -> int:
        """Forwarders still holding this keypair (readable while their threads run)."""
        return WG_LOAD32(&self.sh.refs) - 1     # less this object's own reference


ctypedef struct keypair_t:
    bint used
    uint32_t local_index
    uint32_t remote_index
    int32_t session
    bint initiator
    double created
    wg_shared_t *sh                # send counter and replay window (see KeypairShare)
    EVP_CIPHER_CTX *send_ctx       # keyed once at install; per packet only the nonce changes
    EVP_CIPHER_CTX *recv_ctx       # (this forwarder's own: contexts are not thread-safe)


ctypedef struct session_t:
    uint32_t seq                   # odd while its batch changes endpoint or slots (WG_SEQ_BEGIN)
    bint used
    int32_t peer                   # index in the tables in force, -1 once the peer left
    int32_t current
    int32_t previous
    int32_t next
    double sent_any
    double received_any
    double sent_data
    double received_data
    uint64_t asked_round           # drains + 1 when NEED_HANDSHAKE was queued (0: not since install)
    bint roamed
    sockaddr_in endpoint           # where it roamed to (valid while roamed)
    sockaddr_in map_addr           # what the map said when the endpoint was last reset
    unsigned char *staged          # STAGED_MAX_C slots of STAGED_STRIDE_C bytes (malloc'd with
                                   # the session, so holding a packet is one memcpy)
    uint32_t staged_len[STAGED_MAX_C]
    int32_t staged_head            # ring: the oldest held packet's slot
    int32_t staged_count


ctypedef struct wg_event_t:
    int32_t kind
    int32_t peer
    uint32_t length
    sockaddr_in addr
    bint has_addr
    unsigned char data[WG_INITIATION_LEN]


cdef inline void wg_nonce(unsigned char *nonce, uint64_t counter) noexcept nogil:
    memset(nonce, 0, 4)
    cdef int i
    for i in range(8):
        nonce[4 + i] = (counter >> (8 * i)) & 0xFF


cdef inline uint32_t rd32le(const unsigned char *p) noexcept nogil:
    return p[0] | (<uint32_t>p[1] << 8) | (<uint32_t>p[2] << 16) | (<uint32_t>p[3] << 24)


cdef inline uint64_t rd64le(const unsigned char *p) noexcept nogil:
    return rd32le(p) | (<uint64_t>rd32le(p + 4) << 32)


cdef inline void wr32le(unsigned char *p, uint32_t v) noexcept nogil:
    p[0] = v & 0xFF
    p[1] = (v >> 8) & 0xFF
    p[2] = (v >> 16) & 0xFF
    p[3] = (v >> 24) & 0xFF


cdef inline int wg_message_type(const unsigned char *d, uint32_t n) noexcept nogil:
    """The WireGuard message type of a datagram, or 0 (wireguard.message_type)."""
    if n < 4 or d[1] or d[2] or d[3]:
        return 0
    if d[0] == WG_TRANSPORT and n >= WG_HEADER_LEN + WG_TAG_LEN:
        return WG_TRANSPORT
    if ((d[0] == WG_INITIATION and n == WG_INITIATION_LEN)
            or (d[0] == WG_RESPONSE and n == WG_RESPONSE_LEN)
            or (d[0] == WG_COOKIE_REPLY and n == WG_COOKIE_REPLY_LEN)):
        return d[0]
    return 0


cdef inline uint32_t wg_padded(uint32_t n, uint32_t mtu) noexcept nogil:
    """wireguard.padded_length."""
    cdef uint32_t padded = (n + 15) & ~(<uint32_t>15)
    return min(padded, max(n, mtu))


cdef EVP_CIPHER_CTX *keyed_ctx(const unsigned char *key, bint encrypt) except NULL:
    cdef EVP_CIPHER_CTX *ctx = EVP_CIPHER_CTX_new()
    cdef int ok
    if ctx == NULL:
        raise MemoryError()
    if encrypt:
        ok = EVP_EncryptInit_ex(ctx, EVP_chacha20_poly1305(), NULL, key, NULL)
    else:
        ok = EVP_DecryptInit_ex(ctx, EVP_chacha20_poly1305(), NULL, key, NULL)
    if ok != 1:
        EVP_CIPHER_CTX_free(ctx)
        raise RuntimeError("libcrypto refused a ChaCha20-Poly1305 key")
    return ctx


@cython.final
cdef class WireguardForwarder(_RoutedBase):
    """The routed wireguard data path over a tun fd and a UDP socket fd (owned by the caller);
    the same methods as the twin."""

    cdef EVP_MAC *mac_alg
    cdef EVP_MAC_CTX *mac1_ctx     # keyed with HASH("mac1----" || our public key), once
    cdef double now
    cdef double expiry_due         # the earliest created + 3 x reject_after_time held (see _clock)
    cdef double rekey_after_time
    cdef double reject_after_time
    cdef double rekey_on_receive_age
    cdef uint64_t rekey_after_messages
    cdef uint64_t reject_after_messages
    cdef keypair_t *keypairs
    cdef int32_t nkeypairs         # pool capacity: 3 per session slot
    cdef session_t *spool
    cdef int32_t nspool            # session pool capacity
    cdef int32_t *peer_session     # tables' peer index -> session slot
    cdef int32_t npeer_session
    cdef int32_t *index_table      # open addressing: local index -> keypair slot, -1 empty
    cdef uint32_t index_mask
    cdef wg_event_t *events        # a ring of WG_MAX_EVENTS: one producer (the batches), one
    cdef uint64_t ev_tail          # consumer (drain_events): events queued so far (producer's)
    cdef uint64_t ev_head          # ... and drained so far (consumer's); see _event
    cdef uint64_t drains           # drain_events calls that took events (consumer's)
    cdef dict by_key               # public key -> session slot
    cdef unsigned char pad_zero[16]

    def __cinit__(self, tun_fd, sock_fd, mac1_key, batch_size=64, icmp_burst=100, *,
                  vnet_hdr=False, udp_gso=False, udp_gro=False, device_uso=False):
        cdef const unsigned char[::1] key = bytes(mac1_key)
        cdef size_t mac_size = WG_MAC_LEN
        cdef OSSL_PARAM params[2]
        if key.shape[0] != 32:
            raise ValueError(f"mac1_key must be 32 bytes, got {key.shape[0]}")
        self._setup_routed("WireguardForwarder", tun_fd, sock_fd, (), batch_size, icmp_burst,
                           (vnet_hdr, udp_gso, udp_gro, device_uso), WG_HEADER_LEN)
        self.any_source = True
        self.seal_tail = True
        self.mac_alg = EVP_MAC_fetch(NULL, b"BLAKE2SMAC", NULL)
        if self.mac_alg == NULL:
            raise RuntimeError("libcrypto has no BLAKE2SMAC (OpenSSL >= 3.0 needed)")
        self.mac1_ctx = EVP_MAC_CTX_new(self.mac_alg)
        params[0] = OSSL_PARAM_construct_size_t(b"size", &mac_size)
        params[1] = OSSL_PARAM_construct_end()
        if self.mac1_ctx == NULL or EVP_MAC_init(self.mac1_ctx, &key[0], 32, params) != 1:
            raise RuntimeError("libcrypto refused the BLAKE2s MAC key")
        self.events = <wg_event_t *>calloc(WG_MAX_EVENTS, sizeof(wg_event_t))
        if self.events == NULL:
            raise MemoryError()
        self.by_key = {}
        memset(self.pad_zero, 0, 16)
        self._grow(8)
        self.set_timings(120.0, 180.0, 1 << 60, (1 << 64) - (1 << 13) - 1, 165.0)

    def __dealloc__(self):
        cdef int32_t i
        if self.keypairs != NULL:
            for i in range(self.nkeypairs):
                self._free_ctx(&self.keypairs[i])
        free(self.keypairs)
        if self.spool != NULL:
            for i in range(self.nspool):
                free(self.spool[i].staged)
        free(self.spool)
        free(self.peer_session)
        free(self.index_table)
        free(self.events)
        if self.mac1_ctx != NULL:
            EVP_MAC_CTX_free(self.mac1_ctx)
        if self.mac_alg != NULL:
            EVP_MAC_free(self.mac_alg)

    cdef void _free_ctx(self, keypair_t *k) noexcept:
        if k.send_ctx != NULL:
            EVP_CIPHER_CTX_free(k.send_ctx)
        if k.recv_ctx != NULL:
            EVP_CIPHER_CTX_free(k.recv_ctx)
        k.send_ctx = NULL
        k.recv_ctx = NULL
        wg_shared_release(k.sh)
        k.sh = NULL
        k.used = False

    cdef int _grow(self, int32_t sessions) except -1:
        """Pools for ``sessions`` session slots (only between batches: pointers move)."""
        cdef int32_t old_s = self.nspool, old_k = self.nkeypairs, i
        cdef uint32_t size = 16
        if sessions <= old_s:
            return 0
        cdef session_t *s = <session_t *>realloc(self.spool, sessions * sizeof(session_t))
        if s == NULL:
            raise MemoryError()
        self.spool = s
        memset(&s[old_s], 0, (sessions - old_s) * sizeof(session_t))
        cdef keypair_t *k = <keypair_t *>realloc(self.keypairs,
                                                 3 * sessions * sizeof(keypair_t))
        if k == NULL:
            raise MemoryError()
        self.keypairs = k
        memset(&k[old_k], 0, (3 * sessions - old_k) * sizeof(keypair_t))
        self.nspool, self.nkeypairs = sessions, 3 * sessions
        while size < <uint32_t>(4 * self.nkeypairs):
            size <<= 1
        free(self.index_table)
        self.index_table = <int32_t *>malloc(size * sizeof(int32_t))
        if self.index_table == NULL:
            raise MemoryError()
        self.index_mask = size - 1
        self._rebuild_index()
        return 0

    cdef void _rebuild_index(self) noexcept:
        cdef uint32_t h
        cdef int32_t i
        memset(self.index_table, 0xFF, (self.index_mask + 1) * sizeof(int32_t))
        for i in range(self.nkeypairs):
            if self.keypairs[i].used:
                h = (self.keypairs[i].local_index * <uint32_t>2654435761) & self.index_mask
                while self.index_table[h] >= 0:
                    h = (h + 1) & self.index_mask
                self.index_table[h] = i

    cdef inline int32_t _lookup(self, uint32_t index) noexcept nogil:
        cdef uint32_t h = (index * <uint32_t>2654435761) & self.index_mask
        cdef int32_t slot
        while True:
            slot = self.index_table[h]
            if slot < 0 or self.keypairs[slot].local_index == index:
                return slot
            h = (h + 1) & self.index_mask

    # -- control (between batches) ------------------------------------------------------------

    def set_timings(self, rekey_after_time, reject_after_time, rekey_after_messages,
                    reject_after_messages, rekey_on_receive_age) -> None:
        self.rekey_after_time = float(rekey_after_time)
        self.reject_after_time = float(reject_after_time)
        self.rekey_after_messages = operator_index(rekey_after_messages)
        self.reject_after_messages = operator_index(reject_after_messages)
        self.rekey_on_receive_age = float(rekey_on_receive_age)
        self.expiry_due = WG_NEVER          # the limit moved: the next clock step looks again

    def set_now(self, now) -> None:
        """The clock between batches (the loop engine's; a thread's own clock step is the
        same _clock): never set back, and zeroes keypairs 3 x REJECT_AFTER_TIME old."""
        self._clock(float(now))

    @property
    def queued_events(self) -> int:
        """Events waiting for drain_events (read while the thread runs: see _event)."""
        return WG_ACQ64(&self.ev_tail) - self.ev_head

    cdef inline void _clock(self, double now) noexcept nogil:
        if now > self.now:
            self.now = now
        if self.now >= self.expiry_due:
            self._expire()

    cdef void _expire(self) noexcept nogil:
        """Zero every keypair 3 x REJECT_AFTER_TIME old (the twin's set_now); expiry_due
        becomes the next one's moment."""
        cdef double limit = 3 * self.reject_after_time, due = WG_FOREVER
        cdef int32_t i
        cdef keypair_t *k
        cdef session_t *s
        for i in range(self.nkeypairs):
            k = &self.keypairs[i]
            if not k.used:
                continue
            if self.now - k.created < limit:
                due = min(due, k.created + limit)
                continue
            s = &self.spool[k.session]
            WG_SEQ_BEGIN(&s.seq)
            if s.current == i:
                s.current = -1
            if s.previous == i:
                s.previous = -1
            if s.next == i:
                s.next = -1
            self._drop_nogil(i)
            WG_SEQ_END(&s.seq)
        self.expiry_due = due

    cdef void _drop(self, int32_t slot) noexcept:
        cdef keypair_t *k = &self.keypairs[slot]
        cdef session_t *s
        if not k.used:
            return
        s = &self.spool[k.session]
        if s.current == slot:
            s.current = -1
        if s.previous == slot:
            s.previous = -1
        if s.next == slot:
            s.next = -1
        self._free_ctx(k)
        self._rebuild_index()

    def set_tables(self, tables) -> None:
        self.commit_tables(self.prepare_tables(tables))

    def prepare_tables(self, tables) -> tuple:
        """set_tables' first half, touching no session (the threads engine runs it while the
        thread forwards): the generation and the peers' public keys, checked."""
        cdef _TableGeneration new = build_generation(tables)
        keys = []
        for i, peer in enumerate(tables.peers):
            key = bytes(getattr(peer, "public_key", b""))
            if len(key) != 32:
                raise ValueError(f"peer {i}: public_key must be 32 bytes, got {len(key)}")
            keys.append(key)
        return new, keys

    def commit_tables(self, prepared) -> None:
        """set_tables' second half, between batches: sessions follow their peer's key, then
        the swap."""
        cdef _TableGeneration new = prepared[0]
        cdef list keys = prepared[1]
        cdef int32_t i, slot, free_slot
        cdef session_t *s
        cdef peer_t *p
        wanted = set(keys)
        for key in [k for k in self.by_key if k not in wanted]:
            slot = self.by_key.pop(key)
            s = &self.spool[slot]
            for kp in (s.current, s.previous, s.next):
                if kp >= 0:
                    self._drop(kp)
            self._expire_staged(s)
            free(s.staged)
            s.staged = NULL
            s.used = False
            s.peer = -1
        new_count = sum(1 for k in keys if k not in self.by_key)
        used = sum(1 for i in range(self.nspool) if self.spool[i].used)
        self._grow(used + new_count)
        free(self.peer_session)
        self.peer_session = <int32_t *>calloc(max(len(keys), 1), sizeof(int32_t))
        if self.peer_session == NULL:
            raise MemoryError()
        self.npeer_session = len(keys)
        for i, key in enumerate(keys):
            slot = self.by_key.get(key, -1)
            if slot < 0:
                free_slot = 0
                while self.spool[free_slot].used:
                    free_slot += 1
                slot = free_slot
                s = &self.spool[slot]
                memset(s, 0, sizeof(session_t))
                s.staged = <unsigned char *>malloc(STAGED_MAX_C * STAGED_STRIDE_C)
                if s.staged == NULL:
                    raise MemoryError()
                s.used = True
                s.current = s.previous = s.next = -1
                s.sent_any = s.received_any = s.sent_data = s.received_data = WG_NEVER
                self.by_key[key] = slot
            s = &self.spool[slot]
            s.peer = i
            p = &new.t.peers[i]
            if memcmp(&s.map_addr, &p.addr, sizeof(sockaddr_in)) != 0:
                s.roamed = False          # the map moved the peer: follow the map
                memcpy(&s.map_addr, &p.addr, sizeof(sockaddr_in))
            if s.roamed:
                memcpy(&p.addr, &s.endpoint, sizeof(sockaddr_in))
            self.peer_session[i] = slot
        self._swap(new)

    def install_keypair(self, peer, local_index, remote_index, send_key, recv_key,
                        initiator, KeypairShare share=None) -> None:
        cdef int32_t p = operator_index(peer), slot = 0
        cdef const unsigned char[::1] sk = bytes(send_key)
        cdef const unsigned char[::1] rk = bytes(recv_key)
        cdef session_t *s
        cdef keypair_t *k
        if not 0 <= p < self.npeer_session:
            raise IndexError(f"peer {p} is not in the tables")
        if sk.shape[0] != 32 or rk.shape[0] != 32:
            raise ValueError("send_key and recv_key must be 32 bytes")
        s = &self.spool[self.peer_session[p]]
        if s.next >= 0:
            self._drop(s.next)
        if initiator and s.previous >= 0:
            self._drop(s.previous)
        while self.keypairs[slot].used:
            slot += 1
        k = &self.keypairs[slot]
        memset(k, 0, sizeof(keypair_t))
        k.send_ctx = keyed_ctx(&sk[0], True)
        k.recv_ctx = keyed_ctx(&rk[0], False)
        if share is None:
            share = KeypairShare()
        WG_REF(&share.sh.refs)
        k.sh = share.sh
        k.used = True
        k.local_index = operator_index(local_index)
        k.remote_index = operator_index(remote_index)
        k.session = self.peer_session[p]
        k.initiator = bool(initiator)
        k.created = self.now
        self.expiry_due = min(self.expiry_due, k.created + 3 * self.reject_after_time)
        if k.initiator:
            s.previous, s.current = s.current, slot
        else:
            s.next = slot
        s.asked_round = 0
        self._rebuild_index()
        if k.initiator:
            self._send_staged_now(s)

    def send_staged(self, peer) -> int:
        cdef int32_t p = operator_index(peer)
        if not 0 <= p < self.npeer_session:
            return 0
        return self._send_staged_now(&self.spool[self.peer_session[p]])

    def confirm_session(self, peer, local_index) -> bool:
        cdef int32_t p = operator_index(peer)
        cdef uint32_t index = operator_index(local_index)
        cdef session_t *s
        if not 0 <= p < self.npeer_session:
            return False
        s = &self.spool[self.peer_session[p]]
        if s.next < 0 or self.keypairs[s.next].local_index != index:
            return False
        self._promote_next(s)
        return True

    cdef inline void _promote_next(self, session_t *s) noexcept nogil:
        WG_SEQ_BEGIN(&s.seq)
        if s.previous >= 0:
            self._drop_nogil(s.previous)
        s.previous, s.current, s.next = s.current, s.next, -1
        WG_SEQ_END(&s.seq)

    def drop_staged(self, peer) -> int:
        cdef int32_t p = operator_index(peer)
        if not 0 <= p < self.npeer_session:
            return 0
        return self._expire_staged(&self.spool[self.peer_session[p]])

    cdef int32_t _expire_staged(self, session_t *s) noexcept:
        cdef int32_t dropped = s.staged_count
        self.ctr[CTR_WG_STAGED_EXPIRED] += dropped
        s.staged_head = s.staged_count = 0
        return dropped

    cdef int32_t _send_staged_now(self, session_t *s) except -1:
        """Seal the held packets in their slots and send them (one flush for all)."""
        cdef _TableGeneration gen = self.gen
        cdef int32_t kp, sent = 0, i
        cdef unsigned char *pkt
        if s.staged_count == 0 or self._sendable(s) < 0 or s.peer < 0:
            return 0
        self._enter()
        try:
            with nogil:
                while s.staged_count:
                    kp = self._sendable(s)
                    if kp < 0:
                        break       # used up on the way (REJECT_AFTER_MESSAGES)
                    i = s.staged_head
                    s.staged_head = (i + 1) % STAGED_MAX_C
                    s.staged_count -= 1
                    pkt = s.staged + <size_t>i * STAGED_STRIDE_C + WG_HEADER_LEN
                    self.ctr[CTR_WG_STAGED_SENT] += 1
                    self._seal_and_queue(&gen.t, s, &self.keypairs[kp], s.peer, pkt,
                                         s.staged_len[i])
                    sent += 1
                self._flush(&gen.t)
        finally:
            self.busy = False
        return sent

    def set_endpoint(self, peer, ip, port) -> None:
        cdef int32_t p = operator_index(peer)
        cdef session_t *s
        if not 0 <= p < self.npeer_session:
            raise IndexError(f"peer {p} is not in the tables")
        s = &self.spool[self.peer_session[p]]
        s.endpoint.sin_family = AF_INET
        s.endpoint.sin_port = htons(operator_index(port))
        s.endpoint.sin_addr.s_addr = htonl(_parse_addr(ip))
        s.roamed = True
        memcpy(&self.gen.t.peers[p].addr, &s.endpoint, sizeof(sockaddr_in))

    def endpoints(self) -> list:
        """Per peer, where its packets go: safe while the forwarder's thread runs (seq)."""
        cdef int32_t i
        cdef sockaddr_in a
        out = []
        for i in range(self.gen.t.npeers):
            self._endpoint_of(i, &a)
            out.append((_format_addr(ntohl(a.sin_addr.s_addr)), ntohs(a.sin_port)))
        return out

    def endpoint(self, peer) -> tuple:
        """Where ``peer``'s packets go now (one row of endpoints(); safe while the thread runs)."""
        cdef int32_t p = operator_index(peer)
        cdef sockaddr_in a
        if not 0 <= p < self.gen.t.npeers:
            raise IndexError(f"peer {p} is not in the tables")
        self._endpoint_of(p, &a)
        return (_format_addr(ntohl(a.sin_addr.s_addr)), ntohs(a.sin_port))

    def confirming(self, peer, local_index) -> bool:
        """Whether confirm_session(peer, local_index) would make a keypair current here. Safe
        while the thread runs (seq); once False it stays so until the next install: only an
        install (paused) makes a keypair "next", only a batch or a confirm takes it away."""
        cdef int32_t p = operator_index(peer), nxt
        cdef uint32_t index = operator_index(local_index), found, v
        cdef session_t *s
        if not 0 <= p < self.npeer_session:
            return False
        s = &self.spool[self.peer_session[p]]
        while True:
            v = WG_SEQ_READ(&s.seq)
            if not v & 1:
                nxt = s.next
                found = self.keypairs[nxt].local_index if nxt >= 0 else 0
                if not WG_SEQ_CHANGED(&s.seq, v):
                    return nxt >= 0 and found == index
            sched_yield()

    def staged_count(self, peer) -> int:
        """Packets held for ``peer`` (what send_staged would try to send); one writer, the
        thread, which holds packets only while the peer has no usable keypair."""
        cdef int32_t p = operator_index(peer)
        if not 0 <= p < self.npeer_session:
            return 0
        return WG_LOAD32(&self.spool[self.peer_session[p]].staged_count)

    cdef void _endpoint_of(self, int32_t peer, sockaddr_in *out) noexcept nogil:
        cdef uint32_t *seq = &self.spool[self.peer_session[peer]].seq
        cdef uint32_t v
        while True:
            v = WG_SEQ_READ(seq)
            if not v & 1:
                memcpy(out, &self.gen.t.peers[peer].addr, sizeof(sockaddr_in))
                if not WG_SEQ_CHANGED(seq, v):
                    return
            sched_yield()       # the writer is inside its few stores (or was preempted there)

    def activity(self) -> list:
        cdef int32_t i
        cdef session_t *s
        out = []
        for i in range(self.npeer_session):
            s = &self.spool[self.peer_session[i]]
            out.append(tuple(float("-inf") if v == WG_NEVER else v for v in
                             (s.sent_any, s.received_any, s.sent_data, s.received_data)))
        return out

    def sessions(self, now=None) -> list:
        """Per peer: (keypairs held, age of the current one or -1). With ``now``: as of the
        later of it and the forwarder's clock, without moving the clock, a keypair that a
        clock step then would zero not counted - readable while the forwarder's thread runs
        (seq), and what set_now(now) and then sessions() would say."""
        cdef int32_t i, slot, k
        cdef int32_t held[3]
        cdef double created[3]
        cdef double at = self.now, limit = 3 * self.reject_after_time
        cdef session_t *s
        cdef uint32_t v
        if now is not None and float(now) > at:
            at = float(now)
        out = []
        for i in range(self.npeer_session):
            s = &self.spool[self.peer_session[i]]
            while True:
                v = WG_SEQ_READ(&s.seq)
                if not v & 1:
                    held[0], held[1], held[2] = s.current, s.previous, s.next
                    for k in range(3):
                        created[k] = self.keypairs[held[k]].created if held[k] >= 0 else 0.0
                    if not WG_SEQ_CHANGED(&s.seq, v):
                        break
                sched_yield()
            usable = 0
            for k in range(3):
                if held[k] >= 0 and (now is None or at - created[k] < limit):
                    usable += 1
                else:
                    held[k] = -1
            out.append((usable, at - created[0] if held[0] >= 0 else -1.0))
        return out

    def drain_events(self) -> list:
        """The queued events, oldest first; the consumer's side of the ring, so it may run
        beside a batch (the threads engine drains without pausing the thread)."""
        cdef uint64_t head = self.ev_head, tail = WG_ACQ64(&self.ev_tail), j
        cdef wg_event_t *e
        if tail == head:
            return []
        out = []
        for j in range(head, tail):
            e = &self.events[j % WG_MAX_EVENTS]
            addr = ((_format_addr(ntohl(e.addr.sin_addr.s_addr)), ntohs(e.addr.sin_port))
                    if e.has_addr else None)
            out.append((e.kind, e.peer, e.data[:e.length], addr))
        WG_REL64(&self.ev_head, tail)          # the slots are the producer's again
        WG_REL64(&self.drains, self.drains + 1)  # a new round: a peer may ask again
        return out

    def send_keepalive(self, peer) -> bool:
        cdef int32_t p = operator_index(peer)
        cdef _TableGeneration gen = self.gen
        cdef session_t *s
        cdef int32_t kp
        cdef unsigned char *buf
        if not 0 <= p < self.npeer_session:
            return False
        s = &self.spool[self.peer_session[p]]
        kp = self._sendable(s)
        if kp < 0:
            return False
        self._enter()
        try:
            # The first inside slot: no batch runs now, and the queue is sent before we return.
            buf = self.in_buf + HEADROOM_C
            if self._seal(&self.keypairs[kp], buf, 0, 0) < 0:
                return False
            s.sent_any = self.now
            self._queue(&gen.t, buf - WG_HEADER_LEN, WG_HEADER_LEN + WG_TAG_LEN, p, 0)
            self._flush(&gen.t)
            self.ctr[CTR_WG_KEEPALIVES_SENT] += 1
        finally:
            self.busy = False
        return True

    # -- per packet ---------------------------------------------------------------------------

    cdef inline int32_t _sendable(self, const session_t *s) noexcept nogil:
        cdef const keypair_t *k
        if s.current < 0:
            return -1
        k = &self.keypairs[s.current]
        if (self.now - k.created >= self.reject_after_time
                or WG_LOAD64(&k.sh.send_counter) >= self.reject_after_messages):
            return -1
        return s.current

    cdef inline bint _events_full(self) noexcept nogil:
        return self.ev_tail - WG_ACQ64(&self.ev_head) >= WG_MAX_EVENTS

    cdef inline void _event(self, int32_t kind, int32_t peer, const unsigned char *data,
                            uint32_t length, const sockaddr_in *addr) noexcept nogil:
        """Queue an event: a single-producer single-consumer ring, so that the control thread
        drains it while the batches go on. The producer (the thread's batches; a control call
        only while that thread is paused) fills slot tail, then publishes tail + 1 (release);
        the consumer reads up to the tail it loaded (acquire), then hands the slots back by
        publishing its head (release), which the producer loads (acquire) before reusing
        one. Every write the batch made before queuing (a promoted keypair, a held packet) is
        visible to whoever drained the event."""
        cdef uint64_t tail = self.ev_tail
        cdef wg_event_t *e
        if self._events_full():
            return
        e = &self.events[tail % WG_MAX_EVENTS]
        e.kind, e.peer, e.length = kind, peer, length
        if length:
            memcpy(e.data, data, length)
        e.has_addr = addr != NULL
        if addr != NULL:
            memcpy(&e.addr, addr, sizeof(sockaddr_in))
        WG_REL64(&self.ev_tail, tail + 1)

    cdef inline void _want_handshake(self, session_t *s) noexcept nogil:
        """One NEED_HANDSHAKE per peer per drain round (the drain's counter, not a flag it
        would clear: the consumer writes nothing of the producer's). A drain that races with
        the ask can let one more through; the handshake device answers a repeated ask with
        the handshake already under way."""
        cdef uint64_t round = WG_ACQ64(&self.drains) + 1
        if s.asked_round != round and not self._events_full():
            s.asked_round = round
            self._event(WG_EVENT_NEED_HANDSHAKE, s.peer, NULL, 0, NULL)

    cdef inline int _seal(self, keypair_t *k, unsigned char *pkt, uint32_t n,
                          uint32_t padded) noexcept nogil:
        """Seal pkt[0:padded] in place (pkt[n:padded] zeroed here), tag behind, header in
        front; -1 if libcrypto refused (counted as a decrypt/seal failure by the caller)."""
        cdef unsigned char nonce[12]
        cdef int outl = 0
        cdef unsigned char *hdr = pkt - WG_HEADER_LEN
        cdef uint64_t counter = WG_FETCH_ADD64(&k.sh.send_counter)
        if counter >= self.reject_after_messages:
            return -1       # another thread took the last nonce since _sendable looked
        if padded > n:
            memset(pkt + n, 0, padded - n)
        wg_nonce(nonce, counter)
        if (EVP_EncryptInit_ex(k.send_ctx, NULL, NULL, NULL, nonce) != 1
                or EVP_EncryptUpdate(k.send_ctx, pkt, &outl, pkt, <int>padded) != 1
                or EVP_EncryptFinal_ex(k.send_ctx, pkt + outl, &outl) != 1
                or EVP_CIPHER_CTX_ctrl(k.send_ctx, EVP_CTRL_AEAD_GET_TAG, WG_TAG_LEN,
                                       pkt + padded) != 1):
            return -1
        hdr[0] = WG_TRANSPORT
        hdr[1] = hdr[2] = hdr[3] = 0
        wr32le(hdr + 4, k.remote_index)
        wr32le(hdr + 8, <uint32_t>counter)
        wr32le(hdr + 12, <uint32_t>(counter >> 32))
        return 0

    cdef void _inside_one(self, const fwd_tables_t *t, unsigned char *pkt,
                          uint32_t n) noexcept nogil:
        cdef int32_t peer = self._route(t, pkt, n), kp
        cdef session_t *s
        if peer < 0:
            return
        s = &self.spool[self.peer_session[peer]]
        kp = self._sendable(s)
        if kp < 0:
            self._stage(s, pkt, n)
            return
        self._seal_and_queue(t, s, &self.keypairs[kp], peer, pkt, n)

    cdef inline void _stage(self, session_t *s, const unsigned char *pkt,
                            uint32_t n) noexcept nogil:
        """Hold a packet for a peer without a session (a copy into the ring), and ask for the
        handshake."""
        cdef int32_t i
        self._want_handshake(s)
        if n > STAGED_PACKET_MAX_C:
            self.ctr[CTR_WG_NO_SESSION] += 1
            return
        if s.staged_count >= STAGED_MAX_C:
            s.staged_head = (s.staged_head + 1) % STAGED_MAX_C
            s.staged_count -= 1
            self.ctr[CTR_WG_STAGED_OVERFLOW] += 1
        i = (s.staged_head + s.staged_count) % STAGED_MAX_C
        memcpy(s.staged + <size_t>i * STAGED_STRIDE_C + WG_HEADER_LEN, pkt, n)
        s.staged_len[i] = n
        s.staged_count += 1
        self.ctr[CTR_WG_STAGED] += 1

    cdef void _seal_and_queue(self, const fwd_tables_t *t, session_t *s, keypair_t *k,
                              int32_t peer, unsigned char *pkt, uint32_t n) noexcept nogil:
        """Seal one routed packet in place (header room in front, room behind) and queue it."""
        cdef uint32_t padded
        if (WG_LOAD64(&k.sh.send_counter) >= self.rekey_after_messages
                or (k.initiator and self.now - k.created >= self.rekey_after_time)):
            self._want_handshake(s)
        padded = wg_padded(n, t.peers[peer].path_mtu)
        if <size_t>padded + WG_TAG_LEN > SLOT_SIZE_C - 1:
            self.ctr[CTR_INSIDE_TOO_BIG] += 1
            return
        if self.capture_on:
            self._capture(0, peer, pkt, n)
        if self._seal(k, pkt, n, padded) < 0:
            self.ctr[CTR_TX_ERROR] += 1
            return
        s.sent_any = s.sent_data = self.now
        self._queue(t, pkt - WG_HEADER_LEN, WG_HEADER_LEN + padded + WG_TAG_LEN, peer, 0)

    cdef void _outside_one(self, const fwd_tables_t *t, unsigned char *pkt, uint32_t n,
                           int32_t peer) noexcept nogil:
        cdef int kind = wg_message_type(pkt, n)
        cdef unsigned char mac[WG_MAC_LEN]
        cdef size_t outl = 0
        if kind == WG_TRANSPORT:
            self._transport(t, pkt, n)
            return
        if kind == 0 or self.rx_from == NULL:
            self.ctr[CTR_WG_BAD_MESSAGE] += 1
            return
        if kind != WG_COOKIE_REPLY:
            if (EVP_MAC_init(self.mac1_ctx, NULL, 0, NULL) != 1
                    or EVP_MAC_update(self.mac1_ctx, pkt, n - 2 * WG_MAC_LEN) != 1
                    or EVP_MAC_final(self.mac1_ctx, mac, &outl, WG_MAC_LEN) != 1
                    or outl != WG_MAC_LEN
                    or memcmp(mac, pkt + n - 2 * WG_MAC_LEN, WG_MAC_LEN) != 0):
                self.ctr[CTR_WG_BAD_MAC1] += 1
                return
        if self._events_full():
            self.ctr[CTR_WG_HANDSHAKE_QUEUE_FULL] += 1
            return
        self.ctr[CTR_WG_HANDSHAKE_MESSAGES] += 1
        self._event(WG_EVENT_HANDSHAKE, -1, pkt, n, self.rx_from)

    cdef void _transport(self, const fwd_tables_t *t, unsigned char *pkt,
                         uint32_t n) noexcept nogil:
        cdef uint64_t *ctr = self.ctr
        cdef int32_t slot = self._lookup(rd32le(pkt + 4)), peer
        cdef uint64_t counter = rd64le(pkt + 8)
        cdef keypair_t *k
        cdef session_t *s
        cdef unsigned char nonce[12]
        cdef unsigned char *body = pkt + WG_HEADER_LEN
        cdef uint32_t length = n - WG_HEADER_LEN - WG_TAG_LEN, total
        cdef int outl = 0
        cdef peer_t *p
        cdef unsigned char index_le[4]
        if slot < 0 or self.spool[self.keypairs[slot].session].peer < 0:
            ctr[CTR_WG_UNKNOWN_INDEX] += 1
            return
        k = &self.keypairs[slot]
        if self.now - k.created >= self.reject_after_time:
            ctr[CTR_WG_STALE_KEYPAIR] += 1
            return
        if not wg_window_check(k.sh, counter, self.reject_after_messages):
            ctr[CTR_WG_REPLAY] += 1
            return
        wg_nonce(nonce, counter)
        if (EVP_DecryptInit_ex(k.recv_ctx, NULL, NULL, NULL, nonce) != 1
                or EVP_DecryptUpdate(k.recv_ctx, body, &outl, body, <int>length) != 1
                or EVP_CIPHER_CTX_ctrl(k.recv_ctx, EVP_CTRL_AEAD_SET_TAG, WG_TAG_LEN,
                                       body + length) != 1
                or EVP_DecryptFinal_ex(k.recv_ctx, body + outl, &outl) != 1):
            ctr[CTR_WG_DECRYPT_FAILED] += 1
            return
        if not wg_window_update(k.sh, counter, self.reject_after_messages):
            ctr[CTR_WG_REPLAY] += 1
            return
        s = &self.spool[k.session]
        peer = s.peer
        if s.next == slot:
            self._promote_next(s)
            wr32le(index_le, k.local_index)   # which keypair (other forwarders confirm it too)
            self._event(WG_EVENT_SESSION_CONFIRMED, peer, index_le, 4, NULL)
        p = &t.peers[peer]
        if self.rx_from != NULL and (p.addr.sin_addr.s_addr != self.rx_from.sin_addr.s_addr
                                     or p.addr.sin_port != self.rx_from.sin_port):
            WG_SEQ_BEGIN(&s.seq)
            memcpy(&p.addr, self.rx_from, sizeof(sockaddr_in))
            memcpy(&s.endpoint, self.rx_from, sizeof(sockaddr_in))
            s.roamed = True
            WG_SEQ_END(&s.seq)
            self._event(WG_EVENT_ENDPOINT, peer, NULL, 0, self.rx_from)
        p.rx_packets += 1
        p.rx_bytes += n
        s.received_any = self.now
        if k.initiator and self.now - k.created >= self.rekey_on_receive_age:
            self._want_handshake(s)
        if length == 0:
            ctr[CTR_WG_KEEPALIVES_RECEIVED] += 1
            return
        s.received_data = self.now
        if length >= IPV4_MIN_HEADER:
            total = rd16(body + 2)
            if IPV4_MIN_HEADER <= total < length:
                length = total          # the padding
        self._deliver(t, body, length, peer)

    cdef void _drop_nogil(self, int32_t slot) noexcept nogil:
        """_drop inside a batch (no GIL): free the keypair's contexts and take its index out
        of the open-addressing table, re-placing the probe run behind it."""
        cdef keypair_t *k = &self.keypairs[slot]
        cdef uint32_t h = (k.local_index * <uint32_t>2654435761) & self.index_mask
        cdef uint32_t j, want
        cdef int32_t moved
        if k.send_ctx != NULL:
            EVP_CIPHER_CTX_free(k.send_ctx)
        if k.recv_ctx != NULL:
            EVP_CIPHER_CTX_free(k.recv_ctx)
        k.send_ctx = NULL
        k.recv_ctx = NULL
        wg_shared_release(k.sh)
        k.sh = NULL
        k.used = False
        # remove from the open-addressing table and re-place the run that follows it
        while self.index_table[h] != slot:
            h = (h + 1) & self.index_mask
        self.index_table[h] = -1
        j = (h + 1) & self.index_mask
        while self.index_table[j] >= 0:
            moved = self.index_table[j]
            self.index_table[j] = -1
            want = (self.keypairs[moved].local_index * <uint32_t>2654435761) & self.index_mask
            while self.index_table[want] >= 0:
                want = (want + 1) & self.index_mask
            self.index_table[want] = moved
            j = (j + 1) & self.index_mask
