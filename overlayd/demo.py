"""`overlayd demo`: a whole overlay on this one machine, shown working, then removed again.

1. build N hosts (network namespaces) on a bridged veth underlay, write the subnet map and one
   config per host, start a real `overlayd run` process in each and wait for its device;
2. ping every ordered pair of hosts across the overlay (RTT);
3. push a TCP transfer from the first host to the last one and check its sha256 on arrival;
4. stop the daemons with SIGTERM (they must exit 0 and take their devices with them);
5. print a summary; remove everything — also on failure, Ctrl-C or SIGTERM.

With `--map etcd` the demo starts its own etcd in a namespace on the underlay and writes the
network config there (`overlayd net init`); the hosts claim their subnets in etcd, the leases are
listed, and one more host joins while the others run and is reached by every one of them.

Exit status: 0 when every step passed; 1 when a check failed; 77 not root; 69 the machine lacks
what the lab needs (tun, iproute2, ping); 130 interrupted.
"""

from __future__ import annotations

import argparse
import shlex
import signal
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType

from overlayd.lab import HostSpec, Lab, LabError, lab_unavailable

EX_FAILED = 1
EX_UNAVAILABLE = 69
EX_NOPERM = 77
EX_INTERRUPTED = 130

# Demo backend -> (map backend type, extra [backend] keys); the rest of the demo does not care
# which encapsulation runs.
BACKENDS: dict[str, tuple[str, dict[str, object]]] = {
    "udp": ("udp", {}),
    "vxlan": ("vxlan", {}),                                 # routed, flannel.1 compatible
    "vxlan-switched": ("vxlan", {"mode": "switched"}),      # one L2 segment over taps
    "wireguard": ("wireguard", {}),                         # WireGuard's protocol: encrypted
}
WARMUP_TRIES = 5          # pings per pair until the first answer (ARP, daemons settling)


class Interrupted(Exception):
    """SIGTERM/SIGHUP arrived: unwind through every `finally` like Ctrl-C does."""


def _byte_count(text: str) -> int:
    """50000000, 50M, 50MB, 1G: decimal units, as throughput is reported in Gbit/s."""
    units = {"k": 10**3, "m": 10**6, "g": 10**9}
    t = text.strip().lower().removesuffix("b")
    try:
        value = int(float(t[:-1]) * units[t[-1]]) if t and t[-1] in units else int(t)
    except (ValueError, IndexError):
        raise argparse.ArgumentTypeError(f"{text!r}: a byte count such as 50M") from None
    if not 1 <= value <= 10**10:
        raise argparse.ArgumentTypeError(f"{text!r}: between 1 byte and 10G")
    return value


