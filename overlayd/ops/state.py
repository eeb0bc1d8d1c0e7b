"""The daemon's live state as plain, JSON-ready data: one reader for every consumer.

The control socket (``overlayd status|peers|routes|fdb``), the Prometheus collector and the
health checks all read the daemon through these functions, so the three never disagree.

Thread rule: call them on the event-loop thread only. The forwarder is driven from that thread
(its contract), and tables are swapped there, so a read sees one consistent generation. The HTTP
thread gets here through ``LoopBridge`` (http_server.py), never directly.
"""

from __future__ import annotations

import ipaddress
import os
import time
from typing import Any

from overlayd import __version__
from overlayd.control.subnet_map import derive_vtep_mac
from overlayd.dataplane.counters import ALL_DROP_REASONS
from overlayd.dataplane.tables import LOCAL
from overlayd.ops import health
from overlayd.ops.daemon_view import (  # noqa: F401 - re-exported: ops callers use state.*
    RELOADING,
    RUNNING,
    STARTING,
    STOPPING,
    DaemonLike,
    RuntimeInfo,
    map_source,
)

DROP_SET = frozenset(ALL_DROP_REASONS)

def _ip(value: int) -> str:
    return str(ipaddress.IPv4Address(value))


def device_ok(d: DaemonLike) -> bool:
    """Whether the device is there and being read (False while it is being recreated)."""
    return not d.device_broken and d.forwarder is not None


def peer_counters(d: DaemonLike) -> list[tuple[int, int, int, int]]:
    """(tx_packets, tx_bytes, rx_packets, rx_bytes) per peer, padded to the peer table."""
    count = len(d.view.peers) if d.view is not None else 0
    got = list(d.forwarder.peer_counters()) if d.forwarder is not None else []
    got = got[:count]
    return got + [(0, 0, 0, 0)] * (count - len(got))


def vtep(node: Any, vni: int) -> dict[str, Any]:
    """A node's VTEP MAC (vxlan; None for udp) and whether it was derived (not set in the map):
    derived = the first 6 bytes of SHA-256("overlayd-vtep" + public IP + VNI as 3 bytes), with
    the locally administered bit set and the multicast bit clear (subnet_map.derive_vtep_mac)."""
    if not node.vtep_mac:
        return {"vtep_mac": None, "vtep_mac_derived": None}
    return {"vtep_mac": node.vtep_mac,
            "vtep_mac_derived": node.vtep_mac == derive_vtep_mac(node.public_ip, vni)}


def peer_rx_dropped(d: DaemonLike) -> list[int]:
    """Per peer: datagrams received from it that failed a check (rx - accepted)."""
    counts = peer_counters(d)
    got = list(d.forwarder.peer_rx_accepted()) if d.forwarder is not None else []
    accepted = got[:len(counts)] + [0] * (len(counts) - len(got))
    return [max(0, c[2] - a) for c, a in zip(counts, accepted, strict=True)]


def observe_peer_rx(d: DaemonLike, info: RuntimeInfo, wall_now: float) -> None:
    """Note which peers were heard from since the last call (called every second on the loop):
    a peer whose rx counter moved was last heard at ``wall_now``. The data plane keeps no clock;
    this gives "last received" to the second without one."""
    if d.view is None:
        return
    seen: dict[str, int] = {}
    for node, counts in zip(d.view.peers, peer_counters(d), strict=False):
        rx = counts[2]
        if rx and rx != info.peer_rx_seen.get(node.name):
            info.peer_last_rx[node.name] = wall_now
        seen[node.name] = rx
    info.peer_rx_seen = seen
    for gone in info.peer_last_rx.keys() - seen.keys():   # left the map
        del info.peer_last_rx[gone]


