"""RouteTable (both implementations) against a naive linear-scan oracle."""

from __future__ import annotations

import random
from types import ModuleType

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from overlayd.dataplane.tables import LOCAL, NO_ROUTE
from overlayd.wire.ipv4 import addr_to_int, prefix_mask

A = addr_to_int
FIXTURE_OK = [HealthCheck.function_scoped_fixture]   # ``kernels`` is a module: safe to share


def oracle(routes: list[tuple[int, int, int]], addr: int) -> int:
    """Longest matching prefix by scanning every route."""
    best_len, best_target = -1, NO_ROUTE
    for network, length, target in routes:
        if (addr & prefix_mask(length)) == network and length > best_len:
            best_len, best_target = length, target
    return best_target


@st.composite
def route_sets(draw: st.DrawFn) -> list[tuple[int, int, int]]:
    """Mixed-length prefixes, biased to nest inside each other so LPM has work to do."""
    count = draw(st.integers(0, 40))
    routes: dict[tuple[int, int], int] = {}
    bases = [draw(st.integers(0, 2**32 - 1)) for _ in range(draw(st.integers(1, 4)))]
    for _ in range(count):
        length = draw(st.integers(0, 32))
        if draw(st.booleans()):
            base = draw(st.sampled_from(bases))            # nested around a few addresses
        else:
            base = draw(st.integers(0, 2**32 - 1))
        network = base & prefix_mask(length)
        routes[(network, length)] = draw(st.integers(-1, 50))
    return [(n, length, t) for (n, length), t in routes.items()]


def boundary_addresses(routes: list[tuple[int, int, int]]) -> list[int]:
    out = {0, 2**32 - 1}
    for network, length, _ in routes:
        last = network | (~prefix_mask(length) & 0xFFFFFFFF)
        for addr in (network, last, network - 1, last + 1, (network + last) // 2):
            if 0 <= addr <= 0xFFFFFFFF:
                out.add(addr)
    return sorted(out)


@settings(max_examples=250, deadline=None, suppress_health_check=FIXTURE_OK)
@given(routes=route_sets(), probes=st.lists(st.integers(0, 2**32 - 1), max_size=30))
def test_lookup_matches_oracle(kernels: ModuleType, routes: list[tuple[int, int, int]],
                               probes: list[int]) -> None:
    table = kernels.RouteTable(routes)
    assert len(table) == len(routes)
    for addr in probes + boundary_addresses(routes):
        assert table.lookup(addr) == oracle(routes, addr), hex(addr)


def test_basic(kernels: ModuleType) -> None:
    table = kernels.RouteTable([
        (A("10.0.0.0"), 8, 1), (A("10.1.0.0"), 16, 2), (A("10.1.2.0"), 24, LOCAL),
        (A("10.1.2.3"), 32, 7),
    ])
    assert table.lookup(A("10.1.2.3")) == 7
    assert table.lookup(A("10.1.2.4")) == LOCAL
    assert table.lookup(A("10.1.3.4")) == 2
    assert table.lookup(A("10.200.3.4")) == 1
    assert table.lookup(A("11.0.0.0")) == NO_ROUTE
    assert table.lookup(A("9.255.255.255")) == NO_ROUTE
    assert len(table) == 4


def test_empty_and_default(kernels: ModuleType) -> None:
    empty = kernels.RouteTable([])
    assert len(empty) == 0
    assert empty.lookup(0) == empty.lookup(0xFFFFFFFF) == NO_ROUTE
    default = kernels.RouteTable(iter([(0, 0, 3)]))          # any iterable, even a generator
    assert default.lookup(0) == default.lookup(0xFFFFFFFF) == 3


def test_ten_thousand_routes(kernels: ModuleType) -> None:
    rng = random.Random(1234)
    routes: dict[tuple[int, int], int] = {}
    # A realistic map: 10.0.0.0/8 cut into /24 node subnets, plus assorted other lengths.
    for i in range(10_000):
        routes[(A("10.0.0.0") + (i << 8), 24)] = i % 500
    while len(routes) < 12_000:
        length = rng.randint(0, 32)
        network = rng.getrandbits(32) & prefix_mask(length)
        routes[(network, length)] = rng.randint(-1, 499)
    route_list = [(n, length, t) for (n, length), t in routes.items()]
    table = kernels.RouteTable(route_list)
    assert len(table) == len(route_list)
    # The oracle is slow over 12k routes; check a sample, and every /24 exactly by construction.
    for _ in range(150):
        addr = rng.getrandbits(32) if rng.random() < 0.5 else A("10.0.0.0") + rng.getrandbits(24)
        assert table.lookup(addr) == oracle(route_list, addr)
    longer = {(n, length) for n, length, _ in route_list if length > 24}
    for i in range(0, 10_000, 37):
        addr = A("10.0.0.0") + (i << 8) + 77
        if not any((addr & prefix_mask(length)) == n for n, length in longer):
            assert table.lookup(addr) == i % 500


@pytest.mark.parametrize(("routes", "message"), [
    ([(A("10.0.0.0"), 33, 0)], "prefix length"),
    ([(A("10.0.0.0"), -1, 0)], "prefix length"),
    ([(A("10.0.0.1"), 24, 0)], "host bits"),
    ([(A("10.0.0.0"), 0, 0)], "host bits"),
    ([(A("10.0.0.0"), 24, -2)], "target"),
    ([(A("10.0.0.0"), 24, -100)], "target"),
    ([(A("10.0.0.0"), 24, 2**31)], "target"),
    ([(A("10.0.0.0"), 24, 0), (A("10.0.0.0"), 24, 1)], "duplicate"),
    ([(2**32, 24, 0)], "u32"),
    ([(-256, 24, 0)], "u32"),
])
def test_errors(kernels: ModuleType, routes: list[tuple[int, int, int]], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        kernels.RouteTable(routes)


def test_same_network_different_lengths_is_not_duplicate(kernels: ModuleType) -> None:
    table = kernels.RouteTable([(A("10.0.0.0"), 8, 0), (A("10.0.0.0"), 16, 1)])
    assert table.lookup(A("10.0.5.5")) == 1
    assert table.lookup(A("10.5.5.5")) == 0


def test_lookup_rejects_non_u32(kernels: ModuleType) -> None:
    table = kernels.RouteTable([(0, 0, 0)])
    with pytest.raises(OverflowError):
        table.lookup(2**32)
    with pytest.raises(OverflowError):
        table.lookup(-1)


def test_non_integer_fields_rejected(kernels: ModuleType) -> None:
    with pytest.raises(TypeError):
        kernels.RouteTable([(A("10.0.0.0"), 24.0, 0)])
    with pytest.raises((TypeError, ValueError)):
        kernels.RouteTable([(A("10.0.0.0"), 24)])
