"""The wireguard runtime's 0.1 s tick on the threads engine: how long each tick holds the
data-plane threads, and how often it wakes them when there is no traffic. No root, no
namespaces: N compiled forwarders over socketpairs (standing in for the tun queues) and
SO_REUSEPORT sockets on 127.0.0.1, one keypair installed, nothing sent.

    python3 -m overlayd.bench.wg_tick [--threads 2] [--seconds 5]

Each tick asks of the forwarder what WireguardRuntime.tick asks: set_now, then activity().
Printed: the tick's duration (median, p99, worst over the run) and each thread's wake-ups per
second; then STATUS_CALLS status reads (what WireguardRuntime.peer_status asks: endpoints(),
sessions(); overlayd status and peers, each metrics scrape) with their duration and the pauses
they cost (counted by wrapping the engine, so any tree's code can be measured). To measure another tree's code with this file, put that tree first on the path:
``PYTHONPATH=/other/tree python3 overlayd/bench/wg_tick.py``.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import time
from typing import Any

from overlayd.dataplane.tables import LOCAL, ForwardingTables, PeerEntry
from overlayd.runtime.wg_threads import ThreadedWireguardForwarder
from overlayd.runtime.wireguard import WG_TICK_SECONDS
from overlayd.wire import ipv4

ME, PEER = ipv4.addr_to_int("10.0.2.0"), ipv4.addr_to_int("10.0.1.0")
STATUS_CALLS = 200


class PauseCount:
    """The engine as ThreadedForwarder uses it, counting the pauses it asks for. (Each bench
    file has its own: run against another tree, it can import only what that tree has.)"""

    def __init__(self, engine: Any) -> None:
        self.engine, self.pauses = engine, 0

    def pause(self, i: int) -> None:
        self.pauses += 1
        self.engine.pause(i)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.engine, name)


def tables(peer_port: int) -> ForwardingTables:
    peer = PeerEntry(ipv4.addr_to_int("127.0.0.2"), peer_port, 1440, "peer",
                     public_key=bytes(range(32)))
    return ForwardingTables(ME + 1, (peer,), ((ME, 24, LOCAL), (PEER, 24, 0)))


def measure(threads: int, seconds: float) -> dict[str, Any]:
    from overlayd import _dataplane  # type: ignore[attr-defined]  # compiled only

    devices = [socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM) for _ in range(threads)]
    socks: list[socket.socket] = []
    for _ in range(threads):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(("127.0.0.3", socks[0].getsockname()[1] if socks else 0))
        sock.setblocking(False)
        socks.append(sock)
    sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sink.bind(("127.0.0.2", 0))
    for pair in devices:
        for end in pair:
            end.setblocking(False)
    fw = ThreadedWireguardForwarder(
        [_dataplane.WireguardForwarder(dev.fileno(), sock.fileno(), bytes(32))
         for (_, dev), sock in zip(devices, socks, strict=True)],
        [dev.fileno() for _, dev in devices], [s.fileno() for s in socks], 0)
    try:
        fw.set_tables(tables(sink.getsockname()[1]))
        fw.start()
        fw.set_now(time.monotonic())
        fw.install_keypair(0, 1, 2, os.urandom(32), os.urandom(32), True)
        time.sleep(WG_TICK_SECONDS)
        before = [t["wakeups"] for t in fw.threads()]
        spans: list[float] = []
        start = time.monotonic()
        while time.monotonic() - start < seconds:
            began = time.perf_counter()
            fw.set_now(time.monotonic())
            fw.activity()
            spans.append((time.perf_counter() - began) * 1e6)
            time.sleep(WG_TICK_SECONDS)
        elapsed = time.monotonic() - start
        after = [t["wakeups"] for t in fw.threads()]
        counting = PauseCount(fw.engine)
        fw.engine = counting
        status: list[float] = []
        for _ in range(STATUS_CALLS):
            began = time.perf_counter()
            fw.endpoints()
            fw.sessions()
            status.append((time.perf_counter() - began) * 1e6)
        fw.engine = counting.engine
    finally:
        fw.stop()
        for pair in devices:
            for end in pair:
                end.close()
        for s in (*socks, sink):
            s.close()
    spans.sort()
    return {"ticks": len(spans), "tick_p50_us": statistics.median(spans),
            "tick_p99_us": spans[min(len(spans) - 1, int(0.99 * len(spans)))],
            "tick_max_us": spans[-1],
            "wakeups_per_s": [(a - b) / elapsed for a, b in zip(after, before, strict=True)],
            "status_p50_us": statistics.median(status), "status_max_us": max(status),
            "status_pauses": counting.pauses / STATUS_CALLS}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python3 -m overlayd.bench.wg_tick")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=5.0)
    args = parser.parse_args()
    r = measure(args.threads, args.seconds)
    wakeups = ", ".join(f"{w:.1f}" for w in r["wakeups_per_s"])
    print(f"{args.threads} threads, {r['ticks']} ticks: tick {r['tick_p50_us']:.1f} us median, "
          f"{r['tick_p99_us']:.1f} p99, {r['tick_max_us']:.1f} worst; idle thread wake-ups "
          f"per second: {wakeups}; status read {r['status_p50_us']:.1f} us median, "
          f"{r['status_max_us']:.1f} worst, {r['status_pauses']:.1f} pauses per read")


if __name__ == "__main__":
    main()
