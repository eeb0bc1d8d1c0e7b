"""CPU-local flowlet steering on the fds: which data-plane thread a packet goes to.

With ``[dataplane] steering = "cpu"`` thread i runs only on its share of the daemon's CPUs
(``cpu_shares``), and two eBPF socket-filter programs choose the thread of a packet:

- the tun device's steering program (``TUNSETSTEERINGEBPF``, ``tun_program``): runs in the
  sending application's context and returns a queue (the kernel takes it modulo the number
  of queues; queue i is thread i's);
- the receive sockets' reuseport program (``SO_ATTACH_REUSEPORT_EBPF``, ``reuseport_program``):
  runs in the softirq that delivers the datagram, with skb->data at the UDP payload (the kernel
  pulls the UDP header around the program, net/core/sock_reuseport.c run_bpf_filter), and
  returns the index of a socket in the group (the order they were bound); an index out of
  range makes the kernel fall back to its 4-tuple hash.

Both decide per *flowlet*, not per packet. Each keeps an LRU hash map from a flow key to
{thread, last seen (bpf_ktime_get_ns)}: a flow's first packet takes the thread of the CPU it
is on, and the flow keeps that thread while its packets follow each other closer than
``FLOWLET_GAP_NS``; the first packet after a longer silence is steered afresh to its CPU's
thread - once the old thread has emptied its queue since the flow's last packet. For that the
engine's threads publish, in a BPF array both programs read (``create_drain_map``; slot 2i:
thread i's device queue, 2i+1: its socket), when they last found a queue empty (engine.pxi
item 10): a gap alone does not prove that nothing of the flow is still queued, a thread kept
off its CPU by other work may hold it longer. So, as XPS's ``ooo_okay`` does for TCP, a flow
moves only with nothing of it left to overtake. A ping (one packet per round, milliseconds
apart) is so steered CPU-locally every time; a TCP transfer or a flood stays on one thread and
is never reordered between two.

The flow key (``FLOW_KEY``, 40 bytes, zeroed first): the tun program and the udp and vxlan
backends' socket programs read an IP packet (at offset 0; vxlan routed: after the 8-byte VXLAN
header and the 14-byte inner Ethernet header): addresses, protocol, IP version, and the ports
of TCP and UDP unless the packet is a fragment (then no fragment has them, so all fragments of
one datagram share a key). The wireguard backend's datagrams are encrypted: a data message
(type 4) is keyed by its receiver index, which this host allocated for one session of one peer.
Anything else - handshakes, another IP version, a packet too short for its header - goes to
the current CPU's thread, per packet, and never fails: the program reads only through
bpf_skb_load_bytes, whose refusal of a short packet it checks.

The programs are built here as bytes (pure; tests/test_steering.py interprets them); creating
the map, loading and test-running take pointers and are done in C (cext/steering.pxi).
"""

from __future__ import annotations

import fcntl
import os
import socket
import struct
from collections.abc import Callable, Mapping, Sequence

TUNSETSTEERINGEBPF = 0x800454E0     # _IOR('T', 224, int), <linux/if_tun.h>
SO_ATTACH_REUSEPORT_EBPF = 52       # <asm-generic/socket.h>, Linux 4.5
SO_DETACH_REUSEPORT_BPF = 68        # <asm-generic/socket.h>, Linux 5.3
NO_SOCKET = 0xFFFFFFFF              # out of the group's range: the kernel picks by hash

