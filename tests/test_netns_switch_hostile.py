"""Switched vxlan under attack, in namespaces: a VM behind a tap and a misbehaving member of the
map try to take MACs, fill the FDB and flood the overlay.

Three overlayd hosts (vxlan switched, VNI 42); host1 has a VM (vm1) behind its bridge. Frames
are hand-made: AF_PACKET on a host's tap (what a VM behind it can send) and UDP datagrams from
a host's namespace with its underlay address (what a member of the map, or anyone forging its
address, can send). Each test checks the traffic a broken implementation would lose, and the
counter that says why. The lab's limits are small so that they are quick to reach:
storm control at STORM frames per second (burst STORM), PORT_CAP learned MACs per port, a hold
of HOLD seconds on moves of local MACs. Tests share one lab and run in file order.
"""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest
from netns_helpers import VXLAN_MARKS, close_leaving_nothing, logs, read_drop_counters

from overlayd.lab import HostSpec, Lab, LabHost, list_netns, netns

pytestmark = VXLAN_MARKS

VNI = 42
STORM = 200
PORT_CAP = 64
HOLD = 3.0
SWITCH = {"storm_rate_per_second": STORM, "storm_burst": STORM,
          "fdb_max_entries_per_port": PORT_CAP, "mac_move_hold_seconds": HOLD}
VM1 = ("10.77.1.11", "02:56:4d:00:01:0a")
EXPERIMENTAL = 0x88B5       # IEEE local experimental ethertype: no stack answers it

# Run inside a namespace: frames (hex lines on stdin) out of an interface, or VXLAN datagrams
# from an address. Prints one JSON line: how many were sent and how long it took.
SENDER = r"""
import json, socket, sys, time
mode, a, b = sys.argv[1], sys.argv[2], sys.argv[3]
items = [bytes.fromhex(line) for line in sys.stdin.read().split()]
start = time.monotonic()
if mode == "frames":
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
    s.bind((a, 0))
    for f in items:
        s.send(f)
else:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((a, 0))
    host, port = b.rsplit(":", 1)
    for d in items:
        s.sendto(d, (host, int(port)))
print(json.dumps({"sent": len(items), "seconds": time.monotonic() - start}))
"""


def mac_bytes(text: str) -> bytes:
    return bytes.fromhex(text.replace(":", ""))


def frame(dst: bytes, src: bytes, payload: bytes = b"ovd-hostile",
          ethertype: int = EXPERIMENTAL) -> bytes:
    return dst + src + struct.pack("!H", ethertype) + payload


def vxlan(inner: bytes) -> bytes:
    return struct.pack("!BBHI", 0x08, 0, 0, VNI << 8) + inner


BCAST = b"\xff" * 6


def send_frames(lab: Lab, host: str, frames: list[bytes]) -> float:
    """Transmit frames on a host's tap, as a VM behind it would; the seconds it took."""
    return _send(lab.host(host), ["frames", lab.device, "-"], frames)


def send_datagrams(lab: Lab, sender: str, to: str, datagrams: list[bytes]) -> float:
    """VXLAN datagrams from ``sender``'s underlay address to ``to``'s daemon (bypassing the
    sender's own daemon: a member of the map that misbehaves, or its forged address)."""
    s, t = lab.host(sender), lab.host(to)
    return _send(s, ["vxlan", s.underlay_ip, f"{t.underlay_ip}:{lab.port}"], datagrams)


def _send(host: LabHost, args: list[str], items: list[bytes]) -> float:
    out = netns.ns_run(host.netns, [sys.executable, "-c", SENDER, *args], timeout=30,
                       input="\n".join(i.hex() for i in items).encode()).stdout
    result = json.loads(out.strip().splitlines()[-1])
    assert result["sent"] == len(items)
    return float(result["seconds"])


def fdb(lab: Lab, host: str) -> dict[str, tuple[str | None, bool]]:
    """MAC -> (peer name or "local", static) of a daemon's table."""
    table = lab.control(host, "fdb")
    return {e["mac"]: (e["peer"] if e["kind"] == "peer" else "local", e["static"])
            for e in table["entries"]}


