"""WireGuard's timer constants (whitepaper section 6) and the per-peer timer decisions.

The data plane records, per peer, when it last sent/received anything and data (not a
keepalive); the control plane polls those times on its tick and decides from them, so no timer
work is ever done per packet. Every constant is configurable so tests can shorten them.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Final

REKEY_AFTER_MESSAGES: Final = 1 << 60
REJECT_AFTER_MESSAGES: Final = (1 << 64) - (1 << 13) - 1


@dataclass(frozen=True, slots=True)
class Timings:
    rekey_after_time: float = 120.0     # the initiator starts a new handshake for a session this old
    reject_after_time: float = 180.0    # a session this old neither sends nor receives
    rekey_attempt_time: float = 90.0    # give up retrying a handshake after this long
    rekey_timeout: float = 5.0          # resend an unanswered initiation after this (+ jitter)
    keepalive_timeout: float = 10.0     # answer received data with a keepalive if we sent nothing
    persistent_keepalive: float = 0.0   # 0: off; else send something at least this often
    rekey_after_messages: int = REKEY_AFTER_MESSAGES
    reject_after_messages: int = REJECT_AFTER_MESSAGES

    @property
    def rekey_on_receive_age(self) -> float:
        """An initiator receiving on a session this old rekeys (so it is new before rejection)."""
        return self.reject_after_time - self.keepalive_timeout - self.rekey_timeout

    def retry_delay(self, rng: random.Random) -> float:
        """REKEY_TIMEOUT plus up to a third of a second of jitter, as the whitepaper asks."""
        return self.rekey_timeout + rng.uniform(0.0, 0.333)


@dataclass(slots=True)
class Activity:
    """When the data plane last saw traffic of one peer (monotonic seconds, -inf = never)."""

    sent_any: float = float("-inf")
    received_any: float = float("-inf")     # authenticated transport messages only
    sent_data: float = float("-inf")
    received_data: float = float("-inf")


def keepalive_due(a: Activity, now: float, t: Timings) -> bool:
    """We received data and have sent nothing back for KEEPALIVE_TIMEOUT: tell the peer we are
    alive (a passive side would otherwise look dead to it), or the persistent interval passed."""
    if a.received_data > a.sent_any and now - a.received_data >= t.keepalive_timeout:
        return True
    return t.persistent_keepalive > 0 and now - a.sent_any >= t.persistent_keepalive


def persistent_keepalive_due(a: Activity, last_initiation_sent: float, now: float,
                             t: Timings) -> bool:
    """The persistent interval passed since we last sent anything, a handshake initiation
    included (without a session that is all a peer sends, and it keeps a NAT mapping too)."""
    return (t.persistent_keepalive > 0
            and now - max(a.sent_any, last_initiation_sent) >= t.persistent_keepalive)


def peer_looks_dead(a: Activity, now: float, t: Timings) -> bool:
    """We sent data and heard nothing for KEEPALIVE + REKEY_TIMEOUT: start a new handshake."""
    return (a.sent_data > a.received_any
            and now - a.sent_data >= t.keepalive_timeout + t.rekey_timeout)
