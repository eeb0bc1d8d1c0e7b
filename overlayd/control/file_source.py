"""The file source of the subnet map: read, validate, and notice when the file changes on disk."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from overlayd.control.problems import read_toml
from overlayd.control.subnet_map import SubnetMap, parse_subnet_map


class FileMapSource:
    """A MapSource (control/map_source.py) over one TOML file, polled every ``poll_seconds``
    (0: never; SIGHUP still reloads)."""

    kind = "file"

    def __init__(self, path: Path, poll_seconds: float = 0.0,
                 node_name: str | None = None) -> None:
        self.path = path
        self.location = os.path.normpath(path)
        self.poll_seconds = poll_seconds
        self.node_name = node_name
        self._signature: tuple[int, int, int] | None = None

    def load(self) -> SubnetMap:
        """Parse the file now (ConfigError on any problem) and remember what was read."""
        signature = self._stat()
        smap = parse_subnet_map(read_toml(self.path), str(self.path))
        self._signature = signature
        return smap

    def changed(self) -> bool:
        """Whether the file differs from what ``load`` last read (mtime, size or inode)."""
        return self._stat() != self._signature

    async def changes(self) -> AsyncIterator[str]:
        yield "map file read"                 # the file is there to be read at once
        if self.poll_seconds <= 0:
            await asyncio.Event().wait()      # only SIGHUP reloads: nothing to watch
        while True:
            await asyncio.sleep(self.poll_seconds)
            if self.changed():
                yield "map file changed"

    def report(self) -> dict[str, Any]:
        return {}

    async def close(self) -> None:
        return None

    def _stat(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ino)
