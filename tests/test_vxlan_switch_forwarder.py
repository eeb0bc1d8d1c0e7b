"""VxlanSwitchForwarder and its FDB, both implementations, over real sockets and without root.

The "tap" is an AF_UNIX datagram socketpair (one read = one frame), the underlay UDP sockets
on loopback (node 127.0.0.2, peer i on 127.0.0.(3+i), a stranger on .99). Learning, flooding,
split horizon, moves, ageing, the cap and static entries are checked directly, then against a
naive oracle on random operation sequences, and the two kernels against each other.
"""

from __future__ import annotations

import select
import socket
import struct
import time
from collections.abc import Iterator
from types import ModuleType
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.l2 import Ether
from scapy.layers.vxlan import VXLAN
from test_forwarder import (
    FIXTURE_OK,
    NODE_IP,
    STRANGER_IP,
    Rig,
    device_pair,
    nonzero,
    peer_ip,
    udp_socket,
)

from overlayd.dataplane.counters import DROP_REASONS
from overlayd.dataplane.tables import LOCAL, PeerEntry, SwitchTables
from overlayd.wire import vxlan

VNI = 4242
POOL = 2
BCAST = b"\xff" * 6
MCAST = bytes.fromhex("01005e000001")


def mac(n: int) -> bytes:
    return bytes.fromhex(f"0200000000{n:02x}")


def frame(dst: bytes, src: bytes, payload: bytes = b"payload", ethertype: int = 0x0806) -> bytes:
    return dst + src + struct.pack("!H", ethertype) + payload


def encap(data: bytes, *, vni: int = VNI, flags: int = 0x08) -> bytes:
    return struct.pack("!BBHI", flags, 0, 0, vni << 8) + data


class SwRig(Rig):
    def __init__(self, kernels: ModuleType, *, peers: int = 3, pool: int = POOL,
                 batch_size: int = 64, cap: int = 16384,
                 static: tuple[tuple[bytes, int], ...] = (), **policy: Any) -> None:
        self.app, self.dev = device_pair()
        self.local = udp_socket(NODE_IP)
        self.tx = [udp_socket(NODE_IP) for _ in range(pool)]
        self.peers = [udp_socket(peer_ip(i)) for i in range(peers)]
        self.stranger = udp_socket(STRANGER_IP)
        self.fwd = kernels.VxlanSwitchForwarder(self.dev.fileno(), self.local.fileno(), VNI,
                                                [s.fileno() for s in self.tx], batch_size, cap,
                                                **policy)
        self.fwd.set_tables(self.tables(static=static))

    def entry(self, i: int) -> PeerEntry:
        return PeerEntry(int.from_bytes(socket.inet_aton(peer_ip(i)), "big"),
                         self.peers[i].getsockname()[1], 1450, f"peer{i}")

    def tables(self, order: list[int] | None = None,
               static: tuple[tuple[bytes, int], ...] = ()) -> SwitchTables:
        order = list(range(len(self.peers))) if order is None else order
        return SwitchTables(tuple(self.entry(i) for i in order), static)

    def inside(self, *frames: bytes) -> None:
        for start in range(0, len(frames), 1000):     # within the socketpair's buffer
            for f in frames[start:start + 1000]:
                self.app.send(f)
            for _ in range(1000):
                if self.fwd.inside_batch() == 0:
                    break
            else:
                raise AssertionError("inside_batch never drained")

    def outside(self, sender: int, *datagrams: bytes) -> None:
        sock = self.stranger if sender < 0 else self.peers[sender]
        for d in datagrams:
            sock.sendto(d, self.local.getsockname())
        handled = 0
        deadline = time.monotonic() + 5
        while handled < len(datagrams) and time.monotonic() < deadline:
            n = self.fwd.outside_batch()
            handled += n
            if not n:
                select.select([self.local], [], [], 0.05)
        assert handled == len(datagrams)

    def received(self, i: int, count: int | None = None) -> list[tuple[bytes, int]]:
        """(datagram, tx socket index) that peer i got; with ``count``, wait for that many."""
        ports = {s.getsockname()[1]: k for k, s in enumerate(self.tx)}
        ports.setdefault(self.local.getsockname()[1], -1)
        out = []
        deadline = time.monotonic() + (5.0 if count else 0.0)
        while True:
            try:
                data, addr = self.peers[i].recvfrom(1 << 17)
                out.append((data, ports[addr[1]]))
                continue
            except BlockingIOError:
                pass
            if count is None or len(out) >= count or time.monotonic() > deadline:
                return out
            select.select([self.peers[i]], [], [], 0.05)

    def delivered(self) -> list[bytes]:
        out = []
        while True:
            try:
                out.append(self.app.recv(1 << 17))
            except BlockingIOError:
                return out

    def where(self, frame_bytes: bytes) -> list[int]:
        """Peers that received ``frame_bytes`` (VXLAN-encapsulated) since the last call."""
        got = []
        for i in range(len(self.peers)):
            for data, _ in self.received(i):
                assert data[:8] == encap(b"")
                if data[8:] == frame_bytes:
                    got.append(i)
        return got

    def spread(self, frames: list[bytes]) -> list[list[int]]:
        """For each of ``frames``, the peers that received it since the last read."""
        got: dict[bytes, list[int]] = {f: [] for f in frames}
        for i in range(len(self.peers)):
            for data, _ in self.received(i):
                got.setdefault(data[8:], []).append(i)
        return [got[f] for f in frames]

    def fdb(self) -> dict[bytes, tuple[int, bool]]:
        return {m: (t, s) for m, t, s, _ in self.fwd.fdb_entries()}

    def close(self) -> None:
        super().close()
        for s in self.tx:
            s.close()


