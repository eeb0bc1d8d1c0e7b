"""What the ops layer knows of the daemon: the part of runtime.daemon.Daemon it reads, and the
ops layer's own runtime facts. Below both state.py and health.py, so neither imports the other
to get these (state uses health's verdict; health needs only this).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

# Phases of the daemon's life, as the runtime reports them.
STARTING, RUNNING, RELOADING, STOPPING = "starting", "running", "reloading", "stopping"


class DaemonLike(Protocol):
    """What this module reads of runtime.daemon.Daemon (ops never imports the runtime)."""

    config: Any
    smap: Any
    view: Any
    forwarder: Any
    implementation: str
    started_at: float
    map_applied_at: float
    map_error: str | None
    last_loop_tick: float
    device_recreations: int               # times the device was recreated after it vanished
    device_problem: str | None            # the device is there but not where it should be

    @property
    def device_broken(self) -> bool: ...


@dataclass
class RuntimeInfo:
    """What the ops layer itself knows: phase, reload outcomes, where it listens."""

    phase: str = STARTING
    started_wall: float = field(default_factory=time.time)
    reloads_applied: int = 0
    reloads_rejected: int = 0
    metrics_url: str | None = None
    control_socket: str | None = None
    capture_supported: bool = False
    capture_sessions: int = 0
    notify_socket: str | None = None
    watchdog_seconds: float | None = None
    # Per peer name: Unix time its rx counter was last seen to move (state.observe_peer_rx),
    # and the count it had then.
    peer_last_rx: dict[str, float] = field(default_factory=dict)
    peer_rx_seen: dict[str, int] = field(default_factory=dict)


def map_source(d: DaemonLike) -> tuple[str, str, dict[str, Any]]:
    """(kind, location, report) of the map's source (control/map_source.py)."""
    source = getattr(d, "source", None)
    if source is None:
        return d.config.map_source, os.path.normpath(d.config.map_file), {}
    return source.kind, source.location, source.report()
