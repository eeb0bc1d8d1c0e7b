"""Switched ``vxlan`` data path (an L2 switch over a tap device), pure-Python twin of
cext/vxlan_switch.pxi.

The switch has one local port (the tap, behind which a Linux bridge may hold several MACs)
and one port per peer. On the wire: RFC 7348, the VXLAN header with our VNI in front of the
real Ethernet frame; interoperable with a kernel ``vxlan`` device that has flood entries.

Inside (tap -> underlay), per frame:
  1. shorter than an Ethernet header -> inside_runt_frame; a multicast or all-zero source
     MAC -> inside_bad_source_mac (never learned, never sent);
  2. learn source MAC -> LOCAL (a MAC known at a peer moves here at once; a MAC pinned to a
     peer -> inside_pinned_mac, dropped; at the table's cap or the tap's per-port cap a new MAC
     is refused and counted as fdb_full / fdb_port_full, the frame still goes);
  3. destination: known LOCAL -> not sent (inside_local_destination); known at a peer -> that
     peer only; broadcast, multicast or unknown -> one copy to every peer (head-end
     replication: flooded_copies; no peer at all -> inside_no_route), if the tap's storm
     bucket has a token (else inside_storm_control);
  4. the 8-byte VXLAN header goes into the slot's headroom; every copy shares it and leaves
     from tx socket ``flow_hash % len(tx_fds)``.
Outside (underlay -> tap), per datagram: known peer; VXLAN header (long enough for it and an
Ethernet header, I flag, our VNI); source MAC valid (else outside_bad_source_mac); learn it at
that peer (a MAC pinned elsewhere -> outside_pinned_mac; a MAC seen behind our tap within
``mac_move_hold`` seconds -> outside_mac_move_dampened; both dropped; else it moves at once);
a destination known at a peer is not ours (outside_not_for_us: split horizon, nothing from the
overlay goes back into it); a broadcast, multicast or unknown destination needs a token of
that peer's storm bucket (else outside_storm_control); then write the frame into the tap.

Storm control: one token bucket per port (the tap, each peer) of ``storm_burst`` frames,
refilled at ``storm_rate`` frames per second (0: off), spent by every frame that is flooded
(inside) or delivered without a known destination (outside).

Time: the data plane has no clock. ``set_now(now)`` (monotonic seconds; the runtime calls it
before each batch) is what learning stamps entries with and what refills the storm buckets; a
smaller ``now`` than the last is ignored. ``age(now, max_age, limit)`` expires entries (the
loop engine calls it from a timer). ``set_ageing(max_age, period)`` makes the clock step
(``set_now``; in C also the native engine's own step before each batch) run that age() pass
itself, one per period at most and only once the oldest entry is older than max_age (due:
``age_due``): a data-plane thread ages its own table with no pause (cext/engine.pxi item 10).
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from typing import Any, Final

from overlayd.dataplane.fdb import DAMPENED, FULL, MISS, PINNED, PORT_FULL, Fdb
from overlayd.dataplane.forwarder_base import C, ForwarderBase, State
from overlayd.dataplane.tables import LOCAL
from overlayd.dataplane.vxlan_routed import check_vni
from overlayd.wire import ethernet, vxlan

IMPLEMENTATION: Final = "python"
_HDR: Final = vxlan.HEADER_LEN
AGE_LIMIT: Final = 16384     # entries one age() call removes at most (bounds one tick)
_AGE_NEVER: Final = 1e300    # age_due with nothing to age (the C float's value)


def _valid_source(mac: int) -> bool:
    return mac != 0 and not (mac >> 40) & 1


def check_storm(rate: float, burst: float) -> tuple[float, float]:
    """Storm control's (frames per second per port, bucket size in frames); rate 0 = off."""
    if not 0.0 <= rate <= 1e9:         # also refuses NaN
        raise ValueError(f"storm_rate must be 0..1e9 frames per second, got {rate}")
    if not 1.0 <= burst <= 1e9:
        raise ValueError(f"storm_burst must be 1..1e9 frames, got {burst}")
    return rate, burst


def check_static(static: Any, npeers: int, max_entries: int) -> list[tuple[int, int]]:
    """Validated (mac as int, target) pairs of SwitchTables.static_macs."""
    out: dict[int, int] = {}
    for mac_bytes, target in static:
        mac_bytes, target = bytes(mac_bytes), operator.index(target)
        if len(mac_bytes) != 6:
            raise ValueError(f"static MAC must be 6 bytes, got {len(mac_bytes)}")
        mac = int.from_bytes(mac_bytes, "big")
        text = ethernet.format_mac(mac_bytes)
        if not _valid_source(mac):
            raise ValueError(f"static MAC {text}: not a unicast MAC")
        if not (target == LOCAL or 0 <= target < npeers):
            raise ValueError(f"static MAC {text}: target {target} is neither LOCAL nor a peer "
                             f"index (there are {npeers} peers)")
        if mac in out:
            raise ValueError(f"static MAC {text} given twice")
        out[mac] = target
    if len(out) > max_entries:
        raise ValueError(f"{len(out)} static MACs exceed fdb_max_entries {max_entries}")
    return list(out.items())


