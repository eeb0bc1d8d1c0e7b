"""What the control plane hands to the data plane: immutable forwarding tables.

The control plane builds a new ForwardingTables on the side whenever the subnet map changes and
the runtime swaps it into the forwarder in one call (``set_tables``); the data plane never sees a
half-applied map. Addresses are IPv4 as unsigned 32-bit integers in host byte order.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# Route targets other than a peer index (peer indices are >= 0).
LOCAL = -1      # the prefix is ours: deliver to the device (outside) / answer host-unreachable
                # (inside); switched: the MAC lives behind our own tap
NO_ROUTE = -2   # what a lookup returns when no prefix matches


@dataclass(frozen=True, slots=True)
class PeerEntry:
    """One remote daemon, as the packet path needs it."""

    ip: int            # underlay IPv4 of the peer (where its datagrams come from and go to)
    port: int          # its UDP port
    path_mtu: int      # the largest inner IPv4 packet that fits the path to it (bytes)
    name: str = ""     # for humans and metrics only; never read by the packet path
    mac: bytes = b""   # vxlan: the peer's VTEP MAC (6 bytes), the inner destination MAC of the
                       # routed path; b"" where unused (udp, switched)
    public_key: bytes = b""  # wireguard: the peer's static X25519 public key (32 bytes)


@dataclass(frozen=True, slots=True)
class ForwardingTables:
    """Everything the routed packet path needs, in one immutable value."""

    local_address: int                                   # our overlay address: source of ICMP errors
    peers: tuple[PeerEntry, ...] = ()
    # (network, prefix_len, target): target is a peer index, or LOCAL for our own prefixes.
    routes: tuple[tuple[int, int, int], ...] = field(default_factory=tuple)
    # This host's own IPv4 addresses (underlay and any other it has): never a valid inner
    # source from a peer. The device has accept_local=1 (our ICMP errors come from our overlay
    # address), so without this a peer owning a broad prefix could reach local services with
    # one of them as source (counted as outside_local_source).
    host_addresses: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True)
class SwitchTables:
    """What the switched (L2) path needs from the map: its peers and the MACs pinned by config.

    Learned MACs are the data plane's own state; a swap keeps them, following each peer by
    (ip, port) to its new index, and forgets those whose peer left the map.
    """

    peers: tuple[PeerEntry, ...] = ()
    # (mac (6 bytes), target): target is a peer index, or LOCAL for a MAC behind our tap.
    # Static entries never age, and learning never moves them.
    static_macs: tuple[tuple[bytes, int], ...] = ()
