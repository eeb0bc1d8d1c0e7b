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
import ipaddress
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, NamedTuple, Self, TypeAlias

import overlayd
from overlayd.lab import configs, netns
from overlayd.lab.netns import LabError
from overlayd.lab.processes import DEFAULT_LIFETIME_S, Agent, DaemonProcess

# Per backend: default UDP port and bytes of outer headers over IPv4 (DESIGN.md section 2).
# Kept here rather than imported so the lab stays an outside observer of the daemon.
DEFAULT_PORTS = {"udp": 8285, "vxlan": 8472}
ENCAP_OVERHEAD = {"udp": 28, "vxlan": 50}
AGENTS = Path(__file__).with_name("agents.py")
READY_POLL_S = 0.05
CONTROL_TIMEOUT_S = 5.0
CONTROL_MAX_BYTES = 16 << 20


@dataclass
class HostSpec:
    """What to build for one host; the defaults give a plain 1500-byte underlay host."""

    name: str | None = None                  # default: host<i>
    underlay_mtu: int | None = None          # None: 1500, and not written into the map
    node_extra: dict[str, Any] = field(default_factory=dict)    # merged into its [[nodes]]
    config_extra: dict[str, Any] = field(default_factory=dict)  # merged into its config
    start_daemon: bool = True


@dataclass
class LabHost:
    name: str
    netns: str
    underlay_ip: str
    underlay_mtu: int
    dir: Path
    subnet: ipaddress.IPv4Network | None = None     # None: a bystander, not in the map
    overlay_ip: str | None = None
    spec: HostSpec | None = None
    daemon: DaemonProcess | None = None

    @property
    def config_path(self) -> Path:
        return self.dir / "overlayd.toml"

    @property
    def log_path(self) -> Path:
        return self.dir / "overlayd.log"

    @property
    def control_socket(self) -> Path:
        return self.dir / "control.sock"


class PingResult(NamedTuple):
    ok: bool                 # at least one echo reply
    transmitted: int
    received: int
    rtt_avg_ms: float | None
    output: str              # ping's stdout+stderr, for ICMP error lines ("Time to live exceeded")


class TransferResult(NamedTuple):
    bytes_ok: bool           # the receiver got exactly the bytes that were sent
    sha256_ok: bool
    seconds: float           # receiver side: first byte to EOF
    gbit_per_s: float        # received bits / seconds


HostRef: TypeAlias = LabHost | str | int    # a host, its name, or its 1-based index


