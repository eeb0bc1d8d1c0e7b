"""Following etcd's lease keys: list, watch from the next revision, and repair what breaks.

1. list the prefix: the table becomes exactly what was listed (a diff: puts and deletes), and the
   watch starts at the list's revision + 1;
2. each watch batch is applied in order; the last revision seen is remembered;
3. the stream breaks (StoreUnavailable): back off (bounded, jittered; each failure counts as a
   ``reconnect``), then resume the watch from the last seen revision + 1 (``resumes``);
4. the start revision was compacted away (CompactedError): re-list and diff (``compaction_relists``);
5. every ``resync_seconds`` a full list-and-diff runs anyway (``resyncs``), repairing whatever a
   missed event might have left wrong.

Every write to the table is guarded by revision: a put is applied only if it is newer than what
the table holds for that key, a delete only if it is newer than the entry it removes, and a list
(a snapshot at revision R) changes only entries no newer than R. So a list racing the watch, or a
batch seen twice after a resume, can never move a key backwards.

Time and randomness are passed in (``clock``, ``sleep``, ``rng``) so tests run it at full speed.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from overlayd.io.store_protocol import (
    CompactedError,
    KeyValue,
    MapStore,
    StoreError,
    WatchEvent,
)

log = logging.getLogger("overlayd")

RESYNC_SECONDS = 300.0          # the periodic full list-and-diff
BACKOFF_FIRST_SECONDS = 0.1     # first retry after a failure
BACKOFF_MAX_SECONDS = 3.0       # a returning etcd is noticed within this (plus the jitter)


@dataclass
class WatchCounters:
    lists: int = 0
    resumes: int = 0              # watch re-opened from last seen revision + 1 after a break
    compaction_relists: int = 0
    reconnects: int = 0           # a list or watch that failed (etcd unreachable)
    resyncs: int = 0              # periodic full list-and-diff
    events: int = 0


@dataclass
class Contact:
    """Whether the store answers, and when it last did (monotonic seconds). Each change
    between the two is logged once: an operator reading the journal sees the outage."""

    reachable: bool = False
    last_ok: float | None = None
    last_error: str | None = None

    def ok(self, now: float) -> None:
        if not self.reachable and self.last_error is not None:
            away = "" if self.last_ok is None else f" after {now - self.last_ok:.1f} s"
            log.warning("etcd answers again%s; resyncing", away)
        self.reachable, self.last_ok, self.last_error = True, now, None

    def failed(self, why: str) -> None:
        if self.reachable or self.last_error is None:
            log.warning("etcd unreachable (%s); forwarding goes on with the map in force", why)
        self.reachable, self.last_error = False, why


class Backoff:
    """Exponential, bounded, jittered (half to full of the step) so a fleet does not reconnect
    in lockstep when etcd comes back."""

    def __init__(self, rng: random.Random, first: float = BACKOFF_FIRST_SECONDS,
                 cap: float = BACKOFF_MAX_SECONDS) -> None:
        self.rng, self.first, self.cap = rng, first, cap
        self.step = first

    def next(self) -> float:
        delay = self.step * self.rng.uniform(0.5, 1.0)
        self.step = min(self.cap, self.step * 2)
        return delay

    def reset(self) -> None:
        self.step = self.first


@dataclass
class LeaseTable:
    """The lease keys as last known, by key, with the revision the table is complete up to."""

    entries: dict[str, KeyValue] = field(default_factory=dict)
    revision: int = 0
    # Highest revision of a delete seen per key, so a late put older than it is not revived.
    tombstones: dict[str, int] = field(default_factory=dict)

    def apply_event(self, event: WatchEvent) -> bool:
        kv, key = event.kv, event.kv.key
        held = self.entries.get(key)
        self.revision = max(self.revision, kv.mod_revision)
        if event.kind == "delete":
            if held is None or held.mod_revision >= kv.mod_revision:
                return False
            del self.entries[key]
            self.tombstones[key] = kv.mod_revision
            return True
        if held is not None and held.mod_revision >= kv.mod_revision:
            return False
        if self.tombstones.get(key, 0) >= kv.mod_revision:
            return False
        self.entries[key] = kv
        return True

    def apply_list(self, kvs: list[KeyValue], revision: int) -> bool:
        """Make the table what a snapshot at ``revision`` says, except where it knows newer."""
        changed = False
        listed = {kv.key: kv for kv in kvs}
        for key, held in list(self.entries.items()):
            if key not in listed and held.mod_revision <= revision:
                del self.entries[key]
                self.tombstones[key] = revision
                changed = True
        for key, kv in listed.items():
            known = self.entries.get(key)
            if known is None or known.mod_revision < kv.mod_revision:
                if known is None and self.tombstones.get(key, 0) > revision:
                    continue     # deleted after this snapshot was taken
                self.entries[key] = kv
                changed = True
        self.revision = max(self.revision, revision)
        # Tombstones at or below a complete snapshot carry no information any more.
        self.tombstones = {k: r for k, r in self.tombstones.items() if r > revision}
        return changed


class LeaseWatcher:
    """Keeps a LeaseTable equal to etcd's keys under ``prefix``; calls ``on_change`` (with why)
    after every change of the table, and ``on_contact`` each time etcd answered."""

    def __init__(self, store: MapStore, prefix: str, on_change: Callable[[str], None], *,
                 contact: Contact | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
                 rng: random.Random | None = None,
                 resync_seconds: float = RESYNC_SECONDS) -> None:
        self.store, self.prefix, self.on_change = store, prefix, on_change
        self.table = LeaseTable()
        self.counters = WatchCounters()
        self.contact = contact or Contact()
        self.clock, self.sleep = clock, sleep
        self.backoff = Backoff(rng or random.Random())
        self.resync_seconds = resync_seconds
        self.listed = False             # a first complete list has been applied
        self._next_resync = 0.0

    async def relist(self, why: str) -> None:
        kvs, revision = await self.store.list_prefix(self.prefix)
        self.contact.ok(self.clock())
        self.counters.lists += 1
        first = not self.listed
        changed = self.table.apply_list(kvs, revision)
        self.listed = True
        self._next_resync = self.clock() + self.resync_seconds
        if changed or first:
            self.on_change(why)

    async def run(self) -> None:
        """Forever: list, watch, resume, re-list; returns only when cancelled."""
        need_list, why = True, "leases listed"
        while True:
            try:
                if need_list:
                    await self.relist(why)
                    need_list = False
                await self._watch()
                # _watch returns when the periodic resync is due
                self.counters.resyncs += 1
                need_list, why = True, "periodic resync"
            except CompactedError as exc:
                self.counters.compaction_relists += 1
                self.contact.ok(self.clock())
                need_list, why = True, (f"re-listed after compaction (to revision " \
                                       f"{exc.compact_revision})")
            except StoreError as exc:
                self.contact.failed(str(exc) or type(exc).__name__)
                self.counters.reconnects += 1
                if not need_list:
                    self.counters.resumes += 1     # the next _watch starts at last seen + 1
                await self.sleep(self.backoff.next())

    async def _watch(self) -> None:
        start = self.table.revision + 1
        stream = self.store.watch_prefix(self.prefix, start)
        try:
            while True:
                wait = self._next_resync - self.clock()
                if wait <= 0:
                    return
                try:
                    batch = await asyncio.wait_for(anext(stream), wait)
                except TimeoutError:
                    return                 # the periodic resync is due
                except StopAsyncIteration:
                    break
                self.contact.ok(self.clock())
                self.backoff.reset()
                changed = [e for e in batch if self.table.apply_event(e)]
                self.counters.events += len(batch)
                if changed:
                    self.on_change(_describe(changed))
        finally:
            close = getattr(stream, "aclose", None)
            if close is not None:
                await close()
        # A stream that ends without an error is a break too: resume from where we are.
        raise _StreamEnded()


class _StreamEnded(StoreError):
    def __init__(self) -> None:
        super().__init__("watch stream ended")


def _describe(events: list[WatchEvent]) -> str:
    names = [f"{'+' if e.kind == 'put' else '-'}{e.kv.key.rsplit('/', 1)[-1]}" for e in events]
    return "etcd: " + " ".join(names[:5]) + (f" (+{len(names) - 5} more)" if len(names) > 5
                                             else "")