def _host_count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: a number from 2 to 8") from None
    if not 2 <= value <= 8:
        raise argparse.ArgumentTypeError(f"{value}: the demo builds 2 to 8 hosts")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--hosts", type=_host_count, default=3, metavar="N",
                        help="hosts to build, 2..8 (default 3)")
    parser.add_argument("--bytes", type=_byte_count, default=50_000_000, dest="nbytes",
                        metavar="N", help="size of the TCP transfer, e.g. 50M (default)")
    parser.add_argument("--pings", type=int, default=3, choices=range(1, 21), metavar="N",
                        help="echo requests per pair (default 3)")
    parser.add_argument("--backend", choices=sorted(BACKENDS), default="udp",
                        help="data path: udp, vxlan (routed) or vxlan-switched (L2, tap) "
                             "(default udp)")
    parser.add_argument("--map", choices=("file", "etcd"), default="file",
                        help="where the subnet map comes from: a file on every host, or etcd "
                             "(the demo starts its own etcd in a namespace; hosts claim "
                             "their subnets there and find each other) (default file)")
    parser.add_argument("--keep-logs", type=Path, metavar="DIR",
                        help="copy the configs and daemon logs to DIR before removing the lab")
    parser.add_argument("--overlayd", default=None, metavar="CMD",
                        help="command that runs overlayd in each host (default: this Python "
                             "with -m overlayd)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="overlayd demo", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run_from_args(parser.parse_args(argv))


def _say(text: str = "") -> None:
    print(text, flush=True)


@contextmanager
def _signals_unwind() -> Iterator[None]:
    """SIGTERM and SIGHUP raise Interrupted (SIGINT already raises KeyboardInterrupt), so the
    lab's context manager runs its cleanup whichever way we are told to stop."""
    def raise_interrupted(signum: int, frame: FrameType | None) -> None:
        raise Interrupted(signal.Signals(signum).name)

    old = {sig: signal.signal(sig, raise_interrupted) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


def run_from_args(args: argparse.Namespace) -> int:
    why = lab_unavailable()
    if why is not None:
        _say_err(f"overlayd demo: {why}")
        return EX_NOPERM if "root" in why else EX_UNAVAILABLE
    cmd = shlex.split(args.overlayd) if args.overlayd else None
    specs = [HostSpec() for _ in range(args.hosts)]
    backend, backend_extra = BACKENDS[args.backend]
    if args.map == "etcd":
        from overlayd.lab.etcd import etcd_unavailable
        from overlayd.lab.etcd_lab import EtcdLab, etcdctl_unavailable

        missing = etcd_unavailable() or etcdctl_unavailable()
        if missing:
            _say_err(f"overlayd demo --map etcd: {missing}")
            return EX_UNAVAILABLE
        lab: Lab = EtcdLab(specs, backend=backend, backend_extra=backend_extra,
                           overlayd_cmd=cmd, start=False, keep_logs=args.keep_logs,
                           ready_timeout_s=30.0)
    else:
        lab = Lab(specs, backend=backend, backend_extra=backend_extra,
                  overlayd_cmd=cmd, start=False, keep_logs=args.keep_logs)
    try:
        with _signals_unwind():
            ok = _run(lab, args)
    except (KeyboardInterrupt, Interrupted) as exc:
        _say_err(f"overlayd demo: interrupted ({str(exc) or 'SIGINT'}); everything was removed")
        return EX_INTERRUPTED
    except LabError as exc:
        _say_err(f"overlayd demo: FAILED: {exc}")
        _where_logs(args)
        return EX_FAILED
    _say(f"removed: {len(lab.hosts) + len(lab.bystanders) + 1} namespaces with their devices, "
         f"{lab.workdir}")
    if not ok:
        _where_logs(args)
    return 0 if ok else EX_FAILED


def _say_err(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _where_logs(args: argparse.Namespace) -> None:
    if args.keep_logs:
        _say_err(f"configs and daemon logs kept in {args.keep_logs}")
    else:
        _say_err("rerun with --keep-logs DIR to keep the configs and daemon logs")


def _run(lab: Lab, args: argparse.Namespace) -> bool:
    """Steps 1-4 inside the lab; True when every check passed. Raises LabError on setup."""
    with lab:
        _say(f"== building {len(lab.specs)} hosts: namespaces {lab.prefix}-host1.. on a bridged "
             f"underlay {lab.underlay}, overlay {lab.network}, backend {args.backend} "
             f"port {lab.port}")
        t0 = time.monotonic()
        lab.start_daemons()
        for host in lab:
            info = lab.device_info(host) or {}
            pid = host.daemon.pid if host.daemon else "?"
            _say(f"   {host.name}: ul0 {host.underlay_ip}  {lab.device} {host.overlay_ip} "
                 f"({host.subnet}) mtu {info.get('mtu', '?')}  overlayd pid {pid}")
        _say(f"   all daemons up in {time.monotonic() - t0:.1f}s")
        joined_ok = _etcd_story(lab) if hasattr(lab, "etcdctl") else True

        _say(f"== ping across the overlay ({args.pings} per ordered pair)")
        rtts = _ping_matrix(lab, args.pings)
        _print_matrix(lab, rtts)
        sealed_ok = _encryption_story(lab) if lab.backend == "wireguard" else True

        src, dst = lab.hosts[0], lab.hosts[-1]
        _say(f"== TCP transfer {src.name} ({src.overlay_ip}) -> {dst.name} ({dst.overlay_ip}),"
             f" {args.nbytes:,} bytes")
        transfer = lab.tcp_transfer(src, dst, args.nbytes, timeout_s=max(60.0,
                                                                          args.nbytes / 1e6))
        transfer_ok = transfer.bytes_ok and transfer.sha256_ok
        _say(f"   {'all' if transfer.bytes_ok else 'NOT all'} {args.nbytes:,} bytes in "
             f"{transfer.seconds:.2f}s = "
             f"{transfer.gbit_per_s:.2f} Gbit/s, sha256 "
             f"{'matches' if transfer.sha256_ok else 'DIFFERS'}")

        _say("== stopping the daemons (SIGTERM)")
        t0 = time.monotonic()
        codes = lab.stop_daemons()
        stop_s = time.monotonic() - t0
        leftovers = [h.name for h in lab if lab.device_info(h) is not None]
        _say(f"   exit codes {codes} in {stop_s:.1f}s; devices left: {leftovers or 'none'}")
        if any(code != 0 for code in codes.values()):
            for host in lab:
                if codes.get(host.name) != 0 and host.daemon is not None:
                    _say(f"   --- {host.name} log tail:\n{host.daemon.log_tail()}")

    pings_ok = all(r is not None for r in rtts.values())
    stop_ok = all(code == 0 for code in codes.values()) and not leftovers
    _say("== summary")
    rows = [
        ("hosts", f"{len(lab.hosts)} ({args.backend} backend)", True),
        ("ping", f"{sum(r is not None for r in rtts.values())}/{len(rtts)} pairs answered",
         pings_ok),
        ("tcp", (f"{args.nbytes:,} B {'arrived' if transfer.bytes_ok else 'NOT all arrived'}, "
                 f"{transfer.gbit_per_s:.2f} Gbit/s, "
                 f"sha256 {'ok' if transfer.sha256_ok else 'mismatch'}"), transfer_ok),
        ("stop", f"all exit 0 in {stop_s:.1f}s, devices removed" if stop_ok
         else f"exit codes {codes}, devices left {leftovers}", stop_ok),
    ]
    if lab.backend == "wireguard":
        rows.insert(2, ("sealed", "a marker reached the overlay device, never the underlay in clear"
                        if sealed_ok else "plaintext seen on the underlay", sealed_ok))
    if hasattr(lab, "etcdctl"):
        rows.insert(1, ("join", "a new host claimed a subnet in etcd and every host reached it"
                        if joined_ok else "a new host was NOT reached by every host", joined_ok))
    for name, detail, ok in rows:
        _say(f"   {name:<6} {'PASS' if ok else 'FAIL'}  {detail}")
    passed = pings_ok and transfer_ok and stop_ok and joined_ok and sealed_ok
    _say(f"== {'PASS' if passed else 'FAIL'}")
    return passed


def _encryption_story(lab: Lab) -> bool:
    """wireguard: each host's sessions, then a marker pinged across the overlay, looked for on
    the receiver's overlay device (it must be there) and its underlay (it must not be)."""
    import os

    _say("== WireGuard sessions (overlayd peers)")
    for host in lab:
        rows = lab.control(host, "peers")
        parts = [f"{r['name']} via {r['wireguard']['endpoint']} "
                 f"({r['wireguard']['handshakes']} handshake(s))" for r in rows]
        _say(f"   {host.name}: {', '.join(parts)}")
    src, dst = lab.hosts[0], lab.hosts[-1]
    mark = os.urandom(16)
    ping = ["ping", "-n", "-c", "3", "-i", "0.2", "-W", "1", "-p", mark.hex(),
            str(dst.overlay_ip)]
    seen = {}
    for iface in (lab.device, "ul0"):
        seen[iface] = lab.count_arrivals(
            dst, mark, lambda: lab.exec(src, ping, timeout_s=10, check=False), iface=iface)
    _say(f"== a marker in pings {src.name} -> {dst.name}: on {dst.name}'s {lab.device} "
         f"{seen[lab.device]} packet(s), on its underlay ul0 {seen['ul0']} (sealed)")
    return seen[lab.device] > 0 and seen["ul0"] == 0


def _etcd_story(lab: Lab) -> bool:
    """--map etcd: show the leases the hosts claimed, then one more host joining live."""
    from overlayd.lab.etcd_lab import EtcdLab

    assert isinstance(lab, EtcdLab)
    _say(f"== etcd at {', '.join(lab.endpoints)} (namespace {lab.etcd_hosts[0].netns}): "
         "each host claimed its subnet with a create-only transaction")
    listed = lab.exec(lab.etcd_hosts[0], [sys.executable, "-m", "overlayd", "net", "leases",
                                          "--etcd-endpoints", *lab.endpoints], timeout_s=30,
                      check=False)
    for line in (listed.stdout or listed.stderr).splitlines():
        _say(f"   {line}")
    name = f"host{len(lab.hosts) + 1}"
    _say(f"== {name} joins: its daemon claims a subnet, the others learn it from their watch")
    t0 = time.monotonic()
    host = lab.add_host(name)
    _say(f"   {name}: ul0 {host.underlay_ip}  claimed {host.subnet} in "
         f"{time.monotonic() - t0:.1f}s")
    reached = []
    for other in lab.hosts[:-1]:
        ok = any(lab.ping(other, host, count=1, wait_s=1.0).ok for _ in range(WARMUP_TRIES))
        reached.append(ok)
        _say(f"   {other.name} -> {name}: {'reached' if ok else 'NOT reached'} "
             "(no restart, no config change)")
    return all(reached)


def _ping_matrix(lab: Lab, count: int) -> dict[tuple[str, str], float | None]:
    rtts: dict[tuple[str, str], float | None] = {}
    for a in lab:
        for b in lab:
            if a is b:
                continue
            # The first echo may go before ARP on the underlay resolves: retry, bounded.
            for _ in range(WARMUP_TRIES):
                if lab.ping(a, b, count=1, wait_s=1.0).ok:
                    break
            result = lab.ping(a, b, count=count, interval_s=0.05, wait_s=1.0)
            rtts[(a.name, b.name)] = result.rtt_avg_ms if result.ok else None
    return rtts


def _print_matrix(lab: Lab, rtts: dict[tuple[str, str], float | None]) -> None:
    names = [h.name for h in lab]
    width = max(9, *(len(n) for n in names)) + 2
    _say("   RTT ms   " + "".join(f"{'to ' + n:>{width}}" for n in names))
    for a in names:
        cells = []
        for b in names:
            rtt = rtts.get((a, b))
            cells.append("-" if a == b else ("FAIL" if rtt is None else f"{rtt:.3f}"))
        _say(f"   {a:<8} " + "".join(f"{c:>{width}}" for c in cells))


if __name__ == "__main__":
    sys.exit(main())
