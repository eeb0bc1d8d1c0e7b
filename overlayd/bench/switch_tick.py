"""MAC ageing on the switched threads engine: how often it wakes and stalls the data-plane
thread. No root, no namespaces: one compiled VxlanSwitchForwarder on its native thread, over a
socketpair (standing in for the tap) and UDP sockets on 127.0.0.1.

    python3 -m overlayd.bench.switch_tick [--seconds 5] [--macs 1000] [--rate 4000]

Ageing is driven as the tree's daemon drives it: where the threaded forwarder has set_ageing,
the thread ages its own table (no timer); else the daemon's FDB timer (Daemon._fdb_tick every
FDB_TICK_SECONDS: set_now, then age, with the thread paused). Two phases:

- idle: ``--macs`` MACs learned, ageing at 300 s (the default), nothing sent: the thread's
  wake-ups per second (epoll returns, the clock step's deadlines included) and pauses;
- busy: ``--rate`` frames a second from the tap, each from a new MAC, ageing at 1 s, so every
  pass removes about rate x 0.5 entries: pauses per second and the worst stall - the longest
  FDB tick (pause to resume, which the thread spends stopped) or the longest clock step that
  aged (the thread's own pass), whichever the tree has.

To measure another tree's code with this file, put that tree first on the path:
``PYTHONPATH=/other/tree python3 overlayd/bench/switch_tick.py``.
"""

from __future__ import annotations

import argparse
import socket
import statistics
import threading
import time
from typing import Any

from overlayd.dataplane.tables import PeerEntry, SwitchTables
from overlayd.runtime.daemon import FDB_TICK_SECONDS, Daemon
from overlayd.runtime.engine import ThreadedForwarder
from overlayd.wire import ipv4

IDLE_AGEING_S = 300.0
BUSY_AGEING_S = 1.0


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


class TickHost:
    """What Daemon._fdb_tick reads of its daemon."""

    def __init__(self, forwarder: Any, ageing: float) -> None:
        self.forwarder = forwarder
        self.config = type("Config", (), {"mac_ageing_seconds": ageing})()


def frame(src: int) -> bytes:
    return b"\xff" * 6 + src.to_bytes(6, "big") + b"\x88\xb5" + bytes(46)


