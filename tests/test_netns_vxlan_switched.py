"""Switched vxlan in namespaces: one L2 overlay of two overlayd hosts and a plain kernel VTEP.

host1 and host2 run `overlayd run` (backend vxlan, switched: a tap, VNI 42, port 4789); host3
runs no overlayd but a kernel ``vx0`` with an all-zeros flood entry toward each overlayd host.
Behind a Linux bridge, host1 has two "VMs" (vm1a, vm1b) and host2 one (vm2a). Every host pair
resolves ARP, pings and moves a TCP stream; the VMs talk across hosts; the learned tables put
each MAC at the right peer; a VM moved to another host is reachable within a second of its
first frame there; a capture of the underlay is decoded by scapy. Tests share one lab and run
in file order; the last two stop the daemons and prove nothing is left behind.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from itertools import permutations

import pytest
from netns_helpers import (
    VXLAN_MARKS,
    close_leaving_nothing,
    logs,
    outside_drops,
    stop_cleanly,
    vxlan_datagrams,
)

from overlayd.lab import HostSpec, Lab, list_netns

pytestmark = VXLAN_MARKS

NAMES = ("host1", "host2", "host3")
PAIRS = list(permutations(NAMES, 2))
IDS = [f"{a}-{b}" for a, b in PAIRS]
VNI = 42
PORT = 4789
VMS = {  # name: (host, address, MAC)
    "vm1a": ("host1", "10.77.1.11", "02:56:4d:00:01:0a"),
    "vm1b": ("host1", "10.77.1.12", "02:56:4d:00:01:0b"),
    "vm2a": ("host2", "10.77.2.11", "02:56:4d:00:02:0a"),
}


@pytest.fixture(scope="module")
def namespaces_before() -> set[str]:
    return set(list_netns())


@pytest.fixture(scope="module")
def lab(namespaces_before: set[str]) -> Iterator[Lab]:
    # host1 and host2 carry VMs: their taps are ports of a bridge (`[device] bridge`)
    specs = [HostSpec(vm_bridge=True), HostSpec(vm_bridge=True), HostSpec(kernel_vxlan=True)]
    with Lab(specs, backend="vxlan", backend_extra={"mode": "switched", "vni": VNI}) as lab:
        lab.wait_mesh(timeout_s=20.0)
        for name, (host, address, mac) in VMS.items():
            lab.add_vm(host, name, address, mac)
        yield lab


def fdb(lab: Lab, host: str) -> dict[str, str | None]:
    """MAC -> peer name ("local" for behind our tap) of a daemon's learned table."""
    table = lab.control(host, "fdb")
    assert table["supported"], table
    return {e["mac"]: (e["peer"] if e["kind"] == "peer" else "local") for e in table["entries"]}


def test_devices(lab: Lab) -> None:
    """overlayd: a tap with the node's VTEP MAC, MTU = underlay - 50 and the address with the
    network's prefix length (one L2 segment); on the VM hosts the address moved to brvm."""
    info = lab.device_info("host2")
    assert info is not None and info["mtu"] == 1450 and info["address"] == \
        lab.host("host2").vtep_mac
    bridge = lab.exec("host2", ["ip", "-4", "-br", "addr", "show", "brvm"]).stdout
    assert "10.77.2.0/16" in bridge and info.get("master") == "brvm"
    # the bridge keeps the node's VTEP MAC whatever its ports' MACs (test_ping_and_arp needs it:
    # a VM port with a lower random MAC would otherwise lend the bridge its own)
    link = lab.exec("host2", ["ip", "-br", "link", "show", "brvm"]).stdout
    assert lab.host("host2").vtep_mac in link, link
    kernel = lab.exec("host3", ["ip", "-d", "link", "show", "vx0"]).stdout
    assert f"vxlan id {VNI} " in kernel and f"dstport {PORT}" in kernel


@pytest.mark.parametrize(("a", "b"), PAIRS, ids=IDS)
def test_ping_and_arp(lab: Lab, a: str, b: str) -> None:
    result = lab.ping(a, b, count=3, interval_s=0.05)
    assert result.received == 3, f"{result.output}\n{logs(lab)}"
    dst = lab.host(b)
    neigh = lab.exec(a, ["ip", "-4", "neigh", "show", dst.overlay_ip or ""]).stdout
    assert dst.vtep_mac in neigh, neigh           # ARP resolved across the overlay


@pytest.mark.parametrize(("a", "b"), PAIRS, ids=IDS)
def test_tcp(lab: Lab, a: str, b: str) -> None:
    result = lab.tcp_transfer(a, b, 4_000_000, timeout_s=30.0)
    assert result.bytes_ok and result.sha256_ok, f"{result}\n{logs(lab)}"


