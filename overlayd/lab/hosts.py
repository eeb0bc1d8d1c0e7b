"""The hosts of a lab: what to build (HostSpec), what was built (LabHost), and HostsView, the
part of a Lab that finds hosts and runs things in them (commands, control-socket requests)."""

from __future__ import annotations

import ipaddress
import json
import socket
import subprocess
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeAlias

from overlayd.lab import netns
from overlayd.lab.netns import LabError
from overlayd.lab.processes import DaemonProcess

# Per backend: default UDP port and bytes of outer headers over IPv4 (DESIGN.md section 2).
# Kept here rather than imported so the lab stays an outside observer of the daemon.
DEFAULT_PORTS = {"udp": 8285, "vxlan": 8472, "wireguard": 51820}
SWITCHED_PORT = 4789       # vxlan mode "switched": IANA's VXLAN port, as a plain kernel vxlan
ENCAP_OVERHEAD = {"udp": 28, "vxlan": 50, "wireguard": 60}
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
    # vxlan: no overlayd here but the kernel's own VXLAN, configured as flannel's vxlan backend
    # configures a host (routed) or as a plain kernel VTEP with flood entries (switched).
    kernel_vxlan: bool = False
    # switched vxlan: the tap is a port of a Linux bridge (brvm, created before the daemon
    # starts, with the node's address on it) that VMs plug into: `[device] bridge = "brvm"`.
    vm_bridge: bool = False
    # A kernel host keeps its links' offloads at the defaults: on a veth the kernel's VXLAN then
    # sends inner TCP/UDP checksums unfinished (CHECKSUM_PARTIAL), which overlayd must finish.
    # True: `ethtool -K ul0 tx off` first (the kernel computes them before the veth), as a
    # tuned host would.
    kernel_tx_checksum_off: bool = False

    @property
    def runs_daemon(self) -> bool:
        return self.start_daemon and not self.kernel_vxlan


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
    vtep_mac: str | None = None                     # vxlan: the MAC the map gives it
    wg_private_key: bytes | None = None             # wireguard: its key (file wg.key in dir)

    @property
    def config_path(self) -> Path:
        return self.dir / "overlayd.toml"

    @property
    def log_path(self) -> Path:
        return self.dir / "overlayd.log"

    @property
    def control_socket(self) -> Path:
        return self.dir / "control.sock"


HostRef: TypeAlias = LabHost | str | int    # a host, its name, or its 1-based index


class HostsView:
    """Host lookup, device state and commands; Lab fills in these attributes."""

    hosts: list[LabHost]
    bystanders: list[LabHost]
    vms: list[LabHost]
    device: str
    backend: str
    port: int

    def host(self, ref: HostRef) -> LabHost:
        """By LabHost, name ("host2", or a bystander's) or 1-based index."""
        if isinstance(ref, LabHost):
            return ref
        if isinstance(ref, int):
            if not 1 <= ref <= len(self.hosts):
                raise IndexError(f"host index {ref}: the lab has hosts 1..{len(self.hosts)}")
            return self.hosts[ref - 1]
        for host in (*self.hosts, *self.bystanders, *self.vms):
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

    def exec(self, ref: HostRef, cmd: Sequence[str], timeout_s: float = 10.0,
             check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run a command in a host's namespace (bounded); the CompletedProcess."""
        return netns.ns_run(self.host(ref).netns, cmd, timeout=timeout_s, check=check)

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
