"""`python -m overlayd.bench.profile`: where a packet's time goes, per direction.

Two real daemons on a fresh testbed carry one bounded load at a time (TCP with iperf3, 64-byte
UDP packets, ping) from A to B. While the load runs, both daemons are sampled for a fixed window:

- ``perf record -e cpu-clock --call-graph dwarf`` (a software event: this VM has no hardware
  counters), one sample = 1/frequency seconds of the daemon's CPU;
- ``perf stat`` on the syscall tracepoints: exact counts of each system call;
- the data plane's own counters and batch histogram (metrics endpoint, inside each namespace),
  read before and after the window: packets and wake-ups (batches) in the window.

Daemon A's inside path (device -> tunnel) carries the load, and B's outside path (tunnel ->
device). Each sample is put in the direction whose batch function is on its stack (anything
else is the event loop between batches) and in one cost category by its leaf frame, then the
samples are turned into ns per packet and per wake-up. Packets are the inner packets crossing
the tunnel (A: forwarded datagrams; B: received datagrams): with TSO, a superpacket read from
the device is many of them.

The compiled kernels give the full split; with the pure-Python twins, Python 3.11 has no perf
frames, so their interpreter time shows as one category.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from overlayd.bench.runner import check_host
from overlayd.bench.subjects import Overlayd
from overlayd.bench.testbed import Testbed
from overlayd.lab import netns

METRICS_LISTEN = "127.0.0.1:9585"   # inside each namespace, so the two never meet
IPERF_PORT = 5202
SYSCALLS = ("read", "write", "writev", "sendmmsg", "sendmsg", "sendto", "recvmmsg", "recvmsg",
            "recvfrom", "epoll_wait", "epoll_pwait", "epoll_pwait2")
LOADS = ("tcp", "udp64", "ping")
# per direction: the counter of inner packets crossing the tunnel, the batch histogram's label
DIRECTIONS = {"inside": ("a", "forwarded_packets"), "outside": ("b", "outside_packets")}
# which path makes each system call (epoll: the loop, once per wake-up of either direction)
SYSCALL_PATH = {"read": "inside", "sendmmsg": "inside", "sendto": "inside", "sendmsg": "inside",
                "recvmmsg": "outside", "recvmsg": "outside", "recvfrom": "outside",
                "writev": "outside", "write": "outside"}


@dataclasses.dataclass
class Window:
    """What one daemon did during the sampling window."""
    counters: dict[str, float]          # deltas of the data plane's counters
    batches: dict[str, float]           # direction -> wake-ups (batches) in the window
    histogram: dict[str, dict[str, float]]   # direction -> {bucket upper bound: batches}
    syscalls: dict[str, int]            # counted in a second window of the same length ...
    stat_counters: dict[str, float]     # ... with these counter deltas
    stat_batches: dict[str, float]
    samples: collections.Counter[tuple[str, str]]   # (direction, category) -> samples


def scrape(ns: str) -> dict[str, float]:
    """The daemon's metrics, flattened to {'name{labels}': value}."""
    out = netns.ns_run(ns, [sys.executable, "-c",
                            ("import urllib.request,sys;sys.stdout.write(urllib.request.urlopen("
                            f"'http://{METRICS_LISTEN}/metrics',timeout=10).read().decode())")],
                       timeout=30).stdout
    values = {}
    for line in out.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            values[key] = float(value)
    return values


