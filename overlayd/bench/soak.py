"""Soak: does a real daemon's memory stay flat under sustained full-rate traffic?

    python3 -m overlayd.bench.soak [--backend udp|vxlan|vxlan-switched] [--minutes 10]
                                   [--interval 5] [--out FILE]          # as root

Two ``overlayd run`` processes on the bench's two-namespace testbed (the same subjects and
underlay as ``python3 -m overlayd.bench``), with back-to-back iperf3 loads through the overlay for
the whole run, alternating TCP (1 stream) and 64-byte UDP at full rate (-b 0): the TCP load
exercises large packets and the UDP flood the per-packet paths and drops. Every interval, each
daemon's VmRSS and VmHWM are read from /proc.

Verdict, per daemon, over the samples after the warm-up (allocator arenas, socket buffers and
caches fill during the first minute, so earlier samples say nothing about leaks): "no growth"
when RSS at the end minus RSS at the end of the warm-up is <= --tolerance-kib (1 MiB) AND the
least-squares slope of RSS over those samples is < --max-slope (100 KiB/min); else "growth".
Both conditions, because a leak shows as a steady slope even when the end sample happens to land
in a dip, and a slope from noise alone over a short run is not a leak when the net change is
small. Exit status: 0 no growth, 1 growth, 2 the run failed (daemon died, traffic did not flow),
75 another benchmark is running, 77 not root, 69 tools missing.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

from overlayd.bench.measure import cpu_seconds, iperf3
from overlayd.bench.memory import rss_kib
from overlayd.bench.subjects import BACKENDS, Overlayd
from overlayd.bench.testbed import Testbed
from overlayd.lab import netns

# The subject's daemons are wrapped in `timeout 3600` (subjects.Overlayd): the soak must end,
# with room for set-up and teardown, before that wrapper would kill them mid-measurement.
MAX_MINUTES = 55
SHARED_BENCH = Path(__file__).resolve().parents[2].parent / "shared" / "bench"
# Fixed namespace names of ../shared/bench, and the per-run prefixes of this package's other
# benchmarks (followed by the owning pid): sharing two CPUs with any of them would make both
# runs' figures worthless, so the soak refuses to start next to them.
SHARED_NAMESPACES = ("ovb-a", "ovb-b")
OUR_BENCH_PREFIXES = ("ovd-bench-", "ovd-mem-")


@dataclass
class Sample:
    t_s: float                       # since traffic started
    load: str                        # the load running when the sample was taken
    rss_kib: dict[str, int]          # per daemon ("a", "b")
    hwm_kib: dict[str, int]
    cpu_pct: dict[str, float]        # of one CPU, over the preceding interval


# -- analysis (pure: unit-tested) ---------------------------------------------------------------

def slope_per_minute(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of (seconds, value) points, in value units per minute."""
    n = len(points)
    if n < 2:
        return float("nan")
    mean_t = sum(t for t, _ in points) / n
    mean_v = sum(v for _, v in points) / n
    var = sum((t - mean_t) ** 2 for t, _ in points)
    if var == 0:
        return float("nan")
    cov = sum((t - mean_t) * (v - mean_v) for t, v in points)
    return cov / var * 60.0


def analyse(samples: list[Sample], warmup_s: float, tolerance_kib: int,
            max_slope_kib_per_min: float) -> dict:
    """Per-daemon start/end/max RSS and slope over the post-warm-up samples, and the verdict."""
    after = [s for s in samples if s.t_s >= warmup_s]
    daemons: dict[str, dict] = {}
    names = sorted(samples[0].rss_kib) if samples else []
    for name in names:
        if len(after) < 3:
            # two points always fit a line exactly: no basis for a verdict
            daemons[name] = {"verdict": "insufficient samples", "post_warmup_samples": len(after)}
            continue
        rss = [s.rss_kib[name] for s in after]
        slope = slope_per_minute([(s.t_s, s.rss_kib[name]) for s in after])
        delta = rss[-1] - rss[0]
        grew = delta > tolerance_kib or not slope < max_slope_kib_per_min
        daemons[name] = {
            "rss_start_kib": rss[0], "rss_end_kib": rss[-1],
            "rss_max_kib": max(s.rss_kib[name] for s in samples),
            "hwm_end_kib": after[-1].hwm_kib[name], "delta_kib": delta,
            "slope_kib_per_min": round(slope, 1), "verdict": "growth" if grew else "no growth",
        }
    verdicts = {d["verdict"] for d in daemons.values()}
    if not verdicts or "insufficient samples" in verdicts:
        verdict = "insufficient samples"
    else:
        verdict = "growth" if "growth" in verdicts else "no growth"
    return {"post_warmup_samples": len(after), "daemons": daemons, "verdict": verdict}