@pytest.fixture
def rig(kernels: ModuleType) -> Iterator[SwRig]:
    with SwRig(kernels) as r:
        yield r


def test_unknown_unicast_is_flooded_and_source_learned_local(rig: SwRig) -> None:
    f = frame(mac(9), mac(1))
    rig.inside(f)
    assert rig.where(f) == [0, 1, 2]
    assert rig.fdb() == {mac(1): (LOCAL, False)}
    c = nonzero(rig.fwd.counters())
    assert c == {"inside_packets": 1, "inside_bytes": len(f), "forwarded_packets": 3,
                 "flooded_copies": 3, "flooded_frames": 1}
    assert [pc[0] for pc in rig.fwd.peer_counters()] == [1, 1, 1]
    assert rig.fwd.fdb_size() == 1


@pytest.mark.parametrize("dst", [BCAST, MCAST], ids=["broadcast", "multicast"])
def test_broadcast_and_multicast_are_flooded(rig: SwRig, dst: bytes) -> None:
    f = frame(dst, mac(1))
    rig.inside(f)
    assert rig.where(f) == [0, 1, 2]


def test_wire_format_decoded_by_scapy(rig: SwRig) -> None:
    f = frame(BCAST, mac(1), b"\x00\x01" * 20, 0x0806)
    rig.inside(f)
    (data, _), = rig.received(2, 1)
    v = VXLAN(data)
    assert v.flags == 0x08 and v.vni == VNI
    assert data[1:4] == b"\x00\x00\x00" and data[7] == 0
    assert bytes(v[Ether]) == f


def test_learned_peer_gets_unicast_only(rig: SwRig) -> None:
    from_peer = frame(mac(1), mac(20))
    rig.outside(1, encap(from_peer))
    assert rig.delivered() == [from_peer]
    assert rig.fdb()[mac(20)] == (1, False)
    reply = frame(mac(20), mac(1))
    rig.inside(reply)
    assert rig.where(reply) == [1]
    assert rig.fwd.counters()["flooded_copies"] == 0


def test_moves_between_peers_and_local_at_once(rig: SwRig) -> None:
    m = mac(20)
    rig.outside(1, encap(frame(BCAST, m)))
    rig.outside(2, encap(frame(BCAST, m)))
    assert rig.fdb()[m] == (2, False)
    to_m = frame(m, mac(1))
    rig.inside(to_m)
    assert rig.where(to_m) == [2]
    rig.inside(frame(BCAST, m))                      # m now lives behind our tap
    rig.where(frame(BCAST, m))
    assert rig.fdb()[m] == (LOCAL, False)
    rig.inside(frame(m, mac(1)))
    assert rig.where(frame(m, mac(1))) == []
    assert rig.fwd.counters()["inside_local_destination"] == 1
    rig.outside(0, encap(frame(BCAST, m)))           # and back out to a peer
    assert rig.fdb()[m] == (0, False)


def test_split_horizon(rig: SwRig) -> None:
    rig.outside(1, encap(frame(BCAST, mac(21))))
    rig.delivered()
    # From peer 0 to a MAC that lives at peer 1: neither delivered nor sent on.
    rig.outside(0, encap(frame(mac(21), mac(22))))
    assert rig.delivered() == []
    # Broadcast from a peer goes to the tap only, never back into the overlay.
    b = frame(BCAST, mac(23))
    rig.outside(2, encap(b))
    assert rig.delivered() == [b]
    assert [rig.received(i) for i in range(3)] == [[], [], []]
    c = rig.fwd.counters()
    assert (c["outside_not_for_us"], c["delivered_packets"], c["forwarded_packets"]) == (1, 2, 0)


@pytest.mark.parametrize("src", [MCAST, BCAST, b"\x00" * 6], ids=["mcast", "bcast", "zero"])
def test_bad_source_macs(rig: SwRig, src: bytes) -> None:
    rig.inside(frame(BCAST, src))
    rig.outside(0, encap(frame(BCAST, src)))
    assert rig.fdb() == {}
    assert rig.delivered() == [] and rig.where(frame(BCAST, src)) == []
    c = rig.fwd.counters()
    assert (c["inside_bad_source_mac"], c["outside_bad_source_mac"]) == (1, 1)


@pytest.mark.parametrize(("data", "reason"), [
    (encap(frame(BCAST, mac(5)), flags=0), "outside_bad_vxlan_flags"),
    (encap(frame(BCAST, mac(5)), vni=VNI + 1), "outside_wrong_vni"),
    (encap(frame(BCAST, mac(5)))[:21], "outside_truncated_vxlan"),
    (encap(b"")[:5], "outside_truncated_vxlan"),
], ids=["flags", "vni", "short-frame", "short-header"])
def test_outside_drops(rig: SwRig, data: bytes, reason: str) -> None:
    rig.outside(0, data)
    assert rig.delivered() == [] and rig.fdb() == {}
    assert nonzero(rig.fwd.counters()) == {"outside_packets": 1, "outside_bytes": len(data),
                                           reason: 1}


def test_runt_and_unknown_peer(rig: SwRig) -> None:
    rig.inside(b"\x02" * 13)
    rig.outside(-1, encap(frame(BCAST, mac(5))))
    c = rig.fwd.counters()
    assert (c["inside_runt_frame"], c["outside_unknown_peer"]) == (1, 1)
    assert rig.fdb() == {}


