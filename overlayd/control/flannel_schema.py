"""flannel's etcd schema: the network config at <prefix>/config and leases at <prefix>/subnets/.

Pure (no I/O). Reading follows flannel's Go encoding/json: object keys match case-insensitively
(the last of several spellings wins), unknown keys are ignored, and numbers must be integers.
Writing produces byte for byte what flannel's json.Marshal produces, so flannel nodes, its CNI
plugin and its tooling read overlayd's leases as their own:

    {"PublicIP":"192.0.2.1","PublicIPv6":null,"BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"0e:2a:..."}}

flannel's udp backend writes neither BackendType nor BackendData; such a lease reads back with
backend_type "" (udp, as flannel's own udp backend takes it).

Problems raise ConfigError whose "file" is the etcd key, so a log line names key, field and reason.
"""

from __future__ import annotations

import ipaddress
import json
import re
from dataclasses import dataclass
from typing import Any

from overlayd.control.problems import ConfigError, Problem, Problems

DEFAULT_PREFIX = "/coreos.com/network"
BACKEND_TYPES = ("udp", "vxlan", "wireguard")
DEFAULT_BACKEND = "udp"              # flannel's default when the config has no Backend
DEFAULT_VNI = 1                      # flannel's vxlan default (Linux)
MAX_VNI = 0xFFFF                     # flannel's leases carry the VNI as a uint16
DEFAULT_PORTS = {"udp": 8285, "vxlan": 8472,   # flannel udp default; vxlan Port 0 = kernel's 8472
                 "wireguard": 51820}

# "10.5.1.0-24", optionally "&fd00:5:1::-64" for a dual-stack lease (flannel's MakeSubnetKey).
_SUBNET_KEY = re.compile(r"^(\d{1,3}(?:\.\d{1,3}){3})-(\d{1,2})(?:&([0-9a-f:]+)-(\d{1,3}))?$")
_MAC_SEPARATED = re.compile(r"^[0-9a-fA-F]{2}([:-])[0-9a-fA-F]{2}(\1[0-9a-fA-F]{2}){4}$")
_MAC_DOTTED = re.compile(r"^[0-9a-fA-F]{4}\.[0-9a-fA-F]{4}\.[0-9a-fA-F]{4}$")

_CONFIG_FIELDS = ("Network", "SubnetLen", "SubnetMin", "SubnetMax", "Backend")
_BACKEND_FIELDS = ("Type", "Port", "ListenPort", "VNI", "Mode")   # ListenPort: flannel wireguard
# overlayd's own Backend key (flannel ignores unknown keys): "switched" makes a vxlan network one
# L2 segment over tap devices (README: the etcd map, switched mode); "routed" is flannel's vxlan.
VXLAN_MODES = ("routed", "switched")
SWITCHED_PORT = 4789                 # IANA's VXLAN port, as a plain kernel VTEP uses
_LEASE_FIELDS = ("PublicIP", "PublicIPv6", "BackendType", "BackendData")
_VXLAN_FIELDS = ("VNI", "VtepMAC")
_WIREGUARD_FIELDS = ("PublicKey", "Port")


@dataclass(frozen=True, slots=True)
class NetworkConfig:
    """The network config with flannel's defaults applied (as flannel's CheckNetworkConfig does)."""

    network: ipaddress.IPv4Network
    subnet_len: int
    subnet_min: ipaddress.IPv4Address    # first subnet address that may be leased
    subnet_max: ipaddress.IPv4Address    # last one
    backend_type: str                    # "udp" | "vxlan"
    port: int                            # the backend's UDP port
    vni: int                             # vxlan VNI (DEFAULT_VNI for udp, unused there)
    mode: str = "routed"                 # vxlan: overlayd's Backend.Mode, routed or switched


@dataclass(frozen=True, slots=True)
class Lease:
    subnet: ipaddress.IPv4Network
    public_ip: ipaddress.IPv4Address
    public_ipv6: ipaddress.IPv6Address | None
    backend_type: str                    # as written; "" when absent (flannel's udp backend)
    vni: int | None                      # BackendData.VNI (vxlan; old flannel leaves it out)
    vtep_mac: str | None                 # BackendData.VtepMAC, normalised to aa:bb:cc:dd:ee:ff
    ipv6_subnet: ipaddress.IPv6Network | None = None   # dual-stack keys only
    public_key: str | None = None        # wireguard: BackendData.PublicKey (base64)
    port: int | None = None              # wireguard: BackendData.Port (None: the network's)


