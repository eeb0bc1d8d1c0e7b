"""The data plane's capture hook (set_capture/drain_capture), both implementations.

What `overlayd capture` relies on: nothing is copied while capture is off; while on, each
forwarded packet (inside, with its peer; a flood once, peer -1) and each delivered one (outside,
with the sending peer) is recorded as the device sees it (IPv4 on tun paths, the Ethernet frame
on the tap path); the buffer is bounded and what does not fit is counted as capture_dropped;
the Cython kernel and the pure-Python twin record the same thing for the same traffic.
Rigs (sockets standing in for devices, loopback peers) come from the forwarder tests.
"""

from __future__ import annotations

import time
from types import ModuleType
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_forwarder import FIXTURE_OK, Rig, inner_packets, overlay, packet
from test_vxlan_routed_forwarder import OUR_MAC, VxRig
from test_vxlan_routed_forwarder import encap as routed_encap
from test_vxlan_switch_forwarder import BCAST, SwRig, frame, mac
from test_vxlan_switch_forwarder import encap as switch_encap

INSIDE, OUTSIDE = 0, 1



def drain(rig: Any) -> list[tuple[int, int, bytes]]:
    """The drained records without their timestamps, which must be recent Unix times."""
    records = rig.fwd.drain_capture()
    now = time.time()
    assert all(type(ts) is float and now - 60 < ts <= now for *_, ts in records), records
    return [(d, p, b) for d, p, b, _ts in records]


def ttl_minus_one(pkt: bytes) -> bytes:
    """``pkt`` as forwarded: TTL - 1 and its header checksum fixed (RFC 1624)."""
    out = bytearray(pkt)
    out[8] -= 1
    csum = int.from_bytes(out[10:12], "big") + 0x0100
    out[10:12] = ((csum & 0xFFFF) + (csum >> 16)).to_bytes(2, "big")
    return bytes(out)


def udp_run(kernels: ModuleType, inside: list[bytes], outside: list[tuple[int, bytes]],
            *, enabled: bool = True, batch_size: int = 64) -> dict[str, Any]:
    with Rig(kernels, batch_size=batch_size) as rig:
        rig.fwd.set_capture(enabled)
        rig.send_inside(*inside)
        rig.drain_inside()
        for sender, data in outside:
            rig.send_outside(rig.peers[sender], data)
        rig.drain_outside(len(outside))
        records = drain(rig)
        again = drain(rig)
        return {"records": records, "again": again, "counters": rig.fwd.counters()}


def test_udp_records_forwarded_and_delivered(kernels: ModuleType) -> None:
    to0 = packet(overlay(-1, 2), overlay(0), b"to peer 0")
    to2 = packet(overlay(-1, 2), overlay(2), b"to peer 2")
    no_route = packet(overlay(-1, 2), "192.168.1.1", b"dropped")
    from1 = packet(overlay(1), overlay(-1, 2), b"from peer 1")
    spoofed = packet(overlay(2), overlay(-1, 2), b"from peer 1, claims peer 2")
    got = udp_run(kernels, [to0, no_route, to2], [(1, from1), (1, spoofed)])
    assert got["records"] == [
        (INSIDE, 0, ttl_minus_one(to0)),
        (INSIDE, 2, ttl_minus_one(to2)),
        (OUTSIDE, 1, from1),
    ]
    assert all(type(d) is int and type(p) is int and type(b) is bytes
               for d, p, b in got["records"])
    assert got["again"] == []          # drained means emptied
    assert got["counters"]["capture_dropped"] == 0


def test_disabled_records_nothing(kernels: ModuleType) -> None:
    to0 = packet(overlay(-1, 2), overlay(0))
    from1 = packet(overlay(1), overlay(-1, 2))
    got = udp_run(kernels, [to0] * 5, [(1, from1)] * 5, enabled=False)
    assert got["records"] == []
    assert got["counters"]["forwarded_packets"] == 5
    assert got["counters"]["delivered_packets"] == 5
    assert got["counters"]["capture_dropped"] == 0


