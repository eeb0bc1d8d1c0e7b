"""Names of the data plane's counters, in the order of the C counter array.

The Cython kernel and its pure-Python twin both index one flat array of unsigned 64-bit counters
with these positions; ``counters()`` on a forwarder returns them by name. Adding a reason means
appending here and to cext/counters.pxi in the same order (a parity test checks both agree).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

# Traffic that went through (not drops).
TRAFFIC = (
    "inside_packets",        # read from the device
    "inside_bytes",
    "outside_packets",       # datagrams received on the tunnel socket
    "outside_bytes",
    "forwarded_packets",     # inside -> sent to a peer
    "delivered_packets",     # outside -> written to the device
    "icmp_sent",             # ICMP errors written back into the device
    # switched vxlan
    "flooded_copies",        # datagrams sent by head-end replication (broadcast/multicast/unknown)
    "flooded_frames",        # frames read from the tap that were flooded (one per frame)
    "fdb_full",              # a new MAC not learned: the FDB is at its cap (the frame still went)
    "fdb_port_full",         # a new MAC (or a move) not learned: its port is at its per-port cap
                             # (the frame still went)
)

# Every reason a packet can be dropped. Each is exported as overlayd_drops_total{reason=...}.
DROP_REASONS = (
    # inside: read from the device
    "inside_too_short",          # shorter than an IPv4 header
    "inside_not_ipv4",           # version != 4 (e.g. IPv6 from the kernel)
    "inside_bad_header",         # IHL < 5, header longer than the packet, total length != read length
    "inside_no_route",           # destination in no prefix of the map (answered: net unreachable);
                                 # switched: a flood with no peer to go to
    "inside_local_destination",  # destination in our own subnet (answered: host unreachable);
                                 # switched: destination MAC lives behind our own tap
    "inside_ttl_expired",        # TTL <= 1 (answered: time exceeded)
    "inside_too_big",            # DF set and larger than the path MTU (answered: frag needed)
    "tx_error",                  # sendmmsg refused the datagram (socket buffer full, ENOBUFS, ...)
    # outside: received from the underlay
    "outside_unknown_peer",      # source address is not a peer in the map
    "outside_truncated",         # datagram larger than the receive buffer
    "outside_too_short",
    "outside_not_ipv4",          # also routed vxlan: inner ethertype is not IPv4
    "outside_bad_header",        # IHL < 5 or header longer than the packet
    "outside_length_mismatch",   # IPv4 total length != datagram payload length
    "outside_bad_checksum",      # inner IPv4 header checksum wrong
    "outside_spoofed_source",    # inner source not in a prefix of the sending peer
    "outside_not_for_us",        # inner destination not in our own prefixes; switched: the
                                 # destination MAC lives at a peer (split horizon)
    "device_write_error",        # the device refused the write
    # ICMP errors we would have sent but did not
    "icmp_rate_limited",         # out of tokens (see add_icmp_tokens)
    "icmp_write_error",          # the device refused the ICMP error we wrote
    # vxlan (both modes)
    "inside_runt_frame",         # tap: shorter than an Ethernet header
    "inside_bad_source_mac",     # tap: multicast or all-zero source MAC (never learned)
    "outside_truncated_vxlan",   # shorter than the VXLAN header plus the inner frame's headers
    "outside_bad_vxlan_flags",   # I flag clear
    "outside_wrong_vni",         # a VNI that is not ours
    "outside_wrong_inner_mac",   # routed: inner destination MAC neither ours nor broadcast
    "outside_bad_source_mac",    # switched: multicast or all-zero inner source MAC
    # switched vxlan: hostile sources and storms
    "inside_pinned_mac",         # tap: source MAC pinned to a peer (its VTEP MAC, a static MAC)
    "outside_pinned_mac",        # source MAC pinned elsewhere: our own or another node's VTEP
                                 # MAC, or a static MAC of another node
    "outside_mac_move_dampened",  # source MAC seen behind our tap within mac_move_hold_seconds
    "inside_storm_control",      # a flood (broadcast/multicast/unknown) over the tap's rate
    "outside_storm_control",     # broadcast/multicast/unknown destination over the peer's rate
    # offloads (the device opened with a virtio-net header)
    "inside_bad_offload",        # a virtio-net header the data plane cannot honour: checksum
                                 # offsets outside the packet, a GSO type other than TCPv4, a
                                 # TCPv4 superpacket that is not one, or too many segments
    # martians, routed paths (RFC 1812 5.3.7): 0/8, 127/8, 224/4 (no multicast routing here),
    # 240/4 and 255.255.255.255, as source or destination; never answered with ICMP
    "inside_martian_source",
    "inside_martian_destination",
    "outside_martian_source",
    "outside_martian_destination",
    "outside_local_source",      # inner source is one of this host's own addresses
)

# Capture (``overlayd capture``): neither traffic nor a drop - the packet itself went on.
CAPTURE = (
    "capture_dropped",           # not copied for capture: the capture buffer was full
)

# Offloads (cext/offload.pxi): how much work the kernel's segmentation and coalescing saved.
# Neither traffic nor drops: every segment is also counted as the packet it is.
OFFLOAD = (
    "offload_superpackets",        # TCP superpackets (TSO) read from the device
    "offload_segments",            # segments cut from them (each also in inside_packets)
    "offload_gso_sends",           # UDP GSO sends: one sendmsg carrying several datagrams
    "offload_gso_refused",         # GSO sends the kernel refused; their datagrams went singly
    "offload_gro_receives",        # UDP GRO receives that carried several datagrams
    "offload_coalesced_writes",    # TCP superpackets written to the device (GRO on writes)
    "offload_coalesced_segments",  # segments inside them (each also in delivered_packets)
    "offload_checksums_finished",  # delivered TCP/UDP checksums a kernel VTEP left partial
                                   # (the pseudo-header sum only), finished before the write
    "offload_udp_superpackets",    # UDP superpackets (USO) read from the device
    "offload_udp_segments",        # datagrams cut from them (each also in inside_packets)
    "offload_udp_coalesced_writes",    # UDP superpackets written to the device (USO writes)
    "offload_udp_coalesced_segments",  # datagrams inside them (each also in delivered_packets)
)

# WireGuard (backend type "wireguard"): what went through, then why datagrams were dropped.
WIREGUARD_TRAFFIC = (
    "wg_handshake_messages",       # handshake messages (MAC1 right) queued for the control plane
    "wg_keepalives_sent",          # empty transport messages sent (timers, session confirmation)
    "wg_keepalives_received",      # empty transport messages received and authenticated
    "wg_staged",                   # packets held for a peer while its handshake is under way
    "wg_staged_sent",              # ... that left sealed once a keypair came (tx_error included)
)
WIREGUARD_DROPS = (
    "wg_bad_message",              # not a WireGuard message: unknown type, wrong length, reserved
    "wg_bad_mac1",                 # a handshake message whose MAC1 is not keyed for us
    "wg_handshake_queue_full",     # more handshake messages in one batch than the queue holds
    "wg_unknown_index",            # a transport message for no keypair of ours
    "wg_stale_keypair",            # ... for a keypair past REJECT_AFTER_TIME
    "wg_replay",                   # ... whose counter was seen or is behind the replay window
    "wg_decrypt_failed",           # ... that does not authenticate (forged or corrupted)
    "wg_no_session",               # inside: no keypair for the peer, too big to hold (> 9216 B)
    "wg_staged_overflow",          # inside: the oldest held packet, pushed out by the 129th
    "wg_staged_expired",           # inside: held packets of a handshake that gave up (or a peer
                                   # that left the map)
)
# Every drop reason, exported as overlayd_drops_total{reason=...}.
ALL_DROP_REASONS = DROP_REASONS + WIREGUARD_DROPS

COUNTER_NAMES = TRAFFIC + DROP_REASONS + CAPTURE + OFFLOAD + WIREGUARD_TRAFFIC + WIREGUARD_DROPS
COUNTER_INDEX = {name: i for i, name in enumerate(COUNTER_NAMES)}

# wireguard: wg_no_session is an inside drop, the others outside drops; handshake messages and
# keepalives received are outside packets that end in neither a delivery nor a drop, and a
# keepalive sent is a forwarded datagram that no device read started. A packet held for a
# peer without a session (wg_staged) is in neither until it leaves (forwarded, tx_error: then
# wg_staged_sent too) or is dropped (wg_staged_overflow / wg_staged_expired): the held ones,
# wg_staged - wg_staged_sent - wg_staged_overflow - wg_staged_expired, complete the identity.
WIREGUARD_INSIDE_DROPS = ("wg_no_session", "wg_staged_overflow", "wg_staged_expired")
WIREGUARD_OUTSIDE_DROPS = tuple(r for r in WIREGUARD_DROPS if r not in WIREGUARD_INSIDE_DROPS)
INSIDE_DROPS = (*(r for r in DROP_REASONS if r.startswith("inside_")), *WIREGUARD_INSIDE_DROPS)
OUTSIDE_DROPS = (*(r for r in DROP_REASONS if r.startswith("outside_")),
                 *WIREGUARD_OUTSIDE_DROPS)
OUTSIDE_CONSUMED = ("wg_handshake_messages", "wg_keepalives_received")
ANSWERED_DROPS = ("inside_no_route", "inside_local_destination", "inside_ttl_expired",
                  "inside_too_big")
INSIDE_IDENTITY = ("inside_packets == inside drops + forwarded_packets + tx_error"
                   " - flooded_copies + flooded_frames - wg_keepalives_sent"
                   " + (wg_staged - wg_staged_sent - wg_staged_overflow - wg_staged_expired)")
OUTSIDE_IDENTITY = ("outside_packets == delivered_packets + device_write_error + outside drops"
                    " + wg_handshake_messages + wg_keepalives_received")
ICMP_IDENTITY = ("icmp_sent + icmp_rate_limited + icmp_write_error <= inside_no_route"
                 " + inside_local_destination + inside_ttl_expired + inside_too_big")


def identity_violations(counters: Mapping[str, int],
                        peer_counters: Sequence[Sequence[int]] | None = None) -> list[str]:
    """The counter identities README.md states ("Counter identities"), each that does not
    hold, written out with its values; [] when all hold. ``peer_counters`` (the forwarder's
    (tx_packets, tx_bytes, rx_packets, rx_bytes) per peer) adds the per-peer identities, which
    hold while no peer has left the map (a leaving peer takes its counts with it)."""
    c = {name: int(counters.get(name, 0)) for name in COUNTER_NAMES}
    sent = c["forwarded_packets"] + c["tx_error"]
    # Frames that left: every copy sent or refused, a flood's copies counted as one frame.
    frames_out = sent - c["flooded_copies"] + c["flooded_frames"] - c["wg_keepalives_sent"]
    held = (c["wg_staged"] - c["wg_staged_sent"] - c["wg_staged_overflow"]
            - c["wg_staged_expired"])
    consumed = sum(c[r] for r in OUTSIDE_CONSUMED)
    checks = [
        (INSIDE_IDENTITY, c["inside_packets"], sum(c[r] for r in INSIDE_DROPS) + frames_out + held),
        (OUTSIDE_IDENTITY, c["outside_packets"],
         c["delivered_packets"] + c["device_write_error"] + sum(c[r] for r in OUTSIDE_DROPS)
         + consumed),
    ]
    if peer_counters is not None:
        checks += [
            ("sum of peer tx_packets == forwarded_packets",
             sum(p[0] for p in peer_counters), c["forwarded_packets"]),
            (("sum of peer rx_packets == outside_packets - outside_truncated - unknown_peer"
              " - wireguard's unauthenticated (handshakes and their drops)"),
             sum(p[2] for p in peer_counters),
             c["outside_packets"] - c["outside_truncated"] - c["outside_unknown_peer"]
             - sum(c[r] for r in WIREGUARD_OUTSIDE_DROPS) - c["wg_handshake_messages"]),
        ]
    out = [f"{text}: {left} != {right}" for text, left, right in checks if left != right]
    answered = sum(c[r] for r in ANSWERED_DROPS)
    icmp = c["icmp_sent"] + c["icmp_rate_limited"] + c["icmp_write_error"]
    if icmp > answered:
        out.append(f"{ICMP_IDENTITY}: {icmp} > {answered}")
    return out

# Batch sizes are counted in power-of-two buckets: bucket i counts batches of size n with
# 2**(i-1) < n <= 2**i (bucket 0: n == 1). Empty wake-ups are not counted.
BATCH_BUCKETS = 10   # up to 512 packets per batch
