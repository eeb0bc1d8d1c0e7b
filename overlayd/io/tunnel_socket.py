"""The UDP socket that carries the tunnel: bound, non-blocking, with large buffers."""

from __future__ import annotations

import errno
import ipaddress
import socket

from overlayd.errors import EX_NOPERM, EX_OSERR, StartupError

# Linux: let the kernel fragment an outer datagram larger than the path instead of refusing it.
# Inner DF packets that do not fit are answered with frag-needed by the data plane before this.
IP_MTU_DISCOVER = getattr(socket, "IP_MTU_DISCOVER", 10)
IP_PMTUDISC_DONT = getattr(socket, "IP_PMTUDISC_DONT", 0)
SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)
SO_SNDBUFFORCE = getattr(socket, "SO_SNDBUFFORCE", 32)


def open_tunnel_socket(address: ipaddress.IPv4Address, port: int,
                       buffer_bytes: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sock.setsockopt(socket.IPPROTO_IP, IP_MTU_DISCOVER, IP_PMTUDISC_DONT)
        _set_buffers(sock, buffer_bytes)
        sock.bind((str(address), port))
    except OSError as exc:
        sock.close()
        where = f"{address}:{port}"
        if exc.errno == errno.EADDRINUSE:
            raise StartupError(f"UDP port {where} is already in use (another overlayd or "
                               f"flanneld?): set [backend] port in the map", EX_OSERR) from None
        if exc.errno == errno.EADDRNOTAVAIL:
            raise StartupError(f"cannot bind UDP {where}: {address} is not an address of this "
                               f"host (set [tunnel] bind)", EX_OSERR) from None
        if exc.errno in (errno.EACCES, errno.EPERM):
            raise StartupError(f"not permitted to bind UDP {where}", EX_NOPERM) from None
        raise StartupError(f"cannot bind UDP {where}: {exc.strerror}", EX_OSERR) from None
    sock.setblocking(False)
    return sock


def _set_buffers(sock: socket.socket, size: int) -> None:
    """Ask for ``size`` bytes each way; the FORCE variants pass net.core.*mem_max as root."""
    for force, plain in ((SO_RCVBUFFORCE, socket.SO_RCVBUF), (SO_SNDBUFFORCE, socket.SO_SNDBUF)):
        try:
            sock.setsockopt(socket.SOL_SOCKET, force, size)
        except OSError:
            sock.setsockopt(socket.SOL_SOCKET, plain, size)
