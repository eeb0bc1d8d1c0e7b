"""The file source of the subnet map: read, validate, and notice when the file changes on disk."""

from __future__ import annotations

import os
from pathlib import Path

from overlayd.control.problems import read_toml
from overlayd.control.subnet_map import SubnetMap, parse_subnet_map


class FileMapSource:
    def __init__(self, path: Path) -> None:
        self.path = path
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

    def _stat(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ino)
