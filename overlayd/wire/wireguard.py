"""WireGuard's four message formats (whitepaper section 5.4), stdlib only.

Every message starts with a 1-byte type and 3 reserved zero bytes; integers are little-endian.

  1 handshake initiation  148 bytes: sender, ephemeral 32, static 32+16, timestamp 12+16, mac1, mac2
  2 handshake response     92 bytes: sender, receiver, ephemeral 32, empty 0+16, mac1, mac2
  3 cookie reply           64 bytes: receiver, nonce 24, cookie 16+16
  4 transport data     >= 32 bytes: receiver, counter 8, packet (padded to 16) + tag 16

MAC1 is a keyed BLAKE2s-128 over the message up to mac1, keyed with HASH("mac1----" || the
receiver's static public key): anyone knowing the receiver's public key can make it, so it only
makes a datagram worth the receiver's X25519 work. MAC2 is keyed with a cookie the receiver
handed out to this source address (cookie reply), checked only while the receiver is under load.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from typing import Final

INITIATION: Final = 1
RESPONSE: Final = 2
COOKIE_REPLY: Final = 3
TRANSPORT: Final = 4

INITIATION_LEN: Final = 148
RESPONSE_LEN: Final = 92
COOKIE_REPLY_LEN: Final = 64
TRANSPORT_HEADER_LEN: Final = 16     # type + reserved, receiver index, counter
TAG_LEN: Final = 16                  # Poly1305
TRANSPORT_MIN_LEN: Final = TRANSPORT_HEADER_LEN + TAG_LEN   # a keepalive: empty payload
PADDING: Final = 16                  # plaintext is padded to a multiple of this (within the MTU)
MAC_LEN: Final = 16
COOKIE_NONCE_LEN: Final = 24
# Bytes a transport message adds to an inner packet over IPv4: IP 20 + UDP 8 + header + tag.
OVERHEAD_IPV4: Final = 20 + 8 + TRANSPORT_HEADER_LEN + TAG_LEN

LABEL_MAC1: Final = b"mac1----"
LABEL_COOKIE: Final = b"cookie--"

_INITIATION = struct.Struct("<B3xI32s48s28s16s16s")
_RESPONSE = struct.Struct("<B3xII32s16s16s16s")
_COOKIE_REPLY = struct.Struct("<B3xI24s32s")
_TRANSPORT_HEADER = struct.Struct("<B3xIQ")


def message_type(data: bytes | memoryview) -> int:
    """The type of a datagram, or 0 when it is not a well-formed WireGuard message (wrong length
    for its type, non-zero reserved bytes)."""
    n = len(data)
    if n < 4 or data[1] or data[2] or data[3]:
        return 0
    kind = data[0]
    if kind == TRANSPORT and n >= TRANSPORT_MIN_LEN:
        return kind
    if ((kind == INITIATION and n == INITIATION_LEN) or (kind == RESPONSE and n == RESPONSE_LEN)
            or (kind == COOKIE_REPLY and n == COOKIE_REPLY_LEN)):
        return kind
    return 0


def mac_key(label: bytes, public_key: bytes) -> bytes:
    """HASH(label || public key): the key of MAC1 (label mac1----) or of the cookie AEAD."""
    return hashlib.blake2s(label + public_key).digest()


def mac(key: bytes, data: bytes | memoryview) -> bytes:
    """Keyed BLAKE2s with a 16-byte output: MAC(key, input) of the whitepaper."""
    return hashlib.blake2s(data, digest_size=MAC_LEN, key=key).digest()


def mac1_valid(message: bytes | memoryview, mac1_key: bytes) -> bool:
    """Does a handshake message (type 1 or 2, length already checked) carry a right MAC1?"""
    end = len(message) - 2 * MAC_LEN
    return hmac.compare_digest(mac(mac1_key, message[:end]), bytes(message[end:end + MAC_LEN]))


def mac2_valid(message: bytes | memoryview, cookie: bytes) -> bool:
    end = len(message) - MAC_LEN
    return hmac.compare_digest(mac(cookie, message[:end]), bytes(message[end:]))


def with_macs(body: bytes, mac1_key: bytes, cookie: bytes | None) -> bytes:
    """A handshake message body (all but the two MACs) completed with MAC1 and MAC2 (zeros
    when we hold no fresh cookie from the receiver)."""
    mac1 = mac(mac1_key, body)
    mac2 = mac(cookie, body + mac1) if cookie is not None else bytes(MAC_LEN)
    return body + mac1 + mac2


def pack_initiation_body(sender: int, ephemeral: bytes, static: bytes, timestamp: bytes) -> bytes:
    return _INITIATION.pack(INITIATION, sender, ephemeral, static, timestamp, b"", b"")[:-32]


def unpack_initiation(data: bytes | memoryview) -> tuple[int, bytes, bytes, bytes]:
    """(sender, ephemeral, encrypted static, encrypted timestamp) of a 148-byte initiation."""
    _, sender, ephemeral, static, timestamp, _, _ = _INITIATION.unpack(data)
    return sender, ephemeral, static, timestamp


def pack_response_body(sender: int, receiver: int, ephemeral: bytes, empty: bytes) -> bytes:
    return _RESPONSE.pack(RESPONSE, sender, receiver, ephemeral, empty, b"", b"")[:-32]


def unpack_response(data: bytes | memoryview) -> tuple[int, int, bytes, bytes]:
    """(sender, receiver, ephemeral, encrypted empty) of a 92-byte response."""
    _, sender, receiver, ephemeral, empty, _, _ = _RESPONSE.unpack(data)
    return sender, receiver, ephemeral, empty


def pack_cookie_reply(receiver: int, nonce: bytes, encrypted_cookie: bytes) -> bytes:
    return _COOKIE_REPLY.pack(COOKIE_REPLY, receiver, nonce, encrypted_cookie)


def unpack_cookie_reply(data: bytes | memoryview) -> tuple[int, bytes, bytes]:
    """(receiver, nonce, encrypted cookie) of a 64-byte cookie reply."""
    _, receiver, nonce, cookie = _COOKIE_REPLY.unpack(data)
    return receiver, nonce, cookie


def pack_transport_header(receiver: int, counter: int) -> bytes:
    return _TRANSPORT_HEADER.pack(TRANSPORT, receiver, counter)


def unpack_transport_header(data: bytes | memoryview) -> tuple[int, int]:
    """(receiver index, counter) of a transport message."""
    _, receiver, counter = _TRANSPORT_HEADER.unpack_from(data)
    return receiver, counter


def receiver_index(data: bytes | memoryview) -> int:
    """The receiver index of a response, cookie reply or transport message."""
    offset = 8 if data[0] == RESPONSE else 4
    return int.from_bytes(data[offset:offset + 4], "little")


def padded_length(length: int, mtu: int) -> int:
    """Plaintext length after padding a packet of ``length`` to a multiple of 16, never past
    ``mtu`` (whitepaper 5.4.6; a packet already longer than the MTU is not padded)."""
    padded = (length + PADDING - 1) // PADDING * PADDING
    return min(padded, max(length, mtu))
