"""Switched ``vxlan`` data path (an L2 switch over a tap device), pure-Python twin of
cext/vxlan_switch.pxi.

The switch has one local port (the tap, behind which a Linux bridge may hold several MACs)
and one port per peer. On the wire: RFC 7348, the VXLAN header with our VNI in front of the
real Ethernet frame; interoperable with a kernel ``vxlan`` device that has flood entries.

Inside (tap -> underlay), per frame:
  1. shorter than an Ethernet header -> inside_runt_frame; a multicast or all-zero source
     MAC -> inside_bad_source_mac (never learned, never sent);
  2. learn source MAC -> LOCAL (a MAC known at a peer moves here at once; at the cap a new
     MAC is refused and counted as fdb_full, the frame still goes);
  3. destination: known LOCAL -> not sent (inside_local_destination); known at a peer -> that
     peer only; broadcast, multicast or unknown -> one copy to every peer (head-end
     replication: flooded_copies; no peer at all -> inside_no_route);
  4. the 8-byte VXLAN header goes into the slot's headroom; every copy shares it and leaves
     from tx socket ``flow_hash % len(tx_fds)``.
Outside (underlay -> tap), per datagram: known peer; VXLAN header (long enough for it and an
Ethernet header, I flag, our VNI); source MAC valid (else outside_bad_source_mac); learn it at
that peer (moves at once, including from LOCAL); a destination known at a peer is not ours
(outside_not_for_us: split horizon, nothing from the overlay goes back into it); else write
the frame into the tap.

Time: the data plane has no clock. ``set_now(now)`` (monotonic seconds, from the runtime's
timer) is what learning stamps entries with; ``age(now, max_age)`` expires them.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from typing import Any, Final

from overlayd.dataplane.fdb import MISS, Fdb
from overlayd.dataplane.forwarder_base import C, ForwarderBase, State
from overlayd.dataplane.tables import LOCAL
from overlayd.dataplane.vxlan_routed import check_vni
from overlayd.wire import ethernet, vxlan

IMPLEMENTATION: Final = "python"
_HDR: Final = vxlan.HEADER_LEN


def _valid_source(mac: int) -> bool:
    return mac != 0 and not (mac >> 40) & 1


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
                 vnet_hdr: bool = False, udp_gso: bool = False, udp_gro: bool = False) -> None:
        self._vni = check_vni(vni)
        self._vxlan_header = vxlan.build_header(self._vni)
        self._fdb = Fdb(operator.index(fdb_max_entries))
        self._max_entries = operator.index(fdb_max_entries)
        self._now = 0.0
        super().__init__(tap_fd, sock_fd, tx_fds, batch_size, vnet_hdr=vnet_hdr,
                         udp_gso=udp_gso, udp_gro=udp_gro)

    # --- control ---------------------------------------------------------------------------

    def set_tables(self, tables: Any) -> None:
        """Swap in new peers and static MACs; learned MACs follow their peer by (ip, port)."""
        state = State(tables)
        static = check_static(getattr(tables, "static_macs", ()), len(state.peer_keys),
                              self._max_entries)
        self._enter()
        try:
            state.inherit_counters(self._state)
            self._fdb.rebuild(state.index_map(self._state), static)
            self._state = state
        finally:
            self._busy = False

    def set_now(self, now: float) -> None:
        self._now = float(now)

    def age(self, now: float, max_age: float) -> int:
        """Remove learned entries not seen for more than ``max_age`` seconds; how many."""
        self._enter()
        try:
            return self._fdb.age(float(now), float(max_age))
        finally:
            self._busy = False

    def fdb_entries(self) -> list[tuple[bytes, int, bool, float]]:
        """(mac, target, static, last_seen) per entry, sorted by MAC."""
        return [(mac.to_bytes(6, "big"), target, static, seen)
                for mac, target, static, seen in self._fdb.entries()]

    def fdb_size(self) -> int:
        return len(self._fdb)

    # --- packet path -----------------------------------------------------------------------

    def _learn(self, mac: int, target: int) -> None:
        if not self._fdb.learn(mac, target, self._now):
            self._counters[C["fdb_full"]] += 1

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
        self._learn(src, LOCAL)
        dst = int.from_bytes(frame[0:6], "big")
        target = MISS if (dst >> 40) & 1 else self._fdb.lookup(dst)
        if target == LOCAL:
            ctr[C["inside_local_destination"]] += 1
            return
        npeers = len(state.peer_keys)
        if target == MISS and npeers == 0:
            ctr[C["inside_no_route"]] += 1
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
        self._learn(src, peer)
        dst = int.from_bytes(frame[0:6], "big")
        if not (dst >> 40) & 1 and self._fdb.lookup(dst) >= 0:
            ctr[C["outside_not_for_us"]] += 1
            return
        self._deliver_to_device(frame, peer)