# -- the run ------------------------------------------------------------------------------------

def other_benchmark(shared_bench: Path) -> str | None:
    """Why another benchmark seems to be running now, or None."""
    present = [ns for ns in SHARED_NAMESPACES if ns in netns.list_netns()]
    if present:
        return f"namespaces {', '.join(present)} exist (../shared/bench testbed is up)"
    lock = shared_bench / "runs" / ".lock"
    if lock.exists() and _flock_held(lock):
        return f"{lock} is held (a shared/bench run.sh is running)"
    for ns in netns.list_netns():
        if ns.startswith(OUR_BENCH_PREFIXES):
            owner = ns.split("-")[2]
            if owner.isdigit() and int(owner) != os.getpid() and Path(f"/proc/{owner}").exists():
                return f"namespace {ns} belongs to running process {owner} (another benchmark)"
    return None


def _flock_held(path: Path) -> bool:
    """Whether some process holds a flock on ``path``, read from /proc/locks: probing with
    flock(LOCK_NB) ourselves could, for an instant, make run.sh's own flock -n fail."""
    st = path.stat()
    dev = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    try:
        locks = Path("/proc/locks").read_text()
    except OSError:
        return False
    return any(line.split()[5] == dev for line in locks.splitlines() if len(line.split()) > 5)


