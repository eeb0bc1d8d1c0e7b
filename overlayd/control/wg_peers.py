"""The control side of a WireGuard interface: peers, handshakes, indices and timers, sans-IO.

``WgDevice`` owns one ``PeerHandshake`` and ``CookieJar`` per peer (by public key), the table
of our handshake indices, the cookie checker, and the handshake timers. It never touches a
socket or the data plane: every call returns actions for the runtime to carry out:

  Send(datagram, address)        a handshake message or cookie reply to put on the wire
  Install(peer, keys)            session keys for the data plane (it rotates its keypairs)
  SetEndpoint(peer, address)     a peer's endpoint follows its last authenticated handshake
  Keepalive(peer)                ask the data plane to send an empty transport message
  DropStaged(peer)               the handshake gave up: drop the packets held for the peer

Timer rules (whitepaper section 6), decided on ``tick`` from the data plane's activity times:
an initiation unanswered for REKEY_TIMEOUT (+ jitter) is resent with a new ephemeral, for at
most REKEY_ATTEMPT_TIME; data to a peer without a session, a session past REKEY_AFTER_TIME
(initiator), or a peer silent for KEEPALIVE + REKEY_TIMEOUT after we sent data starts one;
received data unanswered for KEEPALIVE_TIMEOUT (or the persistent keepalive interval) sends a
keepalive; a persistent keepalive due while there is no session starts a handshake instead
(one per interval, counting an initiation as something sent). Under load (more handshake
messages per second than ``under_load_rate``), a message without a valid MAC2 gets a cookie
reply instead of our X25519 work.
Times: ``now`` monotonic seconds, ``unix_ns`` wall clock ns; both passed in.
"""

from __future__ import annotations

import logging
import random
from collections import deque
from dataclasses import dataclass, field

from overlayd.control.wg_cookie import CookieChecker, CookieJar
from overlayd.control.wg_handshake import (
    HandshakeError,
    Identity,
    PeerHandshake,
    SessionKeys,
    open_initiation,
)
from overlayd.control.wg_timers import (
    Activity,
    Timings,
    keepalive_due,
    peer_looks_dead,
    persistent_keepalive_due,
)
from overlayd.wire import wireguard as wg

log = logging.getLogger("overlayd.wireguard")

Address = tuple[str, int]
INDICES_KEPT = 4        # per peer: current, previous, next and one in-flight initiation


@dataclass(frozen=True, slots=True)
class Send:
    datagram: bytes
    address: Address


@dataclass(frozen=True, slots=True)
class Install:
    peer: int
    keys: SessionKeys


@dataclass(frozen=True, slots=True)
class SetEndpoint:
    peer: int
    address: Address


@dataclass(frozen=True, slots=True)
class Keepalive:
    peer: int


@dataclass(frozen=True, slots=True)
class DropStaged:
    peer: int


Action = Send | Install | SetEndpoint | Keepalive | DropStaged


@dataclass(frozen=True, slots=True)
class PeerConfig:
    """One peer as the map gives it."""

    public_key: bytes
    index: int                  # its position in the data plane's tables
    endpoint: Address | None    # None: wait for it to contact us
    name: str = ""


@dataclass(slots=True)
class WgPeer:
    config: PeerConfig
    handshake: PeerHandshake
    cookies: CookieJar
    endpoint: Address | None
    indices: deque[int] = field(default_factory=lambda: deque(maxlen=INDICES_KEPT))
    attempt_started: float | None = None    # first initiation of the current attempt
    next_retry: float = float("inf")
    last_initiation_sent: float = float("-inf")
    session_started: float | None = None    # newest session (for rekey by time)
    session_initiator: bool = False
    dead_handled_at: float = float("-inf")  # last sent_data a dead-peer handshake answered
    handshakes_completed: int = 0
    last_handshake_unix_ns: int = 0


@dataclass(slots=True)
class WgStats:
    """Handshake outcomes, by reason, for metrics (the data plane counts transport drops)."""

    initiations_sent: int = 0
    initiations_received: int = 0
    responses_sent: int = 0
    responses_received: int = 0
    cookie_replies_sent: int = 0
    cookie_replies_received: int = 0
    handshakes_completed: int = 0
    rejected: dict[str, int] = field(default_factory=dict)

    def reject(self, reason: str) -> None:
        self.rejected[reason] = self.rejected.get(reason, 0) + 1