def test_switching_off_keeps_what_was_copied(kernels: ModuleType) -> None:
    to0 = packet(overlay(-1, 2), overlay(0))
    with Rig(kernels) as rig:
        rig.fwd.set_capture(True)
        rig.send_inside(to0)
        rig.drain_inside()
        rig.fwd.set_capture(False)
        rig.send_inside(to0)
        rig.drain_inside()
        assert drain(rig) == [(INSIDE, 0, ttl_minus_one(to0))]
        assert rig.fwd.counters()["forwarded_packets"] == 2


def test_record_limit_counts_capture_dropped(kernels: ModuleType) -> None:
    limit = kernels.CAPTURE_RECORDS
    pkt = packet(overlay(-1, 2), overlay(0), b"x")
    total = limit + 7
    with Rig(kernels, batch_size=256) as rig:
        rig.fwd.set_capture(True)
        for start in range(0, total, 500):        # within the socketpair's buffer
            rig.send_inside(*[pkt] * min(500, total - start))
            rig.drain_inside()
        c = rig.fwd.counters()
        assert c["forwarded_packets"] + c["tx_error"] == total   # capture never drops traffic
        assert c["capture_dropped"] == 7
        assert len(drain(rig)) == limit
        rig.send_inside(pkt)                       # drained: room again
        rig.drain_inside()
        assert drain(rig) == [(INSIDE, 0, ttl_minus_one(pkt))]
        assert rig.fwd.counters()["capture_dropped"] == 7


def test_byte_limit_counts_capture_dropped(kernels: ModuleType) -> None:
    big = packet(overlay(-1, 2), overlay(0), b"\x00" * 60000)     # no DF: goes as one datagram
    fits = kernels.CAPTURE_BYTES // len(big)
    small = packet(overlay(-1, 2), overlay(0), b"small")
    with Rig(kernels, batch_size=16) as rig:
        rig.fwd.set_capture(True)
        for _ in range(fits + 2):
            rig.send_inside(big)
            rig.drain_inside()
        assert rig.fwd.counters()["capture_dropped"] == 2
        rig.send_inside(small)       # what still fits is still taken
        rig.drain_inside()
        records = drain(rig)
        assert len(records) == fits + 1 and records[-1][2] == ttl_minus_one(small)


@settings(max_examples=40, deadline=None, suppress_health_check=FIXTURE_OK)
@given(batch=st.lists(inner_packets(), max_size=20), batch_size=st.integers(1, 8),
       outside=st.lists(st.tuples(st.integers(0, 2), st.integers(0, 2)), max_size=8))
def test_udp_parity(kernel_pair: tuple[ModuleType, ModuleType], batch: list[bytes],
                    batch_size: int, outside: list[tuple[int, int]]) -> None:
    traffic = [(sender, packet(overlay(claimed, k + 1), overlay(-1, k + 2), ident=k))
               for k, (sender, claimed) in enumerate(outside)]
    results = [udp_run(kernels, batch, traffic, batch_size=batch_size)
               for kernels in kernel_pair]
    assert results[0] == results[1]
    c = results[0]["counters"]
    # Forwarded packets are recorded when queued, so a tx_error does not withdraw one.
    assert len(results[0]["records"]) == (c["forwarded_packets"] + c["tx_error"]
                                          + c["delivered_packets"])


def routed_run(kernels: ModuleType) -> list[tuple[int, int, bytes]]:
    to1 = packet(overlay(-1, 2), overlay(1), b"to peer 1", proto=17)
    from0 = packet(overlay(0), overlay(-1, 2), b"from peer 0")
    with VxRig(kernels) as rig:
        rig.fwd.set_capture(True)
        rig.send_inside(to1)
        rig.drain_inside()
        rig.send_outside(rig.peers[0], routed_encap(from0))
        rig.send_outside(rig.peers[0], routed_encap(from0, b"\x02" * 6))   # wrong inner MAC
        rig.drain_outside(2)
        records = drain(rig)
    assert records == [(INSIDE, 1, ttl_minus_one(to1)), (OUTSIDE, 0, from0)]
    return records


