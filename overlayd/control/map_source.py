"""The seam between where the subnet map comes from and the one path that applies it.

A source (the map file, etcd, later Kubernetes node annotations) is any object with this shape;
the runtime does not know which one it runs on:

- ``changes()`` is called once and *is* the source running (a file's poll, etcd's lease keeping
  and watch). Its first item comes when ``load()`` has a map to start on (at once for a file;
  for etcd once the network config is valid, this node holds a lease and the leases were read).
  Every later item says ``load()`` may now return a different map, and why (for the log).
- ``load()`` is synchronous and returns the map as the source has it now, or raises ConfigError:
  the runtime builds new tables from it on the side and swaps them in (runtime/daemon.py).
- ``report()`` is plain data for ``overlayd status``, metrics and health: counters, and under
  ``"problems"`` anything that makes the map in force not current (e.g. etcd's network config is
  invalid, or the lease was lost).
- ``close()`` releases what the source holds (for etcd: connections; the lease stays, so a
  restarted daemon gets the same subnet back).

A third source is a new module implementing this, plus one line in runtime/sources.py.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, Protocol

from overlayd.control.subnet_map import SubnetMap


class MapSource(Protocol):
    kind: str              # "file", "etcd": the metrics' and status' `source`
    location: str          # the file's path, or etcd's endpoints and prefix
    node_name: str | None  # this node's name in the maps load() returns (None: by address)

    def load(self) -> SubnetMap: ...

    def changes(self) -> AsyncIterator[str]: ...

    def report(self) -> dict[str, Any]: ...

    async def close(self) -> None: ...
