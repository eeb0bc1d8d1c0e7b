"""The CPU steering programs and the decision around them (overlayd/io/steering.py,
overlayd/runtime/steering.py): the programs run in the real kernel (a reuseport group on
127.0.0.1, a multi-queue tun in a namespace of its own) from a process pinned to each CPU;
the plan says when cpu steering cannot apply; the config key is checked like the others."""

from __future__ import annotations

import json
import mmap
import os
import shutil
import socket
import struct
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from engine_helpers import drain, reuseport_sockets
from netns_helpers import NETNS_UNAVAILABLE
from test_config import problems_of, write

from overlayd.control.config import load_config
from overlayd.io import steering
from overlayd.lab import netns
from overlayd.runtime.steering import CpuSteering, plan_steering

COMPILED = os.environ.get("OVERLAYD_DATAPLANE") != "python"
needs_compiled = pytest.mark.skipif(not COMPILED, reason="the programs load through cext/")
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="loading eBPF needs CAP_BPF")
needs_two_cpus = pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2,
                                    reason="steering between CPUs needs two of them")
CPUS = sorted(os.sched_getaffinity(0))[:2]
BACKENDS = ("udp", "vxlan", "wireguard")


# -- packets --------------------------------------------------------------------------------------

def ipv4(proto: int, l4: bytes, frag: int = 0, ihl: int = 5, src: str = "10.1.0.1",
         dst: str = "10.1.0.2") -> bytes:
    header = struct.pack("!BBHHHBBH4s4s", 0x40 | ihl, 0, 20 + len(l4), 7, frag, 64, proto, 0,
                         socket.inet_aton(src), socket.inet_aton(dst))
    return header + bytes(4 * ihl - 20) + l4 if ihl >= 5 else header + l4


def udp4(sport: int, dport: int = 9, frag: int = 0, src: str = "10.1.0.1") -> bytes:
    return ipv4(17, struct.pack("!HHHH", sport, dport, 16, 0) + b"payload!", frag, src=src)


def udp6(sport: int, dport: int = 9, next_header: int = 17) -> bytes:
    l4 = struct.pack("!HHHH", sport, dport, 16, 0) + b"payload!"
    return (struct.pack("!IHBB", 6 << 28, len(l4), next_header, 64)
            + socket.inet_pton(socket.AF_INET6, "fd00::1")
            + socket.inet_pton(socket.AF_INET6, "fd00::2") + l4)


def carried(kind: str, packet: bytes) -> bytes:
    """What each program sees: the device's the IP packet, the sockets' the UDP payload."""
    if kind == "vxlan":    # VXLAN header (I flag, VNI 1), inner Ethernet, the packet
        ethertype = b"\x86\xdd" if packet[:1] and packet[0] >> 4 == 6 else b"\x08\x00"
        return struct.pack("!II", 0x08000000, 1 << 8) + bytes(12) + ethertype + packet
    return packet


def wg_data(receiver: int) -> bytes:
    """A WireGuard transport data message: type 4, receiver index, counter, ciphertext."""
    return struct.pack("<IIQ", 4, receiver, 99) + bytes(32)


# -- shares and programs (pure) -----------------------------------------------------------------

def test_cpu_shares_deal_the_cpus_round_robin() -> None:
    assert steering.cpu_shares([0, 1, 2, 3, 4], 2) == [[0, 2, 4], [1, 3]]
    assert steering.cpu_shares([2, 5, 7], 3) == [[2], [5], [7]]
    assert steering.thread_of_cpu([[0, 2], [1, 3]]) == {0: 0, 2: 0, 1: 1, 3: 1}


FLOWS_FD, DRAINS_FD = 3, 4      # what the interpreted programs are built with


