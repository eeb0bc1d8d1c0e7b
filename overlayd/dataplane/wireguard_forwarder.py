"""Routed ``wireguard`` data path: WireGuard transport messages over a tun device, the
pure-Python twin of the transport kernel.

The router is the udp path's (forwarder_base.RoutedForwarderBase: LPM, TTL, ICMP errors with
frag-needed against the peer's path MTU = underlay - 60, offloads, capture, counters); what
differs is that every datagram is a WireGuard message and every packet is sealed.

Inside (tun -> underlay), per packet (each TSO segment on its own):
  1. route as the udp path does;
  2. the peer's current keypair: none, or past REJECT_AFTER_TIME / REJECT_AFTER_MESSAGES ->
     the packet is held (staged, as wireguard-go does: up to STAGED_MAX per peer, the oldest
     pushed out as wg_staged_overflow; one over STAGED_PACKET_MAX bytes is wg_no_session)
     and a handshake asked for (an event); the held packets go out, through steps 3-4, in
     the call that makes a keypair current (install_keypair for ours, send_staged after a
     responder's session is confirmed), or are dropped as wg_staged_expired when the
     handshake gives up (drop_staged) or the peer leaves the map;
  3. pad the plaintext to 16 bytes (not past the path MTU), seal it with ChaCha20-Poly1305
     under the keypair's send key and the 64-bit counter as nonce, put the 16-byte transport
     header in front; an initiator's keypair past REKEY_AFTER_TIME (or any past
     REKEY_AFTER_MESSAGES) asks for a new handshake but still sends;
  4. queue it for the peer's endpoint (the map's address, or where its last authenticated
     message came from).
Outside (underlay -> tun), per datagram (from any source: WireGuard authenticates by key,
not by address):
  1. not a WireGuard message (type, length, reserved bytes) -> wg_bad_message;
  2. initiation / response: MAC1 wrong -> wg_bad_mac1; else copied into the handshake queue
     (bounded: wg_handshake_queue_full) for the control plane, which drains it once per batch;
     cookie replies go there as they are (they carry no MAC1);
  3. transport: receiver index unknown -> wg_unknown_index; keypair too old -> wg_stale_keypair;
     counter outside the replay window or seen -> wg_replay (checked before decrypting);
     AEAD open fails -> wg_decrypt_failed; then the window moves, a responder's "next"
     keypair becomes current on its first message, and the peer's endpoint follows the
     datagram's source (roaming; an event tells the control plane);
  4. empty plaintext is a keepalive (counted, nothing delivered); else the inner packet, its
     padding cut by the IPv4 total length, goes through the udp path's checks - the inner
     source must be in the sending peer's allowed IPs (its map prefixes), else
     outside_spoofed_source.

Keys arrive from the control plane (``install_keypair``) and cipher contexts are built then,
once per key; the per-packet path only seals and opens. A keypair installed into several
forwarders (the native engine's threads, one forwarder each) with one ``KeypairShare`` shares
its send counter and replay window: no nonce is used twice for a key, and a datagram accepted
by one forwarder is a replay for all (the compiled share is atomic and locked; this twin runs
on one thread and only keeps the same semantics). A responder's session confirmed in one
forwarder is confirmed in the others by ``confirm_session`` (the event carries the keypair's
local index). Times are ``set_now``'s monotonic
seconds. Per peer the data plane keeps the activity times the handshake timers need
(``activity``), so no timer work happens per packet.
"""

from __future__ import annotations

import operator
import struct
from collections import deque
from typing import Any, Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from overlayd.dataplane.forwarder_base import (
    RX_BYTES,
    RX_PACKETS,
    C,
    RoutedForwarderBase,
    State,
)
from overlayd.dataplane.wg_replay import ReplayWindow
from overlayd.wire import ipv4
from overlayd.wire import wireguard as wg

IMPLEMENTATION: Final = "python"

# Events drained by the control plane: (kind, peer index, message, source address).
EVENT_HANDSHAKE: Final = 1          # a handshake message (MAC1 checked) from an address
EVENT_NEED_HANDSHAKE: Final = 2     # data for a peer without a usable session, or rekey due
EVENT_ENDPOINT: Final = 3           # the peer's endpoint moved to where its data came from
EVENT_SESSION_CONFIRMED: Final = 4  # a responder's new keypair got its first message (the
                                    # message: its local index, 4 bytes little-endian)
