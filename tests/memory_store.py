"""An in-memory MapStore (io/store_protocol.py) for fast tests of the etcd logic in control/.

It keeps etcd's semantics that the logic relies on: one revision counter raised by every write,
create/mod revisions per key, leases whose expiry deletes their keys, compaction (a watch from a
compacted revision raises CompactedError), and watches that see every event after their start
revision in order. Failure injection: ``down = True`` makes every call raise StoreUnavailable
and breaks open watches; ``break_watches()`` breaks them once.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from overlayd.io.store_protocol import (
    CompactedError,
    KeyValue,
    StoreUnavailable,
    WatchEvent,
)


class MemoryStore:
    def __init__(self) -> None:
        self.revision = 1
        self.data: dict[str, KeyValue] = {}
        self.history: list[WatchEvent] = []      # every event, in revision order
        self.compacted = 0
        self.leases: dict[int, int] = {}         # id -> ttl
        self.lease_keys: dict[int, set[str]] = {}
        self._next_lease = 100
        self.down = False
        self.calls: dict[str, int] = {}
        self._changed = asyncio.Condition()
        self._epoch = 0                          # raised to break open watches
        self.endpoint = "memory://0"

    # -- helpers for tests ----------------------------------------------------------------------

    def _check(self, name: str) -> None:
        self.calls[name] = self.calls.get(name, 0) + 1
        if self.down:
            raise StoreUnavailable("memory store is down")

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    def break_watches(self) -> None:
        self._epoch += 1
        asyncio.get_event_loop().create_task(self._notify())

    def set_down(self, down: bool) -> None:
        self.down = down
        if down:
            self.break_watches()

    async def expire(self, lease_id: int) -> None:
        """The lease's TTL ran out: its keys go, as etcd deletes them."""
        await self.revoke_lease(lease_id, check=False)

    def _write(self, key: str, value: bytes, lease: int) -> int:
        self.revision += 1
        held = self.data.get(key)
        old_lease = held.lease if held else 0
        if old_lease and old_lease in self.lease_keys:
            self.lease_keys[old_lease].discard(key)
        kv = KeyValue(key, value, held.create_revision if held else self.revision,
                      self.revision, lease)
        self.data[key] = kv
        if lease:
            self.lease_keys.setdefault(lease, set()).add(key)
        self.history.append(WatchEvent("put", kv))
        return self.revision

    def _remove(self, key: str) -> bool:
        held = self.data.pop(key, None)
        if held is None:
            return False
        self.revision += 1
        self.history.append(WatchEvent("delete", KeyValue(key, b"", held.create_revision,
                                                          self.revision, 0)))
        return True

    # -- MapStore -------------------------------------------------------------------------------

    async def get(self, key: str) -> KeyValue | None:
        self._check("get")
        return self.data.get(key)

    async def list_prefix(self, prefix: str) -> tuple[list[KeyValue], int]:
        self._check("list")
        return sorted((kv for k, kv in self.data.items() if k.startswith(prefix)),
                      key=lambda kv: kv.key), self.revision

    async def watch_prefix(self, prefix: str, start_revision: int
                           ) -> AsyncIterator[list[WatchEvent]]:
        self._check("watch")
        if start_revision <= self.compacted:
            raise CompactedError(self.compacted)
        epoch, seen = self._epoch, start_revision - 1
        while True:
            if self.down or epoch != self._epoch:
                raise StoreUnavailable("watch stream broken")
            batch = [e for e in self.history
                     if e.kv.mod_revision > seen and e.kv.key.startswith(prefix)]
            if batch:
                seen = batch[-1].kv.mod_revision
                yield batch
                continue
            seen = max(seen, self.revision)
            async with self._changed:
                await self._changed.wait()

    async def grant_lease(self, ttl_seconds: int) -> int:
        self._check("grant")
        self._next_lease += 1
        self.leases[self._next_lease] = ttl_seconds
        return self._next_lease

    async def lease_ttl(self, lease_id: int) -> int:
        self._check("lease_ttl")
        return self.leases.get(lease_id, -1)

    async def revoke_lease(self, lease_id: int, check: bool = True) -> None:
        if check:
            self._check("revoke")
        self.leases.pop(lease_id, None)
        for key in sorted(self.lease_keys.pop(lease_id, set())):
            self._remove(key)
        await self._notify()

    async def create(self, key: str, value: bytes, lease: int = 0) -> int | None:
        self._check("create")
        if key in self.data:
            return None
        rev = self._write(key, value, lease)
        await self._notify()
        return rev

    async def put_if_revision(self, key: str, value: bytes, mod_revision: int,
                              lease: int = 0) -> int | None:
        self._check("put_if_revision")
        held = self.data.get(key)
        if held is None or held.mod_revision != mod_revision:
            return None
        rev = self._write(key, value, lease)
        await self._notify()
        return rev

    async def delete_if_revision(self, key: str, mod_revision: int) -> bool:
        self._check("delete_if_revision")
        held = self.data.get(key)
        if held is None or held.mod_revision != mod_revision:
            return False
        self._remove(key)
        await self._notify()
        return True

    async def put(self, key: str, value: bytes, lease: int = 0) -> int:
        self._check("put")
        rev = self._write(key, value, lease)
        await self._notify()
        return rev

    async def delete(self, key: str) -> bool:
        self._check("delete")
        gone = self._remove(key)
        await self._notify()
        return gone

    async def compact(self, revision: int) -> None:
        self._check("compact")
        self.compacted = max(self.compacted, revision)
        self.history = [e for e in self.history if e.kv.mod_revision > revision]
        self.break_watches()     # etcd cancels watchers that fall behind a compaction

    async def status(self) -> dict[str, object]:
        self._check("status")
        return {"endpoint": self.endpoint, "version": "memory", "revision": self.revision}

    async def close(self) -> None:
        return None
