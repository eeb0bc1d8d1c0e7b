"""Routed vxlan in namespaces, against the kernel's own VXLAN configured as flannel does it.

host1 and host2 run `overlayd run` (backend vxlan, routed: a tun); host3 runs no overlayd but a
kernel ``flannel.1`` device programmed exactly as flannel's vxlan backend programs a node
(overlayd/lab/vxlan_hosts.py, DESIGN.md section 2). Every pair pings and moves a TCP stream;
a capture of the underlay is decoded by scapy. Tests share one lab and run in file order; the
last two stop the daemons and prove nothing is left behind.
"""

from __future__ import annotations

import re
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
PORT = 8472


@pytest.fixture(scope="module")
def namespaces_before() -> set[str]:
    return set(list_netns())


@pytest.fixture(scope="module")
def lab(namespaces_before: set[str]) -> Iterator[Lab]:
    specs = [HostSpec(), HostSpec(), HostSpec(kernel_vxlan=True)]
    with Lab(specs, backend="vxlan") as lab:
        lab.wait_mesh(timeout_s=20.0)
        yield lab


def test_devices(lab: Lab) -> None:
    """overlayd: a tun with the subnet's .0/32 and MTU = underlay - 50; the kernel host: the
    flannel device with the VTEP MAC the map gives it."""
    for name in ("host1", "host2"):
        info = lab.device_info(name)
        assert info is not None and info["mtu"] == 1450 and info["link_type"] == "none"
    kernel = lab.exec("host3", ["ip", "-d", "link", "show", "flannel.1"]).stdout
    assert f"link/ether {lab.host('host3').vtep_mac}" in kernel
    assert re.search(r"vxlan id 1 .*dstport 8472", kernel) and "nolearning" in kernel


def test_every_nodes_vtep_mac_is_visible(lab: Lab) -> None:
    """The own VTEP MAC in status, each peer's in peers: what a flannel host must be told."""
    status = lab.control("host1", "status")
    assert status["node"]["vtep_mac"] == lab.host("host1").vtep_mac
    assert status["node"]["vtep_mac_derived"] is False          # the lab pins them in the map
    peers = {p["name"]: p["vtep_mac"] for p in lab.control("host1", "peers")}
    assert peers == {n: lab.host(n).vtep_mac for n in ("host2", "host3")}
    assert f"VTEP MAC {lab.host('host1').vtep_mac}" in lab.host("host1").log_path.read_text()


@pytest.mark.parametrize(("a", "b"), PAIRS, ids=IDS)
def test_ping(lab: Lab, a: str, b: str) -> None:
    result = lab.ping(a, b, count=3, interval_s=0.05)
    assert result.received == 3, f"{result.output}\n{logs(lab)}"


@pytest.mark.parametrize(("a", "b"), PAIRS, ids=IDS)
def test_tcp(lab: Lab, a: str, b: str) -> None:
    result = lab.tcp_transfer(a, b, 4_000_000, timeout_s=30.0)
    assert result.bytes_ok and result.sha256_ok, f"{result}\n{logs(lab)}"


def test_router_answers_ttl_expiry_toward_the_kernel_host(lab: Lab) -> None:
    result = lab.ping("host1", "host3", ttl=1)
    assert re.search(r"From 10\.77\.1\.0 icmp_seq=\d+ Time to live exceeded", result.output), \
        f"{result.output}\n{logs(lab)}"


def test_capture_is_well_formed_vxlan(lab: Lab) -> None:
    """What crosses the underlay, decoded by scapy: VNI 1 to port 8472 both ways, our inner
    Ethernet header toward the kernel's VtepMAC, and flow-hashed ephemeral source ports."""
    host1, host3 = lab.host("host1"), lab.host("host3")
    with lab.capture(host1, "ul0", f"udp port {PORT}", count=8) as pcap:
        assert lab.ping(host1, host3, count=4, interval_s=0.05).received == 4
    got = vxlan_datagrams(pcap, PORT)
    ours = [p for p in got if p["IP"].src == host1.underlay_ip]
    theirs = [p for p in got if p["IP"].src == host3.underlay_ip]
    assert len(ours) >= 4 and len(theirs) >= 4, [p.summary() for p in got]
    for p in got:
        assert p["VXLAN"].flags == 0x08 and p["VXLAN"].vni == 1, p.show(dump=True)
        assert bytes(p["VXLAN"])[1:4] == b"\0\0\0" and bytes(p["VXLAN"])[7] == 0
        assert p["VXLAN"].payload.type == 0x0800
    for p in ours:
        inner = p["VXLAN"].payload
        assert (inner.dst, inner.src) == (host3.vtep_mac, host1.vtep_mac)
        assert p["UDP"].sport != PORT and p["UDP"].sport >= 1024     # from the tx pool
        assert inner.payload.dst == host3.overlay_ip
    assert len({p["UDP"].sport for p in ours}) == 1                # one flow, one port
    for p in theirs:
        inner = p["VXLAN"].payload
        assert (inner.dst, inner.src) == (host1.vtep_mac, host3.vtep_mac)


def test_nothing_from_the_kernel_was_dropped(lab: Lab) -> None:
    for name in ("host1", "host2"):
        assert outside_drops(lab, name) == {}, logs(lab)


def test_sigterm_exits_zero_and_removes_devices(lab: Lab) -> None:
    stop_cleanly(lab, ("host1", "host2"))


def test_nothing_left_behind(lab: Lab, namespaces_before: set[str]) -> None:
    close_leaving_nothing(lab, namespaces_before)
