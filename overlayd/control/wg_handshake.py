"""The Noise_IKpsk2 handshake of one peer pair, sans-IO (whitepaper section 5.4.2-5.4.4).

``Identity`` is this node's static key pair and the MAC keys derived from it; ``PeerHandshake``
is the handshake state toward one peer (remote static key, optional pre-shared key). One
handshake:

  initiator: create_initiation()  --148 bytes-->  responder: open_initiation() + respond()
  initiator: consume_response()   <--92 bytes--

Each side then holds ``SessionKeys`` (the two transport keys and both indices). Initiation
replay protection: an initiation is accepted only with a TAI64N timestamp greater than every
one accepted from that peer before, and at most one per INITIATION_MIN_INTERVAL (a replayed or
flooded initiation must not make us drop the session the real peer is using).
Times: ``now`` monotonic seconds, ``unix_ns`` wall clock; both passed in.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from overlayd.control.wg_noise import (
    INITIAL_CHAIN,
    INITIAL_HASH,
    DecryptError,
    aead_decrypt,
    aead_encrypt,
    dh,
    generate_private_key,
    hash_,
    kdf,
    public_key,
    tai64n,
)
from overlayd.wire import wireguard as wg

INITIATION_MIN_INTERVAL: Final = 1 / 50     # seconds; wireguard-go's HandshakeInitationRate
_ZERO_PSK: Final = bytes(32)


class HandshakeError(Exception):
    """A handshake message that decrypted wrongly, is a replay, or does not fit our state."""


@dataclass(frozen=True, slots=True)
class SessionKeys:
    """What a completed handshake gives the data plane."""

    local_index: int        # the index peers put in messages to us
    remote_index: int       # the index we put in messages to the peer
    send_key: bytes
    recv_key: bytes
    initiator: bool         # we sent the initiation (only the initiator rekeys by time)


class Identity:
    """This node's static key pair and what is derived from it once."""

    def __init__(self, private_key: bytes) -> None:
        if len(private_key) != 32:
            raise ValueError("a WireGuard private key is 32 bytes")
        self.private_key = private_key
        self.public_key = public_key(private_key)
        self.mac1_key = wg.mac_key(wg.LABEL_MAC1, self.public_key)      # MAC1 of messages to us
        self.cookie_key = wg.mac_key(wg.LABEL_COOKIE, self.public_key)  # cookies we send


@dataclass(slots=True)
class OpenedInitiation:
    """An initiation whose static key decrypted: who sent it; the rest waits for ``respond``."""

    remote_static: bytes
    sender: int
    ephemeral: bytes
    chain: bytes
    hash: bytes
    encrypted_timestamp: bytes


def _mix_hash(h: bytes, data: bytes) -> bytes:
    return hash_(h, data)


def open_initiation(identity: Identity, message: bytes) -> OpenedInitiation:
    """Decrypt the initiator's static key (the message's length and MAC1 already checked)."""
    sender, ephemeral, static, timestamp = wg.unpack_initiation(message)
    h = _mix_hash(INITIAL_HASH, identity.public_key)
    c = kdf(INITIAL_CHAIN, ephemeral, 1)[0]
    h = _mix_hash(h, ephemeral)
    try:
        c, k = kdf(c, dh(identity.private_key, ephemeral), 2)
        remote_static = aead_decrypt(k, 0, static, h)
    except (ValueError, DecryptError):
        raise HandshakeError("initiation: static key does not decrypt") from None
    h = _mix_hash(h, static)
    return OpenedInitiation(remote_static, sender, ephemeral, c, h, timestamp)


