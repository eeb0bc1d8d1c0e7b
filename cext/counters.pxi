# The forwarder's counter array layout. Must list exactly overlayd/dataplane/counters.py
# COUNTER_NAMES, in the same order (tests/test_forwarder.py checks both): the metrics
# collector reads counters() by name, and the twin indexes the same positions.
# Member names are "CTR_" + the counter name upper-cased; the cpdef enum also exposes them as
# module attributes so the test can check each CTR_<NAME> == COUNTER_NAMES.index(name).

cpdef enum:
    CTR_INSIDE_PACKETS
    CTR_INSIDE_BYTES
    CTR_OUTSIDE_PACKETS
    CTR_OUTSIDE_BYTES
    CTR_FORWARDED_PACKETS
    CTR_DELIVERED_PACKETS
    CTR_ICMP_SENT
    CTR_FLOODED_COPIES
    CTR_FDB_FULL
    CTR_INSIDE_TOO_SHORT
    CTR_INSIDE_NOT_IPV4
    CTR_INSIDE_BAD_HEADER
    CTR_INSIDE_NO_ROUTE
    CTR_INSIDE_LOCAL_DESTINATION
    CTR_INSIDE_TTL_EXPIRED
    CTR_INSIDE_TOO_BIG
    CTR_TX_ERROR
    CTR_OUTSIDE_UNKNOWN_PEER
    CTR_OUTSIDE_TRUNCATED
    CTR_OUTSIDE_TOO_SHORT
    CTR_OUTSIDE_NOT_IPV4
    CTR_OUTSIDE_BAD_HEADER
    CTR_OUTSIDE_LENGTH_MISMATCH
    CTR_OUTSIDE_BAD_CHECKSUM
    CTR_OUTSIDE_SPOOFED_SOURCE
    CTR_OUTSIDE_NOT_FOR_US
    CTR_DEVICE_WRITE_ERROR
    CTR_ICMP_RATE_LIMITED
    CTR_INSIDE_RUNT_FRAME
    CTR_INSIDE_BAD_SOURCE_MAC
    CTR_OUTSIDE_TRUNCATED_VXLAN
    CTR_OUTSIDE_BAD_VXLAN_FLAGS
    CTR_OUTSIDE_WRONG_VNI
    CTR_OUTSIDE_WRONG_INNER_MAC
    CTR_OUTSIDE_BAD_SOURCE_MAC
    CTR_INSIDE_BAD_OFFLOAD
    CTR_CAPTURE_DROPPED
    CTR_OFFLOAD_SUPERPACKETS
    CTR_OFFLOAD_SEGMENTS
    CTR_OFFLOAD_GSO_SENDS
    CTR_OFFLOAD_GSO_REFUSED
    CTR_OFFLOAD_GRO_RECEIVES
    CTR_OFFLOAD_COALESCED_WRITES
    CTR_OFFLOAD_COALESCED_SEGMENTS
    CTR_WG_HANDSHAKE_MESSAGES
    CTR_WG_KEEPALIVES_SENT
    CTR_WG_KEEPALIVES_RECEIVED
    CTR_WG_BAD_MESSAGE
    CTR_WG_BAD_MAC1
    CTR_WG_HANDSHAKE_QUEUE_FULL
    CTR_WG_UNKNOWN_INDEX
    CTR_WG_STALE_KEYPAIR
    CTR_WG_REPLAY
    CTR_WG_DECRYPT_FAILED
    CTR_WG_NO_SESSION
    N_COUNTERS

COUNTER_NAMES = (
    "inside_packets",
    "inside_bytes",
    "outside_packets",
    "outside_bytes",
    "forwarded_packets",
    "delivered_packets",
    "icmp_sent",
    "flooded_copies",
    "fdb_full",
    "inside_too_short",
    "inside_not_ipv4",
    "inside_bad_header",
    "inside_no_route",
    "inside_local_destination",
    "inside_ttl_expired",
    "inside_too_big",
    "tx_error",
    "outside_unknown_peer",
    "outside_truncated",
    "outside_too_short",
    "outside_not_ipv4",
    "outside_bad_header",
    "outside_length_mismatch",
    "outside_bad_checksum",
    "outside_spoofed_source",
    "outside_not_for_us",
    "device_write_error",
    "icmp_rate_limited",
    "inside_runt_frame",
    "inside_bad_source_mac",
    "outside_truncated_vxlan",
    "outside_bad_vxlan_flags",
    "outside_wrong_vni",
    "outside_wrong_inner_mac",
    "outside_bad_source_mac",
    "inside_bad_offload",
    "capture_dropped",
    "offload_superpackets",
    "offload_segments",
    "offload_gso_sends",
    "offload_gso_refused",
    "offload_gro_receives",
    "offload_coalesced_writes",
    "offload_coalesced_segments",
    "wg_handshake_messages",
    "wg_keepalives_sent",
    "wg_keepalives_received",
    "wg_bad_message",
    "wg_bad_mac1",
    "wg_handshake_queue_full",
    "wg_unknown_index",
    "wg_stale_keypair",
    "wg_replay",
    "wg_decrypt_failed",
    "wg_no_session",
)

cdef enum:
    BATCH_BUCKETS_C = 10   # overlayd/dataplane/counters.py BATCH_BUCKETS
