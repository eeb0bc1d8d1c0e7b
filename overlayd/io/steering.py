"""CPU-local steering on the fds: which CPU's packets go to which data-plane thread.

With ``[dataplane] steering = "cpu"`` thread i runs only on its share of the daemon's CPUs
(``cpu_shares``), and two small BPF programs send each packet to the thread of the CPU the
packet is already on, so its reader is woken there (no IPI, no halted vCPU to wake):

- the tun device's steering program (``TUNSETSTEERINGEBPF``, eBPF, ``tun_program``): runs in
  the sending application's context, returns the queue of the current CPU's thread; the
  kernel takes the return value modulo the number of queues;
- the receive sockets' reuseport program (``SO_ATTACH_REUSEPORT_CBPF``, classic BPF,
  ``reuseport_program``): runs in the softirq that delivers the datagram, returns the index of
  the current CPU's thread's socket in the group (the order the sockets were bound); for a
  CPU that has no thread it returns an index out of range and the kernel falls back to its
  4-tuple hash.

Both programs are a chain of compares on the CPU number, one per CPU of the daemon, grouped by
thread. The programs are built here as bytes; loading the eBPF one (the bpf() syscall) and
attaching the classic one take pointers and are done in C (cext/steering.pxi).
"""

from __future__ import annotations

import fcntl
import os
import socket
import struct
from collections.abc import Mapping, Sequence

TUNSETSTEERINGEBPF = 0x800454E0     # _IOR('T', 224, int), <linux/if_tun.h>
SO_DETACH_REUSEPORT_BPF = 68        # <asm-generic/socket.h>, Linux 5.3

# eBPF (<linux/bpf.h>): struct bpf_insn = code, dst_reg:4 | src_reg:4, s16 off, s32 imm
_EBPF = struct.Struct("<BBhi")
EBPF_CALL = 0x85                    # BPF_JMP | BPF_CALL
EBPF_EXIT = 0x95                    # BPF_JMP | BPF_EXIT
EBPF_JEQ_K = 0x15                   # BPF_JMP | BPF_JEQ | BPF_K: if dst == imm goto +off
EBPF_MOV64_K = 0xB7                 # BPF_ALU64 | BPF_MOV | BPF_K: dst = imm
BPF_FUNC_GET_SMP_PROCESSOR_ID = 8
# classic BPF (<linux/filter.h>): struct sock_filter = u16 code, u8 jt, u8 jf, u32 k
_CBPF = struct.Struct("<HBBI")
CBPF_LD_W_ABS = 0x20                # BPF_LD | BPF_W | BPF_ABS
CBPF_JEQ_K = 0x15                   # BPF_JMP | BPF_JEQ | BPF_K
CBPF_RET_K = 0x06                   # BPF_RET | BPF_K
SKF_AD_CPU = 0xFFFFF000 + 36        # SKF_AD_OFF + SKF_AD_CPU: "ld #cpu", raw_smp_processor_id()
CBPF_MAX_JUMP = 255                 # jt and jf are 8 bits
CBPF_MAX_INSNS = 4096               # BPF_MAXINSNS
NO_SOCKET = 0xFFFFFFFF              # out of range: the kernel picks by hash


def allowed_cpus() -> list[int]:
    """The CPUs this process may run on (taskset, cpuset cgroups, systemd's CPUAffinity=)."""
    return sorted(os.sched_getaffinity(0))


def cpu_shares(cpus: Sequence[int], threads: int) -> list[list[int]]:
    """Thread i's CPUs: the c_j of ``cpus`` with j % threads == i."""
    return [list(cpus[i::threads]) for i in range(threads)]


def thread_of_cpu(shares: Sequence[Sequence[int]]) -> dict[int, int]:
    """CPU number -> the index of the thread that runs there."""
    return {cpu: i for i, share in enumerate(shares) for cpu in share}