def test_no_peers_to_flood_to(kernels: ModuleType) -> None:
    with SwRig(kernels, peers=0) as rig:
        rig.inside(frame(BCAST, mac(1)))
        assert rig.fwd.counters()["inside_no_route"] == 1
        assert rig.fdb() == {mac(1): (LOCAL, False)}


def test_flow_hash_picks_the_tx_socket(rig: SwRig) -> None:
    frames = [frame(BCAST, mac(k + 1), bytes([k]) * 30, 0x88B5) for k in range(16)]
    rig.inside(*frames)
    for i in range(3):
        got = rig.received(i, 16)
        for data, sock in got:
            assert sock == vxlan.flow_hash_frame(data[8:]) % POOL
        assert len({s for _, s in got}) == POOL        # flows spread over the pool


def test_ageing(rig: SwRig) -> None:
    rig.fwd.set_now(100.0)
    rig.inside(frame(BCAST, mac(1)), frame(BCAST, mac(2)))
    rig.fwd.set_now(150.0)
    rig.inside(frame(BCAST, mac(2)))                  # refreshed
    assert {m: s for m, _, _, s in rig.fwd.fdb_entries()} == {mac(1): 100.0, mac(2): 150.0}
    assert rig.fwd.age(200.0, 100.0) == 0             # exactly max_age old: kept
    assert rig.fwd.age(200.5, 100.0) == 1
    assert rig.fdb() == {mac(2): (LOCAL, False)}
    assert rig.fwd.age(1000.0, 100.0) == 1
    assert rig.fwd.fdb_size() == 0


def test_cap_refuses_new_macs_but_forwards(kernels: ModuleType) -> None:
    with SwRig(kernels, cap=4) as rig:
        rig.fwd.set_now(1.0)
        rig.inside(*[frame(BCAST, mac(k)) for k in range(4)])
        rig.outside(0, encap(frame(BCAST, mac(50))))
        assert rig.fwd.counters()["fdb_full"] == 1
        assert rig.fdb() == {mac(k): (LOCAL, False) for k in range(4)}
        assert rig.delivered() == [frame(BCAST, mac(50))]      # the frame still went
        rig.outside(0, encap(frame(BCAST, mac(0))))             # a move needs no room
        assert rig.fdb()[mac(0)] == (0, False)
        rig.fwd.set_now(500.0)
        rig.inside(frame(BCAST, mac(1)))
        assert rig.fwd.age(500.0, 300.0) == 3
        rig.outside(0, encap(frame(BCAST, mac(50))))
        assert rig.fdb() == {mac(1): (LOCAL, False), mac(50): (0, False)}
        assert rig.fwd.counters()["fdb_full"] == 1


def test_static_entries(kernels: ModuleType) -> None:
    with SwRig(kernels, static=((mac(30), 1), (mac(31), LOCAL))) as rig:
        assert rig.fdb() == {mac(30): (1, True), mac(31): (LOCAL, True)}
        rig.outside(2, encap(frame(BCAST, mac(30))))            # learning does not move it
        rig.inside(frame(BCAST, mac(31)))
        assert rig.fdb() == {mac(30): (1, True), mac(31): (LOCAL, True)}
        assert rig.fwd.age(1e9, 1.0) == 0                       # and they never age
        rig.where(frame(BCAST, mac(31)))
        rig.inside(frame(mac(30), mac(1)), frame(mac(31), mac(1)))
        assert rig.where(frame(mac(30), mac(1))) == [1]
        assert rig.fwd.counters()["inside_local_destination"] == 1


def test_set_tables_follows_peers_and_replaces_statics(kernels: ModuleType) -> None:
    with SwRig(kernels, static=((mac(30), 1),)) as rig:
        for i in range(3):
            rig.outside(i, encap(frame(BCAST, mac(20 + i))))
        rig.inside(frame(BCAST, mac(1)))
        # Peer 1 leaves, peer 2 becomes index 0, peer 0 index 1; a new static entry.
        rig.fwd.set_tables(rig.tables(order=[2, 0], static=((mac(31), 0),)))
        assert rig.fdb() == {mac(20): (1, False), mac(22): (0, False), mac(1): (LOCAL, False),
                             mac(31): (0, True)}
        with pytest.raises(ValueError):
            rig.fwd.set_tables(rig.tables(static=((mac(31), 3),)))
        with pytest.raises(ValueError):
            rig.fwd.set_tables(rig.tables(static=((MCAST, 0),)))
        with pytest.raises(ValueError):
            rig.fwd.set_tables(rig.tables(static=((mac(5), 0), (mac(5), 1))))
        assert len(rig.fdb()) == 4


def test_pinned_macs_are_never_learned_elsewhere(kernels: ModuleType) -> None:
    """A pinned MAC (a node's VTEP MAC, a static MAC) as the source of a frame from any other
    port: the frame is dropped and counted, the pin stays."""
    with SwRig(kernels, static=((mac(30), 1), (mac(31), LOCAL))) as rig:
        hijack = frame(BCAST, mac(30))
        rig.inside(hijack)                                       # a VM claims peer 1's MAC
        assert rig.where(hijack) == []
        rig.outside(2, encap(frame(BCAST, mac(30))))            # peer 2 claims it
        rig.outside(0, encap(frame(BCAST, mac(31))))            # a peer claims our own MAC
        assert rig.delivered() == []
        rig.outside(1, encap(frame(BCAST, mac(30))))            # its own port: fine
        rig.inside(frame(BCAST, mac(31)))
        assert rig.delivered() == [frame(BCAST, mac(30))]
        assert rig.where(frame(BCAST, mac(31))) == [0, 1, 2]
        assert rig.fdb() == {mac(30): (1, True), mac(31): (LOCAL, True)}
        c = rig.fwd.counters()
        assert (c["inside_pinned_mac"], c["outside_pinned_mac"]) == (1, 2)