class Rig:
    def __init__(self) -> None:
        from overlayd import _dataplane  # type: ignore[attr-defined]  # compiled only

        self.app, self.dev = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        for s in (self.app, self.dev):
            s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
            s.setblocking(False)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.3", 0))
        self.sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sink.bind(("127.0.0.2", 0))
        peer = PeerEntry(ipv4.addr_to_int("127.0.0.2"), self.sink.getsockname()[1], 1450, "peer")
        fwd = _dataplane.VxlanSwitchForwarder(self.dev.fileno(), self.sock.fileno(), 1, (), 64,
                                              1 << 20)
        self.fw = ThreadedForwarder([fwd], [self.dev.fileno()], [self.sock.fileno()], 0)
        self.fw.set_tables(SwitchTables((peer,), ()))
        self.fw.set_now(time.monotonic())
        self.self_ageing = hasattr(self.fw, "set_ageing")
        self.fw.start()
        self.counting = PauseCount(self.fw.engine)
        self.fw.engine = self.counting

    def close(self) -> None:
        self.fw.stop()
        for s in (self.app, self.dev, self.sock, self.sink):
            s.close()

    def ageing(self, seconds: float) -> TickHost:
        if self.self_ageing:
            self.fw.set_ageing(seconds, FDB_TICK_SECONDS)
        return TickHost(self.fw, seconds)

    def learn(self, first: int, count: int) -> None:
        want = self.fw.counters()["inside_packets"] + count
        for k in range(count):
            while True:
                try:
                    self.app.send(frame(first + k))
                    break
                except BlockingIOError:
                    time.sleep(0.001)
        deadline = time.monotonic() + 10.0
        while self.fw.counters()["inside_packets"] < want and time.monotonic() < deadline:
            time.sleep(0.001)

    def stats(self) -> dict[str, Any]:
        return dict(self.fw.threads()[0])

    def run(self, host: TickHost, seconds: float, traffic: threading.Event | None = None,
            rate: int = 0) -> dict[str, Any]:
        """``seconds`` of the daemon's FDB timer (when the tree has one), with ``rate`` frames
        a second of new MACs from a sender thread while ``traffic`` is set."""
        sender = None
        if traffic is not None:
            traffic.set()
            sender = threading.Thread(target=self._send, args=(traffic, rate), daemon=True)
            sender.start()
        before, pauses_before = self.stats(), self.counting.pauses
        spans: list[float] = []
        start = time.monotonic()
        next_tick = start + FDB_TICK_SECONDS
        while time.monotonic() - start < seconds:
            time.sleep(max(0.0, next_tick - time.monotonic()))
            next_tick += FDB_TICK_SECONDS
            if self.self_ageing:
                continue                      # the daemon runs no FDB timer
            began = time.perf_counter()
            Daemon._fdb_tick(host)            # type: ignore[arg-type]  # what it reads of one
            spans.append((time.perf_counter() - began) * 1e6)
        elapsed = time.monotonic() - start
        if traffic is not None and sender is not None:
            traffic.clear()
            sender.join()
        after = self.stats()
        wakeups = (after["wakeups"] + after.get("deadline_wakeups", 0)
                   - before["wakeups"] - before.get("deadline_wakeups", 0))
        return {"wakeups_per_s": wakeups / elapsed,
                "pauses_per_s": (self.counting.pauses - pauses_before) / elapsed,
                "tick_max_us": max(spans, default=0.0),
                "tick_p50_us": statistics.median(spans) if spans else 0.0,
                "step_max_us": after.get("clock_step_max_us", 0.0),
                "entries": self.fw.fdb_size()}

    def _send(self, traffic: threading.Event, rate: int) -> None:
        mac, slice_s = 1 << 30, 0.01
        per_slice = max(1, int(rate * slice_s))
        next_slice = time.monotonic()
        while traffic.is_set():
            for _ in range(per_slice):
                try:
                    self.app.send(frame(mac))
                except BlockingIOError:
                    pass
                mac += 1
            next_slice += slice_s
            time.sleep(max(0.0, next_slice - time.monotonic()))


def measure(seconds: float, macs: int, rate: int) -> dict[str, Any]:
    rig = Rig()
    try:
        host = rig.ageing(IDLE_AGEING_S)
        rig.learn(1, macs)
        time.sleep(0.1)
        idle = rig.run(host, seconds)
        host = rig.ageing(BUSY_AGEING_S)
        busy = rig.run(host, seconds, threading.Event(), rate)
    finally:
        rig.close()
    return {"self_ageing": rig.self_ageing, "idle": idle, "busy": busy}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python3 -m overlayd.bench.switch_tick")
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--macs", type=int, default=1000)
    parser.add_argument("--rate", type=int, default=4000)
    args = parser.parse_args()
    r = measure(args.seconds, args.macs, args.rate)
    idle, busy = r["idle"], r["busy"]
    how = "its own clock step" if r["self_ageing"] else "the daemon's FDB timer"
    stall = max(busy["tick_max_us"], busy["step_max_us"])
    print(f"switched thread, ageing by {how}: idle ({args.macs} MACs, ageing "
          f"{IDLE_AGEING_S:g} s): {idle['wakeups_per_s']:.1f} wake-ups/s, "
          f"{idle['pauses_per_s']:.1f} pauses/s; busy ({args.rate} new MACs/s, ageing "
          f"{BUSY_AGEING_S:g} s, {busy['entries']} entries at the end): "
          f"{busy['pauses_per_s']:.1f} pauses/s, worst stall {stall:.0f} us (tick "
          f"{busy['tick_p50_us']:.0f} us median, {busy['tick_max_us']:.0f} worst; ageing step "
          f"{busy['step_max_us']:.0f} us worst)")


if __name__ == "__main__":
    main()
