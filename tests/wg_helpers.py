"""Helpers of the WireGuard tests: a UDP socket born inside a lab namespace, a minimal
transport-message codec used as an oracle (straight from the whitepaper, no overlayd code), and
the keypair-expiry scenario both engines must play alike (a driver per engine)."""

from __future__ import annotations

import ctypes
import os
import random
import select
import socket
import struct
import threading
from types import ModuleType
from typing import Any, Protocol

from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

CLONE_NEWNET = 0x40000000


def udp_socket_in_netns(ns: str, bind: tuple[str, int]) -> socket.socket:
    """A UDP socket created inside namespace ``ns`` (a socket keeps the namespace it was born
    in; only a short-lived thread enters it, so this process stays where it is)."""
    out: list[socket.socket | BaseException] = []

    def enter() -> None:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            fd = os.open(f"/run/netns/{ns}", os.O_RDONLY)
            try:
                if libc.setns(fd, CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), "setns")
            finally:
                os.close(fd)
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sock.bind(bind)
            out.append(sock)
        except BaseException as exc:  # noqa: BLE001 - handed to the caller
            out.append(exc)

    thread = threading.Thread(target=enter)
    thread.start()
    thread.join()
    if isinstance(out[0], BaseException):
        raise out[0]
    return out[0]


def seal_transport(receiver: int, counter: int, key: bytes, packet: bytes) -> bytes:
    padded = packet + bytes(-len(packet) % 16)
    nonce = bytes(4) + struct.pack("<Q", counter)
    return struct.pack("<B3xIQ", 4, receiver, counter) + ChaCha20Poly1305(key).encrypt(
        nonce, padded, b"")


def open_transport(datagram: bytes, key: bytes) -> tuple[int, int, bytes]:
    kind, receiver, counter = struct.unpack_from("<B3xIQ", datagram)
    assert kind == 4, f"not a transport message: type {kind}"
    nonce = bytes(4) + struct.pack("<Q", counter)
    return receiver, counter, ChaCha20Poly1305(key).decrypt(nonce, datagram[16:], b"")


# -- keypair expiry: one scenario, driven by set_now (the loop) or by the threads' own clocks --

EXPIRY_REJECT_S = 0.6      # REJECT_AFTER_TIME of the scenario (R): keypairs zeroed at 3R
EXPIRY_ME, EXPIRY_PEER = "10.0.2.0", "10.0.1.0"     # the forwarder's /24 and its peer's


def expiry_timings(reject: float = EXPIRY_REJECT_S) -> tuple[Any, ...]:
    """set_timings' arguments: REJECT_AFTER_TIME ``reject``, no rekey within the scenario."""
    return (100 * reject, reject, 1 << 60, (1 << 64) - (1 << 13) - 1, 100 * reject)


def expiry_tables(peer_ip: str, peer_port: int) -> Any:
    from overlayd.dataplane.tables import LOCAL, ForwardingTables, PeerEntry
    from overlayd.wire import ipv4

    me, peer = ipv4.addr_to_int(EXPIRY_ME), ipv4.addr_to_int(EXPIRY_PEER)
    entry = PeerEntry(ipv4.addr_to_int(peer_ip), peer_port, 1440, "peer",
                      public_key=bytes(range(32)))
    return ForwardingTables(me + 1, (entry,), ((me, 24, LOCAL), (peer, 24, 0)))


def expiry_packet(src: str, dst: str, payload: bytes) -> bytes:
    from overlayd.wire import ipv4

    return ipv4.build_header(source=ipv4.addr_to_int(src), destination=ipv4.addr_to_int(dst),
                             payload_length=len(payload), protocol=17, ttl=64) + payload


class ExpiryDriver(Protocol):
    forwarders: int             # how many forwarders hold each keypair

    def at(self, t: float) -> None:
        """Let the clock reach t x R after the start."""

    def install(self, local: int, remote: int, send_key: bytes, recv_key: bytes) -> Any:
        """An initiator's keypair for peer 0; returns its KeypairShare."""

    def probe(self, local: int, counters: list[int], recv_key: bytes) -> None:
        """One transport datagram per counter, under the keypair ``local``; returns once the
        data plane took them all."""

    def inside(self) -> None:
        """One packet for the peer into each device; returns once all were read."""

    def counters(self) -> dict[str, int]: ...

    def sessions(self) -> list[tuple[int, float]]: ...


