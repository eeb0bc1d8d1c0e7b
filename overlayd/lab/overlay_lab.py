"""``Lab``: N overlay hosts in network namespaces on one bridged underlay, each running a real
``overlayd run`` process, built and torn down by one context manager.

Topology (nothing in the root namespace; PREFIX is unique per run, see ``netns.run_prefix``)::

    PREFIX-hub:   br0 ── p1 ── p2 ── ... ── pN   (a plain bridge: the underlay "switch")
                          │     │            │   veth pairs, MTU = that host's underlay MTU
    PREFIX-host1: ul0 192.168.77.1/24     PREFIX-host2: ul0 .2/24  ...   + overlay0 (the daemon's)

Host i owns overlay subnet number i of the network (10.77.i.0/24 by default) and the underlay
address .i. The lab writes the subnet map and one daemon config per host into a private
directory, starts the daemons (or not: ``start=False``), waits until each device is up, and
offers the traffic checks the tests and the demo share. ``close()`` (also on exceptions, atexit)
stops every process it started, by pid, and deletes every namespace, which takes every device
with it.
"""

from __future__ import annotations

import atexit
import base64
import ipaddress
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import overlayd
from overlayd.control.wg_noise import generate_private_key, public_key
from overlayd.lab import configs, netns
from overlayd.lab.hosts import DEFAULT_PORTS, SWITCHED_PORT, HostRef, HostSpec, LabHost
from overlayd.lab.netns import LabError
from overlayd.lab.processes import DEFAULT_LIFETIME_S, Agent, DaemonProcess
from overlayd.lab.traffic import Traffic
from overlayd.lab.vxlan_hosts import VM_BRIDGE, VxlanHosts

READY_POLL_S = 0.05


