"""MAC ageing without the timer's pause: the switched forwarder's clock step ages its own table
(set_ageing; cext/engine.pxi item 10) and gives what age() from a period timer gives.

One scenario (learns from the tap and from peers, refreshes, a full table, probes) runs on:
- the loop engine as the daemon drives it: set_now before each batch, age() every PERIOD from
  a timer (Cython and the pure-Python twin);
- the clock step: set_ageing, then set_now before each batch and whenever age_due comes, as a
  native thread wakes for it (both kernels, on the controllable clock);
- the native thread itself, on its own clock (real time, no set_now, no age()).
Probes lie at least half a unit away from any moment an entry may go, so all five must see the
same tables, per-port counts and fdb counters; on the controllable clock each entry must go
within one period after it got older than MAX_AGE, and the two kernels' histories (what went
when) must be identical.
"""

from __future__ import annotations

import socket
import time
from types import ModuleType
from typing import Any

import pytest
from engine_helpers import drain
from test_vxlan_switch_forwarder import BCAST, SwRig, encap, frame, mac

from overlayd.dataplane import python_kernels
from overlayd.dataplane.tables import LOCAL
from overlayd.runtime.engine import ThreadedForwarder

_dataplane = pytest.importorskip("overlayd._dataplane")

UNIT = 0.4                    # seconds per scenario unit on the real clock
MAX_AGE = 4.0                 # units
PERIOD = 1.0                  # units: the timer's period, and the clock step's
TICK_PHASE = 0.3              # the timer's ticks at k * PERIOD + TICK_PHASE
WAKE = 0.001 / UNIT           # the engine wakes just after age_due (+1 ms)
CAP = 4
DEADLINE = 10.0

# (time in units, op): ("in", mac) from the tap; ("out", peer, mac) from a peer; ("probe",)
SCENARIO: list[tuple[float, tuple[Any, ...]]] = [
    (0.0, ("in", 1)), (0.0, ("in", 2)), (0.0, ("out", 0, 3)),
    (2.0, ("in", 2)), (2.0, ("out", 0, 4)),           # 2 refreshed, 4 fills the table
    (3.0, ("out", 1, 5)),                             # full: fdb_full, not learned
    (3.5, ("probe",)),                                # 1, 3 go in (4, 5]
    (5.5, ("probe",)), (5.5, ("out", 1, 5)),          # room again: learned at 5.5
    (7.5, ("probe",)),                                # 2, 4 went in (6, 7]
    (8.0, ("in", 1)),
    (9.0, ("probe",)),                                # 5 goes in (9.5, 10.5]
    (11.0, ("probe",)),                               # 1 goes in (12, 13]
    (13.5, ("probe",)),
]
PROBES = sum(1 for _, op in SCENARIO if op[0] == "probe")


def snapshot(fwd: Any) -> tuple[Any, ...]:
    c = fwd.counters()
    return (sorted((m, t) for m, t, _, _ in fwd.fdb_entries()), fwd.fdb_size(),
            list(fwd.port_entries()), c["fdb_full"], c["fdb_port_full"])


class LoopDriver:
    """One forwarder on the controllable clock: ``timer`` ages it from a PERIOD timer (the
    loop engine), else its clock step does (set_ageing; set_now also at each age_due)."""

    def __init__(self, kernels: ModuleType, timer: bool, t0: float = 100.0) -> None:
        self.rig = SwRig(kernels, peers=2, cap=CAP)
        self.fwd = self.rig.fwd
        self.timer, self.t0, self.clock = timer, t0, t0
        self.next_tick = t0 + TICK_PHASE * UNIT
        self.removals: list[tuple[float, bytes, float]] = []    # (when, mac, its last seen)
        if not timer:
            self.fwd.set_ageing(MAX_AGE * UNIT, PERIOD * UNIT)
        self.fwd.set_now(t0)

    def _step(self, now: float, age: bool) -> None:
        before = {m: s for m, _, _, s in self.fwd.fdb_entries()}
        self.fwd.set_now(now)
        if age:
            self.fwd.age(now, MAX_AGE * UNIT)
        after = {m for m, _, _, _ in self.fwd.fdb_entries()}
        self.removals += [(now, m, s) for m, s in before.items() if m not in after]

    def at(self, t: float) -> None:
        target = self.t0 + t * UNIT
        while True:
            due = self.next_tick if self.timer else self.fwd.age_due + WAKE * UNIT
            if due > target:
                break
            self._step(due, self.timer)
            self.next_tick += PERIOD * UNIT
        self._step(target, False)

    def inside(self, m: int) -> None:
        self.rig.inside(frame(BCAST, mac(m)))
        self.rig.delivered()
        for i in range(2):
            self.rig.received(i)

    def outside(self, peer: int, m: int) -> None:
        self.rig.outside(peer, encap(frame(BCAST, mac(m))))
        self.rig.delivered()

    def close(self) -> None:
        self.rig.close()


