"""Helpers of the WireGuard tests: a UDP socket born inside a lab namespace, and a minimal
transport-message codec used as an oracle (straight from the whitepaper, no overlayd code)."""

from __future__ import annotations

import ctypes
import os
import socket
import struct
import threading

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
