"""The counter identities README.md states ("Counter identities") hold exactly, per direction,
per backend and per implementation, with offloads on and off.

A known mix of good and bad traffic goes through a forwarder in both directions (real UDP
sockets on 127.0.0.0/8, a datagram socketpair as the device); then every identity of
``counters.identity_violations`` must hold, and each kind of packet of the mix must have been
counted where it belongs (so a mix that silently missed its target cannot pass).
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Iterator
from types import ModuleType
from typing import Any

import pytest
from test_forwarder import STRANGER_IP, udp_socket
from test_offload import (
    MAC_A,
    MAC_B,
    OUR_MAC,
    VNI,
    OffloadRig,
    eth,
    fwd_kernels,  # noqa: F401  (fixture)
    overlay,
    tcp_packet,
    tso,
    udp_packet,
    vnet,
)

from overlayd.dataplane.counters import identity_violations

PATHS = ["udp", "routed", "switched"]
OURS = "10.0.0.9"


def vxlan_header(vni: int = VNI, flags: int = 8) -> bytes:
    return struct.pack("!BBHI", flags, 0, 0, vni << 8)


class Mix:
    """Sends the mix through one rig and says what each part should have counted."""

    def __init__(self, rig: OffloadRig, stranger: socket.socket) -> None:
        self.rig = rig
        self.stranger = stranger
        self.vnet = rig.fwd.offloads()["vnet_hdr"]

    def read(self, *packets: bytes) -> None:
        """Plain device reads (with a zero virtio header when the device has one)."""
        self.rig.read(*[bytes(10) * self.vnet + p for p in packets])

    def wire(self, inner: bytes, *, dst_mac: bytes = OUR_MAC) -> bytes:
        """The datagram a peer sends for an inner packet (routed) or frame (switched)."""
        if self.rig.path == "routed":
            return vxlan_header() + eth(inner, dst=dst_mac)
        if self.rig.path == "switched":
            return vxlan_header() + inner
        return inner

    def send(self, sender: int | None, *datagrams: bytes) -> None:
        sock = self.stranger if sender is None else self.rig.peers[sender]
        for d in datagrams:
            sock.sendto(d, self.rig.local.getsockname())
        self.rig.outside(len(datagrams))

    def routed_inside(self) -> None:
        self.read(tcp_packet(b"a" * 100, dst=overlay(0)), tcp_packet(b"b" * 100, dst=overlay(1)),
                  tcp_packet(b"c", dst="192.168.7.7"),                 # no route
                  tcp_packet(b"d", dst=overlay(0), ttl=1),             # ttl expired
                  tcp_packet(b"e", dst=OURS),                          # local destination
                  tcp_packet(b"f" * 1600, dst=overlay(0)),             # DF, too big
                  tcp_packet(b"g", dst=overlay(0))[:30],               # bad header
                  b"\x45\x00")                                         # too short
        if self.vnet:
            self.rig.read(tso(tcp_packet(bytes(3000), dst=overlay(0)), 1000),
                          vnet(0, 3, 40, 1000) + tcp_packet(bytes(2000), dst=overlay(0)),
                          b"\x00" * 5)                                  # two bad offloads

    def switched_inside(self) -> None:
        self.read(eth(udp_packet(b"to-b"), dst=MAC_B),                  # static at peer 0
                  eth(udp_packet(b"bcast"), dst=b"\xff" * 6),           # flooded
                  eth(udp_packet(b"unknown"), dst=bytes.fromhex("02000000aaaa")),  # flooded
                  eth(udp_packet(b"local"), dst=MAC_A, src=OUR_MAC),    # MAC_A is behind us
                  eth(udp_packet(b"mc-src"), src=bytes.fromhex("010000000001")),
                  b"\x02\x00\x00")                                      # runt
        if self.vnet:
            self.rig.read(tso(eth(tcp_packet(bytes(3000))), 1000, 14),
                          vnet(0, 4, 54, 1000) + eth(tcp_packet(bytes(2000))))

    def routed_outside(self) -> None:
        good = [tcp_packet(bytes([i]) * 500, src=overlay(0), dst=OURS, seq=1000 + 500 * i,
                           ident=i + 1) for i in range(3)]
        bad_checksum = bytearray(udp_packet(b"x", src=overlay(0), dst=OURS))
        bad_checksum[10] ^= 0xFF
        self.send(0, *map(self.wire, good))
        self.send(0, self.wire(udp_packet(b"s", src=overlay(1), dst=OURS)),       # spoofed
                  self.wire(udp_packet(b"n", src=overlay(0), dst=overlay(1))),    # not for us
                  self.wire(bytes(bad_checksum)), self.wire(b"\x45\x00\x00"))
        self.send(None, self.wire(udp_packet(b"?", src=overlay(0), dst=OURS)))    # stranger
        if self.rig.path == "routed":
            self.send(0, vxlan_header(flags=0) + eth(good[0], dst=OUR_MAC),
                      vxlan_header(vni=VNI + 1) + eth(good[0], dst=OUR_MAC),
                      self.wire(good[0], dst_mac=MAC_B))

    def switched_outside(self) -> None:
        good = [eth(tcp_packet(bytes([i]) * 500, seq=1000 + 500 * i, ident=i + 1),
                    dst=OUR_MAC, src=bytes.fromhex("0200000000c1")) for i in range(3)]
        self.send(0, *map(self.wire, good))
        self.send(1, self.wire(eth(udp_packet(b"split"), dst=MAC_B,
                                   src=bytes.fromhex("0200000000c2"))),  # MAC_B is at peer 0
                  self.wire(eth(udp_packet(b"mc"), src=bytes.fromhex("010000000002"))),
                  vxlan_header(vni=VNI + 1) + good[0], vxlan_header(flags=0) + good[0])
        self.send(None, self.wire(good[0]))

    def device_refuses(self) -> None:
        """The device stops taking writes: an ICMP error and a delivery both fail."""
        self.rig.app.shutdown(socket.SHUT_RD)
        if self.rig.path == "switched":
            self.send(0, self.wire(eth(udp_packet(b"late"), dst=OUR_MAC,
                                       src=bytes.fromhex("0200000000c3"))))
            return
        self.read(tcp_packet(b"h", dst="192.168.7.8"))
        self.send(0, self.wire(udp_packet(b"late", src=overlay(0), dst=OURS)))


@pytest.fixture
def stranger() -> Iterator[socket.socket]:
    sock = udp_socket(STRANGER_IP)
    yield sock
    sock.close()


@pytest.mark.parametrize("offloads", [True, False], ids=["offloads", "plain"])
@pytest.mark.parametrize("path", PATHS)
def test_identities_hold_for_a_known_mix(fwd_kernels: ModuleType, stranger: socket.socket,  # noqa: F811
                                         path: str, offloads: bool) -> None:
    rig = OffloadRig(fwd_kernels, path, vnet_hdr=offloads, udp_gso=offloads,
                     udp_gro=offloads)
    try:
        mix = Mix(rig, stranger)
        if path == "switched":
            mix.switched_inside()
            mix.switched_outside()
        else:
            mix.routed_inside()
            mix.routed_outside()
        rig.all_received(rig.fwd.counters()["forwarded_packets"])
        rig.device_writes()
        mix.device_refuses()
        c = rig.fwd.counters()
        assert identity_violations(c, rig.fwd.peer_counters()) == [], nonzero(c)
        expect_counted(c, path, offloads)
    finally:
        rig.close()


def nonzero(c: dict[str, int]) -> dict[str, int]:
    return {k: v for k, v in c.items() if v}


def expect_counted(c: dict[str, Any], path: str, offloads: bool) -> None:
    """Every part of the mix landed where it belongs (the identities alone would also hold for
    a mix that never reached the forwarder)."""
    want = {"outside_unknown_peer": 1, "device_write_error": 1, "outside_wrong_vni": 1,
            "outside_bad_vxlan_flags": 1}
    if path == "switched":
        want |= {"flooded_frames": 2, "flooded_copies": 4, "inside_local_destination": 1,
                 "inside_bad_source_mac": 1, "inside_runt_frame": 1,
                 "outside_bad_source_mac": 1, "outside_not_for_us": 1, "delivered_packets": 3}
    else:
        want |= {"inside_no_route": 2, "inside_ttl_expired": 1, "inside_local_destination": 1,
                 "inside_too_big": 1, "inside_bad_header": 1, "inside_too_short": 1,
                 "outside_spoofed_source": 1, "outside_not_for_us": 1,
                 "outside_bad_checksum": 1, "outside_too_short": 1, "icmp_write_error": 1,
                 "delivered_packets": 3}
        if path == "udp":
            del want["outside_wrong_vni"], want["outside_bad_vxlan_flags"]
        else:
            want["outside_wrong_inner_mac"] = 1
    if offloads:
        want["inside_bad_offload"] = 2 if path != "switched" else 1
        want["offload_segments"] = 3
    got = {k: c[k] for k in want}
    assert got == want, nonzero(c)