@dataclass
class Traffic:
    """Back-to-back bounded iperf3 loads in a thread: at most ``max_loads`` of them, each at most
    ``load_s`` seconds (and each client and server under `timeout`, see measure.iperf3)."""
    bed: Testbed
    subject: Overlayd
    udp_len: int
    load_s: int
    end_at: float                    # monotonic: no load may run past this
    max_loads: int
    stop: threading.Event = field(default_factory=threading.Event)
    current: str = "-"
    done: list[dict] = field(default_factory=list)
    thread: threading.Thread | None = None

    def start(self) -> None:
        self.thread = threading.Thread(target=self._run, name="soak-traffic", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        kinds = ("tcp", "udp")
        for i in range(self.max_loads):
            seconds = min(self.load_s, math.floor(self.end_at - time.monotonic()))
            if self.stop.is_set() or seconds < 1:
                break
            kind = kinds[i % 2]
            extra = [] if kind == "tcp" else ["-u", "-b", "0", "-l", str(self.udp_len)]
            self.current = kind
            try:
                report = iperf3(self.bed.ns_a, self.bed.ns_b, self.subject.over_a,
                                self.subject.over_b, seconds, extra)
                end = report["end"]
                if kind == "tcp":
                    moved = {"bytes": end["sum_received"]["bytes"]}
                else:
                    moved = {"packets": end["sum"]["packets"] - end["sum"]["lost_packets"],
                             "lost_pct": end["sum"].get("lost_percent", 0.0)}
                self.done.append({"kind": kind, "seconds": seconds, "ok": True, **moved})
            except Exception as exc:  # noqa: BLE001 - a failed load is reported, the soak goes on
                self.done.append({"kind": kind, "seconds": seconds, "ok": False,
                                  "error": str(exc)[:200]})
                # a load that fails at once (e.g. overlay down) must not spin: pace retries
                self.stop.wait(2.0)
        self.current = "-"

    def join(self, timeout_s: float) -> None:
        self.stop.set()
        if self.thread is not None:
            self.thread.join(timeout_s)


def take_sample(t_s: float, load: str, pids: dict[str, int], cpu_before: dict[str, float],
                dt: float) -> Sample:
    rss, hwm, cpu = {}, {}, {}
    for name, pid in pids.items():
        rss[name], hwm[name] = rss_kib(pid)
        now = cpu_seconds([pid])
        cpu[name] = (now - cpu_before[name]) / dt * 100 if dt > 0 else 0.0
        cpu_before[name] = now
    return Sample(round(t_s, 1), load, rss, hwm, cpu)


def row(s: Sample) -> str:
    cells = [f"{s.t_s:7.1f}", f"{s.load:4}"]
    for name in sorted(s.rss_kib):
        cells += [f"{s.rss_kib[name]:8d}", f"{s.hwm_kib[name]:8d}", f"{s.cpu_pct[name]:5.0f}"]
    return "| " + " | ".join(cells) + " |"


def soak(args: argparse.Namespace) -> dict:
    duration_s = args.minutes * 60
    warmup_s = args.warmup if args.warmup is not None else min(60.0, duration_s / 4)
    samples: list[Sample] = []
    result: dict = {"benchmark": "soak", "backend": args.backend, "minutes": args.minutes,
                    "interval_s": args.interval, "warmup_s": warmup_s,
                    "tolerance": {"delta_kib": args.tolerance_kib,
                                  "slope_kib_per_min": args.max_slope},
                    "status": "ok", "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    subject = Overlayd(args.backend)
    traffic: Traffic | None = None
    clean = False
    with Testbed.create() as bed, tempfile.TemporaryDirectory(prefix="overlayd-soak-") as work:
        result["namespaces"] = [bed.ns_a, bed.ns_b]
        try:
            subject.up(bed, Path(work))
            pids = {name: d.pid for name, d in zip("ab", subject.daemons, strict=True)
                    if d.pid is not None}
            if len(pids) != 2:
                raise RuntimeError(f"daemon pids not found: {pids}")
            start = time.monotonic()
            traffic = Traffic(bed, subject, args.udp_len, args.load_seconds,
                              end_at=start + duration_s,
                              max_loads=math.ceil(duration_s / args.load_seconds) + 1)
            traffic.start()
            cpu_before = {n: cpu_seconds([p]) for n, p in pids.items()}
            print(f"soak: {args.backend}, {args.minutes:g} min, sample every {args.interval:g} s,"
                  f" warm-up {warmup_s:g} s, namespaces {bed.ns_a} {bed.ns_b}", flush=True)
            print("\n|    t s | load |  a RSS KiB |  a HWM KiB | a CPU% |  b RSS KiB |"
                  "  b HWM KiB | b CPU% |\n|---|---|---|---|---|---|---|---|", flush=True)
            last = start
            k = 0
            while True:
                target = start + k * args.interval
                if target > start + duration_s + 1e-6:
                    break
                time.sleep(max(0.0, target - time.monotonic()))
                dead = [n for n, d in zip("ab", subject.daemons, strict=True) if not d.alive()]
                if dead:
                    tails = "\n".join(subject.daemons["ab".index(n)].log_tail() for n in dead)
                    raise RuntimeError(f"daemon {', '.join(dead)} died during the soak:\n{tails}")
                now = time.monotonic()
                samples.append(take_sample(now - start, traffic.current, pids, cpu_before,
                                           now - last))
                last = now
                print(row(samples[-1]), flush=True)
                k += 1
            clean = True
        except Exception as exc:  # noqa: BLE001 - reported in the JSON line, cleanup below
            result.update(status="failed", error=str(exc)[:2000])
        finally:
            if traffic is not None:
                # After a clean run the last load ends by itself at end_at; after a failure or
                # an interrupt, do not wait for it: deleting the namespaces ends its iperf3s.
                traffic.join(args.load_seconds + 40 if clean else 5)
            subject.down()
    loads = traffic.done if traffic is not None else []
    ok = [ld for ld in loads if ld["ok"]]
    result["loads"] = {
        "tcp": sum(1 for ld in ok if ld["kind"] == "tcp"),
        "udp": sum(1 for ld in ok if ld["kind"] == "udp"),
        "failed": len(loads) - len(ok),
        "tcp_gbytes": round(sum(ld.get("bytes", 0) for ld in ok) / 1e9, 2),
        "udp_mpackets": round(sum(ld.get("packets", 0) for ld in ok) / 1e6, 2),
        "errors": sorted({ld["error"] for ld in loads if not ld["ok"]})[:3],
    }
    if result["status"] == "ok" and len(ok) < max(1, len(loads) // 2):
        # without traffic a flat RSS proves nothing
        result.update(status="failed", error="most traffic loads failed")
    result["samples"] = len(samples)
    result.update(analyse(samples, warmup_s, args.tolerance_kib, args.max_slope))
    result["sample_list"] = [s.__dict__ for s in samples]
    return result


def summary(result: dict) -> str:
    head = ("| daemon | RSS after warm-up KiB | RSS end KiB | RSS max KiB | HWM end KiB |"
            " change KiB | slope KiB/min | verdict |")
    lines = [head, "|---|---|---|---|---|---|---|---|"]
    for name, d in result.get("daemons", {}).items():
        if "rss_start_kib" not in d:
            lines.append(f"| {name} | | | | | | | {d['verdict']} |")
            continue
        lines.append(f"| {name} | {d['rss_start_kib']} | {d['rss_end_kib']} | {d['rss_max_kib']}"
                     f" | {d['hwm_end_kib']} | {d['delta_kib']:+d} | {d['slope_kib_per_min']:+.1f}"
                     f" | {d['verdict']} |")
    return "\n".join(lines)


def _terminate(signum: int, frame: FrameType | None) -> None:
    # `timeout` and operators send SIGTERM: unwind through the finally blocks so the daemons
    # are stopped and the namespaces deleted, as on Ctrl-C
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m overlayd.bench.soak",
                                     description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", choices=sorted(BACKENDS), default="udp")
    parser.add_argument("--minutes", type=float, default=10.0,
                        help=f"traffic and sampling time (default 10, at most {MAX_MINUTES})")
    parser.add_argument("--interval", type=float, default=5.0, help="seconds between samples")
    parser.add_argument("--warmup", type=float,
                        help="seconds before the first counted sample (default: 60, or a "
                             "quarter of the run if that is shorter)")
    parser.add_argument("--load-seconds", type=int, default=30,
                        help="length of each iperf3 load (TCP and UDP alternate)")
    parser.add_argument("--udp-len", type=int, default=64, help="UDP payload bytes")
    parser.add_argument("--tolerance-kib", type=int, default=1024,
                        help="largest RSS change after warm-up that is still 'no growth'")
    parser.add_argument("--max-slope", type=float, default=100.0,
                        help="KiB/min; a least-squares slope at or above it is 'growth'")
    parser.add_argument("--out", type=Path,
                        help="also write the JSON result, with every sample, to this file")
    args = parser.parse_args(argv)
    if not 0 < args.minutes <= MAX_MINUTES or args.interval <= 0 or args.load_seconds < 2:
        parser.error(f"need 0 < --minutes <= {MAX_MINUTES}, --interval > 0, --load-seconds >= 2")
    if os.geteuid() != 0:
        print("soak: needs root (it builds network namespaces)", file=sys.stderr)
        return 77
    missing = [t for t in ("iperf3", "ip", "timeout") if shutil.which(t) is None]
    if missing:
        print(f"soak: missing tools: {', '.join(missing)}", file=sys.stderr)
        return 69
    busy = other_benchmark(SHARED_BENCH)
    if busy:
        print(f"soak: not starting, another benchmark is running: {busy}", file=sys.stderr)
        return 75
    signal.signal(signal.SIGTERM, _terminate)
    try:
        result = soak(args)
    except KeyboardInterrupt:
        print("soak: interrupted; daemons stopped and namespaces removed", file=sys.stderr)
        return 2
    print()
    print(summary(result))
    line = {k: v for k, v in result.items() if k != "sample_list"}
    print(json.dumps(line), flush=True)
    if args.out:
        args.out.write_text(json.dumps(result) + "\n")
    if result["status"] != "ok" or result["verdict"] == "insufficient samples":
        return 2
    return 0 if result["verdict"] == "no growth" else 1


if __name__ == "__main__":
    sys.exit(main())