def tun_program(thread_of: Mapping[int, int]) -> bytes:
    """eBPF: r0 = bpf_get_smp_processor_id(); if r0 == cpu: return its thread; ...
    A CPU without a thread returns its own number (the kernel takes it modulo the queues)."""
    by_thread = _group(thread_of)
    compares = sum(len(cpus) for cpus in by_thread.values())
    out = [_EBPF.pack(EBPF_CALL, 0, 0, BPF_FUNC_GET_SMP_PROCESSOR_ID)]
    # layout: call, the compares, exit (default: r0 = the CPU), then per thread: r0 = i, exit
    returns_at = 1 + compares + 1
    target = {thread: returns_at + 2 * k for k, thread in enumerate(by_thread)}
    for thread, cpus in by_thread.items():
        for cpu in cpus:
            here = len(out)
            out.append(_EBPF.pack(EBPF_JEQ_K, 0, target[thread] - here - 1, cpu))
    out.append(_EBPF.pack(EBPF_EXIT, 0, 0, 0))
    for thread in by_thread:
        out.append(_EBPF.pack(EBPF_MOV64_K, 0, 0, thread))
        out.append(_EBPF.pack(EBPF_EXIT, 0, 0, 0))
    return b"".join(out)


def reuseport_program(thread_of: Mapping[int, int]) -> bytes:
    """Classic BPF: A = the current CPU; per thread, a block of compares on its CPUs that
    jumps to "return thread" (a block of at most 255, the reach of an 8-bit jump), else the
    next block; after the last, return an index out of range (the kernel's hash decides)."""
    out = [_CBPF.pack(CBPF_LD_W_ABS, 0, 0, SKF_AD_CPU)]
    for thread, cpus in _group(thread_of).items():
        for start in range(0, len(cpus), CBPF_MAX_JUMP):
            block = cpus[start:start + CBPF_MAX_JUMP]
            for k, cpu in enumerate(block):
                last = k == len(block) - 1
                # the "return thread" follows the block: jt reaches it, the last jf skips it
                out.append(_CBPF.pack(CBPF_JEQ_K, len(block) - k - 1, 1 if last else 0, cpu))
            out.append(_CBPF.pack(CBPF_RET_K, 0, 0, thread))
    out.append(_CBPF.pack(CBPF_RET_K, 0, 0, NO_SOCKET))
    if len(out) > CBPF_MAX_INSNS:
        raise ValueError(f"{len(thread_of)} CPUs need {len(out)} classic BPF instructions, "
                         f"more than the kernel's {CBPF_MAX_INSNS}")
    return b"".join(out)


def _group(thread_of: Mapping[int, int]) -> dict[int, list[int]]:
    by_thread: dict[int, list[int]] = {}
    for cpu, thread in sorted(thread_of.items()):
        by_thread.setdefault(thread, []).append(cpu)
    return by_thread


def set_tun_steering(fd: int, program_fd: int) -> None:
    """Attach the steering program to the tun device of queue fd ``fd`` (the device's, for
    every queue); ``program_fd`` -1 detaches it. The device holds its own reference."""
    try:
        fcntl.ioctl(fd, TUNSETSTEERINGEBPF, struct.pack("i", program_fd))
    except OSError as exc:
        raise OSError(exc.errno, f"ioctl(TUNSETSTEERINGEBPF): {exc.strerror}") from None


def attach_reuseport(sock: socket.socket, program: bytes) -> None:
    from overlayd import _dataplane  # type: ignore[attr-defined]  # compiled only

    _dataplane.attach_reuseport_cbpf(sock.fileno(), program)


def detach_reuseport(sock: socket.socket) -> None:
    sock.setsockopt(socket.SOL_SOCKET, SO_DETACH_REUSEPORT_BPF, 0)


def load_tun_program(program: bytes) -> int:
    from overlayd import _dataplane  # type: ignore[attr-defined]  # compiled only

    return int(_dataplane.bpf_load_socket_filter(program))
