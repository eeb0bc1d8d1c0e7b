"""Prometheus metrics: one custom Collector that reads the data plane at scrape time.

Nothing on the packet path touches a Python metric object. The data plane counts in flat C
arrays (per reason, per peer, per batch-size bucket); at each scrape ``read_sample`` copies them
once, on the event-loop thread, into plain data, and ``OverlaydCollector`` turns that copy into
metric families on the HTTP thread. A scrape costs the data plane one function call per array.

Names follow Prometheus conventions: ``overlayd_`` prefix, counters end in ``_total``, units in
the name (``_bytes``, ``_seconds``), one ``_info`` gauge per set of descriptive labels. No
``_created`` series: their values would be the daemon's start time, which
``overlayd_start_time_seconds`` already says once.

| metric | type | labels |
|---|---|---|
| overlayd_build_info | gauge (1) | version, dataplane |
| overlayd_start_time_seconds | gauge | |
| overlayd_healthy, overlayd_ready | gauge (0/1) | |
| overlayd_peer_info | gauge (1) | peer, public_ip, subnet, vtep_mac |
| overlayd_peer_path_mtu_bytes | gauge | peer |
| overlayd_peer_{tx,rx}_{packets,bytes}_total | counter | peer |
| overlayd_peer_rx_dropped_packets_total | counter | peer |
| overlayd_peer_last_rx_timestamp_seconds | gauge | peer |
| overlayd_device_recreations_total | counter | |
| overlayd_{inside,outside}_{packets,bytes}_total | counter | |
| overlayd_forwarded_packets_total, overlayd_delivered_packets_total | counter | |
| overlayd_icmp_errors_sent_total | counter | |
| overlayd_flooded_{copies,frames}_total, overlayd_fdb_full_total, overlayd_fdb_port_full_total | counter | (switched vxlan) |
| overlayd_drops_total | counter | reason (every reason the data plane counts) |
| overlayd_peers, overlayd_routes, overlayd_fdb_entries | gauge | |
| overlayd_batch_size_packets | histogram | direction (inside, outside) |
| overlayd_map_info | gauge (1) | source, location |
| overlayd_map_nodes | gauge | |
| overlayd_map_last_change_timestamp_seconds | gauge | |
| overlayd_map_current | gauge (0/1) | |
| overlayd_map_reloads_total | counter | result (applied, rejected) |
| overlayd_capture_sessions | gauge | |
| overlayd_capture_dropped_packets_total | counter | |
| overlayd_dataplane_thread_packets_total | counter | thread, direction (engine threads) |
| overlayd_dataplane_thread_wakeups_total, overlayd_dataplane_thread_busy_polls_total, overlayd_dataplane_thread_pauses_total | counter | thread |
| overlayd_dataplane_thread_info | gauge (1) | thread, cpus (engine threads: the CPUs it may run on) |
| overlayd_dataplane_steering_info | gauge (1) | requested, mode ([dataplane] steering, and in force) |
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import prometheus_client
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector, CollectorRegistry

from overlayd import __version__
from overlayd.ops import health, state
from overlayd.ops.tables import cpu_list

# Help text and metric name of each traffic counter the data plane keeps (counters.TRAFFIC).
# A counter the data plane adds later without an entry here is still exported, as
# overlayd_<name>_total, so no count is ever invisible.
TRAFFIC_METRICS: dict[str, tuple[str, str]] = {
    "inside_packets": ("overlayd_inside_packets", "Packets read from the overlay device."),
    "inside_bytes": ("overlayd_inside_bytes", "Bytes of packets read from the overlay device."),
    "outside_packets": ("overlayd_outside_packets",
                        "Datagrams received on the tunnel socket."),
    "outside_bytes": ("overlayd_outside_bytes",
                      "Bytes of datagram payloads received on the tunnel socket."),
    "forwarded_packets": ("overlayd_forwarded_packets",
                          "Packets from the device sent to a peer."),
    "delivered_packets": ("overlayd_delivered_packets",
                          "Packets from peers written to the device."),
    "flooded_copies": ("overlayd_flooded_copies",
                       ("Datagrams sent by head-end replication (switched: broadcast, multicast, "
                       "unknown destination).")),
    "flooded_frames": ("overlayd_flooded_frames",
                       "Frames from the tap flooded to every peer (each sent as flooded_copies)."),
    "fdb_full": ("overlayd_fdb_full",
                 "New MACs not learned because the FDB was at its cap (the frame still went)."),
    "fdb_port_full": ("overlayd_fdb_port_full",
                      ("New MACs (or moves) not learned because their port (the tap or one "
                       "peer) held fdb_max_entries_per_port MACs (the frame still went).")),
    "icmp_sent": ("overlayd_icmp_errors_sent",
                  ("ICMP errors (unreachable, time exceeded, fragmentation needed) written to "
                  "the device.")),
    "capture_dropped": ("overlayd_capture_dropped_packets",
                        ("Packets not copied for `overlayd capture` because the data plane's "
                         "capture buffer was full (the packets themselves went on).")),
    "offload_superpackets": ("overlayd_offload_superpackets",
                             "TCP superpackets (TSO) read from the device."),
    "offload_segments": ("overlayd_offload_segments",
                         "Segments cut from TCP superpackets (each also an inside packet)."),
    "offload_gso_sends": ("overlayd_offload_gso_sends",
                          "UDP GSO sends: one sendmsg carrying several datagrams."),
    "offload_gso_refused": ("overlayd_offload_gso_refused",
                            "UDP GSO sends the kernel refused; their datagrams went one by one."),
    "offload_gro_receives": ("overlayd_offload_gro_receives",
                             "UDP GRO receives that carried several datagrams."),
    "offload_coalesced_writes": ("overlayd_offload_coalesced_writes",
                                 "TCP superpackets written to the device (coalesced segments)."),
    "offload_coalesced_segments": ("overlayd_offload_coalesced_segments",
                                   "Segments written inside coalesced superpackets."),
    "offload_checksums_finished": ("overlayd_offload_checksums_finished",
                                   ("Delivered TCP/UDP checksums a kernel VTEP left unfinished "
                                    "(the pseudo-header sum only), finished before the write.")),
    "offload_udp_superpackets": ("overlayd_offload_udp_superpackets",
                                 "UDP superpackets (USO) read from the device."),
    "offload_udp_segments": ("overlayd_offload_udp_segments",
                             "Datagrams cut from UDP superpackets (each also an inside packet)."),
    "offload_udp_coalesced_writes": ("overlayd_offload_udp_coalesced_writes",
                                     ("UDP superpackets written to the device (coalesced "
                                      "datagrams of one flow).")),
    "offload_udp_coalesced_segments": ("overlayd_offload_udp_coalesced_segments",
                                       "Datagrams written inside coalesced UDP superpackets."),
    "wg_handshake_messages": ("overlayd_wireguard_handshake_messages",
                              "WireGuard handshake messages (MAC1 valid) queued for Python."),
    "wg_keepalives_sent": ("overlayd_wireguard_keepalives_sent",
                           "WireGuard keepalives (empty transport messages) sent."),
    "wg_keepalives_received": ("overlayd_wireguard_keepalives_received",
                               "WireGuard keepalives received and authenticated."),
    "wg_staged": ("overlayd_wireguard_staged_packets",
                  "Packets held for a WireGuard peer while its handshake was under way."),
    "wg_staged_sent": ("overlayd_wireguard_staged_sent_packets",
                       "Held packets sealed and sent once the peer's keypair came."),
}

PEER_METRICS = (  # (position in peer_counters() tuples, name, help)
    (0, "overlayd_peer_tx_packets", "Packets sent to the peer."),
    (1, "overlayd_peer_tx_bytes",
     ("Inner bytes sent to the peer (packets or frames as read from the device, without the "
     "encapsulation overlayd writes in front).")),
    (2, "overlayd_peer_rx_packets", "Datagrams received from the peer (before validation)."),
    (3, "overlayd_peer_rx_bytes",
     ("Inner bytes received from the peer (datagrams less the encapsulation header, before "
     "validation).")),
    (4, "overlayd_peer_rx_dropped_packets",
     "Datagrams received from the peer that failed a check (counted in drops_total by reason)."),
)


def read_sample(d: state.DaemonLike, info: state.RuntimeInfo) -> dict[str, Any]:
    """Copy what a scrape needs; call on the event-loop thread (see state.py)."""
    now = time.monotonic()
    traffic, drops = state.counters(d)
    inside, outside = state.batches(d)
    verdict = health.check(d, info, now)
    kind, location, report = state.map_source(d)
    view = d.view
    return {
        "dataplane": d.implementation,
        "started_wall": info.started_wall,
        "healthy": verdict.healthy,
        "ready": verdict.ready,
        "peers": state.peers(d, info),
        "device_recreations": d.device_recreations,
        "traffic": traffic,
        "drops": drops,
        "tables": {"peers": len(view.peers) if view is not None else 0,
                   "routes": state.route_count(d),
                   "fdb_entries": state.fdb_size(d)},
        "batches": {"inside": inside, "outside": outside},
        "offloads": state.offloads(d),
        "engine": state.engine(d),
        "map": {"source": kind, "location": location, "datastore": report,
                "nodes": len(d.smap.nodes), "applied_at": d.map_applied_at,
                "current": d.map_error is None, "applied": info.reloads_applied,
                "rejected": info.reloads_rejected},
        "capture_sessions": info.capture_sessions,
    }


def _histogram_buckets(counts: list[int]) -> list[tuple[str, float]]:
    """Cumulative buckets from the data plane's power-of-two counts (bucket i: n <= 2**i)."""
    out, total = [], 0
    for i, count in enumerate(counts):
        total += count
        out.append((str(float(2 ** i)), float(total)))
    out.append(("+Inf", float(total)))
    return out


