"""The measurements, each bounded in time: iperf3 TCP (1 and N streams), iperf3 UDP with small
payloads, ping RTT, the CPU time of the subject's own processes per GB moved, and the whole
machine's busy CPU time per GB (what a CPU-bound transfer is limited by)."""

from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import time
from dataclasses import dataclass

from overlayd.lab import netns

IPERF_PORT = 5201
CLK_TCK = os.sysconf("SC_CLK_TCK")


@dataclass
class Round:
    tcp1_gbps: float
    tcp1_retransmits: int
    tcpn_gbps: float
    udp_kpps: float
    udp_loss_pct: float
    rtt_p50_us: float
    rtt_p99_us: float
    cpu_s_per_gb: float
    machine_cpu_s_per_gb: float
    machine_cpus_busy: float


def cpu_seconds(pids: list[int]) -> float:
    """utime + stime of the processes (all their threads included), in seconds."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total / CLK_TCK


def machine_busy_seconds() -> float:
    """CPU seconds all CPUs of the machine spent not idle (user, nice, system, irq, softirq,
    steal), from /proc/stat's first line: idle and iowait are the idle ones. Counts every
    process on the machine, so it speaks for the subject only on an otherwise idle machine."""
    with open("/proc/stat") as f:
        fields = [int(v) for v in f.readline().split()[1:]]
    # user nice system idle iowait irq softirq steal [guest guest_nice: already in user/nice]
    busy = sum(fields[:8]) - fields[3] - fields[4]
    return busy / CLK_TCK


def iperf3(ns_a: str, ns_b: str, over_a: str, over_b: str, seconds: int,
           extra: list[str]) -> dict:
    """One iperf3 test against a fresh one-shot server; the client's JSON report."""
    server = subprocess.Popen(
        netns.ns_cmd(ns_b, ["timeout", str(seconds + 30), "iperf3", "-s", "-1", "-B", over_b,
                            "-p", str(IPERF_PORT)]),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(0.3)      # let the server bind before the client connects
        out = netns.ns_run(ns_a, ["timeout", str(seconds + 20), "iperf3", "-c", over_b,
                                  "-B", over_a, "-p", str(IPERF_PORT), "-t", str(seconds),
                                  "-J", *extra], timeout=seconds + 30, check=False)
        report = json.loads(out.stdout or "{}")
        if "error" in report or "end" not in report:
            raise RuntimeError(f"iperf3 {' '.join(extra)}: {report.get('error', out.stderr)}")
        return report
    finally:
        server.terminate()
        try:
            server.wait(timeout=5)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(timeout=5)


def ping_rtts_us(ns: str, dst: str, count: int, interval: float) -> list[float]:
    out = netns.ns_run(ns, ["ping", "-n", "-c", str(count), "-i", str(interval), "-W", "1", dst],
                       timeout=count * interval + 30, check=False).stdout
    return [float(m) * 1000 for m in re.findall(r"time=([0-9.]+) ms", out)]


def nearest_rank(values: list[float], pct: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * pct // 100))
    return ordered[int(rank) - 1]


def one_round(ns_a: str, ns_b: str, over_a: str, over_b: str, pids: list[int], seconds: int,
              streams: int, udp_len: int, ping_count: int) -> Round:
    before, machine_before, started = cpu_seconds(pids), machine_busy_seconds(), time.monotonic()
    tcp1 = iperf3(ns_a, ns_b, over_a, over_b, seconds, [])
    cpu = cpu_seconds(pids) - before
    machine = machine_busy_seconds() - machine_before
    elapsed = time.monotonic() - started
    received = tcp1["end"]["sum_received"]
    gb = received["bytes"] / 1e9
    tcpn = iperf3(ns_a, ns_b, over_a, over_b, seconds, ["-P", str(streams)])
    udp = iperf3(ns_a, ns_b, over_a, over_b, seconds, ["-u", "-b", "0", "-l", str(udp_len)])
    usum = udp["end"]["sum"]
    delivered = usum["packets"] - usum["lost_packets"]
    rtts = ping_rtts_us(ns_a, over_b, ping_count, 0.002)
    return Round(
        tcp1_gbps=received["bits_per_second"] / 1e9,
        tcp1_retransmits=int(tcp1["end"]["sum_sent"].get("retransmits", 0)),
        tcpn_gbps=tcpn["end"]["sum_received"]["bits_per_second"] / 1e9,
        # per second of *sending*: the server's own duration stretches under a flood
        udp_kpps=delivered / seconds / 1e3,
        udp_loss_pct=usum.get("lost_percent", 0.0),
        rtt_p50_us=statistics.median(rtts) if rtts else float("nan"),
        rtt_p99_us=nearest_rank(rtts, 99),
        cpu_s_per_gb=cpu / gb if gb else float("nan"),
        machine_cpu_s_per_gb=machine / gb if gb else float("nan"),
        # over the whole test, the server's start and the client's teardown included
        machine_cpus_busy=machine / elapsed,
    )
