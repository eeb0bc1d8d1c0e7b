"""Cookies (whitepaper section 5.4.7): what makes a handshake flood cheap to refuse.

Responder (``CookieChecker``): while under load, a handshake message whose MAC2 is not keyed
with a cookie for its source address is not processed; we answer with a cookie reply instead.
The cookie is MAC(secret, source ip || port) with a secret that changes every two minutes, so
it proves the sender can receive at that address. Initiator (``CookieJar``): keeps the cookie a
peer sent (valid for two minutes minus a margin) and keys MAC2 of its next messages with it.
Times are monotonic seconds passed in.
"""

from __future__ import annotations

import os
import socket
import struct
from typing import Final

from overlayd.control.wg_noise import DecryptError, xaead_decrypt, xaead_encrypt
from overlayd.wire import wireguard as wg

COOKIE_REFRESH_TIME: Final = 120.0       # seconds a secret (and so a cookie) lives
_COOKIE_MARGIN: Final = 5.0              # the initiator stops using a cookie this much earlier


def source_bytes(address: tuple[str, int]) -> bytes:
    """The sender address a cookie is bound to: IPv4 (4 bytes) + port (2 bytes, big endian)."""
    return socket.inet_aton(address[0]) + struct.pack(">H", address[1])


class CookieChecker:
    """Our side as responder: MAC2 checks and cookie replies."""

    def __init__(self, cookie_key: bytes) -> None:
        self._cookie_key = cookie_key       # HASH("cookie--" || our public key)
        self._secret = os.urandom(32)
        self._secret_at = float("-inf")

    def _cookie(self, address: tuple[str, int], now: float) -> bytes:
        if now - self._secret_at >= COOKIE_REFRESH_TIME:
            self._secret = os.urandom(32)
            self._secret_at = now
        return wg.mac(self._secret, source_bytes(address))

    def mac2_valid(self, message: bytes, address: tuple[str, int], now: float) -> bool:
        return wg.mac2_valid(message, self._cookie(address, now))

    def reply(self, message: bytes, address: tuple[str, int], now: float) -> bytes:
        """The cookie reply to a handshake message (its MAC1 is the AEAD's associated data)."""
        sender = int.from_bytes(message[4:8], "little")
        mac1 = message[-2 * wg.MAC_LEN:-wg.MAC_LEN]
        nonce = os.urandom(wg.COOKIE_NONCE_LEN)
        sealed = xaead_encrypt(self._cookie_key, nonce, self._cookie(address, now), mac1)
        return wg.pack_cookie_reply(sender, nonce, sealed)


class CookieJar:
    """Our side as initiator toward one peer: the cookie it gave us, if still fresh."""

    def __init__(self, peer_cookie_key: bytes) -> None:
        self._key = peer_cookie_key         # HASH("cookie--" || the peer's public key)
        self._cookie: bytes | None = None
        self._received_at = float("-inf")
        self.last_mac1 = b""                # MAC1 of our last handshake message to the peer

    def consume(self, reply: bytes, now: float) -> bool:
        """Take a cookie reply to our last message; False if it does not decrypt."""
        if not self.last_mac1:
            return False
        _, nonce, sealed = wg.unpack_cookie_reply(reply)
        try:
            self._cookie = xaead_decrypt(self._key, nonce, sealed, self.last_mac1)
        except DecryptError:
            return False
        self._received_at = now
        return True

    def seal(self, body: bytes, mac1_key: bytes, now: float) -> bytes:
        """A handshake message body with MAC1 and (with a fresh cookie) MAC2."""
        fresh = now - self._received_at < COOKIE_REFRESH_TIME - _COOKIE_MARGIN
        message = wg.with_macs(body, mac1_key, self._cookie if fresh else None)
        self.last_mac1 = message[-2 * wg.MAC_LEN:-wg.MAC_LEN]
        return message
