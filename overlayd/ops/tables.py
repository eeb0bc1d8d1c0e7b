"""Readable text for `overlayd status|peers|routes|fdb`: aligned tables and human units.

Pure functions from the control socket's JSON answers (state.py) to text; `--json` prints the
answers themselves. Numbers are right-aligned, everything else left-aligned; no colour, no
terminal width guessing, so the output pastes into tickets and greps well.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    text_rows = [[_cell(v) for v in row] for row in rows]
    widths = [len(h) for h in headers]
    for row in text_rows:
        for i, cell in enumerate(row):
            widths[i] = max(widths[i], len(cell))
    numeric = [bool(rows) and all(_is_number(row[i]) for row in rows)
               for i in range(len(headers))]

    def line(cells: Sequence[str]) -> str:
        parts = [c.rjust(w) if num else c.ljust(w)
                 for c, w, num in zip(cells, widths, numeric, strict=True)]
        return "  ".join(parts).rstrip()

    return "\n".join([line(list(headers)), *(line(r) for r in text_rows)])


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) or (
        isinstance(value, str) and value[:1].isdigit() and value.split()[0].replace(
            ".", "", 1).isdigit())


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    return str(value)


def human_bytes(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{int(value)} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"


def human_count(n: int) -> str:
    if n < 10_000:
        return str(n)
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(n)


def human_duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d{hours}h"
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


def _ago(ts: float, now: float) -> str:
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))
    return f"{stamp} ({human_duration(now - ts)} ago)"


def render_datastore(r: dict[str, Any]) -> list[tuple[str, str]]:
    """The etcd source's lines of `overlayd status`."""
    ago = r["last_contact_seconds"]
    contact = "never" if ago is None else f"{human_duration(ago)} ago"
    reach = "reachable" if r["reachable"] else f"UNREACHABLE ({r['last_error'] or 'no answer'})"
    lines = [("etcd", (f"{reach} at {r['endpoint']}, last contact {contact}, revision "
                      f"{r['revision']}"))]
    lease = r.get("lease")
    if lease:
        left = ("reservation, no TTL" if lease["reservation"] else
                f"{human_duration(lease['remaining_seconds'] or 0)} left")
        state = f"LOST ({lease['lost']})" if lease["lost"] else "held"
        lines.append(("lease", f"{lease['key']} {state}, {left}, {lease['renewals']} renewals"))
    w = r["watch"]
    skipped = sum(r["skipped_keys"].values())
    lines.append(("watch", (f"{w['resumes']} resumes, {w['compaction_relists']} compaction "
                           f"re-lists, {w['reconnects']} reconnects, {w['resyncs']} resyncs; "
                           f"{skipped} bad keys skipped")))
    return lines


def render_engine(e: dict[str, Any]) -> list[tuple[str, str]]:
    """One line for the engine and its steering, one per native thread with its CPUs and its
    share of the packets."""
    steer = e.get("steering") or {"mode": "flow", "reason": None}
    steering = f"steering {steer['mode']}" + (f" ({steer['reason']})" if steer["reason"] else "")
    if e["kind"] != "threads":
        return [("engine", "event loop" + (f", {steering}" if steer["reason"] else ""))]
    threads = e["threads"]
    poll = f", busy-poll {e['busy_poll_us']} us" if e.get("busy_poll_us") else ""
    plural = "s" if len(threads) != 1 else ""
    lines = [("engine", f"{len(threads)} native thread{plural}{poll}, {steering}")]
    for t in threads:
        cpus = t.get("cpus") or []
        lines.append(("", (f"thread {t['thread']} (CPU{'s' if len(cpus) != 1 else ''} "
                           f"{cpu_list(cpus)}): {t['share'] * 100:.0f}% of packets, "
                           f"{human_count(t['inside_packets'])} in, "
                           f"{human_count(t['outside_packets'])} out, "
                           f"{human_count(t['wakeups'])} wake-ups, "
                           f"{human_count(t.get('pauses', 0))} pauses"
                           + ("" if t["device_attached"] else ", device detached"))))
    return lines


def cpu_list(cpus: list[int]) -> str:
    """[0, 1, 2, 5] -> "0-2,5" (the kernel's cpulist format); "-" for none."""
    runs: list[list[int]] = []          # [first, last] of each run of consecutive CPUs
    for cpu in sorted(cpus):
        if runs and cpu == runs[-1][1] + 1:
            runs[-1][1] = cpu
        else:
            runs.append([cpu, cpu])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in runs) or "-"


