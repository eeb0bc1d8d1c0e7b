"""The daemon's periodic tasks keep one timer handle each, however long they run.

A 10-minute soak (overlayd/bench/soak.py) once showed RSS growing ~150 KiB a minute: every tick
appended its next handle to a list that was never pruned. This pins the fix.
"""

from __future__ import annotations

import asyncio

from overlayd.runtime.daemon import Daemon


def test_periodic_tasks_hold_one_handle_each() -> None:
    loop = asyncio.new_event_loop()
    daemon = Daemon.__new__(Daemon)     # only the timer machinery is exercised
    daemon._loop = loop
    daemon._timers = {}
    daemon.last_loop_tick = 0.0
    ticks = {"fast": 0, "slow": 0}

    def fast() -> None:
        ticks["fast"] += 1

    def slow() -> None:
        ticks["slow"] += 1

    try:
        daemon._every(0.001, fast)
        daemon._every(0.005, slow)
        loop.run_until_complete(asyncio.sleep(0.2))
    finally:
        for handle in daemon._timers.values():
            handle.cancel()
        loop.close()
    assert ticks["fast"] > 20 and ticks["slow"] > 5, ticks
    assert sorted(daemon._timers) == ["fast", "slow"]
    assert daemon.last_loop_tick > 0
