# CPU-local steering (`[dataplane] steering = "cpu"`): the setup calls Python cannot make
# without a raw pointer. Python side: overlayd/io/steering.py (builds the programs) and
# overlayd/runtime/steering.py (decides, attaches, falls back). Nothing here is on the packet
# path: each function runs once at start, after a device recreation, or for status.
#
# 1. bpf_load_socket_filter: bpf(BPF_PROG_LOAD) of an eBPF BPF_PROG_TYPE_SOCKET_FILTER
#    program (the tun steering program, TUNSETSTEERINGEBPF takes its fd). A first load asks
#    for no verifier log (a log too small for the verifier's words would itself fail the load
#    with ENOSPC); only a refused load is repeated with a log, so the error says why.
# 2. attach_reuseport_cbpf: SO_ATTACH_REUSEPORT_CBPF with a struct sock_fprog (a pointer to
#    the instructions), on one socket of the SO_REUSEPORT group: the program is the group's.
# 3. Thread affinity lives with the threads themselves (NativeEngine.pin/affinity, engine.pxi).

from libc.errno cimport EACCES

cdef extern from *:
    """
    #include <linux/bpf.h>
    #include <linux/filter.h>
    #include <sys/socket.h>
    #include <sys/syscall.h>
    #ifndef SO_ATTACH_REUSEPORT_CBPF
    #define SO_ATTACH_REUSEPORT_CBPF 51
    #endif

    static int steering_bpf_load(const void *insns, unsigned int count, char *log,
                                 unsigned int log_size) {
        union bpf_attr attr;
        memset(&attr, 0, sizeof(attr));
        attr.prog_type = BPF_PROG_TYPE_SOCKET_FILTER;
        attr.insns = (__u64)(uintptr_t)insns;
        attr.insn_cnt = count;
        /* the one helper used (bpf_get_smp_processor_id) is not GPL-only */
        attr.license = (__u64)(uintptr_t)"Apache-2.0";
        if (log != NULL && log_size > 0) {
            log[0] = 0;
            attr.log_buf = (__u64)(uintptr_t)log;
            attr.log_size = log_size;
            attr.log_level = 1;
        }
        return (int)syscall(__NR_bpf, BPF_PROG_LOAD, &attr, sizeof(attr));
    }

    static int steering_attach_reuseport_cbpf(int fd, const void *insns, unsigned short count) {
        struct sock_fprog prog;
        prog.len = count;
        prog.filter = (struct sock_filter *)insns;
        return setsockopt(fd, SOL_SOCKET, SO_ATTACH_REUSEPORT_CBPF, &prog, sizeof(prog));
    }
    """
    int steering_bpf_load(const void *insns, unsigned int count, char *log,
                          unsigned int log_size) nogil
    int steering_attach_reuseport_cbpf(int fd, const void *insns, unsigned short count) nogil

cdef enum:
    STEERING_LOG_BYTES = 65536
EBPF_INSN_BYTES = 8     # struct bpf_insn
CBPF_INSN_BYTES = 8     # struct sock_filter


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
        # the last line is the verifier's statistics; the reason is the line before
        words = [line for line in (<bytes>log).decode("utf-8", "replace").splitlines()
                 if line.strip() and not line.startswith("processed ")]
    finally:
        free(log)
    why = f" (verifier: {words[len(words) - 1]})" if words else ""
    raise OSError(err, f"bpf(BPF_PROG_LOAD): {strerror(err)}{why}")


def attach_reuseport_cbpf(int fd, bytes insns) -> None:
    """SO_ATTACH_REUSEPORT_CBPF on socket ``fd``: the classic BPF program chooses, by its
    return value, the index of the socket in the group (in the order they were bound); an
    index out of range makes the kernel fall back to its hash."""
    cdef const char *code = insns
    cdef size_t count = len(insns) // CBPF_INSN_BYTES
    if count == 0 or count > 4096 or len(insns) % CBPF_INSN_BYTES:
        raise ValueError(f"classic BPF program of {len(insns)} bytes: 1..4096 instructions")
    if steering_attach_reuseport_cbpf(fd, code, <unsigned short>count) < 0:
        err = errno
        raise OSError(err, f"setsockopt(SO_ATTACH_REUSEPORT_CBPF): {strerror(err)}")
