"""`overlayd bench`: run every subject on a fresh testbed, print a table and JSON lines.

For each subject: testbed up, subject up, a short warm-up transfer, then ``reps`` rounds of
(TCP 1 stream with CPU accounting, TCP N streams, UDP small packets, ping), medians reported.
Ratios to kernel-vxlan from the same run are printed when it was measured. With ``--foreign``
the userspace tunnels of the shared testbed (../shared/bench: socat, tinc, OpenVPN) are run by
its own runner in the same invocation and their medians merged into the table.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from overlayd.bench.measure import Round, iperf3, one_round
from overlayd.bench.subjects import make_subject
from overlayd.bench.testbed import Testbed

DEFAULT_SUBJECTS = ["kernel-vxlan", "overlayd-udp", "overlayd-vxlan", "overlayd-vxlan-switched",
                    "overlayd-udp-py", "overlayd-vxlan-py", "overlayd-vxlan-switched-py"]
FOREIGN = ["socat-tun", "tinc-router", "openvpn-tun", "wireguard-go"]
COLUMNS = [("tcp1_gbps", "TCP 1 Gbit/s", "{:.2f}"), ("tcpn_gbps", "TCP N Gbit/s", "{:.2f}"),
           ("udp_kpps", "UDP 64B kpps", "{:.0f}"), ("rtt_p50_us", "RTT p50 µs", "{:.0f}"),
           ("rtt_p99_us", "RTT p99 µs", "{:.0f}"), ("cpu_s_per_gb", "daemon CPU s/GB", "{:.2f}"),
           ("machine_cpu_s_per_gb", "machine CPU s/GB", "{:.2f}"),
           ("machine_cpus_busy", "CPUs busy (TCP 1)", "{:.2f}")]
# Columns with no ratio to the kernel's: the kernel has no daemon; the machine figures are
# printed as they are (their ratio is the inverse of a throughput ratio on a saturated machine).
NO_RATIO = {"cpu_s_per_gb", "machine_cpu_s_per_gb", "machine_cpus_busy"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("subjects", nargs="*", default=DEFAULT_SUBJECTS,
                        help=f"what to measure (default: {' '.join(DEFAULT_SUBJECTS)})")
    parser.add_argument("--reps", type=int, default=3, help="rounds per subject (median)")
    parser.add_argument("--duration", type=int, default=8, help="seconds per iperf3 test")
    parser.add_argument("--streams", type=int, default=4, help="streams of the multi-stream test")
    parser.add_argument("--udp-len", type=int, default=64, help="UDP payload bytes")
    parser.add_argument("--pings", type=int, default=500, help="pings per round (2 ms apart)")
    parser.add_argument("--foreign", action="store_true",
                        help=f"also run {', '.join(FOREIGN)} with ../shared/bench/run.sh")
    parser.add_argument("--foreign-peers", nargs="+", default=FOREIGN, metavar="PEER",
                        help="which of the shared testbed's peers --foreign runs")
    parser.add_argument("--shared-bench", type=Path,
                        default=Path(__file__).resolve().parents[2].parent / "shared" / "bench",
                        help="the shared testbed's directory (for --foreign)")
    parser.add_argument("--out", type=Path, help="directory for results.jsonl and logs")


def run_from_args(args: argparse.Namespace) -> int:
    refused = check_host("overlayd bench", ("iperf3", "ping", "ip", "bridge"),
                         "iperf3 iputils-ping iproute2")
    if refused:
        return refused
    out = args.out or Path(tempfile.mkdtemp(prefix="overlayd-bench-"))
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for name in args.subjects:
        result = measure_subject(name, args, out)
        results.append(result)
        with open(out / "results.jsonl", "a") as f:
            f.write(json.dumps(result) + "\n")
        print(f"[{time.strftime('%H:%M:%S')}] {name}: {summary_line(result)}", flush=True)
    if args.foreign:
        results.extend(run_foreign(args, out))
    print()
    print(table(results))
    cost = encryption_cost(results)
    if cost:
        print(f"\n{cost}")
    print(f"\nJSON lines: {out / 'results.jsonl'}")
    return 0 if all(r["status"] == "ok" for r in results) else 1


def check_host(prog: str, tools: tuple[str, ...], packages: str) -> int:
    """0, or the exit code (printed why) when not root or a tool is missing."""
    if os.geteuid() != 0:
        print(f"{prog}: needs root (it builds network namespaces)", file=sys.stderr)
        return 77
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        print(f"{prog}: missing tools: {', '.join(missing)} (apt-get install {packages})",
              file=sys.stderr)
        return 69
    return 0


def measure_subject(name: str, args: argparse.Namespace, out: Path) -> dict:
    subject = make_subject(name)
    workdir = out / name
    workdir.mkdir(parents=True, exist_ok=True)
    rounds: list[Round] = []
    result: dict = {"subject": name, "status": "ok", "reps": args.reps,
                    "duration_s": args.duration, "streams": args.streams,
                    "udp_len": args.udp_len, "started": time.time()}
    with Testbed.create() as bed:
        try:
            subject.up(bed, workdir)
            iperf3(bed.ns_a, bed.ns_b, subject.over_a, subject.over_b, 2, [])   # warm-up
            for _ in range(args.reps):
                rounds.append(one_round(bed.ns_a, bed.ns_b, subject.over_a, subject.over_b,
                                        subject.pids(), args.duration, args.streams,
                                        args.udp_len, args.pings))
        except Exception as exc:  # noqa: BLE001 - one failing subject must not lose the others' figures
            result.update(status="failed", error=str(exc))
        finally:
            subject.down()
    result["rounds"] = [dataclasses.asdict(r) for r in rounds]
    if rounds:
        for key in dataclasses.asdict(rounds[0]):
            result[key] = statistics.median(getattr(r, key) for r in rounds)
    return result


def run_foreign(args: argparse.Namespace, out: Path) -> list[dict]:
    """The shared testbed's own runner for the userspace tunnels, merged as medians."""
    runner = args.shared_bench / "run.sh"
    if not runner.exists():
        return [{"subject": p, "status": "failed", "error": f"{runner} not found"}
                for p in args.foreign_peers]
    run_dir = out / "foreign"
    env = dict(os.environ, REPS=str(args.reps), DURATION=str(args.duration),
               PARALLEL=str(args.streams), UDP_LEN=str(args.udp_len),
               PING_COUNT=str(args.pings), RUN_DIR=str(run_dir))
    peers = list(args.foreign_peers)
    budget = len(peers) * (args.reps * (3 * args.duration + 30) + 120)
    subprocess.run(["bash", str(runner), *peers], env=env, timeout=budget, check=False,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    merged = []
    lines = (run_dir / "results.jsonl").read_text().splitlines() if (
        run_dir / "results.jsonl").exists() else []
    by_peer = {json.loads(line).get("peer"): json.loads(line) for line in lines if line.strip()}
    for peer in peers:
        raw = by_peer.get(peer)
        if raw is None or raw.get("status") == "failed":
            merged.append({"subject": peer, "status": "failed",
                           "error": (raw or {}).get("error", "no result")})
            continue
        keys = foreign_keys(args.streams, args.udp_len)
        merged.append({"subject": peer, "status": "ok", "source": "shared/bench/run.sh",
                       **{k: raw.get(v) for k, v in keys.items()}})
    return merged


def foreign_keys(streams: int, udp_len: int) -> dict[str, str]:
    """Our column -> the key the shared runner uses for it in its JSON lines."""
    return {"tcp1_gbps": "tcp1_gbps", "tcpn_gbps": f"tcp{streams}_gbps",
            "udp_kpps": f"udp{udp_len}_rx_kpps", "udp_loss_pct": f"udp{udp_len}_loss_pct",
            "rtt_p50_us": "rtt_p50_us", "rtt_p99_us": "rtt_p99_us",
            "cpu_s_per_gb": "tunnel_cpu_s_per_gb"}


def encryption_cost(results: list[dict]) -> str:
    """What encryption costs: overlayd's wireguard backend over its own udp backend, and
    against wireguard-go, from the same run."""
    by = {r["subject"]: r for r in results if r["status"] == "ok"}
    wg = by.get("overlayd-wireguard")
    lines = []
    for other in ("overlayd-udp", "wireguard-go"):
        base = by.get(other)
        if wg is None or base is None:
            continue
        parts = [f"{label} {wg[key] / base[key]:.2f}×" for key, label, _ in COLUMNS
                 if wg.get(key) and base.get(key)]
        lines.append(f"overlayd-wireguard / {other}: " + ", ".join(parts))
    return "\n".join(lines)


def summary_line(r: dict) -> str:
    if r["status"] != "ok":
        return f"FAILED: {r.get('error')}"
    return ", ".join(f"{label} {fmt.format(r[key])}" for key, label, fmt in COLUMNS
                     if r.get(key) is not None)


def table(results: list[dict]) -> str:
    kernel = next((r for r in results if r["subject"] == "kernel-vxlan" and r["status"] == "ok"),
                  None)
    head = "| subject | " + " | ".join(label for _, label, _ in COLUMNS) + " |"
    lines = [head, "|" + "---|" * (len(COLUMNS) + 1)]
    for r in results:
        if r["status"] != "ok":
            lines.append(f"| {r['subject']} | FAILED: {r.get('error', '')[:80]} |"
                         + " |" * (len(COLUMNS) - 1))
            continue
        cells = []
        for key, _, fmt in COLUMNS:
            value = r.get(key)
            cell = "n/a" if value is None else fmt.format(value)
            # ratios to the kernel from the same run; CPU has none (the kernel's is softirq)
            if (kernel and r is not kernel and value is not None and kernel.get(key)
                    and key not in NO_RATIO):
                cell += f" ({value / kernel[key]:.2f}×)"
            cells.append(cell)
        lines.append(f"| {r['subject']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
