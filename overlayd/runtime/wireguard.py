"""The wireguard backend's glue: the data plane's events into the handshake device, its
actions back into the data plane and the tunnel socket. Runs on the event loop thread.

Per batch (only when the data plane queued something): drain its events once - handshake
messages, "needs a session", roamed endpoints, confirmed sessions - and carry out what the
WgDevice answers. Per tick (WG_TICK_SECONDS): give the data plane the time, poll its activity
times and run the handshake timers. Nothing here runs per data packet. On the loop engine the
tick's set_now is the batches' clock and zeroes old keypairs; the threads keep their own clocks
and zero their own, so there it only records the time and pauses no thread (wg_threads.py).

The forwarder is one WireguardForwarder (loop engine: after_batch runs after each batch) or
runtime/wg_threads.ThreadedWireguardForwarder (threads engine: after_batch runs when a thread
signals queued events), which carries each call to every thread's forwarder. So a roamed
endpoint and a confirmed session, seen by one forwarder, are handed to all (for a single
forwarder that is a no-op).
"""

from __future__ import annotations

import logging
import socket
import time
from pathlib import Path
from typing import Any, Final

from overlayd.control.config import WireguardConfig
from overlayd.control.local_node import LocalView
from overlayd.control.problems import ConfigError, Problem
from overlayd.control.subnet_map import SubnetMap, decode_key
from overlayd.control.wg_keys import encode_key, load_or_create_private_key, load_private_key
from overlayd.control.wg_peers import (
    Action,
    DropStaged,
    Install,
    Keepalive,
    PeerConfig,
    Send,
    SetEndpoint,
    WgDevice,
)
from overlayd.control.wg_timers import (
    REJECT_AFTER_MESSAGES,
    REKEY_AFTER_MESSAGES,
    Activity,
    Timings,
)
from overlayd.dataplane.wireguard_forwarder import (
    EVENT_ENDPOINT,
    EVENT_HANDSHAKE,
    EVENT_NEED_HANDSHAKE,
    EVENT_SESSION_CONFIRMED,
)

log = logging.getLogger("overlayd.wireguard")

WG_TICK_SECONDS: Final = 0.1


def node_keys(config: WireguardConfig, config_file: str) -> tuple[bytes, bytes | None]:
    """(private key, pre-shared key or None); the private key file is created on first use."""
    private = load_or_create_private_key(config.private_key_file, config_file)
    psk = None
    if config.preshared_key_file is not None:
        psk = load_private_key(config.preshared_key_file, config_file, "preshared_key_file")
    return private, psk


def check_own_public_key(smap: SubnetMap, map_file: str, name: str, public: bytes) -> None:
    """The map must carry this node's real public key, or no peer can reach us."""
    index = next(i for i, n in enumerate(smap.nodes) if n.name == name)
    listed = decode_key(smap.nodes[index].public_key)
    if listed != public:
        raise ConfigError([Problem(map_file, f"nodes[{index}].public_key",
                                   f"does not match this node's private key; its public key "
                                   f"is {encode_key(public)} (overlayd keys prints it)")])


def timings_of(config: WireguardConfig) -> Timings:
    return Timings(rekey_after_time=config.rekey_after_seconds,
                   reject_after_time=config.reject_after_seconds,
                   rekey_attempt_time=config.rekey_attempt_seconds,
                   rekey_timeout=config.rekey_timeout_seconds,
                   keepalive_timeout=config.keepalive_timeout_seconds,
                   persistent_keepalive=config.persistent_keepalive_seconds)


