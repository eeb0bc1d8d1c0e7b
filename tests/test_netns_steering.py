"""`[dataplane] steering = "cpu"` in real daemons (udp, vxlan routed, wireguard on threads): a
packet sent from CPU c is read, sent and received by the threads pinned to CPU c on both
hosts; the same flow moves with its sender's CPU (which flow steering never does: its hash
ignores the CPU); a device recreation and a reload keep it; a kernel that refuses the programs
(a seccomp filter on bpf()) leaves the daemon forwarding with flow steering and saying why."""

from __future__ import annotations

import os
import platform
import signal
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from netns_helpers import NETNS_MARKS, logs, wait_for
from test_ops_netns import scrape

import overlayd
from overlayd.io.steering import cpu_shares
from overlayd.lab import HostSpec, Lab
from overlayd.ops.tables import cpu_list, render_status

pytestmark = [*NETNS_MARKS,
              pytest.mark.skipif(os.environ.get("OVERLAYD_DATAPLANE") == "python",
                                 reason="steering pins the threads engine's native threads"),
              pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2,
                                 reason="cpu steering needs two CPUs to steer between")]

CPUS = sorted(os.sched_getaffinity(0))[:2]
CPU_STEERING = {"dataplane": {"engine": "threads", "threads": 2, "steering": "cpu"},
                "map": {"poll_seconds": 0.2},
                "metrics": {"enabled": True, "listen": "127.0.0.1:9585"}}
DATAGRAMS = 600
SOURCE_PORT = 40123          # one flow: the same 5-tuple from either CPU


def make_lab(backend: str, extra: dict[str, Any], **kwargs: Any) -> Lab:
    return Lab([HostSpec(config_extra=CPU_STEERING), HostSpec(config_extra=CPU_STEERING)],
               backend=backend, backend_extra=extra, cidr="10.81.0.0/16",
               underlay="192.168.81.0/24", **kwargs)


@pytest.fixture(params=[("udp", {}), ("vxlan", {"mode": "routed"}), ("wireguard", {})],
                ids=["udp", "vxlan", "wireguard"])
def lab(request: Any) -> Iterator[Lab]:
    backend, extra = request.param
    with make_lab(backend, extra) as lab:
        lab.wait_mesh(timeout_s=20.0)
        yield lab


def describe(cpus: list[int]) -> str:
    return f"CPU{'s' if len(cpus) != 1 else ''} {cpu_list(cpus)}"


def per_thread(lab: Lab, host: str, direction: str) -> list[int]:
    return [t[f"{direction}_packets"] for t in lab.control(host, "status")["engine"]["threads"]]


def send_from_cpu(lab: Lab, cpu: int) -> None:
    """One UDP flow host1 -> host2's overlay address, from a process pinned to ``cpu``
    (paced, so the device queue never overflows)."""
    dst = lab.host("host2").overlay_ip
    script = textwrap.dedent(f"""
        import socket, time
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("0.0.0.0", {SOURCE_PORT}))
        for i in range({DATAGRAMS}):
            s.sendto(b"x" * 64, ("{dst}", 9))
            if i % 20 == 19:
                time.sleep(0.002)
    """)
    lab.exec("host1", ["taskset", "-c", str(cpu), sys.executable, "-c", script], timeout_s=30)


def assert_lands_on_the_thread_of(lab: Lab, cpu: int) -> None:
    """Sent from ``cpu``: host1 reads nearly all of it on its thread pinned there, host2
    receives nearly all of it on its thread pinned there; the other threads next to none."""
    before = {("host1", "inside"): per_thread(lab, "host1", "inside"),
              ("host2", "outside"): per_thread(lab, "host2", "outside")}
    send_from_cpu(lab, cpu)
    assert wait_for(lambda: sum(per_thread(lab, "host2", "outside"))
                    - sum(before[("host2", "outside")]) >= DATAGRAMS * 0.9, timeout_s=5.0)
    for (host, direction), start in before.items():
        status = lab.control(host, "status")
        threads = status["engine"]["threads"]
        pinned = [t["thread"] for t in threads if cpu in t["cpus"]]
        assert len(pinned) == 1, threads
        moved = [t[f"{direction}_packets"] - start[t["thread"]] for t in threads]
        total = sum(moved)
        assert total >= DATAGRAMS * 0.9, (host, moved)
        assert moved[pinned[0]] >= total * 0.97, (host, direction, cpu, moved, logs(lab))