def traffic(lab: Lab, host: str) -> dict[str, int]:
    return {k: int(v) for k, v in lab.control(host, "status")["traffic"].items()}


@pytest.fixture(scope="module")
def namespaces_before() -> set[str]:
    return set(list_netns())


@pytest.fixture(scope="module")
def lab(namespaces_before: set[str]) -> Iterator[Lab]:
    specs = [HostSpec(vm_bridge=True, config_extra={"switch": dict(SWITCH)}) for _ in range(3)]
    with Lab(specs, backend="vxlan", backend_extra={"mode": "switched", "vni": VNI}) as lab:
        lab.wait_mesh(timeout_s=20.0)
        lab.add_vm("host1", "vm1", *VM1)
        yield lab


def node_mac(lab: Lab, host: str) -> str:
    mac = lab.host(host).vtep_mac
    assert mac
    return mac


def test_every_node_mac_is_pinned(lab: Lab) -> None:
    table = fdb(lab, "host1")
    assert table[node_mac(lab, "host1")] == ("local", True)
    assert table[node_mac(lab, "host2")] == ("host2", True)
    assert table[node_mac(lab, "host3")] == ("host3", True)


def test_a_vm_cannot_take_another_node_mac(lab: Lab) -> None:
    """One broadcast from behind host1's tap with host2's MAC as its source: unprotected, host1
    (and host3, which the flood reaches) would send host2's traffic into host1's tap."""
    before = read_drop_counters(lab, "host1")["inside_pinned_mac"]
    send_frames(lab, "host1", [frame(BCAST, mac_bytes(node_mac(lab, "host2")))])
    for a in ("host1", "host3"):
        result = lab.ping(a, "host2", count=1, wait_s=1.0)
        assert result.ok, f"{a} -> host2: {result.output}\n{logs(lab)}"
        assert fdb(lab, a)[node_mac(lab, "host2")] == ("host2", True)
    assert read_drop_counters(lab, "host1")["inside_pinned_mac"] == before + 1


def test_a_member_cannot_take_a_node_mac_from_the_underlay(lab: Lab) -> None:
    """host3 (or anyone with its address) claims host2's and host1's own MAC toward host1."""
    before = read_drop_counters(lab, "host1")["outside_pinned_mac"]
    send_datagrams(lab, "host3", "host1", [
        vxlan(frame(BCAST, mac_bytes(node_mac(lab, "host2")))),
        vxlan(frame(BCAST, mac_bytes(node_mac(lab, "host1"))))])
    result = lab.ping("host1", "host2", count=1, wait_s=1.0)
    assert result.ok, f"{result.output}\n{logs(lab)}"
    table = fdb(lab, "host1")
    assert table[node_mac(lab, "host2")] == ("host2", True)
    assert table[node_mac(lab, "host1")] == ("local", True)
    assert read_drop_counters(lab, "host1")["outside_pinned_mac"] == before + 2


def test_a_live_local_mac_does_not_move_on_one_forged_frame(lab: Lab) -> None:
    """vm1 has just spoken behind host1's tap; host3 claims vm1's MAC toward host1. Unprotected,
    host1 would move vm1 to host3 and drop host2's traffic to vm1 as split horizon."""
    assert lab.ping("vm1", "host2", count=1, wait_s=1.0).ok       # vm1 is live on host1
    before = read_drop_counters(lab, "host1")["outside_mac_move_dampened"]
    send_datagrams(lab, "host3", "host1", [vxlan(frame(BCAST, mac_bytes(VM1[1])))])
    result = lab.ping("host2", "vm1", count=1, wait_s=1.0)
    assert result.ok, f"{result.output}\n{logs(lab)}"
    assert fdb(lab, "host1")[VM1[1]] == ("local", False)
    assert read_drop_counters(lab, "host1")["outside_mac_move_dampened"] == before + 1


