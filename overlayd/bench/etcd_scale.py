"""The etcd map at scale: 1,000 leases, one daemon watching them.

    python3 -m overlayd.bench.etcd_scale [--leases 1000] [--changes 100] [--idle 30]

Runs as root. One etcd member and one overlayd host, each in a namespace of its own on one
bridged underlay (an EtcdLab). Before the daemon starts, ``--leases`` leases are written in
flannel's format (a writer process inside etcd's namespace). Then:

1. time to a complete table: from starting ``overlayd run`` until its forwarding table holds
   every lease (control socket polled every 2 ms), and the daemon's RSS then;
2. change latency: ``--changes`` times, the writer adds (then deletes) one lease and reports the
   wall-clock time just before its put; the time until the daemon's table shows the change is
   one sample (2 ms polling: the figures are upper bounds by up to that much); median and p99;
3. steady state: etcd requests the daemon made (its store counts every RPC) over ``--idle``
   seconds with nothing changing, per second.

Prints one line per figure and a final JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from overlayd.lab.etcd_lab import PREFIX, EtcdLab
from overlayd.lab.netns import ns_cmd

POLL_S = 0.002
NETWORK = "10.64.0.0/12"      # 4,096 /24 subnets: room for the leases and the daemon's own
REQUEST_KINDS = ("get", "list", "txn", "put", "delete", "lease_grant", "lease_ttl",
                 "lease_revoke", "compact", "status", "watch")


def lease_key(i: int) -> str:
    return f"{PREFIX}/subnets/10.{64 + i // 256}.{i % 256}.0-24"


def lease_value(i: int) -> bytes:
    return json.dumps({"PublicIP": f"172.{16 + i // 65536}.{i // 256 % 256}.{i % 256}",
                       "PublicIPv6": None}, separators=(",", ":")).encode()


# -- the writer: runs inside etcd's namespace ---------------------------------------------------

async def _writer(endpoint: str, first: int, count: int) -> None:
    from overlayd.io.etcd_store import EtcdStore

    store = EtcdStore([endpoint])
    try:
        await asyncio.gather(*(store.put(lease_key(i), lease_value(i))
                               for i in range(first, first + count)))
        print("ready", flush=True)
        for line in sys.stdin:
            verb, _, arg = line.strip().partition(" ")
            i = int(arg)
            stamp = time.time()
            if verb == "put":
                await store.put(lease_key(i), lease_value(i))
            else:
                await store.delete(lease_key(i))
            print(f"{stamp:.6f}", flush=True)
    finally:
        await store.close()


# -- the driver ---------------------------------------------------------------------------------

def _p99(values: list[float]) -> float:
    return values[min(len(values) - 1, int(len(values) * 0.99))]


def _swap_time(log: Path, name: str, occurrence: int, sign: str) -> float:
    """Wall-clock time of the daemon's ``occurrence``-th "map reloaded (...<sign><name>...)"
    line: the moment the new tables were swapped in (log timestamps have milliseconds)."""
    needle = f"{sign}{name}"
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        hits = [line for line in log.read_text(errors="replace").splitlines()
                if "map reloaded" in line and needle in line]
        if len(hits) >= occurrence:
            stamp = hits[occurrence - 1][:23]        # "2026-12-01 09:40:18,255"
            seconds = time.mktime(time.strptime(stamp[:19], "%Y-%m-%d %H:%M:%S"))
            return seconds + int(stamp[20:23]) / 1000
        time.sleep(0.01)
    raise SystemExit(f"no 'map reloaded' line for {needle} in {log}")


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m overlayd.bench.etcd_scale",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--leases", type=int, default=1000)
    parser.add_argument("--changes", type=int, default=100)
    parser.add_argument("--idle", type=float, default=30.0)
    args = parser.parse_args(argv)
    with EtcdLab(1, cidr=NETWORK, underlay="192.168.90.0/24", start=False, log_level="info",
                 ready_timeout_s=60) as lab:
        etcd_ns = lab.etcd_hosts[0].netns
        writer = subprocess.Popen(
            ns_cmd(etcd_ns, [sys.executable, "-m", "overlayd.bench.etcd_scale", "--writer",
                             lab.endpoints[0], "0", str(args.leases)]),
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        try:
            return _measure(lab, writer, args)
        finally:
            writer.kill()
            writer.wait(timeout=10)


def _measure(lab: EtcdLab, writer: subprocess.Popen[str], args: argparse.Namespace) -> int:
    assert writer.stdout is not None and writer.stdin is not None
    if writer.stdout.readline().strip() != "ready":
        raise SystemExit("the lease writer failed")
    host = lab.hosts[0]

    def peers() -> int | None:
        try:
            return int(lab.control(host, "status")["tables"]["peers"])
        except Exception:  # noqa: BLE001 - not up yet
            return None

    t0 = time.monotonic()
    lab.start_daemon(host, wait=False)
    while peers() != args.leases:
        if time.monotonic() - t0 > 60:
            raise SystemExit(f"table incomplete after 60 s: {peers()} peers")
        time.sleep(POLL_S)
    complete_s = time.monotonic() - t0
    assert host.daemon is not None and host.daemon.pid is not None
    rss = rss_mib(host.daemon.pid)
    print(f"complete table: {args.leases} leases in {complete_s:.3f} s from start, "
          f"RSS {rss:.1f} MiB", flush=True)

    samples = []
    extra = args.leases + 10
    for n in range(args.changes):
        verb, want = ("put", args.leases + 1) if n % 2 == 0 else ("del", args.leases)
        writer.stdin.write(f"{verb} {extra}\n")
        writer.stdin.flush()
        stamp = float(writer.stdout.readline())
        deadline = time.monotonic() + 10
        while peers() != want:
            if time.monotonic() > deadline:
                raise SystemExit(f"change {n} not applied within 10 s")
            time.sleep(POLL_S)
        seen_ms = (time.time() - stamp) * 1000
        swapped = _swap_time(host.log_path, lease_key(extra).rsplit("/", 1)[1], n // 2 + 1,
                             "+" if verb == "put" else "-")
        samples.append(((swapped - stamp) * 1000, seen_ms))
    applied = sorted(a for a, _ in samples)
    seen = sorted(s for _, s in samples)
    median, p99 = statistics.median(applied), _p99(applied)
    print(f"change applied (etcd put -> tables swapped, from the daemon's log): median "
          f"{median:.1f} ms, p99 {p99:.1f} ms over {len(samples)} changes", flush=True)
    print(f"change visible to a client polling the control socket: median "
          f"{statistics.median(seen):.1f} ms, p99 {_p99(seen):.1f} ms", flush=True)

    def requests() -> int:
        stats = lab.control(host, "status")["map"]["datastore"]["requests"]
        return sum(int(stats.get(k, 0)) for k in REQUEST_KINDS)

    before, t_idle = requests(), time.monotonic()
    time.sleep(args.idle)
    rate = (requests() - before) / (time.monotonic() - t_idle)
    print(f"steady state: {rate:.3f} etcd requests/s from the node over {args.idle:g} s "
          "(one watch stream open; renewals at TTL - 1 h)", flush=True)
    result: dict[str, Any] = {"leases": args.leases, "complete_table_s": round(complete_s, 3),
                              "rss_mib": round(rss, 1), "change_median_ms": round(median, 2),
                              "change_p99_ms": round(p99, 2), "changes": len(samples),
                              "visible_median_ms": round(statistics.median(seen), 2),
                              "idle_requests_per_s": round(rate, 4)}
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    if len(sys.argv) >= 5 and sys.argv[1] == "--writer":
        asyncio.run(_writer(sys.argv[2], int(sys.argv[3]), int(sys.argv[4])))
        sys.exit(0)
    sys.exit(main())