class WgDevice:
    def __init__(self, private_key: bytes, timings: Timings | None = None,
                 preshared_key: bytes | None = None, under_load_rate: int = 100,
                 rng: random.Random | None = None) -> None:
        self.identity = Identity(private_key)
        self.timings = timings or Timings()
        self.preshared_key = preshared_key
        self.under_load_rate = under_load_rate
        self.checker = CookieChecker(self.identity.cookie_key)
        self.peers: dict[bytes, WgPeer] = {}
        self.by_index: dict[int, bytes] = {}        # our handshake/session index -> public key
        self.stats = WgStats()
        self._rng = rng or random.SystemRandom()
        self._load_window = 0.0
        self._load_count = 0

    # -- peers --------------------------------------------------------------------------------

    def set_peers(self, configs: list[PeerConfig]) -> None:
        """Apply the map's peers: new ones get fresh state, known ones keep their sessions and
        roamed endpoint (unless the map moved it), removed ones are forgotten."""
        wanted = {c.public_key: c for c in configs}
        for key in [k for k in self.peers if k not in wanted]:
            self._forget(key)
        for key, config in wanted.items():
            peer = self.peers.get(key)
            if peer is None:
                self.peers[key] = WgPeer(
                    config, PeerHandshake(self.identity, key, self.preshared_key),
                    CookieJar(wg.mac_key(wg.LABEL_COOKIE, key)), config.endpoint)
            else:
                if config.endpoint != peer.config.endpoint:
                    peer.endpoint = config.endpoint
                peer.config = config

    def _forget(self, key: bytes) -> None:
        peer = self.peers.pop(key)
        for index in peer.indices:
            self.by_index.pop(index, None)

    def peer_at(self, index: int) -> WgPeer | None:
        return next((p for p in self.peers.values() if p.config.index == index), None)

    def _new_index(self, peer: WgPeer) -> int:
        while True:
            index = self._rng.getrandbits(32)
            if index not in self.by_index:
                break
        if len(peer.indices) == peer.indices.maxlen:
            self.by_index.pop(peer.indices[0], None)
        peer.indices.append(index)
        self.by_index[index] = peer.handshake.remote_static
        return index

    # -- initiating ---------------------------------------------------------------------------

    def want_handshake(self, peer_index: int, now: float, unix_ns: int) -> list[Action]:
        """The data plane needs a session to ``peer_index`` (data without one, or rekey)."""
        peer = self.peer_at(peer_index)
        if peer is None or peer.attempt_started is not None:
            return []
        if now - peer.last_initiation_sent < self.timings.rekey_timeout:
            return []       # a handshake is at most every REKEY_TIMEOUT
        peer.attempt_started = now
        return self._initiate(peer, now, unix_ns)

    def _initiate(self, peer: WgPeer, now: float, unix_ns: int) -> list[Action]:
        if peer.endpoint is None:
            peer.attempt_started = None
            return []
        body = peer.handshake.create_initiation(self._new_index(peer), unix_ns)
        message = peer.cookies.seal(body, peer.handshake.peer_mac1_key, now)
        peer.last_initiation_sent = now
        peer.next_retry = now + self.timings.retry_delay(self._rng)
        self.stats.initiations_sent += 1
        return [Send(message, peer.endpoint)]

    # -- receiving ----------------------------------------------------------------------------

    def under_load(self, now: float) -> bool:
        return self._load_count > self.under_load_rate and now - self._load_window < 1.0

    def _count_load(self, now: float) -> None:
        if now - self._load_window >= 1.0:
            self._load_window, self._load_count = now, 0
        self._load_count += 1

    def handle(self, message: bytes, address: Address, now: float,
               unix_ns: int) -> list[Action]:
        """One handshake message the data plane queued (type and length checked; MAC1
        checked for initiations and responses)."""
        kind = message[0]
        if kind == wg.COOKIE_REPLY:
            return self._cookie_reply(message, now)
        self._count_load(now)
        if self.under_load(now) and not self.checker.mac2_valid(message, address, now):
            self.stats.cookie_replies_sent += 1
            return [Send(self.checker.reply(message, address, now), address)]
        try:
            if kind == wg.INITIATION:
                return self._initiation(message, address, now)
            if kind == wg.RESPONSE:
                return self._response(message, address, now, unix_ns)
        except HandshakeError as exc:
            self.stats.reject(str(exc))
            log.debug("handshake message from %s:%d rejected: %s", *address, exc)
        return []

    def _initiation(self, message: bytes, address: Address, now: float) -> list[Action]:
        self.stats.initiations_received += 1
        opened = open_initiation(self.identity, message)
        peer = self.peers.get(opened.remote_static)
        if peer is None:
            raise HandshakeError("initiation from a public key not in the map")
        body, keys = peer.handshake.respond(opened, self._new_index(peer), now)
        response = peer.cookies.seal(body, peer.handshake.peer_mac1_key, now)
        self.stats.responses_sent += 1
        self._session(peer, keys, now)
        peer.endpoint = address
        index = peer.config.index
        return [Install(index, keys), SetEndpoint(index, address), Send(response, address)]

    def _response(self, message: bytes, address: Address, now: float,
                  unix_ns: int) -> list[Action]:
        self.stats.responses_received += 1
        key = self.by_index.get(wg.receiver_index(message))
        peer = self.peers.get(key) if key is not None else None
        if peer is None:
            raise HandshakeError("response to an unknown index")
        keys = peer.handshake.consume_response(message)
        self._session(peer, keys, now)
        peer.last_handshake_unix_ns = unix_ns
        peer.endpoint = address
        index = peer.config.index
        # The responder may send only once it saw the session used: confirm it at once. The
        # endpoint first: installing sends what the data plane held for the peer.
        return [SetEndpoint(index, address), Install(index, keys), Keepalive(index)]

    def _session(self, peer: WgPeer, keys: SessionKeys, now: float) -> None:
        peer.session_started = now
        peer.session_initiator = keys.initiator
        peer.attempt_started = None
        peer.next_retry = float("inf")
        peer.handshakes_completed += 1
        self.stats.handshakes_completed += 1

    def _cookie_reply(self, message: bytes, now: float) -> list[Action]:
        key = self.by_index.get(wg.receiver_index(message))
        peer = self.peers.get(key) if key is not None else None
        if peer is None or not peer.cookies.consume(message, now):
            self.stats.reject("cookie reply that does not decrypt or fits no message of ours")
            return []
        self.stats.cookie_replies_received += 1
        return []

    def _has_session(self, peer: WgPeer, now: float) -> bool:
        """A session the data plane can still send with (younger than REJECT_AFTER_TIME)."""
        return (peer.session_started is not None
                and now - peer.session_started < self.timings.reject_after_time)

    def handshake_done(self, peer_index: int, unix_ns: int) -> None:
        """The responder's session got its first transport message (the data plane saw it)."""
        peer = self.peer_at(peer_index)
        if peer is not None:
            peer.last_handshake_unix_ns = unix_ns

    # -- timers -------------------------------------------------------------------------------

    def tick(self, now: float, unix_ns: int, activity: list[Activity]) -> list[Action]:
        """Run the handshake timers; ``activity[i]`` is data-plane peer i's activity."""
        actions: list[Action] = []
        t = self.timings
        for peer in self.peers.values():
            index = peer.config.index
            a = activity[index] if index < len(activity) else Activity()
            if peer.attempt_started is not None and now >= peer.next_retry:
                if now - peer.attempt_started >= t.rekey_attempt_time:
                    peer.attempt_started = None     # give up until data asks again
                    peer.next_retry = float("inf")
                    actions.append(DropStaged(index))   # as wireguard-go: held data goes
                else:
                    actions += self._initiate(peer, now, unix_ns)
            if (peer.session_started is not None and peer.session_initiator
                    and now - peer.session_started >= t.rekey_after_time
                    and a.sent_data >= peer.session_started):
                actions += self.want_handshake(index, now, unix_ns)
            if peer_looks_dead(a, now, t) and a.sent_data > peer.dead_handled_at:
                peer.dead_handled_at = a.sent_data
                actions += self.want_handshake(index, now, unix_ns)
            if self._has_session(peer, now):
                if keepalive_due(a, now, t):
                    actions.append(Keepalive(index))
            elif persistent_keepalive_due(a, peer.last_initiation_sent, now, t):
                # A keepalive needs a session (whitepaper 6.5): start one, so that a peer
                # behind NAT comes up, and keeps its mapping open, by itself.
                actions += self.want_handshake(index, now, unix_ns)
            if (peer.session_started is not None
                    and now - peer.session_started >= 3 * t.reject_after_time):
                peer.session_started = None     # the data plane has zeroed its keys by now
        return actions
