"""The switched path's MAC table (forwarding database), pure-Python twin of cext/fdb.pxi.

1. Keys are 48-bit MACs as ints; an entry is (target, static, last_seen): target a peer index
   or LOCAL (behind our tap), last_seen the data plane's ``now`` when a frame last came from it.
2. ``learn``: a known MAC moves to the new target at once and is refreshed; a new MAC is added
   unless the table holds ``max_entries`` (then refused: the caller counts fdb_full). Static
   entries are never moved, refreshed, aged or refused.
3. ``age(now, max_age)`` removes every non-static entry with now - last_seen > max_age.
4. ``rebuild`` (table swap): learned entries follow their peer to its new index or go; static
   entries are replaced by the new set.

The twin is a dict; the C table is open addressing with linear probing and backward-shift
deletion. Parity tests hold the two (and a naive oracle) to the same answers.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Final

from overlayd.dataplane.tables import LOCAL

MISS: Final = -2           # lookup of an unknown MAC
MAX_ENTRIES: Final = 1 << 24


def check_max_entries(max_entries: int) -> int:
    if not 1 <= max_entries <= MAX_ENTRIES:
        raise ValueError(f"fdb_max_entries must be 1..{MAX_ENTRIES}, got {max_entries}")
    return max_entries


class Fdb:
    __slots__ = ("_entries", "_max")

    def __init__(self, max_entries: int) -> None:
        self._max = check_max_entries(max_entries)
        self._entries: dict[int, list] = {}     # mac -> [target, static, last_seen]

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, mac: int) -> int:
        entry = self._entries.get(mac)
        return MISS if entry is None else entry[0]

    def learn(self, mac: int, target: int, now: float) -> bool:
        """Hot: False only when ``mac`` is new and the table is full."""
        entry = self._entries.get(mac)
        if entry is not None:
            if not entry[1]:
                entry[0] = target
                entry[2] = now
            return True
        if len(self._entries) >= self._max:
            return False
        self._entries[mac] = [target, False, now]
        return True

    def age(self, now: float, max_age: float) -> int:
        old = [mac for mac, (_, static, seen) in self._entries.items()
               if not static and now - seen > max_age]
        for mac in old:
            del self._entries[mac]
        return len(old)

    def rebuild(self, peer_map: Mapping[int, int], static: Iterable[tuple[int, int]]) -> None:
        kept: dict[int, list] = {}
        for mac, (target, is_static, seen) in self._entries.items():
            if is_static:
                continue
            if target == LOCAL:
                kept[mac] = [target, False, seen]
            elif target in peer_map:
                kept[mac] = [peer_map[target], False, seen]
        for mac, target in static:
            kept[mac] = [target, True, 0.0]
        self._entries = kept

    def entries(self) -> list[tuple[int, int, bool, float]]:
        return sorted((mac, e[0], e[1], e[2]) for mac, e in self._entries.items())