# -- keys -------------------------------------------------------------------------------------

def config_key(prefix: str = DEFAULT_PREFIX) -> str:
    return f"{prefix.rstrip('/')}/config"


def subnets_prefix(prefix: str = DEFAULT_PREFIX) -> str:
    """The prefix every lease key starts with (trailing slash included, so a list sees only leases)."""
    return f"{prefix.rstrip('/')}/subnets/"


def subnet_key(subnet: ipaddress.IPv4Network, prefix: str = DEFAULT_PREFIX) -> str:
    return f"{subnets_prefix(prefix)}{subnet.network_address}-{subnet.prefixlen}"


def parse_subnet_key(key: str) -> tuple[ipaddress.IPv4Network, ipaddress.IPv6Network | None]:
    """The subnet(s) a lease key names; ConfigError if the last path segment is not one."""
    name = key.rsplit("/", 1)[-1]
    match = _SUBNET_KEY.match(name)
    problem = f"{name!r} is not a subnet key (a.b.c.d-len)"
    if match is None:
        raise ConfigError([Problem(key, "", problem)])
    try:
        subnet = ipaddress.IPv4Network(f"{match[1]}/{match[2]}", strict=True)
        ipv6 = (ipaddress.IPv6Network(f"{match[3]}/{match[4]}", strict=True)
                if match[3] is not None else None)
    except ValueError as exc:
        raise ConfigError([Problem(key, "", f"{problem}: {exc}")]) from None
    return subnet, ipv6


# -- network config ---------------------------------------------------------------------------

def parse_network_config(raw: bytes, key: str = config_key()) -> NetworkConfig:
    """Parse and check <prefix>/config; every problem found is in the one ConfigError raised."""
    p = Problems(key)
    data = _load_object(raw, key)
    fields = _fold(data, _CONFIG_FIELDS)
    network = p.ipv4_network(fields, "Network", required=True)
    backend = _parse_backend(p, fields)
    subnet_len = p.integer(fields, "SubnetLen", low=0, high=32)
    p.raise_if_any()
    assert network is not None and backend is not None
    if subnet_len is None or subnet_len == 0:
        subnet_len = _default_subnet_len(p, network)
    elif subnet_len > 30:
        p.add("SubnetLen", f"{subnet_len} leaves no room for hosts (at most 30)")
    elif subnet_len < network.prefixlen + 2:
        p.add("SubnetLen", f"/{subnet_len} does not fit four times into Network {network} "
                           f"(needs at least /{network.prefixlen + 2})")
    p.raise_if_any()
    size = 1 << (32 - subnet_len)
    first = network.network_address + size      # flannel skips the subnet holding the network address
    last = network.broadcast_address + 1 - size
    low = _bound(p, fields, "SubnetMin", first, network, subnet_len)
    high = _bound(p, fields, "SubnetMax", last, network, subnet_len)
    if low > high:
        p.add("SubnetMin", f"{low} is above SubnetMax {high}")
    p.raise_if_any()
    backend_type, port, vni, mode = backend
    return NetworkConfig(network, subnet_len, low, high, backend_type, port, vni, mode)


def network_config_json(network: ipaddress.IPv4Network, *, subnet_len: int | None = None,
                        subnet_min: ipaddress.IPv4Address | None = None,
                        subnet_max: ipaddress.IPv4Address | None = None,
                        backend_type: str = DEFAULT_BACKEND, vni: int | None = None,
                        port: int | None = None) -> bytes:
    """The config as an operator writes it for flannel: only the keys given, in flannel's spelling."""
    config: dict[str, Any] = {"Network": str(network)}
    if subnet_len is not None:
        config["SubnetLen"] = subnet_len
    if subnet_min is not None:
        config["SubnetMin"] = str(subnet_min)
    if subnet_max is not None:
        config["SubnetMax"] = str(subnet_max)
    backend: dict[str, Any] = {"Type": backend_type}
    if vni is not None:
        backend["VNI"] = vni
    if port is not None:
        backend["Port"] = port
    config["Backend"] = backend
    return _dumps(config)