def peers(d: DaemonLike, info: RuntimeInfo | None = None,
          wall_now: float | None = None) -> list[dict[str, Any]]:
    if d.view is None:
        return []
    wall = time.time() if wall_now is None else wall_now
    last_rx = info.peer_last_rx if info is not None else {}
    out = []
    entries = d.view.tables.peers
    # wireguard: endpoint (roamed), latest handshake and sessions of each peer
    wireguard = getattr(d, "wireguard", None)
    wg_rows = wireguard.peer_status() if wireguard is not None else []
    for index, (node, entry, counts, dropped) in enumerate(zip(
            d.view.peers, entries, peer_counters(d), peer_rx_dropped(d), strict=False)):
        heard = last_rx.get(node.name)
        row: dict[str, Any] = {
            "index": index,
            "name": node.name,
            "public_ip": str(node.public_ip),
            "port": entry.port,
            "subnet": str(node.subnet),
            "routes": [str(r) for r in node.routes],
            **vtep(node, d.smap.backend.vni),
            "path_mtu": entry.path_mtu,
            "tx_packets": counts[0], "tx_bytes": counts[1],
            "rx_packets": counts[2], "rx_bytes": counts[3],
            "rx_dropped": dropped,
            "last_rx_at": heard,
            "last_rx_seconds_ago": None if heard is None else round(max(0.0, wall - heard), 1),
        }
        if index < len(wg_rows):
            row["wireguard"] = wg_rows[index]
        out.append(row)
    return out


def routes(d: DaemonLike) -> list[dict[str, Any]]:
    """The forwarding table as the data plane has it, most specific prefixes first.

    Empty on the switched path: it forwards by MAC address (``fdb``), not by prefix.
    """
    if d.view is None or getattr(d.smap.backend, "switched", False):
        return []
    names = [p.name for p in d.view.peers]
    entries = d.view.tables.peers
    out = []
    for network, prefix_len, target in sorted(d.view.tables.routes,
                                              key=lambda r: (-r[1], r[0])):
        row: dict[str, Any] = {"prefix": f"{_ip(network)}/{prefix_len}", "target": target}
        if target == LOCAL:
            row.update(peer=None, via=None, kind="local")
        elif 0 <= target < len(entries):
            row.update(peer=names[target], via=f"{_ip(entries[target].ip)}:{entries[target].port}",
                       kind="peer")
        else:
            row.update(peer=None, via=None, kind="unknown")
        out.append(row)
    return out


def backend_name(d: DaemonLike) -> str:
    backend = d.smap.backend
    return f"vxlan {backend.mode}" if backend.type == "vxlan" else str(backend.type)


def route_count(d: DaemonLike) -> int:
    if d.view is None or getattr(d.smap.backend, "switched", False):
        return 0
    return len(d.view.tables.routes)


def _mac(value: Any) -> str:
    if isinstance(value, bytes | bytearray) and len(value) == 6:
        return ":".join(f"{b:02x}" for b in value)
    if isinstance(value, int):
        return ":".join(f"{b:02x}" for b in value.to_bytes(6, "big"))
    return str(value)


def fdb(d: DaemonLike, now: float | None = None) -> dict[str, Any]:
    """The switched path's MAC table, if the running forwarder has one.

    A switched forwarder exposes ``fdb_entries() -> [(mac, target, static, last_seen)]``: mac as
    6 bytes, target a peer index or LOCAL, static for entries from the map (never aged), and
    last_seen in monotonic seconds (the clock the runtime hands the data plane). The routed
    paths have none.
    """
    kind = backend_name(d)
    reader = getattr(d.forwarder, "fdb_entries", None)
    if reader is None:
        return {"supported": False, "backend": kind, "entries": [],
                "reason": f"the running backend, {kind}, routes by prefix and has no FDB"}
    mono = time.monotonic() if now is None else now
    names = [p.name for p in d.view.peers] if d.view is not None else []
    entries = []
    for mac, target, *extra in reader():
        row: dict[str, Any] = {"mac": _mac(mac), "target": target,
                               "peer": names[target] if 0 <= target < len(names) else None,
                               "kind": "local" if target == LOCAL else "peer"}
        static = bool(extra[0]) if extra else False
        row["static"] = static
        if len(extra) > 1 and not static:
            row["age_seconds"] = round(max(0.0, mono - float(extra[1])), 3)
        entries.append(row)
    return {"supported": True, "backend": kind, "entries": entries}


def fdb_size(d: DaemonLike) -> int:
    size = getattr(d.forwarder, "fdb_size", None)
    if size is not None:
        return int(size())
    reader = getattr(d.forwarder, "fdb_entries", None)
    return len(reader()) if reader is not None else 0


