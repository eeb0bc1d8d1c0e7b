"""Names of the data plane's counters, in the order of the C counter array.

The Cython kernel and its pure-Python twin both index one flat array of unsigned 64-bit counters
with these positions; ``counters()`` on a forwarder returns them by name. Adding a reason means
appending here and to cext/counters.pxi in the same order (a parity test checks both agree).
"""

from __future__ import annotations

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
)

# WireGuard (backend type "wireguard"): what went through, then why datagrams were dropped.
WIREGUARD_TRAFFIC = (
    "wg_handshake_messages",       # handshake messages (MAC1 right) queued for the control plane
    "wg_keepalives_sent",          # empty transport messages sent (timers, session confirmation)
    "wg_keepalives_received",      # empty transport messages received and authenticated
)
WIREGUARD_DROPS = (
    "wg_bad_message",              # not a WireGuard message: unknown type, wrong length, reserved
    "wg_bad_mac1",                 # a handshake message whose MAC1 is not keyed for us
    "wg_handshake_queue_full",     # more handshake messages in one batch than the queue holds
    "wg_unknown_index",            # a transport message for no keypair of ours
    "wg_stale_keypair",            # ... for a keypair past REJECT_AFTER_TIME
    "wg_replay",                   # ... whose counter was seen or is behind the replay window
    "wg_decrypt_failed",           # ... that does not authenticate (forged or corrupted)
    "wg_no_session",               # inside: no usable keypair for the peer yet (handshake asked)
)
# Every drop reason, exported as overlayd_drops_total{reason=...}.
ALL_DROP_REASONS = DROP_REASONS + WIREGUARD_DROPS

COUNTER_NAMES = TRAFFIC + DROP_REASONS + CAPTURE + OFFLOAD + WIREGUARD_TRAFFIC + WIREGUARD_DROPS
COUNTER_INDEX = {name: i for i, name in enumerate(COUNTER_NAMES)}

# Batch sizes are counted in power-of-two buckets: bucket i counts batches of size n with
# 2**(i-1) < n <= 2**i (bucket 0: n == 1). Empty wake-ups are not counted.
BATCH_BUCKETS = 10   # up to 512 packets per batch