# A flowlet ends after this much silence (the default of [dataplane] flowlet_gap_us). The drain
# times decide whether the flow's packets have all been *read* by the old thread; the gap must
# still cover the rest of their way through it (a batch is processed and sent in tens of
# microseconds: RTT p99 under load 40-200 us through both daemons), and it decides when a flow
# counts as a new flowlet at all. It must stay under the interval of the traffic that gains
# from being steered at each round: request/response and ping (the benchmark pings every 2 ms,
# ping(8) every second) re-steer at each round only if their gap is longer than this; at 5 ms
# the benchmark's ping lost its RTT gain (README, "CPU-local steering").
FLOWLET_GAP_NS = 1_000_000
# A new flowlet takes its CPU's thread unless the oldest packet steered to that thread's queue
# (this side's) has waited unread longer than this; then it takes the thread whose oldest unread
# packet is youngest (placement, below). An awake thread that keeps up reads a packet within its
# wake-up and one batch: RTT p50 is 17-18 us through both daemons and the kernels, so a packet
# still unread after 50 us is behind a batch that is taking long or a thread kept off its CPU
# (the sending application on the same CPU). Longer, and flows started together (iperf3 -P
# opens its streams within tens of microseconds) would all share the first one's thread;
# shorter, and a request would leave its CPU whenever a batch happens to be in progress.
BUSY_NS = 50_000
FLOWS = 65536                       # flowlets remembered per program (LRU: the oldest go)
FLOW_KEY_BYTES = 40                 # src[16] dst[16] proto version pad[2] sport dport
FLOWLET_BYTES = 16                  # u32 thread, u32 pad, u64 last seen (ns)
VXLAN_INNER_IP = 8 + 14             # VXLAN header + inner Ethernet header (routed)
WG_DATA_MESSAGE = 4                 # WireGuard's message type of transport data

# eBPF (<linux/bpf.h>): struct bpf_insn = code, dst_reg:4 | src_reg:4, s16 off, s32 imm
_EBPF = struct.Struct("<BBhi")
LD, LDX, ST, STX, JMP, ALU, ALU64 = 0x00, 0x01, 0x02, 0x03, 0x05, 0x04, 0x07
SIZE = {1: 0x10, 2: 0x08, 4: 0x00, 8: 0x18}          # BPF_B, BPF_H, BPF_W, BPF_DW
MEM, IMM, K, X = 0x60, 0x00, 0x00, 0x08
ADD, SUB, AND, LSH, RSH, MOV = 0x00, 0x10, 0x50, 0x60, 0x70, 0xB0
JA, JEQ, JGT, JGE, JSET, JNE, JLT, CALL, EXIT = (0x00, 0x10, 0x20, 0x30, 0x40, 0x50, 0xA0,
                                                0x80, 0x90)
PSEUDO_MAP_FD = 1                   # BPF_PSEUDO_MAP_FD: ld_imm64's imm is a map fd
MAP_LOOKUP_ELEM, MAP_UPDATE_ELEM, KTIME_GET_NS = 1, 2, 5
GET_SMP_PROCESSOR_ID, SKB_LOAD_BYTES = 8, 26

# registers: r1-r5 arguments (clobbered by calls), r6-r9 kept across calls, r10 the frame;
# once the key is built, r6 and r8 take the flow's last-seen time and its flowlet in the map
CTX, THREAD, OFFSET, NOW, FP = 6, 7, 8, 9, 10
LAST, FLOWLET_AT = CTX, OFFSET
# the stack frame (offsets from r10)
KEY = -FLOW_KEY_BYTES               # -40..-1
FLOWLET = KEY - FLOWLET_BYTES       # -56..-41
HEADER = FLOWLET - 24               # -80..-61: an IPv4 header (20 bytes)
SLOT = HEADER                       # (then) a drain map slot, a u32 key
SEEN = HEADER + 8                   # (then) a u64: the later of a drain and a sleep time
DEVICE_SIDE, SOCKET_SIDE = 0, 1     # drain slot 2i: thread i's device queue, 2i+1: its socket