def test_local_mac_does_not_move_to_a_peer_on_one_frame(kernels: ModuleType) -> None:
    m = mac(20)
    with SwRig(kernels, mac_move_hold=2.0) as rig:
        rig.fwd.set_now(10.0)
        rig.inside(frame(BCAST, m))
        rig.where(frame(BCAST, m))
        rig.fwd.set_now(11.0)
        forged = frame(BCAST, m, b"forged")
        rig.outside(0, encap(forged))                  # 1 s after m spoke behind our tap
        assert rig.delivered() == [] and rig.fdb()[m] == (LOCAL, False)
        rig.fwd.set_now(11.5)
        rig.inside(frame(BCAST, m))                    # m speaks again: the claim is void
        rig.where(frame(BCAST, m))
        rig.fwd.set_now(14.0)
        to_m = frame(m, mac(1))
        rig.inside(to_m)
        assert rig.where(to_m) == [] and rig.fdb()[m] == (LOCAL, False)
        rig.outside(1, encap(forged))                  # quiet for 2.5 s: now it may move
        assert rig.delivered() == [forged] and rig.fdb()[m] == (1, False)
        assert rig.fwd.counters()["outside_mac_move_dampened"] == 1
        # A MAC quiet behind the tap since its claim moves on the next lookup once the hold is
        # over, even if the peer says nothing more (a migrated VM announces only once).
        n = mac(21)
        rig.inside(frame(BCAST, n))
        rig.where(frame(BCAST, n))
        rig.fwd.set_now(15.0)
        rig.outside(2, encap(frame(BCAST, n)))
        assert rig.delivered() == []
        to_n = frame(n, mac(1))
        rig.inside(to_n)
        assert rig.where(to_n) == []                   # 1 s: still ours
        rig.fwd.set_now(16.0)
        rig.inside(to_n)
        assert rig.where(to_n) == [2] and rig.fdb()[n] == (2, False)
        # A pending move follows its peer across a table swap.
        o = mac(23)
        rig.inside(frame(BCAST, o))
        rig.where(frame(BCAST, o))
        rig.outside(2, encap(frame(BCAST, o)))         # dampened: pending at peer 2
        rig.fwd.set_tables(rig.tables(order=[2, 0, 1]))  # peer 2 is index 0 now
        rig.fwd.set_now(18.0)                          # quiet here for the hold
        to_o = frame(o, mac(1))
        rig.inside(to_o)
        assert rig.where(to_o) == [2] and rig.fdb()[o] == (0, False)
        rig.fwd.set_tables(rig.tables())
        # Moves from a peer to the tap, and between peers, happen at once.
        rig.inside(frame(BCAST, n))
        rig.outside(0, encap(frame(BCAST, mac(22))))
        rig.outside(1, encap(frame(BCAST, mac(22))))
        assert rig.fdb()[n] == (LOCAL, False) and rig.fdb()[mac(22)] == (1, False)
        assert rig.fwd.counters()["outside_mac_move_dampened"] == 3


def test_per_port_cap(kernels: ModuleType) -> None:
    """No port learns more than fdb_port_max_entries MACs; the frames still go."""
    with SwRig(kernels, cap=10, fdb_port_max_entries=2) as rig:
        frames = [frame(BCAST, mac(k)) for k in (1, 2, 3)]
        rig.inside(*frames)
        assert rig.spread(frames) == [[0, 1, 2]] * 3
        rig.outside(0, *[encap(frame(BCAST, mac(k))) for k in (11, 12, 13, 14)])
        assert len(rig.delivered()) == 4
        rig.outside(0, encap(frame(BCAST, mac(1))))    # a move into a full port: refused
        rig.outside(1, encap(frame(BCAST, mac(21))))
        assert rig.fdb() == {mac(1): (LOCAL, False), mac(2): (LOCAL, False),
                             mac(11): (0, False), mac(12): (0, False), mac(21): (1, False)}
        assert rig.fwd.port_entries() == [2, 2, 1, 0]
        assert rig.fwd.counters()["fdb_port_full"] == 4
        rig.fwd.set_tables(rig.tables(order=[1, 0]))   # counts follow their peer
        assert rig.fwd.port_entries() == [2, 1, 2]


