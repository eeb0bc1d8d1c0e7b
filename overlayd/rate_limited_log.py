"""A rate limit for repeated warnings: at most one line per key and interval.

Lives at the bottom of the package (like ``errors``) so the ops layer (control socket, HTTP
server) and the runtime can both use it without an upward import.
"""

from __future__ import annotations

import logging
import time


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