class WireguardRuntime:
    def __init__(self, config: WireguardConfig, private_key: bytes, psk: bytes | None,
                 forwarder: Any, sock: socket.socket) -> None:
        timings = timings_of(config)
        self.device = WgDevice(private_key, timings, psk, config.handshakes_per_second_under_load)
        self.forwarder = forwarder
        self.sock = sock
        self.send_errors = 0
        forwarder.set_timings(timings.rekey_after_time, timings.reject_after_time,
                              REKEY_AFTER_MESSAGES, REJECT_AFTER_MESSAGES,
                              timings.rekey_on_receive_age)
        forwarder.set_now(time.monotonic())

    def set_peers(self, smap: SubnetMap, view: LocalView) -> None:
        """After every set_tables: the peers' keys, positions and map endpoints."""
        port = smap.backend.port
        self.device.set_peers([
            PeerConfig(decode_key(peer.public_key) or b"", index, (str(peer.public_ip), port),
                       peer.name)
            for index, peer in enumerate(view.peers)])

    def after_batch(self) -> None:
        events = self.forwarder.drain_events()
        if not events:
            return
        now, unix_ns = time.monotonic(), time.time_ns()
        self.forwarder.set_now(now)
        actions: list[Action] = []
        # With N threads, the reply to the packet that confirmed a responder's session on one
        # thread may leave through another thread's queue before that thread heard of the
        # confirmation: it is held there and asks for a handshake. The confirmation in the
        # same drain makes the session current on every thread and sends what they held, so
        # that request is answered already (no second handshake).
        confirmed = {peer for kind, peer, _, _ in events if kind == EVENT_SESSION_CONFIRMED}
        for kind, peer_index, message, address in events:
            if kind == EVENT_HANDSHAKE:
                actions += self.device.handle(message, address, now, unix_ns)
            elif kind == EVENT_NEED_HANDSHAKE and peer_index not in confirmed:
                actions += self.device.want_handshake(peer_index, now, unix_ns)
            elif kind == EVENT_ENDPOINT and address is not None:
                peer = self.device.peer_at(peer_index)
                if peer is not None:
                    peer.endpoint = address
                self.forwarder.set_endpoint(peer_index, *address)
            elif kind == EVENT_SESSION_CONFIRMED:
                self.device.handshake_done(peer_index, unix_ns)
                self.forwarder.confirm_session(peer_index, int.from_bytes(message, "little"))
                self.forwarder.send_staged(peer_index)  # what it held while we responded
        self._apply(actions)

    def tick(self) -> None:
        now = time.monotonic()
        self.forwarder.set_now(now)
        activity = [Activity(*a) for a in self.forwarder.activity()]
        self._apply(self.device.tick(now, time.time_ns(), activity))

    def _apply(self, actions: list[Action]) -> None:
        fw = self.forwarder
        for action in actions:
            if isinstance(action, Send):
                try:
                    self.sock.sendto(action.datagram, socket.MSG_DONTWAIT, action.address)
                except OSError:
                    self.send_errors += 1
            elif isinstance(action, Install):
                k = action.keys
                fw.install_keypair(action.peer, k.local_index, k.remote_index, k.send_key,
                                   k.recv_key, k.initiator)
            elif isinstance(action, SetEndpoint):
                fw.set_endpoint(action.peer, action.address[0], action.address[1])
            elif isinstance(action, Keepalive):
                fw.send_keepalive(action.peer)
            elif isinstance(action, DropStaged):
                fw.drop_staged(action.peer)

    def peer_status(self) -> list[dict[str, Any]]:
        """Per peer (data-plane order): latest handshake, endpoint, sessions (for status)."""
        endpoints = self.forwarder.endpoints()
        sessions = self.forwarder.sessions()
        out: list[dict[str, Any]] = []
        for index, (endpoint, (usable, age)) in enumerate(zip(endpoints, sessions, strict=True)):
            peer = self.device.peer_at(index)
            out.append({
                "endpoint": f"{endpoint[0]}:{endpoint[1]}",
                "keypairs": usable,
                "session_age_seconds": round(age, 1) if age >= 0 else None,
                "latest_handshake_unix": (peer.last_handshake_unix_ns // 10**9
                                          if peer and peer.last_handshake_unix_ns else None),
                "handshakes": peer.handshakes_completed if peer else 0,
            })
        return out


def public_key_text(config: WireguardConfig, config_file: Path) -> str:
    """``overlayd keys``: this node's public key (creating its private key file if needed)."""
    from overlayd.control.wg_noise import public_key

    private = load_or_create_private_key(config.private_key_file, str(config_file))
    return encode_key(public_key(private))