class _Assembler:
    """eBPF instructions with named jump targets, resolved by ``code()``."""

    def __init__(self) -> None:
        self._insns: list[tuple[int, int, int, int, int, str | None]] = []
        self._labels: dict[str, int] = {}

    def op(self, code: int, dst: int = 0, src: int = 0, off: int = 0, imm: int = 0,
           to: str | None = None) -> None:
        self._insns.append((code, dst, src, off, imm, to))

    def label(self, name: str) -> None:
        self._labels[name] = len(self._insns)

    def jump(self, op: int, dst: int, imm: int, to: str) -> None:
        self.op(JMP | op | K, dst, imm=imm, to=to)

    def jump_reg(self, op: int, dst: int, src: int, to: str) -> None:
        self.op(JMP | op | X, dst, src, to=to)

    def goto(self, to: str) -> None:
        self.op(JMP | JA, to=to)

    def mov(self, dst: int, src: int) -> None:
        self.op(ALU64 | MOV | X, dst, src)

    def mov32(self, dst: int, imm: int) -> None:
        """dst = imm as an unsigned 32-bit value (NO_SOCKET stays 0xFFFFFFFF)."""
        self.op(ALU | MOV | K, dst, imm=imm - (1 << 32) if imm >= 1 << 31 else imm)

    def alu(self, op: int, dst: int, imm: int) -> None:
        self.op(ALU64 | op | K, dst, imm=imm)

    def load(self, size: int, dst: int, src: int, off: int) -> None:
        self.op(LDX | MEM | SIZE[size], dst, src, off)

    def store(self, size: int, dst: int, off: int, src: int) -> None:
        self.op(STX | MEM | SIZE[size], dst, src, off)

    def store_imm(self, size: int, dst: int, off: int, imm: int) -> None:
        self.op(ST | MEM | SIZE[size], dst, off=off, imm=imm)

    def call(self, helper: int) -> None:
        self.op(JMP | CALL, imm=helper)

    def exit(self) -> None:
        self.op(JMP | EXIT)

    def map_fd(self, dst: int, fd: int) -> None:
        """ld_imm64 dst, map: two slots, the second all zero."""
        self.op(LD | IMM | SIZE[8], dst, PSEUDO_MAP_FD, imm=fd)
        self.op(0)

    def frame(self, dst: int, off: int) -> None:
        self.mov(dst, FP)
        self.alu(ADD, dst, off)

    def load_bytes(self, offset: int | None, to: int, length: int, fail: str) -> None:
        """bpf_skb_load_bytes(skb, offset (None: the OFFSET register), fp + to, length);
        a packet too short for it jumps to ``fail``."""
        self.mov(1, CTX)
        if offset is None:
            self.mov(2, OFFSET)
        else:
            self.op(ALU64 | MOV | K, 2, imm=offset)
        self.frame(3, to)
        self.op(ALU64 | MOV | K, 4, imm=length)
        self.call(SKB_LOAD_BYTES)
        self.jump(JNE, 0, 0, fail)

    def code(self) -> bytes:
        out = []
        for at, (code, dst, src, off, imm, to) in enumerate(self._insns):
            if to is not None:
                off = self._labels[to] - at - 1
                if not -(1 << 15) <= off < 1 << 15:
                    raise ValueError(f"eBPF jump of {off} instructions: beyond 16 bits")
            out.append(_EBPF.pack(code, dst | src << 4, off, imm))
        return b"".join(out)


def allowed_cpus() -> list[int]:
    """The CPUs this process may run on (taskset, cpuset cgroups, systemd's CPUAffinity=)."""
    return sorted(os.sched_getaffinity(0))


def cpu_shares(cpus: Sequence[int], threads: int) -> list[list[int]]:
    """Thread i's CPUs: the c_j of ``cpus`` with j % threads == i."""
    return [list(cpus[i::threads]) for i in range(threads)]


def thread_of_cpu(shares: Sequence[Sequence[int]]) -> dict[int, int]:
    """CPU number -> the index of the thread that runs there."""
    return {cpu: i for i, share in enumerate(shares) for cpu in share}


