"""The CPU steering programs and the decision around them (overlayd/io/steering.py,
overlayd/runtime/steering.py): the programs run in the real kernel (a reuseport group on
127.0.0.1, a multi-queue tun in a namespace of its own) from a process pinned to each CPU;
the plan says when cpu steering cannot apply; the config key is checked like the others."""

from __future__ import annotations

import json
import os
import shutil
import socket
import struct
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

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


# -- shares and programs (pure) -----------------------------------------------------------------

def test_cpu_shares_deal_the_cpus_round_robin() -> None:
    assert steering.cpu_shares([0, 1, 2, 3, 4], 2) == [[0, 2, 4], [1, 3]]
    assert steering.cpu_shares([2, 5, 7], 3) == [[2], [5], [7]]
    assert steering.thread_of_cpu([[0, 2], [1, 3]]) == {0: 0, 2: 0, 1: 1, 3: 1}


def run_cbpf(program: bytes, cpu: int) -> int:
    """A naive interpreter of the few classic BPF instructions reuseport_program emits."""
    insns = [struct.unpack_from("<HBBI", program, i) for i in range(0, len(program), 8)]
    pc, acc = 0, 0
    while True:
        code, jt, jf, k = insns[pc]
        if code == steering.CBPF_LD_W_ABS:
            assert k == steering.SKF_AD_CPU
            acc, pc = cpu, pc + 1
        elif code == steering.CBPF_JEQ_K:
            pc += 1 + (jt if acc == k else jf)
        else:
            assert code == steering.CBPF_RET_K
            return k


def run_ebpf(program: bytes, cpu: int) -> int:
    """The same for the eBPF instructions of tun_program (r0 only)."""
    insns = [struct.unpack_from("<BBhi", program, i) for i in range(0, len(program), 8)]
    pc, r0 = 0, 0
    while True:
        code, regs, off, imm = insns[pc]
        assert regs == 0
        if code == steering.EBPF_CALL:
            assert imm == steering.BPF_FUNC_GET_SMP_PROCESSOR_ID
            r0, pc = cpu, pc + 1
        elif code == steering.EBPF_JEQ_K:
            pc += 1 + (off if r0 == imm else 0)
        elif code == steering.EBPF_MOV64_K:
            r0, pc = imm, pc + 1
        else:
            assert code == steering.EBPF_EXIT
            return r0


@pytest.mark.parametrize("cpus, threads", [([0, 1], 2), ([0, 1, 2, 3], 2), ([3, 9, 17], 3),
                                           (list(range(600)), 2), (list(range(64)), 64)])
def test_programs_map_every_cpu_to_its_thread(cpus: list[int], threads: int) -> None:
    """600 CPUs on 2 threads: 300 compares per thread, more than one 8-bit jump reaches."""
    thread_of = steering.thread_of_cpu(steering.cpu_shares(cpus, threads))
    cbpf, ebpf = steering.reuseport_program(thread_of), steering.tun_program(thread_of)
    for cpu in cpus:
        assert run_cbpf(cbpf, cpu) == thread_of[cpu]
        assert run_ebpf(ebpf, cpu) == thread_of[cpu]
    stranger = max(cpus) + 1
    assert run_cbpf(cbpf, stranger) == steering.NO_SOCKET     # the kernel's hash decides
    assert run_ebpf(ebpf, stranger) == stranger               # the kernel takes it modulo N


def test_a_classic_program_beyond_the_kernels_limit_is_refused() -> None:
    thread_of = {cpu: 0 for cpu in range(5000)}
    with pytest.raises(ValueError, match="more than the kernel's 4096"):
        steering.reuseport_program(thread_of)


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
        "requested": "flow", "mode": "flow", "reason": None, "cpus": []}
    cpu = plan_steering("cpu", "threads", 2, False, [0, 1, 2])
    assert (cpu.mode, cpu.shares, cpu.reason) == ("cpu", [[0, 2], [1]], None)
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


