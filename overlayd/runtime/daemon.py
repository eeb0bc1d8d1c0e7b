"""`overlayd run`: start, forward, reload, recover and stop — the daemon's whole life.

1. start: resolve this node in the map, bind the tunnel socket, create and configure the device,
   build the forwarder and swap in the tables, then register one reader per fd;
2. forward: each readiness event calls the data plane once (one batch); nothing per packet here;
3. reload (SIGHUP, or the map file changed): build new tables on the side, swap in one call,
   adjust kernel routes by difference; a broken map is logged and the old one kept;
4. recover: a device that vanished (or whose fd fails) is recreated on the same fd;
5. stop (SIGTERM/SIGINT): remove readers, close the socket and the device (which takes its
   address and routes with it), exit 0.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import signal
import socket
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from overlayd.control.config import DaemonConfig
from overlayd.control.file_source import FileMapSource
from overlayd.control.local_node import (
    LocalView,
    build_local_view,
    build_switch_tables,
    find_local_node,
)
from overlayd.control.map_source import MapSource
from overlayd.control.problems import ConfigError
from overlayd.control.subnet_map import SubnetMap
from overlayd.errors import EX_TEMPFAIL, StartupError
from overlayd.io import host_network
from overlayd.io.device import OverlayDevice, tune_device_sysctls
from overlayd.io.tunnel_socket import (
    enable_udp_gro,
    open_tunnel_socket,
    open_tx_socket,
    udp_gso_supported,
)
from overlayd.rate_limited_log import RateLimitedLog
from overlayd.runtime.engine import ThreadedForwarder, choose_engine
from overlayd.runtime.steering import CpuSteering, plan_steering
from overlayd.runtime.wg_threads import ThreadedWireguardForwarder
from overlayd.runtime.wireguard import (
    WG_TICK_SECONDS,
    WireguardRuntime,
    check_own_public_key,
    node_keys,
)
from overlayd.wire.ethernet import parse_mac

log = logging.getLogger("overlayd")

ICMP_REFILL_SECONDS = 0.1     # token bucket granularity for ICMP errors
HEALTH_CHECK_SECONDS = 1.0    # how often the device's existence is checked
FDB_TICK_SECONDS = 0.5        # switched: MAC ageing (the clock is also set before each batch;
                              # on the threads engine the thread ages on this period itself)
ADDRESS_WAIT_SLICE_SECONDS = 5.0   # while waiting for the public IP: STATUS= refreshed this often
HOST_ADDRESSES_SECONDS = 5.0  # routed: how often this host's own addresses are re-read


def kernel_routes(smap: SubnetMap, view: LocalView) -> set[ipaddress.IPv4Network]:
    """Prefixes the kernel must send into the device: the network, and peers' extra prefixes.
    None on the switched path: its address carries the network's prefix length, and the
    connected route that comes with it is all one L2 segment needs."""
    if smap.backend.switched:
        return set()
    routes = {smap.network}
    for peer in view.peers:
        routes.update(r for r in peer.routes if not r.subnet_of(smap.network))
    return routes


class Daemon:
    def __init__(self, config: DaemonConfig, smap: SubnetMap, kernels: Any,
                 implementation: str, source: MapSource | None = None,
                 changes: AsyncIterator[str] | None = None) -> None:
        self.config = config
        # The map's source and its running changes() (control/map_source.py); serve() passes
        # both, having waited on changes() for the first map.
        self.source: MapSource = source or FileMapSource(
            config.map_file, config.map_poll_seconds, config.node_name)
        self.source_changes = changes
        self._follow_task: asyncio.Task[None] | None = None
        self.smap = smap
        self.kernels = kernels
        self.implementation = implementation
        self.view: LocalView | None = None
        # This host's IPv4 addresses: never an inner source from a peer (the device has
        # accept_local=1, see io/device.py), re-read every HOST_ADDRESSES_SECONDS.
        self.host_addresses: tuple[ipaddress.IPv4Address, ...] = ()
        self.tun: OverlayDevice | None = None
        self.sock: socket.socket | None = None
        self.tx_socks: list[socket.socket] = []   # vxlan: outer source ports by flow hash
        self.offloads: dict[str, bool] = {"vnet_hdr": False, "udp_gso": False, "udp_gro": False,
                                          "device_uso": False}
        self.forwarder: Any = None
        self.wireguard: WireguardRuntime | None = None    # backend "wireguard" only
        # [dataplane] engine: "loop" (readers on this event loop) or "threads" (runtime/engine.py:
        # native threads, one per device queue and receive socket; self.rx_socks[1:] are the
        # extra SO_REUSEPORT sockets of threads 1..N-1)
        self.engine = "loop"
        self.engine_threads = 1
        self.rx_socks: list[socket.socket] = []
        # [dataplane] steering (runtime/steering.py): flow, or threads pinned to CPUs with the
        # device's and the sockets' programs sending each flowlet to its CPU's thread
        self.steering = CpuSteering("flow")
        self.routes: set[ipaddress.IPv4Network] = set()
        self.started_at = time.monotonic()
        self.map_applied_at = time.time()
        self.map_error: str | None = None
        self.last_loop_tick = time.monotonic()
        self._stop = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timers: dict[str, asyncio.TimerHandle] = {}   # periodic task -> its next run
        self._readers: list[int] = []
        self._device_broken = False
        self.device_recreations = 0     # times the device came back after it vanished or failed
        self.device_problem: str | None = None   # the device exists but is not as configured
        self._clocked = False     # switched: set the data plane's clock before each batch
        self._ratelimited = RateLimitedLog(log)
        self.on_ready: list[Callable[[], None]] = []
        self.on_reload: list[Callable[[str], None]] = []
        self.on_stopping: list[Callable[[], None]] = []   # once, when stop() is first called
        # (map, view) each time a map is put in force: at start and after each applied reload
        self.on_map_applied: list[Callable[[SubnetMap, LocalView], None]] = []
        # (status, seconds): still starting, waiting up to that long for what status names
        self.on_waiting: list[Callable[[str, float], object]] = []

    # -- 1. start -------------------------------------------------------------------------------

    def start(self) -> None:
        self.source.load()   # remember the file's signature; smap was validated by the caller
        addresses = self._await_own_address()
        me = find_local_node(self.smap, self.source.location, self.source.node_name,
                             (h.address for h in addresses))
        underlay_mtu = self._underlay_mtu(me.public_ip, addresses)
        self.host_addresses = tuple(sorted(h.address for h in addresses))
        self.view = build_local_view(self.smap, me, underlay_mtu, self.host_addresses)
        bind = self.config.bind_address or me.public_ip
        backend = self.smap.backend
        wg_keys = None
        if backend.type == "wireguard":
            assert self.config.wireguard is not None
            wg_keys = node_keys(self.config.wireguard, str(self.config.path))
            from overlayd.control.wg_noise import public_key

            check_own_public_key(self.smap, self.source.location, me.name,
                                 public_key(wg_keys[0]))
        self.engine, self.engine_threads, note = choose_engine(
            self.config.engine, self.config.threads, self.implementation, backend.switched,
            where=str(self.config.path))
        if note:
            log.info("%s", note)
        self.steering = plan_steering(self.config.steering, self.engine, self.engine_threads,
                                      backend.switched, backend=backend.type,
                                      flowlet_gap_us=self.config.flowlet_gap_us)
        multi = self.engine_threads > 1
        self.sock = open_tunnel_socket(bind, backend.port, self.config.socket_buffer_bytes,
                                       reuse_port=multi)
        self.rx_socks = [self.sock] + [
            open_tunnel_socket(bind, backend.port, self.config.socket_buffer_bytes,
                               reuse_port=True) for _ in range(self.engine_threads - 1)]
        if backend.type == "vxlan":
            # RFC 7348 wants the outer source port to follow the inner flow; one socket has one
            # port, so datagrams leave from a small pool of sockets on kernel-chosen ephemeral
            # ports, picked per packet by flow hash. Receiving stays on the VXLAN port.
            self.tx_socks = [open_tx_socket(bind, self.config.socket_buffer_bytes)
                             for _ in range(self.config.tx_sockets)]
        self.tun = OverlayDevice(self.config.device_name, "tap" if backend.switched else "tun",
                                 persist=self.config.keep_device, offload=self.config.offloads,
                                 queues=self.engine_threads, uso=self.config.device_uso)
        self._configure_device()
        self.steering.attach(self.tun, self.rx_socks)
        self.forwarder = self._make_forwarder(me.vtep_mac, wg_keys)
        if self.engine == "threads":
            extra = [self._make_forwarder(me.vtep_mac, wg_keys, queue)
                     for queue in range(1, self.engine_threads)]
            threaded = (ThreadedWireguardForwarder if backend.type == "wireguard"
                        else ThreadedForwarder)
            self.forwarder = threaded(
                [self.forwarder, *extra], self.tun.fds,
                [s.fileno() for s in self.rx_socks], self.config.busy_poll_us)
        if wg_keys is not None:
            assert self.config.wireguard is not None
            self.wireguard = WireguardRuntime(self.config.wireguard, *wg_keys, self.forwarder,
                                              self.sock)
        if backend.switched:
            self._clocked = True
            self.forwarder.set_now(time.monotonic())
            if isinstance(self.forwarder, ThreadedForwarder):
                # the thread ages its own table (no timer, no pause: runtime/engine.py)
                self.forwarder.set_ageing(self.config.mac_ageing_seconds, FDB_TICK_SECONDS)
        self.forwarder.set_tables(self._tables(self.view))
        if self.wireguard is not None:
            self.wireguard.set_peers(self.smap, self.view)
        mode = (f"vxlan {backend.mode} vni {backend.vni} VTEP MAC {me.vtep_mac}"
                if backend.type == "vxlan" else backend.type)
        log.info("node %s: subnet %s, device %s (%s, mtu %d), %s %s:%d, %d peers, data plane %s",
                 me.name, me.subnet, self.config.device_name, me.address, self.view.device_mtu,
                 mode, bind, backend.port, len(self.view.peers), self.implementation)
        log.info("offloads: %s", describe_offloads(self.offloads, self.tun.tso))
        log.info("engine: %s", self.engine if self.engine == "loop" else
                 f"{self.engine_threads} native data-plane thread(s), busy-poll "
                 f"{self.config.busy_poll_us} us, steering {self.steering.mode}")
        for hook in self.on_map_applied:
            hook(self.smap, self.view)

    def _await_own_address(self) -> list[host_network.HostAddress]:
        """The host's addresses, once the one this node needs is among them.

        At boot the daemon may start before DHCP or networkd has configured the public IP.
        Without [node] name that looked like "no node of the map is this host" (78, which systemd
        never retries), with one like a bind address that is not local. So wait, bounded by
        ``[node] wait_for_address_seconds``, telling systemd what for. An address that never
        comes is 75 (EX_TEMPFAIL: systemd tries again), not a config error."""
        addresses = host_network.host_addresses()
        wanted = self._addresses_needed()
        timeout = self.config.wait_for_address_seconds
        deadline = time.monotonic() + timeout
        what = _describe_addresses(wanted)
        if timeout > 0 and wanted and not wanted & {h.address for h in addresses}:
            log.info("waiting up to %g s for %s to be configured on this host", timeout, what)
        while wanted and not wanted & {h.address for h in addresses}:
            left = deadline - time.monotonic()
            if left <= 0:
                if timeout > 0 and self.source.node_name is None:
                    raise StartupError(
                        f"{what} did not appear on this host within {timeout:g} s "
                        f"([node] wait_for_address_seconds); set [node] name if this host is "
                        f"not reachable at its public IP (NAT)", EX_TEMPFAIL)
                break      # named node: the bind below says what is wrong
            status = f"waiting for {what} to be configured on this host ({left:.0f} s left)"
            for callback in self.on_waiting:
                callback(status, min(left, ADDRESS_WAIT_SLICE_SECONDS))
            addresses = host_network.wait_for_address(
                wanted, min(left, ADDRESS_WAIT_SLICE_SECONDS))
        return addresses

    def _addresses_needed(self) -> frozenset[ipaddress.IPv4Address]:
        """Without a node name, any public IP of the map says which node we are; with one, the
        tunnel socket's bind address must be local (nothing when it binds the wildcard)."""
        if self.source.node_name is None:
            return frozenset(n.public_ip for n in self.smap.nodes)
        node = self.smap.node_named(self.source.node_name)
        bind = self.config.bind_address or (node.public_ip if node is not None else None)
        return frozenset() if bind is None or bind.is_unspecified else frozenset({bind})

    def _make_forwarder(self, vtep_mac: str, wg_keys: tuple[bytes, bytes | None] | None,
                        queue: int = 0) -> Any:
        """The kernel for the map's backend: udp, vxlan routed (tun), vxlan switched (tap) or
        wireguard (tun); ``queue``: on the device queue and receive socket of that data-plane
        thread."""
        assert self.tun is not None and self.sock is not None
        backend, config = self.smap.backend, self.config
        dev, sock = self.tun.fds[queue], self.rx_socks[queue].fileno()
        tx_fds = [s.fileno() for s in self.tx_socks]
        # GSO is asked for per send on whichever socket sends; GRO is a receive-socket option.
        self.offloads = {
            "vnet_hdr": self.tun.vnet_hdr,
            "udp_gso": config.offloads and udp_gso_supported(self.sock),
            "udp_gro": config.offloads and enable_udp_gro(self.rx_socks[queue]),
            "device_uso": self.tun.uso,
        }
        if backend.type == "udp":
            return self.kernels.UdpForwarder(dev, sock, config.batch_size,
                                             config.icmp_rate_per_second, **self.offloads)
        if backend.type == "wireguard":
            return self._make_wireguard(dev, sock, wg_keys)
        if backend.switched:
            return self.kernels.VxlanSwitchForwarder(
                dev, sock, vni=backend.vni, tx_fds=tx_fds, batch_size=config.batch_size,
                fdb_max_entries=config.fdb_max_entries, **self.offloads,
                fdb_port_max_entries=config.fdb_max_entries_per_port,
                mac_move_hold=config.mac_move_hold_seconds,
                storm_rate=config.storm_rate_per_second, storm_burst=config.storm_burst)
        return self.kernels.VxlanRoutedForwarder(
            dev, sock, parse_mac(vtep_mac), vni=backend.vni, tx_fds=tx_fds,
            batch_size=config.batch_size, icmp_burst=config.icmp_rate_per_second,
            **self.offloads)

    def _make_wireguard(self, dev: int, sock: int,
                        wg_keys: tuple[bytes, bytes | None] | None) -> Any:
        from overlayd.control.wg_noise import public_key
        from overlayd.wire import wireguard as wg

        assert wg_keys is not None
        mac1_key = wg.mac_key(wg.LABEL_MAC1, public_key(wg_keys[0]))
        return self.kernels.WireguardForwarder(
            dev, sock, mac1_key, self.config.batch_size, self.config.icmp_rate_per_second,
            **self.offloads)

    def _tables(self, view: LocalView) -> Any:
        if self.smap.backend.switched:
            return build_switch_tables(view, [(s.mac, s.node) for s in self.config.static_macs])
        return view.tables

    def _underlay_mtu(self, public_ip: ipaddress.IPv4Address,
                      addresses: list[host_network.HostAddress]) -> int:
        if self.config.underlay_mtu is not None:
            return self.config.underlay_mtu
        held = next((h.mtu for h in addresses if h.address == public_ip), None)
        # Behind NAT the public IP is not local: fall back to the map's (or the default) MTU.
        return held if held is not None else self.smap.underlay_mtu

    def _configure_device(self) -> None:
        assert self.view is not None and self.tun is not None
        tune_device_sysctls(self.config.device_name)
        self.routes = kernel_routes(self.smap, self.view)
        switched = self.smap.backend.switched
        host_network.configure_device(
            self.config.device_name, self.view.node.address, self.view.device_mtu,
            self.config.tx_queue_len, sorted(self.routes),
            prefixlen=self.smap.network.prefixlen if switched else 32,
            mac=self.view.node.vtep_mac if switched else None, bridge=self.config.bridge)

    # -- 2. forward -----------------------------------------------------------------------------

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        self._loop = loop
        assert self.tun is not None and self.sock is not None
        self._add_readers()
        for sig, handler in ((signal.SIGTERM, self.stop), (signal.SIGINT, self.stop),
                             (signal.SIGHUP, lambda: self.reload("SIGHUP"))):
            loop.add_signal_handler(sig, handler)
        if self.smap.backend.switched:
            if not isinstance(self.forwarder, ThreadedForwarder):
                self._every(FDB_TICK_SECONDS, self._fdb_tick)
        else:
            self._every(ICMP_REFILL_SECONDS, self._refill_icmp)
            self._every(HOST_ADDRESSES_SECONDS, self._refresh_host_addresses)
        if self.wireguard is not None:
            self._every(WG_TICK_SECONDS, self.wireguard.tick)
        self._every(HEALTH_CHECK_SECONDS, self._check_health)
        self._follow_task = loop.create_task(self._follow_source())
        for callback in self.on_ready:
            callback()
        await self._stop.wait()
        self._shutdown()

    def _add_readers(self) -> None:
        assert self._loop is not None and self.tun is not None and self.sock is not None
        if isinstance(self.forwarder, ThreadedForwarder):
            self.forwarder.start()      # the threads read the fds: no reader on this loop
            self.steering.pin(self.forwarder)
            if isinstance(self.forwarder, ThreadedWireguardForwarder):
                # ... but their handshake events come here (a write per batch that queued any)
                notify = self.forwarder.notify_fd
                self._loop.add_reader(notify, self._on_wireguard_events, notify)
                self._readers = [notify]
            return
        self._loop.add_reader(self.tun.fileno(), self._on_device_readable)
        self._loop.add_reader(self.sock.fileno(), self._on_socket_readable)
        self._readers = [self.tun.fileno(), self.sock.fileno()]

    def _remove_readers(self) -> None:
        assert self._loop is not None
        if isinstance(self.forwarder, ThreadedForwarder):
            self.forwarder.stop()       # joined: no thread outlives the fds closed next
        for fd in self._readers:
            self._loop.remove_reader(fd)
        self._readers = []

    def _on_device_readable(self) -> None:
        if self._clocked:   # dampening and storm buckets need sub-tick time
            self.forwarder.set_now(time.monotonic())
        try:
            self.forwarder.inside_batch()
        except OSError as exc:
            self._device_failed(f"reading the device failed: {exc.strerror or exc}")
        if self.wireguard is not None:
            self.wireguard.after_batch()

    def _on_socket_readable(self) -> None:
        if self._clocked:
            self.forwarder.set_now(time.monotonic())
        try:
            self.forwarder.outside_batch()
        except OSError as exc:
            # A socket error the kernel keeps reporting must not spin the loop: log and go on.
            self._ratelimited.warning("socket", "tunnel socket receive failed: %s",
                                      exc.strerror or exc)
        if self.wireguard is not None:
            self.wireguard.after_batch()

    def _on_wireguard_events(self, notify_fd: int) -> None:
        try:
            os.read(notify_fd, 8)       # re-arm the eventfd; the count does not matter
        except BlockingIOError:
            pass
        assert self.wireguard is not None
        self.wireguard.after_batch()

    def _every(self, seconds: float, callback: Callable[[], None]) -> None:
        assert self._loop is not None

        def tick() -> None:
            self.last_loop_tick = time.monotonic()
            try:
                callback()
            except Exception:  # a periodic task must never take the daemon down
                log.exception("periodic task %s failed", callback.__name__)
            # Replace, never append: one live handle per task (the 10-minute soak caught a list
            # that grew by ~11 handles a second).
            self._timers[name] = self._loop.call_later(seconds, tick)  # type: ignore[union-attr]

        name = callback.__name__
        self._timers[name] = self._loop.call_later(seconds, tick)

    def _refill_icmp(self) -> None:
        rate = self.config.icmp_rate_per_second
        self.forwarder.add_icmp_tokens(max(1, int(rate * ICMP_REFILL_SECONDS)), rate)

    def _refresh_host_addresses(self) -> None:
        """An address added to this host (a new interface, a container bridge) is refused as
        an inner source within seconds: the tables are swapped when the set changed."""
        assert self.view is not None
        try:
            current = tuple(sorted(h.address for h in host_network.host_addresses()))
        except Exception as exc:  # noqa: BLE001 - keep the last set; the next tick retries
            self._ratelimited.warning("host-addresses", "reading this host's addresses "
                                      "failed (the last set stays in force): %s", exc)
            return
        if current == self.host_addresses:
            return
        self.host_addresses = current
        underlay = self.view.device_mtu + self.smap.backend.overhead
        self.view = build_local_view(self.smap, self.view.node, underlay, current)
        self.forwarder.set_tables(self._tables(self.view))

    def _fdb_tick(self) -> None:
        now = time.monotonic()
        self.forwarder.set_now(now)
        self.forwarder.age(now, self.config.mac_ageing_seconds)

    # -- 3. reload ------------------------------------------------------------------------------

    async def _follow_source(self) -> None:
        """Apply the map each time its source says it changed (file poll, etcd watch)."""
        changes = self.source_changes
        if changes is None:          # not started by serve(): the first item is the map in force
            changes = self.source.changes()
            await anext(changes, None)
        async for why in changes:
            self.reload(why)

    def reload(self, why: str) -> bool:
        """Apply the map file as it is now; keep forwarding on the old map if it is broken."""
        for callback in self.on_reload:
            callback("start")
        try:
            applied = self._apply_map(why)
        finally:
            for callback in self.on_reload:
                callback("end")
        return applied

    def _apply_map(self, why: str) -> bool:
        assert self.view is not None
        try:
            smap = self.source.load()
            me = find_local_node(smap, self.source.location, self.view.node.name, ())
        except ConfigError as exc:
            self.map_error = str(exc)
            log.error("map reload (%s) rejected, still forwarding on the previous map: %s",
                      why, exc)
            return False
        if (smap.backend != self.smap.backend or me.subnet != self.view.node.subnet
                or me.address != self.view.node.address or me.vtep_mac != self.view.node.vtep_mac
                or me.public_key != self.view.node.public_key
                or (smap.network != self.smap.network and smap.backend.switched)):
            self.map_error = ("this node's subnet/address/VTEP MAC/public key or the backend "
                              "changed: restart overlayd to apply")
            log.error("map reload (%s): %s", why, self.map_error)
            return False
        underlay = self.view.device_mtu + self.smap.backend.overhead
        view = build_local_view(smap, me, underlay, self.host_addresses)
        try:
            self.forwarder.set_tables(self._tables(view))     # the one-step swap
        except ValueError as exc:   # e.g. more pinned MACs than fdb_max_entries
            self.map_error = f"the data plane refused the new map: {exc}"
            log.error("map reload (%s) rejected, still forwarding on the previous map: %s",
                      why, exc)
            return False
        if self.wireguard is not None:
            self.wireguard.set_peers(smap, view)
        routes = kernel_routes(smap, view)
        try:
            host_network.set_routes(self.config.device_name, me.address,
                                    remove=self.routes - routes, add=routes - self.routes)
            self.routes = routes
        except Exception as exc:  # noqa: BLE001 - the old route set is kept: the next reload retries
            log.error("map reload (%s): updating kernel routes failed: %s", why, exc)
        self.smap, self.view = smap, view
        self.map_applied_at = time.time()
        self.map_error = None
        log.info("map reloaded (%s): %d peers, %d routes", why, len(view.peers),
                 len(view.tables.routes))
        for hook in self.on_map_applied:
            hook(smap, view)
        return True

    # -- 4. recover -----------------------------------------------------------------------------

    def _device_failed(self, why: str) -> None:
        if not self._device_broken:
            log.warning("device %s: %s; recreating it", self.config.device_name, why)
        self._device_broken = True
        assert self._loop is not None and self.tun is not None
        if isinstance(self.forwarder, ThreadedForwarder):
            self.forwarder.detach_device()
            return
        self._loop.remove_reader(self.tun.fileno())

    def _check_health(self) -> None:
        assert self.tun is not None
        if isinstance(self.forwarder, ThreadedForwarder):
            self._check_threads(self.forwarder)
        if not self._device_broken and not self.tun.exists():
            self._device_failed("device was deleted")
        if self._device_broken:
            self._recover_device()
        else:
            self._check_placement()

    def _check_threads(self, threaded: ThreadedForwarder) -> None:
        """What the threads reported since the last check: a failed device read (the device
        is recreated as on the loop engine) and receive errors (logged, rate-limited)."""
        error = threaded.device_error()
        if error and not self._device_broken:
            self._device_failed(f"reading the device failed: {os.strerror(error)}")
        error = threaded.take_socket_error()
        if error:
            self._ratelimited.warning("socket", "tunnel socket receive failed: %s",
                                      os.strerror(error))

    def _check_placement(self) -> None:
        """The device exists; is it where it should be (in its bridge, its address on it or,
        bridged, off it)? If not, say so in health and put it back."""
        assert self.view is not None
        placement = host_network.device_placement(self.config.device_name)
        problem = None if placement is None else placement_problem(
            placement, self.config.device_name, self.view.node.address, self.config.bridge)
        if problem is not None and problem != self.device_problem:
            log.warning("%s; putting it back", problem)
        self.device_problem = problem
        if problem is not None:
            try:
                self._configure_device()
            except Exception as exc:  # noqa: BLE001 - the next check (1 s) tries again
                self._ratelimited.warning("placement", "reconfiguring device %s failed: %s",
                                          self.config.device_name, exc)

    def _recover_device(self) -> None:
        assert self._loop is not None and self.tun is not None
        try:
            self.tun.reopen()
            self._configure_device()
        except Exception as exc:  # noqa: BLE001 - retried every second until it works
            self._ratelimited.warning("recover", "recreating device %s failed (will retry): %s",
                                      self.config.device_name, exc)
            return
        self._device_broken = False
        self.device_recreations += 1
        if isinstance(self.forwarder, ThreadedForwarder):
            self.steering.reattach_device(self.tun)
            self.forwarder.attach_device()
        else:
            self._loop.add_reader(self.tun.fileno(), self._on_device_readable)
        log.info("device %s recreated and configured", self.config.device_name)

    # -- 5. stop --------------------------------------------------------------------------------

    @property
    def device_broken(self) -> bool:
        """True while the device is gone or failing and being recreated."""
        return self._device_broken

    def stop(self) -> None:
        if not self._stop.is_set():
            for callback in self.on_stopping:
                callback()
        self._stop.set()

    def _shutdown(self) -> None:
        log.info("stopping")
        for timer in self._timers.values():
            timer.cancel()
        if self._follow_task is not None:
            self._follow_task.cancel()
        if self._loop is not None:
            # The signal handlers stay: a second SIGTERM during shutdown must not kill the
            # process halfway through removing what it added (uvloop drops them on close).
            self._remove_readers()
        self.close()

    def close(self) -> None:
        """Release the socket and the device; safe to call after a failed start."""
        if isinstance(self.forwarder, ThreadedForwarder):
            self.forwarder.stop()       # idempotent; a failed start may not have run()
        for rx in self.rx_socks[1:]:
            rx.close()
        self.rx_socks = []
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        for sock in self.tx_socks:
            sock.close()
        self.tx_socks = []
        if self.tun is not None:
            self.tun.close(keep=self.config.keep_device)
            self.tun = None
        self.steering.close()


