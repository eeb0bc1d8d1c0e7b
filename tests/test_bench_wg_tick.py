"""The wireguard tick benchmark runs and measures what it says (no timing asserted: figures
come from the benchmark itself, python3 -m overlayd.bench.wg_tick)."""

from __future__ import annotations

import pytest

from overlayd.bench import wg_tick

pytest.importorskip("overlayd._dataplane")


def test_wg_tick_bench_counts_ticks_and_idle_wakeups() -> None:
    figures = wg_tick.measure(threads=2, seconds=0.5)
    assert figures["ticks"] >= 3
    assert 0 < figures["tick_p50_us"] <= figures["tick_p99_us"] <= figures["tick_max_us"]
    # nothing was sent and no keypair falls due: the ticks woke no thread (they paused each
    # one, and so woke it, 10 times a second before the threads kept their own clocks)
    assert figures["wakeups_per_s"] == [0.0, 0.0]