class Lab(Traffic, VxlanHosts):
    """A multi-host overlay testbed; use as ``with Lab(3) as lab: lab.ping("host1", "host2")``."""

    def __init__(self, hosts: int | Sequence[HostSpec] = 3, *, backend: str = "udp",
                 port: int | None = None, backend_extra: Mapping[str, Any] | None = None,
                 map_extra: Mapping[str, Any] | None = None, cidr: str = "10.77.0.0/16",
                 subnet_len: int = 24, underlay: str = "192.168.77.0/24",
                 device: str = "overlay0", overlayd_cmd: Sequence[str] | None = None,
                 start: bool = True, log_level: str = "info",
                 env: Mapping[str, str] | None = None, ready_timeout_s: float = 15.0,
                 daemon_lifetime_s: int = DEFAULT_LIFETIME_S, keep_logs: Path | None = None,
                 prefix: str | None = None) -> None:
        specs = [HostSpec() for _ in range(hosts)] if isinstance(hosts, int) else list(hosts)
        self.network = ipaddress.IPv4Network(cidr)
        self.underlay = ipaddress.IPv4Network(underlay)
        if not 1 <= len(specs) < min(self.underlay.num_addresses - 2,
                                     2 ** (subnet_len - self.network.prefixlen)):
            raise ValueError(f"{len(specs)} hosts do not fit {cidr} /{subnet_len} or {underlay}")
        if backend not in DEFAULT_PORTS:
            raise ValueError(f"backend {backend!r}: one of {', '.join(DEFAULT_PORTS)}")
        self.specs = specs
        self.backend = backend
        self.backend_extra = dict(backend_extra or {})
        switched = backend == "vxlan" and self.backend_extra.get("mode") == "switched"
        self.port = port or (SWITCHED_PORT if switched else DEFAULT_PORTS[backend])
        self.map_extra = dict(map_extra or {})
        self.subnet_len = subnet_len
        self.device = device
        self.default_cmd = overlayd_cmd is None
        self.overlayd_cmd = list(overlayd_cmd or [sys.executable, "-m", "overlayd"])
        self.start_daemons_on_enter = start
        self.log_level = log_level
        self.env = dict(env) if env is not None else None
        self.ready_timeout_s = ready_timeout_s
        self.daemon_lifetime_s = daemon_lifetime_s
        self.keep_logs = keep_logs
        self.prefix = prefix or netns.run_prefix()
        self.hub = f"{self.prefix}-hub"
        self.hosts: list[LabHost] = []
        self.bystanders: list[LabHost] = []
        self.vms: list[LabHost] = []
        self.exit_codes: dict[str, int | None] = {}
        self.workdir: Path | None = None
        self._namespaces: list[str] = []     # everything we created, in creation order
        self._agents: list[Agent] = []
        self._closed = False

    # -- lifecycle ------------------------------------------------------------------------------

    def __enter__(self) -> Self:
        atexit.register(self.close)    # also on an unhandled exception or sys.exit in a caller
        try:
            self.build()
            if self.start_daemons_on_enter:
                self.start_daemons()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def build(self) -> None:
        """Namespaces, the bridge, one veth per host with its underlay address; config files."""
        self.workdir = Path(tempfile.mkdtemp(prefix=f"{self.prefix}-"))
        self._add_ns(self.hub)
        netns.add_bridge(self.hub, "br0")
        subnets = self.network.subnets(new_prefix=self.subnet_len)
        next(subnets)     # subnet 0 (10.77.0.0/24) stays free, so host i owns 10.77.i.0/24
        for i, spec in enumerate(self.specs, start=1):
            subnet = next(subnets)
            name = spec.name or f"host{i}"
            host = self._add_underlay_host(name, str(self.underlay.network_address + i),
                                           spec.underlay_mtu or 1500, f"p{i}")
            host.subnet, host.overlay_ip, host.spec = subnet, str(subnet.network_address), spec
            if backend_is_vxlan := self.backend == "vxlan":
                host.vtep_mac = f"02:4c:41:42:{i // 256:02x}:{i % 256:02x}"
            if self.backend == "wireguard":
                host.wg_private_key = generate_private_key()
                key_file = host.dir / "wg.key"
                key_file.write_text(base64.b64encode(host.wg_private_key).decode() + "\n")
                key_file.chmod(0o600)
            self.hosts.append(host)
        self.write_configs()
        if backend_is_vxlan:
            for host in self.hosts:
                if host.spec is not None and host.spec.kernel_vxlan:
                    self.setup_kernel_vtep(host)
                elif host.spec is not None and host.spec.vm_bridge:
                    self.setup_vm_bridge(host)

    def _add_ns(self, name: str) -> None:
        netns.add_netns(name)
        self._namespaces.append(name)

    def _add_underlay_host(self, name: str, address: str, mtu: int, hub_port: str) -> LabHost:
        assert self.workdir is not None
        ns = f"{self.prefix}-{name}"
        self._add_ns(ns)
        netns.add_veth_pair(ns, "ul0", self.hub, hub_port, mtu=mtu)
        netns.set_master(self.hub, hub_port, "br0")
        netns.link_up(self.hub, hub_port)
        netns.add_address(ns, "ul0", f"{address}/{self.underlay.prefixlen}")
        netns.link_up(ns, "ul0")
        hostdir = self.workdir / name
        hostdir.mkdir()
        return LabHost(name=name, netns=ns, underlay_ip=address, underlay_mtu=mtu, dir=hostdir)

    def add_bystander(self, name: str = "stranger", address: str | None = None) -> LabHost:
        """One more namespace on the underlay bridge that is *not* in the subnet map."""
        index = len(self.bystanders) + 1
        address = address or str(self.underlay.broadcast_address - index)
        host = self._add_underlay_host(name, address, 1500, f"b{index}")
        self.bystanders.append(host)
        return host

    def write_configs(self) -> None:
        """(Re)write the shared map and every host's daemon config from the specs."""
        assert self.workdir is not None
        nodes = []
        for host in self.hosts:
            assert host.spec is not None
            node: dict[str, Any] = {"name": host.name, "subnet": str(host.subnet),
                                    "public_ip": host.underlay_ip}
            if host.spec.underlay_mtu is not None:
                node["underlay_mtu"] = host.spec.underlay_mtu
            if host.vtep_mac is not None:
                node["vtep_mac"] = host.vtep_mac
            if host.wg_private_key is not None:
                node["public_key"] = base64.b64encode(public_key(host.wg_private_key)).decode()
            node = configs.merge(node, host.spec.node_extra)
            host.vtep_mac = node.get("vtep_mac", host.vtep_mac)
            nodes.append(node)
        backend = {"type": self.backend, "port": self.port, **self.backend_extra}
        doc = configs.subnet_map(str(self.network), self.subnet_len, backend, nodes,
                                 self.map_extra)
        (self.workdir / "map.toml").write_text(configs.dumps(doc))
        for host in self.hosts:
            assert host.spec is not None
            extra = host.spec.config_extra
            if host.wg_private_key is not None:
                extra = configs.merge({"wireguard": {"private_key_file": "wg.key"}}, extra)
            if host.spec.vm_bridge:
                extra = configs.merge({"device": {"bridge": VM_BRIDGE}}, extra)
            cfg = configs.daemon_config(host.name, "../map.toml", self.device,
                                        str(host.control_socket), self.log_level, extra)
            host.config_path.write_text(configs.dumps(cfg))

    @property
    def map_path(self) -> Path:
        assert self.workdir is not None
        return self.workdir / "map.toml"

    def close(self) -> None:
        """Stop everything we started and delete everything we created; safe to call twice."""
        if self._closed:
            return
        self._closed = True
        atexit.unregister(self.close)
        with _signals_deferred():
            self._teardown()

    def _teardown(self) -> None:
        errors: list[str] = []
        for agent in self._agents:
            agent.kill()
        for host in self.hosts:
            if host.daemon is not None and host.name not in self.exit_codes:
                self.exit_codes[host.name] = host.daemon.stop()
        for ns in reversed(self._namespaces):
            try:
                netns.del_netns(ns)
            except LabError as exc:
                errors.append(str(exc))
        if self.workdir is not None:
            if self.keep_logs is not None:
                try:   # configs and logs; sockets cannot be copied and mean nothing later
                    shutil.copytree(self.workdir, self.keep_logs, dirs_exist_ok=True,
                                    ignore=shutil.ignore_patterns("*.sock"))
                except OSError as exc:
                    errors.append(f"keeping logs in {self.keep_logs}: {exc}")
            shutil.rmtree(self.workdir, ignore_errors=True)
        left = self.leftovers()
        if left or errors:
            raise LabError(f"lab cleanup incomplete: namespaces left {left}; {'; '.join(errors)}")

    def leftovers(self) -> list[str]:
        """Namespaces of this lab that still exist (empty after a clean close)."""
        return [ns for ns in netns.list_netns() if ns.startswith(f"{self.prefix}-")]

    # -- daemons --------------------------------------------------------------------------------

    def _daemon_env(self) -> dict[str, str] | None:
        if not self.default_cmd:
            return self.env
        env = dict(self.env if self.env is not None else os.environ)
        # `python -m overlayd` must import the same tree the lab came from, installed or not.
        root = str(Path(overlayd.__file__).resolve().parent.parent)
        env["PYTHONPATH"] = root + (":" + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        return env

    def start_daemon(self, ref: HostRef, wait: bool = True) -> LabHost:
        host = self.host(ref)
        if host.daemon is not None and host.daemon.alive():
            raise LabError(f"{host.name}: daemon already running (pid {host.daemon.pid})")
        self.exit_codes.pop(host.name, None)
        host.daemon = DaemonProcess(host.netns, [*self.overlayd_cmd, "run", "-c",
                                                 str(host.config_path)],
                                    host.log_path, self.daemon_lifetime_s, self._daemon_env())
        if wait:
            self.wait_ready(host)
        return host

    def start_daemons(self) -> None:
        started = [self.start_daemon(h, wait=False) for h in self.hosts
                   if h.spec is None or h.spec.runs_daemon]
        for host in started:         # started all first: they come up in parallel
            self.wait_ready(host)

    def wait_ready(self, ref: HostRef, timeout_s: float | None = None) -> None:
        """Bounded wait until the host's device is up with its address and the network route."""
        host = self.host(ref)
        deadline = time.monotonic() + (timeout_s or self.ready_timeout_s)
        why = "not checked yet"
        while time.monotonic() < deadline:
            if host.daemon is None or not host.daemon.alive():
                code = host.daemon.wrapper.poll() if host.daemon else None
                raise LabError(f"{host.name}: overlayd exited (status {code}) before its device "
                               f"was up; log {host.log_path}:\n"
                               f"{host.daemon.log_tail() if host.daemon else ''}")
            why = self._not_ready_reason(host)
            if not why:
                return
            time.sleep(READY_POLL_S)
        raise LabError(f"{host.name}: device {self.device} not ready after "
                       f"{timeout_s or self.ready_timeout_s:g}s ({why}); log {host.log_path}:\n"
                       f"{host.daemon.log_tail() if host.daemon else ''}")

    def _not_ready_reason(self, host: LabHost) -> str:
        info = netns.link_info(host.netns, self.device)
        if info is None:
            return "device missing"
        if "UP" not in info.get("flags", []):
            return "device down"
        if host.spec is not None and host.spec.vm_bridge:
            # bridged: the tap is a port without an address; the address is on the bridge
            return "" if info.get("master") == VM_BRIDGE else f"not a port of {VM_BRIDGE} yet"
        addrs = {a.get("local") for a in info.get("addr_info", [])}
        if host.overlay_ip not in addrs:
            return f"address {host.overlay_ip} missing"
        if str(self.network) not in {r.get("dst") for r in netns.routes_via(host.netns,
                                                                             self.device)}:
            return f"route {self.network} missing"
        return ""

    def stop_daemon(self, ref: HostRef, grace_s: float = 5.0) -> int | None:
        """SIGTERM the host's daemon, SIGKILL after ``grace_s``; its exit code."""
        host = self.host(ref)
        if host.daemon is None:
            return None
        code = host.daemon.stop(grace_s)
        self.exit_codes[host.name] = code
        return code

    def stop_daemons(self, grace_s: float = 5.0) -> dict[str, int | None]:
        for host in self.hosts:
            if host.daemon is not None and host.daemon.alive():
                host.daemon.terminate()     # all at once: N daemons share one grace period
        return {h.name: self.stop_daemon(h, grace_s) for h in self.hosts if h.daemon}


@contextmanager
def _signals_deferred() -> Iterator[None]:
    """Hold Ctrl-C/SIGTERM/SIGHUP until teardown is done: an interrupted teardown is exactly
    what leaves namespaces behind. Teardown is bounded (grace periods), and the held signal is
    delivered right after. Only the main thread runs Python signal handlers, so only it blocks."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}
    old = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)
