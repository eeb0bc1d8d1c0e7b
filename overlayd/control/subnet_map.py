"""The shared subnet map: which node owns which overlay subnet, and how to reach it.

One in-memory model for every source (the file source today, etcd later). ``parse_subnet_map``
turns the TOML of a map file into a validated ``SubnetMap``, collecting every problem.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import ipaddress
import re
from dataclasses import dataclass
from typing import Any

from overlayd.control.problems import Problems

BACKEND_TYPES = ("udp", "vxlan", "wireguard")
VXLAN_MODES = ("routed", "switched")
# flannel's defaults for udp and vxlan (routed, flannel.1 compatible); IANA's 4789 for switched;
# WireGuard's 51820 (flannel's wireguard backend uses it too).
DEFAULT_PORTS = {"udp": 8285, "vxlan": 8472, "vxlan-switched": 4789, "wireguard": 51820}
MAC = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")
DEFAULT_VNI = 1
DEFAULT_UNDERLAY_MTU = 1500
# Bytes of outer headers over IPv4 (RFC 768 + RFC 791; VXLAN adds 8 + 14 for RFC 7348 + Ethernet;
# WireGuard 16 of transport header + 16 of Poly1305 tag).
ENCAP_OVERHEAD = {"udp": 28, "vxlan": 50, "wireguard": 60}
NODE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")


@dataclass(frozen=True, slots=True)
class Backend:
    type: str
    port: int
    vni: int = DEFAULT_VNI
    mode: str = "routed"          # vxlan only: routed (tun, L3) or switched (tap, L2)

    @property
    def overhead(self) -> int:
        return ENCAP_OVERHEAD[self.type]

    @property
    def switched(self) -> bool:
        return self.type == "vxlan" and self.mode == "switched"


def derive_vtep_mac(public_ip: ipaddress.IPv4Address, vni: int) -> str:
    """A stable, locally administered unicast MAC for a node that does not set ``vtep_mac``.

    Derived from what identifies the node on the wire (public IP and VNI), so every host computes
    the same value from the map alone and it never changes across restarts.
    """
    digest = hashlib.sha256(b"overlayd-vtep" + public_ip.packed + vni.to_bytes(3, "big")).digest()
    octets = bytes([(digest[0] & 0xFC) | 0x02]) + digest[1:6]   # local bit set, multicast clear
    return ":".join(f"{b:02x}" for b in octets)


@dataclass(frozen=True, slots=True)
class Node:
    name: str
    subnet: ipaddress.IPv4Network
    public_ip: ipaddress.IPv4Address
    address: ipaddress.IPv4Address                     # overlay address of its device
    underlay_mtu: int | None = None                     # None: the network's default
    routes: tuple[ipaddress.IPv4Network, ...] = ()      # extra prefixes reachable through it
    vtep_mac: str = ""                                  # vxlan: MAC of its VTEP ("" for udp)
    public_key: str = ""                                # wireguard: base64 X25519 public key
    port: int | None = None                             # its UDP port (None: the backend's)

    @property
    def prefixes(self) -> tuple[ipaddress.IPv4Network, ...]:
        return (self.subnet, *self.routes)


@dataclass(frozen=True, slots=True)
class SubnetMap:
    network: ipaddress.IPv4Network
    subnet_len: int
    backend: Backend
    underlay_mtu: int
    nodes: tuple[Node, ...]

    def node_named(self, name: str) -> Node | None:
        return next((n for n in self.nodes if n.name == name), None)

    def node_with_ip(self, ip: ipaddress.IPv4Address) -> Node | None:
        return next((n for n in self.nodes if n.public_ip == ip), None)

    def underlay_mtu_of(self, node: Node) -> int:
        return node.underlay_mtu if node.underlay_mtu is not None else self.underlay_mtu


def parse_subnet_map(data: dict[str, Any], file: str) -> SubnetMap:
    """Validate a parsed map file; raise ConfigError listing every problem."""
    p = Problems(file)
    p.unknown_keys(data, {"network", "backend", "nodes"})
    net_t = p.table(data, "network")
    p.unknown_keys(net_t, {"cidr", "subnet_len", "underlay_mtu"}, "network")
    network = p.ipv4_network(net_t, "cidr", "network", required=True)
    subnet_len = p.integer(net_t, "subnet_len", "network", required=True, low=1, high=32)
    if network is not None and subnet_len is not None and subnet_len <= network.prefixlen:
        p.add("network.subnet_len",
              f"{subnet_len} must be longer than the network's prefix /{network.prefixlen}")
        subnet_len = None
    underlay_mtu = p.integer(net_t, "underlay_mtu", "network", default=DEFAULT_UNDERLAY_MTU,
                             low=576, high=65535)
    backend = _parse_backend(p, p.table(data, "backend"))

    nodes_raw = data.get("nodes", [])
    if not isinstance(nodes_raw, list) or not all(isinstance(n, dict) for n in nodes_raw):
        p.add("nodes", "must be an array of tables ([[nodes]])")
        nodes_raw = []
    if not nodes_raw:
        p.add("nodes", "no nodes: the map needs at least one [[nodes]] entry")
    nodes = [n for i, raw in enumerate(nodes_raw)
             if (n := _parse_node(p, raw, f"nodes[{i}]", network, subnet_len, backend))
             is not None]
    _check_unique(p, nodes)
    p.raise_if_any()
    assert network is not None and subnet_len is not None and underlay_mtu is not None
    return SubnetMap(network, subnet_len, backend, underlay_mtu, tuple(n for _, n in nodes))


def _parse_backend(p: Problems, t: dict[str, Any]) -> Backend:
    p.unknown_keys(t, {"type", "port", "vni", "mode"}, "backend")
    kind = p.string(t, "type", "backend", default="udp", choices=BACKEND_TYPES) or "udp"
    mode = p.string(t, "mode", "backend", default="routed", choices=VXLAN_MODES) or "routed"
    for key in ("vni", "mode"):
        if kind != "vxlan" and key in t:
            p.add(f"backend.{key}", "only meaningful with type = \"vxlan\"")
    default_port = DEFAULT_PORTS["vxlan-switched" if mode == "switched" else kind]
    port = p.integer(t, "port", "backend", default=default_port, low=1, high=65535)
    vni = p.integer(t, "vni", "backend", default=DEFAULT_VNI, low=0, high=(1 << 24) - 1)
    return Backend(kind, port or default_port, vni if vni is not None else DEFAULT_VNI, mode)


def _parse_node(p: Problems, t: dict[str, Any], path: str,
                network: ipaddress.IPv4Network | None, subnet_len: int | None,
                backend: Backend) -> tuple[str, Node] | None:
    p.unknown_keys(t, {"name", "subnet", "public_ip", "address", "underlay_mtu", "routes",
                       "vtep_mac", "public_key"}, path)
    before = len(p.found)
    name = p.string(t, "name", path, required=True)
    if name is not None and not NODE_NAME.match(name):
        p.add(f"{path}.name", f"{name!r}: use 1-63 letters, digits, '.', '_' or '-'")
    subnet = p.ipv4_network(t, "subnet", path, required=True)
    if subnet is not None and network is not None and not subnet.subnet_of(network):
        p.add(f"{path}.subnet", f"{subnet} is outside the network {network}")
    if subnet is not None and subnet_len is not None and subnet.prefixlen != subnet_len:
        p.add(f"{path}.subnet", f"{subnet} is a /{subnet.prefixlen}; the map's subnet_len is "
                                f"{subnet_len}")
    public_ip = p.ipv4_address(t, "public_ip", path, required=True)
    address = p.ipv4_address(t, "address", path)
    if address is not None and subnet is not None and address not in subnet:
        p.add(f"{path}.address", f"{address} is not inside the node's subnet {subnet}")
    underlay_mtu = p.integer(t, "underlay_mtu", path, low=576, high=65535)
    routes: list[ipaddress.IPv4Network] = []
    raw_routes = t.get("routes", [])
    if not isinstance(raw_routes, list):
        p.add(f"{path}.routes", "must be an array of CIDR strings")
        raw_routes = []
    for j, text in enumerate(raw_routes):
        key = f"{path}.routes[{j}]"
        if not isinstance(text, str):
            p.add(key, "must be a CIDR string")
        elif (route := p.parse_network(text, key)) is not None:
            if subnet is not None and route == subnet:
                p.add(key, f"{route} repeats the node's own subnet")
            else:
                routes.append(route)
    vtep_mac = p.string(t, "vtep_mac", path)
    if vtep_mac is not None:
        vtep_mac = vtep_mac.lower()
        if backend.type != "vxlan":
            p.add(f"{path}.vtep_mac", "only meaningful with backend type = \"vxlan\"")
        elif not MAC.match(vtep_mac):
            p.add(f"{path}.vtep_mac", f"{vtep_mac!r} is not a MAC address (aa:bb:cc:dd:ee:ff)")
        elif int(vtep_mac[:2], 16) & 1:
            p.add(f"{path}.vtep_mac", f"{vtep_mac} is a multicast MAC; a VTEP needs a unicast one")
    public_key = _public_key(p, t, path, backend)
    if len(p.found) != before or name is None or subnet is None or public_ip is None:
        return None
    if backend.type == "vxlan" and vtep_mac is None:
        vtep_mac = derive_vtep_mac(public_ip, backend.vni)
    return path, Node(name, subnet, public_ip, address or subnet.network_address, underlay_mtu,
                      tuple(routes), vtep_mac or "", public_key)


def _public_key(p: Problems, t: dict[str, Any], path: str, backend: Backend) -> str:
    """A node's WireGuard public key: required with the wireguard backend, refused without."""
    text = p.string(t, "public_key", path, required=backend.type == "wireguard")
    if text is None:
        return ""
    if backend.type != "wireguard":
        p.add(f"{path}.public_key", "only meaningful with backend type = \"wireguard\"")
        return ""
    if decode_key(text) is None:
        p.add(f"{path}.public_key", f"{text!r} is not a WireGuard key (44 characters of "
                                    "base64, as `wg pubkey` or `overlayd keys` print)")
        return ""
    return text


