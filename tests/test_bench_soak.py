"""The soak benchmark's verdict logic, on synthetic RSS series (no namespaces, no root): the
verdict is the soak's whole output, so what counts as growth must be pinned down here."""

from __future__ import annotations

import fcntl
import math
from pathlib import Path

from overlayd.bench.soak import Sample, _flock_held, analyse, slope_per_minute

TOL_KIB, MAX_SLOPE = 1024, 100.0


def series(rss_at: dict[str, object], minutes: float = 10, interval: float = 5) -> list[Sample]:
    """Samples every ``interval`` s; rss_at maps daemon name -> function(t_s) -> KiB."""
    out = []
    for k in range(int(minutes * 60 / interval) + 1):
        t = k * interval
        rss = {n: int(f(t)) for n, f in rss_at.items()}  # type: ignore[operator]
        out.append(Sample(t, "tcp", rss, {n: v + 500 for n, v in rss.items()},
                          {n: 50.0 for n in rss}))
    return out


def test_slope_of_a_line_in_units_per_minute() -> None:
    assert math.isclose(slope_per_minute([(t, 1000 + 2 * t) for t in range(0, 300, 5)]), 120.0)
    assert math.isnan(slope_per_minute([(0, 1)]))
    assert math.isnan(slope_per_minute([(3, 1), (3, 2)]))


def test_flat_with_allocator_jitter_is_no_growth() -> None:
    jitter = [0, 300, -200, 150, -100, 250]
    samples = series({"a": lambda t: 40_000 + jitter[int(t / 5) % 6],
                      "b": lambda t: 38_000})
    r = analyse(samples, 60, TOL_KIB, MAX_SLOPE)
    assert r["verdict"] == "no growth"
    assert r["daemons"]["b"]["delta_kib"] == 0 and r["daemons"]["b"]["slope_kib_per_min"] == 0
    assert r["post_warmup_samples"] == 109


def test_growth_during_warmup_only_is_not_counted() -> None:
    # arenas and buffers fill in the first minute: 20 MiB, then flat
    r = analyse(series({"a": lambda t: 30_000 + min(t, 60) * 350}), 60, TOL_KIB, MAX_SLOPE)
    assert r["verdict"] == "no growth"
    assert r["daemons"]["a"]["rss_max_kib"] == 30_000 + 60 * 350
    assert r["daemons"]["a"]["rss_start_kib"] == r["daemons"]["a"]["rss_end_kib"]


def test_steady_leak_in_one_daemon_is_growth() -> None:
    r = analyse(series({"a": lambda t: 40_000, "b": lambda t: 40_000 + t * 150 / 60}),
                60, TOL_KIB, MAX_SLOPE)
    assert r["daemons"]["a"]["verdict"] == "no growth"
    assert r["daemons"]["b"]["verdict"] == "growth"
    assert math.isclose(r["daemons"]["b"]["slope_kib_per_min"], 150, rel_tol=0.01)
    assert r["verdict"] == "growth"


def test_slope_alone_flags_a_leak_whose_end_sample_dips() -> None:
    # 120 KiB/min over 9 minutes, but the last sample falls back near the start: the net change
    # is within tolerance, the trend is not
    def rss(t: float) -> float:
        return 40_000 if t == 600 else 40_000 + t * 2
    r = analyse(series({"a": rss}), 60, TOL_KIB, MAX_SLOPE)
    assert r["daemons"]["a"]["delta_kib"] <= TOL_KIB
    assert r["verdict"] == "growth"


def test_one_step_larger_than_tolerance_is_growth() -> None:
    r = analyse(series({"a": lambda t: 40_000 + (2048 if t >= 590 else 0)}), 60, TOL_KIB,
                MAX_SLOPE)
    assert r["daemons"]["a"]["delta_kib"] == 2048
    assert r["verdict"] == "growth"


def test_too_few_samples_after_warmup_gives_no_verdict() -> None:
    r = analyse(series({"a": lambda t: 1}, minutes=1, interval=30), 60, TOL_KIB, MAX_SLOPE)
    assert r["verdict"] == "insufficient samples"
    assert analyse([], 60, TOL_KIB, MAX_SLOPE)["verdict"] == "insufficient samples"


def test_flock_held_reads_proc_locks(tmp_path: Path) -> None:
    lock = tmp_path / ".lock"
    lock.write_text("")
    assert not _flock_held(lock)
    with open(lock) as f:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert _flock_held(lock)
    assert not _flock_held(lock)