def test_one_port_cannot_fill_the_table(lab: Lab) -> None:
    """300 new source MACs from behind host1's tap: host1 learns PORT_CAP of them at its tap,
    host2 PORT_CAP at host1; the rest are counted, and the other ports still learn."""
    time.sleep(1.0)                                    # storm buckets full again
    full = {h: traffic(lab, h)["fdb_port_full"] for h in ("host1", "host2")}
    sprayed = [f"02:ee:00:00:{k >> 8:02x}:{k & 0xFF:02x}" for k in range(300)]
    send_frames(lab, "host1", [frame(BCAST, mac_bytes(m), b"spray") for m in sprayed])
    time.sleep(0.3)
    for host, port in (("host1", "local"), ("host2", "host1")):
        learned = [m for m, (where, static) in fdb(lab, host).items()
                   if where == port and not static]
        assert len(learned) == PORT_CAP, (host, len(learned))
        assert traffic(lab, host)["fdb_port_full"] > full[host]
    assert lab.ping("host3", "host2", count=1, wait_s=1.0).ok      # other ports unaffected
    assert len([m for m in sprayed if m in fdb(lab, "host2")]) <= PORT_CAP


def test_storm_control_caps_floods_per_source(lab: Lab) -> None:
    """3000 broadcasts from behind host1's tap, and 3000 from host3 toward host1: each port's
    floods are cut to STORM a second (plus the burst); the excess is counted."""
    time.sleep(1.0)                                    # storm buckets full again
    burst = [frame(BCAST, mac_bytes(node_mac(lab, "host1")), b"storm%d" % k)
             for k in range(3000)]
    inside_before = read_drop_counters(lab, "host1")["inside_storm_control"]
    read_before = traffic(lab, "host1")["inside_packets"]
    got_before = traffic(lab, "host2")["delivered_packets"]
    seconds = send_frames(lab, "host1", burst)
    time.sleep(0.3)
    got = traffic(lab, "host2")["delivered_packets"] - got_before
    # The tap's queue may drop some of the burst before the daemon reads it: count what it read.
    read = traffic(lab, "host1")["inside_packets"] - read_before
    allowed = STORM + STORM * (seconds + 0.3) + 20     # burst, refill, a little other traffic
    assert read > 2 * allowed and 100 <= got <= allowed, (read, got, allowed, seconds)
    assert read_drop_counters(lab, "host1")["inside_storm_control"] - inside_before >= \
        read - allowed
    time.sleep(1.0)
    outside_before = read_drop_counters(lab, "host1")["outside_storm_control"]
    delivered_before = traffic(lab, "host1")["delivered_packets"]
    seconds = send_datagrams(lab, "host3", "host1", [
        vxlan(frame(BCAST, mac_bytes(node_mac(lab, "host3")), b"storm%d" % k))
        for k in range(3000)])
    time.sleep(0.3)
    delivered = traffic(lab, "host1")["delivered_packets"] - delivered_before
    allowed = STORM + STORM * (seconds + 0.3) + 20
    assert 100 <= delivered <= allowed, (delivered, allowed, seconds)
    assert read_drop_counters(lab, "host1")["outside_storm_control"] - outside_before >= \
        3000 - allowed
    assert lab.ping("host2", "host1", count=1, wait_s=1.0).ok      # unicast is never limited


def test_status_says_what_was_refused(lab: Lab) -> None:
    out = subprocess.run([sys.executable, "-m", "overlayd", "status", "--socket",
                          str(lab.host("host1").control_socket)], capture_output=True, text=True,
                         timeout=30, check=True).stdout
    line = next(ln for ln in out.splitlines() if ln.startswith("switch"))
    drops = read_drop_counters(lab, "host1")
    pinned = drops["inside_pinned_mac"] + drops["outside_pinned_mac"]
    assert f"refused: {pinned} pinned, {drops['outside_mac_move_dampened']} move dampened" \
        in line, line
    assert "port full" in line and "storm controlled" in line, line


def test_nothing_left_behind(lab: Lab, namespaces_before: set[str]) -> None:
    close_leaving_nothing(lab, namespaces_before)