def test_a_flow_lands_on_the_thread_of_its_senders_cpu(lab: Lab) -> None:
    shares = cpu_shares(sorted(os.sched_getaffinity(0)), 2)    # the daemons inherit ours
    for host in ("host1", "host2"):
        status = lab.control(host, "status")
        engine = status["engine"]
        assert engine["steering"] == {"requested": "cpu", "mode": "cpu", "reason": None,
                                      "cpus": shares}, engine["steering"]
        assert [t["cpus"] for t in engine["threads"]] == shares     # as the kernel has them
        text = render_status(status)
        assert "steering cpu" in text and f"thread 0 ({describe(shares[0])})" in text, text
        metrics = scrape(lab, int(host[-1]))
        assert metrics["overlayd_dataplane_steering_info{mode=cpu,requested=cpu}"] == 1
        for i, share in enumerate(shares):
            assert metrics[f"overlayd_dataplane_thread_info{{cpus={cpu_list(share)},"
                           f"thread={i}}}"] == 1, metrics
    # The same flow (same 5-tuple) from one CPU, then from the other: flow steering would
    # keep it on one thread both times.
    assert_lands_on_the_thread_of(lab, CPUS[0])
    assert_lands_on_the_thread_of(lab, CPUS[1])
    assert lab.ping("host1", "host2", count=3, interval_s=0.05).ok
    assert not {k: v for k, v in lab.control("host2", "status")["drops"].items() if v}


def test_device_recreation_and_reload_keep_cpu_steering(lab: Lab) -> None:
    """The tun program belongs to the device: the recreated device must get it again (without
    it the kernel's flow hash puts this one flow on one queue whatever the CPU)."""
    lab.exec("host1", ["ip", "link", "del", "overlay0"])
    assert wait_for(lambda: lab.control("host1", "status")["device"]["recreations"] == 1,
                    timeout_s=8.0), logs(lab)
    assert wait_for(lambda: lab.ping("host1", "host2", count=1, wait_s=1.0).ok, timeout_s=10.0)
    for host in ("host1", "host2"):
        os.kill(lab.host(host).daemon.pid, signal.SIGHUP)   # type: ignore[arg-type]
    assert wait_for(lambda: all(
        lab.control(h, "status")["map"]["reloads_applied"] >= 1 for h in ("host1", "host2")),
        timeout_s=5.0), logs(lab)
    assert lab.control("host1", "status")["engine"]["steering"]["mode"] == "cpu"
    assert_lands_on_the_thread_of(lab, CPUS[1])
    assert_lands_on_the_thread_of(lab, CPUS[0])


# A seccomp filter that refuses bpf() with EPERM, as a locked-down container (or the systemd
# unit's SystemCallFilter=~@privileged with SystemCallErrorNumber=EPERM) does.
SECCOMP_LAUNCHER = """
import ctypes, runpy, struct, sys
AUDIT_ARCH_X86_64, NR_BPF, EPERM = 0xC000003E, 321, 1
insns = [
    (0x20, 0, 0, 4),                         # A = seccomp_data.arch
    (0x15, 0, 3, AUDIT_ARCH_X86_64),         # not x86_64: allow
    (0x20, 0, 0, 0),                         # A = seccomp_data.nr
    (0x15, 0, 1, NR_BPF),
    (0x06, 0, 0, 0x00050000 | EPERM),        # SECCOMP_RET_ERRNO | EPERM
    (0x06, 0, 0, 0x7FFF0000),                # SECCOMP_RET_ALLOW
]
code = ctypes.create_string_buffer(b"".join(struct.pack("=HBBI", *i) for i in insns))
fprog = struct.pack("HL", len(insns), ctypes.addressof(code))
libc = ctypes.CDLL(None, use_errno=True)
assert libc.prctl(38, 1, 0, 0, 0) == 0                  # PR_SET_NO_NEW_PRIVS
assert libc.prctl(22, 2, ctypes.c_char_p(fprog), 0, 0) == 0   # PR_SET_SECCOMP, FILTER
sys.argv = ["overlayd", *sys.argv[1:]]
runpy.run_module("overlayd", run_name="__main__", alter_sys=True)
"""


@pytest.mark.skipif(platform.machine() != "x86_64", reason="the filter names x86_64's bpf()")
def test_refused_bpf_leaves_flow_steering_and_says_why(tmp_path: Path) -> None:
    launcher = tmp_path / "seccomp_overlayd.py"
    launcher.write_text(SECCOMP_LAUNCHER)
    root = str(Path(overlayd.__file__).resolve().parent.parent)
    env = dict(os.environ, PYTHONPATH=root)
    with make_lab("udp", {}, overlayd_cmd=[sys.executable, str(launcher)], env=env) as lab:
        lab.wait_mesh(timeout_s=20.0)
        for host in ("host1", "host2"):
            status = lab.control(host, "status")
            steering = status["engine"]["steering"]
            assert steering["requested"] == "cpu" and steering["mode"] == "flow", steering
            assert "bpf(BPF_PROG_LOAD): Operation not permitted" in steering["reason"]
            assert steering["cpus"] == []
            # unpinned: each thread may run on every CPU of the daemon
            assert all(t["cpus"] == sorted(os.sched_getaffinity(0))
                       for t in status["engine"]["threads"]), status["engine"]
            text = render_status(status)
            assert ("steering flow (cpu steering refused: bpf(BPF_PROG_LOAD): Operation not "
                    "permitted)") in text, text
            metrics = scrape(lab, int(host[-1]))
            assert metrics["overlayd_dataplane_steering_info{mode=flow,requested=cpu}"] == 1
            text = lab.host(host).log_path.read_text()
            assert text.count("running with flow steering") == 1, text
        result = lab.tcp_transfer("host1", "host2", 4 << 20)
        assert result.bytes_ok and result.sha256_ok, result