@pytest.mark.parametrize(("a", "b"), [("vm1a", "vm2a"), ("vm2a", "vm1b"), ("vm1b", "host3"),
                                      ("host3", "vm2a"), ("vm1a", "vm1b")])
def test_vms_behind_bridges(lab: Lab, a: str, b: str) -> None:
    result = lab.ping(a, b, count=2, interval_s=0.05)
    assert result.received == 2, f"{result.output}\n{logs(lab)}"


def test_tcp_between_vms(lab: Lab) -> None:
    result = lab.tcp_transfer("vm1a", "vm2a", 4_000_000, timeout_s=30.0)
    assert result.bytes_ok and result.sha256_ok, f"{result}\n{logs(lab)}"


def test_learned_tables(lab: Lab) -> None:
    """Several MACs behind host1's tap are local there and at host1 on host2."""
    mac = {name: m for name, (_, _, m) in VMS.items()}
    host1, host2 = fdb(lab, "host1"), fdb(lab, "host2")
    assert host1[mac["vm1a"]] == host1[mac["vm1b"]] == "local", host1
    assert host1[mac["vm2a"]] == "host2" and host1[lab.host("host3").vtep_mac or ""] == "host3"
    assert host2[mac["vm1a"]] == host2[mac["vm1b"]] == "host1", host2
    assert host2[mac["vm2a"]] == "local"
    kernel = {e["mac"]: e.get("dst") for e in lab.kernel_fdb("host3")}
    assert kernel.get(mac["vm1a"]) == lab.host("host1").underlay_ip, kernel


def test_moved_mac_reachable_within_a_second(lab: Lab) -> None:
    """A MAC that leaves host1's tap moves to its new host at once if it has been quiet on
    host1 for mac_move_hold_seconds (1 s by default), else when that hold is over: reachable
    within a second of its first frame there either way (a migrating VM is paused before it
    resumes elsewhere, so its last frame here comes first)."""
    vm1b_mac = VMS["vm1b"][2]
    lab.move_vm("vm1b", "host2")
    lab.announce("vm1b")                        # its first frame on host2
    start = time.monotonic()
    result = lab.ping("vm1a", "vm1b", count=1, wait_s=0.3)
    while not result.ok and time.monotonic() - start < 1.2:
        result = lab.ping("vm1a", "vm1b", count=1, wait_s=0.3)
    elapsed = time.monotonic() - start
    assert result.ok and elapsed < 1.5, f"{elapsed:.2f}s {result.output}\n{logs(lab)}"
    assert fdb(lab, "host1")[vm1b_mac] == "host2"
    assert fdb(lab, "host2")[vm1b_mac] == "local"
    assert lab.ping("host3", "vm1b", count=1, wait_s=1.0).ok


def test_capture_is_well_formed_vxlan(lab: Lab) -> None:
    host1, host3 = lab.host("host1"), lab.host("host3")
    with lab.capture(host1, "ul0", f"udp port {PORT}", count=8) as pcap:
        assert lab.ping(host1, host3, count=4, interval_s=0.05).received == 4
    got = vxlan_datagrams(pcap, PORT)
    assert len(got) >= 8, [p.summary() for p in got]
    for p in got:
        assert p["VXLAN"].flags == 0x08 and p["VXLAN"].vni == VNI, p.show(dump=True)
        assert bytes(p["VXLAN"])[1:4] == b"\0\0\0" and bytes(p["VXLAN"])[7] == 0
    ours = [p for p in got if p["IP"].src == host1.underlay_ip]
    assert ours and all(p["VXLAN"].payload.src == host1.vtep_mac for p in ours)
    assert all(p["UDP"].sport != PORT for p in ours)               # from the tx pool


def test_nothing_from_the_kernel_was_dropped(lab: Lab) -> None:
    for name in ("host1", "host2"):
        # outside_not_for_us is the switch working (split horizon), not a fault.
        drops = outside_drops(lab, name)
        drops.pop("outside_not_for_us", None)
        # host1: the moved VM's first frames on host2 came within the hold of its last frame
        # behind host1's tap (the move is dampened, by design; see the test above).
        drops.pop("outside_mac_move_dampened", None)
        assert drops == {}, logs(lab)


def test_sigterm_exits_zero_and_removes_devices(lab: Lab) -> None:
    stop_cleanly(lab, ("host1", "host2"))


def test_nothing_left_behind(lab: Lab, namespaces_before: set[str]) -> None:
    close_leaving_nothing(lab, namespaces_before)