def _parse_backend(p: Problems, fields: dict[str, Any]) -> tuple[str, int, int, str] | None:
    value = fields.get("Backend")
    if value is None:
        return DEFAULT_BACKEND, DEFAULT_PORTS[DEFAULT_BACKEND], DEFAULT_VNI, "routed"
    if not isinstance(value, dict):
        p.add("Backend", f"must be an object, not {_json_kind(value)}")
        return None
    backend = _fold(value, _BACKEND_FIELDS)
    kind = p.string(backend, "Type", "Backend", default=DEFAULT_BACKEND, choices=BACKEND_TYPES)
    # flannel's vxlan takes Port 0 as "the kernel's default"; udp has no such meaning for 0.
    port = p.integer(backend, "Port", "Backend", low=0 if kind == "vxlan" else 1, high=65535)
    if port is None and kind == "wireguard":
        port = p.integer(backend, "ListenPort", "Backend", low=1, high=65535)
    vni = p.integer(backend, "VNI", "Backend", default=DEFAULT_VNI, low=0, high=MAX_VNI)
    mode = p.string(backend, "Mode", "Backend", default="routed", choices=VXLAN_MODES)
    if mode == "switched" and kind != "vxlan":
        p.add("Backend.Mode", 'only meaningful with Type "vxlan"')
    if kind is None or vni is None or mode is None:
        return None
    default_port = SWITCHED_PORT if mode == "switched" else DEFAULT_PORTS[kind]
    return kind, port or default_port, vni, mode


def _default_subnet_len(p: Problems, network: ipaddress.IPv4Network) -> int:
    """flannel's choice when SubnetLen is absent or 0: /24, or a quarter of a small network."""
    if network.prefixlen > 28:
        p.add("Network", f"{network} is too small for flannel's default SubnetLen (at most /28)")
        return 30
    return 24 if network.prefixlen <= 22 else network.prefixlen + 2


def _bound(p: Problems, fields: dict[str, Any], name: str, default: ipaddress.IPv4Address,
           network: ipaddress.IPv4Network, subnet_len: int) -> ipaddress.IPv4Address:
    address = p.ipv4_address(fields, name)
    if address is None:
        return default
    if address not in network:
        p.add(name, f"{address} is outside Network {network}")
    elif int(address) % (1 << (32 - subnet_len)):
        p.add(name, f"{address} is not on a /{subnet_len} boundary")
    return address


# -- leases -----------------------------------------------------------------------------------

def parse_lease(key: str, raw: bytes) -> Lease:
    """Parse one lease (key and value); ConfigError names the key and the bad field."""
    subnet, ipv6_subnet = parse_subnet_key(key)
    p = Problems(key)
    fields = _fold(_load_object(raw, key), _LEASE_FIELDS)
    public_ip = p.ipv4_address(fields, "PublicIP", required=True)
    public_ipv6 = _ipv6(p, fields, "PublicIPv6")
    backend_type = fields.get("BackendType") or ""
    if not isinstance(backend_type, str):
        p.add("BackendType", f"must be a string, not {_json_kind(backend_type)}")
    vni, vtep_mac = _parse_backend_data(p, fields.get("BackendData"), backend_type == "vxlan")
    public_key, port = None, None
    if backend_type == "wireguard":
        public_key, port = _parse_wireguard_data(p, fields.get("BackendData"))
    p.raise_if_any()
    assert public_ip is not None and isinstance(backend_type, str)
    return Lease(subnet, public_ip, public_ipv6, backend_type, vni, vtep_mac, ipv6_subnet,
                 public_key, port)


def _parse_wireguard_data(p: Problems, value: object) -> tuple[str | None, int | None]:
    """flannel's wireguard lease: BackendData {"PublicKey": base64, "Port": optional}."""
    from overlayd.control.subnet_map import decode_key

    data = _fold(value, _WIREGUARD_FIELDS) if isinstance(value, dict) else {}
    key = data.get("PublicKey")
    if not isinstance(key, str) or decode_key(key) is None:
        p.add("BackendData.PublicKey", "missing or not a WireGuard key (base64 of 32 bytes)")
        key = None
    return key, p.integer(data, "Port", "BackendData", low=1, high=65535)