def tun_program(thread_of: Mapping[int, int], map_fd: int, drains_fd: int,
                gap_ns: int = FLOWLET_GAP_NS) -> bytes:
    """The device's program: flowlets of the IP packets the host sends into the device. A CPU
    without a thread returns its own number (the kernel takes it modulo the queues)."""
    return _flowlet_program(thread_of, map_fd, drains_fd, DEVICE_SIDE, gap_ns, _ip_key(0),
                            stranger=None)


def reuseport_program(thread_of: Mapping[int, int], map_fd: int, drains_fd: int,
                      backend: str, gap_ns: int = FLOWLET_GAP_NS) -> bytes:
    """The receive sockets' program for ``backend`` (udp, vxlan routed, wireguard): flowlets
    of what the datagrams carry. A CPU without a thread returns NO_SOCKET (the kernel's hash)."""
    keys = {"udp": _ip_key(0), "vxlan": _ip_key(VXLAN_INNER_IP), "wireguard": _wireguard_key}
    if backend not in keys:
        raise ValueError(f"no reuseport steering program for the {backend!r} backend")
    return _flowlet_program(thread_of, map_fd, drains_fd, SOCKET_SIDE, gap_ns, keys[backend],
                            stranger=NO_SOCKET)


def _flowlet_program(thread_of: Mapping[int, int], map_fd: int, drains_fd: int, side: int,
                     gap_ns: int, key: Callable[[_Assembler], None],
                     stranger: int | None) -> bytes:
    if not 0 < gap_ns < 1 << 31:
        raise ValueError(f"flowlet gap of {gap_ns} ns: the program compares it as a "
                         f"32-bit signed immediate (1 ns .. 2.1 s)")
    a = _Assembler()
    a.mov(CTX, 1)
    # THREAD = the thread of this CPU: a chain of compares on the CPU number, one per CPU
    a.call(GET_SMP_PROCESSOR_ID)
    by_thread = _group(thread_of)
    threads = max(thread_of.values(), default=0) + 1    # the drain map's (every thread has a CPU)
    for thread, cpus in by_thread.items():
        for cpu in cpus:
            a.jump(JEQ, 0, cpu, f"thread {thread}")
    if stranger is None:
        a.mov(THREAD, 0)
    else:
        a.mov32(THREAD, stranger)
    a.goto("key")
    for thread in by_thread:
        a.label(f"thread {thread}")
        a.mov32(THREAD, thread)
        a.goto("key")
    a.label("key")
    for off in range(KEY, 0, 8):
        a.store_imm(8, FP, off, 0)
    key(a)                      # jumps to "this cpu" when the packet has no key
    # the flowlet: the map's thread while the flow keeps coming, else a placed one from now on
    a.call(KTIME_GET_NS)
    a.mov(NOW, 0)
    a.map_fd(1, map_fd)
    a.frame(2, KEY)
    a.call(MAP_LOOKUP_ELEM)
    a.mov(FLOWLET_AT, 0)
    a.jump(JEQ, FLOWLET_AT, 0, "place")                # a new flow
    a.load(8, LAST, FLOWLET_AT, 8)
    a.store(8, FLOWLET_AT, 8, NOW)
    a.mov(1, NOW)
    a.op(ALU64 | SUB | X, 1, LAST)                      # the silence before this packet
    a.jump(JGT, 1, gap_ns, "silent")
    a.label("stay")             # within the flowlet, or its old thread still holds some of it
    a.load(4, THREAD, FLOWLET_AT, 0)
    a.goto("steered")
    a.label("silent")
    # Silent long enough - but move only once the old thread has emptied this side's queue
    # since the flow's last packet (the engine's drain times, engine.pxi item 10): a thread
    # kept off its CPU may still hold the flow's packets after any gap.
    a.load(4, 1, FLOWLET_AT, 0)
    a.alu(LSH, 1, 1)
    a.alu(ADD, 1, side)
    a.store(4, FP, SLOT, 1)
    a.map_fd(1, drains_fd)
    a.frame(2, SLOT)
    a.call(MAP_LOOKUP_ELEM)
    a.jump(JEQ, 0, 0, "place")  # no slot: a thread the daemon does not have (a stranger CPU's)
    a.load(8, 1, 0, 0)
    a.jump_reg(JLT, 1, LAST, "stay")
    a.label("place")            # a new flowlet: THREAD, or a thread that keeps up better
    _place(a, drains_fd, threads, side)
    a.jump(JEQ, FLOWLET_AT, 0, "new flow")
    a.store(4, FLOWLET_AT, 0, THREAD)   # (two CPUs racing here: either is right)
    a.goto("steered")
    a.label("new flow")
    a.store(4, FP, FLOWLET, THREAD)
    a.store_imm(4, FP, FLOWLET + 4, 0)
    a.store(8, FP, FLOWLET + 8, NOW)
    a.map_fd(1, map_fd)
    a.frame(2, KEY)
    a.frame(3, FLOWLET)
    a.op(ALU64 | MOV | K, 4, imm=0)                     # BPF_ANY
    a.call(MAP_UPDATE_ELEM)     # a full map evicts its least recently used flow
    a.label("steered")
    # THREAD's queue holds a packet from now on: unless it already held one unread (pending
    # after its last drain and sleep), the queue's wait starts now
    _unread(a, drains_fd, threads, side, None, "note", "this cpu")
    a.jump_reg(JGT, 1, 2, "this cpu")
    a.store(8, 0, 0, NOW)
    a.label("this cpu")
    a.mov(0, THREAD)
    a.exit()
    return a.code()


