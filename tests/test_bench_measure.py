"""The benchmark's machine-wide CPU reading (/proc/stat) against a known load: this process
spinning on one CPU for a bounded time."""

from __future__ import annotations

import os
import time

from overlayd.bench.measure import machine_busy_seconds


def test_machine_busy_seconds_sees_a_spinning_cpu() -> None:
    spin = 0.4
    before, started = machine_busy_seconds(), time.monotonic()
    while time.monotonic() - started < spin:    # bounded: 0.4 s of one CPU busy in user mode
        pass
    busy = machine_busy_seconds() - before
    elapsed = time.monotonic() - started
    # Our own spin is busy time whatever else runs (two jiffies of slack for the edges) ...
    assert busy >= spin - 0.02, busy
    # ... and no machine has more busy CPU seconds than CPUs x wall time.
    assert busy <= (os.cpu_count() or 1) * elapsed + 0.02, busy
