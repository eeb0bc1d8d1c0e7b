"""Helpers of the native-engine tests: receive sockets sharing one port (and senders aimed at
each of them), non-blocking reads and the data-plane threads a process runs (by the names
cext/engine.pxi gives them)."""

from __future__ import annotations

import os
import select
import socket


def reuseport_sockets(ip: str, count: int) -> list[socket.socket]:
    """``count`` non-blocking UDP sockets bound to one (free) port of ``ip`` with SO_REUSEPORT,
    as the engine gives each thread its own receive socket."""
    socks: list[socket.socket] = []
    for _ in range(count):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        sock.bind((ip, socks[0].getsockname()[1] if socks else 0))
        sock.setblocking(False)
        socks.append(sock)
    return socks


def senders_to_each(ip: str, receivers: list[socket.socket],
                    tries: int = 256) -> list[socket.socket]:
    """Per receive socket of one SO_REUSEPORT group (not yet read by any thread), a UDP socket
    bound on ``ip`` whose datagrams the kernel hashes to it (the hash of a 4-tuple is stable
    while the group stays the same), so a test can aim at one thread's socket."""
    found: dict[int, socket.socket] = {}
    target = receivers[0].getsockname()
    for _ in range(tries):
        sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sender.bind((ip, 0))
        sender.sendto(b"which socket", target)
        ready = select.select(receivers, [], [], 1.0)[0]
        assert ready, "a calibration datagram did not arrive"
        index = receivers.index(ready[0])
        drain(ready[0])
        if index in found:
            sender.close()
        else:
            found[index] = sender
        if len(found) == len(receivers):
            return [found[i] for i in range(len(receivers))]
    for sender in found.values():
        sender.close()
    raise AssertionError(f"no source port reached every one of {len(receivers)} sockets")


def drain(sock: socket.socket) -> list[bytes]:
    """Every datagram waiting on a non-blocking socket."""
    out = []
    while True:
        try:
            out.append(sock.recv(65536))
        except BlockingIOError:
            return out


def dataplane_threads(pid: int | str = "self") -> list[str]:
    """The names of the overlayd-dp* threads of process ``pid``, sorted."""
    names = []
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/comm") as f:
                names.append(f.read().strip())
        except FileNotFoundError:
            pass
    return sorted(n for n in names if n.startswith("overlayd-dp"))
