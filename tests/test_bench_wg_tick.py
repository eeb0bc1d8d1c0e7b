"""The wireguard tick benchmark runs and measures what it says (no timing asserted: figures
come from the benchmark itself, python3 -m overlayd.bench.wg_tick)."""

from __future__ import annotations

import pytest

from overlayd.bench import switch_tick, wg_tick

pytest.importorskip("overlayd._dataplane")


def test_wg_tick_bench_counts_ticks_and_idle_wakeups() -> None:
    figures = wg_tick.measure(threads=2, seconds=0.5)
    assert figures["ticks"] >= 3
    assert 0 < figures["tick_p50_us"] <= figures["tick_p99_us"] <= figures["tick_max_us"]
    # nothing was sent and no keypair falls due: the ticks woke no thread (they paused each
    # one, and so woke it, 10 times a second before the threads kept their own clocks)
    assert figures["wakeups_per_s"] == [0.0, 0.0]
    # status reads (endpoints, sessions) take a seq-counted copy: no pause (main: 2 per read)
    assert figures["status_pauses"] == 0.0


def test_switch_tick_bench_sees_no_timer_and_no_pause() -> None:
    figures = switch_tick.measure(seconds=2.0, macs=200, rate=2000)
    assert figures["self_ageing"]
    idle, busy = figures["idle"], figures["busy"]
    # nothing sent and nothing due within 300 s: the thread slept the whole phase
    assert idle["wakeups_per_s"] == 0.0 and idle["pauses_per_s"] == 0.0
    # new MACs ageing at 1 s: the thread's own passes removed them, and nothing paused it
    assert busy["pauses_per_s"] == 0.0 and busy["tick_max_us"] == 0.0
    assert busy["step_max_us"] > 0.0
    assert busy["entries"] <= 2000 * 1.7      # ~1.5 s of new MACs at most, not the 2 s phase's
