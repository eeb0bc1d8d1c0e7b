"""Memory of a real daemon at scale: RSS with 10,000 routes (udp) and 100,000 FDB entries
(vxlan switched), each in a namespace of its own.

    python3 -m overlayd.bench.memory            # as root; prints RSS and peak RSS per case

Routes: a map of 10,000 nodes (/24 subnets of 10.0.0.0/8), so the daemon parses, validates and
routes all of them. FDB: a switched daemon with one peer learns 100,000 distinct source MACs from
broadcast frames written to its tap device (an AF_PACKET socket in the namespace transmits on the
tap, which the daemon reads), as a large L2 segment would teach it.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

from overlayd.lab import configs, netns
from overlayd.lab.processes import DaemonProcess

ROUTES = 10_000
FDB_ENTRIES = 100_000
PUBLIC_IP = "192.168.100.1"


def rss_kib(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) of a process in KiB."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0])
    return fields["VmRSS"], fields["VmHWM"]


def control(ns: str, sock: Path, command: str) -> object:
    out = netns.ns_run(ns, [sys.executable, "-m", "overlayd", command, "--socket", str(sock),
                            "--json"], timeout=60).stdout
    return json.loads(out)


def wait_until(predicate: object, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return True
        time.sleep(0.2)
    return False


def start(ns: str, work: Path, smap: dict, extra: dict) -> DaemonProcess:
    (work / "map.toml").write_text(configs.dumps(smap))
    cfg = configs.daemon_config("n0", "map.toml", "ovl0", str(work / "ctl.sock"), "warning", extra)
    (work / "overlayd.toml").write_text(configs.dumps(cfg))
    daemon = DaemonProcess(ns, [sys.executable, "-m", "overlayd", "run", "-c",
                                str(work / "overlayd.toml")], work / "daemon.log")
    if daemon.pid is None or not wait_until(lambda: (work / "ctl.sock").exists(), 60):
        raise RuntimeError(f"daemon did not start:\n{daemon.log_tail()}")
    return daemon


def routes_case(ns: str, work: Path) -> dict:
    nodes = [{"name": f"n{i}", "subnet": f"10.{i // 256}.{i % 256}.0/24",
              "public_ip": PUBLIC_IP if i == 0 else f"172.{16 + i // 65536}.{i // 256 % 256}."
                                                    f"{i % 256}"}
             for i in range(ROUTES)]
    daemon = start(ns, work, configs.subnet_map("10.0.0.0/8", 24, {"type": "udp"}, nodes), {})
    try:
        routes = len(control(ns, work / "ctl.sock", "routes"))  # type: ignore[arg-type]
        rss, peak = rss_kib(daemon.pid)  # type: ignore[arg-type]
        return {"case": f"udp, {routes} routes", "rss_mib": rss / 1024, "peak_mib": peak / 1024}
    finally:
        daemon.stop()


def fdb_case(ns: str, work: Path) -> dict:
    nodes = [{"name": "n0", "subnet": "10.1.0.0/24", "public_ip": PUBLIC_IP},
             {"name": "n1", "subnet": "10.1.1.0/24", "public_ip": "192.168.100.2"}]
    daemon = start(ns, work, configs.subnet_map("10.1.0.0/16", 24,
                                                {"type": "vxlan", "mode": "switched"}, nodes),
                   {"switch": {"fdb_max_entries": 131072, "mac_ageing_seconds": 3600,
                               # all from one port (the tap): lift the per-port cap
                               "fdb_max_entries_per_port": 131072}})
    try:
        sender = ("import socket,time\n"
                  "s=socket.socket(socket.AF_PACKET, socket.SOCK_RAW)\n"
                  "s.bind(('ovl0', 0))\n"
                  f"for i in range({FDB_ENTRIES}):\n"
                  "    src=bytes([2,0x42])+i.to_bytes(4,'big')\n"
                  "    s.send(b'\\xff'*6+src+b'\\x08\\x06'+bytes(46))\n"
                  "    if i % 512 == 511: time.sleep(0.002)\n")
        netns.ns_run(ns, [sys.executable, "-c", sender], timeout=120)
        sock = work / "ctl.sock"

        def learned() -> int:
            return int(control(ns, sock, "status")["tables"]["fdb_entries"])  # type: ignore[index]

        ok = wait_until(lambda: learned() >= FDB_ENTRIES, 30)
        entries = learned()
        rss, peak = rss_kib(daemon.pid)  # type: ignore[arg-type]
        return {"case": f"vxlan switched, {entries} FDB entries", "rss_mib": rss / 1024,
                "peak_mib": peak / 1024, "all_learned": ok}
    finally:
        daemon.stop()


def main() -> int:
    ns = netns.run_prefix("ovd-mem")
    netns.add_netns(ns)
    results = []
    try:
        netns.ip("link", "add", "ul0", "netns", ns, "type", "veth", "peer", "name", "ul1",
                 "netns", ns)
        netns.add_address(ns, "ul0", f"{PUBLIC_IP}/24")
        netns.link_up(ns, "ul0")
        netns.link_up(ns, "ul1")
        for case in (routes_case, fdb_case):
            with tempfile.TemporaryDirectory(prefix="ovd-mem-") as work:
                results.append(case(ns, Path(work)))
                print(json.dumps(results[-1]), flush=True)
    finally:
        netns.del_netns(ns)
    print("\n| case | RSS MiB | peak RSS MiB |\n|---|---|---|")
    for r in results:
        print(f"| {r['case']} | {r['rss_mib']:.1f} | {r['peak_mib']:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
