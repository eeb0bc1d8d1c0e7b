"""Errors that end the daemon with one clear line and a specific exit status (sysexits.h)."""

from __future__ import annotations

EX_USAGE = 64        # bad command line
EX_UNAVAILABLE = 69  # a facility the daemon needs is missing (/dev/net/tun)
EX_SOFTWARE = 70     # a bug: the daemon failed in a way it did not foresee
EX_OSERR = 71        # the OS refused something (port in use, device name in use)
EX_TEMPFAIL = 75     # try again later: what the daemon waited for (its public IP) did not come
EX_NOPERM = 77       # not allowed (needs CAP_NET_ADMIN)
EX_CONFIG = 78       # configuration error: systemd's RestartPreventExitStatus


class StartupError(Exception):
    """The daemon cannot start; ``str()`` is the one line for the operator."""

    def __init__(self, message: str, exit_code: int = EX_OSERR) -> None:
        super().__init__(message)
        self.exit_code = exit_code