LOAD_PROBE = """
from overlayd.io import steering
try:
    steering.load_tun_program(steering.tun_program({0: 0, 1: 1}))
    print("loaded")
except OSError as exc:
    print(exc.strerror)
"""


@needs_compiled
@needs_root
@pytest.mark.skipif(shutil.which("setpriv") is None, reason="needs setpriv (util-linux)")
@pytest.mark.parametrize("caps, expected", [
    ("-all,+net_admin", "bpf(BPF_PROG_LOAD): Operation not permitted"),
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


@needs_compiled
@needs_two_cpus
@pytest.mark.parametrize("order", [(0, 1), (1, 0)], ids=["straight", "crossed"])
def test_reuseport_program_picks_the_socket_of_the_senders_cpu(
        pinned_here: None, order: tuple[int, int]) -> None:
    """Loopback delivers in the sender's softirq, on the sender's CPU: a datagram sent from
    CPU c lands on the socket the program maps c to, in the group's (bind) order. "crossed"
    maps the first CPU to the second socket, so a match by chance of the hash fails there."""
    socks = reuseport_sockets("127.0.0.1", 2)
    sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        thread_of = {CPUS[0]: order[0], CPUS[1]: order[1]}
        steering.attach_reuseport(socks[0], steering.reuseport_program(thread_of))
        for cpu in (*CPUS, *CPUS):
            os.sched_setaffinity(0, {cpu})
            for _ in range(20):
                sender.sendto(b"steer", socks[0].getsockname())
            got = [len(drain(s)) for s in socks]
            assert got[thread_of[cpu]] == 20 and sum(got) == 20, (cpu, got)
        steering.detach_reuseport(socks[0])      # the kernel's hash again: one flow, one socket
        for cpu in CPUS:
            os.sched_setaffinity(0, {cpu})
            sender.sendto(b"hash", socks[0].getsockname())
        assert sorted(len(drain(s)) for s in socks) == [0, 2]
    finally:
        sender.close()
        for s in socks:
            s.close()


TUN_PROBE = """
import json, os, select, socket, subprocess, sys
from overlayd.io.device import OverlayDevice
from overlayd.io import steering
cpus, order = json.loads(sys.argv[1])
dev = OverlayDevice("steer0", "tun", queues=2)
subprocess.run(["ip", "addr", "add", "10.99.0.1/24", "dev", "steer0"], check=True)
subprocess.run(["ip", "link", "set", "steer0", "up"], check=True)
thread_of = {cpus[0]: order[0], cpus[1]: order[1]}
program = steering.load_tun_program(steering.tun_program(thread_of))
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
    out.append([cpu, counts])
print(json.dumps(out))
"""


@needs_compiled
@needs_two_cpus
@pytest.mark.parametrize("order", [(0, 1), (1, 0)], ids=["straight", "crossed"])
@pytest.mark.netns
@pytest.mark.skipif(NETNS_UNAVAILABLE is not None, reason=f"netns: {NETNS_UNAVAILABLE}")
def test_tun_program_picks_the_queue_of_the_senders_cpu(tmp_path: Path,
                                                        order: tuple[int, int]) -> None:
    """A datagram routed into a two-queue tun by a process on CPU c is read from the queue
    the program maps c to (in the real kernel: TUNSETSTEERINGEBPF on a real device)."""
    ns = f"{netns.run_prefix()}-steer"
    netns.add_netns(ns)
    try:
        # the cwd (this tree) is the probe's sys.path[0]
        result = netns.ns_run(ns, [sys.executable, "-c", textwrap.dedent(TUN_PROBE),
                                   json.dumps([CPUS, list(order)])], timeout=20)
        rows = json.loads(result.stdout)
    finally:
        netns.del_netns(ns)
    thread_of = {CPUS[0]: order[0], CPUS[1]: order[1]}
    for cpu, counts in rows:
        assert counts[thread_of[cpu]] == 10 and sum(counts) == 10, rows