# The placement's load signal, in the drain map after the engine's slots (create_drain_map):
# slot 2n + i is thread i's sleep time (engine.pxi item 11), slot 3n + 2i + side is when the
# oldest packet the programs steered to thread i's queue on that side since its last drain or
# sleep was steered ("pending"). A queue's wait is now - pending while pending is later than
# both, else nothing: a thread asleep since before its last packet was steered (woken, not yet
# running) waits only as long as that packet has, an idle thread whose last batch was long ago
# (its drain time old) waits nothing, a thread busy with a batch or kept off its CPU waits
# longer and longer. The programs store pending only when a queue's wait begins: once per drain.

def _unread(a: _Assembler, drains_fd: int, threads: int, side: int, thread: int | None,
            tag: str, no_slots: str) -> None:
    """r0 = the pending slot of ``thread``'s queue (None: THREAD's), r1 = its time, r2 = the
    later of its drain and sleep times; a thread without slots (a stranger CPU's) jumps to
    ``no_slots``."""
    def lookup(base: int, per_thread: int) -> None:
        if thread is None:
            a.mov(1, THREAD)
            if per_thread == 2:
                a.alu(LSH, 1, 1)
            a.alu(ADD, 1, base)
        else:
            a.op(ALU64 | MOV | K, 1, imm=base + per_thread * thread)
        a.store(4, FP, SLOT, 1)
        a.map_fd(1, drains_fd)
        a.frame(2, SLOT)
        a.call(MAP_LOOKUP_ELEM)
        a.jump(JEQ, 0, 0, no_slots)
    if thread is None:
        a.jump(JGT, THREAD, threads - 1, no_slots)
    lookup(side, 2)                                     # 2i + side: its drain time
    a.load(8, 1, 0, 0)
    a.store(8, FP, SEEN, 1)
    lookup(2 * threads, 1)                              # 2n + i: its sleep time
    a.load(8, 1, 0, 0)
    a.load(8, 2, FP, SEEN)
    a.jump_reg(JGE, 2, 1, f"{tag} drained later")
    a.store(8, FP, SEEN, 1)
    a.label(f"{tag} drained later")
    lookup(3 * threads + side, 2)                       # 3n + 2i + side: its pending time
    a.load(8, 1, 0, 0)
    a.load(8, 2, FP, SEEN)


