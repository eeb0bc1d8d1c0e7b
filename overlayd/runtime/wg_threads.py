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
  one step - and only on the forwarders it changes (a handshake's calls look first, unpaused;
  see confirm_session); a keypair install pauses every thread at once, so no thread can
  receive under a keypair the others already use before it has it too;
- the clock: each thread steps its forwarder's clock before each batch and when a keypair is
  due to be zeroed (3 x REJECT_AFTER_TIME; cext/engine.pxi item 9), so set_now - the 0.1 s
  tick's and each drain's - pauses nothing: it only records the control plane's time, which a
  call that pauses a thread anyway gives its forwarder first (an idle thread's clock is its
  last batch's: an install must not date a keypair from then);
- events: a thread whose batch queued some writes the engine's notify fd (the daemon watches
  it on the loop and calls WireguardRuntime.after_batch); drain_events pauses nothing (each
  forwarder's events are a single-producer single-consumer ring);
- a roamed endpoint seen by one thread is set on all (the runtime calls set_endpoint on the
  EVENT_ENDPOINT it drains); a responder's session confirmed on one thread is confirmed on all
  (confirm_session); activity is the latest time over the threads;
- status reads (endpoints, sessions: overlayd status / peers, a metrics scrape) pause nothing:
  a per-session sequence counter lets them take a consistent copy while the thread runs.
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
        # No pause: each forwarder's events are a single-producer ring its batches fill and
        # this thread empties (cext/wireguard.pxi, _event), and what a batch wrote before it
        # queued an event is visible to the drain that took it. An event queued after this
        # read makes its batch write the notify fd again (the engine compares the ring's tail
        # with what it last signalled), so nothing waits unseen.
        events: list[Event] = []
        for fwd in self.forwarders:
            if fwd.queued_events:
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

    # A handshake's calls pause only the threads they change (each test reads the forwarder
    # without pausing it: seq-read slots and endpoint, the thread's held-packet count):
    # - confirm_session skips a thread that has no such "next" keypair (the one whose batch
    #   saw the first message promoted it itself; once not pending, it stays so until an
    #   install, which runs on this thread), and sends what a confirmed thread held in the
    #   same pause;
    # - send_staged skips a thread holding nothing for the peer: a thread holds packets only
    #   while the peer has no usable keypair here, and after a confirmation none is added;
    #   the count it read was written before that thread queued the event that brought us
    #   here, which the drain's acquire of the ring's tail ordered before this read (a paused
    #   thread's, by the pause);
    # - set_endpoint skips a thread that already sends there (the one that saw the roam, or
    #   all of them when a handshake only repeats the known endpoint; a later roam on it
    #   queues its own event). Skipping leaves its "roamed" mark unset, which a table swap
    #   resolves to the same address (the map's, which it already is).
    # Two calls keep their pauses: the install pauses every thread at once (above), and a
    # confirmation pauses the thread it promotes on - promoting drops the previous keypair,
    # whose cipher contexts a running batch of that thread may be using.

    def confirm_session(self, peer: int, local_index: int) -> bool:
        confirmed = False
        for i, fwd in enumerate(self.forwarders):
            if fwd.confirming(peer, local_index):
                with self._paused(i):
                    confirmed = fwd.confirm_session(peer, local_index) or confirmed
                    if fwd.staged_count(peer):
                        self._clocked(fwd).send_staged(peer)
        return confirmed

    def set_endpoint(self, peer: int, ip: str, port: int) -> None:
        for i, fwd in enumerate(self.forwarders):
            if fwd.endpoint(peer) != (ip, port):
                with self._paused(i):
                    fwd.set_endpoint(peer, ip, port)

    def send_staged(self, peer: int) -> int:
        sent = 0
        for i, fwd in enumerate(self.forwarders):
            if fwd.staged_count(peer):
                with self._paused(i):
                    sent += self._clocked(fwd).send_staged(peer)
        return sent

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

    # endpoints and sessions (overlayd status / peers, every metrics scrape) read thread 0's
    # forwarder without pausing it: its batches change an endpoint (roaming) or a session's
    # keypair slots (a confirmation, an expiry) inside the session's sequence counter, and
    # the reader keeps only a copy no such write overlapped (cext/wireguard.pxi, WG_SEQ_*).
    # The forwarder's clock is not touched: sessions(now) answers as of the control plane's
    # time, as set_now(now) and then sessions() did with the thread paused.

    def endpoints(self) -> list[tuple[str, int]]:
        return list(self.forwarders[0].endpoints())

    def sessions(self) -> list[tuple[int, float]]:
        return list(self.forwarders[0].sessions(self._now))
