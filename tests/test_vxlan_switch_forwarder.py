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
                 static: tuple[tuple[bytes, int], ...] = ()) -> None:
        self.app, self.dev = device_pair()
        self.local = udp_socket(NODE_IP)
        self.tx = [udp_socket(NODE_IP) for _ in range(pool)]
        self.peers = [udp_socket(peer_ip(i)) for i in range(peers)]
        self.stranger = udp_socket(STRANGER_IP)
        self.fwd = kernels.VxlanSwitchForwarder(self.dev.fileno(), self.local.fileno(), VNI,
                                                [s.fileno() for s in self.tx], batch_size, cap)
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


@pytest.mark.parametrize("kwargs", [
    {"vni": -1}, {"vni": 1 << 24}, {"batch_size": 0}, {"fdb_max_entries": 0},
    {"tx_fds": [-2]},
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
    """A switch that only has to be right: a dict, a clock, the rules of the issue."""

    def __init__(self, npeers: int, cap: int) -> None:
        self.npeers, self.cap, self.now = npeers, cap, 0.0
        self.fdb: dict[bytes, list[Any]] = {}
        self.full = 0

    def learn(self, m: bytes, target: int) -> None:
        if m in self.fdb:
            self.fdb[m][0], self.fdb[m][1] = target, self.now
        elif len(self.fdb) < self.cap:
            self.fdb[m] = [target, self.now]
        else:
            self.full += 1

    @staticmethod
    def valid(m: bytes) -> bool:
        return not m[0] & 1 and m != b"\x00" * 6

    def inside(self, f: bytes) -> list[int]:
        if not self.valid(f[6:12]):
            return []
        self.learn(f[6:12], LOCAL)
        target = None if f[0] & 1 else self.fdb.get(f[:6], [None])[0]
        if target is None:
            return list(range(self.npeers))
        return [] if target == LOCAL else [target]

    def outside(self, peer: int, f: bytes) -> bool:
        if not self.valid(f[6:12]):
            return False
        self.learn(f[6:12], peer)
        target = None if f[0] & 1 else self.fdb.get(f[:6], [None])[0]
        return target is None or target == LOCAL

    def age(self, max_age: float) -> int:
        old = [m for m, (_, seen) in self.fdb.items() if self.now - seen > max_age]
        for m in old:
            del self.fdb[m]
        return len(old)


MACS = st.sampled_from([mac(1), mac(2), mac(3), mac(4), mac(5), BCAST, MCAST, b"\0" * 6])
OPS = st.one_of(
    st.tuples(st.just("in"), MACS, MACS),
    st.tuples(st.just("out"), st.integers(0, 2), MACS, MACS),
    st.tuples(st.just("tick"), st.sampled_from([0.5, 1.0, 10.0])),
    st.tuples(st.just("age"), st.sampled_from([0.0, 1.0, 5.0])),
)


def run_ops(kernels: ModuleType, ops: list[tuple[Any, ...]], cap: int) -> dict[str, Any]:
    """Run ``ops`` one at a time through a forwarder and the oracle; both must agree."""
    oracle = Oracle(3, cap)
    seen: list[Any] = []
    with SwRig(kernels, cap=cap) as rig:
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
            elif op[0] == "tick":
                oracle.now += op[1]
                rig.fwd.set_now(oracle.now)
            else:
                assert rig.fwd.age(oracle.now, op[1]) == oracle.age(op[1]), (k, op)
        entries = rig.fwd.fdb_entries()
        assert {m: (t, s) for m, t, _, s in entries} == {
            m: (e[0], e[1]) for m, e in oracle.fdb.items()}
        assert all(not static for _, _, static, _ in entries)
        c = rig.fwd.counters()
        assert c["fdb_full"] == oracle.full
        assert c["inside_packets"] + c["flooded_copies"] - c["inside_no_route"] >= \
            c["forwarded_packets"]
        assert c["outside_packets"] == c["delivered_packets"] + sum(
            c[r] for r in DROP_REASONS if r.startswith("outside"))
        return {"seen": seen, "counters": c, "fdb": entries,
                "peer_counters": rig.fwd.peer_counters()}


@settings(max_examples=50, deadline=None, suppress_health_check=FIXTURE_OK)
@given(ops=st.lists(OPS, max_size=30), cap=st.integers(1, 6))
def test_switch_matches_oracle_and_twin(kernel_pair: tuple[ModuleType, ModuleType],
                                        ops: list[tuple[Any, ...]], cap: int) -> None:
    results = [run_ops(kernels, ops, cap) for kernels in kernel_pair]
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
