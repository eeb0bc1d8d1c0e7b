"""The wireguard backend on native threads: N wireguard forwarders seen as the one forwarder
runtime/wireguard.py drives.

Each thread has its own WireguardForwarder (tun queue, SO_REUSEPORT socket, keypair slots,
cipher contexts, staging ring, event queue); what must be one per key is one per key:

- a keypair is installed into every forwarder with one KeypairShare (cext/wireguard.pxi): one
  atomic send counter (no nonce is ever used twice for a key, whichever thread seals; the
  rekey-after-messages count is the sum over threads by construction) and one replay window
  (a datagram accepted on one thread is a replay on all);
- a control call that changes a forwarder runs on each in turn with its thread paused between
  two batches, so from any batch's point of view an endpoint change or a confirmed session is
  one step; a keypair install pauses every thread at once, so no thread can receive under a
  keypair the others already use before it has it too;
- the clock: each thread steps its forwarder's clock before each batch and when a keypair is
  due to be zeroed (3 x REJECT_AFTER_TIME; cext/engine.pxi item 9), so set_now - the 0.1 s
  tick's and each drain's - pauses nothing: it only records the control plane's time, which a
  call that pauses a thread anyway gives its forwarder first (an idle thread's clock is its
  last batch's: an install must not date a keypair from then);
- events: a thread whose batch queued some writes the engine's notify fd (the daemon watches
  it on the loop and calls WireguardRuntime.after_batch); drain_events pauses only the threads
  whose forwarder has events queued;
- a roamed endpoint seen by one thread is set on all (the runtime calls set_endpoint on the
  EVENT_ENDPOINT it drains); a responder's session confirmed on one thread is confirmed on all
  (confirm_session); activity is the latest time over the threads.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from overlayd.runtime.engine import ThreadedForwarder

Event = tuple[int, int, bytes, tuple[str, int] | None]


class ThreadedWireguardForwarder(ThreadedForwarder):
    def __init__(self, forwarders: Sequence[Any], dev_fds: Sequence[int],
                 sock_fds: Sequence[int], busy_poll_us: int) -> None:
        super().__init__(forwarders, dev_fds, sock_fds, busy_poll_us)
        self._now = 0.0         # the control plane's latest time (set_now)

    @property
    def notify_fd(self) -> int:
        return int(self.engine.notify_fd)

    def set_timings(self, *timings: Any) -> None:
        self._each_paused(lambda fwd: fwd.set_timings(*timings))

    def set_now(self, now: float) -> None:
        # No pause: the threads step their own clocks, keypair expiry included (module doc).
        self._now = max(self._now, float(now))

    def _clocked(self, fwd: Any) -> Any:
        """A paused thread's forwarder, its clock brought up to the control plane's (never
        back: set_now keeps the later of the two)."""
        fwd.set_now(self._now)
        return fwd

    def drain_events(self) -> list[Event]:
        # A thread with nothing queued is not paused: queued_events has one writer, and an
        # event it queues after this read makes its batch write the notify fd again (the
        # engine compares with what it last signalled), so nothing waits unseen.
        events: list[Event] = []
        for i, fwd in enumerate(self.forwarders):
            if fwd.queued_events:
                with self._paused(i):
                    events.extend(fwd.drain_events())
        return events

    def install_keypair(self, peer: int, local_index: int, remote_index: int, send_key: bytes,
                        recv_key: bytes, initiator: bool) -> Any:
        """Into every forwarder, one KeypairShare; returns it (holders, send_counter)."""
        from overlayd import _dataplane  # type: ignore[attr-defined]  # compiled only

        share = _dataplane.KeypairShare()
        # Every thread paused at once, not in turn: our install sends the packets held for the
        # peer, and its answer may reach another thread's socket within microseconds - that
        # thread must have the keypair before it runs its next batch.
        with self._all_paused():
            for fwd in self.forwarders:
                self._clocked(fwd).install_keypair(peer, local_index, remote_index, send_key,
                                                   recv_key, initiator, share)
        return share

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
        return sum(self._each_paused(lambda fwd: self._clocked(fwd).send_staged(peer)))

    def drop_staged(self, peer: int) -> int:
        return sum(self._each_paused(lambda fwd: fwd.drop_staged(peer)))

    def send_keepalive(self, peer: int) -> bool:
        # One keepalive for the peer, from thread 0's socket (all share the port).
        with self._paused(0) as fwd:
            return bool(self._clocked(fwd).send_keepalive(peer))

    def activity(self) -> list[tuple[float, ...]]:
        """Per peer, each time the latest over the threads. Read without pausing, as the
        counters are: each time is an aligned double its thread alone writes, and the session
        arrays move only in a table swap, which runs on this same control thread (a thread
        zeroing a keypair touches keypair slots and the index table, not these)."""
        rows = [fwd.activity() for fwd in self.forwarders]
        return [tuple(max(column) for column in zip(*per_peer)) for per_peer in zip(*rows)]

    # endpoints and sessions (overlayd status / peers, a metrics scrape: rare) pause thread 0:
    # its batches write an endpoint's 16 bytes when the peer roams and move a session's three
    # keypair slots on a confirmation or an expiry, which an unpaused read could see halfway.

    def endpoints(self) -> list[tuple[str, int]]:
        with self._paused(0) as fwd:
            return list(fwd.endpoints())

    def sessions(self) -> list[tuple[int, float]]:
        with self._paused(0) as fwd:
            return list(self._clocked(fwd).sessions())
