"""Per-peer counters mean the same on every backend and in both kernels.

Two nodes in one process (in-memory devices, real UDP on 127.0.0.x), for udp, vxlan routed and
vxlan switched: the bytes a node counts toward a peer are the inner bytes it read from its
device (``inside_bytes``), not the datagrams with the VXLAN and inner Ethernet headers it wrote
in front; the peer counts the same bytes received; and a datagram from a known peer that fails
a check is that peer's drop (``rx_packets - peer_rx_accepted()``).
"""

from __future__ import annotations

import select
import socket
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import dpkt
import pytest
from test_loopback_mesh import drain, echo, free_port_on_all, implementations

from overlayd.control.local_node import build_local_view, build_switch_tables
from overlayd.control.subnet_map import SubnetMap, parse_subnet_map
from overlayd.dataplane import load_implementation
from overlayd.wire.ethernet import parse_mac

BACKENDS = {
    "udp": 'type = "udp"',
    "vxlan-routed": 'type = "vxlan"\nvni = 7',
    "vxlan-switched": 'type = "vxlan"\nmode = "switched"\nvni = 7',
}


@dataclass
class Node:
    device: socket.socket
    inner: socket.socket
    sock: socket.socket
    fwd: Any
    mac: bytes

    def close(self) -> None:
        for s in (self.device, self.inner, self.sock):
            s.close()


def two_node_map(backend: str, port: int) -> SubnetMap:
    nodes = "".join(f'[[nodes]]\nname = "n{i}"\nsubnet = "10.9.{i}.0/24"\n'
                    f'public_ip = "127.0.0.{i + 2}"\n' for i in range(2))
    text = (f'[network]\ncidr = "10.9.0.0/16"\nsubnet_len = 24\n'
            f'[backend]\n{BACKENDS[backend]}\nport = {port}\n{nodes}')
    return parse_subnet_map(tomllib.loads(text), "pair.toml")


def build(kernels: Any, smap: SubnetMap, i: int) -> Node:
    me = smap.nodes[i]
    view = build_local_view(smap, me, underlay_mtu=1500)
    device, inner = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((str(me.public_ip), smap.backend.port))
    for s in (device, inner, sock):
        s.setblocking(False)
    mac = parse_mac(me.vtep_mac) if me.vtep_mac else b""
    if smap.backend.type == "udp":
        fwd = kernels.UdpForwarder(inner.fileno(), sock.fileno(), 64)
        fwd.set_tables(view.tables)
    elif smap.backend.switched:
        fwd = kernels.VxlanSwitchForwarder(inner.fileno(), sock.fileno(), vni=7)
        fwd.set_tables(build_switch_tables(view, []))
    else:
        fwd = kernels.VxlanRoutedForwarder(inner.fileno(), sock.fileno(), mac, vni=7)
        fwd.set_tables(view.tables)
    return Node(device, inner, sock, fwd, mac)


@pytest.fixture(params=[(impl, backend) for impl in implementations() for backend in BACKENDS],
                ids=lambda p: f"{p[0]}-{p[1]}")
def pair(request: pytest.FixtureRequest) -> Iterator[tuple[str, list[Node]]]:
    impl, backend = request.param
    _, kernels = load_implementation(impl)
    smap = two_node_map(backend, free_port_on_all(2))
    nodes = [build(kernels, smap, i) for i in range(2)]
    yield backend, nodes
    for node in nodes:
        node.close()


def pump(nodes: list[Node], rounds: int = 5) -> None:
    for _ in range(rounds):
        select.select([n.sock for n in nodes], [], [], 0.05)
        moved = sum(n.fwd.inside_batch() + n.fwd.outside_batch() for n in nodes)
        if moved == 0:
            return


def packet(backend: str, size: int, seq: int) -> bytes:
    ip = echo("10.9.0.5", "10.9.1.7", seq=seq, size=size)
    if backend != "vxlan-switched":
        return ip
    # a frame from a VM behind n0's tap to one behind n1's (unknown yet: flooded to n1)
    return bytes(dpkt.ethernet.Ethernet(dst=bytes.fromhex("020000000b07"),
                                        src=bytes.fromhex("020000000a05"),
                                        type=0x0800, data=ip))


def test_peer_bytes_are_inner_bytes_on_every_backend(pair: tuple[str, list[Node]]) -> None:
    backend, (a, b) = pair
    sent = [packet(backend, size, seq) for seq, size in enumerate((10, 200, 1000, 1300))]
    for frame in sent:
        a.device.send(frame)
    pump([a, b])
    got = drain(b.device)
    assert len(got) == len(sent)
    inner = sum(len(f) for f in sent)
    assert a.fwd.counters()["inside_bytes"] == inner
    ((tx_packets, tx_bytes, _, _),) = a.fwd.peer_counters()
    assert (tx_packets, tx_bytes) == (len(sent), inner)   # no VXLAN/Ethernet header counted
    ((_, _, rx_packets, rx_bytes),) = b.fwd.peer_counters()
    assert (rx_packets, rx_bytes) == (len(sent), inner)   # what the sender counted
    assert sum(len(f) for f in got) == inner              # what the device got
    assert b.fwd.peer_rx_accepted() == [len(sent)]


def test_garbage_from_a_peer_is_that_peers_drop(pair: tuple[str, list[Node]]) -> None:
    _backend, (a, b) = pair
    a.device.send(packet(_backend, 50, 1))
    pump([a, b])
    assert len(drain(b.device)) == 1
    ((_, _, _, rx_bytes_before),) = b.fwd.peer_counters()
    target = b.sock.getsockname()
    a.sock.sendto(b"\x45" + bytes(40), target)     # long enough to parse, fails the checks
    a.sock.sendto(b"\x08", target)                 # shorter than any encapsulation header
    pump([a, b])
    assert drain(b.device) == []
    ((_, _, rx_packets, rx_bytes),) = b.fwd.peer_counters()
    assert rx_packets == 3 and b.fwd.peer_rx_accepted() == [1]     # 2 dropped from n0
    # inner bytes never go negative (the 1-byte datagram is shorter than any header)
    assert rx_bytes_before < rx_bytes <= rx_bytes_before + 42