class Interpreter:
    """A naive interpreter of the eBPF the program builders emit, with the kernel's helpers
    played by Python: the CPU, the clock, the flow map and the drain times (``drained``, as
    the engine's threads would store them) are the caller's."""

    MASK = (1 << 64) - 1

    def __init__(self, program: bytes, threads: int = 2) -> None:
        self.insns = [struct.unpack_from("<BBhi", program, i) for i in range(0, len(program), 8)]
        self.flows: dict[bytes, bytearray] = {}
        self.threads = threads
        self.drains = bytearray(40 * threads)

    def _set(self, slot: int, at_ns: int) -> None:
        self.drains[8 * slot:8 * slot + 8] = at_ns.to_bytes(8, "little")

    def drained(self, thread: int, side: int, at_ns: int) -> None:
        self._set(2 * thread + side, at_ns)

    def slept(self, thread: int, at_ns: int) -> None:
        self._set(2 * self.threads + thread, at_ns)

    def pending(self, thread: int, side: int) -> int:
        """When the oldest packet steered to the queue since its drain or sleep was steered."""
        at = 8 * (3 * self.threads + 2 * thread + side)
        return int.from_bytes(self.drains[at:at + 8], "little")

    def run(self, payload: bytes, cpu: int, now_ns: int) -> int:
        stack = bytearray(512)
        regs: list[Any] = [0] * 11
        regs[1], regs[10] = "skb", (stack, 512)
        pc = 0
        while True:
            code, r, off, imm = self.insns[pc]
            dst, src = r & 0x0F, r >> 4
            cls, op = code & 0x07, code & 0xF0
            pc += 1
            if code == 0x18:                                    # ld_imm64: the map
                assert src == steering.PSEUDO_MAP_FD
                regs[dst], pc = f"map {imm}", pc + 1
            elif cls in (steering.ALU64, steering.ALU):
                value = regs[src] if code & steering.X else imm & self.MASK
                regs[dst] = self.alu(op, regs[dst], value, cls == steering.ALU)
            elif cls == steering.LDX:
                buf, at = regs[src]
                size = {0x10: 1, 0x08: 2, 0x00: 4, 0x18: 8}[code & 0x18]
                regs[dst] = int.from_bytes(buf[at + off:at + off + size], "little")
            elif cls in (steering.ST, steering.STX):
                buf, at = regs[dst]
                size = {0x10: 1, 0x08: 2, 0x00: 4, 0x18: 8}[code & 0x18]
                value = (regs[src] if cls == steering.STX else imm) & ((1 << 8 * size) - 1)
                buf[at + off:at + off + size] = value.to_bytes(size, "little")
            elif code == steering.JMP | steering.CALL:
                regs[0] = self.helper(imm, regs, payload, cpu, now_ns)
            elif code == steering.JMP | steering.EXIT:
                return int(regs[0]) & 0xFFFFFFFF
            elif op == steering.JA:
                pc += off
            else:
                a, b = regs[dst], regs[src] if code & steering.X else imm & self.MASK
                if isinstance(a, tuple):                        # a map value: not NULL
                    assert op in (steering.JEQ, steering.JNE) and b == 0, op
                    a = 1
                taken = {steering.JEQ: a == b, steering.JNE: a != b, steering.JGT: a > b,
                         steering.JGE: a >= b, steering.JLT: a < b,
                         steering.JSET: bool(a & b)}[op]
                pc += off if taken else 0

    def alu(self, op: int, a: Any, b: Any, narrow: bool) -> Any:
        if op == steering.MOV:
            out = b
        elif isinstance(a, tuple):                              # a pointer: only moved by add
            assert op == steering.ADD, op
            return (a[0], a[1] + (b - (1 << 64) if b >> 63 else b))
        else:
            out = {steering.ADD: a + b, steering.SUB: a - b, steering.AND: a & b,
                   steering.LSH: a << b, steering.RSH: a >> b}[op]
        return out & (0xFFFFFFFF if narrow else self.MASK) if isinstance(out, int) else out

    def helper(self, helper: int, regs: list[Any], payload: bytes, cpu: int, now: int) -> Any:
        if helper == steering.GET_SMP_PROCESSOR_ID:
            return cpu
        if helper == steering.KTIME_GET_NS:
            return now
        if helper == steering.SKB_LOAD_BYTES:
            at, (buf, to), length = regs[2], regs[3], regs[4]
            if at + length > len(payload):
                return -14 & self.MASK                           # -EFAULT
            buf[to:to + length] = payload[at:at + length]
            return 0
        if regs[1] == f"map {DRAINS_FD}":
            assert helper == steering.MAP_LOOKUP_ELEM
            slot = int.from_bytes(regs[2][0][regs[2][1]:regs[2][1] + 4], "little")
            return (self.drains, 8 * slot) if 8 * slot < len(self.drains) else 0
        assert regs[1] == f"map {FLOWS_FD}", regs[1]
        key = bytes(regs[2][0][regs[2][1]:regs[2][1] + steering.FLOW_KEY_BYTES])
        if helper == steering.MAP_LOOKUP_ELEM:
            return (self.flows[key], 0) if key in self.flows else 0
        assert helper == steering.MAP_UPDATE_ELEM
        buf, at = regs[3]
        self.flows[key] = bytearray(buf[at:at + steering.FLOWLET_BYTES])
        return 0


def all_programs(thread_of: dict[int, int], map_fd: int = FLOWS_FD,
                 drains_fd: int = DRAINS_FD,
                 gap_ns: int = steering.FLOWLET_GAP_NS) -> dict[str, bytes]:
    return {"tun": steering.tun_program(thread_of, map_fd, drains_fd, gap_ns),
            **{backend: steering.reuseport_program(thread_of, map_fd, drains_fd, backend,
                                                   gap_ns)
               for backend in BACKENDS}}


