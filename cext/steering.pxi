# CPU-local flowlet steering (`[dataplane] steering = "cpu"`): the bpf() calls Python cannot
# make without a raw pointer. Python side: overlayd/io/steering.py (builds the programs) and
# overlayd/runtime/steering.py (decides, attaches, falls back). Nothing here is on the packet
# path: each function runs once at start, after a device recreation, for status or in a test.
#
# 1. bpf_create_flow_map: bpf(BPF_MAP_CREATE) of the BPF_MAP_TYPE_LRU_HASH a steering program
#    keeps its flowlets in (flow key -> thread, last seen); the program holds its own reference
#    once loaded, so the caller closes the fd after the load. bpf_create_drain_map: the array
#    both programs read the threads' drain times from (engine.pxi item 11 writes them).
# 2. bpf_load_socket_filter: bpf(BPF_PROG_LOAD) of an eBPF BPF_PROG_TYPE_SOCKET_FILTER program
#    (the type TUNSETSTEERINGEBPF and SO_ATTACH_REUSEPORT_EBPF take). A first load asks for no
#    verifier log (a log too small for the verifier's words would itself fail the load with
#    ENOSPC); only a refused load is repeated with a log, so the error says why.
# 3. bpf_test_run: bpf(BPF_PROG_TEST_RUN) of a loaded program on one packet, on the calling
#    CPU (the tests run the real programs from a process pinned to each CPU).
# 4. Thread affinity lives with the threads themselves (NativeEngine.pin/affinity, engine.pxi).

from libc.errno cimport EACCES

cdef extern from *:
    """
    #include <linux/bpf.h>
    #include <sys/syscall.h>

    static int steering_bpf(int cmd, union bpf_attr *attr) {
        return (int)syscall(__NR_bpf, cmd, attr, sizeof(*attr));
    }

    static int steering_map_create(unsigned int type, unsigned int flags,
                                   unsigned int key_size, unsigned int value_size,
                                   unsigned int max_entries) {
        union bpf_attr attr;
        memset(&attr, 0, sizeof(attr));
        attr.map_type = type;
        attr.map_flags = flags;
        attr.key_size = key_size;
        attr.value_size = value_size;
        attr.max_entries = max_entries;
        return steering_bpf(BPF_MAP_CREATE, &attr);
    }

    static int steering_bpf_load(const void *insns, unsigned int count, char *log,
                                 unsigned int log_size) {
        union bpf_attr attr;
        memset(&attr, 0, sizeof(attr));
        attr.prog_type = BPF_PROG_TYPE_SOCKET_FILTER;
        attr.insns = (__u64)(uintptr_t)insns;
        attr.insn_cnt = count;
        /* the helpers used (maps, ktime, smp id, skb_load_bytes) are not GPL-only */
        attr.license = (__u64)(uintptr_t)"Apache-2.0";
        if (log != NULL && log_size > 0) {
            log[0] = 0;
            attr.log_buf = (__u64)(uintptr_t)log;
            attr.log_size = log_size;
            attr.log_level = 1;
        }
        return steering_bpf(BPF_PROG_LOAD, &attr);
    }

    static int steering_test_run(int prog_fd, const void *data, unsigned int size,
                                 unsigned int *retval) {
        union bpf_attr attr;
        int rc;
        memset(&attr, 0, sizeof(attr));
        attr.test.prog_fd = prog_fd;
        attr.test.data_in = (__u64)(uintptr_t)data;
        attr.test.data_size_in = size;
        attr.test.repeat = 1;
        rc = steering_bpf(BPF_PROG_TEST_RUN, &attr);
        *retval = attr.test.retval;
        return rc;
    }
    """
    int steering_map_create(unsigned int type, unsigned int flags, unsigned int key_size,
                            unsigned int value_size, unsigned int max_entries) nogil
    const unsigned int BPF_MAP_TYPE_LRU_HASH
    const unsigned int BPF_MAP_TYPE_ARRAY
    const unsigned int BPF_F_MMAPABLE
    int steering_bpf_load(const void *insns, unsigned int count, char *log,
                          unsigned int log_size) nogil
    int steering_test_run(int prog_fd, const void *data, unsigned int size,
                          unsigned int *retval) nogil