def _wait(a: _Assembler, drains_fd: int, threads: int, side: int, thread: int | None,
          tag: str) -> None:
    """r0 = how long the oldest unread packet of ``thread``'s queue has waited (None: THREAD's;
    a stranger CPU's keeps its own: jumps to "placed")."""
    _unread(a, drains_fd, threads, side, thread, tag, "placed")
    a.jump_reg(JGE, 2, 1, f"{tag} empty")               # nothing steered since
    a.jump_reg(JGT, 1, NOW, f"{tag} empty")             # (stored by another CPU just now)
    a.mov(0, NOW)
    a.op(ALU64 | SUB | X, 0, 1)
    a.goto(f"{tag} waited")
    a.label(f"{tag} empty")
    a.op(ALU64 | MOV | K, 0, imm=0)
    a.label(f"{tag} waited")


def _place(a: _Assembler, drains_fd: int, threads: int, side: int) -> None:
    """THREAD = the current CPU's thread while its queue waits at most BUSY_NS, else the thread
    whose queue waits least (ties: the current CPU's). One unrolled pass over the threads (their
    number is known here); r6 (LAST, not needed any more) keeps the least wait."""
    _wait(a, drains_fd, threads, side, None, "here")
    a.jump(JGT, 0, BUSY_NS, "spread")
    a.goto("placed")
    a.label("spread")
    a.mov(LAST, 0)
    for thread in range(threads):
        _wait(a, drains_fd, threads, side, thread, f"thread {thread} waits")
        a.jump_reg(JGE, 0, LAST, f"thread {thread} no better")
        a.mov(LAST, 0)
        a.mov32(THREAD, thread)
        a.label(f"thread {thread} no better")
    a.label("placed")


def _ip_key(base: int) -> Callable[[_Assembler], None]:
    """The flow key of the IP packet at ``base``; "this cpu" for anything else."""
    def key(a: _Assembler) -> None:
        a.load_bytes(base, HEADER, 1, "this cpu")
        a.load(1, 1, FP, HEADER)
        a.alu(RSH, 1, 4)
        a.jump(JEQ, 1, 4, "ipv4")
        a.jump(JNE, 1, 6, "this cpu")
        # IPv6: the addresses straight into the key, then the next header
        a.load_bytes(base + 8, KEY, 32, "this cpu")
        a.load_bytes(base + 6, KEY + 32, 1, "this cpu")
        a.store_imm(1, FP, KEY + 33, 6)
        a.load(1, 1, FP, KEY + 32)
        a.op(ALU64 | MOV | K, OFFSET, imm=base + 40)
        # (a fragment header, 44, or another extension header: keyed without ports)
        a.jump(JEQ, 1, 6, "ports")
        a.jump(JEQ, 1, 17, "ports")
        a.goto("keyed")
        a.label("ipv4")
        a.load_bytes(base, HEADER, 20, "this cpu")
        a.load(1, OFFSET, FP, HEADER)
        a.alu(AND, OFFSET, 0x0F)
        a.jump(JLT, OFFSET, 5, "this cpu")             # IHL below 5 words: not IPv4
        a.alu(LSH, OFFSET, 2)
        a.alu(ADD, OFFSET, base)
        a.load(4, 1, FP, HEADER + 12)
        a.store(4, FP, KEY, 1)
        a.load(4, 1, FP, HEADER + 16)
        a.store(4, FP, KEY + 16, 1)
        a.load(1, 1, FP, HEADER + 9)
        a.store(1, FP, KEY + 32, 1)
        a.store_imm(1, FP, KEY + 33, 4)
        # flags and fragment offset, bytes 6-7 as loaded (little-endian u16): MF (0x20 of
        # byte 6), the offset's high bits (0x1f of byte 6) and its low byte (byte 7)
        a.load(2, 2, FP, HEADER + 6)
        a.jump(JSET, 2, 0xFF3F, "keyed")
        a.jump(JEQ, 1, 6, "ports")
        a.jump(JNE, 1, 17, "keyed")
        a.label("ports")
        a.load_bytes(None, KEY + 36, 4, "this cpu")
        a.label("keyed")
    return key


