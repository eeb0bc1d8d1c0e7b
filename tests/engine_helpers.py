"""Helpers of the native-engine tests: receive sockets sharing one port, non-blocking reads and
the data-plane threads a process runs (by the names cext/engine.pxi gives them)."""

from __future__ import annotations

import os
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
