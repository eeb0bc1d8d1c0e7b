"""UDP superpackets (USO) between the device and the data plane, in namespaces, real tun/tap.

Bursts of small UDP datagrams over several interleaved flows, TOS and TTL changing from burst to
burst and each burst ending in a shorter datagram, cross two real daemons. The receiving daemon
writes runs of one flow into its device as one UDP GSO superpacket and the kernel cuts them
again; the receiver checks every datagram's bytes, TOS, TTL and order, so a run that merged
two flows, two TOS values or two TTLs, lost its short last datagram or carried a wrong
checksum (the kernel drops it) fails here. With GSO on the sending socket, the sending daemon
reads UDP superpackets from its device and cuts them itself. With `[dataplane] device_uso =
false` none of it happens and the same traffic still arrives.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from netns_helpers import NETNS_MARKS

from overlayd.lab import HostSpec, Lab, UdpTransferResult, run_prefix
from overlayd.lab.netns import add_netns, del_netns, ip

pytestmark = NETNS_MARKS


def status(lab: Lab, name: str) -> dict[str, Any]:
    got = lab.control(name, "status")
    assert isinstance(got, dict), got
    return got


def assert_intact(r: UdpTransferResult, hops: int = 1) -> None:
    """hops: TTL decrements on the way (routed: the sending daemon's; switched: none)."""
    assert r.bad_bytes == 0 and r.bad_tos == 0 and r.duplicates == 0, r
    assert r.ttl_deltas == [hops], r
    assert r.out_of_order == 0, r
    assert r.received == r.sent and r.shorts_received == r.shorts_sent, r


def assert_no_drops(s: dict[str, Any]) -> None:
    dropped = {reason: n for reason, n in s["drops"].items() if n}
    assert not dropped, dropped


def lab_for(backend: str, extra: dict[str, Any] | None = None,
            config: dict[str, Any] | None = None) -> Iterator[Lab]:
    specs = [HostSpec(config_extra=config or {}) for _ in range(2)]
    with Lab(specs, backend=backend, backend_extra=extra or {}) as lab:
        lab.wait_mesh(timeout_s=20.0)
        yield lab


@pytest.fixture(scope="module")
def udp_lab() -> Iterator[Lab]:
    yield from lab_for("udp")


@pytest.fixture(scope="module")
def switched_lab() -> Iterator[Lab]:
    yield from lab_for("vxlan", {"mode": "switched"})


@pytest.fixture(scope="module")
def no_uso_lab() -> Iterator[Lab]:
    yield from lab_for("udp", config={"dataplane": {"device_uso": False}})


def test_receiver_writes_udp_runs_as_superpackets_and_every_datagram_arrives(
        udp_lab: Lab) -> None:
    before = status(udp_lab, "host2")["traffic"]
    result = udp_lab.udp_transfer("host1", "host2", flows=4, bursts=150)
    assert_intact(result)
    s = status(udp_lab, "host2")
    assert s["offloads"]["device_uso"] is True, s["offloads"]
    t = s["traffic"]
    writes = t["offload_udp_coalesced_writes"] - before["offload_udp_coalesced_writes"]
    segments = t["offload_udp_coalesced_segments"] - before["offload_udp_coalesced_segments"]
    assert writes > 0 and segments >= 2 * writes, t
    # Nothing else is on the overlay: every datagram of a run was one of ours.
    assert segments <= result.received, (segments, result)
    assert_no_drops(s)


def test_runs_forwarded_on_are_cut_with_right_checksums(udp_lab: Lab) -> None:
    """The receiving host routes the runs on, over a veth whose checksum offload is off: the
    kernel cuts each superpacket and computes every datagram's UDP checksum from the partial
    sum the data plane wrote, and the namespace behind verifies each one (and drops a wrong
    one, which the transfer would miss)."""
    host2 = udp_lab.host("host2")
    assert host2.subnet is not None
    target = str(host2.subnet.network_address + 77)
    behind = f"{run_prefix()}-b"
    add_netns(behind)
    try:
        here, there = f"{behind[-6:]}h", f"{behind[-6:]}t"
        ip("-n", host2.netns, "link", "add", here, "type", "veth", "peer", "name", there,
           "netns", behind)
        udp_lab.exec(host2, ["ethtool", "-K", here, "tx", "off"])
        ip("-n", host2.netns, "link", "set", here, "up")
        ip("-n", host2.netns, "route", "add", f"{target}/32", "dev", here)
        udp_lab.exec(host2, ["sysctl", "-qw", "net.ipv4.ip_forward=1"])
        ip("-n", behind, "link", "set", "lo", "up")
        ip("-n", behind, "addr", "add", f"{target}/32", "dev", there)
        ip("-n", behind, "link", "set", there, "up")
        ip("-n", behind, "route", "add", "default", "dev", there)
        before = status(udp_lab, "host2")["traffic"]["offload_udp_coalesced_writes"]
        result = udp_lab.udp_transfer("host1", "host2", flows=4, bursts=100,
                                      beyond=(behind, target))
        assert_intact(result, hops=2)
        after = status(udp_lab, "host2")["traffic"]["offload_udp_coalesced_writes"]
        assert after > before
    finally:
        del_netns(behind)


def test_sender_cuts_udp_superpackets_from_its_device(udp_lab: Lab) -> None:
    before = status(udp_lab, "host1")["traffic"]
    result = udp_lab.udp_transfer("host1", "host2", flows=3, bursts=100, size=200, gso=True)
    assert_intact(result)
    t = status(udp_lab, "host1")["traffic"]
    superpackets = t["offload_udp_superpackets"] - before["offload_udp_superpackets"]
    segments = t["offload_udp_segments"] - before["offload_udp_segments"]
    # One UDP_SEGMENT send per flow and burst, 17 datagrams each (the kernel may split one).
    assert superpackets > 0 and segments == result.sent, (t, result)
    assert_no_drops(status(udp_lab, "host1"))


def test_tap_path_coalesces_udp_frames(switched_lab: Lab) -> None:
    result = switched_lab.udp_transfer("host1", "host2", flows=4, bursts=150)
    assert_intact(result, hops=0)
    t = status(switched_lab, "host2")["traffic"]
    assert t["offload_udp_coalesced_writes"] > 0, t
    gso = switched_lab.udp_transfer("host2", "host1", flows=2, bursts=60, size=300, gso=True)
    assert_intact(gso, hops=0)
    assert status(switched_lab, "host2")["traffic"]["offload_udp_superpackets"] > 0


def test_device_uso_off_means_no_udp_superpackets_and_traffic_flows(no_uso_lab: Lab) -> None:
    assert_intact(no_uso_lab.udp_transfer("host1", "host2", flows=4, bursts=100))
    assert_intact(no_uso_lab.udp_transfer("host1", "host2", flows=2, bursts=50, gso=True))
    for name in ("host1", "host2"):
        s = status(no_uso_lab, name)
        assert s["offloads"]["device_uso"] is False and s["offloads"]["vnet_hdr"] is True
        assert not any(v for k, v in s["traffic"].items() if k.startswith("offload_udp_")), s
        assert_no_drops(s)
