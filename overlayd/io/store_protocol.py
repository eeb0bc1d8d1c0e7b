"""The seam between the control plane and a key-value store holding the shared subnet map.

control/ (lease acquisition, renewal, watch and resync) is written against ``MapStore`` only, so
it can run on an in-memory store in tests; ``overlayd.io.etcd_store.EtcdStore`` implements it on
a real etcd. Revisions are etcd's: one counter for the whole store, raised by every write.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Literal, Protocol


@dataclass(frozen=True, slots=True)
class KeyValue:
    key: str                 # full key, e.g. "/coreos.com/network/subnets/10.5.1.0-24"
    value: bytes
    create_revision: int
    mod_revision: int
    lease: int               # 0 = no etcd lease (a reservation)


@dataclass(frozen=True, slots=True)
class WatchEvent:
    kind: Literal["put", "delete"]
    kv: KeyValue             # for "delete": value b"", mod_revision = revision of the delete


class StoreError(Exception):
    """Anything the store could not do."""


class StoreUnavailable(StoreError):
    """No endpoint answered (after trying all of them), or a watch stream broke."""


class CompactedError(StoreError):
    """A watch's start revision was compacted away; the caller re-lists and diffs."""

    def __init__(self, compact_revision: int) -> None:
        super().__init__(f"revision compacted away (store compacted up to revision {compact_revision})")
        self.compact_revision = compact_revision


class MapStore(Protocol):
    async def get(self, key: str) -> KeyValue | None: ...

    async def list_prefix(self, prefix: str) -> tuple[list[KeyValue], int]:
        """Every key under prefix, sorted by key, and the store revision the list was read at."""
        ...

    def watch_prefix(self, prefix: str, start_revision: int) -> AsyncIterator[list[WatchEvent]]:
        """Batches of events in revision order from start_revision on.

        Raises CompactedError or StoreUnavailable when the stream breaks; never resumes by itself
        (the caller resumes from the last seen revision + 1).
        """
        ...

    async def grant_lease(self, ttl_seconds: int) -> int:
        """A new etcd lease id."""
        ...

    async def lease_ttl(self, lease_id: int) -> int:
        """Remaining seconds of the lease, -1 if it is gone."""
        ...

    async def revoke_lease(self, lease_id: int) -> None: ...

    async def create(self, key: str, value: bytes, lease: int = 0) -> int | None:
        """Put only if the key does not exist: the new mod_revision, else None."""
        ...

    async def put_if_revision(self, key: str, value: bytes, mod_revision: int,
                              lease: int = 0) -> int | None:
        """Put only if the key's mod_revision is still mod_revision: the new one, else None."""
        ...

    async def delete_if_revision(self, key: str, mod_revision: int) -> bool: ...

    async def put(self, key: str, value: bytes, lease: int = 0) -> int:
        """Unconditional put (net init --force, tests): the new mod_revision."""
        ...

    async def delete(self, key: str) -> bool: ...

    async def compact(self, revision: int) -> None: ...

    async def status(self) -> dict[str, object]:
        """{"endpoint": ..., "version": ..., "revision": ...} of the endpoint in use."""
        ...

    @property
    def endpoint(self) -> str:
        """The endpoint currently in use."""
        ...

    async def close(self) -> None: ...
