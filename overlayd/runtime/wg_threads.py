"""The wireguard backend on native threads: N wireguard forwarders seen as the one forwarder
runtime/wireguard.py drives.

Each thread has its own WireguardForwarder (tun queue, SO_REUSEPORT socket, keypair slots,
cipher contexts, staging ring, event queue); what must be one per key is one per key:

- a keypair is installed into every forwarder with one KeypairShare (cext/wireguard.pxi): one
  atomic send counter (no nonce is ever used twice for a key, whichever thread seals; the
  rekey-after-messages count is the sum over threads by construction) and one replay window
  (a datagram accepted on one thread is a replay on all);
- every control call runs on each forwarder in turn with its thread paused between two
  batches, so from any batch's point of view an endpoint change or a confirmed session is one
  step; a keypair install pauses every thread at once, so no thread can receive under a
  keypair the others already use before it has it too;
- events: a thread whose batch queued some writes the engine's notify fd (the daemon watches
  it on the loop and calls WireguardRuntime.after_batch); drain_events drains every forwarder;
- a roamed endpoint seen by one thread is set on all (the runtime calls set_endpoint on the
  EVENT_ENDPOINT it drains); a responder's session confirmed on one thread is confirmed on all
  (confirm_session); activity is the latest time over the threads.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from overlayd.runtime.engine import ThreadedForwarder

Event = tuple[int, int, bytes, tuple[str, int] | None]


class ThreadedWireguardForwarder(ThreadedForwarder):
    @property
    def notify_fd(self) -> int:
        return int(self.engine.notify_fd)

    def set_timings(self, *timings: Any) -> None:
        self._each_paused(lambda fwd: fwd.set_timings(*timings))

    def set_now(self, now: float) -> None:
        # The threads read the clock before each batch themselves; this also lets each
        # forwarder zero its keypairs past 3 x REJECT_AFTER_TIME (which changes its index).
        self._each_paused(lambda fwd: fwd.set_now(now))

    def drain_events(self) -> list[Event]:
        events: list[Event] = []
        for part in self._each_paused(lambda fwd: fwd.drain_events()):
            events.extend(part)
        return events

    def install_keypair(self, peer: int, local_index: int, remote_index: int, send_key: bytes,
                        recv_key: bytes, initiator: bool) -> None:
        from overlayd import _dataplane  # type: ignore[attr-defined]  # compiled only

        share = _dataplane.KeypairShare()
        # Every thread paused at once, not in turn: our install sends the packets held for the
        # peer, and its answer may reach another thread's socket within microseconds - that
        # thread must have the keypair before it runs its next batch.
        with self._all_paused():
            for fwd in self.forwarders:
                fwd.install_keypair(peer, local_index, remote_index, send_key, recv_key,
                                    initiator, share)

    @contextmanager
    def _all_paused(self) -> Iterator[None]:
        paused = 0
        try:
            for i in range(len(self.forwarders)):
                self.engine.pause(i)
                paused += 1
            yield
        finally:
            for i in range(paused):
                self.engine.resume(i)

    def confirm_session(self, peer: int, local_index: int) -> bool:
        return any(self._each_paused(lambda fwd: fwd.confirm_session(peer, local_index)))

    def set_endpoint(self, peer: int, ip: str, port: int) -> None:
        self._each_paused(lambda fwd: fwd.set_endpoint(peer, ip, port))

    def send_staged(self, peer: int) -> int:
        return sum(self._each_paused(lambda fwd: fwd.send_staged(peer)))

    def drop_staged(self, peer: int) -> int:
        return sum(self._each_paused(lambda fwd: fwd.drop_staged(peer)))

    def send_keepalive(self, peer: int) -> bool:
        # One keepalive for the peer, from thread 0's socket (all share the port).
        with self._paused(0) as fwd:
            return bool(fwd.send_keepalive(peer))

    def activity(self) -> list[tuple[float, ...]]:
        """Per peer, each time the latest over the threads. Read without pausing, as the
        counters are: each time is an aligned double its thread alone writes, and the session
        arrays move only in a table swap, which runs on this same control thread."""
        rows = [fwd.activity() for fwd in self.forwarders]
        return [tuple(max(column) for column in zip(*per_peer)) for per_peer in zip(*rows)]

    def endpoints(self) -> list[tuple[str, int]]:
        with self._paused(0) as fwd:
            return list(fwd.endpoints())

    def sessions(self) -> list[tuple[int, float]]:
        with self._paused(0) as fwd:
            return list(fwd.sessions())