def test_storm_control_per_port(kernels: ModuleType) -> None:
    """Floods from each port spend that port's bucket (burst 3, 10 per second)."""
    with SwRig(kernels, storm_rate=10.0, storm_burst=3.0) as rig:
        rig.outside(1, encap(frame(mac(1), mac(20))))  # mac(20) lives at peer 1
        rig.delivered()
        floods = [frame(BCAST, mac(1), bytes([k])) for k in range(5)]
        rig.inside(*floods)
        assert rig.spread(floods) == [[0, 1, 2]] * 3 + [[]] * 2
        known = frame(mac(20), mac(1))
        rig.inside(known)                              # known unicast spends nothing
        assert rig.where(known) == [1]
        rig.fwd.set_now(0.1)                           # one token more
        rig.inside(*floods[:2])
        assert rig.spread(floods[:2]) == [[0, 1, 2], []]
        for sender in (0, 2):                          # peers have buckets of their own
            rig.outside(sender, *[encap(frame(MCAST, mac(30 + sender), bytes([k])))
                                  for k in range(4)])
            assert len(rig.delivered()) == 3
        rig.outside(2, encap(frame(mac(1), mac(32))))  # to a MAC behind our tap: not a flood
        assert len(rig.delivered()) == 1
        c = rig.fwd.counters()
        assert (c["inside_storm_control"], c["outside_storm_control"]) == (3, 2)
        # Buckets follow their peer across a table swap: peer 0 (now index 1) is still dry,
        # peer 1 (now index 0) still has its three tokens.
        rig.fwd.set_tables(rig.tables(order=[1, 0]))
        rig.outside(0, encap(frame(MCAST, mac(30), b"after")))
        rig.outside(1, *[encap(frame(MCAST, mac(31), bytes([k]))) for k in range(4)])
        assert len(rig.delivered()) == 3
        assert rig.fwd.counters()["outside_storm_control"] == 4


def test_ageing_is_bounded_per_call_and_oldest_first(kernels: ModuleType) -> None:
    with SwRig(kernels) as rig:
        for k in range(6):
            rig.fwd.set_now(float(k))
            rig.inside(frame(BCAST, mac(k)))
        rig.fwd.set_now(6.0)
        rig.inside(frame(BCAST, mac(0)))               # refreshed: now the youngest
        rig.fwd.set_now(3.0)                           # the clock never goes back:
        rig.inside(frame(BCAST, mac(1)))               # refreshed at 6.0 too
        assert rig.fwd.age(10.0, 4.5, 2) == 2          # the two oldest: mac(2), mac(3)
        assert set(rig.fdb()) == {mac(0), mac(1), mac(4), mac(5)}
        assert rig.fwd.age(10.0, 4.5, 0) == 0
        assert rig.fwd.age(10.0, 4.5) == 2
        assert {m: s for m, _, _, s in rig.fwd.fdb_entries()} == {mac(0): 6.0, mac(1): 6.0}
        with pytest.raises(ValueError):
            rig.fwd.age(10.0, 1.0, -1)


