"""Helpers of the native-engine tests: non-blocking reads and the data-plane threads a process
runs (by the names cext/engine.pxi gives them)."""

from __future__ import annotations

import os
import socket


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