class Lab:
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
        self.port = port or DEFAULT_PORTS[backend]
        self.backend_extra = dict(backend_extra or {})
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
            self.hosts.append(host)
        self.write_configs()

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
            nodes.append(configs.merge(node, host.spec.node_extra))
        backend = {"type": self.backend, "port": self.port, **self.backend_extra}
        doc = configs.subnet_map(str(self.network), self.subnet_len, backend, nodes,
                                 self.map_extra)
        (self.workdir / "map.toml").write_text(configs.dumps(doc))
        for host in self.hosts:
            assert host.spec is not None
            cfg = configs.daemon_config(host.name, "../map.toml", self.device,
                                        str(host.control_socket), self.log_level,
                                        host.spec.config_extra)
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
                   if h.spec is None or h.spec.start_daemon]
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

    def control(self, ref: HostRef, command: str, **fields: Any) -> Any:
        """One request on the daemon's control socket (one JSON line each way); the result.

        A unix socket is a file, so this works from the root namespace without entering the
        host's. LabError if the daemon does not serve the socket or answers an error.
        """
        host = self.host(ref)
        if not host.control_socket.exists():
            raise LabError(f"{host.name}: no control socket at {host.control_socket}")
        request = json.dumps({"command": command, **fields}).encode() + b"\n"
        answer = b""
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(CONTROL_TIMEOUT_S)
                sock.connect(str(host.control_socket))
                sock.sendall(request)
                while not answer.endswith(b"\n") and len(answer) < CONTROL_MAX_BYTES:
                    chunk = sock.recv(65536)
                    if not chunk:
                        break
                    answer += chunk
        except OSError as exc:
            raise LabError(f"{host.name}: control socket: {exc}") from exc
        try:
            reply = json.loads(answer)
        except ValueError as exc:
            raise LabError(f"{host.name}: control socket answered {answer[:200]!r}") from exc
        if not isinstance(reply, dict) or not reply.get("ok"):
            raise LabError(f"{host.name}: control request {command!r} failed: {reply}")
        return reply.get("result")

    def wait_mesh(self, timeout_s: float = 15.0) -> None:
        """Bounded wait until every ordered pair of running hosts answers one overlay ping (the
        first echoes can be lost while the underlay resolves ARP)."""
        running = [h for h in self.hosts if h.daemon is not None and h.daemon.alive()]
        pending = [(a, b) for a in running for b in running if a is not b]
        deadline = time.monotonic() + timeout_s
        while pending and time.monotonic() < deadline:
            still = []
            for a, b in pending:
                # Past the deadline, stop pinging: each ping may take its whole wait.
                if time.monotonic() >= deadline or not self.ping(a, b, wait_s=1.0).ok:
                    still.append((a, b))
            pending = still
        if pending:
            pairs = ", ".join(f"{a.name}->{b.name}" for a, b in pending)
            raise LabError(f"overlay pings unanswered after {timeout_s:g}s: {pairs}")

    # -- looking things up ----------------------------------------------------------------------

    def host(self, ref: HostRef) -> LabHost:
        """By LabHost, name ("host2", or a bystander's) or 1-based index."""
        if isinstance(ref, LabHost):
            return ref
        if isinstance(ref, int):
            if not 1 <= ref <= len(self.hosts):
                raise IndexError(f"host index {ref}: the lab has hosts 1..{len(self.hosts)}")
            return self.hosts[ref - 1]
        for host in (*self.hosts, *self.bystanders):
            if host.name == ref:
                return host
        raise KeyError(ref)

    def __iter__(self) -> Iterator[LabHost]:
        return iter(self.hosts)

    def device_mtu(self, ref: HostRef) -> int:
        """The MTU the daemon should give its device: underlay MTU minus the encapsulation."""
        return self.host(ref).underlay_mtu - ENCAP_OVERHEAD[self.backend]

    def path_mtu(self, a: HostRef, b: HostRef) -> int:
        return min(self.host(a).underlay_mtu, self.host(b).underlay_mtu) - \
            ENCAP_OVERHEAD[self.backend]

    def device_info(self, ref: HostRef) -> dict[str, Any] | None:
        return netns.link_info(self.host(ref).netns, self.device)

    def device_routes(self, ref: HostRef) -> list[dict[str, Any]]:
        return netns.routes_via(self.host(ref).netns, self.device)

    # -- traffic --------------------------------------------------------------------------------

    def exec(self, ref: HostRef, cmd: Sequence[str], timeout_s: float = 10.0,
             check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run a command in a host's namespace (bounded); the CompletedProcess."""
        return netns.ns_run(self.host(ref).netns, cmd, timeout=timeout_s, check=check)

    def ping(self, a: HostRef, b: HostRef | None = None, *,
             dst: str | None = None, count: int = 1, interval_s: float = 0.2,
             wait_s: float = 2.0, size: int | None = None, ttl: int | None = None,
             dont_fragment: bool = False) -> PingResult:
        """`ping` from ``a`` to ``b``'s overlay address (or to ``dst``); never raises on loss."""
        target = dst or self.host(b if b is not None else 1).overlay_ip
        assert target is not None
        cmd = ["ping", "-n", "-c", str(count), "-i", f"{interval_s:g}", "-W", f"{wait_s:g}"]
        if size is not None:
            cmd += ["-s", str(size)]
        if ttl is not None:
            cmd += ["-t", str(ttl)]
        if dont_fragment:
            cmd += ["-M", "do"]
        budget = count * (interval_s + wait_s) + 5.0
        proc = self.exec(a, [*cmd, target], timeout_s=budget, check=False)
        return _parse_ping(proc.stdout + proc.stderr)

    def agent(self, ref: HostRef, *args: str) -> Agent:
        """Start an ``agents.py`` command in a host (killed at close if still running)."""
        agent = Agent(self.host(ref).netns, [sys.executable, str(AGENTS), *args])
        self._agents.append(agent)
        return agent

    def tcp_transfer(self, a: HostRef, b: HostRef, nbytes: int, *,
                     port: int = 5201, timeout_s: float = 120.0, seed: int = 1,
                     underlay: bool = False) -> TransferResult:
        """Send ``nbytes`` over TCP from a's overlay address to b's (or between their underlay
        addresses: the lab's own self-test, and a baseline), and check what arrived."""
        src, dst = self.host(a), self.host(b)
        src_ip, dst_ip = ((src.underlay_ip, dst.underlay_ip) if underlay
                          else (src.overlay_ip, dst.overlay_ip))
        assert src_ip is not None and dst_ip is not None
        recv = self.agent(dst, "tcp-recv", dst_ip, str(port), f"{timeout_s:g}")
        try:
            recv.wait_ready()
            send = self.agent(src, "tcp-send", src_ip, dst_ip, str(port),
                              str(nbytes), str(seed), f"{timeout_s:g}")
            sent = _agent_json(send, timeout_s + 5.0)
            got = _agent_json(recv, 10.0)
        finally:
            recv.kill()
        if "error" in sent or "error" in got:
            raise LabError(f"tcp transfer {src.name} -> {dst.name} failed: "
                           f"sender {sent}, receiver {got}")
        seconds = float(got["seconds"]) or 1e-9
        return TransferResult(got["bytes"] == nbytes == sent["bytes"],
                              got["sha256"] == sent["sha256"], seconds,
                              got["bytes"] * 8 / seconds / 1e9)

    def count_arrivals(self, ref: HostRef, marker: bytes,
                       action: Callable[[], object], seconds: float = 1.5,
                       iface: str | None = None) -> int:
        """Packets carrying ``marker`` that arrived on a host's overlay device (or ``iface``)
        while ``action`` ran and ``seconds`` after: what the daemon wrote into the device."""
        sniffer = self.agent(ref, "sniff", iface or self.device, marker.hex(), f"{seconds:g}")
        try:
            sniffer.wait_ready()
            action()
            result = _agent_json(sniffer, seconds + 10.0)
        finally:
            sniffer.kill()
        if "error" in result:
            raise LabError(f"sniffer on {self.host(ref).name} failed: {result['error']}")
        return int(result["matches"])

    def inject(self, sender: HostRef, to: HostRef, inner_src: str,
               inner_dst: str, marker: bytes, *, src_ip: str | None = None,
               inner_dport: int = 9) -> None:
        """Send one hand-made tunnel datagram from ``sender``'s namespace (from ``src_ip``,
        default its underlay address) to ``to``'s daemon: payload = an IPv4/UDP packet
        inner_src -> inner_dst carrying ``marker``. Bypasses the sender's daemon entirely."""
        s, t = self.host(sender), self.host(to)
        result = _agent_json(self.agent(s, "inject", src_ip or s.underlay_ip, t.underlay_ip,
                                        str(self.port), inner_src, inner_dst, str(inner_dport),
                                        marker.hex()), 10.0)
        if "error" in result:
            raise LabError(f"inject from {s.name} failed: {result['error']}")


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


def _agent_json(agent: Agent, timeout_s: float) -> dict[str, Any]:
    out, err = agent.finish(timeout_s)
    lines = [line for line in out.splitlines() if line.startswith("{")]
    if not lines:
        return {"error": f"no result (exit {agent.proc.returncode}): {err.strip()[-500:]}"}
    result: dict[str, Any] = json.loads(lines[-1])
    return result


_PING_COUNTS = re.compile(r"(\d+) packets transmitted, (\d+) received")
_PING_RTT = re.compile(r"= [\d.]+/([\d.]+)/")


def _parse_ping(output: str) -> PingResult:
    counts = _PING_COUNTS.search(output)
    rtt = _PING_RTT.search(output)
    tx, rx = (int(counts.group(1)), int(counts.group(2))) if counts else (0, 0)
    return PingResult(rx > 0, tx, rx, float(rtt.group(1)) if rtt else None, output)
