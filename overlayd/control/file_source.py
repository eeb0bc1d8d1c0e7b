"""The file source of the subnet map: read, validate, and notice when the file changes on disk.

A file is judged once per content: ``load`` remembers what it read whether the map was accepted
or rejected, so a broken file on disk is rejected once (one log record, one RELOADING/READY
pair, one ``rejected`` count), not at every poll, and a touch or an identical rewrite of the
file is not a change.
"""

from __future__ import annotations

import asyncio
import hashlib
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
        self._digest: bytes | None = None     # of the content ``load`` last judged

    def load(self) -> SubnetMap:
        """Parse the file now (ConfigError on any problem) and remember what was read, also
        when it is rejected."""
        # Stat and hash before parsing: a write after them shows as a change at the next poll.
        self._signature, self._digest = self._stat(), self._content_digest()
        return parse_subnet_map(read_toml(self.path), str(self.path))

    def changed(self) -> bool:
        """Whether the file's content differs from what ``load`` last judged. The cheap stat
        (mtime, size, inode) decides unless it moved; then the content does."""
        signature = self._stat()
        if signature == self._signature:
            return False
        if self._digest is not None and self._content_digest() == self._digest:
            self._signature = signature      # touched or rewritten identically: nothing new
            return False
        return True

    def _content_digest(self) -> bytes | None:
        try:
            return hashlib.sha256(self.path.read_bytes()).digest()
        except OSError:
            return None

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
