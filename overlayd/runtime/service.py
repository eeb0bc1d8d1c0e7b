"""Run one Daemon under uvloop with its operations around it: systemd, metrics, control socket.

1. start (synchronous, before the loop): the daemon binds its tunnel socket and brings the device
   up with the map loaded; then the metrics listener and the control socket are bound. Any
   failure is a StartupError: one line, a sysexits status, and ``STATUS=failed: ...`` for systemd;
2. the loop starts; the control server and the HTTP thread begin serving; the daemon registers
   its readers and signal handlers and calls ``on_ready``: only then ``READY=1`` is sent, and the
   watchdog timer starts pinging at half of ``$WATCHDOG_USEC``;
3. reload (SIGHUP or the map file changed): ``RELOADING=1`` + ``MONOTONIC_USEC`` before,
   ``READY=1`` after, with a STATUS line saying whether the new map was applied or rejected;
4. stop (SIGTERM/SIGINT): ``STOPPING=1`` at once, capture sessions end, the loop winds down, the
   HTTP listener stops and the control socket file is removed.

Test hook (never for production): with ``OVERLAYD_TEST_HOOKS=1`` in the environment, SIGUSR2
makes the event loop sleep ``$OVERLAYD_TEST_BLOCK_SECONDS`` (default 3) synchronously, so a
test can watch the watchdog pings stop while the loop is stuck and /healthz fail.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from collections.abc import Mapping
from types import ModuleType
from typing import Any

import uvloop

from overlayd.control.config import DaemonConfig, metrics_address
from overlayd.control.map_source import MapSource
from overlayd.control.subnet_map import SubnetMap
from overlayd.errors import StartupError
from overlayd.ops import capture, control_socket, health, state
from overlayd.ops.http_server import LoopBridge, OpsHttpServer
from overlayd.ops.metrics import build_registry, read_sample
from overlayd.ops.sd_notify import Notifier, watchdog_interval
from overlayd.runtime.daemon import Daemon
from overlayd.runtime.sources import SubnetEnvWriter, open_source

log = logging.getLogger("overlayd")

STATUS_SECONDS = 10.0          # how often systemd's STATUS= line is refreshed with traffic
PEER_RX_SECONDS = 1.0          # resolution of each peer's "last received" time
TEST_HOOKS_ENV = "OVERLAYD_TEST_HOOKS"


class Operations:
    """Everything around the Daemon that is for operators, wired through its hooks."""

    def __init__(self, daemon: Daemon, config: DaemonConfig,
                 env: Mapping[str, str] | None = None) -> None:
        env = os.environ if env is None else env
        self.daemon = daemon
        self.config = config
        self.env = env
        self.notifier = Notifier(env)
        self.info = state.RuntimeInfo(control_socket=str(config.control_socket),
                                      notify_socket=env.get("NOTIFY_SOCKET") or None,
                                      watchdog_seconds=watchdog_interval(env))
        self.http: OpsHttpServer | None = None
        self.bridge: LoopBridge | None = None
        self.control_sock: Any = None
        self.control: control_socket.ControlServer | None = None
        self.hub: capture.CaptureHub | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timers: dict[str, asyncio.TimerHandle] = {}
        self._reload_base = 0.0
        self._test_hook = False
        daemon.on_ready.append(self._on_ready)
        daemon.on_reload.append(self._on_reload)
        daemon.on_stopping.append(self._on_stopping)
        daemon.on_waiting.append(self.notifier.waiting)

    # -- 1. bind (before the loop) --------------------------------------------------------------

    def bind(self) -> None:
        if self.config.metrics_enabled:
            host, port = metrics_address(self.config)
            registry = build_registry(self._sample_via_loop)
            self.http = OpsHttpServer(host, port, registry, self._verdict_via_loop)
            self.info.metrics_url = self.http.url
        self.control_sock = control_socket.bind(self.config.control_socket)

    def _sample_via_loop(self) -> dict[str, Any]:
        assert self.bridge is not None
        return self.bridge.call(lambda: read_sample(self.daemon, self._live_info()))

    def _verdict_via_loop(self) -> health.Verdict:
        assert self.bridge is not None
        return self.bridge.call(lambda: health.check(self.daemon, self._live_info(),
                                                     time.monotonic()))

    def _live_info(self) -> state.RuntimeInfo:
        self.info.capture_sessions = len(self.hub.sessions) if self.hub is not None else 0
        self.info.capture_supported = capture.supported(self.daemon.forwarder)
        return self.info

    # -- 2. run ---------------------------------------------------------------------------------

    async def main(self) -> None:
        loop = asyncio.get_running_loop()
        self._loop = loop
        self.bridge = LoopBridge(loop)
        self.hub = capture.CaptureHub(self.daemon, loop)
        d = self.daemon
        handlers: dict[str, control_socket.Handler] = {
            "status": lambda _req: state.status(d, self._live_info()),
            "peers": lambda _req: state.peers(d, self._live_info()),
            "routes": lambda _req: state.routes(d),
            "fdb": lambda _req: state.fdb(d),
        }
        self.control = control_socket.ControlServer(self.control_sock, self.config.control_socket,
                                                    handlers, self.hub)
        try:
            await self.control.start()
            if self.http is not None:
                self.http.start()
            await d.run()
        finally:
            self._cancel_timers()
            if self._test_hook:
                loop.remove_signal_handler(signal.SIGUSR2)
            await self.control.close()

    def _on_ready(self) -> None:
        self.info.phase = state.RUNNING
        self._live_info()
        self.notifier.ready(self._status_line())
        log.info("ready: %s", self._status_line())
        assert self._loop is not None
        self._every("peer-rx", PEER_RX_SECONDS,
                    lambda: state.observe_peer_rx(self.daemon, self.info, time.time()), now=True)
        if self.info.watchdog_seconds is not None:
            self._every("watchdog", self.info.watchdog_seconds / 2, self.notifier.watchdog,
                        now=True)
        if self.notifier.enabled:
            self._every("status", STATUS_SECONDS,
                        lambda: self.notifier.status(self._status_line()))
        if self.env.get(TEST_HOOKS_ENV) == "1":
            seconds = float(self.env.get("OVERLAYD_TEST_BLOCK_SECONDS", "3"))
            log.warning("test hooks enabled (%s=1): SIGUSR2 blocks the event loop for %g s",
                        TEST_HOOKS_ENV, seconds)
            self._loop.add_signal_handler(signal.SIGUSR2, _block_loop, seconds)
            self._test_hook = True

    def _every(self, name: str, seconds: float, callback: Any, now: bool = False) -> None:
        """A repeating loop timer: it fires only while the loop turns, which is the point."""
        assert self._loop is not None

        def tick() -> None:
            callback()
            self._timers[name] = self._loop.call_later(seconds, tick)  # type: ignore[union-attr]

        if now:
            callback()
        self._timers[name] = self._loop.call_later(seconds, tick)

    def _cancel_timers(self) -> None:
        for timer in self._timers.values():
            timer.cancel()
        self._timers = {}

    # -- 3. reload ------------------------------------------------------------------------------

    def _on_reload(self, phase: str) -> None:
        d = self.daemon
        if self.info.phase == state.STOPPING:
            return       # a SIGHUP during shutdown: READY=1 now would contradict STOPPING=1
        if phase == "start":
            self._reload_base = d.map_applied_at
            self.info.phase = state.RELOADING
            self.notifier.reloading("reloading the subnet map")
            return
        if self.info.phase == state.RELOADING:
            self.info.phase = state.RUNNING
        if d.map_applied_at != self._reload_base and d.map_error is None:
            self.info.reloads_applied += 1
        else:
            self.info.reloads_rejected += 1
        self.notifier.ready(self._status_line())

    # -- 4. stop --------------------------------------------------------------------------------

    def _on_stopping(self) -> None:
        self.info.phase = state.STOPPING
        self.notifier.stopping("stopping: removing the device and routes")
        self._cancel_timers()
        if self.hub is not None:
            self.hub.shutdown()

    def close(self) -> None:
        """Release what ``bind`` took; safe after a failed start or a clean stop."""
        if self.http is not None:
            self.http.close()
            self.http = None
        if self.control is not None:
            self.control.remove_file()
        elif self.control_sock is not None:
            # bound, but the loop never ran: remove our socket file ourselves
            try:
                path = self.config.control_socket
                if path.exists() and os.stat(path).st_ino == os.fstat(
                        self.control_sock.fileno()).st_ino:
                    path.unlink()
            except OSError:
                pass
        if self.control_sock is not None:
            self.control_sock.close()
            self.control_sock = None
        self.notifier.close()

    def _status_line(self) -> str:
        d, view = self.daemon, self.daemon.view
        if self.info.phase == state.STOPPING:
            return "stopping"
        if view is None:
            return "starting"
        traffic, drops = state.counters(d)
        head = "forwarding" if d.map_error is None else \
            "forwarding on the previous map (last reload rejected: see the log)"
        return (f"{head}: node {view.node.name} {view.node.subnet} on "
                f"{self.config.device_name}, {len(view.peers)} peers, "
                f"{len(view.tables.routes)} routes; {traffic.get('forwarded_packets', 0)} "
                f"packets out, {traffic.get('delivered_packets', 0)} in, "
                f"{sum(drops.values())} dropped; data plane {d.implementation}")


def _block_loop(seconds: float) -> None:
    """Test hook only: a stuck event loop, on demand."""
    log.warning("test hook: blocking the event loop for %g s", seconds)
    time.sleep(seconds)


def serve(config: DaemonConfig, smap: SubnetMap | None, dataplane: ModuleType) -> int:
    """Run the daemon; ``smap`` is the map file already validated, None for etcd."""
    source = open_source(config)
    daemon = Daemon(config, smap, dataplane, dataplane.IMPLEMENTATION,  # type: ignore[arg-type]
                    source=source)
    ops = Operations(daemon, config)
    daemon.on_map_applied.append(SubnetEnvWriter(config))
    ops.notifier.status("starting: creating the device and binding sockets")
    try:
        if not uvloop.run(_start_and_run(daemon, ops, source)):
            log.info("stopped before the subnet map was available")
            return 0
    except StartupError as exc:
        ops.notifier.status(f"failed: {exc}")
        raise
    finally:
        ops.close()
        daemon.close()
    log.info("stopped")
    return 0


async def _start_and_run(daemon: Daemon, ops: Operations, source: MapSource) -> bool:
    """Wait for the source's first map (at once for a file; etcd may take a while), then start
    and run; False if told to stop while still waiting."""
    loop = asyncio.get_running_loop()
    try:
        changes = source.changes()
        waiting = asyncio.ensure_future(anext(changes))
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, waiting.cancel)
        try:
            if not (await asyncio.wait({waiting}, timeout=0.5))[0]:
                ops.notifier.status(f"starting: waiting for the subnet map from {source.kind} "
                                    f"{source.location}")
            why = await waiting
        except asyncio.CancelledError:
            return False
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
        daemon.smap = source.load()
        daemon.source_changes = changes
        log.info("subnet map from %s %s: %s", source.kind, source.location, why)
        daemon.start()
        ops.bind()
        await ops.main()
        return True
    finally:
        await source.close()