class OverlaydCollector(Collector):
    """Builds every overlayd_* family from one sample per scrape."""

    def __init__(self, read: Callable[[], dict[str, Any]]) -> None:
        self._read = read

    def describe(self) -> Iterator[Metric]:
        # Registration must not read the daemon (the loop may not run yet): names only.
        return iter(self._families(None))

    def collect(self) -> Iterator[Metric]:
        return iter(self._families(self._read()))

    def _families(self, s: dict[str, Any] | None) -> list[Metric]:
        fams: list[Metric] = []

        def gauge(name: str, doc: str, value: float | None = None,
                  labels: list[str] | None = None) -> GaugeMetricFamily:
            fam = GaugeMetricFamily(name, doc, labels=labels)
            if value is not None and labels is None:
                fam.add_metric([], value)
            fams.append(fam)
            return fam

        def counter(name: str, doc: str, value: float | None = None,
                    labels: list[str] | None = None) -> CounterMetricFamily:
            fam = CounterMetricFamily(name, doc, labels=labels)
            if value is not None and labels is None:
                fam.add_metric([], value)
            fams.append(fam)
            return fam

        build = gauge("overlayd_build_info", "Version and data-plane implementation (value 1).",
                      labels=["version", "dataplane"])
        gauge("overlayd_start_time_seconds", "Unix time the daemon started.",
              None if s is None else s["started_wall"])
        gauge("overlayd_healthy", "1 when /healthz would answer 200.",
              None if s is None else float(s["healthy"]))
        gauge("overlayd_ready", "1 when /readyz would answer 200.",
              None if s is None else float(s["ready"]))

        info = gauge("overlayd_peer_info",
                     "One series per peer in the map (value 1); vtep_mac empty for udp.",
                     labels=["peer", "public_ip", "subnet", "vtep_mac"])
        last_rx = gauge("overlayd_peer_last_rx_timestamp_seconds",
                        "Unix time a datagram from the peer was last received, to the second "
                        "(absent until one is).", labels=["peer"])
        mtu = gauge("overlayd_peer_path_mtu_bytes",
                    "Largest inner packet that fits the path to the peer.", labels=["peer"])
        per_peer = [(pos, counter(name, doc, labels=["peer"])) for pos, name, doc in PEER_METRICS]

        traffic_names = dict(TRAFFIC_METRICS)
        if s is not None:
            for name in s["traffic"]:
                traffic_names.setdefault(name, (f"overlayd_{name}",
                                                f"Data-plane counter {name}."))
        for key, (name, doc) in traffic_names.items():
            counter(name, doc, None if s is None else s["traffic"].get(key, 0))
        drops = counter("overlayd_drops", "Packets dropped by the data plane, by reason.",
                        labels=["reason"])
        counter("overlayd_device_recreations",
                "Times the device was recreated after it vanished or failed (each is a short "
                "gap in forwarding that a scrape interval may not show as unhealthy).",
                None if s is None else s["device_recreations"])

        gauge("overlayd_peers", "Peers in the forwarding table.",
              None if s is None else s["tables"]["peers"])
        gauge("overlayd_routes",
              "Prefixes in the forwarding table (own and peers'; 0 on the switched path).",
              None if s is None else s["tables"]["routes"])
        gauge("overlayd_fdb_entries", "MAC addresses in the FDB (0 on routed backends).",
              None if s is None else s["tables"]["fdb_entries"])
        hist = HistogramMetricFamily(
            "overlayd_batch_size_packets",
            "Packets per data-plane batch (one device read / one receive wake-up).",
            labels=["direction"])
        fams.append(hist)

        map_info = gauge("overlayd_map_info", "Where the subnet map comes from (value 1).",
                         labels=["source", "location"])
        m = None if s is None else s["map"]
        gauge("overlayd_map_nodes", "Nodes in the subnet map in force.",
              None if m is None else m["nodes"])
        gauge("overlayd_map_last_change_timestamp_seconds",
              "Unix time the map in force was applied.", None if m is None else m["applied_at"])
        gauge("overlayd_map_current",
              "1 when the last map (re)load was applied; 0 while a rejected map is on disk.",
              None if m is None else float(m["current"]))
        reloads = counter("overlayd_map_reloads",
                          "Map reloads after the start (the map loaded at start is not one), "
                          "by outcome; a file content is judged once.", labels=["result"])
        store = self._datastore_families(gauge, counter, None if m is None else m["datastore"])
        gauge("overlayd_capture_sessions", "Running `overlayd capture` sessions.",
              None if s is None else s["capture_sessions"])
        offloads = gauge("overlayd_offload_enabled",
                         "1 for each offload the data plane runs with (udp_gso turns 0 if the "
                         "kernel refuses it).", labels=["offload"])

        thread_packets = counter("overlayd_dataplane_thread_packets",
                                 "Packets read by each native data-plane thread, by direction "
                                 "(engine threads; their sum is the inside/outside packets).",
                                 labels=["thread", "direction"])
        thread_wakeups = counter("overlayd_dataplane_thread_wakeups",
                                 "Wake-ups of each native data-plane thread (epoll returns).",
                                 labels=["thread"])
        thread_pauses = counter("overlayd_dataplane_thread_pauses",
                                "Times each native data-plane thread stopped between two "
                                "batches for a control call (a table swap, a capture, a "
                                "handshake's keypair).", labels=["thread"])
        thread_polls = counter("overlayd_dataplane_thread_busy_polls",
                               "Busy-poll rounds of each native data-plane thread.",
                               labels=["thread"])

        thread_info = gauge("overlayd_dataplane_thread_info",
                            "One series per native data-plane thread, labelled with the CPUs "
                            "it may run on (value 1).", labels=["thread", "cpus"])
        steering = gauge("overlayd_dataplane_steering_info",
                         "[dataplane] steering as configured and as in force (cpu falls back "
                         "to flow when the kernel refuses it; value 1).",
                         labels=["requested", "mode"])

        if s is None:
            return fams
        build.add_metric([__version__, s["dataplane"]], 1)
        steer = s["engine"].get("steering") or {"requested": "flow", "mode": "flow"}
        steering.add_metric([steer["requested"], steer["mode"]], 1)
        for t in s["engine"]["threads"]:
            thread = str(t["thread"])
            thread_packets.add_metric([thread, "inside"], t["inside_packets"])
            thread_packets.add_metric([thread, "outside"], t["outside_packets"])
            thread_wakeups.add_metric([thread], t["wakeups"])
            thread_polls.add_metric([thread], t["busy_polls"])
            thread_pauses.add_metric([thread], t.get("pauses", 0))
            thread_info.add_metric([thread, cpu_list(t.get("cpus") or [])], 1)
        for name, enabled in s["offloads"].items():
            offloads.add_metric([name], float(enabled))
        for peer in s["peers"]:
            info.add_metric([peer["name"], peer["public_ip"], peer["subnet"],
                             peer["vtep_mac"] or ""], 1)
            mtu.add_metric([peer["name"]], peer["path_mtu"])
            if peer["last_rx_at"] is not None:
                last_rx.add_metric([peer["name"]], peer["last_rx_at"])
            values = (peer["tx_packets"], peer["tx_bytes"], peer["rx_packets"], peer["rx_bytes"],
                      peer["rx_dropped"])
            for pos, fam in per_peer:
                fam.add_metric([peer["name"]], values[pos])
        for reason, value in s["drops"].items():
            drops.add_metric([reason], value)
        # Every packet read is in exactly one batch, so a direction's packet counter is the
        # exact sum of its batch sizes.
        for direction in ("inside", "outside"):
            counts = s["batches"][direction]
            if counts:
                hist.add_metric([direction], _histogram_buckets(counts),
                                float(s["traffic"].get(f"{direction}_packets", 0)))
        map_info.add_metric([m["source"], m["location"]], 1)  # type: ignore[index]
        store()
        reloads.add_metric(["applied"], m["applied"])  # type: ignore[index]
        reloads.add_metric(["rejected"], m["rejected"])  # type: ignore[index]
        return fams


    @staticmethod
    def _datastore_families(gauge: Callable[..., GaugeMetricFamily],
                            counter: Callable[..., CounterMetricFamily],
                            r: dict[str, Any] | None) -> Callable[[], None]:
        """The etcd source's families (empty for the file source); returns what fills them."""
        reachable = gauge("overlayd_datastore_reachable",
                          "1 while the map's datastore (etcd) answers.", labels=[])
        age = gauge("overlayd_datastore_last_contact_age_seconds",
                    "Seconds since etcd last answered.", labels=[])
        remaining = gauge("overlayd_lease_remaining_seconds",
                          "Seconds until this node's subnet lease expires unless renewed "
                          "(absent for a reservation).", labels=[])
        lease_held = gauge("overlayd_lease_held", "1 while this node holds its subnet lease.",
                           labels=[])
        counts = {name: counter(f"overlayd_{name}", doc, labels=[]) for name, doc in (
            ("watch_resumes", "Attempts to resume a broken watch from the last seen revision + 1."),
            ("watch_compaction_relists", ("Full re-lists because the watch revision was "
                                         "compacted away.")),
            ("datastore_reconnects", "Failed etcd lists/watches retried after a backoff."),
            ("map_resyncs", "Periodic full list-and-diff runs of the map."),
            ("lease_renewals", "Subnet lease renewals (compare-on-revision)."),
            ("lease_losses", "Times this node's subnet lease was found lost."),
        )}
        skipped = counter("overlayd_map_skipped_keys",
                          "Keys of the map's datastore skipped as invalid, by reason.",
                          labels=["reason"])

        def fill() -> None:
            if not r:
                return
            reachable.add_metric([], float(r["reachable"]))
            if r["last_contact_seconds"] is not None:
                age.add_metric([], r["last_contact_seconds"])
            lease = r.get("lease") or {}
            lease_held.add_metric([], float(bool(lease) and not lease.get("lost")))
            if lease.get("remaining_seconds") is not None:
                remaining.add_metric([], lease["remaining_seconds"])
            w = r["watch"]
            values = {"watch_resumes": w["resumes"], "watch_compaction_relists":
                      w["compaction_relists"], "datastore_reconnects": w["reconnects"],
                      "map_resyncs": w["resyncs"], "lease_renewals": lease.get("renewals", 0),
                      "lease_losses": lease.get("losses", 0)}
            for name, fam in counts.items():
                fam.add_metric([], values[name])
            for reason, n in sorted(r["skipped_keys"].items()):
                skipped.add_metric([reason], n)

        return fill


def build_registry(read: Callable[[], dict[str, Any]]) -> CollectorRegistry:
    """A registry of its own (not the global one): overlayd's collector + process metrics."""
    prometheus_client.disable_created_metrics()
    registry = CollectorRegistry()
    registry.register(OverlaydCollector(read))
    prometheus_client.ProcessCollector(registry=registry)
    prometheus_client.PlatformCollector(registry=registry)
    return registry
