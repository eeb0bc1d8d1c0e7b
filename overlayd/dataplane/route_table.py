"""Longest-prefix-match route table, pure-Python twin of the Cython ``RouteTable``.

1. Build: validate every (network, prefix_len, target); group the networks by prefix length in
   one dict per length; keep the present lengths sorted longest first.
2. Lookup: for each present length, longest first, mask the address and probe that length's
   dict; the first hit is the longest match. At most 33 dict probes, no allocation per probe
   beyond Python's own ints.

Invariants: the table is immutable after construction (a map change builds a new table), no two
routes share (network, prefix_len), and no network has host bits set.

The algorithm deliberately differs from the Cython kernel (sorted arrays + binary search), so a
parity test between the two also checks each one against an independent implementation.
"""

from __future__ import annotations

import operator
from collections.abc import Iterable
from typing import Final

from overlayd.dataplane.tables import LOCAL, NO_ROUTE
from overlayd.wire.ipv4 import int_to_addr, prefix_mask

MAX_TARGET: Final = 2**31 - 1   # targets are int32 in the C table; the twin keeps the same domain


def validate_route(network: int, prefix_len: int, target: int) -> None:
    """ValueError naming the problem if (network, prefix_len, target) is not a valid route."""
    if not 0 <= prefix_len <= 32:
        raise ValueError(f"route {network!r}/{prefix_len!r}: prefix length must be 0..32")
    if not 0 <= network <= 0xFFFFFFFF:
        raise ValueError(f"route {network!r}/{prefix_len}: network must be a u32 IPv4 address")
    if network & ~prefix_mask(prefix_len) & 0xFFFFFFFF:
        raise ValueError(
            f"route {int_to_addr(network)}/{prefix_len}: host bits set "
            f"(did you mean {int_to_addr(network & prefix_mask(prefix_len))}/{prefix_len}?)"
        )
    if target < LOCAL:
        raise ValueError(
            f"route {int_to_addr(network)}/{prefix_len}: target {target} is neither a peer "
            f"index (>= 0) nor LOCAL ({LOCAL})"
        )
    if target > MAX_TARGET:
        raise ValueError(f"route {int_to_addr(network)}/{prefix_len}: target {target} too large")


class RouteTable:
    """Immutable LPM table: ``lookup(addr)`` -> peer index, LOCAL (-1) or NO_ROUTE (-2)."""

    __slots__ = ("_by_length", "_size")

    def __init__(self, routes: Iterable[tuple[int, int, int]]) -> None:
        by_length: dict[int, dict[int, int]] = {}
        size = 0
        for route in routes:
            network, prefix_len, target = (operator.index(v) for v in route)
            validate_route(network, prefix_len, target)
            level = by_length.setdefault(prefix_len, {})
            if network in level:
                raise ValueError(f"duplicate route {int_to_addr(network)}/{prefix_len}")
            level[network] = target
            size += 1
        self._by_length: tuple[tuple[int, dict[int, int]], ...] = tuple(
            (prefix_mask(length), by_length[length]) for length in sorted(by_length, reverse=True)
        )
        self._size = size

    def lookup(self, addr: int) -> int:
        """Target of the longest prefix containing ``addr`` (u32), or NO_ROUTE."""
        if not 0 <= addr <= 0xFFFFFFFF:
            raise OverflowError(f"address {addr!r} is not a u32")  # as the C uint32_t argument
        for mask, level in self._by_length:
            target = level.get(addr & mask)
            if target is not None:
                return target
        return NO_ROUTE

    def check_targets(self, npeers: int) -> None:
        """ValueError naming the first route whose target is not LOCAL or a peer index below
        ``npeers``. It reads the table lookups read, so no route can slip past it however the
        table was built (an iterator of routes is consumed by the build)."""
        for mask, level in self._by_length:
            length = 32 - (~mask & 0xFFFFFFFF).bit_length()
            for network, target in level.items():
                if target >= npeers:
                    raise ValueError(
                        f"route {int_to_addr(network)}/{length}: target {target} is not a "
                        f"peer index (there are {npeers} peers)"
                    )

    def __len__(self) -> int:
        return self._size

    def __repr__(self) -> str:
        return f"<RouteTable python: {self._size} routes>"