def _wireguard_key(a: _Assembler) -> None:
    """A transport data message (type 4): type, reserved and receiver index (8 bytes)."""
    a.load_bytes(0, KEY, 8, "this cpu")
    a.load(1, 1, FP, KEY)
    a.jump(JNE, 1, WG_DATA_MESSAGE, "this cpu")


def _group(thread_of: Mapping[int, int]) -> dict[int, list[int]]:
    by_thread: dict[int, list[int]] = {}
    for cpu, thread in sorted(thread_of.items()):
        by_thread.setdefault(thread, []).append(cpu)
    return by_thread


# -- the kernel side ------------------------------------------------------------------------------

def create_flow_map() -> int:
    """A fresh flowlet map (fd); the program loaded with it keeps it, the caller closes it."""
    from overlayd import _dataplane  # type: ignore[attr-defined]  # compiled only

    return int(_dataplane.bpf_create_flow_map(FLOW_KEY_BYTES, FLOWLET_BYTES, FLOWS))


def create_drain_map(threads: int) -> int:
    """The drain map of ``threads`` threads (all zero): per thread two drain times and a sleep
    time, which the engine maps (NativeEngine.report_drains, ``drain_bytes``), then two pending
    times, which only the programs write (placement); its fd."""
    from overlayd import _dataplane  # type: ignore[attr-defined]  # compiled only

    return int(_dataplane.bpf_create_drain_map(5 * threads))


def drain_bytes(threads: int) -> int:
    """The engine's part of the drain map: the drain and sleep times."""
    return 3 * threads * 8


def drain_map_bytes(threads: int) -> int:
    """All of the drain map, the programs' pending times included."""
    return 5 * threads * 8


def load_program(build: Callable[[int], bytes]) -> int:
    """Load ``build(map_fd)`` with a flow map of its own; the program's fd."""
    from overlayd import _dataplane  # type: ignore[attr-defined]  # compiled only

    map_fd = create_flow_map()
    try:
        return int(_dataplane.bpf_load_socket_filter(build(map_fd)))
    finally:
        os.close(map_fd)


def run_once(program_fd: int, payload: bytes) -> int:
    """What the loaded program returns for ``payload`` (as the hook presents it: an IP packet
    for the device, a UDP payload for the sockets), run on the calling CPU."""
    from overlayd import _dataplane  # type: ignore[attr-defined]  # compiled only

    # BPF_PROG_TEST_RUN takes an Ethernet frame and pulls its header before the program. Its
    # type is 0x88B5 (local experimental), not IPv4's or IPv6's: for those the kernel refuses
    # a frame shorter than their header, and the short packets are what is tested.
    return int(_dataplane.bpf_test_run(program_fd, bytes(12) + b"\x88\xb5" + payload))


def set_tun_steering(fd: int, program_fd: int) -> None:
    """Attach the steering program to the tun device of queue fd ``fd`` (the device's, for
    every queue); ``program_fd`` -1 detaches it. The device holds its own reference."""
    try:
        fcntl.ioctl(fd, TUNSETSTEERINGEBPF, struct.pack("i", program_fd))
    except OSError as exc:
        raise OSError(exc.errno, f"ioctl(TUNSETSTEERINGEBPF): {exc.strerror}") from None


def attach_reuseport(sock: socket.socket, program_fd: int) -> None:
    """The program of ``sock``'s SO_REUSEPORT group (it holds its own reference)."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_REUSEPORT_EBPF, program_fd)
    except OSError as exc:
        raise OSError(exc.errno, f"setsockopt(SO_ATTACH_REUSEPORT_EBPF): {exc.strerror}") \
            from None


def detach_reuseport(sock: socket.socket) -> None:
    sock.setsockopt(socket.SOL_SOCKET, SO_DETACH_REUSEPORT_BPF, 0)