def test_vxlan_routed_records_inner_packets(kernel_pair: tuple[ModuleType, ModuleType]) -> None:
    assert routed_run(kernel_pair[0]) == routed_run(kernel_pair[1])
    assert OUR_MAC not in routed_run(kernel_pair[1])[1][2]


def switch_run(kernels: ModuleType) -> tuple[list[tuple[int, int, bytes]], dict[str, int]]:
    arp = frame(BCAST, mac(1), b"who has")                 # flood: all 3 peers, one record
    from_peer = frame(mac(1), mac(20), b"reply", 0x0800)   # learns mac(20) at peer 2
    unicast = frame(mac(20), mac(1), b"unicast", 0x0800)   # known: peer 2 only
    local = frame(mac(1), mac(2), b"stays")                # destination behind our tap
    with SwRig(kernels) as rig:
        rig.fwd.set_capture(True)
        rig.inside(arp)
        rig.outside(2, switch_encap(from_peer))
        rig.inside(unicast, local)
        records = drain(rig)
        counters = rig.fwd.counters()
    assert records == [(INSIDE, -1, arp), (OUTSIDE, 2, from_peer), (INSIDE, 2, unicast)]
    return records, counters


def test_vxlan_switched_records_frames(kernel_pair: tuple[ModuleType, ModuleType]) -> None:
    results = [switch_run(kernels) for kernels in kernel_pair]
    assert results[0] == results[1]
    assert results[0][1]["flooded_copies"] == 3


def test_records_carry_the_time_their_batch_read_them(kernels: ModuleType) -> None:
    """A request and its reply are read in different batches: their timestamps differ by the
    time between them, not by the drain's (the hub drains every 10 ms, after both)."""
    request = packet(overlay(-1, 2), overlay(0), b"request")
    reply = packet(overlay(0), overlay(-1, 2), b"reply")
    with Rig(kernels) as rig:
        rig.fwd.set_capture(True)
        before = time.time()
        rig.send_inside(request)
        rig.drain_inside()
        time.sleep(0.05)
        rig.send_outside(rig.peers[0], reply)
        rig.drain_outside(1)
        after = time.time()
        time.sleep(0.05)                       # the drain comes later still
        (sent, got) = rig.fwd.drain_capture()
    assert (sent[0], got[0]) == (INSIDE, OUTSIDE)
    assert before <= sent[3] < got[3] <= after
    assert got[3] - sent[3] >= 0.05


def test_what_readme_says_tcpdump_and_tshark_show(tmp_path: Any) -> None:
    """README: `tcpdump -e` shows the direction (Out / In); the peer's public IP is the cooked
    header's source address, which tshark shows as sll.src.ipv4 (tcpdump 4.99 prints none)."""
    import shutil
    import subprocess

    import dpkt

    from overlayd.ops.capture import LINKTYPE_LINUX_SLL, sll_frame

    if shutil.which("tcpdump") is None or shutil.which("tshark") is None:
        pytest.skip("tcpdump and tshark are needed (apt-get install tcpdump tshark)")
    ping = packet(overlay(-1, 2), overlay(0), b"ping")
    path = tmp_path / "c.pcap"
    with open(path, "wb") as f:
        writer = dpkt.pcap.Writer(f, linktype=LINKTYPE_LINUX_SLL)
        writer.writepkt(sll_frame(INSIDE, 0xC0A84D02, ping), ts=1.0)
        writer.writepkt(sll_frame(OUTSIDE, 0xC0A84D03, ping), ts=2.0)
    dump = subprocess.run(["tcpdump", "-nn", "-e", "-r", str(path)], capture_output=True,
                          text=True, timeout=30, check=True).stdout.splitlines()
    assert [line.split()[1] for line in dump] == ["Out", "In"]
    fields = subprocess.run(["tshark", "-r", str(path), "-T", "fields", "-e", "sll.pkttype",
                             "-e", "sll.src.ipv4"], capture_output=True, text=True, timeout=60,
                            check=True).stdout.split()
    assert fields == ["4", "192.168.77.2", "0", "192.168.77.3"]