MAX_EVENTS: Final = 1024            # handshake messages queued between two drains
STAGED_MAX: Final = 128             # packets held per peer without a session (wireguard-go's)
STAGED_PACKET_MAX: Final = 9216     # the largest held packet (a jumbo-frame MTU; 16-aligned)

REKEY_AFTER_MESSAGES: Final = 1 << 60
REJECT_AFTER_MESSAGES: Final = (1 << 64) - (1 << 13) - 1
_NEVER: Final = float("-inf")
_ZERO_PAD: Final = bytes(wg.PADDING)
_NONCE: Final = struct.Struct("<4xQ")


class KeypairShare:
    """What the copies of one keypair in several forwarders share: the next send counter and
    the replay window (built by the first forwarder that installs it, with its limit)."""

    __slots__ = ("holders", "send_counter", "window")

    def __init__(self) -> None:
        self.send_counter = 0
        self.holders = 0            # forwarders holding the keypair (install +1, drop -1)
        self.window: ReplayWindow | None = None


class Keypair:
    """One direction pair of transport keys, with its cipher contexts (built once here)."""

    __slots__ = ("created", "initiator", "local_index", "recv", "remote_index", "send",
                 "session", "share", "window")

    def __init__(self, session: PeerSession, local_index: int, remote_index: int,
                 send_key: bytes, recv_key: bytes, initiator: bool, created: float,
                 reject_after_messages: int, share: KeypairShare) -> None:
        self.session = session
        self.local_index = local_index
        self.remote_index = remote_index
        self.send = ChaCha20Poly1305(send_key)
        self.recv = ChaCha20Poly1305(recv_key)
        self.initiator = initiator
        self.created = created
        if share.window is None:
            share.window = ReplayWindow(reject_after_messages)
        self.share = share
        self.window = share.window
        share.holders += 1


class PeerSession:
    """A peer's keypairs and activity; follows the peer (by public key) across table swaps."""

    __slots__ = ("current", "endpoint", "index", "map_address", "next", "previous",
                 "received_any", "received_data", "sent_any", "sent_data", "staged",
                 "want_handshake")

    def __init__(self, index: int) -> None:
        self.index = index                  # the peer's position in the tables in force
        self.current: Keypair | None = None
        self.previous: Keypair | None = None
        self.next: Keypair | None = None
        self.endpoint: tuple[str, int] | None = None   # roamed to (None: the map's)
        self.map_address: tuple[str, int] | None = None
        self.sent_any = self.received_any = self.sent_data = self.received_data = _NEVER
        self.want_handshake = False         # an EVENT_NEED_HANDSHAKE is queued
        self.staged: deque[bytes] = deque()  # packets held until a keypair comes

    def keypairs(self) -> list[Keypair]:
        return [k for k in (self.current, self.previous, self.next) if k is not None]


def check_key(key: bytes, what: str) -> bytes:
    key = bytes(key)
    if len(key) != 32:
        raise ValueError(f"{what} must be 32 bytes, got {len(key)}")
    return key


