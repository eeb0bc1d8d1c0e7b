"""/healthz and /readyz: verdicts from the daemon's live state, with the reasons when not.

- healthy (liveness, /healthz): the event loop turns (its timers ran recently), the data plane
  exists and its device is there and being read, and the daemon is not stopping. A failure here
  is worth a restart.
- ready (/readyz): healthy, started, and forwarding on a map that is loaded and current: the
  last reload was applied (a rejected map file keeps the old map in force but is not current).

Sans-IO: ``now`` is passed in (monotonic seconds). Reading the state happens on the loop thread
(see state.py); if the loop cannot be reached at all, http_server.py reports that itself.
"""

from __future__ import annotations

from dataclasses import dataclass

from overlayd.ops import daemon_view

# The daemon's periodic timers tick every 0.1 s; 5 s without one means the loop is stuck
# (or starved by a callback that never returns) even if this check itself got scheduled.
LOOP_STALL_SECONDS = 5.0


@dataclass(frozen=True, slots=True)
class Verdict:
    healthy: bool
    ready: bool
    live_problems: tuple[str, ...]    # what makes it unhealthy (and so also not ready)
    ready_problems: tuple[str, ...]   # what else keeps it from being ready

    @property
    def problems(self) -> tuple[str, ...]:
        return self.live_problems + self.ready_problems


def check(d: daemon_view.DaemonLike, info: daemon_view.RuntimeInfo, now: float) -> Verdict:
    live: list[str] = []
    if info.phase == daemon_view.STOPPING:
        live.append("stopping")
    tick_age = now - d.last_loop_tick
    if tick_age > LOOP_STALL_SECONDS:
        live.append(f"event loop stalled: no timer ran for {tick_age:.1f} s")
    if d.forwarder is None:
        live.append("data plane not running")
    elif d.device_broken:
        live.append(f"device {d.config.device_name} is gone or failing; recreating it")
    elif d.device_problem:
        live.append(f"{d.device_problem}; putting it back")
    ready_problems: list[str] = []
    if info.phase == daemon_view.STARTING:
        ready_problems.append("starting")
    if d.view is None:
        ready_problems.append("no subnet map loaded")
    if d.map_error:
        first = d.map_error.strip().splitlines()[0] if d.map_error.strip() else "unknown"
        more = " (and more; see the log)" if len(d.map_error.strip().splitlines()) > 1 else ""
        ready_problems.append(f"subnet map not current: the last reload was rejected, still "
                              f"forwarding on the previous map: {first}{more}")
    # The source's own problems (etcd: network config invalid, lease lost): the map in force
    # goes on forwarding but is not current.
    ready_problems.extend(daemon_view.map_source(d)[2].get("problems", []))
    return Verdict(not live, not live and not ready_problems, tuple(live), tuple(ready_problems))