def render_status(s: dict[str, Any], now: float | None = None) -> str:
    now = time.time() if now is None else now
    node, dev, tun, smap, tab = s["node"], s["device"], s["tunnel"], s["map"], s["tables"]
    traffic, drops, health = s["traffic"], s["drops"], s["health"]
    lines: list[tuple[str, str]] = []
    lines.append(("overlayd", (f"{s['version']}, data plane {s['dataplane']}, pid {s['pid']}, "
                              f"{s['phase']}, up {human_duration(s['uptime_seconds'])}")))
    if health["ready"]:
        lines.append(("health", "healthy, ready"))
    else:
        word = "healthy, not ready" if health["healthy"] else "UNHEALTHY"
        lines.append(("health", f"{word}: " + "; ".join(health["problems"])))
    if node is not None:
        vtep = ""
        if node.get("vtep_mac"):
            how = "derived" if node.get("vtep_mac_derived") else "from the map"
            vtep = f", VTEP MAC {node['vtep_mac']} ({how})"
        lines.append(("node", (f"{node['name']}: subnet {node['subnet']}, address "
                              f"{node['address']}, public IP {node['public_ip']}{vtep}")))
    mtu = f", mtu {dev['mtu']}" if dev["mtu"] is not None else ""
    again = dev.get("recreations", 0)
    recreated = f", recreated {again} time{'s' if again != 1 else ''}" if again else ""
    condition = "up" if dev["ok"] else "BEING RECREATED"
    lines.append(("device", f"{dev['name']}{mtu}, {condition}{recreated}"))
    backend = (f"vxlan {tun['mode']} backend, VNI {tun.get('vni')}" if tun["backend"] == "vxlan"
               else f"{tun['backend']} backend")
    lines.append(("tunnel", f"{backend}, udp {tun['bind']}:{tun['port']}"))
    lines.extend(render_engine(s.get("engine") or {"kind": "loop", "threads": []}))
    map_line = (f"{smap['source']} {smap['location']}: network {smap['network']}, "
                f"{smap['nodes']} nodes, applied {_ago(smap['applied_at'], now)}")
    lines.append(("map", map_line))
    if smap.get("datastore"):
        lines.extend(render_datastore(smap["datastore"]))
    if smap["error"]:
        first = smap["error"].strip().splitlines()[0]
        lines.append(("", f"RELOAD REJECTED, forwarding on the previous map: {first}"))
    lines.append(("tables", (f"{tab['peers']} peers, {tab['routes']} routes, "
                            f"{tab['fdb_entries']} fdb entries")))
    if tun["backend"] == "vxlan" and tun.get("mode") == "switched":
        lines.append(("switch", render_switch(traffic, drops)))
    lines.append(("inside", (f"{human_count(traffic.get('inside_packets', 0))} packets "
                            f"({human_bytes(traffic.get('inside_bytes', 0))}) read, "
                            f"{human_count(traffic.get('forwarded_packets', 0))} forwarded")))
    lines.append(("outside", (f"{human_count(traffic.get('outside_packets', 0))} datagrams "
                             f"({human_bytes(traffic.get('outside_bytes', 0))}) received, "
                             f"{human_count(traffic.get('delivered_packets', 0))} delivered")))
    total = sum(drops.values())
    nonzero = sorted(((n, r) for r, n in drops.items() if n), reverse=True)
    detail = ", ".join(f"{r} {human_count(n)}" for n, r in nonzero[:6])
    more = f", {len(nonzero) - 6} more reasons" if len(nonzero) > 6 else ""
    lines.append(("drops", f"{human_count(total)}" + (f" ({detail}{more})" if detail else "")))
    lines.append(("icmp", f"{human_count(traffic.get('icmp_sent', 0))} errors sent"))
    lines.append(("offloads", render_offloads(s.get("offloads", {}), traffic)))
    lines.append(("metrics", f"{s['metrics']}/metrics" if s["metrics"] else "disabled"))
    cap = s["capture"]
    lines.append(("capture", ("not supported by this data plane" if not cap["supported"]
                              else f"{cap['sessions']} running")))
    sd = s["systemd"]
    if sd["notify"]:
        wd = f", watchdog {sd['watchdog_seconds']:g} s" if sd["watchdog_seconds"] else ""
        lines.append(("systemd", f"notify{wd}"))
    width = max(len(k) for k, _ in lines)
    return "\n".join(f"{k.ljust(width)}  {v}".rstrip() for k, v in lines)