def counter_deltas(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    out = {}
    for key, value in after.items():
        m = re.fullmatch(r"overlayd_(\w+?)(?:_total)?", key)
        if m:
            out[m.group(1)] = value - before.get(key, 0.0)
    return out


def batch_deltas(before: dict[str, float], after: dict[str, float]
                 ) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """Wake-ups per direction and the histogram (non-cumulative) of the window."""
    pattern = re.compile(r'overlayd_batch_size_packets_bucket\{direction="(\w+)",le="([^"]+)"\}')
    cumulative: dict[str, list[tuple[float, str, float]]] = collections.defaultdict(list)
    for key, value in after.items():
        m = pattern.fullmatch(key)
        if m:
            bound = m.group(2)
            cumulative[m.group(1)].append((float(bound), bound, value - before.get(key, 0.0)))
    wakeups: dict[str, float] = {}
    hist: dict[str, dict[str, float]] = {}
    for direction, rows in cumulative.items():
        rows.sort()
        wakeups[direction] = rows[-1][2] if rows else 0.0
        previous, hist[direction] = 0.0, {}
        for _, bound, value in rows:
            if value - previous:
                hist[direction][bound] = value - previous
            previous = value
    return wakeups, hist


def parse_syscalls(text: str) -> dict[str, int]:
    """perf stat -x, output: value,unit,event,..."""
    counts = {}
    for line in text.splitlines():
        fields = line.split(",")
        if len(fields) >= 3 and fields[2].startswith("syscalls:sys_enter_"):
            try:
                counts[fields[2].removeprefix("syscalls:sys_enter_")] = int(fields[0])
            except ValueError:
                pass
    return {k: v for k, v in counts.items() if v}


# The syscall a kernel sample is in: the frame just inside the entry (do_syscall_64 ->
# [x64_sys_call ->] ksys_read / __sys_sendmmsg / do_writev / ...), without its prefixes.
SYSCALL_PREFIX = re.compile(r"^(?:__x64_sys_|__se_sys_|__do_sys_|__sys_|ksys_|do_)+")
SYSCALL_ENTRY = ("do_syscall_64", "x64_sys_call")
LIBC_SYSCALL_WRAPPER = re.compile(r"asynccancel|libc_read|libc_write|___writev|recvmmsg|"
                                  r"sendmmsg|epoll_wait|epoll_pwait|mutex_unlock_usercnt")


def syscall_name(syms: list[str]) -> str | None:
    for i, sym in enumerate(syms):
        if sym in SYSCALL_ENTRY:
            inner = [s for s in syms[:i] if s not in SYSCALL_ENTRY]
            return SYSCALL_PREFIX.sub("", inner[-1]) if inner else "?"
    return None


def classify(frames: list[tuple[str, str]]) -> tuple[str, str]:
    """(direction, category) of one sample; frames leaf first, each (symbol, dso)."""
    syms = [s for s, _ in frames]
    direction = "loop"
    for sym in syms:
        if "_inside_run" in sym or "inside_batch" in sym:
            direction = "inside"
            break
        if "_outside_run" in sym or "outside_batch" in sym:
            direction = "outside"
            break
    leaf, dso = frames[0] if frames else ("?", "?")
    if "kernel" in dso:
        name = syscall_name(syms)
        if name is not None and name.startswith("asm_"):     # an interrupt during a syscall
            name = None
        if name in ("exit_to_user_mode_loop", "syscall_exit_work", "syscall_trace_enter",
                    "syscall_exit_to_user_mode", "?"):
            return direction, "kernel: syscall entry/exit (scheduling, signals)"
        if name is not None:
            return direction, f"syscall {name}"
        return direction, "kernel, no syscall (irq, softirq, page faults)"
    if "_dataplane" in dso or "libc" in dso:
        # the innermost of our own functions (inlined ones included) the sample is in
        caller = next((short(s) for s, d in frames if "_dataplane" in d and "csum" not in s
                       and "memcpy" not in s and "memmove" not in s), "?")
        if "memmove" in leaf or "memcpy" in leaf:
            if "tso_write" in caller or "uso_write" in caller:
                return direction, "copy: segmentation (superpacket -> segments)"
            if "stage_runs" in caller:
                return direction, "copy: GSO staging of single datagrams"
            return direction, f"copy: other ({caller})"
        if "csum" in leaf:
            if "tso_write" in caller or "uso_write" in caller:
                return direction, "checksum: TCP/UDP/IP of each segment (tso/uso_write)"
            if "gro_" in caller:
                return direction, "checksum: TCP/UDP check before coalescing"
            return direction, f"checksum: other ({caller})"
        if "libc" in dso:
            if LIBC_SYSCALL_WRAPPER.search(leaf):
                return direction, "libc syscall wrappers"
            return direction, f"libc {leaf}"
        if "tso_" in leaf or "uso_" in leaf:
            return direction, "segmentation: headers (tso/uso_write)"
        if "gro_" in leaf or "_pending_flush" in leaf:
            return direction, "coalescing: flow match, merge"
        if any(k in leaf for k in ("_queue", "_send", "_flush", "_stage_runs", "txq_")):
            return direction, "send queue and GSO runs"
        if any(k in leaf for k in ("_pw_", "_pf_", "__Pyx", "_enter")):
            return direction, "Python <-> Cython entry (per wake-up)"
        return direction, "forwarding: route, checks, encapsulation"
    return direction, "Python / uvloop"


def short(sym: str) -> str:
    """A Cython C name without its module mangling: __pyx_f_8overlayd_10_dataplane_X -> X."""
    return re.sub(r"^__pyx_[a-z]+_\d+overlayd_\d+_dataplane_(?:\d+_\w+?Base_?)?", "",
                  sym) or "?"


def parse_perf_script(text: str) -> collections.Counter[tuple[str, str]]:
    samples: collections.Counter[tuple[str, str]] = collections.Counter()
    frame = re.compile(r"^\s+[0-9a-f]+\s+(.+?)\s+\((.*)\)$")
    frames: list[tuple[str, str]] = []
    for line in text.splitlines() + [""]:
        m = frame.match(line)
        if m:
            frames.append((re.sub(r"\+0x[0-9a-f]+$", "", m.group(1)), m.group(2)))
        elif not line.strip():
            # an inlined frame lives in the object of the next real frame out
            for i in range(len(frames) - 2, -1, -1):
                if frames[i][1] == "inlined":
                    frames[i] = (frames[i][0], frames[i + 1][1])
            if frames:
                samples[classify(frames)] += 1
            frames = []
    return samples


def perf_record(pid: int, seconds: float, freq: int, path: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        ["perf", "record", "-q", "-e", "cpu-clock", "-F", str(freq), "--call-graph",
         "dwarf,16384", "-p", str(pid), "-o", str(path), "--", "sleep", str(seconds)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def perf_stat_syscalls(pid: int, seconds: float, path: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        ["perf", "stat", "-x,", "-o", str(path),
         "-e", ",".join(f"syscalls:sys_enter_{s}" for s in SYSCALLS), "-p", str(pid),
         "--", "sleep", str(seconds)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def sample_window(bed: Testbed, subject: Overlayd, seconds: float, freq: int,
                  work: Path) -> dict[str, Window]:
    """Two windows back to back: CPU samples, then syscall counts (the tracepoints slow every
    syscall, so they must not run while the samples are taken); counters around each."""
    pids = dict(zip("ab", subject.pids()))
    ns = {"a": bed.ns_a, "b": bed.ns_b}
    marks = [{side: scrape(ns[side]) for side in "ab"}]
    for start in (lambda side, pid: perf_record(pid, seconds, freq, work / f"{side}.perf.data"),
                  lambda side, pid: perf_stat_syscalls(pid, seconds, work / f"{side}.stat")):
        procs = [start(side, pid) for side, pid in pids.items()]
        for proc in procs:
            proc.wait(timeout=seconds + 60)
        marks.append({side: scrape(ns[side]) for side in "ab"})
    windows = {}
    for side in "ab":
        script = subprocess.run(
            ["perf", "script", "-i", str(work / f"{side}.perf.data"), "-F", "ip,sym,dso"],
            check=False, capture_output=True, text=True, timeout=600).stdout
        wakeups, hist = batch_deltas(marks[0][side], marks[1][side])
        stat_wakeups, _ = batch_deltas(marks[1][side], marks[2][side])
        windows[side] = Window(counter_deltas(marks[0][side], marks[1][side]), wakeups, hist,
                               parse_syscalls((work / f"{side}.stat").read_text()),
                               counter_deltas(marks[1][side], marks[2][side]), stat_wakeups,
                               parse_perf_script(script))
    return windows


def load_command(load: str, subject: Overlayd, seconds: int) -> tuple[list[str], list[str]]:
    """(server argv in B, client argv in A), each bounded by timeout."""
    server = ["timeout", str(seconds + 30), "iperf3", "-s", "-1", "-B", subject.over_b,
              "-p", str(IPERF_PORT)]
    client = ["timeout", str(seconds + 20), "iperf3", "-c", subject.over_b, "-B",
              subject.over_a, "-p", str(IPERF_PORT), "-t", str(seconds)]
    if load == "tcp":
        return server, client
    if load == "udp64":
        return server, client + ["-u", "-b", "0", "-l", "64"]
    count = int(seconds / 0.002)
    return [], ["timeout", str(seconds + 20), "ping", "-q", "-n", "-c", str(count), "-i",
                "0.002", subject.over_b]


def profile_load(bed: Testbed, subject: Overlayd, load: str, args: argparse.Namespace,
                 work: Path) -> dict:
    seconds = 2 * args.window + 4
    server_argv, client_argv = load_command(load, subject, seconds)
    server = (subprocess.Popen(netns.ns_cmd(bed.ns_b, server_argv), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL) if server_argv else None)
    time.sleep(0.3)
    client = subprocess.Popen(netns.ns_cmd(bed.ns_a, client_argv), stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        time.sleep(1.0)                         # past slow start and the first wake-ups
        windows = sample_window(bed, subject, args.window, args.freq, work)
    finally:
        for proc in (client, server):
            if proc is not None:
                try:
                    proc.wait(timeout=seconds + 30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=5)
    return summarize(load, windows, args.window, args.freq)


def summarize(load: str, windows: dict[str, Window], window_s: float, freq: int) -> dict:
    result: dict = {"load": load, "window_s": window_s, "freq_hz": freq, "directions": {}}
    for direction, (side, counter) in DIRECTIONS.items():
        w = windows[side]
        packets = w.counters.get(counter, 0.0)
        wakeups = w.batches.get(direction, 0.0)
        ns_per_sample = 1e9 / freq
        rows = {cat: n * ns_per_sample for (d, cat), n in w.samples.items() if d == direction}
        loop_ns = sum(n for (d, _), n in w.samples.items() if d == "loop") * ns_per_sample
        other_ns = sum(n for (d, _), n in w.samples.items()
                       if d not in ("loop", direction)) * ns_per_sample
        all_wakeups = sum(w.batches.values())
        result["directions"][direction] = {
            "daemon": side, "packets": packets, "wakeups": wakeups,
            # with TSO, one read is a superpacket of many packets
            "device_reads": (w.counters.get("offload_superpackets")
                             or w.counters.get("inside_packets", 0.0))
            if direction == "inside" else None,
            "histogram": w.histogram.get(direction, {}),
            "syscalls": {name: n for name, n in w.syscalls.items()
                         if SYSCALL_PATH.get(name) == direction},
            "stat_packets": w.stat_counters.get(counter, 0.0),
            "stat_wakeups": w.stat_batches.get(direction, 0.0),
            "stat_all_wakeups": sum(w.stat_batches.values()),
            "loop_syscalls": {name: n for name, n in w.syscalls.items()
                              if name not in SYSCALL_PATH},
            "counters": {k: v for k, v in w.counters.items() if v and (
                k.startswith("offload") or k.endswith("packets"))},
            "categories_ns": rows,
            # the loop's time is shared by both directions' wake-ups of this daemon
            "loop_ns": loop_ns, "all_wakeups": all_wakeups,
            "other_direction_ns": other_ns,
            "cpu_s": sum(w.samples.values()) / freq,
        }
    return result


def per(value: float, count: float, digits: int = 0) -> str:
    return f"{value / count:,.{digits}f}" if count else "n/a"


def render(result: dict) -> str:
    lines = [(f"### load: {result['load']}  (window {result['window_s']:g} s, "
             f"perf cpu-clock at {result['freq_hz']} Hz)"), ""]
    for direction, d in result["directions"].items():
        packets, wakeups = d["packets"], d["wakeups"]
        total = sum(d["categories_ns"].values())
        label = "device -> tunnel" if direction == "inside" else "tunnel -> device"
        lines.append(f"**{direction}** ({label}, daemon {d['daemon'].upper()}): "
                     f"{packets:,.0f} packets in {wakeups:,.0f} wake-ups "
                     f"({per(packets, wakeups) if wakeups else 'n/a'} packets/wake-up"
                     + (f", {d['device_reads']:,.0f} device reads" if d["device_reads"] else "")
                     + f"); daemon CPU {d['cpu_s']:.2f} s")
        hist = ", ".join(f"≤{b}: {n:,.0f}" for b, n in d["histogram"].items())
        lines.append(f"batch sizes (wake-ups by packets read): {hist or 'none'}")
        calls = ", ".join(f"{name} {per(n, d['stat_wakeups'], 1)} "
                          f"({per(n, d['stat_packets'] / 1000)}/1000 packets)"
                          for name, n in sorted(d["syscalls"].items(), key=lambda kv: -kv[1]))
        loop_calls = ", ".join(f"{name} {per(n, d['stat_all_wakeups'], 2)}"
                               for name, n in d["loop_syscalls"].items())
        lines.append(f"syscalls per {direction} wake-up: {calls or 'none'}; the loop's per "
                     f"wake-up of either direction: {loop_calls or 'none'}")
        lines.append("")
        lines.append("| where | ns/packet | ns/wake-up | share |")
        lines.append("|---|---:|---:|---:|")
        for cat, ns in sorted(d["categories_ns"].items(), key=lambda kv: -kv[1]):
            lines.append(f"| {cat} | {per(ns, packets)} | {per(ns, wakeups)} | "
                         f"{100 * ns / total:.1f} % |")
        lines.append(f"| **{direction} batches, total** | **{per(total, packets)}** | "
                     f"**{per(total, wakeups)}** | 100 % |")
        lines.append(f"| event loop between batches (Python/uvloop/epoll, per wake-up of "
                     f"either direction) | | {per(d['loop_ns'], d['all_wakeups'])} | |")
        lines.append("")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("loads", nargs="*", default=list(LOADS),
                        help=f"what to profile, any of {' '.join(LOADS)} (default: all)")
    parser.add_argument("--backend", default="udp", choices=("udp", "vxlan", "vxlan-switched"))
    parser.add_argument("--dataplane", default="cython", choices=("cython", "python"))
    parser.add_argument("--window", type=int, default=4, help="seconds sampled per load")
    parser.add_argument("--freq", type=int, default=1999, help="perf samples per second")
    parser.add_argument("--out", type=Path, help="directory for perf data and profile.json")
    parser.add_argument("--no-uso", action="store_true",
                        help="[dataplane] device_uso = false (one write per small UDP packet)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m overlayd.bench.profile",
                                     description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    args = parser.parse_args(argv)
    unknown = [load for load in args.loads if load not in LOADS]
    if unknown:
        parser.error(f"unknown load {unknown[0]!r} (known: {', '.join(LOADS)})")
    refused = check_host("overlayd profile", ("perf", "iperf3", "ping", "ip"),
                         "linux-perf iperf3 iputils-ping iproute2")
    if refused:
        return refused
    out = args.out or Path(tempfile.mkdtemp(prefix="overlayd-profile-"))
    out.mkdir(parents=True, exist_ok=True)
    extra: dict[str, Any] = {"metrics": {"enabled": True, "listen": METRICS_LISTEN}}
    if args.no_uso:
        extra["dataplane"] = {"device_uso": False}
    subject = Overlayd(args.backend, args.dataplane, config_extra=extra)
    results = []
    with Testbed.create() as bed:
        try:
            subject.up(bed, out)
            for load in args.loads:
                work = out / load
                work.mkdir(exist_ok=True)
                results.append(profile_load(bed, subject, load, args, work))
                print(render(results[-1]), flush=True)
        finally:
            subject.down()
    (out / "profile.json").write_text(json.dumps(results, indent=1))
    print(f"raw: {out / 'profile.json'} (perf data per load: {out}/<load>/[ab].perf.data)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
