"""The switched path's MAC table (forwarding database), pure-Python twin of cext/fdb.pxi.

1. Keys are 48-bit MACs as ints. A learned entry is [target, last_seen, pending]: target a peer
   index or LOCAL (behind our tap), last_seen the data plane's ``now`` when a frame last came
   from it there, pending a peer the MAC is waiting to move to (NO_PENDING if none). A static
   entry (pinned: a node's own VTEP MAC from the map, or a ``static_macs`` entry of the
   config) is just its target.
2. ``learn`` answers with a code (LEARNED, FULL, PORT_FULL, PINNED, DAMPENED):
   - a pinned MAC is never learned: from its own port nothing happens, from any other port
     the frame is refused (PINNED; the caller drops and counts it);
   - a MAC seen behind our tap less than ``move_hold`` seconds ago does not move to a peer on
     one frame (DAMPENED; dropped and counted): the peer is remembered as pending, and the
     move happens once the MAC has been quiet locally for ``move_hold`` (at the next frame
     from that peer, or at the next lookup of the MAC); a local frame cancels it;
   - other moves happen at once (from a peer to LOCAL, between peers) and refresh the entry;
   - a new MAC is refused when the table holds ``max_entries`` (FULL) or its port already has
     ``port_max_entries`` learned MACs (PORT_FULL); a move into a full port is refused too.
     The frame still goes; the caller counts fdb_full / fdb_port_full.
3. Ageing costs what expires, not what the table holds: learned entries are kept in order of
   last_seen (a refresh at a new ``now`` moves one to the end), so ``age`` pops the oldest
   while they are older than max_age, at most ``limit`` per call. ``now`` never goes back
   (the forwarder ignores a smaller one), which is what keeps the order sorted.
4. ``rebuild`` (table swap): learned entries follow their peer to its new index or go
   (pending moves too); static entries are replaced by the new set; a MAC that becomes
   static stops being learned.

The twin is an OrderedDict; the C table is open addressing with linear probing, backward-shift
deletion and the same order as an intrusive list. Parity tests hold the two (and a naive
oracle) to the same answers.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Mapping
from typing import Final

from overlayd.dataplane.tables import LOCAL

MISS: Final = -2           # lookup of an unknown MAC
NO_PENDING: Final = -2     # a learned entry with no move waiting
MAX_ENTRIES: Final = 1 << 24

# learn() answers
LEARNED: Final = 0         # learned, refreshed, moved, or a pinned MAC from its own port
FULL: Final = 1            # new MAC, table at max_entries: not learned, the frame goes
PORT_FULL: Final = 2       # its port holds port_max_entries learned MACs: not learned/moved
PINNED: Final = 3          # a pinned MAC from another port: drop the frame
DAMPENED: Final = 4        # a MAC live behind our tap, claimed by a peer: drop the frame


def check_max_entries(max_entries: int) -> int:
    if not 1 <= max_entries <= MAX_ENTRIES:
        raise ValueError(f"fdb_max_entries must be 1..{MAX_ENTRIES}, got {max_entries}")
    return max_entries


def check_policy(max_entries: int, port_max_entries: int | None,
                 move_hold: float) -> tuple[int, float]:
    """(port cap, hold) validated; a port cap of None means max_entries (no per-port cap)."""
    port_max = max_entries if port_max_entries is None else port_max_entries
    if not 1 <= port_max <= max_entries:
        raise ValueError(f"fdb_port_max_entries must be 1..{max_entries}, got {port_max}")
    if not 0.0 <= move_hold <= 3600.0:     # also refuses NaN
        raise ValueError(f"mac_move_hold must be 0..3600 seconds, got {move_hold}")
    return port_max, move_hold


class Fdb:
    __slots__ = ("_hold", "_learned", "_max", "_port_macs", "_port_max", "_static")

    def __init__(self, max_entries: int, port_max_entries: int | None = None,
                 move_hold: float = 0.0) -> None:
        self._max = check_max_entries(max_entries)
        self._port_max, self._hold = check_policy(max_entries, port_max_entries, move_hold)
        # mac -> [target, last_seen, pending], oldest last_seen first
        self._learned: OrderedDict[int, list] = OrderedDict()
        self._static: dict[int, int] = {}
        self._port_macs: list[int] = [0]     # learned MACs per port, at index target + 1

    def __len__(self) -> int:
        return len(self._learned) + len(self._static)

    def lookup(self, mac: int, now: float) -> int:
        """Hot: the MAC's target, or MISS. A pending move whose hold is over happens here."""
        entry = self._learned.get(mac)
        if entry is None:
            return self._static.get(mac, MISS)
        if entry[2] != NO_PENDING and now - entry[1] >= self._hold:
            self._move(entry, entry[2])
        return entry[0]

    def _move(self, entry: list, target: int) -> bool:
        if self._port_macs[target + 1] >= self._port_max:
            return False
        self._port_macs[entry[0] + 1] -= 1
        self._port_macs[target + 1] += 1
        entry[0] = target
        entry[2] = NO_PENDING
        return True

    def learn(self, mac: int, target: int, now: float) -> int:
        """Hot: a frame from ``target`` has source ``mac``; one of the codes above."""
        entry = self._learned.get(mac)
        if entry is None:
            pinned = self._static.get(mac)
            if pinned is not None:
                return LEARNED if pinned == target else PINNED
            if len(self) >= self._max:
                return FULL
            if self._port_macs[target + 1] >= self._port_max:
                return PORT_FULL
            self._learned[mac] = [target, now, NO_PENDING]
            self._port_macs[target + 1] += 1
            return LEARNED
        if entry[0] != target:
            if entry[0] == LOCAL and now - entry[1] < self._hold:
                entry[2] = target
                return DAMPENED
            if not self._move(entry, target):
                return PORT_FULL
        entry[2] = NO_PENDING
        if entry[1] != now:
            entry[1] = now
            self._learned.move_to_end(mac)
        return LEARNED

    def oldest_seen(self) -> float | None:
        """The last_seen of the oldest learned entry (the next to age), None if none."""
        return next(iter(self._learned.values()))[1] if self._learned else None

    def age(self, now: float, max_age: float, limit: int) -> int:
        """Remove up to ``limit`` learned entries with now - last_seen > max_age, oldest first."""
        learned, removed = self._learned, 0
        while learned and removed < limit:
            mac, entry = next(iter(learned.items()))
            if not now - entry[1] > max_age:
                break
            del learned[mac]
            self._port_macs[entry[0] + 1] -= 1
            removed += 1
        return removed

    def rebuild(self, peer_map: Mapping[int, int], static: Iterable[tuple[int, int]],
                npeers: int) -> None:
        self._static = dict(static)
        self._port_macs = [0] * (npeers + 1)
        kept: OrderedDict[int, list] = OrderedDict()
        for mac, (target, seen, pending) in self._learned.items():
            if mac in self._static:
                continue
            if target != LOCAL:
                target = peer_map.get(target, MISS)
                if target == MISS:
                    continue
            kept[mac] = [target, seen, peer_map.get(pending, NO_PENDING)]
            self._port_macs[target + 1] += 1
        self._learned = kept

    def port_entries(self) -> list[int]:
        """Learned MACs per port: [LOCAL, peer 0, peer 1, ...]."""
        return list(self._port_macs)

    def entries(self) -> list[tuple[int, int, bool, float]]:
        return sorted([(mac, e[0], False, e[1]) for mac, e in self._learned.items()]
                      + [(mac, target, True, 0.0) for mac, target in self._static.items()])