def lease_json(public_ip: ipaddress.IPv4Address, backend_type: str, *, vni: int | None = None,
               vtep_mac: str | None = None,
               public_ipv6: ipaddress.IPv6Address | None = None,
               public_key: str | None = None, port: int | None = None) -> bytes:
    """A lease value exactly as flannel's json.Marshal(LeaseAttrs) writes it.

    backend_type "" with no vni/vtep_mac gives what flannel's udp backend writes.
    """
    attrs: dict[str, Any] = {"PublicIP": str(public_ip),
                             "PublicIPv6": str(public_ipv6) if public_ipv6 is not None else None}
    if backend_type:
        attrs["BackendType"] = backend_type
    data: dict[str, Any] = {}
    if vni is not None:
        data["VNI"] = vni
    if vtep_mac is not None:
        mac = normalise_mac(vtep_mac)
        if mac is None:
            raise ValueError(f"{vtep_mac!r} is not a MAC address")
        data["VtepMAC"] = mac
    if public_key is not None:
        data["PublicKey"] = public_key
    if port is not None:
        data["Port"] = port
    if data:
        attrs["BackendData"] = data
    return _dumps(attrs)


def _parse_backend_data(p: Problems, value: object,
                        vxlan: bool) -> tuple[int | None, str | None]:
    # Another backend's data is kept raw by flannel; overlayd reads only vxlan's object.
    data = _fold(value, _VXLAN_FIELDS) if isinstance(value, dict) else {}
    vni = p.integer(data, "VNI", "BackendData", low=0, high=MAX_VNI)
    mac_text = data.get("VtepMAC")
    if mac_text is None:
        if vxlan:
            p.add("BackendData.VtepMAC", "missing (a vxlan lease needs its VTEP's MAC)")
        return vni, None
    mac = normalise_mac(mac_text) if isinstance(mac_text, str) else None
    if mac is None:
        p.add("BackendData.VtepMAC", f"{mac_text!r} is not a MAC address")
    return vni, mac


def normalise_mac(text: str) -> str | None:
    """A 6-byte MAC in any form Go's net.ParseMAC takes, as aa:bb:cc:dd:ee:ff; None if not one."""
    if _MAC_SEPARATED.match(text):
        return text.replace("-", ":").lower()
    if _MAC_DOTTED.match(text):
        digits = text.replace(".", "").lower()
        return ":".join(digits[i:i + 2] for i in range(0, 12, 2))
    return None


def _ipv6(p: Problems, fields: dict[str, Any], name: str) -> ipaddress.IPv6Address | None:
    value = fields.get(name)
    if value is None:
        return None
    try:
        return ipaddress.IPv6Address(value if isinstance(value, str) else "")
    except ValueError:
        p.add(name, f"{value!r} is not an IPv6 address")
        return None


# -- JSON as Go reads and writes it -----------------------------------------------------------

def _load_object(raw: bytes, key: str) -> dict[str, Any]:
    try:
        data = json.loads(raw, object_pairs_hook=_go_object)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError([Problem(key, "", f"not JSON: {exc}")]) from None
    if not isinstance(data, dict):
        raise ConfigError([Problem(key, "", f"must be a JSON object, not {_json_kind(data)}")])
    return data


def _fold(data: dict[str, Any], names: tuple[str, ...]) -> dict[str, Any]:
    """The fields of names found in data (whose keys _load_object lowered), in their flannel spelling."""
    canonical = {name.lower(): name for name in names}
    return {canonical[key]: value for key, value in data.items() if key in canonical}


def _go_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object as Go fills a struct: keys case-insensitive, the last spelling wins, and a
    null has no effect (so it neither sets nor clears a field)."""
    folded: dict[str, Any] = {}
    for key, value in pairs:
        if value is not None:
            folded[key.lower()] = value
    return folded


def _dumps(value: object) -> bytes:
    # Go's json.Marshal: no spaces; it escapes <, > and & but none can occur in what we write.
    return json.dumps(value, separators=(",", ":")).encode()


def _json_kind(value: object) -> str:
    names = {str: "a string", int: "a number", float: "a number", bool: "a boolean",
             list: "an array", dict: "an object"}
    return names.get(type(value), "null")