@pytest.mark.parametrize("cpus, threads", [([0, 1], 2), ([0, 1, 2, 3], 2), ([3, 9, 17], 3),
                                           (list(range(600)), 2), (list(range(64)), 64)])
def test_programs_map_every_cpu_to_its_thread(cpus: list[int], threads: int) -> None:
    """A packet without a flow key (here: empty) goes to the thread of its CPU, for every
    CPU (600 on 2 threads: long compare chains); a CPU without a thread returns its number
    from the device's program (the kernel takes it modulo the queues) and an index out of
    range from the sockets' (the kernel's hash decides)."""
    thread_of = steering.thread_of_cpu(steering.cpu_shares(cpus, threads))
    stranger = max(cpus) + 1
    for kind, program in all_programs(thread_of).items():
        run = Interpreter(program, threads).run
        for cpu in cpus:
            assert run(b"", cpu, 0) == thread_of[cpu], (kind, cpu)
        assert run(b"", stranger, 0) == (stranger if kind == "tun" else steering.NO_SOCKET)


@pytest.mark.parametrize("kind, side", [("tun", steering.DEVICE_SIDE),
                                        ("udp", steering.SOCKET_SIDE)])
def test_a_flowlet_moves_after_a_silence_once_its_old_thread_has_drained(
        kind: str, side: int) -> None:
    """In the interpreter, on the clock's terms: within the gap the first packet's thread;
    after a silence longer than the gap still that thread until it has emptied this side's
    queue since the flow's last packet (a drain of the other side, or an older one, does not
    count), then the current CPU's; the silence is measured from the flow's last packet."""
    gap, t0 = steering.FLOWLET_GAP_NS, 10**9
    machine = Interpreter(all_programs({0: 0, 1: 1})[kind])
    packet = udp4(40000)
    assert machine.run(packet, 0, t0) == 0
    assert machine.run(packet, 1, t0 + gap // 2) == 0
    last = t0 + gap
    assert machine.run(packet, 1, last) == 0            # the gap itself: not longer than it
    machine.drained(0, side, last - 1)                  # drained, but before the last packet
    machine.drained(0, 1 - side, last + 10)             # the other side drained
    assert machine.run(packet, 1, last + 3 * gap) == 0  # silent, the old thread may hold some
    last += 3 * gap
    machine.drained(0, side, last)
    assert machine.run(packet, 1, last + gap // 2) == 0  # drained, but not silent
    last += gap // 2
    machine.drained(0, side, last + 5)
    assert machine.run(packet, 1, last + 2 * gap) == 1   # silent and drained: moves
    assert machine.run(packet, 0, last + 2 * gap + 1) == 1
    assert len(machine.flows) == 1


@pytest.mark.parametrize("kind, side", [("tun", steering.DEVICE_SIDE),
                                        ("udp", steering.SOCKET_SIDE)])
def test_a_new_flowlet_leaves_its_cpus_thread_only_when_that_one_falls_behind(
        kind: str, side: int) -> None:
    """Placement by load, on the interpreter's clock: a new flow takes its CPU's thread while
    nothing steered there has waited unread longer than BUSY_NS, else the thread whose queue
    waits least; the drain and sleep times of the other side do not count."""
    busy, t0 = steering.BUSY_NS, 10**9
    machine = Interpreter(all_programs({0: 0, 1: 1})[kind])
    assert machine.run(udp4(1), 0, t0) == 0              # idle (all zero): its CPU's thread
    assert machine.pending(0, side) == t0                 # thread 0's queue waits from now on
    assert machine.run(udp4(2), 0, t0 + busy) == 0        # waited just BUSY_NS: still keeps up
    assert machine.pending(0, side) == t0                 # (the oldest unread packet's time)
    machine.drained(0, 1 - side, t0 + busy)               # the other queue: no matter
    assert machine.run(udp4(3), 0, t0 + busy + 1) == 1    # behind: the idle thread
    assert machine.pending(1, side) == t0 + busy + 1
    # both waiting: the one waiting least, here thread 1 (ties would keep the CPU's)
    assert machine.run(udp4(4), 0, t0 + 3 * busy) == 1
    machine.drained(0, side, t0 + 3 * busy)               # thread 0 read everything
    assert machine.run(udp4(5), 1, t0 + 5 * busy) == 0    # thread 1 behind, 0 not: to 0
    assert machine.pending(0, side) == t0 + 5 * busy      # 0's wait starts again
    # a flow already going keeps its thread within the gap, however far behind it is
    for at in (t0 + 10 * busy, t0 + 100 * busy):
        assert machine.run(udp4(3), 0, at) == 1
        assert machine.run(udp4(1), 1, at) == 0


@pytest.mark.parametrize("kind, side", [("tun", steering.DEVICE_SIDE),
                                        ("wireguard", steering.SOCKET_SIDE)])
def test_an_idle_thread_is_not_read_as_backlogged(kind: str, side: int) -> None:
    """A thread that went to sleep with its queues read (the engine's sleep time) waits for
    nothing however old its last drain; woken by a packet but not yet running, it waits only
    as long as that packet has; a packet read by the batch that began before it was steered
    (its drain time older than the packet) stops counting once the thread sleeps."""
    busy, t0 = steering.BUSY_NS, 10**9
    machine = Interpreter(all_programs({0: 0, 1: 1})[kind])
    first = udp4(1) if kind == "tun" else wg_data(1)
    second = udp4(2) if kind == "tun" else wg_data(2)
    third = udp4(3) if kind == "tun" else wg_data(3)
    machine.drained(0, side, t0 - 10**9)                  # last drained a second ago
    machine.drained(1, side, t0)
    machine.slept(0, t0 - 10**8)                          # then slept, read empty
    assert machine.run(first, 0, t0) == 0                 # idle: its CPU's thread
    assert machine.run(second, 0, t0 + busy // 2) == 0    # woken, its packet waits 25 us
    assert machine.run(third, 0, t0 + 2 * busy) == 1      # 100 us: not keeping up
    machine.slept(0, t0 + 2 * busy + 1)                   # read it after all, then slept
    assert machine.run(udp4(4) if kind == "tun" else wg_data(4), 0, t0 + 3 * busy) == 0


def test_a_gap_beyond_the_programs_immediate_is_refused() -> None:
    with pytest.raises(ValueError, match="32-bit signed immediate"):
        steering.tun_program({0: 0}, FLOWS_FD, DRAINS_FD, 1 << 31)


# -- config ---------------------------------------------------------------------------------------

def test_steering_key_default_and_values(tmp_path: Path) -> None:
    config, _ = load_config(write(tmp_path, '[map]\nfile = "map.toml"\n'))
    assert config.steering == "flow"
    config, _ = load_config(write(tmp_path, '[map]\nfile = "map.toml"\n[dataplane]\n'
                                  'steering = "cpu"\n'))
    assert config.steering == "cpu"


@pytest.mark.parametrize("value, words", [('"rss"', "'rss' is not one of: flow, cpu"),
                                          ('"CPU"', "'CPU' is not one of: flow, cpu"),
                                          ("1", "must be a non-empty string, not an integer"),
                                          ('""', "must be a non-empty string")])
def test_steering_key_problems(tmp_path: Path, value: str, words: str) -> None:
    path = write(tmp_path, f'[map]\nfile = "map.toml"\n[dataplane]\nsteering = {value}\n')
    found = problems_of(path)
    assert any(p.startswith(f"{path}: dataplane.steering: ") and words in p
               for p in found), found


def test_flowlet_gap_key_default_value_and_problems(tmp_path: Path) -> None:
    config, _ = load_config(write(tmp_path, '[map]\nfile = "map.toml"\n'))
    assert config.flowlet_gap_us == steering.FLOWLET_GAP_NS // 1000 == 1000
    config, _ = load_config(write(tmp_path, '[map]\nfile = "map.toml"\n[dataplane]\n'
                                  'steering = "cpu"\nflowlet_gap_us = 250\n'))
    assert config.flowlet_gap_us == 250
    for value, words in [("0", "0 is out of range 10..1000000"),
                         ("2000000", "2000000 is out of range 10..1000000"),
                         ("1.5", "must be an integer, not a number"),
                         ('"1ms"', "must be an integer, not a string")]:
        path = write(tmp_path, f'[map]\nfile = "map.toml"\n[dataplane]\n'
                               f'flowlet_gap_us = {value}\n')
        found = problems_of(path)
        assert any(p.startswith(f"{path}: dataplane.flowlet_gap_us: ") and words in p
                   for p in found), (value, found)


def test_check_exits_78_naming_file_key_and_choices(tmp_path: Path) -> None:
    import subprocess
    path = write(tmp_path, '[map]\nfile = "map.toml"\n[dataplane]\nsteering = "rss"\n')
    result = subprocess.run([sys.executable, "-m", "overlayd", "check", "-c", str(path)],
                            check=False, capture_output=True, text=True, timeout=30)
    assert result.returncode == 78, result
    assert f"{path}: dataplane.steering: 'rss' is not one of: flow, cpu" in result.stderr


# -- the plan -------------------------------------------------------------------------------------

def test_plan_says_when_cpu_steering_cannot_apply() -> None:
    assert plan_steering("flow", "threads", 2, False, [0, 1]).describe() == {
        "requested": "flow", "mode": "flow", "reason": None, "cpus": [], "flowlet_gap_us": None}
    cpu = plan_steering("cpu", "threads", 2, False, [0, 1, 2], backend="vxlan",
                        flowlet_gap_us=250)
    assert (cpu.mode, cpu.shares, cpu.reason) == ("cpu", [[0, 2], [1]], None)
    assert (cpu.backend, cpu.describe()["flowlet_gap_us"]) == ("vxlan", 250)
    for args, words in [(("loop", 1, False), "loop engine"),
                        (("threads", 1, True), "switched backend runs one"),
                        (("threads", 1, False), "one data-plane thread"),
                        (("threads", 3, False), "3 data-plane threads on 2 allowed CPU(s) (0,1)")]:
        plan = plan_steering("cpu", *args, cpus=[0, 1])   # type: ignore[misc]
        assert plan.mode == "flow" and plan.shares == [], args
        assert plan.reason is not None and plan.reason.startswith("cpu steering not applied")
        assert words in plan.reason, plan.reason


@needs_compiled
@needs_root
def test_a_refused_program_falls_back_without_touching_the_fds(tmp_path: Path) -> None:
    """A kernel that takes the load but not the attach (here: the fd is no tun device, the
    ioctl's ENOTTY/EBADFD) leaves flow steering with the reason; nothing stays attached."""
    not_a_tun = SimpleNamespace(fds=[os.open(tmp_path / "f", os.O_CREAT | os.O_RDWR)])
    socks = reuseport_sockets("127.0.0.1", 2)
    plan = CpuSteering("cpu", [[0], [1]])
    try:
        plan.attach(not_a_tun, socks)
        assert plan.mode == "flow" and plan.shares == []
        assert plan.reason is not None and "ioctl(TUNSETSTEERINGEBPF)" in plan.reason
        # no program on the group: detaching finds none
        with pytest.raises(OSError):
            steering.detach_reuseport(socks[0])
    finally:
        plan.close()
        os.close(not_a_tun.fds[0])
        for s in socks:
            s.close()


@needs_compiled
@needs_root
def test_a_program_the_verifier_rejects_says_why() -> None:
    """The verifier's own words end the error (the load is repeated with a log buffer): here
    a program that returns without setting r0."""
    from overlayd import _dataplane  # type: ignore[attr-defined]

    with pytest.raises(OSError) as refused:
        _dataplane.bpf_load_socket_filter(struct.pack("<BBhi", steering.JMP | steering.EXIT,
                                                      0, 0, 0))
    assert refused.value.strerror.startswith("bpf(BPF_PROG_LOAD): Permission denied "
                                             "(verifier: "), refused.value.strerror
    assert "R0 !read_ok" in refused.value.strerror, refused.value.strerror


LOAD_PROBE = """
from overlayd.io import steering
try:
    drains = steering.create_drain_map(2)
    steering.load_program(lambda flows: steering.tun_program({0: 0, 1: 1}, flows, drains))
    print("loaded")
except OSError as exc:
    print(exc.strerror)
"""


@needs_compiled
@needs_root
@pytest.mark.skipif(shutil.which("setpriv") is None, reason="needs setpriv (util-linux)")
@pytest.mark.parametrize("caps, expected", [
    ("-all,+net_admin", "bpf(BPF_MAP_CREATE): Operation not permitted"),
    ("-all,+net_admin,+bpf", "loaded")], ids=["unit-caps", "with-cap-bpf"])
def test_the_tun_program_needs_cap_bpf(caps: str, expected: str) -> None:
    """The systemd units' bounding set (CAP_NET_ADMIN alone) cannot load it: cpu steering
    falls back there; README's drop-in adds CAP_BPF, which is enough (as root)."""
    import subprocess
    result = subprocess.run(["setpriv", "--bounding-set", caps, sys.executable, "-c",
                             LOAD_PROBE], check=True, capture_output=True, text=True,
                            timeout=30)
    assert result.stdout.strip() == expected, result


# -- the programs in the kernel -------------------------------------------------------------------

@pytest.fixture
def pinned_here() -> Iterator[None]:
    """Restore this thread's CPU set after a test that moves it."""
    before = os.sched_getaffinity(0)
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


TEST_GAP_NS = 150_000_000    # long enough for a CPU switch on a loaded machine, short to wait


class Drains:
    """The programs' drain map, mapped as the engine maps it: the test plays the threads."""

    def __init__(self, threads: int = 2) -> None:
        self.fd = steering.create_drain_map(threads)
        self.memory = mmap.mmap(self.fd, steering.drain_map_bytes(threads))
        self.threads = threads

    def all_now(self) -> None:
        """Every thread has just emptied both its queues."""
        now = time.monotonic_ns()      # CLOCK_MONOTONIC: bpf_ktime_get_ns's clock
        for at in range(0, len(self.memory), 8):
            self.memory[at:at + 8] = struct.pack("<q", now)

    def set(self, slot: int, at_ns: int) -> None:
        self.memory[8 * slot:8 * slot + 8] = struct.pack("<q", at_ns)

    def behind(self, thread: int, side: int, by_ns: int) -> None:
        """Thread ``thread``'s queue on ``side`` holds a packet steered ``by_ns`` ago, unread:
        drained and slept before that."""
        now = time.monotonic_ns()
        self.set(2 * thread + side, now - 2 * by_ns)
        self.set(2 * self.threads + thread, now - 2 * by_ns)
        self.set(3 * self.threads + 2 * thread + side, now - by_ns)

    def close(self) -> None:
        self.memory.close()
        os.close(self.fd)


@pytest.fixture
def drains() -> Iterator[Drains]:
    d = Drains()
    try:
        yield d
    finally:
        d.close()


@pytest.fixture
def loaded(pinned_here: None, drains: Drains) -> Iterator[dict[str, int]]:
    """The four programs loaded into the kernel (each with its own flow map, all with the
    drain map), the CPU-to-thread map crossed (CPUS[0] -> thread 1), so that "thread 0" by
    accident fails; their fds."""
    thread_of = {CPUS[0]: 1, CPUS[1]: 0}
    fds: dict[str, int] = {}
    try:
        for kind in ("tun", *BACKENDS):
            fds[kind] = steering.load_program(lambda flows, kind=kind: all_programs(
                thread_of, flows, drains.fd, TEST_GAP_NS)[kind])
        yield fds
    finally:
        for fd in fds.values():
            os.close(fd)


def on(cpu: int, fd: int, payload: bytes) -> int:
    """The program's answer for one packet, run on ``cpu`` (BPF_PROG_TEST_RUN)."""
    os.sched_setaffinity(0, {cpu})
    return steering.run_once(fd, payload)


def flows_of(kind: str) -> tuple[bytes, bytes, bytes]:
    """Two different flows of what ``kind`` sees, and a packet of the first flow again."""
    if kind == "wireguard":
        return wg_data(0x1234), wg_data(0x5678), wg_data(0x1234)[:16] + b"other ciphertext"
    return carried(kind, udp4(40001)), carried(kind, udp4(40002)), carried(kind, udp4(40001))


@pytest.mark.parametrize("kind", ["tun", *BACKENDS])
@needs_compiled
@needs_root
@needs_two_cpus
def test_a_flow_keeps_the_thread_of_its_first_cpu_until_it_falls_silent(
        loaded: dict[str, int], drains: Drains, kind: str) -> None:
    """The real programs in the kernel: a flow's first packet takes its CPU's thread; from the
    other CPU within the gap it keeps it (no reordering between threads); a second flow is
    decided on its own; after the gap it keeps it still while its old thread has not emptied
    its queue since (drain map), and once it has, the flow takes the current CPU's thread."""
    fd, (first, second, first_again) = loaded[kind], flows_of(kind)
    a, b = CPUS
    assert on(a, fd, first) == 1
    assert on(b, fd, first_again) == 1          # within the gap: the flowlet's thread
    assert on(b, fd, second) == 0               # another flow: its own CPU
    assert on(a, fd, second) == 0
    assert on(a, fd, first) == 1
    time.sleep(TEST_GAP_NS * 2 / 1e9)
    assert on(b, fd, first) == 1                # silent, but thread 1 has not drained since
    drains.all_now()
    time.sleep(TEST_GAP_NS * 2 / 1e9)
    assert on(b, fd, first) == 0                # silent and drained: steered afresh
    assert on(a, fd, first) == 0


@pytest.mark.parametrize("kind", ["tun", *BACKENDS])
@needs_compiled
@needs_root
@needs_two_cpus
def test_a_new_flow_goes_to_a_thread_that_keeps_up(
        loaded: dict[str, int], drains: Drains, kind: str) -> None:
    """The real programs, the drain map set by the test as the threads and the programs would
    leave it: a new flow from CPU a takes a's thread (1, crossed) while that one keeps up, the
    other one when a's has a packet unread for a millisecond and the other is idle; a flow
    already going keeps its thread within the gap however far behind that thread is."""
    fd, (first, second, first_again) = loaded[kind], flows_of(kind)
    side = steering.DEVICE_SIDE if kind == "tun" else steering.SOCKET_SIDE
    a, _ = CPUS
    drains.all_now()
    assert on(a, fd, first) == 1                # keeps up: the CPU's thread
    drains.all_now()
    drains.behind(1, side, 1_000_000)
    assert on(a, fd, second) == 0               # thread 1 behind, thread 0 idle
    drains.behind(0, side, 2_000_000)
    assert on(a, fd, first_again) == 1          # within the gap: stays, however behind
    assert on(a, fd, second) == 0


@pytest.mark.parametrize("kind", ["tun", "udp", "vxlan"])
@needs_compiled
@needs_root
@needs_two_cpus
def test_ipv6_and_fragments_are_flows_too(loaded: dict[str, int], kind: str) -> None:
    """IPv6 by its addresses and ports; the fragments of one IPv4 datagram (the first with
    its UDP header, the later ones without) by addresses and protocol, so they stay together;
    a different port is another IPv6 flow."""
    fd, (a, b) = loaded[kind], CPUS
    assert on(a, fd, carried(kind, udp6(5000))) == 1
    assert on(b, fd, carried(kind, udp6(5000))) == 1
    assert on(b, fd, carried(kind, udp6(5001))) == 0
    first = udp4(6000, frag=0x2000, src="10.1.0.9")               # MF, offset 0
    later = ipv4(17, b"rest of the datagram", frag=185, src="10.1.0.9")
    assert on(b, fd, carried(kind, first)) == 0
    assert on(a, fd, carried(kind, later)) == 0
    # an IPv6 fragment (next header 44) has no ports to read: a flow of its addresses
    assert on(b, fd, carried(kind, udp6(7000, next_header=44))) == 0
    assert on(a, fd, carried(kind, udp6(7001, next_header=44))) == 0


def unkeyed(kind: str) -> list[bytes]:
    """Packets without a flow key: each must go to the current CPU's thread."""
    if kind == "wireguard":
        return [b"", b"\x04\x00", b"\x01" + bytes(147), b"\x02" + bytes(91),
                b"\x03" + bytes(63)]                                # short, handshakes, cookie
    if kind == "vxlan":
        return [b"", bytes(8), carried(kind, b"\x45")]
    return [b"", b"\x45", b"\x70" + bytes(40), ipv4(17, b""), ipv4(6, b"\x01\x02"),
            ipv4(17, bytes(8), ihl=4), udp6(1)[:30], udp6(1)[:41]]


@pytest.mark.parametrize("kind", ["tun", *BACKENDS])
@needs_compiled
@needs_root
@needs_two_cpus
def test_a_packet_without_a_flow_key_goes_to_its_cpu(loaded: dict[str, int],
                                                     kind: str) -> None:
    """Truncated, garbage, another IP version, handshakes: the current CPU's thread, per
    packet (never the thread of a flowlet, never a failure), from either CPU in turn."""
    fd = loaded[kind]
    for packet in unkeyed(kind):
        for cpu in (*CPUS, *CPUS):
            assert on(cpu, fd, packet) == (1 if cpu == CPUS[0] else 0), (packet, cpu)


@needs_compiled
@needs_root
@needs_two_cpus
def test_the_default_gap_re_steers_a_flow_silent_for_a_few_milliseconds(
        pinned_here: None, drains: Drains) -> None:
    fd = steering.load_program(lambda flows: steering.tun_program({CPUS[0]: 0, CPUS[1]: 1},
                                                                  flows, drains.fd))
    try:
        for cpu in (*CPUS, *CPUS):
            assert on(cpu, fd, udp4(40000)) == CPUS.index(cpu)
            drains.all_now()
            time.sleep(steering.FLOWLET_GAP_NS * 10 / 1e9)
    finally:
        os.close(fd)


def crossed_or_not(order: tuple[int, int]) -> dict[int, int]:
    return {CPUS[0]: order[0], CPUS[1]: order[1]}


@needs_compiled
@needs_root
@needs_two_cpus
@pytest.mark.parametrize("order", [(0, 1), (1, 0)], ids=["straight", "crossed"])
@pytest.mark.parametrize("gap_ns", [steering.FLOWLET_GAP_NS, TEST_GAP_NS],
                         ids=["silent-between", "one-flowlet"])
def test_reuseport_program_picks_the_socket_of_the_flowlets_cpu(
        pinned_here: None, drains: Drains, order: tuple[int, int], gap_ns: int) -> None:
    """Loopback delivers in the sender's softirq, on the sender's CPU, with the UDP header
    pulled. Bursts of one flow from CPU a, b, a, b: with the default gap and a pause of 20 ms
    between them, each lands on the socket the program maps its CPU to (in the group's bind
    order); with a gap longer than the test all land on the first CPU's socket."""
    socks = reuseport_sockets("127.0.0.1", 2)
    sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    fd = steering.load_program(lambda flows: steering.reuseport_program(
        crossed_or_not(order), flows, drains.fd, "udp", gap_ns))
    try:
        thread_of = crossed_or_not(order)
        steering.attach_reuseport(socks[0], fd)
        for cpu in (*CPUS, *CPUS):
            os.sched_setaffinity(0, {cpu})
            for _ in range(20):
                sender.sendto(carried("udp", udp4(1234)), socks[0].getsockname())
            got = [len(drain(s)) for s in socks]
            drains.all_now()                     # (the sockets are empty)
            expected = thread_of[cpu if gap_ns == steering.FLOWLET_GAP_NS else CPUS[0]]
            assert got[expected] == 20 and sum(got) == 20, (cpu, got)
            time.sleep(0.02 if gap_ns == steering.FLOWLET_GAP_NS else 0)
        steering.detach_reuseport(socks[0])      # the kernel's hash again: one flow, one socket
        for cpu in CPUS:
            os.sched_setaffinity(0, {cpu})
            sender.sendto(b"hash", socks[0].getsockname())
        assert sorted(len(drain(s)) for s in socks) == [0, 2]
    finally:
        os.close(fd)
        sender.close()
        for s in socks:
            s.close()


TUN_PROBE = """
import json, mmap, os, select, socket, struct, subprocess, sys, time
from overlayd.io.device import OverlayDevice
from overlayd.io import steering
cpus, order, gap_ns = json.loads(sys.argv[1])
dev = OverlayDevice("steer0", "tun", queues=2)
subprocess.run(["ip", "addr", "add", "10.99.0.1/24", "dev", "steer0"], check=True)
subprocess.run(["ip", "link", "set", "steer0", "up"], check=True)
thread_of = {cpus[0]: order[0], cpus[1]: order[1]}
drains = steering.create_drain_map(2)
drain_times = mmap.mmap(drains, steering.drain_bytes(2))
program = steering.load_program(lambda flows: steering.tun_program(thread_of, flows, drains,
                                                                   gap_ns))
steering.set_tun_steering(dev.fds[1], program)     # any queue's fd: the device's program
os.close(program)                                  # the device holds its own reference
out = []
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for cpu in cpus + cpus:
    os.sched_setaffinity(0, {cpu})
    for _ in range(10):
        s.sendto(b"steer", ("10.99.0.2", 9))
    select.select(dev.fds, [], [], 0.2)
    counts = []
    for fd in dev.fds:
        n = 0
        while True:
            try:
                packet = os.read(fd, 2048)
            except BlockingIOError:
                break
            n += packet[9] == 17          # UDP (the kernel may send an IPv6 or IGMP packet)
        counts.append(n)
    now = time.monotonic_ns()                      # both queues read empty: drained
    for at in range(0, 32, 8):
        drain_times[at:at + 8] = struct.pack("<q", now)
    out.append([cpu, counts])
    time.sleep(0.02 if gap_ns == steering.FLOWLET_GAP_NS else 0)
print(json.dumps(out))
"""


@needs_compiled
@needs_two_cpus
@pytest.mark.parametrize("order", [(0, 1), (1, 0)], ids=["straight", "crossed"])
@pytest.mark.parametrize("gap_ns", [steering.FLOWLET_GAP_NS, TEST_GAP_NS],
                         ids=["silent-between", "one-flowlet"])
@pytest.mark.netns
@pytest.mark.skipif(NETNS_UNAVAILABLE is not None, reason=f"netns: {NETNS_UNAVAILABLE}")
def test_tun_program_picks_the_queue_of_the_flowlets_cpu(
        tmp_path: Path, order: tuple[int, int], gap_ns: int) -> None:
    """A flow routed into a two-queue tun by a process on CPU a, b, a, b: read from the queue
    the program maps the burst's CPU to when the flow pauses longer than the gap between
    bursts, from the first CPU's queue throughout when it does not (TUNSETSTEERINGEBPF on a
    real device; the 200 ms wait for each burst is inside the test's long gap)."""
    ns = f"{netns.run_prefix()}-steer"
    netns.add_netns(ns)
    try:
        # the cwd (this tree) is the probe's sys.path[0]
        result = netns.ns_run(ns, [sys.executable, "-c", textwrap.dedent(TUN_PROBE),
                                   json.dumps([CPUS, list(order), gap_ns])], timeout=20)
        rows = json.loads(result.stdout)
    finally:
        netns.del_netns(ns)
    thread_of = crossed_or_not(order)
    for cpu, counts in rows:
        expected = thread_of[cpu if gap_ns == steering.FLOWLET_GAP_NS else CPUS[0]]
        assert counts[expected] == 10 and sum(counts) == 10, rows