def render_switch(traffic: dict[str, int], drops: dict[str, int]) -> str:
    """The switched path's protections at a glance (each also a counter and a drop reason)."""
    def n(key: str) -> str:
        return human_count(traffic.get(key, drops.get(key, 0)))
    pinned = drops.get("inside_pinned_mac", 0) + drops.get("outside_pinned_mac", 0)
    storm = drops.get("inside_storm_control", 0) + drops.get("outside_storm_control", 0)
    return (f"{n('flooded_copies')} flooded copies; MACs not learned: {n('fdb_full')} table "
            f"full, {n('fdb_port_full')} port full; refused: {human_count(pinned)} pinned, "
            f"{n('outside_mac_move_dampened')} move dampened; {human_count(storm)} storm "
            f"controlled")


def render_offloads(offloads: dict[str, bool], traffic: dict[str, int]) -> str:
    """Which offloads run and how much they merged, e.g. "tso+gso+gro; 1.2k superpackets ..."."""
    on = [name for key, name in (("vnet_hdr", "tso/csum+coalescing"), ("udp_gso", "udp-gso"),
                                 ("udp_gro", "udp-gro"), ("device_uso", "uso"))
          if offloads.get(key)]
    # Checksums a kernel VTEP left unfinished are finished with offloads on or off.
    finished = traffic.get("offload_checksums_finished", 0)
    peer_csum = f", {human_count(finished)} peer checksums finished" if finished else ""
    if not on:
        return "off" + (f";{peer_csum[1:]}" if peer_csum else "")
    return (f"{' '.join(on)}; {human_count(traffic.get('offload_superpackets', 0))} "
            f"superpackets cut, {human_count(traffic.get('offload_gso_sends', 0))} GSO sends, "
            f"{human_count(traffic.get('offload_gro_receives', 0))} GRO receives, "
            f"{human_count(traffic.get('offload_coalesced_writes', 0))} coalesced writes"
            f"{uso_part(offloads, traffic)}{peer_csum}")


def uso_part(offloads: dict[str, bool], traffic: dict[str, int]) -> str:
    """", 3.1k UDP superpackets written, 0 cut" while the device does USO, else nothing."""
    if not offloads.get("device_uso"):
        return ""
    return (f", {human_count(traffic.get('offload_udp_coalesced_writes', 0))} UDP superpackets "
            f"written, {human_count(traffic.get('offload_udp_superpackets', 0))} cut")


def render_peers(peers: list[dict[str, Any]]) -> str:
    if not peers:
        return "no peers"
    vxlan = any(p.get("vtep_mac") for p in peers)
    rows = []
    for p in peers:
        ago = p.get("last_rx_seconds_ago")
        row = [p["name"], f"{p['public_ip']}:{p['port']}",
               ",".join([p["subnet"], *p["routes"]]), p["path_mtu"],
               p["tx_packets"], human_bytes(p["tx_bytes"]),
               p["rx_packets"], human_bytes(p["rx_bytes"]), p.get("rx_dropped", 0),
               "never" if ago is None else f"{human_duration(ago)} ago"]
        if vxlan:
            row.append(p["vtep_mac"] + ("" if p.get("vtep_mac_derived") else " (map)"))
        rows.append(row)
    headers = ["PEER", "ENDPOINT", "PREFIXES", "PATH MTU", "TX PKTS", "TX", "RX PKTS", "RX",
               "RX DROP", "LAST RX"]
    return table(headers + (["VTEP MAC"] if vxlan else []), rows)


def render_routes(routes: list[dict[str, Any]]) -> str:
    if not routes:
        return "no routes: a switched backend forwards by MAC address (see `overlayd fdb`)"
    rows = [[r["prefix"], "local" if r["kind"] == "local" else (r["peer"] or "?"), r["via"]]
            for r in routes]
    return table(["PREFIX", "TARGET", "VIA"], rows)


def render_fdb(fdb: dict[str, Any]) -> str:
    if not fdb["supported"]:
        return f"no FDB: {fdb['reason']}"
    if not fdb["entries"]:
        return f"FDB ({fdb['backend']}): empty"
    rows = [[e["mac"], "local" if e["kind"] == "local" else (e["peer"] or "?"),
             "static" if e.get("static") else "learned",
             f"{e['age_seconds']:.0f} s" if "age_seconds" in e else None]
            for e in fdb["entries"]]
    return table(["MAC", "TARGET", "TYPE", "AGE"], rows)
