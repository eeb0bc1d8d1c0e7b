"""The MAC ageing benchmark runs and measures what it says (no timing asserted: figures come
from the benchmark itself, python3 -m overlayd.bench.ageing)."""

from __future__ import annotations

from types import ModuleType

from overlayd.bench import ageing


def test_ageing_bench_case_spreads_a_mass_expiry(kernels: ModuleType) -> None:
    """40,000 entries expiring at once take ceil(40000 / AGE_LIMIT) ticks, none larger."""
    figures = ageing.run_case(kernels, 40_000, 65_536, ticks=3)
    assert figures["expiry_ticks"] == -(-40_000 // kernels.AGE_LIMIT)
    assert set(figures) == {"median_us", "worst_us", "expiry_worst_ms", "expiry_ticks"}
    assert 0 < figures["median_us"] <= figures["worst_us"]


def test_ageing_bench_idle_capacity(kernels: ModuleType) -> None:
    figures = ageing.run_case(kernels, 0, 1 << 24, ticks=3)
    assert figures["expiry_ticks"] == 0


def test_both_kernels_bound_a_tick_alike(kernel_pair: tuple[ModuleType, ModuleType]) -> None:
    assert kernel_pair[0].AGE_LIMIT == kernel_pair[1].AGE_LIMIT == 16384
