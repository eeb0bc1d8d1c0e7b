"""Logging to stderr in a form journald understands: one line per record.

Under systemd (JOURNAL_STREAM names our stderr) each line starts with a syslog priority prefix
``<N>`` and carries no timestamp (the journal adds its own). Per-packet problems are counters,
never lines; repeated warnings go through ``overlayd.rate_limited_log`` (usable from every
layer, so it lives below them all).
"""

from __future__ import annotations

import logging
import os
import sys

_PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3,
             logging.CRITICAL: 2}


LINE_JOINER = " | "   # where a record's text had a line break (a list of problems, a traceback)


def one_line(text: str) -> str:
    """A record's text as one line: journald (and grep) take each line for a record of its own,
    so a continuation line would lose the timestamp and the level."""
    return LINE_JOINER.join(line for line in text.splitlines() if line.strip())


class _OneLineFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return one_line(super().format(record))


class _JournalFormatter(_OneLineFormatter):
    def format(self, record: logging.LogRecord) -> str:
        return f"<{_PRIORITY.get(record.levelno, 6)}>{super().format(record)}"


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
        handler.setFormatter(_OneLineFormatter("%(asctime)s overlayd[%(process)d] "
                                               "%(levelname)s %(message)s"))
    root = logging.getLogger("overlayd")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False
