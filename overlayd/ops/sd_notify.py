"""The systemd notification protocol (sd_notify(3)), without libsystemd.

systemd passes ``$NOTIFY_SOCKET``: a unix datagram socket (a path, or ``@name`` in the abstract
namespace). Each message is one datagram of newline-separated ``KEY=VALUE`` lines. Without the
variable every call here is a no-op, so the same code runs in a terminal, in tests and under
systemd. A failed send is logged once and never raised: notification is advice to the service
manager, not a reason to stop forwarding.

What overlayd sends, and when (the runtime decides the moments; see runtime/service.py):
- ``READY=1`` once the device is up, the map loaded and every socket bound;
- ``RELOADING=1`` + ``MONOTONIC_USEC=`` when a reload starts, ``READY=1`` when it ended;
- ``STOPPING=1`` on SIGTERM/SIGINT;
- ``STATUS=`` one human line, shown by ``systemctl status``;
- ``WATCHDOG=1`` from an event-loop timer at half of ``$WATCHDOG_USEC``, so a loop that stops
  turning stops the pings and systemd restarts the service.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Mapping

log = logging.getLogger("overlayd")

MAX_STATUS_CHARS = 400   # systemctl shows one line; keep a runaway message from filling a datagram
EXTEND_MARGIN_SECONDS = 10.0   # EXTEND_TIMEOUT_USEC= covers the next wait slice and this much more


def monotonic_usec() -> int:
    """CLOCK_MONOTONIC in microseconds, the clock systemd compares MONOTONIC_USEC against."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


def watchdog_interval(env: Mapping[str, str] | None = None, pid: int | None = None) -> float | None:
    """Seconds between the pings systemd expects (``$WATCHDOG_USEC``), or None when off.

    ``$WATCHDOG_PID``, when set, names the process the watchdog is meant for; a child that
    inherited the environment must not ping on its parent's behalf.
    """
    env = os.environ if env is None else env
    usec_text = env.get("WATCHDOG_USEC", "")
    if not usec_text.isdigit() or int(usec_text) == 0:
        return None
    pid_text = env.get("WATCHDOG_PID", "")
    if pid_text and (not pid_text.isdigit() or int(pid_text) != (pid or os.getpid())):
        return None
    return int(usec_text) / 1_000_000


def _address(text: str) -> str | None:
    if text.startswith("@"):
        return "\0" + text[1:]          # abstract namespace
    if text.startswith("/"):
        return text
    return None                         # vsock:... and relative paths: not for us


class Notifier:
    """Sends sd_notify messages to ``$NOTIFY_SOCKET``; does nothing when it is not set."""

    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        env = os.environ if env is None else env
        text = env.get("NOTIFY_SOCKET", "")
        self.address = _address(text) if text else None
        if text and self.address is None:
            log.warning("NOTIFY_SOCKET=%r is not a unix socket address; not notifying systemd",
                        text)
        self._sock: socket.socket | None = None
        self._failed = False

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, *fields: str) -> bool:
        """Send one datagram of ``KEY=VALUE`` fields; True if it went out."""
        if self.address is None:
            return False
        message = "\n".join(fields).encode("utf-8", "replace")
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self._sock.setblocking(False)
            self._sock.sendto(message, self.address)
        except OSError as exc:
            if not self._failed:   # once: systemd gone or its queue full is not worth a flood
                log.warning("sd_notify to %s failed: %s (further failures not logged)",
                            self.address.replace("\0", "@"), exc.strerror or exc)
                self._failed = True
            return False
        return True

    # -- the messages overlayd uses -------------------------------------------------------------

    def ready(self, status: str) -> bool:
        return self.send("READY=1", _status(status))

    def reloading(self, status: str) -> bool:
        # MONOTONIC_USEC lets systemd (>= 253) tell this reload from an earlier one.
        return self.send("RELOADING=1", f"MONOTONIC_USEC={monotonic_usec()}", _status(status))

    def stopping(self, status: str = "stopping") -> bool:
        return self.send("STOPPING=1", _status(status))

    def status(self, status: str) -> bool:
        return self.send(_status(status))

    def waiting(self, status: str, seconds: float) -> bool:
        """Still starting, on purpose: push systemd's start timeout (TimeoutStartSec=) out by
        ``seconds`` plus a margin, so a bounded wait is not killed as a hung start."""
        extend = int((seconds + EXTEND_MARGIN_SECONDS) * 1_000_000)
        return self.send(_status(status), f"EXTEND_TIMEOUT_USEC={extend}")

    def watchdog(self) -> bool:
        return self.send("WATCHDOG=1")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def _status(text: str) -> str:
    line = " ".join(text.split())   # one line: STATUS= ends at the next newline
    return "STATUS=" + line[:MAX_STATUS_CHARS]