class ThreadDriver:
    """The Cython forwarder on a native thread: its own clock, its own ageing, no call from
    here but the traffic and the reads (the listing pauses it, the counts do not)."""

    def __init__(self) -> None:
        self.rig = SwRig(_dataplane, peers=2, cap=CAP)
        self.rig.app.setblocking(False)
        self.fwd = ThreadedForwarder([self.rig.fwd], [self.rig.dev.fileno()],
                                     [self.rig.local.fileno()], 0)
        self.fwd.set_ageing(MAX_AGE * UNIT, PERIOD * UNIT)
        self.fwd.start()
        self.t0 = time.monotonic()

    def at(self, t: float) -> None:
        time.sleep(max(0.0, self.t0 + t * UNIT - time.monotonic()))

    def _wait(self, name: str, want: int) -> None:
        deadline = time.monotonic() + DEADLINE
        while self.fwd.counters()[name] < want:
            assert time.monotonic() < deadline, f"{name} stays below {want}"
            time.sleep(0.001)

    def inside(self, m: int) -> None:
        want = self.fwd.counters()["inside_packets"] + 1
        self.rig.app.send(frame(BCAST, mac(m)))
        self._wait("inside_packets", want)
        for peer in self.rig.peers:
            drain(peer)

    def outside(self, peer: int, m: int) -> None:
        want = self.fwd.counters()["outside_packets"] + 1
        self.rig.peers[peer].sendto(encap(frame(BCAST, mac(m))), self.rig.local.getsockname())
        self._wait("outside_packets", want)
        self._wait("delivered_packets", 1)
        drain(self.rig.app)

    def close(self) -> None:
        self.fwd.stop()
        self.rig.close()


def run(d: Any) -> list[tuple[Any, ...]]:
    probes = []
    for t, op in SCENARIO:
        d.at(t)
        if op[0] == "in":
            d.inside(op[1])
        elif op[0] == "out":
            d.outside(op[1], op[2])
        else:
            probes.append(snapshot(d.fwd))
    return probes


EXPECTED_MACS = [[1, 2, 3, 4], [2, 4], [5], [1, 5], [1], []]


def check_removals(d: LoopDriver, slack: float) -> None:
    """Each entry went after it got older than MAX_AGE, and within ``slack`` of that."""
    assert d.removals, "nothing aged"
    for when, m, seen in d.removals:
        late = when - (seen + MAX_AGE * UNIT)
        assert 0.0 < late <= slack + 1e-9, (m, when - d.t0, seen - d.t0)


@pytest.mark.parametrize("kernels", [_dataplane, python_kernels], ids=["cython", "python"])
def test_the_clock_step_ages_as_the_timer_does(kernels: ModuleType) -> None:
    results, drivers = {}, {}
    for timer in (True, False):
        d = LoopDriver(kernels, timer)
        try:
            results[timer] = run(d)
        finally:
            d.close()
        drivers[timer] = d
    assert results[True] == results[False]
    got = [[int.from_bytes(m, "big") & 0xFF for m, _ in p[0]] for p in results[True]]
    assert got == EXPECTED_MACS
    assert [p[3] for p in results[True]] == [1] * PROBES          # the one refusal at 3.0
    assert results[True][-1][1:3] == (0, [0, 0, 0])               # counts follow the table
    check_removals(drivers[True], PERIOD * UNIT)                  # the timer's granularity
    check_removals(drivers[False], PERIOD * UNIT + WAKE * UNIT)   # the step's: the same
    # ... and as the timer does, the step keeps learned targets (tap or peer) as they were
    assert {t for p in results[False] for _, t in p[0]} == {LOCAL, 0, 1}


def test_the_twins_age_alike_in_the_clock_step() -> None:
    """Cython and the pure-Python twin, both on the clock step: the same removals at the same
    moments (not just the same probes)."""
    history = {}
    for kernels in (_dataplane, python_kernels):
        d = LoopDriver(kernels, timer=False)
        try:
            probes = run(d)
        finally:
            d.close()
        history[kernels] = (probes, d.removals)
    assert history[_dataplane] == history[python_kernels]


def test_the_native_thread_ages_its_own_table_and_nothing_pauses_it() -> None:
    loop = LoopDriver(_dataplane, timer=True)
    try:
        by_timer = run(loop)
    finally:
        loop.close()
    threads = ThreadDriver()
    try:
        by_thread = run(threads)
        stats = threads.fwd.threads()[0]
        # idle with an empty table: no deadline comes, nothing wakes the thread
        time.sleep(3 * PERIOD * UNIT)
        idle = threads.fwd.threads()[0]
    finally:
        threads.close()
    assert by_thread == by_timer
    # set_ageing came before start; the one pause per probe is its listing (fdb_entries walks
    # the list the thread changes), none is the ageing's
    assert stats["pauses"] == PROBES
    assert stats["deadline_wakeups"] >= 4        # the passes at ~4, 6, 9.5, 12 had no traffic
    assert (idle["wakeups"], idle["deadline_wakeups"]) == (stats["wakeups"],
                                                           stats["deadline_wakeups"])
    assert idle["pauses"] == PROBES


def test_set_ageing_refuses_bad_values() -> None:
    for kernels in (_dataplane, python_kernels):
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            fwd = kernels.VxlanSwitchForwarder(b.fileno(), u.fileno(), 1)
            assert fwd.age_due == float("inf")
            for bad in ((-1.0, 0.5), (300.0, 0.0), (300.0, -1.0), (float("nan"), 0.5)):
                with pytest.raises(ValueError, match="set_ageing"):
                    fwd.set_ageing(*bad)
            fwd.set_ageing(0.0, 0.5)               # off
            assert fwd.age_due == float("inf")
        finally:
            for s in (a, b, u):
                s.close()