def decode_key(text: str) -> bytes | None:
    """The 32 bytes of a base64 WireGuard key, or None if it is not one."""
    try:
        raw = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError):
        return None
    return raw if len(raw) == 32 else None


def _check_unique(p: Problems, nodes: list[tuple[str, Node]]) -> None:
    """Names and public IPs are unique; no two nodes' subnets overlap; no prefix is claimed twice."""
    names: dict[str, str] = {}
    macs: dict[str, str] = {}
    keys: dict[str, str] = {}
    ips: dict[ipaddress.IPv4Address, str] = {}
    prefixes: dict[ipaddress.IPv4Network, str] = {}
    subnets: list[tuple[ipaddress.IPv4Network, str]] = []
    for path, node in nodes:
        if node.name in names:
            p.add(f"{path}.name", f"duplicate name {node.name!r} (also {names[node.name]})")
        names.setdefault(node.name, path)
        if node.vtep_mac and node.vtep_mac in macs:
            p.add(f"{path}.vtep_mac", f"duplicate VTEP MAC {node.vtep_mac} "
                                      f"(also {macs[node.vtep_mac]})")
        macs.setdefault(node.vtep_mac, path)
        if node.public_key and node.public_key in keys:
            p.add(f"{path}.public_key", f"duplicate public key (also {keys[node.public_key]})")
        keys.setdefault(node.public_key, path)
        if node.public_ip in ips:
            p.add(f"{path}.public_ip", f"duplicate public IP {node.public_ip} "
                                       f"(also {ips[node.public_ip]})")
        ips.setdefault(node.public_ip, path)
        subnets.append((node.subnet, path))
        for route in node.routes:
            if route in prefixes:
                p.add(f"{path}.routes", f"{route} is already routed to {prefixes[route]}")
            prefixes.setdefault(route, path)
    _check_overlaps(p, subnets)
    for path, node in nodes:
        if node.subnet in prefixes and prefixes[node.subnet] != path:
            p.add(f"{prefixes[node.subnet]}.routes",
                  f"{node.subnet} is the subnet of {path} ({node.name})")


def _check_overlaps(p: Problems, subnets: list[tuple[ipaddress.IPv4Network, str]]) -> None:
    """Report each subnet that overlaps one listed before it; O(n log n) for fleet-sized maps.

    Sorted by start address, a subnet overlaps an earlier-starting one exactly when it starts
    before the furthest end seen so far; the problem is reported on the later-listed node.
    """
    order = sorted(range(len(subnets)), key=lambda i: (int(subnets[i][0].network_address), i))
    widest: int | None = None        # index of the subnet reaching furthest so far
    for i in order:
        subnet = subnets[i][0]
        if widest is not None and int(subnet.network_address) <= int(
                subnets[widest][0].broadcast_address):
            first, second = sorted((widest, i))
            (a, a_path), (b, b_path) = subnets[first], subnets[second]
            p.add(f"{b_path}.subnet", f"{b} overlaps {a} of {a_path}")
        if widest is None or int(subnet.broadcast_address) > int(
                subnets[widest][0].broadcast_address):
            widest = i

