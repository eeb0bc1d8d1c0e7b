"""The cryptographic primitives of Noise_IKpsk2_25519_ChaChaPoly_BLAKE2s as WireGuard uses them
(whitepaper section 5.4): HASH, HMAC, KDF1..3, DH, AEAD, XAEAD and TAI64N.

X25519 and ChaCha20-Poly1305 come from ``cryptography`` (OpenSSL), BLAKE2s from hashlib.
XChaCha20-Poly1305 (the cookie reply) is not in ``cryptography``: it is HChaCha20 (below, a
few lines of the ChaCha20 block function, checked against the draft's vector and libsodium in
the tests) deriving a subkey for ChaCha20-Poly1305 with the last 8 nonce bytes.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from typing import Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.serialization import Encoding, PrivateFormat, PublicFormat

CONSTRUCTION: Final = b"Noise_IKpsk2_25519_ChaChaPoly_BLAKE2s"
IDENTIFIER: Final = b"WireGuard v1 zx2c4 Jason@zx2c4.com"
KEY_LEN: Final = 32
# TAI64 labels seconds from 2**62 plus the 10 s TAI-UTC offset of 1970 (as wireguard-go).
_TAI64_BASE: Final = (1 << 62) + 10
# Timestamps are floored to this many ns so they do not reveal the exact clock
# (wireguard-go's whitening); still strictly increasing between initiations >= 20 ms apart.
_TIMESTAMP_GRANULE_NS: Final = 1 << 24

INITIAL_CHAIN: Final = hashlib.blake2s(CONSTRUCTION).digest()
INITIAL_HASH: Final = hashlib.blake2s(INITIAL_CHAIN + IDENTIFIER).digest()


class DecryptError(Exception):
    """An AEAD open failed: wrong key, or the message was changed."""


def hash_(*parts: bytes) -> bytes:
    h = hashlib.blake2s()
    for part in parts:
        h.update(part)
    return h.digest()


def hmac_(key: bytes, data: bytes) -> bytes:
    return hmac.new(key, data, hashlib.blake2s).digest()


def kdf(key: bytes, data: bytes, n: int) -> tuple[bytes, ...]:
    """KDF_n(key, input): n 32-byte outputs of HKDF over HMAC-BLAKE2s."""
    prk = hmac_(key, data)
    out: list[bytes] = []
    previous = b""
    for i in range(1, n + 1):
        previous = hmac_(prk, previous + bytes([i]))
        out.append(previous)
    return tuple(out)


def generate_private_key() -> bytes:
    return X25519PrivateKey.generate().private_bytes(
        Encoding.Raw, PrivateFormat.Raw, _no_encryption())


def public_key(private: bytes) -> bytes:
    return X25519PrivateKey.from_private_bytes(private).public_key().public_bytes(
        Encoding.Raw, PublicFormat.Raw)


def dh(private: bytes, public: bytes) -> bytes:
    """X25519; a low-order public key (all-zero result) raises ValueError, as it must."""
    return X25519PrivateKey.from_private_bytes(private).exchange(
        X25519PublicKey.from_public_bytes(public))


def _nonce(counter: int) -> bytes:
    return b"\0\0\0\0" + struct.pack("<Q", counter)


def aead_encrypt(key: bytes, counter: int, plaintext: bytes, aad: bytes) -> bytes:
    return ChaCha20Poly1305(key).encrypt(_nonce(counter), plaintext, aad)


def aead_decrypt(key: bytes, counter: int, ciphertext: bytes, aad: bytes) -> bytes:
    try:
        return ChaCha20Poly1305(key).decrypt(_nonce(counter), ciphertext, aad)
    except InvalidTag:
        raise DecryptError from None


_SIGMA: Final = struct.unpack("<4I", b"expand 32-byte k")
_MASK: Final = 0xFFFFFFFF


def _quarter(s: list[int], a: int, b: int, c: int, d: int) -> None:
    s[a] = (s[a] + s[b]) & _MASK
    s[d] ^= s[a]
    s[d] = ((s[d] << 16) | (s[d] >> 16)) & _MASK
    s[c] = (s[c] + s[d]) & _MASK
    s[b] ^= s[c]
    s[b] = ((s[b] << 12) | (s[b] >> 20)) & _MASK
    s[a] = (s[a] + s[b]) & _MASK
    s[d] ^= s[a]
    s[d] = ((s[d] << 8) | (s[d] >> 24)) & _MASK
    s[c] = (s[c] + s[d]) & _MASK
    s[b] ^= s[c]
    s[b] = ((s[b] << 7) | (s[b] >> 25)) & _MASK


def hchacha20(key: bytes, nonce16: bytes) -> bytes:
    """HChaCha20 (draft-irtf-cfrg-xchacha 2.2): 20 ChaCha rounds over key and a 16-byte nonce,
    output words 0-3 and 12-15 without the final addition."""
    s = [*_SIGMA, *struct.unpack("<8I", key), *struct.unpack("<4I", nonce16)]
    for _ in range(10):
        _quarter(s, 0, 4, 8, 12)
        _quarter(s, 1, 5, 9, 13)
        _quarter(s, 2, 6, 10, 14)
        _quarter(s, 3, 7, 11, 15)
        _quarter(s, 0, 5, 10, 15)
        _quarter(s, 1, 6, 11, 12)
        _quarter(s, 2, 7, 8, 13)
        _quarter(s, 3, 4, 9, 14)
    return struct.pack("<8I", *s[0:4], *s[12:16])


def xaead_encrypt(key: bytes, nonce24: bytes, plaintext: bytes, aad: bytes) -> bytes:
    subkey = hchacha20(key, nonce24[:16])
    return ChaCha20Poly1305(subkey).encrypt(b"\0\0\0\0" + nonce24[16:], plaintext, aad)


def xaead_decrypt(key: bytes, nonce24: bytes, ciphertext: bytes, aad: bytes) -> bytes:
    subkey = hchacha20(key, nonce24[:16])
    try:
        return ChaCha20Poly1305(subkey).decrypt(b"\0\0\0\0" + nonce24[16:], ciphertext, aad)
    except InvalidTag:
        raise DecryptError from None


def tai64n(unix_ns: int) -> bytes:
    """TAI64N of a wall-clock time in ns since the epoch: 8 bytes seconds, 4 bytes ns (big
    endian), the ns floored to a granule."""
    seconds, ns = divmod(unix_ns, 1_000_000_000)
    ns -= ns % _TIMESTAMP_GRANULE_NS
    return struct.pack(">QI", _TAI64_BASE + seconds, ns)


def _no_encryption():  # type: ignore[no-untyped-def]
    from cryptography.hazmat.primitives.serialization import NoEncryption

    return NoEncryption()
