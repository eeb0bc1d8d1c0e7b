"""The ``wireguard`` fuzz target: both WireguardForwarder kernels on the same keypair and input.

One input becomes: which side started the session (initiator or responder, so the "next"
keypair path is reached), a few packets read from the device, and up to 24 datagrams from the
underlay, each one of: a transport message sealed with the right key (a counter chosen to hit
the replay window: new, repeated, far ahead, far behind; an inner packet from the peer's subnet
or not), the same with bytes changed (forged), a handshake-sized message with a right or wrong
MAC1, a cookie reply, or any bytes. Properties: no exception; the two kernels give the same
datagrams, device writes, events and counters; every counter identity holds.
"""

from __future__ import annotations

import importlib
import select
import socket
from typing import Any

from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from overlayd.dataplane.counters import identity_violations
from overlayd.dataplane.tables import LOCAL, ForwardingTables, PeerEntry
from overlayd.fuzz.forwarders import Finding
from overlayd.fuzz.source import ByteSource
from overlayd.wire import ipv4
from overlayd.wire import wireguard as wg

NODE_IP, PEER_IP = "127.0.0.61", "127.0.0.62"
MAC1_KEY = bytes(range(32))
SEND_KEY, RECV_KEY = bytes(range(32, 64)), bytes(range(64, 96))
LOCAL_INDEX, REMOTE_INDEX = 0x1234, 0x5678
OURS, THEIRS = "10.9.1.0", "10.9.2.0"      # /24s: this node's, the peer's


def _packet(src: str, dst: str, payload: bytes) -> bytes:
    return ipv4.build_header(source=ipv4.addr_to_int(src), destination=ipv4.addr_to_int(dst),
                             payload_length=len(payload), protocol=17) + payload


def _sealed(counter: int, plain: bytes) -> bytes:
    nonce = b"\0\0\0\0" + counter.to_bytes(8, "little")
    return (wg.pack_transport_header(LOCAL_INDEX, counter)
            + ChaCha20Poly1305(RECV_KEY).encrypt(nonce, plain, None))


def _datagram(src: ByteSource, last: list[int]) -> bytes:
    kind = src.below(6)
    if kind <= 1:
        choice = src.below(4)
        counter = (last[0] + 1 + src.below(3) if choice == 0 else
                   max(0, last[0] - src.below(40)) if choice == 1 else
                   last[0] + src.between(2000, 5000) if choice == 2 else src.below(8))
        last[0] = max(last[0], counter)
        inner = _packet(f"10.9.{2 if src.flag(85) else 7}.{src.between(1, 254)}",
                        f"{OURS[:-1]}{src.between(1, 254)}", src.blob(60))
        plain = b"" if src.flag(10) else inner + bytes(src.below(16))
        sealed = _sealed(counter, plain)
        return sealed if kind == 0 else src.mutate(sealed, 3)
    if kind == 2:
        size = src.choice((wg.INITIATION_LEN, wg.RESPONSE_LEN))
        body = bytes([1 if size == wg.INITIATION_LEN else 2, 0, 0, 0]) + src.take(size - 36)
        body = body.ljust(size - 32, b"\0")
        return wg.with_macs(body, MAC1_KEY if src.flag(70) else bytes(32), None)
    if kind == 3:
        return wg.pack_cookie_reply(src.uint(4), src.take(24).ljust(24, b"\0"),
                                    src.take(32).ljust(32, b"\0"))
    return src.blob(200)


class WireguardTarget:
    def __init__(self) -> None:
        self._kernels = (importlib.import_module("overlayd._dataplane"),
                         importlib.import_module("overlayd.dataplane.python_kernels"))
        self._peer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._peer.bind((PEER_IP, 0))
        self._peer.setblocking(False)

    def close(self) -> None:
        self._peer.close()

    def __call__(self, data: bytes) -> set[str]:
        src = ByteSource(data)
        initiator = src.flag()
        last = [0]
        outside = [_datagram(src, last) for _ in range(src.between(1, 24))]
        inside = [_packet(f"{OURS[:-1]}{src.between(1, 254)}", f"{THEIRS[:-1]}9",
                          src.blob(300)) for _ in range(src.below(4))]
        results = [self._run(kernels, initiator, inside, outside) for kernels in self._kernels]
        if results[0] != results[1]:
            names = ("datagrams", "device writes", "events", "counters")
            diff = next(n for n, a, b in zip(names, results[0], results[1], strict=True) if a != b)
            raise Finding(f"wireguard: the kernels differ in {diff}")
        counters = results[0][3]
        return {"initiator" if initiator else "responder",
                *(name for name, value in counters.items() if value)}

    def _run(self, kernels: Any, initiator: bool, inside: list[bytes],
             outside: list[bytes]) -> tuple[Any, ...]:
        app, dev = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        fw: Any = None
        try:
            for s in (app, dev, sock):
                s.setblocking(False)
            sock.bind((NODE_IP, 0))
            fw = kernels.WireguardForwarder(dev.fileno(), sock.fileno(), MAC1_KEY)
            fw.set_now(10.0)
            peer = PeerEntry(ipv4.addr_to_int(PEER_IP), self._peer.getsockname()[1], 1440,
                             "peer", public_key=bytes(32))
            fw.set_tables(ForwardingTables(ipv4.addr_to_int(OURS) + 1, (peer,), (
                (ipv4.addr_to_int(OURS), 24, LOCAL), (ipv4.addr_to_int(THEIRS), 24, 0))))
            fw.install_keypair(0, LOCAL_INDEX, REMOTE_INDEX, SEND_KEY, RECV_KEY, initiator)
            for packet in inside:
                app.send(packet)
            fw.inside_batch()
            sent = _drain(self._peer)
            for datagram in outside:
                self._peer.sendto(datagram, (NODE_IP, sock.getsockname()[1]))
            for _ in range(8):
                if not select.select([sock], [], [], 0.05)[0] or not fw.outside_batch():
                    break
            writes = _drain(app)
            events = [(e[0], e[1], e[2]) for e in fw.drain_events()]
            counters = fw.counters()
            problems = identity_violations(counters, fw.peer_counters())
            if problems:
                raise Finding(f"wireguard ({kernels.IMPLEMENTATION}): {problems}")
            return sent, writes, events, counters
        finally:
            fw = None       # the forwarder goes before the fds it uses
            for s in (app, dev, sock):
                s.close()


def _drain(sock: socket.socket) -> list[bytes]:
    out = []
    while select.select([sock], [], [], 0.02)[0]:
        try:
            out.append(sock.recv(65536))
        except BlockingIOError:
            break
    return out