class VxlanSwitchForwarder(ForwarderBase):
    """The switched vxlan data path over a tap fd and UDP socket fds, all owned by the caller.

    Drive it from one thread: ``inside_batch``/``outside_batch`` on readiness, ``set_now``
    and ``age`` from a timer, ``set_tables`` (SwitchTables) on map changes.
    """

    _name = "VxlanSwitchForwarder"
    _LINK_HEADER_LEN = ethernet.HEADER_LEN   # tap
    _OUTER_PREFIX = _HDR                     # VXLAN

    def __init__(self, tap_fd: int, sock_fd: int, vni: int = 1, tx_fds: Sequence[int] = (),
                 batch_size: int = 64, fdb_max_entries: int = 16384, *,
                 vnet_hdr: bool = False, udp_gso: bool = False, udp_gro: bool = False,
                 device_uso: bool = False,
                 fdb_port_max_entries: int | None = None, mac_move_hold: float = 0.0,
                 storm_rate: float = 0.0, storm_burst: float = 1.0) -> None:
        self._vni = check_vni(vni)
        self._vxlan_header = vxlan.build_header(self._vni)
        self._max_entries = operator.index(fdb_max_entries)
        port_max = None if fdb_port_max_entries is None else operator.index(fdb_port_max_entries)
        self._fdb = Fdb(self._max_entries, port_max, float(mac_move_hold))
        self._storm_rate, self._storm_burst = check_storm(float(storm_rate), float(storm_burst))
        self._now = 0.0
        self._age_max = 0.0              # the clock step's ageing (set_ageing): 0, off
        self._age_period = 0.0
        self._age_last = -_AGE_NEVER
        self._storm_tokens = [self._storm_burst]   # per port: [tap, peer 0, peer 1, ...]
        self._storm_stamp = [0.0]
        super().__init__(tap_fd, sock_fd, tx_fds, batch_size, vnet_hdr=vnet_hdr,
                         udp_gso=udp_gso, udp_gro=udp_gro,
                         device_uso=device_uso)

    # --- control ---------------------------------------------------------------------------

    def set_tables(self, tables: Any) -> None:
        """Swap in new peers and static MACs; learned MACs follow their peer by (ip, port)."""
        state = State(tables)
        static = check_static(getattr(tables, "static_macs", ()), len(state.peer_keys),
                              self._max_entries)
        self._enter()
        try:
            state.inherit_counters(self._state)
            index_map = state.index_map(self._state)
            npeers = len(state.peer_keys)
            self._fdb.rebuild(index_map, static, npeers)
            # Storm buckets follow their peer like its counters; a new peer starts full.
            tokens = [self._storm_burst] * (npeers + 1)
            stamps = [self._now] * (npeers + 1)
            for old, new in [(-1, -1), *index_map.items()]:
                tokens[new + 1] = self._storm_tokens[old + 1]
                stamps[new + 1] = self._storm_stamp[old + 1]
            self._storm_tokens, self._storm_stamp = tokens, stamps
            self._state = state
        finally:
            self._busy = False

    def set_now(self, now: float) -> None:
        """The data plane's clock (monotonic seconds); a value below the last one is ignored.
        After set_ageing, also the ageing pass when one is due."""
        now = float(now)
        self._now = max(self._now, now)
        if self._now >= self._age_due():
            self._age_last = self._now
            self._fdb.age(self._now, self._age_max, AGE_LIMIT)

    def set_ageing(self, max_age: float, period: float) -> None:
        """Let the clock step age the table: what age(now, max_age) every ``period`` seconds
        does, in the step itself; max_age 0 turns it off."""
        max_age, period = float(max_age), float(period)
        if not (max_age == 0.0 or 0.0 < max_age <= 1e9) or not 0.0 < period <= 3600.0:
            raise ValueError(f"set_ageing: max_age 0 or 0..1e9 s and period 0..3600 s, got "
                             f"{max_age}, {period}")
        self._age_max, self._age_period, self._age_last = max_age, period, -_AGE_NEVER

    @property
    def age_due(self) -> float:
        """When the clock step's next ageing pass is due (inf: none is)."""
        due = self._age_due()
        return float("inf") if due >= _AGE_NEVER else due

    def _age_due(self) -> float:
        # The only moment a pass could remove anything is when the oldest entry passes max_age;
        # never sooner than a period after the last pass (what a timer of that period gives).
        oldest = self._fdb.oldest_seen()
        if self._age_max <= 0.0 or oldest is None:
            return _AGE_NEVER
        return max(self._age_last + self._age_period, oldest + self._age_max)

    def age(self, now: float, max_age: float, limit: int = AGE_LIMIT) -> int:
        """Remove learned entries not seen for more than ``max_age`` seconds, oldest first and
        at most ``limit`` of them (the rest go at the next call); how many."""
        limit = operator.index(limit)
        if limit < 0:
            raise ValueError(f"limit must be >= 0, got {limit}")
        self._enter()
        try:
            return self._fdb.age(float(now), float(max_age), limit)
        finally:
            self._busy = False

    def port_entries(self) -> list[int]:
        """Learned MACs per port: [behind the tap, peer 0, peer 1, ...]."""
        return self._fdb.port_entries()

    def fdb_entries(self) -> list[tuple[bytes, int, bool, float]]:
        """(mac, target, static, last_seen) per entry, sorted by MAC."""
        return [(mac.to_bytes(6, "big"), target, static, seen)
                for mac, target, static, seen in self._fdb.entries()]

    def fdb_size(self) -> int:
        return len(self._fdb)

    # --- packet path -----------------------------------------------------------------------

    def _learn(self, mac: int, target: int) -> bool:
        """Hot: learn a frame's source; False when the frame must be dropped (counted)."""
        code = self._fdb.learn(mac, target, self._now)
        if code == FULL:
            self._counters[C["fdb_full"]] += 1
        elif code == PORT_FULL:
            self._counters[C["fdb_port_full"]] += 1
        elif code == PINNED:
            self._counters[C["inside_pinned_mac" if target < 0 else "outside_pinned_mac"]] += 1
            return False
        elif code == DAMPENED:
            self._counters[C["outside_mac_move_dampened"]] += 1
            return False
        return True

    def _storm_take(self, port: int) -> bool:
        """Hot: spend one token of ``port``'s storm bucket (port = target + 1); False if empty."""
        if self._storm_rate <= 0.0:
            return True
        now = self._now
        tokens = self._storm_tokens[port]
        if now > self._storm_stamp[port]:
            tokens = min(self._storm_burst,
                         tokens + (now - self._storm_stamp[port]) * self._storm_rate)
            self._storm_stamp[port] = now
        if tokens >= 1.0:
            self._storm_tokens[port] = tokens - 1.0
            return True
        self._storm_tokens[port] = tokens
        return False

    def _inside_one(self, state: State, buf: memoryview, start: int, length: int) -> None:
        """Hot: learn the frame's source, then send it to its peer, to all peers or nowhere."""
        ctr = self._counters
        ctr[C["inside_packets"]] += 1
        ctr[C["inside_bytes"]] += length
        if length < ethernet.HEADER_LEN:
            ctr[C["inside_runt_frame"]] += 1
            return
        frame = buf[start:start + length]
        src = int.from_bytes(frame[6:12], "big")
        if not _valid_source(src):
            ctr[C["inside_bad_source_mac"]] += 1
            return
        if not self._learn(src, LOCAL):
            return
        dst = int.from_bytes(frame[0:6], "big")
        target = MISS if (dst >> 40) & 1 else self._fdb.lookup(dst, self._now)
        if target == LOCAL:
            ctr[C["inside_local_destination"]] += 1
            return
        npeers = len(state.peer_keys)
        if target == MISS:
            if npeers == 0:
                ctr[C["inside_no_route"]] += 1
                return
            if not self._storm_take(0):
                ctr[C["inside_storm_control"]] += 1
                return
        buf[start - _HDR:start] = self._vxlan_header
        end = start + length
        nsocks = len(self._queues)
        sock = vxlan.flow_hash_frame(frame) % nsocks if nsocks > 1 else 0
        if self._capture_on:
            self._capture(0, max(target, -1), frame)
        if target >= 0:
            self._queue(state, buf, start - _HDR, end, target, sock)
            return
        ctr[C["flooded_frames"]] += 1
        ctr[C["flooded_copies"]] += npeers
        for peer in range(npeers):
            self._queue(state, buf, start - _HDR, end, peer, sock)

    def _outside_one(self, state: State, pkt: memoryview, flags: int, address: object) -> None:
        """Hot: check the VXLAN header, learn the inner source, deliver unless split horizon."""
        peer, frame = self._outside_vxlan(state, pkt, flags, address, self._vni)
        if frame is None:
            return
        ctr = self._counters
        src = int.from_bytes(frame[6:12], "big")
        if not _valid_source(src):
            ctr[C["outside_bad_source_mac"]] += 1
            return
        if not self._learn(src, peer):
            return
        dst = int.from_bytes(frame[0:6], "big")
        target = MISS if (dst >> 40) & 1 else self._fdb.lookup(dst, self._now)
        if target >= 0:
            ctr[C["outside_not_for_us"]] += 1
            return
        if target == MISS and not self._storm_take(peer + 1):
            ctr[C["outside_storm_control"]] += 1
            return
        self._deliver_to_device(frame, peer)
