"""Packet capture of a running daemon: the daemon side (CaptureHub) and the stream format.

Data-plane contract (both forwarders): ``set_capture(enabled)``; while enabled, the forwarder
appends a copy of each decapsulated packet to a bounded internal buffer, which
``drain_capture() -> [(direction, peer_index, bytes, ts)]`` returns and empties (direction 0 =
inside, read from the device; 1 = outside, received from a peer; peer -1 = none; ts = Unix time
of the data-plane batch that read the packet). While disabled
nothing is copied, so a daemon nobody captures from pays nothing.

1. ``overlayd capture`` sends a JSON request on the control socket; the hub validates it, turns
   capture on in the forwarder if it is the first session, and answers one JSON line;
2. while any session runs, a loop timer drains the forwarder every ``DRAIN_SECONDS`` and offers
   each record to each session; a session keeps what passes its filters and writes a binary
   record (``RECORD`` header + packet) to its client;
3. a session ends at its packet count, its time limit, when the client goes away, or when the
   daemon stops; it then writes an END record with a JSON summary. The last session to end
   turns capture off in the forwarder.

Invariants: the loop never waits for a client (a record that does not fit a client's buffer is
dropped and counted in the summary); timestamps are when the data plane read the packet (the
start of its batch), not when the hub drained it, so the RTT of a request and its reply can be
read from a capture.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import struct
import time
from dataclasses import dataclass
from typing import Any

from overlayd.ops.state import DaemonLike

# One record on the stream: unix time (f64), kind (u8), 3 pad bytes, peer public IPv4 (u32,
# 0 = none), payload length (u32); then the payload.
RECORD = struct.Struct("!dBxxxII")
INSIDE, OUTSIDE, END = 0, 1, 255
DIRECTIONS = {"inside": INSIDE, "outside": OUTSIDE}

DRAIN_SECONDS = 0.01                 # how often the forwarder's buffer is drained while capturing
MAX_CLIENT_BUFFER_BYTES = 8 << 20    # per session: beyond this, records are dropped, not queued
MAX_SECONDS = 7 * 24 * 3600.0

NOT_SUPPORTED = "capture is not supported by this data plane"


class CaptureError(Exception):
    """A capture request the daemon refuses; str() is the line for the operator."""


def supported(forwarder: Any) -> bool:
    return hasattr(forwarder, "set_capture") and hasattr(forwarder, "drain_capture")


@dataclass(frozen=True, slots=True)
class CaptureRequest:
    direction: int | None      # INSIDE, OUTSIDE or None (both)
    peer: str | None           # peer name, or None (any, including no peer)
    count: int | None
    seconds: float | None


def parse_request(d: DaemonLike, request: dict[str, Any]) -> CaptureRequest:
    direction_text = request.get("direction")
    # A JSON request can hold any value here (a list is not even hashable): check the type.
    if direction_text is not None and (not isinstance(direction_text, str)
                                       or direction_text not in DIRECTIONS):
        raise CaptureError(f"direction {direction_text!r}: expected inside or outside")
    count = request.get("count")
    if count is not None and (not isinstance(count, int) or isinstance(count, bool)
                              or count < 1):
        raise CaptureError(f"count {count!r}: expected a whole number >= 1")
    seconds = request.get("seconds")
    if seconds is not None and (not isinstance(seconds, int | float) or isinstance(seconds, bool)
                                or not 0 < seconds <= MAX_SECONDS):
        raise CaptureError(f"seconds {seconds!r}: expected a number > 0")
    peer = request.get("peer")
    name = None
    if peer is not None:
        peers = d.view.peers if d.view is not None else ()
        match = [p for p in peers if p.name == peer or str(p.public_ip) == str(peer)]
        if not match:
            known = ", ".join(p.name for p in peers) or "none"
            raise CaptureError(f"unknown peer {peer!r} (peers: {known})")
        name = match[0].name
    return CaptureRequest(None if direction_text is None else DIRECTIONS[direction_text], name,
                          count, None if seconds is None else float(seconds))


class CaptureSession:
    """One client's capture: filters, bounds, and the stream it writes."""

    def __init__(self, writer: asyncio.StreamWriter, request: CaptureRequest,
                 loop: asyncio.AbstractEventLoop) -> None:
        self.writer = writer
        self.request = request
        self.sent = 0
        self.dropped = 0
        self.done: asyncio.Future[str] = loop.create_future()
        self._deadline: asyncio.TimerHandle | None = None
        if request.seconds is not None:
            self._deadline = loop.call_later(request.seconds, self.finish, "time limit reached")

    def offer(self, ts: float, direction: int, peer_name: str | None, peer_ip: int,
              data: bytes) -> None:
        if self.done.done():
            return
        req = self.request
        if req.direction is not None and direction != req.direction:
            return
        if req.peer is not None and peer_name != req.peer:
            return
        transport = self.writer.transport
        if transport.is_closing():
            self.finish("client went away")
            return
        if transport.get_write_buffer_size() > MAX_CLIENT_BUFFER_BYTES:
            self.dropped += 1     # the client reads too slowly; never make the loop wait
            return
        self.writer.write(RECORD.pack(ts, direction, peer_ip, len(data)) + data)
        self.sent += 1
        if req.count is not None and self.sent >= req.count:
            self.finish("packet count reached")

    def finish(self, reason: str) -> None:
        """End the session: write the END record (if the client is still there)."""
        if self.done.done():
            return
        if self._deadline is not None:
            self._deadline.cancel()
        summary = json.dumps({"reason": reason, "sent": self.sent,
                              "dropped": self.dropped}).encode()
        if not self.writer.transport.is_closing():
            self.writer.write(RECORD.pack(time.time(), END, 0, len(summary)) + summary)
        self.done.set_result(reason)


