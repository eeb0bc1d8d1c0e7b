"""The UDP socket that carries the tunnel: bound, non-blocking, with large buffers."""

from __future__ import annotations

import ctypes
import errno
import ipaddress
import socket
import struct

from overlayd.errors import EX_NOPERM, EX_OSERR, StartupError

# Linux: let the kernel fragment an outer datagram larger than the path instead of refusing it.
# Inner DF packets that do not fit are answered with frag-needed by the data plane before this.
IP_MTU_DISCOVER = getattr(socket, "IP_MTU_DISCOVER", 10)
IP_PMTUDISC_DONT = getattr(socket, "IP_PMTUDISC_DONT", 0)
SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)
SO_SNDBUFFORCE = getattr(socket, "SO_SNDBUFFORCE", 32)
SOL_UDP = getattr(socket, "SOL_UDP", 17)
UDP_SEGMENT = getattr(socket, "UDP_SEGMENT", 103)   # Linux 4.18
UDP_GRO = getattr(socket, "UDP_GRO", 104)           # Linux 5.0


def open_tunnel_socket(address: ipaddress.IPv4Address, port: int,
                       buffer_bytes: int, reuse_port: bool = False) -> socket.socket:
    """reuse_port: one of several receive sockets on the port (one per data-plane thread);
    the kernel picks one per datagram by hash of its addresses and ports."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
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


# A classic BPF program of one instruction, "return 0": accept no datagram (linux/filter.h).
_DROP_ALL_BPF = struct.pack("=HBBI", 0x06, 0, 0, 0)        # BPF_RET | BPF_K, k = 0
SO_ATTACH_FILTER = getattr(socket, "SO_ATTACH_FILTER", 26)


def open_tx_socket(address: ipaddress.IPv4Address, buffer_bytes: int) -> socket.socket:
    """A socket datagrams only leave from (vxlan: one per outer source port). It is never
    read, yet anyone can send to its port: it takes no datagram at all (a socket filter that
    drops everything, before the receive queue) and keeps the smallest receive buffer, so no
    flood can park memory in it until a restart."""
    sock = open_tunnel_socket(address, 0, buffer_bytes)
    try:
        refuse_all_datagrams(sock)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 0)     # the kernel's minimum
    except OSError as exc:
        sock.close()
        raise StartupError(f"cannot make the transmit socket on {address} deaf: "
                           f"{exc.strerror}", EX_OSERR) from None
    return sock


def refuse_all_datagrams(sock: socket.socket) -> None:
    program = ctypes.create_string_buffer(_DROP_ALL_BPF)
    fprog = struct.pack("HL", 1, ctypes.addressof(program))   # struct sock_fprog
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, fprog)


def _set_buffers(sock: socket.socket, size: int) -> None:
    """Ask for ``size`` bytes each way; the FORCE variants pass net.core.*mem_max as root."""
    for force, plain in ((SO_RCVBUFFORCE, socket.SO_RCVBUF), (SO_SNDBUFFORCE, socket.SO_SNDBUF)):
        try:
            sock.setsockopt(socket.SOL_SOCKET, force, size)
        except OSError:
            sock.setsockopt(socket.SOL_SOCKET, plain, size)


def udp_gso_supported(sock: socket.socket) -> bool:
    """Whether the kernel does UDP GSO (the data plane then asks for it per send, by cmsg).
    The socket-wide option is set and cleared again: it only probes."""
    try:
        sock.setsockopt(SOL_UDP, UDP_SEGMENT, 1400)
        sock.setsockopt(SOL_UDP, UDP_SEGMENT, 0)
    except OSError:
        return False
    return True


def enable_udp_gro(sock: socket.socket) -> bool:
    """Let the kernel hand over runs of datagrams from one sender in one receive (the data
    plane splits them by the UDP_GRO cmsg); False where the kernel has no UDP_GRO."""
    try:
        sock.setsockopt(SOL_UDP, UDP_GRO, 1)
    except OSError:
        return False
    return True