cdef enum:
    STEERING_LOG_BYTES = 1 << 20    # the verifier's words for a few hundred instructions
EBPF_INSN_BYTES = 8     # struct bpf_insn


def bpf_create_flow_map(unsigned int key_size, unsigned int value_size,
                        unsigned int max_entries) -> int:
    """An LRU hash map (the kernel evicts the least recently used flow when it is full); its
    fd. OSError on refusal (EPERM: no CAP_BPF / a seccomp filter; ENOMEM: memlock/memcg)."""
    cdef int fd = steering_map_create(BPF_MAP_TYPE_LRU_HASH, 0, key_size, value_size,
                                      max_entries)
    if fd < 0:
        err = errno
        raise OSError(err, f"bpf(BPF_MAP_CREATE): {strerror(err)}")
    return fd


def bpf_create_drain_map(unsigned int slots) -> int:
    """An array of ``slots`` int64 (zero) the engine's threads map into their memory
    (BPF_F_MMAPABLE, Linux 5.5) to publish their drain times (engine.pxi item 11); its fd."""
    cdef int fd = steering_map_create(BPF_MAP_TYPE_ARRAY, BPF_F_MMAPABLE, 4, 8, slots)
    if fd < 0:
        err = errno
        raise OSError(err, f"bpf(BPF_MAP_CREATE): {strerror(err)}")
    return fd


def bpf_load_socket_filter(bytes insns) -> int:
    """Load eBPF instructions as a socket filter program; its fd (the caller closes it).

    OSError on refusal, with the kernel's errno (EPERM: no CAP_BPF / a seccomp filter;
    ENOSYS: no bpf(); EINVAL/EACCES: the verifier, whose last words end the message)."""
    cdef const char *code = insns
    cdef unsigned int count = len(insns) // EBPF_INSN_BYTES
    cdef int fd, err
    cdef char *log
    if count == 0 or len(insns) % EBPF_INSN_BYTES:
        raise ValueError(f"eBPF program of {len(insns)} bytes: not whole instructions")
    fd = steering_bpf_load(code, count, NULL, 0)
    if fd >= 0:
        return fd
    err = errno
    if err not in (EINVAL, EACCES):
        raise OSError(err, f"bpf(BPF_PROG_LOAD): {strerror(err)}")
    log = <char *>malloc(STEERING_LOG_BYTES)
    if log == NULL:
        raise OSError(err, f"bpf(BPF_PROG_LOAD): {strerror(err)}")
    try:
        fd = steering_bpf_load(code, count, log, STEERING_LOG_BYTES)
        if fd >= 0:         # accepted the second time: keep it
            return fd
        err = errno
        log[STEERING_LOG_BYTES - 1] = 0
        # the last line is the verifier's statistics; the reason is the line before, the
        # instruction it stopped at the one before that
        words = [line.strip() for line in (<bytes>log).decode("utf-8", "replace").splitlines()
                 if line.strip() and not line.startswith("processed ")]
    finally:
        free(log)
    why = f" (verifier: {'; '.join(words[-2:])})" if words else ""
    raise OSError(err, f"bpf(BPF_PROG_LOAD): {strerror(err)}{why}")


def bpf_test_run(int prog_fd, bytes packet) -> int:
    """Run the loaded program once on ``packet`` (an Ethernet frame: the kernel pulls the
    14-byte header, so the program sees what follows it) on this CPU; its return value."""
    cdef const char *data = packet
    cdef unsigned int retval = 0
    if steering_test_run(prog_fd, data, <unsigned int>len(packet), &retval) < 0:
        err = errno
        raise OSError(err, f"bpf(BPF_PROG_TEST_RUN): {strerror(err)}")
    return retval
