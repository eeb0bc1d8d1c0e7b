"""Logging to stderr in a form journald understands, and a rate limit for repeated warnings.

Under systemd (JOURNAL_STREAM names our stderr) each line starts with a syslog priority prefix
``<N>`` and carries no timestamp (the journal adds its own). Per-packet problems are counters,
never lines.
"""

from __future__ import annotations

import logging
import os
import sys
import time

_PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3,
             logging.CRITICAL: 2}


class _JournalFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        prio = _PRIORITY.get(record.levelno, 6)
        return "\n".join(f"<{prio}>{line}" for line in super().format(record).splitlines())


def stderr_is_journal() -> bool:
    """Whether stderr is the journal stream systemd set up (systemd.exec(5), JOURNAL_STREAM).

    The variable is inherited by children whose stderr may go elsewhere (a shell redirect, a
    test harness), so it counts only if its device:inode is the one of our own fd 2.
    """
    expected = os.environ.get("JOURNAL_STREAM", "")
    try:
        st = os.fstat(sys.stderr.fileno())
    except (OSError, ValueError, AttributeError):
        return False
    return expected == f"{st.st_dev}:{st.st_ino}"


def setup_logging(level: str = "info") -> None:
    handler = logging.StreamHandler(sys.stderr)
    if stderr_is_journal():
        handler.setFormatter(_JournalFormatter("%(message)s"))
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s overlayd[%(process)d] "
                                               "%(levelname)s %(message)s"))
    root = logging.getLogger("overlayd")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False


class RateLimitedLog:
    """At most one line per ``interval`` seconds per key; says how many were suppressed."""

    def __init__(self, logger: logging.Logger, interval: float = 10.0) -> None:
        self._logger = logger
        self._interval = interval
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def warning(self, key: str, message: str, *args: object) -> None:
        now = time.monotonic()
        last = self._last.get(key)
        if last is not None and now - last < self._interval:
            self._suppressed[key] = self._suppressed.get(key, 0) + 1
            return
        self._last[key] = now
        skipped = self._suppressed.pop(key, 0)
        suffix = f" ({skipped} similar suppressed)" if skipped else ""
        self._logger.warning(message + suffix, *args)