def expiry_scenario(d: ExpiryDriver) -> list[tuple[list[float], dict[str, int],
                                                   list[tuple[int, float]]]]:
    """Two keypairs of one peer, made at 0 and 1.5R, through REJECT_AFTER_TIME (R: refused as
    wg_stale_keypair, packets held) and 3R (zeroed: wg_unknown_index, no holder left). Per
    step: the share of forwarders still holding each keypair before anything is sent (so an
    idle data plane's zeroing shows), then the counters and sessions() after the traffic."""
    rng = random.Random(12)
    keys = [(rng.randbytes(32), rng.randbytes(32)) for _ in range(2)]
    shares: list[Any] = []
    out: list[tuple[list[float], dict[str, int], list[tuple[int, float]]]] = []

    def step(t: float, probes: list[tuple[int, int]], inside: bool = False) -> None:
        d.at(t)
        held = [share.holders / d.forwarders for share in shares]
        for k, first in probes:
            d.probe(1001 + k, [first, first + 1], keys[k][1])
        if inside:
            d.inside()
        out.append((held, d.counters(), d.sessions()))

    d.at(0.0)
    shares.append(d.install(1001, 2001, *keys[0]))
    step(0.5, [(0, 0)])                           # delivered
    d.at(1.5)
    shares.append(d.install(1002, 2002, *keys[1]))
    step(2.0, [(0, 2), (1, 0)])                   # the first stale, the second delivered
    step(3.5, [(0, 4), (1, 2)], inside=True)      # the first zeroed, the second stale: held
    step(5.0, [(1, 4)])                           # the second zeroed too
    return out


EXPIRY_EXPECTED = [   # (holders, {counter: value}, sessions as (keypairs, age in R))
    ([1.0], {"delivered_packets": 2}, [(1, 0.5)]),
    ([1.0, 1.0], {"delivered_packets": 4, "wg_stale_keypair": 2}, [(2, 0.5)]),
    ([0.0, 1.0], {"delivered_packets": 4, "wg_stale_keypair": 4, "wg_unknown_index": 2,
                  "wg_staged": 2}, [(1, 2.0)]),
    ([0.0, 0.0], {"delivered_packets": 4, "wg_stale_keypair": 4, "wg_unknown_index": 4,
                  "wg_staged": 2}, [(0, -1.0 / EXPIRY_REJECT_S)]),
]


def check_expiry(result: list[Any], age_slack: float = 1e-6) -> None:
    """The scenario's outcome against what the whitepaper's timers say (EXPIRY_EXPECTED)."""
    assert len(result) == len(EXPIRY_EXPECTED)
    for (held, counters, sessions), (want_held, want, want_sessions) in zip(
            result, EXPIRY_EXPECTED, strict=True):
        assert held == want_held, (held, want_held)
        assert {k: counters.get(k, 0) for k in want} == want, counters
        assert [n for n, _ in sessions] == [n for n, _ in want_sessions]
        for (_, age), (_, want_age) in zip(sessions, want_sessions, strict=True):
            assert abs(age / EXPIRY_REJECT_S - want_age) <= age_slack, (age, want_age)


class LoopExpiryDriver:
    """One forwarder of ``kernels`` driven as the loop engine drives it: set_now is its clock.
    A probe's datagrams come from ``senders`` source ports in turn (as the threads driver's, one
    per thread's socket), and ``inside`` writes one packet per thread the other driver has."""

    forwarders = 1

    def __init__(self, kernels: ModuleType, t0: float = 100.0, senders: int = 2,
                 devices: int = 2) -> None:
        from overlayd.wire import wireguard as wg

        self.kernels, self.t0, self.devices = kernels, t0, devices
        self.app, self.dev = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.3", 0))
        self.sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sink.bind(("127.0.0.2", 0))
        self.senders = []
        for _ in range(senders):
            self.senders.append(socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
            self.senders[-1].bind(("127.0.0.2", 0))
        for s in (self.app, self.dev, self.sock, self.sink):
            s.setblocking(False)
        self.fw = kernels.WireguardForwarder(self.dev.fileno(), self.sock.fileno(),
                                             wg.mac_key(wg.LABEL_MAC1, bytes(32)))
        self.fw.set_timings(*expiry_timings())
        self.fw.set_tables(expiry_tables(*self.sink.getsockname()))

    def close(self) -> None:
        self.fw = None
        for s in (self.app, self.dev, self.sock, self.sink, *self.senders):
            s.close()

    def at(self, t: float) -> None:
        self.fw.set_now(self.t0 + t * EXPIRY_REJECT_S)

    def install(self, local: int, remote: int, send_key: bytes, recv_key: bytes) -> Any:
        share = self.kernels.KeypairShare()
        self.fw.install_keypair(0, local, remote, send_key, recv_key, True, share)
        return share

    def probe(self, local: int, counters: list[int], recv_key: bytes) -> None:
        want = self.fw.counters()["outside_packets"] + len(counters)
        for i, counter in enumerate(counters):
            datagram = seal_transport(local, counter, recv_key, expiry_packet(
                "10.0.1.5", "10.0.2.9", counter.to_bytes(2, "big")))
            self.senders[i % len(self.senders)].sendto(datagram, self.sock.getsockname())
        while self.fw.counters()["outside_packets"] < want:
            assert select.select([self.sock], [], [], 2.0)[0], "a probe did not arrive"
            self.fw.outside_batch()

    def inside(self) -> None:
        for i in range(self.devices):
            self.app.send(expiry_packet("10.0.2.9", "10.0.1.5", bytes([i])))
        self.fw.inside_batch()

    def counters(self) -> dict[str, int]:
        return {k: v for k, v in self.fw.counters().items() if v}

    def sessions(self) -> list[tuple[int, float]]:
        return list(self.fw.sessions())