class WireguardForwarder(RoutedForwarderBase):
    """The routed wireguard data path over a tun fd and a UDP socket fd (owned by the caller).

    ``mac1_key`` is HASH("mac1----" || our public key): the data plane checks MAC1 itself so
    that a flood of junk handshakes never reaches Python one by one.
    """

    _name = "WireguardForwarder"
    _LINK_HEADER_LEN = 0                        # tun
    _OUTER_PREFIX = wg.TRANSPORT_HEADER_LEN     # room for the header in front of each segment

    def __init__(self, tun_fd: int, sock_fd: int, mac1_key: bytes, batch_size: int = 64,
                 icmp_burst: int = 100, *, vnet_hdr: bool = False, udp_gso: bool = False,
                 udp_gro: bool = False, device_uso: bool = False) -> None:
        self._mac1_key = check_key(mac1_key, "mac1_key")
        super().__init__(tun_fd, sock_fd, (), batch_size, icmp_burst, vnet_hdr=vnet_hdr,
                         udp_gso=udp_gso, udp_gro=udp_gro,
                         device_uso=device_uso)
        self._now = 0.0
        self._sessions: list[PeerSession] = []
        self._by_key: dict[bytes, PeerSession] = {}
        self._by_index: dict[int, Keypair] = {}
        self._events: list[tuple[int, int, bytes, tuple[str, int] | None]] = []
        self.set_timings(120.0, 180.0, REKEY_AFTER_MESSAGES, REJECT_AFTER_MESSAGES, 165.0)

    # -- control ------------------------------------------------------------------------------

    def set_timings(self, rekey_after_time: float, reject_after_time: float,
                    rekey_after_messages: int, reject_after_messages: int,
                    rekey_on_receive_age: float) -> None:
        self._rekey_after_time = float(rekey_after_time)
        self._reject_after_time = float(reject_after_time)
        self._rekey_after_messages = operator.index(rekey_after_messages)
        self._reject_after_messages = operator.index(reject_after_messages)
        self._rekey_on_receive_age = float(rekey_on_receive_age)

    def set_now(self, now: float) -> None:
        """The data plane's clock, never set back (a thread's own clock step, cext/engine.pxi,
        may be ahead of the caller's); also zeroes keypairs 3 x REJECT_AFTER_TIME old. The
        compiled kernel runs the same step before each batch on the threads engine."""
        self._now = max(self._now, float(now))
        limit = 3 * self._reject_after_time
        for session in self._sessions:
            for keypair in session.keypairs():
                if self._now - keypair.created >= limit:
                    self._drop_keypair(session, keypair)

    def _check_tables(self, state: State) -> State:
        return state

    def set_tables(self, tables: Any) -> None:
        """Swap in new tables; sessions follow their peer's public key, endpoints roamed to
        stay unless the map moved the peer, removed peers' keypairs are forgotten."""
        self.commit_tables(self.prepare_tables(tables))

    def prepare_tables(self, tables: Any) -> tuple[State, list[bytes]]:  # type: ignore[override]
        """set_tables' first half, touching no session: the new state and the peers' keys."""
        keys = [check_key(getattr(p, "public_key", b""), f"peer {i}: public_key")
                for i, p in enumerate(tables.peers)]
        return State(tables), keys

    def commit_tables(self, prepared: tuple[State, list[bytes]]) -> None:  # type: ignore[override]
        """set_tables' second half: sessions follow their peer's key, then the swap."""
        state, keys = prepared
        state.inherit_counters(self._state)
        sessions: list[PeerSession] = []
        by_key: dict[bytes, PeerSession] = {}
        for index, key in enumerate(keys):
            session = self._by_key.get(key) or PeerSession(index)
            session.index = index
            if session.map_address != state.peer_addr[index]:
                session.endpoint = None         # the map moved the peer: follow the map
                session.map_address = state.peer_addr[index]
            if session.endpoint is not None:
                state.peer_addr[index] = session.endpoint   # else where it roamed to wins
            sessions.append(session)
            by_key[key] = session
        for key, session in self._by_key.items():
            if key not in by_key:
                for keypair in session.keypairs():
                    self._drop_keypair(session, keypair)
                self._expire_staged(session)
                session.index = -1
        self._sessions, self._by_key = sessions, by_key
        self._state = state

    def install_keypair(self, peer: int, local_index: int, remote_index: int,
                        send_key: bytes, recv_key: bytes, initiator: bool,
                        share: KeypairShare | None = None) -> None:
        """A completed handshake. Ours (initiator): the new keypair is current at once.
        Theirs: it waits as "next" until the initiator's first message under it arrives.
        ``share``: the same keypair's counter and window in other forwarders (None: its own)."""
        session = self._sessions[operator.index(peer)]
        keypair = Keypair(session, operator.index(local_index), operator.index(remote_index),
                          check_key(send_key, "send_key"), check_key(recv_key, "recv_key"),
                          bool(initiator), self._now, self._reject_after_messages,
                          share if share is not None else KeypairShare())
        if session.next is not None:
            self._drop_keypair(session, session.next)
        if keypair.initiator:
            if session.previous is not None:
                self._drop_keypair(session, session.previous)
            session.previous, session.current = session.current, keypair
        else:
            session.next = keypair
        self._by_index[keypair.local_index] = keypair
        session.want_handshake = False
        if keypair.initiator and session.staged:
            self._send_staged_now(session)

    def send_staged(self, peer: int) -> int:
        """Seal and send the packets held for ``peer`` if it has a usable keypair now (the
        runtime calls it when a responder's session is confirmed); returns how many left."""
        peer = operator.index(peer)
        if not 0 <= peer < len(self._sessions):
            return 0
        return self._send_staged_now(self._sessions[peer])

    def confirm_session(self, peer: int, local_index: int) -> bool:
        """Another forwarder saw the initiator's first message under the keypair with
        ``local_index``: make it current here too (False: it is not our "next" one)."""
        peer = operator.index(peer)
        if not 0 <= peer < len(self._sessions):
            return False
        session = self._sessions[peer]
        if session.next is None or session.next.local_index != operator.index(local_index):
            return False
        self._promote_next(session)
        return True

    def _promote_next(self, session: PeerSession) -> None:
        if session.previous is not None:
            self._drop_keypair(session, session.previous)
        session.previous, session.current, session.next = session.current, session.next, None

    def drop_staged(self, peer: int) -> int:
        """The handshake for ``peer`` gave up: drop what is held for it (wg_staged_expired)."""
        peer = operator.index(peer)
        if not 0 <= peer < len(self._sessions):
            return 0
        return self._expire_staged(self._sessions[peer])

    def _expire_staged(self, session: PeerSession) -> int:
        dropped = len(session.staged)
        self._counters[C["wg_staged_expired"]] += dropped
        session.staged.clear()
        return dropped

    def _send_staged_now(self, session: PeerSession) -> int:
        if not session.staged or self._sendable(session) is None:
            return 0
        self._enter()
        try:
            state = self._state
            sent = 0
            while session.staged:
                keypair = self._sendable(session)
                if keypair is None:
                    break           # used up on the way (REJECT_AFTER_MESSAGES)
                packet = memoryview(session.staged.popleft())
                self._counters[C["wg_staged_sent"]] += 1
                self._seal_and_queue(state, session, keypair, packet, session.index)
                sent += 1
            self._flush(state)
            return sent
        finally:
            self._busy = False

    def _drop_keypair(self, session: PeerSession, keypair: Keypair) -> None:
        if self._by_index.pop(keypair.local_index, None) is keypair:
            keypair.share.holders -= 1
        if session.current is keypair:
            session.current = None
        if session.previous is keypair:
            session.previous = None
        if session.next is keypair:
            session.next = None

    def set_endpoint(self, peer: int, ip: str, port: int) -> None:
        """Where the peer's authenticated handshake came from (roaming, by the control plane)."""
        peer = operator.index(peer)
        address = (ip, operator.index(port))
        self._sessions[peer].endpoint = address
        self._state.peer_addr[peer] = address

    def endpoints(self) -> list[tuple[str, int]]:
        return list(self._state.peer_addr)

    def endpoint(self, peer: int) -> tuple[str, int]:
        """Where ``peer``'s packets go now (one row of endpoints())."""
        return self._state.peer_addr[operator.index(peer)]

    def confirming(self, peer: int, local_index: int) -> bool:
        """Whether confirm_session(peer, local_index) would make a keypair current here."""
        peer = operator.index(peer)
        if not 0 <= peer < len(self._sessions):
            return False
        upcoming = self._sessions[peer].next
        return upcoming is not None and upcoming.local_index == operator.index(local_index)

    def staged_count(self, peer: int) -> int:
        """Packets held for ``peer`` (what send_staged would try to send)."""
        peer = operator.index(peer)
        return len(self._sessions[peer].staged) if 0 <= peer < len(self._sessions) else 0

    def activity(self) -> list[tuple[float, float, float, float]]:
        """Per peer: (sent anything, received anything authenticated, sent data, received
        data), monotonic seconds of set_now's clock, -inf for never."""
        return [(s.sent_any, s.received_any, s.sent_data, s.received_data)
                for s in self._sessions]

    def sessions(self, now: float | None = None) -> list[tuple[int, float]]:
        """Per peer: (usable keypairs, age of the current one or -1), for status output. With
        ``now``: as of the later of it and the clock, without moving the clock, a keypair that
        set_now(now) would zero not counted (the compiled kernel's unpausing read for the
        threads engine; the same answer as set_now(now) and then sessions())."""
        if now is None:
            return [(len(s.keypairs()), self._now - s.current.created if s.current else -1.0)
                    for s in self._sessions]
        at, limit = max(self._now, float(now)), 3 * self._reject_after_time
        out = []
        for s in self._sessions:
            kept = [k for k in s.keypairs() if at - k.created < limit]
            current = s.current if any(k is s.current for k in kept) else None
            out.append((len(kept), at - current.created if current is not None else -1.0))
        return out

    @property
    def queued_events(self) -> int:
        """Events waiting for drain_events."""
        return len(self._events)

    def drain_events(self) -> list[tuple[int, int, bytes, tuple[str, int] | None]]:
        if not self._events:
            return []
        self._enter()
        try:
            events, self._events = self._events, []
            for session in self._sessions:
                session.want_handshake = False
        finally:
            self._busy = False
        return events

    def send_keepalive(self, peer: int) -> bool:
        """Send an empty transport message to ``peer`` now (False: no usable session)."""
        self._enter()
        try:
            state = self._state
            peer = operator.index(peer)
            if not 0 <= peer < len(self._sessions):
                return False
            session = self._sessions[peer]
            keypair = self._sendable(session)
            if keypair is None:
                return False
            datagram = memoryview(self._seal(keypair, b""))
            session.sent_any = self._now
            self._queue(state, datagram, 0, len(datagram), peer, 0)
            self._flush(state)
            self._counters[C["wg_keepalives_sent"]] += 1
            return True
        finally:
            self._busy = False

    # -- inside -------------------------------------------------------------------------------

    def _want_handshake(self, session: PeerSession) -> None:
        if not session.want_handshake and len(self._events) < MAX_EVENTS:
            session.want_handshake = True
            self._events.append((EVENT_NEED_HANDSHAKE, session.index, b"", None))

    def _sendable(self, session: PeerSession) -> Keypair | None:
        """Hot: the keypair to send with, or None (no session, or it is too old to use)."""
        keypair = session.current
        if keypair is None:
            return None
        if (self._now - keypair.created >= self._reject_after_time
                or keypair.share.send_counter >= self._reject_after_messages):
            return None
        return keypair

    def _seal(self, keypair: Keypair, plaintext: bytes) -> bytes:
        """Hot: one transport message (header + sealed plaintext)."""
        counter = keypair.share.send_counter
        keypair.share.send_counter = counter + 1
        return (wg.pack_transport_header(keypair.remote_index, counter)
                + keypair.send.encrypt(_NONCE.pack(counter), plaintext, None))

    def _inside_one(self, state: State, buf: memoryview, start: int, length: int) -> None:
        """Hot: route one packet, seal it for its peer, queue it."""
        pkt = buf[start:start + length]
        peer = self._route(state, pkt)
        if peer < 0:
            return
        session = self._sessions[peer]
        keypair = self._sendable(session)
        if keypair is None:
            self._stage(session, pkt)
            return
        self._seal_and_queue(state, session, keypair, pkt, peer)

    def _stage(self, session: PeerSession, pkt: memoryview) -> None:
        """Hold a packet for a peer without a session, and ask for the handshake."""
        ctr = self._counters
        self._want_handshake(session)
        if len(pkt) > STAGED_PACKET_MAX:
            ctr[C["wg_no_session"]] += 1
            return
        if len(session.staged) >= STAGED_MAX:
            session.staged.popleft()
            ctr[C["wg_staged_overflow"]] += 1
        session.staged.append(bytes(pkt))
        ctr[C["wg_staged"]] += 1

    def _seal_and_queue(self, state: State, session: PeerSession, keypair: Keypair,
                        pkt: memoryview, peer: int) -> None:
        """Hot: seal one routed packet with the peer's keypair and queue it."""
        length = len(pkt)
        if (keypair.share.send_counter >= self._rekey_after_messages
                or (keypair.initiator and self._now - keypair.created >= self._rekey_after_time)):
            self._want_handshake(session)
        if self._capture_on:
            self._capture(0, peer, pkt)
        padded = wg.padded_length(length, state.peer_mtu[peer])
        plaintext = bytes(pkt) + _ZERO_PAD[:padded - length]
        datagram = memoryview(self._seal(keypair, plaintext))
        session.sent_any = session.sent_data = self._now
        self._queue(state, datagram, 0, len(datagram), peer, 0)

    # -- outside ------------------------------------------------------------------------------

    def _outside_one(self, state: State, pkt: memoryview, flags: int, address: object) -> None:
        """Hot: one datagram from anywhere: a handshake message for the control plane, or a
        transport message to open and deliver."""
        ctr = self._counters
        ctr[C["outside_packets"]] += 1
        ctr[C["outside_bytes"]] += len(pkt)
        if flags & 0x20:        # MSG_TRUNC
            ctr[C["outside_truncated"]] += 1
            return
        kind = wg.message_type(pkt)
        if kind == wg.TRANSPORT:
            self._transport(state, pkt, address)
            return
        if kind == 0 or not isinstance(address, tuple):
            ctr[C["wg_bad_message"]] += 1
            return
        if kind != wg.COOKIE_REPLY and not wg.mac1_valid(pkt, self._mac1_key):
            ctr[C["wg_bad_mac1"]] += 1
            return
        if len(self._events) >= MAX_EVENTS:
            ctr[C["wg_handshake_queue_full"]] += 1
            return
        ctr[C["wg_handshake_messages"]] += 1
        self._events.append((EVENT_HANDSHAKE, -1, bytes(pkt), (address[0], address[1])))

    def _transport(self, state: State, pkt: memoryview, address: object) -> None:
        ctr = self._counters
        receiver, counter = wg.unpack_transport_header(pkt)
        keypair = self._by_index.get(receiver)
        if keypair is None or keypair.session.index < 0:
            ctr[C["wg_unknown_index"]] += 1
            return
        now = self._now
        if now - keypair.created >= self._reject_after_time:
            ctr[C["wg_stale_keypair"]] += 1
            return
        if not keypair.window.check(counter):
            ctr[C["wg_replay"]] += 1
            return
        try:
            plain = keypair.recv.decrypt(_NONCE.pack(counter), pkt[wg.TRANSPORT_HEADER_LEN:],
                                         None)
        except InvalidTag:
            ctr[C["wg_decrypt_failed"]] += 1
            return
        if not keypair.window.update(counter):
            ctr[C["wg_replay"]] += 1
            return
        session = keypair.session
        peer = session.index
        if keypair is session.next:
            self._promote_next(session)
            self._event(EVENT_SESSION_CONFIRMED, peer, None,
                        keypair.local_index.to_bytes(4, "little"))
        if isinstance(address, tuple) and address != state.peer_addr[peer]:
            source = (address[0], address[1])
            state.peer_addr[peer] = session.endpoint = source
            self._event(EVENT_ENDPOINT, peer, source)
        counts = state.peer_counters[peer]
        counts[RX_PACKETS] += 1
        counts[RX_BYTES] += len(pkt)
        session.received_any = now
        if keypair.initiator and now - keypair.created >= self._rekey_on_receive_age:
            self._want_handshake(session)
        if not plain:
            ctr[C["wg_keepalives_received"]] += 1
            return
        session.received_data = now
        inner = memoryview(plain)
        if len(inner) >= ipv4.HEADER_MIN_LEN:
            total = ipv4.total_length(inner)
            if ipv4.HEADER_MIN_LEN <= total < len(inner):
                inner = inner[:total]       # the padding
        self._deliver(state, inner, peer)

    def _event(self, kind: int, peer: int, address: tuple[str, int] | None,
               data: bytes = b"") -> None:
        if len(self._events) < MAX_EVENTS:
            self._events.append((kind, peer, data, address))

