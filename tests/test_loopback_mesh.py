"""Several nodes in one process: in-memory devices (socketpairs), real UDP on 127.0.0.x.

No root needed. Each node is built exactly as the daemon builds it — subnet map → local view →
forwarding tables → forwarder — only the tun device is replaced by one end of a datagram
socketpair (one read = one packet, like IFF_NO_PI). Runs with both data-plane implementations.
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import socket
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from types import ModuleType

import dpkt
import pytest
from engine_helpers import drain

from overlayd.control.local_node import LocalView, build_local_view
from overlayd.control.subnet_map import SubnetMap, parse_subnet_map
from overlayd.dataplane import load_implementation

NODES = 4


def implementations() -> list[str]:
    names = ["python"]
    try:
        load_implementation("cython")
        names.insert(0, "cython")
    except ImportError:
        if os.environ.get("OVERLAYD_DATAPLANE") == "cython":
            raise
    return names


@dataclass
class Node:
    view: LocalView
    device: socket.socket       # our end of the "tun": what the kernel would see
    inner: socket.socket        # the forwarder's end
    sock: socket.socket
    forwarder: object

    def close(self) -> None:
        for s in (self.device, self.inner, self.sock):
            s.close()


def mesh_map(port: int) -> SubnetMap:
    nodes = "\n".join(
        f'[[nodes]]\nname = "n{i}"\nsubnet = "10.9.{i}.0/24"\npublic_ip = "127.0.0.{i + 2}"\n'
        for i in range(NODES))
    text = (f'[network]\ncidr = "10.9.0.0/16"\nsubnet_len = 24\n'
            f'[backend]\ntype = "udp"\nport = {port}\n{nodes}')
    return parse_subnet_map(tomllib.loads(text), "mesh.toml")


def free_port_on_all(count: int) -> int:
    """A port free on 127.0.0.2..(count+1) at once (every node binds the same port, as in a map)."""
    for _ in range(50):
        probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        probe.bind(("127.0.0.2", 0))
        port = probe.getsockname()[1]
        probe.close()
        socks = []
        try:
            for i in range(count):
                s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                socks.append(s)
                s.bind((f"127.0.0.{i + 2}", port))
            return port
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no common free port")


@pytest.fixture(params=implementations())
def mesh(request: pytest.FixtureRequest) -> Iterator[list[Node]]:
    _, kernels = load_implementation(request.param)
    port = free_port_on_all(NODES)
    smap = mesh_map(port)
    nodes = [build_node(kernels, smap, i, port) for i in range(NODES)]
    yield nodes
    for node in nodes:
        node.close()


def build_node(kernels: ModuleType, smap: SubnetMap, i: int, port: int) -> Node:
    view = build_local_view(smap, smap.nodes[i], underlay_mtu=1500)
    device, inner = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    for s in (device, inner):
        s.setblocking(False)
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((f"127.0.0.{i + 2}", port))
    sock.setblocking(False)
    forwarder = kernels.UdpForwarder(inner.fileno(), sock.fileno(), 64)
    forwarder.set_tables(view.tables)
    return Node(view, device, inner, sock, forwarder)


def echo(src: str, dst: str, seq: int, ttl: int = 64, size: int = 32) -> bytes:
    icmp = dpkt.icmp.ICMP(type=8, code=0,
                          data=dpkt.icmp.ICMP.Echo(id=7, seq=seq, data=bytes(size)))
    ip = dpkt.ip.IP(src=socket.inet_aton(src), dst=socket.inet_aton(dst), p=1, ttl=ttl,
                    data=icmp)
    ip.len = len(bytes(ip))
    return bytes(ip)


def pump(nodes: list[Node], rounds: int = 5) -> None:
    """Run every forwarder in both directions until nothing moves (bounded)."""
    import select
    for _ in range(rounds):
        select.select([n.sock for n in nodes], [], [], 0.05)
        moved = 0
        for node in nodes:
            moved += node.forwarder.inside_batch()
            moved += node.forwarder.outside_batch()
        if moved == 0:
            return


def test_every_pair_delivers_exact_packets(mesh: list[Node]) -> None:
    for a in range(NODES):
        for b in range(NODES):
            if a == b:
                continue
            packet = echo(f"10.9.{a}.5", f"10.9.{b}.7", seq=a * 10 + b)
            mesh[a].device.send(packet)
            pump(mesh)
            (got,) = drain(mesh[b].device)
            sent, arrived = dpkt.ip.IP(packet), dpkt.ip.IP(got)
            assert arrived.ttl == sent.ttl - 1           # routed once, by the sending daemon
            assert got[:8] == packet[:8] and got[12:] == packet[12:]   # only TTL + checksum
            assert dpkt.ip.IP(got).sum == _recomputed_checksum(got)
            for other in range(NODES):
                if other != b:
                    assert drain(mesh[other].device) == []
    for node in mesh:
        counters = node.forwarder.counters()
        assert counters["forwarded_packets"] == NODES - 1
        assert counters["delivered_packets"] == NODES - 1
        peers = node.forwarder.peer_counters()
        assert [p[0] for p in peers] == [1] * (NODES - 1)   # one tx to each peer
        assert [p[2] for p in peers] == [1] * (NODES - 1)   # one rx from each peer


def _recomputed_checksum(packet: bytes) -> int:
    header = bytearray(packet[:20])
    header[10:12] = b"\0\0"
    total = sum(int.from_bytes(header[i:i + 2], "big") for i in range(0, 20, 2))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def test_spoofed_source_and_stranger_are_dropped(mesh: list[Node]) -> None:
    # n1 claims a source in n2's subnet: n0 must refuse it.
    spoofed = echo("10.9.2.5", "10.9.0.7", seq=1)
    mesh[1].sock.sendto(spoofed, ("127.0.0.2", mesh[0].sock.getsockname()[1]))
    stranger = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    stranger.bind(("127.0.0.99", 0))
    stranger.sendto(echo("10.9.1.5", "10.9.0.7", seq=2),
                    ("127.0.0.2", mesh[0].sock.getsockname()[1]))
    stranger.close()
    pump(mesh)
    assert drain(mesh[0].device) == []
    counters = mesh[0].forwarder.counters()
    assert counters["outside_spoofed_source"] == 1
    assert counters["outside_unknown_peer"] == 1
    assert counters["delivered_packets"] == 0


def test_ttl_and_unreachable_answered_from_overlay_address(mesh: list[Node]) -> None:
    mesh[0].device.send(echo("10.9.0.5", "10.9.1.7", seq=1, ttl=1))
    mesh[0].device.send(echo("10.9.0.5", "10.9.200.7", seq=2))
    pump(mesh)
    replies = [dpkt.ip.IP(p) for p in drain(mesh[0].device)]
    assert [(r.data.type, r.data.code) for r in replies] == [(11, 0), (3, 0)]
    assert all(r.src == socket.inet_aton("10.9.0.0") for r in replies)
    assert all(r.dst == socket.inet_aton("10.9.0.5") for r in replies)
    assert drain(mesh[1].device) == []


def test_asyncio_readers_move_a_burst(mesh: list[Node]) -> None:
    """The runtime's shape: one reader per fd, one batch call per wake-up, under uvloop."""
    import uvloop

    burst = 2000
    received: list[bytes] = []

    async def main() -> None:
        loop = asyncio.get_running_loop()
        for node in mesh:
            loop.add_reader(node.inner.fileno(), node.forwarder.inside_batch)
            loop.add_reader(node.sock.fileno(), node.forwarder.outside_batch)
        loop.add_reader(mesh[3].device.fileno(), lambda: received.extend(drain(mesh[3].device)))
        for seq in range(burst):
            while True:
                try:
                    mesh[0].device.send(echo("10.9.0.5", "10.9.3.7", seq=seq % 65536))
                    break
                except BlockingIOError:
                    await asyncio.sleep(0.001)
        for _ in range(200):             # bounded: at most ~2 s
            if len(received) >= burst:
                break
            await asyncio.sleep(0.01)
        for node in mesh:
            loop.remove_reader(node.inner.fileno())
            loop.remove_reader(node.sock.fileno())
        loop.remove_reader(mesh[3].device.fileno())

    uvloop.run(main())
    seqs = sorted(dpkt.icmp.ICMP.Echo(bytes(dpkt.ip.IP(p).data.data)).seq for p in received)
    # UDP on loopback may drop under a burst, but never corrupts or misroutes.
    assert len(received) >= burst * 0.9
    assert len(set(seqs)) == len(seqs)
    inside, _ = mesh[0].forwarder.batch_histogram()
    assert sum(inside) >= 1
    assert ipaddress.IPv4Address(dpkt.ip.IP(received[0]).dst) == ipaddress.IPv4Address("10.9.3.7")