@pytest.mark.parametrize("kwargs", [
    {"vni": -1}, {"vni": 1 << 24}, {"batch_size": 0}, {"fdb_max_entries": 0},
    {"tx_fds": [-2]}, {"fdb_port_max_entries": 0},
    {"fdb_max_entries": 4, "fdb_port_max_entries": 5}, {"mac_move_hold": -1.0},
    {"mac_move_hold": float("nan")}, {"storm_rate": -1.0}, {"storm_burst": 0.5},
])
def test_constructor_rejects(kernels: ModuleType, kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        kernels.VxlanSwitchForwarder(0, 1, **kwargs)


def test_large_table(kernels: ModuleType) -> None:
    """A full-size table fills to its cap exactly; lookups stay right (probe clusters,
    backward-shift deletes) when half of it ages out."""
    cap = 20_000 if kernels.IMPLEMENTATION == "cython" else 4_000
    with SwRig(kernels, cap=cap, batch_size=512, peers=1) as rig:
        for start in range(0, cap + 10, 2000):
            rig.fwd.set_now(float(start))
            rig.inside(*[frame(BCAST, (0x020000000000 + k).to_bytes(6, "big"))
                         for k in range(start, min(start + 2000, cap + 10))])
            rig.received(0)
        assert rig.fwd.fdb_size() == cap
        assert rig.fwd.counters()["fdb_full"] == 10
        removed = rig.fwd.age(float(cap // 2) + 0.5, 0.0)
        assert removed == sum(1 for k in range(cap) if k // 2000 * 2000 < cap // 2 + 0.5)
        left = {m for m, _, _, _ in rig.fwd.fdb_entries()}
        assert len(left) == rig.fwd.fdb_size() == cap - removed
        probe = [frame((0x020000000000 + k).to_bytes(6, "big"), b"\x0a" * 6)
                 for k in range(cap)]
        rig.inside(*probe)
        local = rig.fwd.counters()["inside_local_destination"]
        assert local == len(left)


# --- the oracle --------------------------------------------------------------------------------

class Oracle:
    """A switch that only has to be right: dicts, a clock, the rules of the issue, and naive
    scans where the kernels keep orders and counts. Peers are named by their socket in the
    rig (0, 1, 2), not by their index in the current tables, so table swaps are plain."""

    def __init__(self, npeers: int, cap: int, port_cap: int | None = None, hold: float = 0.0,
                 storm_rate: float = 0.0, storm_burst: float = 1.0,
                 static: tuple[tuple[bytes, int], ...] = ()) -> None:
        self.peers, self.cap, self.now = list(range(npeers)), cap, 0.0
        self.port_cap = cap if port_cap is None else port_cap
        self.hold, self.storm_rate, self.storm_burst = hold, storm_rate, storm_burst
        self.pins = dict(static)                # every pin, whether its peer is there or not
        self.static = dict(static)
        self.fdb: dict[bytes, list[Any]] = {}   # mac -> [target, seen, pending, stamp order]
        self.order = 0
        self.storm = {port: [storm_burst, 0.0] for port in range(-1, npeers)}
        self.counts = dict.fromkeys(("full", "port_full", "in_pinned", "out_pinned",
                                     "dampened", "in_storm", "out_storm"), 0)

    def on_port(self, target: int) -> int:
        return sum(1 for e in self.fdb.values() if e[0] == target)

    def stamp(self, e: list[Any]) -> None:
        if e[1] != self.now or e[3] < 0:
            e[1], self.order, e[3] = self.now, self.order + 1, self.order + 1

    def learn(self, m: bytes, target: int) -> bool:
        """False: drop the frame."""
        if m in self.static:
            if self.static[m] == target:
                return True
            self.counts["in_pinned" if target == LOCAL else "out_pinned"] += 1
            return False
        e = self.fdb.get(m)
        if e is None:
            if len(self.fdb) + len(self.static) >= self.cap:
                self.counts["full"] += 1
            elif self.on_port(target) >= self.port_cap:
                self.counts["port_full"] += 1
            else:
                self.fdb[m] = [target, self.now, None, -1]
                self.stamp(self.fdb[m])
            return True
        if e[0] != target:
            if e[0] == LOCAL and self.now - e[1] < self.hold:
                e[2] = target
                self.counts["dampened"] += 1
                return False
            if self.on_port(target) >= self.port_cap:
                self.counts["port_full"] += 1
                return True
            e[0] = target
        e[2] = None
        self.stamp(e)
        return True

    def lookup(self, m: bytes) -> int | None:
        if m[0] & 1:
            return None
        if m in self.static:
            return self.static[m]
        e = self.fdb.get(m)
        if e is None:
            return None
        if e[2] is not None and self.now - e[1] >= self.hold \
                and self.on_port(e[2]) < self.port_cap:
            e[0], e[2] = e[2], None
        return int(e[0])

    def take(self, port: int) -> bool:
        if self.storm_rate <= 0:
            return True
        bucket = self.storm[port]
        if self.now > bucket[1]:
            bucket[0] = min(self.storm_burst, bucket[0] + (self.now - bucket[1]) * self.storm_rate)
            bucket[1] = self.now
        if bucket[0] >= 1.0:
            bucket[0] -= 1.0
            return True
        return False

    @staticmethod
    def valid(m: bytes) -> bool:
        return not m[0] & 1 and m != b"\x00" * 6

    def inside(self, f: bytes) -> list[int]:
        if not self.valid(f[6:12]) or not self.learn(f[6:12], LOCAL):
            return []
        target = self.lookup(f[:6])
        if target is None:
            if not self.peers:
                return []
            if not self.take(LOCAL):
                self.counts["in_storm"] += 1
                return []
            return sorted(self.peers)
        return [] if target == LOCAL else [target]

    def outside(self, peer: int, f: bytes) -> bool:
        if peer not in self.peers or not self.valid(f[6:12]) or not self.learn(f[6:12], peer):
            return False
        target = self.lookup(f[:6])
        if target is None and not self.take(peer):
            self.counts["out_storm"] += 1
            return False
        return target is None or target == LOCAL

    def swap(self, order: list[int]) -> None:
        """New tables with peers ``order``: what left goes (its MACs, pins, pending moves,
        storm bucket); a peer that is new or back starts with a full bucket."""
        self.static = {m: t for m, t in self.pins.items() if t == LOCAL or t in order}
        for m, e in list(self.fdb.items()):
            if m in self.static or (e[0] != LOCAL and e[0] not in order):
                del self.fdb[m]
            elif e[2] is not None and e[2] not in order:
                e[2] = None
        self.storm = {p: self.storm[p] if p == LOCAL or p in self.peers else
                      [self.storm_burst, self.now] for p in (LOCAL, *order)}
        self.peers = list(order)

    def age(self, max_age: float, limit: int) -> int:
        old = sorted((e[1], e[3], m) for m, e in self.fdb.items() if self.now - e[1] > max_age)
        for _, _, m in old[:limit]:
            del self.fdb[m]
        return len(old[:limit])

    def entries(self) -> dict[bytes, tuple[int, bool, float]]:
        out = {m: (e[0], False, e[1]) for m, e in self.fdb.items()}
        out.update({m: (t, True, 0.0) for m, t in self.static.items()})
        return out


MACS = st.sampled_from([mac(1), mac(2), mac(3), mac(4), mac(5), BCAST, MCAST, b"\0" * 6])
OPS = st.one_of(
    st.tuples(st.just("in"), MACS, MACS),
    st.tuples(st.just("out"), st.integers(0, 2), MACS, MACS),
    st.tuples(st.just("tick"), st.sampled_from([0.25, 0.5, 1.0, 10.0])),
    st.tuples(st.just("age"), st.sampled_from([0.0, 1.0, 5.0]), st.sampled_from([1, 1 << 20])),
    # a MAC speaks behind the tap, then a peer claims it: what move dampening is about
    st.tuples(st.just("claim"), st.integers(0, 2), st.sampled_from([mac(1), mac(2), mac(3)])),
    # new tables: some of the three peers, in some order
    st.tuples(st.just("tables"), st.permutations([0, 1, 2]), st.integers(0, 3)),
)
POLICIES = st.fixed_dictionaries({
    "cap": st.integers(1, 6),
    "port_cap": st.none() | st.integers(1, 3),
    "hold": st.sampled_from([0.0, 0.5, 2.0]),
    "storm_rate": st.sampled_from([0.0, 0.0, 2.0, 8.0]),
    "storm_burst": st.sampled_from([1.0, 3.0]),
    "static": st.sampled_from([(), ((mac(4), 1),), ((mac(5), LOCAL), (mac(4), 0))]),
})

COUNTS = {"full": "fdb_full", "port_full": "fdb_port_full", "in_pinned": "inside_pinned_mac",
          "out_pinned": "outside_pinned_mac", "dampened": "outside_mac_move_dampened",
          "in_storm": "inside_storm_control", "out_storm": "outside_storm_control"}


def forwarder_policy(policy: dict[str, Any]) -> dict[str, Any]:
    """The forwarder's keyword arguments for an oracle policy."""
    return {"fdb_port_max_entries": None if policy["port_cap"] is None
            else min(policy["port_cap"], policy["cap"]),
            "mac_move_hold": policy["hold"], "storm_rate": policy["storm_rate"],
            "storm_burst": policy["storm_burst"]}


def run_ops(kernels: ModuleType, ops: list[tuple[Any, ...]],
            policy: dict[str, Any]) -> dict[str, Any]:
    """Run ``ops`` one at a time through a forwarder and the oracle; both must agree."""
    cap, static = policy["cap"], policy["static"][:policy["cap"]]
    kwargs = forwarder_policy(policy)
    oracle = Oracle(3, cap, kwargs["fdb_port_max_entries"], policy["hold"],
                    policy["storm_rate"], policy["storm_burst"], static)
    seen: list[Any] = []
    order = [0, 1, 2]
    with SwRig(kernels, cap=cap, static=static, **kwargs) as rig:
        for k, op in enumerate(ops):
            payload = struct.pack("!I", k)
            if op[0] == "in":
                f = frame(op[1], op[2], payload)
                rig.inside(f)
                got = rig.where(f)
                assert got == oracle.inside(f), (k, op)
                seen.append(got)
            elif op[0] == "out":
                f = frame(op[2], op[3], payload)
                rig.outside(op[1], encap(f))
                got_dev = rig.delivered()
                assert (got_dev == [f]) is oracle.outside(op[1], f), (k, op)
                seen.append(got_dev)
            elif op[0] == "claim":
                here, there = frame(BCAST, op[2], payload), frame(BCAST, op[2], payload + b"!")
                rig.inside(here)
                rig.outside(op[1], encap(there))
                got_claim = [rig.where(here), rig.delivered()]
                assert got_claim == [oracle.inside(here),
                                     [there] if oracle.outside(op[1], there) else []], (k, op)
                seen.append(got_claim)
            elif op[0] == "tick":
                oracle.now += op[1]
                rig.fwd.set_now(oracle.now)
            elif op[0] == "tables":
                order = list(op[1][:op[2]])
                pins = tuple((m, t if t == LOCAL else order.index(t)) for m, t in static
                             if t == LOCAL or t in order)
                rig.fwd.set_tables(rig.tables(order=order, static=pins))
                oracle.swap(order)
            else:
                assert rig.fwd.age(oracle.now, op[1], op[2]) == oracle.age(op[1], op[2]), (k, op)
            entries = rig.fwd.fdb_entries()
            assert {m: (order[t] if t >= 0 else t, pin, s) for m, t, pin, s in entries} == \
                oracle.entries(), (k, op)
        entries = rig.fwd.fdb_entries()
        c = rig.fwd.counters()
        assert {name: c[counter] for name, counter in COUNTS.items()} == oracle.counts
        assert rig.fwd.port_entries() == [oracle.on_port(p) for p in (LOCAL, *order)]
        assert c["inside_packets"] + c["flooded_copies"] - c["inside_no_route"] >= \
            c["forwarded_packets"]
        assert c["outside_packets"] == c["delivered_packets"] + sum(
            c[r] for r in DROP_REASONS if r.startswith("outside"))
        return {"seen": seen, "counters": c, "fdb": entries,
                "peer_counters": rig.fwd.peer_counters()}


@settings(max_examples=80, deadline=None, suppress_health_check=FIXTURE_OK)
@given(ops=st.lists(OPS, max_size=30), policy=POLICIES)
def test_switch_matches_oracle_and_twin(kernel_pair: tuple[ModuleType, ModuleType],
                                        ops: list[tuple[Any, ...]],
                                        policy: dict[str, Any]) -> None:
    results = [run_ops(kernels, ops, policy) for kernels in kernel_pair]
    assert results[0] == results[1]


@st.composite
def switch_datagrams(draw: st.DrawFn) -> bytes:
    f = frame(draw(MACS), draw(MACS), draw(st.binary(max_size=30)),
              draw(st.sampled_from([0x0800, 0x0806, 0x86DD])))
    data = encap(f, vni=draw(st.sampled_from([VNI, VNI, VNI + 1])),
                 flags=draw(st.sampled_from([0x08, 0x08, 0x00, 0xFF])))
    if draw(st.integers(0, 4)) == 0:
        data = data[:draw(st.integers(0, len(data)))]
    return data


@settings(max_examples=40, deadline=None, suppress_health_check=FIXTURE_OK)
@given(inside=st.lists(st.binary(max_size=40).map(lambda b: b[:20]) | st.builds(
           frame, MACS, MACS, st.binary(max_size=20)), max_size=12),
       outside=st.lists(st.tuples(st.integers(-1, 2), switch_datagrams()), max_size=12),
       batch_size=st.integers(1, 8))
def test_batch_parity(kernel_pair: tuple[ModuleType, ModuleType], inside: list[bytes],
                      outside: list[tuple[int, bytes]], batch_size: int) -> None:
    """Whole batches (learning within a batch affects the frames after it) through both."""
    results = []
    for kernels in kernel_pair:
        with SwRig(kernels, batch_size=batch_size, cap=5) as rig:
            for sender, data in outside:
                rig.outside(sender, data)
            rig.inside(*inside)
            pc = rig.fwd.peer_counters()
            results.append({
                "device": rig.delivered(),
                "peers": [sorted(rig.received(i, pc[i][0])) for i in range(3)],
                "counters": rig.fwd.counters(), "fdb": rig.fwd.fdb_entries(),
                "peer_counters": pc,
            })
    assert results[0] == results[1]


# --- set_tables over a probe cluster that wraps from the end of the table to its start --------

WRAP_CAP = 16         # the C table has 64 slots: more than twice the cap, a power of two
WRAP_SLOTS = 64


def home_slot(m: bytes, nslots: int = WRAP_SLOTS) -> int:
    """The home slot of a MAC in the C table (cext/fdb.pxi fdb_home: Fibonacci hashing)."""
    return ((int.from_bytes(m, "big") * 0x9E3779B97F4A7C15) % (1 << 64) >> 32) & (nslots - 1)


def wrapping_macs(homes: set[int], count: int) -> list[bytes]:
    """``count`` unicast MACs whose home slots are in ``homes``, in a fixed order."""
    out = []
    for k in range(1 << 16):
        m = (0x020000000000 + k).to_bytes(6, "big")
        if home_slot(m) in homes:
            out.append(m)
            if len(out) == count:
                return out
    raise AssertionError("not enough MACs")


@pytest.mark.parametrize("b_peer", [1, 2])
def test_set_tables_remap_over_a_wrapped_cluster(kernels: ModuleType, b_peer: int) -> None:
    """a and b both hash to the last slot: b sits in slot 0. Peer 0 (a's) leaves, so a is
    deleted and b shifts back into the last slot; b must be remapped once, not twice."""
    a, b = wrapping_macs({WRAP_SLOTS - 1}, 2)
    with SwRig(kernels, cap=WRAP_CAP) as rig:
        rig.outside(0, encap(frame(BCAST, a)))
        rig.outside(b_peer, encap(frame(BCAST, b)))
        rig.delivered()
        rig.fwd.set_tables(rig.tables(order=[1, 2]))      # peer 1 -> index 0, peer 2 -> 1
        assert rig.fdb() == {b: (b_peer - 1, False)}
        to_b = frame(b, mac(1))
        rig.inside(to_b)
        assert rig.where(to_b) == [b_peer]


WRAP_MACS = wrapping_macs({WRAP_SLOTS - 2, WRAP_SLOTS - 1, 0}, 8)
_WRAP_LEARN = st.one_of(   # mostly from peers: those are the entries a swap remaps
    st.tuples(st.just("out"), st.integers(0, 2), st.sampled_from(WRAP_MACS)),
    st.tuples(st.just("out"), st.integers(0, 2), st.sampled_from(WRAP_MACS)),
    st.tuples(st.just("in"), st.sampled_from(WRAP_MACS)),
    st.tuples(st.just("age"), st.sampled_from([3.0, 10.0])),
)
_WRAP_SWAP = st.tuples(st.just("tables"), st.permutations([0, 1, 2]), st.integers(1, 3))


@st.composite
def wrap_ops(draw: st.DrawFn) -> list[tuple[Any, ...]]:
    """Rounds of a few learns (filling the wrapping clusters) followed by a table swap."""
    ops: list[tuple[Any, ...]] = []
    for _ in range(draw(st.integers(1, 4))):
        ops += draw(st.lists(_WRAP_LEARN, min_size=3, max_size=9))
        ops.append(draw(_WRAP_SWAP))
    return ops


def run_wrapped(kernels: ModuleType, ops: list[tuple[Any, ...]]) -> list[Any]:
    """Learn, swap tables and age over clusters that wrap; the FDB must equal a dict's after
    every step (targets compared as the peer sockets they stand for)."""
    oracle: dict[bytes, list[Any]] = {}       # mac -> [peer socket or LOCAL, seen]
    order, now = [0, 1, 2], 0.0
    history = []
    with SwRig(kernels, cap=WRAP_CAP) as rig:
        for k, op in enumerate(ops):
            now += 1.0
            rig.fwd.set_now(now)
            if op[0] == "in":
                rig.inside(frame(BCAST, op[1], struct.pack("!I", k)))
                oracle[op[1]] = [LOCAL, now]
            elif op[0] == "out":
                rig.outside(op[1], encap(frame(BCAST, op[2], struct.pack("!I", k))))
                if op[1] in order:
                    oracle[op[2]] = [op[1], now]
            elif op[0] == "tables":
                order = list(op[1][:op[2]])
                rig.fwd.set_tables(rig.tables(order=order))
                oracle = {m: e for m, e in oracle.items() if e[0] == LOCAL or e[0] in order}
            else:
                removed = rig.fwd.age(now, op[1])
                old = [m for m, e in oracle.items() if now - e[1] > op[1]]
                for m in old:
                    del oracle[m]
                assert removed == len(old), (k, op)
            rig.delivered()
            for i in range(3):
                rig.received(i)
            got = {m: (order[t] if t >= 0 else t, seen) for m, t, _, seen in rig.fwd.fdb_entries()}
            assert got == {m: tuple(e) for m, e in oracle.items()}, (k, op)
            history.append(sorted(got.items()))
    return history


@settings(max_examples=100, deadline=None, suppress_health_check=FIXTURE_OK)
@given(ops=wrap_ops())
def test_wrapped_clusters_match_oracle_and_twin(kernel_pair: tuple[ModuleType, ModuleType],
                                                ops: list[tuple[Any, ...]]) -> None:
    results = [run_wrapped(kernels, ops) for kernels in kernel_pair]
    assert results[0] == results[1]