class PeerHandshake:
    """Handshake state toward one peer."""

    def __init__(self, identity: Identity, remote_static: bytes,
                 preshared_key: bytes | None = None) -> None:
        self.identity = identity
        self.remote_static = remote_static
        self.psk = preshared_key or _ZERO_PSK
        try:
            self.static_static = dh(identity.private_key, remote_static)
        except ValueError:
            raise ValueError("peer public key is a low-order point") from None
        self.peer_mac1_key = wg.mac_key(wg.LABEL_MAC1, remote_static)
        self.peer_cookie_key = wg.mac_key(wg.LABEL_COOKIE, remote_static)
        self.latest_timestamp = b"\0" * 12
        self.last_initiation_at = float("-inf")
        # In-flight initiation (initiator side)
        self._ephemeral: bytes | None = None
        self._chain = b""
        self._hash = b""
        self.pending_index: int | None = None

    # -- initiator --------------------------------------------------------------------------

    def create_initiation(self, local_index: int, unix_ns: int,
                          ephemeral_private: bytes | None = None) -> bytes:
        """The body of an initiation (no MACs: the caller adds them with the cookie it has)."""
        e_priv = ephemeral_private or generate_private_key()
        e_pub = public_key(e_priv)
        h = _mix_hash(INITIAL_HASH, self.remote_static)
        c = kdf(INITIAL_CHAIN, e_pub, 1)[0]
        h = _mix_hash(h, e_pub)
        c, k = kdf(c, dh(e_priv, self.remote_static), 2)
        static = aead_encrypt(k, 0, self.identity.public_key, h)
        h = _mix_hash(h, static)
        c, k = kdf(c, self.static_static, 2)
        timestamp = aead_encrypt(k, 0, tai64n(unix_ns), h)
        h = _mix_hash(h, timestamp)
        self._ephemeral, self._chain, self._hash = e_priv, c, h
        self.pending_index = local_index
        return wg.pack_initiation_body(local_index, e_pub, static, timestamp)

    def consume_response(self, message: bytes) -> SessionKeys:
        """Finish our handshake with the peer's response (length, MAC1, index checked)."""
        sender, receiver, ephemeral, empty = wg.unpack_response(message)
        if self._ephemeral is None or receiver != self.pending_index:
            raise HandshakeError("response to no initiation of ours")
        c = kdf(self._chain, ephemeral, 1)[0]
        h = _mix_hash(self._hash, ephemeral)
        try:
            c = kdf(c, dh(self._ephemeral, ephemeral), 1)[0]
            c = kdf(c, dh(self.identity.private_key, ephemeral), 1)[0]
        except ValueError:
            raise HandshakeError("response: low-order ephemeral key") from None
        c, tau, k = kdf(c, self.psk, 3)
        h = _mix_hash(h, tau)
        try:
            aead_decrypt(k, 0, empty, h)
        except DecryptError:
            raise HandshakeError("response does not decrypt (wrong key or pre-shared key)") from None
        send, recv = kdf(c, b"", 2)
        self._ephemeral = None
        self.pending_index = None
        return SessionKeys(receiver, sender, send, recv, initiator=True)

    # -- responder --------------------------------------------------------------------------

    def respond(self, opened: OpenedInitiation, local_index: int, now: float,
                ephemeral_private: bytes | None = None) -> tuple[bytes, SessionKeys]:
        """Check the initiation's timestamp and answer it: (response body, session keys)."""
        try:
            c, k = kdf(opened.chain, self.static_static, 2)
            timestamp = aead_decrypt(k, 0, opened.encrypted_timestamp, opened.hash)
        except DecryptError:
            raise HandshakeError("initiation: timestamp does not decrypt") from None
        if timestamp <= self.latest_timestamp:
            raise HandshakeError("initiation replayed (timestamp not newer than the last one)")
        if now - self.last_initiation_at < INITIATION_MIN_INTERVAL:
            raise HandshakeError("initiations arrive faster than the allowed rate")
        self.latest_timestamp = timestamp
        self.last_initiation_at = now
        h = _mix_hash(opened.hash, opened.encrypted_timestamp)
        e_priv = ephemeral_private or generate_private_key()
        e_pub = public_key(e_priv)
        c = kdf(c, e_pub, 1)[0]
        h = _mix_hash(h, e_pub)
        try:
            c = kdf(c, dh(e_priv, opened.ephemeral), 1)[0]
            c = kdf(c, dh(e_priv, self.remote_static), 1)[0]
        except ValueError:
            raise HandshakeError("initiation: low-order ephemeral key") from None
        c, tau, k = kdf(c, self.psk, 3)
        h = _mix_hash(h, tau)
        empty = aead_encrypt(k, 0, b"", h)
        recv, send = kdf(c, b"", 2)
        body = wg.pack_response_body(local_index, opened.sender, e_pub, empty)
        return body, SessionKeys(local_index, opened.sender, send, recv, initiator=False)