def counters(d: DaemonLike) -> tuple[dict[str, int], dict[str, int]]:
    """(traffic counters, drops by reason); every reason is present, zero or not."""
    raw = d.forwarder.counters() if d.forwarder is not None else {}
    drops = {reason: int(raw.get(reason, 0)) for reason in ALL_DROP_REASONS}
    traffic = {name: int(v) for name, v in raw.items() if name not in DROP_SET}
    return traffic, drops


def offloads(d: DaemonLike) -> dict[str, bool]:
    """Offloads in use now: vnet_hdr (device TSO/checksum + coalescing), udp_gso, udp_gro,
    device_uso (UDP superpackets from and to the device)."""
    if d.forwarder is None:
        return {"vnet_hdr": False, "udp_gso": False, "udp_gro": False, "device_uso": False}
    return {name: bool(on) for name, on in d.forwarder.offloads().items()}


def batches(d: DaemonLike) -> tuple[list[int], list[int]]:
    if d.forwarder is None:
        return [], []
    inside, outside = d.forwarder.batch_histogram()
    return list(inside), list(outside)


def engine(d: DaemonLike) -> dict[str, Any]:
    """Who drives the data plane: the event loop, or native threads (runtime/engine.py), each
    with its share of the packets, its loop statistics and its CPUs; and the steering in force
    (runtime/steering.py: requested, mode, why cpu is not in force, the planned CPU shares)."""
    steering = getattr(d, "steering", None)
    described = steering.describe() if steering is not None else {
        "requested": "flow", "mode": "flow", "reason": None, "cpus": []}
    reader = getattr(d.forwarder, "threads", None)
    if reader is None:
        return {"kind": "loop", "threads": [], "steering": described}
    return {"kind": "threads", "busy_poll_us": getattr(d.forwarder, "busy_poll_us", 0),
            "threads": [dict(t) for t in reader()], "steering": described}


def status(d: DaemonLike, info: RuntimeInfo, now: float | None = None) -> dict[str, Any]:
    """Everything ``overlayd status`` shows, and what scripts read with ``--json``."""
    mono = time.monotonic() if now is None else now
    traffic, drops = counters(d)
    view, smap, config = d.view, d.smap, d.config
    node = view.node if view is not None else None
    verdict = health.check(d, info, mono)
    kind, location, report = map_source(d)
    return {
        "version": __version__,
        "dataplane": d.implementation,
        "pid": os.getpid(),
        "phase": info.phase,
        "started_at": info.started_wall,
        "uptime_seconds": round(mono - d.started_at, 3),
        "node": None if node is None else {
            "name": node.name, "subnet": str(node.subnet), "address": str(node.address),
            "public_ip": str(node.public_ip), **vtep(node, smap.backend.vni),
        },
        "device": {"name": config.device_name, "ok": device_ok(d),
                   "mtu": view.device_mtu if view is not None else None,
                   "recreations": d.device_recreations},
        "tunnel": {"backend": smap.backend.type, "mode": smap.backend.mode,
                   "vni": smap.backend.vni if smap.backend.type == "vxlan" else None,
                   "port": smap.backend.port,
                   "bind": str(config.bind_address or (node.public_ip if node else ""))},
        "map": {
            "source": kind, "location": location, "datastore": report or None,
            "nodes": len(smap.nodes), "network": str(smap.network),
            "applied_at": d.map_applied_at, "error": d.map_error,
            "reloads_applied": info.reloads_applied, "reloads_rejected": info.reloads_rejected,
        },
        "tables": {"peers": len(view.peers) if view is not None else 0,
                   "routes": route_count(d),
                   "fdb_entries": fdb_size(d)},
        "offloads": offloads(d),
        "engine": engine(d),
        "traffic": traffic,
        "drops": drops,
        "health": {"healthy": verdict.healthy, "ready": verdict.ready,
                   "problems": list(verdict.problems)},
        "loop": {"last_tick_age_seconds": round(max(0.0, mono - d.last_loop_tick), 3)},
        "metrics": info.metrics_url,
        "control_socket": info.control_socket,
        "capture": {"supported": info.capture_supported, "sessions": info.capture_sessions},
        "systemd": {"notify": info.notify_socket is not None,
                    "watchdog_seconds": info.watchdog_seconds},
    }
