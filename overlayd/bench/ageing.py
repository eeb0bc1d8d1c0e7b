"""MAC ageing: how long one FDB tick (set_now + age, what the runtime runs every 0.5 s on the
event loop) takes, by table size and capacity. No root, no namespaces: one VxlanSwitchForwarder
per case over a socketpair standing in for the tap.

    python3 -m overlayd.bench.ageing [--impl cython|python|both] [--ticks 40] [--reps 3]

Cases: 16 Ki live entries in a 16 Ki table (the default fdb_max_entries); 1 Mi live entries in
a 2 Mi table; an idle table of the largest capacity (2^24, nothing learned). The table is
filled by frames through inside_batch with distinct source MACs, as a busy L2 segment fills it.
Per case and rep: the median and the worst of ``--ticks`` steady ticks (nothing expires), then
"expiry": the clock jumps past the ageing time so every entry expires at once, and ticks run
until the table is empty (each removes at most the forwarder's per-call limit): the worst of
those ticks and how many it took. Printed: the median over reps of each figure.
"""

from __future__ import annotations

import argparse
import importlib
import socket
import statistics
import time
from types import ModuleType
from typing import Any

from overlayd.dataplane.tables import SwitchTables

MAX_AGE = 300.0
CASES = (  # name, live entries, fdb_max_entries
    ("16Ki live", 16 << 10, 16 << 10),
    ("1Mi live", 1 << 20, 2 << 20),
    ("2^24 capacity, idle", 0, 1 << 24),
)
SEND_CHUNK = 1000       # frames written before the forwarder drains them (socket buffer)


def kernels(name: str) -> ModuleType:
    if name == "python":
        return importlib.import_module("overlayd.dataplane.python_kernels")
    return importlib.import_module("overlayd._dataplane")


def fill(fwd: Any, app: socket.socket, entries: int) -> None:
    """Teach the forwarder ``entries`` distinct source MACs through its device fd."""
    header = b"\xff" * 6
    tail = b"\x88\xb5" + b"\x00" * 46
    for start in range(0, entries, SEND_CHUNK):
        for k in range(start, min(start + SEND_CHUNK, entries)):
            app.send(header + (0x020000000000 + k).to_bytes(6, "big") + tail)
        while fwd.inside_batch():
            pass
    assert fwd.fdb_size() == entries, (fwd.fdb_size(), entries)


def tick_seconds(fwd: Any, now: float) -> tuple[float, int]:
    start = time.perf_counter()
    fwd.set_now(now)
    removed = fwd.age(now, MAX_AGE)
    return time.perf_counter() - start, removed


def run_case(module: ModuleType, entries: int, capacity: int, ticks: int) -> dict[str, float]:
    app, dev = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        for s in (app, dev):
            s.setblocking(False)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.bind(("127.0.0.1", 0))
            fwd = module.VxlanSwitchForwarder(dev.fileno(), udp.fileno(), 1, (), 512, capacity)
            fwd.set_tables(SwitchTables())
            now = 1000.0
            fwd.set_now(now)
            fill(fwd, app, entries)
            steady = []
            for _ in range(ticks):
                now += 0.5
                seconds, removed = tick_seconds(fwd, now)
                assert removed == 0
                steady.append(seconds)
            expiry, left = [], entries
            now += MAX_AGE + 1.0
            while left:
                seconds, removed = tick_seconds(fwd, now)
                expiry.append(seconds)
                left -= removed
                now += 0.5
            return {"median_us": statistics.median(steady) * 1e6,
                    "worst_us": max(steady) * 1e6,
                    "expiry_worst_ms": max(expiry, default=0.0) * 1e3,
                    "expiry_ticks": float(len(expiry))}
    finally:
        app.close()
        dev.close()


def main() -> int:
    parser = argparse.ArgumentParser(prog="python3 -m overlayd.bench.ageing",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--impl", choices=("cython", "python", "both"), default="cython")
    parser.add_argument("--ticks", type=int, default=40, help="steady ticks per rep (40)")
    parser.add_argument("--reps", type=int, default=3, help="repetitions per case (3)")
    parser.add_argument("--cases", default="all",
                        help="comma-separated case numbers (1-3) or 'all'")
    args = parser.parse_args()
    impls = ("cython", "python") if args.impl == "both" else (args.impl,)
    chosen = range(len(CASES)) if args.cases == "all" else [int(c) - 1 for c in
                                                             args.cases.split(",")]
    print(f"{'impl':7} {'case':22} {'entries':>9} {'capacity':>9} {'tick p50':>10} "
          f"{'tick max':>10} {'expiry max':>11} {'ticks':>6}   (medians of {args.reps} reps)")
    for impl in impls:
        module = kernels(impl)
        for i in chosen:
            name, entries, capacity = CASES[i]
            reps = [run_case(module, entries, capacity, args.ticks) for _ in range(args.reps)]
            fig = {k: statistics.median(r[k] for r in reps) for k in reps[0]}
            print(f"{impl:7} {name:22} {entries:>9} {capacity:>9} "
                  f"{fig['median_us']:>8.1f}us {fig['worst_us']:>8.1f}us "
                  f"{fig['expiry_worst_ms']:>9.2f}ms {int(fig['expiry_ticks']):>6}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
