"""Which entry of the subnet map is this host, and what that makes of the rest of the map."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass

from overlayd.control.problems import ConfigError, Problem
from overlayd.control.subnet_map import Node, SubnetMap, decode_key
from overlayd.dataplane.tables import LOCAL, ForwardingTables, PeerEntry, SwitchTables
from overlayd.wire.ethernet import parse_mac


def find_local_node(smap: SubnetMap, map_file: str, name: str | None,
                    host_addresses: Iterable[ipaddress.IPv4Address]) -> Node:
    """The node named ``name``; without a name, the node whose public IP this host holds."""
    if name is not None:
        node = smap.node_named(name)
        if node is None:
            known = ", ".join(n.name for n in smap.nodes)
            raise ConfigError([Problem(map_file, "nodes",
                                       f"unknown own node {name!r} (the map has: {known})")])
        return node
    held = set(host_addresses)
    matches = [n for n in smap.nodes if n.public_ip in held]
    if len(matches) == 1:
        return matches[0]
    if not matches:
        raise ConfigError([Problem(map_file, "nodes",
                                   "unknown own node: no node's public_ip is an address of this "
                                   "host; set [node] name in the config")])
    names = ", ".join(n.name for n in matches)
    raise ConfigError([Problem(map_file, "nodes", f"this host holds the public IPs of several "
                                                  f"nodes ({names}); set [node] name")])


@dataclass(frozen=True, slots=True)
class LocalView:
    """The map as seen from one node: its own entry, its peers in table order, its tables."""

    node: Node
    peers: tuple[Node, ...]
    tables: ForwardingTables
    device_mtu: int


def build_local_view(smap: SubnetMap, me: Node, underlay_mtu: int,
                     host_addresses: Iterable[ipaddress.IPv4Address] = ()) -> LocalView:
    """Forwarding tables for ``me``: one peer entry per other node, every prefix routed.

    ``underlay_mtu`` is this host's own (detected or configured). The path MTU toward a peer is
    the smaller of both underlays minus the encapsulation, so a DF packet that would not fit the
    peer's side is answered with frag-needed here instead of vanishing there.
    ``host_addresses`` are this host's own IPv4 addresses (its public IP is always one): no
    inner packet from a peer may carry one as its source.
    """
    overhead = smap.backend.overhead
    peers = tuple(n for n in smap.nodes if n.name != me.name)
    entries = []
    routes: list[tuple[int, int, int]] = [(int(p.network_address), p.prefixlen, LOCAL)
                                          for p in me.prefixes]
    for index, peer in enumerate(peers):
        path_mtu = min(underlay_mtu, smap.underlay_mtu_of(peer)) - overhead
        entries.append(PeerEntry(int(peer.public_ip), peer.port or smap.backend.port, path_mtu,
                                 peer.name,
                                 parse_mac(peer.vtep_mac) if peer.vtep_mac else b"",
                                 decode_key(peer.public_key) or b""))
        routes.extend((int(p.network_address), p.prefixlen, index) for p in peer.prefixes)
    own = sorted({int(me.public_ip), *(int(a) for a in host_addresses)})
    tables = ForwardingTables(int(me.address), tuple(entries), tuple(routes), tuple(own))
    return LocalView(me, peers, tables, underlay_mtu - overhead)


def build_switch_tables(view: LocalView, static_macs: Iterable[tuple[str, str]]) -> SwitchTables:
    """The switched path's tables: the view's peers, and the MACs pinned to a port.

    Every node's own VTEP MAC (its tap's MAC) is pinned to that node (LOCAL for this one), so
    no frame from elsewhere can move it. Then the config's (mac, node name) pins, resolved to a
    peer index or LOCAL; a pin naming a node no longer in the map, or a VTEP MAC already pinned
    by the map, is left out (the config check names them; a map reload must not fail over
    them)."""
    index = {node.name: i for i, node in enumerate(view.peers)}
    index[view.node.name] = LOCAL
    pins: dict[bytes, int] = {}
    for node in (view.node, *view.peers):
        if node.vtep_mac:
            pins.setdefault(parse_mac(node.vtep_mac), index[node.name])
    for mac, name in static_macs:
        if name in index:
            pins.setdefault(parse_mac(mac), index[name])
    return SwitchTables(view.tables.peers, tuple(pins.items()))