def placement_problem(placement: host_network.Placement, device: str,
                      address: ipaddress.IPv4Address, bridge: str | None) -> str | None:
    """What is wrong with where the device is, or None."""
    if bridge is not None:
        if placement.master != bridge:
            where = f"in bridge {placement.master}" if placement.master else "in no bridge"
            return f"device {device} is {where}, not in bridge {bridge}"
        if placement.addresses:
            return (f"device {device} carries {', '.join(map(str, sorted(placement.addresses)))}"
                    f"; bridged, the address belongs on bridge {bridge}")
        return None
    if address not in placement.addresses:
        return f"device {device} lost its address {address}"
    return None


def _describe_addresses(addresses: frozenset[ipaddress.IPv4Address], shown: int = 4) -> str:
    ordered = sorted(addresses)
    if len(ordered) == 1:
        return f"public IP {ordered[0]}"
    more = f" and {len(ordered) - shown} more" if len(ordered) > shown else ""
    return f"one of the public IPs {', '.join(map(str, ordered[:shown]))}{more}"


def describe_offloads(offloads: dict[str, bool], tso: bool) -> str:
    """One log line's worth: which offloads the data plane runs with."""
    if not offloads.get("vnet_hdr"):
        return "off"
    parts = ["device checksum" + (" + TSO" if tso else " (kernel refused TSO)")]
    parts.append("UDP GSO" if offloads.get("udp_gso") else "no UDP GSO")
    parts.append("UDP GRO" if offloads.get("udp_gro") else "no UDP GRO")
    parts.append("device USO" if offloads.get("device_uso") else "no device USO")
    return ", ".join(parts)
