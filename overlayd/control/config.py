"""The daemon's own config file (TOML): who this node is, where the map is, device and tuning.

Every key is documented in README.md ("Configuration reference") and in configs/overlayd.toml.
``load_config`` validates the file and the subnet map it points to, collecting every problem of
both before raising one ConfigError.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from overlayd.control.problems import ConfigError, Problem, Problems, read_toml
from overlayd.control.subnet_map import MAC, SubnetMap, parse_subnet_map

DEVICE_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,15}$")  # IFNAMSIZ - 1, no '/' or whitespace
LOG_LEVELS = ("debug", "info", "warning", "error")
DATAPLANES = ("auto", "cython", "python")
ENGINES = ("auto", "threads", "loop")   # [dataplane] engine; auto: threads with the Cython kernel
STEERINGS = ("flow", "cpu")   # [dataplane] steering: kernel flow hash, or the CPU a flowlet is on
MAP_SOURCES = ("file", "etcd")
ETCD_ENDPOINT = re.compile(r"^(https?://)?(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+):[0-9]{1,5}$")
DEFAULT_ETCD_PREFIX = "/coreos.com/network"    # flannel's default
DEFAULT_LEASE_TTL_SECONDS = 86400              # flannel's: 24 h
DEFAULT_SUBNET_ENV = "/run/flannel/subnet.env"  # where the flannel CNI plugin reads it
FILE_KEYS = {"file", "poll_seconds"}
ETCD_KEYS = {"endpoints", "prefix", "ca_file", "cert_file", "key_file", "lease_ttl_seconds",
             "public_ip", "interface"}


@dataclass(frozen=True, slots=True)
class EtcdSettings:
    """``[map] source = "etcd"``: where etcd is and how this node claims its subnet there."""

    endpoints: tuple[str, ...]            # tried in turn; the client fails over between them
    prefix: str                           # flannel's key prefix, without a trailing '/'
    ca_file: Path | None
    cert_file: Path | None
    key_file: Path | None
    lease_ttl_seconds: int
    # This node's public IP (its identity in flannel's schema): explicit, else the first IPv4
    # address of ``interface``, else the address of the interface holding the default route.
    public_ip: ipaddress.IPv4Address | None
    interface: str | None


@dataclass(frozen=True, slots=True)
class DaemonConfig:
    path: Path
    node_name: str | None                 # None: find the node by a public IP this host holds
    map_source: str                       # "file" or "etcd"
    map_file: Path                        # file source (unused with etcd)
    map_poll_seconds: float               # how often the map file's mtime is checked (0 = never)
    device_name: str
    underlay_mtu: int | None              # None: the MTU of the interface holding the public IP
    tx_queue_len: int
    bind_address: ipaddress.IPv4Address | None   # None: the node's public IP
    socket_buffer_bytes: int
    batch_size: int
    dataplane: str
    icmp_rate_per_second: int
    keep_device: bool                     # leave the device and routes on exit
    log_level: str
    metrics_enabled: bool
    metrics_listen: str
    control_socket: Path
    tx_sockets: int = 8                   # vxlan: sockets outer datagrams leave from, by flow hash
    mac_ageing_seconds: float = 300.0     # switched: learned MACs not seen this long are forgotten
    fdb_max_entries: int = 16384          # switched: cap of the MAC table (learned + static)
    static_macs: tuple[StaticMac, ...] = ()
    fdb_max_entries_per_port: int = 8192  # switched: learned MACs one port (tap, peer) may hold
    mac_move_hold_seconds: float = 1.0    # switched: a MAC seen behind our tap this recently
                                          # does not move to a peer on one frame
    storm_rate_per_second: float = 1000.0  # switched: floods per second per port (0 = off)
    storm_burst: float = 1000.0           # switched: ... and the bucket size, in frames
    offloads: bool = True                 # TSO/checksum from the device, UDP GSO/GRO, coalescing
    device_uso: bool = True               # with offloads: UDP superpackets from/to the device
    engine: str = "auto"                  # threads (native data-plane threads) | loop | auto
    threads: int = 0                      # data-plane threads with engine threads; 0: fit the host
    busy_poll_us: int = 0                 # engine threads: poll this long after a busy wake-up
    steering: str = "flow"                # engine threads: flow (hash) | cpu (pinned threads)
    flowlet_gap_us: int = 1000            # steering cpu: a flow this long silent is re-steered
    etcd: EtcdSettings | None = None      # map_source == "etcd"
    subnet_env: Path | None = Path(DEFAULT_SUBNET_ENV)   # flannel's subnet.env; None: not written
    # At boot the public IP may come later than the daemon: wait this long for it (0: no wait).
    wait_for_address_seconds: float = 120.0
    bridge: str | None = None             # switched: the Linux bridge the tap is a port of
    wireguard: WireguardConfig | None = None   # backend "wireguard" only (defaults otherwise)


@dataclass(frozen=True, slots=True)
class WireguardConfig:
    """[wireguard]: this node's keys and the protocol's timers (whitepaper section 6; shorten
    them only for tests)."""

    private_key_file: Path
    preshared_key_file: Path | None = None
    persistent_keepalive_seconds: float = 0.0
    rekey_after_seconds: float = 120.0
    reject_after_seconds: float = 180.0
    rekey_attempt_seconds: float = 90.0
    rekey_timeout_seconds: float = 5.0
    keepalive_timeout_seconds: float = 10.0
    handshakes_per_second_under_load: int = 100


@dataclass(frozen=True, slots=True)
class StaticMac:
    """A MAC pinned to a node of the map (switched vxlan): never aged, never moved."""

    mac: str          # aa:bb:cc:dd:ee:ff, lower case
    node: str         # a node name of the map; this node's own name means "behind our tap"


def load_config(path: Path) -> tuple[DaemonConfig, SubnetMap | None]:
    """Read and validate the daemon config and its subnet map; raise ConfigError on any problem.

    The map is None with ``source = "etcd"``: it lives in etcd, read once the daemon runs.
    """
    data = read_toml(path)
    config, problems = parse_config(data, path)
    if config is not None and config.map_source == "etcd":
        return config, None
    # The map is checked even when the config has problems, so one run reports both files.
    map_file = _map_file(data, path)
    smap: SubnetMap | None = None
    if map_file is not None:
        try:
            smap = parse_subnet_map(read_toml(map_file), str(map_file))
        except ConfigError as exc:
            problems = problems + exc.problems
    if config is not None and smap is not None:
        problems = problems + static_mac_problems(config, smap)
        if config.bridge is not None and not smap.backend.switched:
            problems.append(Problem(str(config.path), "device.bridge",
                                    "only for a switched vxlan backend (a tap is a bridge port; "
                                    "a routed tun is not)"))
    if problems or config is None or smap is None:
        raise ConfigError(problems)
    return config, smap


def _map_file(data: dict[str, Any], path: Path) -> Path | None:
    map_t = data.get("map")
    if isinstance(map_t, dict) and map_t.get("source") == "etcd":
        return None
    name = map_t.get("file") if isinstance(map_t, dict) else None
    return path.parent / name if isinstance(name, str) and name else None


def parse_config(data: dict[str, Any], path: Path) -> tuple[DaemonConfig | None, list]:
    """Validate a parsed config file; return (config or None, problems)."""
    p = Problems(str(path))
    sections = {"node", "map", "device", "tunnel", "dataplane", "runtime", "log", "metrics",
                "control", "switch", "wireguard"}
    p.unknown_keys(data, sections)
    node = p.table(data, "node")
    p.unknown_keys(node, {"name", "wait_for_address_seconds"}, "node")
    node_name = p.string(node, "name", "node")
    address_wait = p.number(node, "wait_for_address_seconds", "node", default=120.0, low=0.0,
                            high=86400.0)

    map_t = p.table(data, "map")
    source = p.string(map_t, "source", "map", default="file", choices=MAP_SOURCES) or "file"
    p.unknown_keys(map_t, {"source", "subnet_env"} | (ETCD_KEYS if source == "etcd"
                                                     else FILE_KEYS), "map")
    map_file_text = p.string(map_t, "file", "map", required=source == "file")
    map_file = (path.parent / map_file_text) if map_file_text else path.parent / "map.toml"
    poll = p.number(map_t, "poll_seconds", "map", default=2.0, low=0.0, high=3600.0)
    etcd = _etcd_settings(p, map_t, path) if source == "etcd" else None
    if source == "etcd" and node_name is not None:
        p.add("node.name", 'not used with [map] source = "etcd": a node is its public IP '
                           "([map] public_ip / interface) and named by its lease")
    subnet_env = _subnet_env(p, map_t, path)

    dev = p.table(data, "device")
    p.unknown_keys(dev, {"name", "underlay_mtu", "tx_queue_len", "bridge"}, "device")
    device_name = p.string(dev, "name", "device", default="overlay0") or "overlay0"
    if not DEVICE_NAME.match(device_name):
        p.add("device.name", f"{device_name!r}: 1-15 characters of letters, digits, '_', '.', '-'")
    underlay_mtu = p.integer(dev, "underlay_mtu", "device", low=576, high=65535)
    tx_queue_len = p.integer(dev, "tx_queue_len", "device", default=1000, low=1, high=1_000_000)
    bridge = p.string(dev, "bridge", "device")
    if bridge is not None and (not DEVICE_NAME.match(bridge) or bridge == device_name):
        p.add("device.bridge", f"{bridge!r}: the name of a Linux bridge (1-15 characters of "
                               f"letters, digits, '_', '.', '-'), not the device itself")

    tun = p.table(data, "tunnel")
    p.unknown_keys(tun, {"bind", "socket_buffer_bytes", "tx_sockets"}, "tunnel")
    bind = p.ipv4_address(tun, "bind", "tunnel")
    sockbuf = p.integer(tun, "socket_buffer_bytes", "tunnel", default=4 << 20,
                        low=64 << 10, high=1 << 30)
    tx_sockets = p.integer(tun, "tx_sockets", "tunnel", default=8, low=0, high=64)

    dp = p.table(data, "dataplane")
    p.unknown_keys(dp, {"implementation", "batch_size", "icmp_rate_per_second", "offloads",
                        "device_uso", "engine", "threads", "busy_poll_us", "steering",
                        "flowlet_gap_us"},
                   "dataplane")
    impl = p.string(dp, "implementation", "dataplane", default="auto", choices=DATAPLANES)
    batch = p.integer(dp, "batch_size", "dataplane", default=64, low=1, high=512)
    icmp_rate = p.integer(dp, "icmp_rate_per_second", "dataplane", default=1000, low=0,
                          high=1_000_000)
    offloads = p.boolean(dp, "offloads", "dataplane", default=True)
    device_uso = p.boolean(dp, "device_uso", "dataplane", default=True)
    engine = p.string(dp, "engine", "dataplane", default="auto", choices=ENGINES)
    threads = p.integer(dp, "threads", "dataplane", default=0, low=0, high=64)
    busy_poll = p.integer(dp, "busy_poll_us", "dataplane", default=0, low=0, high=100_000)
    steering = p.string(dp, "steering", "dataplane", default="flow", choices=STEERINGS)
    # (the programs compare the gap in ns with a 32-bit signed immediate: at most 2.1 s)
    flowlet_gap = p.integer(dp, "flowlet_gap_us", "dataplane", default=1000, low=10,
                            high=1_000_000)

    rt = p.table(data, "runtime")
    p.unknown_keys(rt, {"keep_device"}, "runtime")
    keep = p.boolean(rt, "keep_device", "runtime", default=False)

    log = p.table(data, "log")
    p.unknown_keys(log, {"level"}, "log")
    level = p.string(log, "level", "log", default="info", choices=LOG_LEVELS)

    met = p.table(data, "metrics")
    p.unknown_keys(met, {"enabled", "listen"}, "metrics")
    metrics_enabled = p.boolean(met, "enabled", "metrics", default=True)
    listen = p.string(met, "listen", "metrics", default="127.0.0.1:9585") or "127.0.0.1:9585"
    if _host_port(listen) is None:
        p.add("metrics.listen", f"{listen!r}: expected HOST:PORT, e.g. 127.0.0.1:9585")

    sw = p.table(data, "switch")
    p.unknown_keys(sw, {"mac_ageing_seconds", "fdb_max_entries", "static_macs",
                        "fdb_max_entries_per_port", "mac_move_hold_seconds",
                        "storm_rate_per_second", "storm_burst"}, "switch")
    ageing = p.number(sw, "mac_ageing_seconds", "switch", default=300.0, low=1.0,
                      high=1_000_000.0)
    fdb_max = p.integer(sw, "fdb_max_entries", "switch", default=16384, low=1, high=1 << 24)
    # Half the table by default: one port (a VM spraying source MACs, one peer) can never
    # take the whole table from the others.
    port_max = p.integer(sw, "fdb_max_entries_per_port", "switch",
                         default=max(1, (fdb_max or 16384) // 2), low=1, high=1 << 24)
    if fdb_max is not None and port_max is not None and port_max > fdb_max:
        p.add("switch.fdb_max_entries_per_port",
              f"{port_max} is more than fdb_max_entries {fdb_max}")
    move_hold = p.number(sw, "mac_move_hold_seconds", "switch", default=1.0, low=0.0,
                         high=3600.0)
    storm_rate = p.number(sw, "storm_rate_per_second", "switch", default=1000.0, low=0.0,
                          high=1e9)
    storm_burst = p.number(sw, "storm_burst", "switch", default=max(1.0, storm_rate),
                           low=1.0, high=1e9)
    static_macs = _static_macs(p, sw.get("static_macs", []))
    if fdb_max is not None and len(static_macs) > fdb_max:
        p.add("switch.static_macs", f"{len(static_macs)} entries exceed fdb_max_entries {fdb_max}")

    ctl = p.table(data, "control")
    p.unknown_keys(ctl, {"socket"}, "control")
    sock_text = p.string(ctl, "socket", "control",
                         default=f"/run/overlayd/{device_name}.sock")
    wireguard = _wireguard(p, p.table(data, "wireguard"), path, device_name)
    if p.found:
        return None, list(p.found)
    assert tx_queue_len is not None and sockbuf is not None and batch is not None
    assert icmp_rate is not None and impl is not None and level is not None
    return DaemonConfig(
        path=path, node_name=node_name, map_source=source, map_file=map_file,
        map_poll_seconds=poll, device_name=device_name, underlay_mtu=underlay_mtu,
        tx_queue_len=tx_queue_len, bind_address=bind, socket_buffer_bytes=sockbuf,
        batch_size=batch, dataplane=impl, icmp_rate_per_second=icmp_rate, keep_device=keep,
        log_level=level, metrics_enabled=metrics_enabled, metrics_listen=listen,
        control_socket=Path(sock_text or "/run/overlayd/overlayd.sock"),
        tx_sockets=tx_sockets if tx_sockets is not None else 8,
        mac_ageing_seconds=ageing, fdb_max_entries=fdb_max or 16384,
        static_macs=tuple(static_macs), offloads=bool(offloads),
        device_uso=bool(device_uso), etcd=etcd,
        engine=engine or "auto", threads=threads or 0, busy_poll_us=busy_poll or 0,
        steering=steering or "flow",
        flowlet_gap_us=flowlet_gap if flowlet_gap is not None else 1000,
        subnet_env=subnet_env, wait_for_address_seconds=address_wait, bridge=bridge,
        fdb_max_entries_per_port=port_max or 1, mac_move_hold_seconds=move_hold,
        storm_rate_per_second=storm_rate, storm_burst=storm_burst, wireguard=wireguard,
    ), []


def _wireguard(p: Problems, t: dict[str, Any], path: Path, device: str) -> WireguardConfig:
    p.unknown_keys(t, {"private_key_file", "preshared_key_file", "persistent_keepalive_seconds",
                       "rekey_after_seconds", "reject_after_seconds", "rekey_attempt_seconds",
                       "rekey_timeout_seconds", "keepalive_timeout_seconds",
                       "handshakes_per_second_under_load"}, "wireguard")
    key = p.string(t, "private_key_file", "wireguard",
                   default=f"/var/lib/overlayd/{device}.key") or f"/var/lib/overlayd/{device}.key"
    psk = p.string(t, "preshared_key_file", "wireguard")

    def seconds(name: str, default: float, low: float = 0.05) -> float:
        return p.number(t, name, "wireguard", default=default, low=low, high=86400.0)

    wg = WireguardConfig(
        private_key_file=path.parent / key,
        preshared_key_file=path.parent / psk if psk else None,
        persistent_keepalive_seconds=seconds("persistent_keepalive_seconds", 0.0, 0.0),
        rekey_after_seconds=seconds("rekey_after_seconds", 120.0),
        reject_after_seconds=seconds("reject_after_seconds", 180.0),
        rekey_attempt_seconds=seconds("rekey_attempt_seconds", 90.0),
        rekey_timeout_seconds=seconds("rekey_timeout_seconds", 5.0),
        keepalive_timeout_seconds=seconds("keepalive_timeout_seconds", 10.0),
        handshakes_per_second_under_load=p.integer(
            t, "handshakes_per_second_under_load", "wireguard", default=100, low=0,
            high=1_000_000) or 0,
    )
    if wg.reject_after_seconds <= wg.rekey_after_seconds:
        p.add("wireguard.reject_after_seconds",
              f"{wg.reject_after_seconds:g} must be longer than rekey_after_seconds "
              f"{wg.rekey_after_seconds:g} (a session must be renewed before it is refused)")
    return wg


def _subnet_env(p: Problems, map_t: dict[str, Any], path: Path) -> Path | None:
    """``subnet_env``: a path (relative to the config's directory), or false for none."""
    raw = map_t.get("subnet_env", DEFAULT_SUBNET_ENV)
    if raw is False:
        return None
    if not isinstance(raw, str) or not raw:
        p.add("map.subnet_env", "must be a file path, or false to write none")
        return None
    return path.parent / raw


def _etcd_settings(p: Problems, map_t: dict[str, Any], path: Path) -> EtcdSettings | None:
    before = len(p.found)
    raw = map_t.get("endpoints")
    endpoints: list[str] = []
    if raw is None:
        p.add("map.endpoints", 'missing (required with source = "etcd"), e.g. '
                               '["http://10.0.0.1:2379"]')
    elif not isinstance(raw, list) or not raw or not all(isinstance(e, str) for e in raw):
        p.add("map.endpoints", "must be a non-empty array of URLs (http://HOST:PORT)")
    else:
        for i, text in enumerate(raw):
            if not ETCD_ENDPOINT.match(text):
                p.add(f"map.endpoints[{i}]", f"{text!r}: expected http://HOST:PORT or "
                                             "https://HOST:PORT")
            endpoints.append(text)
    prefix = p.string(map_t, "prefix", "map", default=DEFAULT_ETCD_PREFIX) or DEFAULT_ETCD_PREFIX
    if not prefix.startswith("/") or prefix.rstrip("/") == "" or "//" in prefix:
        p.add("map.prefix", f"{prefix!r}: an absolute key prefix such as /coreos.com/network")
    files: dict[str, Path | None] = {}
    for key in ("ca_file", "cert_file", "key_file"):
        text = p.string(map_t, key, "map")
        files[key] = None if text is None else path.parent / text
        if files[key] is not None and not files[key].is_file():   # type: ignore[union-attr]
            p.add(f"map.{key}", f"{files[key]}: file not found")
    if (files["cert_file"] is None) != (files["key_file"] is None):
        p.add("map.cert_file", "cert_file and key_file go together (TLS client certificate)")
    tls = any(f is not None for f in files.values())
    for i, text in enumerate(endpoints):
        if tls and text.startswith("http://"):
            p.add(f"map.endpoints[{i}]", f"{text!r}: TLS files are set; use https://")
    ttl = p.integer(map_t, "lease_ttl_seconds", "map", default=DEFAULT_LEASE_TTL_SECONDS,
                    low=10, high=10 * 365 * 86400)
    public_ip = p.ipv4_address(map_t, "public_ip", "map")
    interface = p.string(map_t, "interface", "map")
    if interface is not None and not DEVICE_NAME.match(interface):
        p.add("map.interface", f"{interface!r} is not an interface name")
    if public_ip is not None and interface is not None:
        p.add("map.interface", "set public_ip or interface, not both")
    if len(p.found) != before:
        return None
    return EtcdSettings(tuple(endpoints), prefix.rstrip("/"), files["ca_file"],
                        files["cert_file"], files["key_file"], ttl or DEFAULT_LEASE_TTL_SECONDS,
                        public_ip, interface)


def _static_macs(p: Problems, raw: Any) -> list[StaticMac]:
    if not isinstance(raw, list) or not all(isinstance(e, dict) for e in raw):
        p.add("switch.static_macs", 'must be an array of tables: [{ mac = "...", node = "..." }]')
        return []
    out: list[StaticMac] = []
    seen: dict[str, str] = {}
    for i, entry in enumerate(raw):
        path = f"switch.static_macs[{i}]"
        p.unknown_keys(entry, {"mac", "node"}, path)
        mac = p.string(entry, "mac", path, required=True)
        node = p.string(entry, "node", path, required=True)
        if mac is None or node is None:
            continue
        mac = mac.lower()
        if not MAC.match(mac):
            p.add(f"{path}.mac", f"{mac!r} is not a MAC address (aa:bb:cc:dd:ee:ff)")
        elif int(mac[:2], 16) & 1 or mac == "00:00:00:00:00:00":
            p.add(f"{path}.mac", f"{mac} is not a unicast MAC")
        elif mac in seen:
            p.add(f"{path}.mac", f"{mac} is already pinned by {seen[mac]}")
        else:
            seen[mac] = path
            out.append(StaticMac(mac, node))
    return out


def static_mac_problems(config: DaemonConfig, smap: SubnetMap) -> list[Problem]:
    """Static MACs must name nodes of the map, must not claim another node's VTEP MAC (the
    switched path pins each node's own), and with those pins must fit fdb_max_entries."""
    names = {n.name for n in smap.nodes}
    vtep = {n.vtep_mac: n.name for n in smap.nodes if n.vtep_mac}
    out = []
    for i, s in enumerate(config.static_macs):
        if s.node not in names:
            out.append(Problem(str(config.path), f"switch.static_macs[{i}].node",
                               f"unknown node {s.node!r} (the map has: "
                               f"{', '.join(sorted(names))})"))
        elif vtep.get(s.mac, s.node) != s.node:
            out.append(Problem(str(config.path), f"switch.static_macs[{i}].mac",
                               f"{s.mac} is the VTEP MAC of node {vtep[s.mac]!r}, pinned to it"))
    pins = len(vtep) + sum(1 for s in config.static_macs if s.mac not in vtep)
    if smap.backend.switched and pins > config.fdb_max_entries:
        out.append(Problem(str(config.path), "switch.fdb_max_entries",
                           f"{config.fdb_max_entries} cannot hold the {pins} pinned MACs (each "
                           f"of the map's {len(vtep)} nodes' VTEP MACs and the static MACs)"))
    return out


def _host_port(text: str) -> tuple[str, int] | None:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        return None
    return host.strip("[]") or "0.0.0.0", int(port)


def metrics_address(config: DaemonConfig) -> tuple[str, int]:
    hp = _host_port(config.metrics_listen)
    assert hp is not None  # validated in parse_config
    return hp