class CaptureHub:
    """All capture sessions of one daemon, and the forwarder's capture switch."""

    def __init__(self, daemon: DaemonLike, loop: asyncio.AbstractEventLoop) -> None:
        self.daemon = daemon
        self.loop = loop
        self.sessions: list[CaptureSession] = []
        self._timer: asyncio.TimerHandle | None = None
        self._on = False             # whether the forwarder is copying packets for us

    @property
    def supported(self) -> bool:
        return supported(self.daemon.forwarder)

    @property
    def link(self) -> str:
        """What a record carries: inner IP packets (routed paths) or Ethernet frames (tap)."""
        return "ethernet" if getattr(self.daemon.smap.backend, "switched", False) else "ip"

    def open(self, writer: asyncio.StreamWriter, request: dict[str, Any]) -> CaptureSession:
        if not self.supported:
            raise CaptureError(NOT_SUPPORTED)
        session = CaptureSession(writer, parse_request(self.daemon, request), self.loop)
        if not self.sessions:
            self.daemon.forwarder.drain_capture()      # nothing stale from an earlier session
            self.daemon.forwarder.set_capture(True)
            self._on = True
            self._timer = self.loop.call_later(DRAIN_SECONDS, self._tick)
        self.sessions.append(session)
        return session

    def close(self, session: CaptureSession, reason: str = "client went away") -> None:
        session.finish(reason)
        if session in self.sessions:
            self.sessions.remove(session)
        if not self.sessions:
            self._stop()

    def shutdown(self) -> None:
        for session in list(self.sessions):
            self.close(session, "daemon stopping")

    def _stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self._on:
            return
        self._on = False
        forwarder = self.daemon.forwarder
        if forwarder is not None and supported(forwarder):
            forwarder.set_capture(False)
            forwarder.drain_capture()    # free what was copied since the last tick

    def _tick(self) -> None:
        self._timer = None
        try:
            self.drain()
        finally:
            if self.sessions:
                self._timer = self.loop.call_later(DRAIN_SECONDS, self._tick)

    def drain(self) -> None:
        records = self.daemon.forwarder.drain_capture()
        if records:
            view = self.daemon.view
            peers = view.peers if view is not None else ()
            # ts: when the data plane read the packet (its batch), not this drain, so a
            # request and its reply keep their own times
            for direction, peer, data, ts in records:
                node = peers[peer] if 0 <= peer < len(peers) else None
                name = node.name if node is not None else None
                ip = int(node.public_ip) if node is not None else 0
                payload = bytes(data)
                for session in self.sessions:
                    session.offer(ts, direction, name, ip, payload)
        for session in [s for s in self.sessions if s.done.done()]:
            self.sessions.remove(session)
        if not self.sessions:
            self._stop()


# -- the client side: pcap with Linux "cooked" headers ---------------------------------------

LINKTYPE_ETHERNET = 1           # tcpdump.org link-layer header types
LINKTYPE_LINUX_SLL = 113
SLL_HEADER = struct.Struct("!HHH8sH")
PACKET_HOST, PACKET_OUTGOING = 0, 4       # <linux/if_packet.h>: shown by tcpdump as In / Out
ARPHRD_NONE = 0xFFFE                       # what a tun device reports
ETH_P_IP, ETH_P_IPV6 = 0x0800, 0x86DD


def sll_frame(direction: int, peer_ip: int, packet: bytes) -> bytes:
    """A Linux cooked-capture (SLL) header + the inner packet.

    SLL keeps, in a plain pcap that tcpdump and Wireshark read, what raw IP would lose: the
    direction (inside = Out, toward a peer; outside = In, from a peer) and the peer, as the
    4-byte link-layer source/destination address (``tcpdump -e`` shows it).
    """
    pkttype = PACKET_OUTGOING if direction == INSIDE else PACKET_HOST
    version = packet[0] >> 4 if packet else 4
    proto = ETH_P_IPV6 if version == 6 else ETH_P_IP
    addr = peer_ip.to_bytes(4, "big") if peer_ip else b""
    return SLL_HEADER.pack(pkttype, ARPHRD_NONE, len(addr), addr.ljust(8, b"\0"), proto) + packet


def peer_ip_text(value: int) -> str:
    return str(ipaddress.IPv4Address(value)) if value else "-"
