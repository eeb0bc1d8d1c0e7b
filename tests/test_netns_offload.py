"""Offloads end to end, in namespaces, with real tun/tap devices and a real kernel VXLAN peer.

For each data path, a TCP stream between two real daemons must (a) arrive intact and (b) have
actually used every offload: the sender's device handed over TCP superpackets that were cut
into segments and sent with UDP GSO, the receiver took GRO runs and wrote coalesced
superpackets into its device. On the routed vxlan path, a kernel VTEP configured as flannel
configures one sends to and receives from overlayd with offloads on: what overlayd puts on
the wire is still one complete inner packet per datagram. With `[dataplane] offloads = false`
none of it happens and traffic still flows.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from netns_helpers import VXLAN_MARKS, logs

from overlayd.lab import HostSpec, Lab

pytestmark = VXLAN_MARKS   # the routed lab has a kernel VXLAN host

TRANSFER_BYTES = 16_000_000


def status(lab: Lab, name: str) -> dict[str, Any]:
    got = lab.control(name, "status")
    assert isinstance(got, dict), got
    return got


def transfer_ok(lab: Lab, a: str, b: str) -> None:
    result = lab.tcp_transfer(a, b, TRANSFER_BYTES, timeout_s=60.0)
    assert result.bytes_ok and result.sha256_ok, f"{result}\n{logs(lab)}"


def assert_sender_offloaded(s: dict[str, Any]) -> None:
    t = s["traffic"]
    assert s["offloads"] == {"vnet_hdr": True, "udp_gso": True, "udp_gro": True,
                             "device_uso": True}, s["offloads"]
    assert t["offload_superpackets"] > 0, t
    assert t["offload_segments"] > t["offload_superpackets"], t
    assert t["offload_gso_sends"] > 0, t
    assert t["offload_gso_refused"] == 0, t


def assert_receiver_coalesced(s: dict[str, Any]) -> None:
    t = s["traffic"]
    assert t["offload_gro_receives"] > 0, t
    assert t["offload_coalesced_writes"] > 0, t
    assert t["offload_coalesced_segments"] > t["offload_coalesced_writes"], t


def assert_no_drops(s: dict[str, Any]) -> None:
    dropped = {reason: n for reason, n in s["drops"].items() if n}
    # The router answers nothing here; any drop (a bad offload, a bad checksum) is a bug.
    assert not dropped, dropped


@pytest.fixture(scope="module")
def udp_lab() -> Iterator[Lab]:
    with Lab(2, backend="udp") as lab:
        lab.wait_mesh(timeout_s=20.0)
        yield lab


def test_udp_path_uses_every_offload_and_delivers_intact(udp_lab: Lab) -> None:
    transfer_ok(udp_lab, "host1", "host2")
    sender, receiver = status(udp_lab, "host1"), status(udp_lab, "host2")
    assert_sender_offloaded(sender)
    assert_receiver_coalesced(receiver)
    # Every segment cut at host1 arrived at host2 as a datagram and went into the device.
    assert receiver["traffic"]["delivered_packets"] >= sender["traffic"]["offload_segments"]
    assert_no_drops(sender)
    assert_no_drops(receiver)


def test_udp_path_reverse_direction_keeps_counts_balanced(udp_lab: Lab) -> None:
    transfer_ok(udp_lab, "host2", "host1")
    for name in ("host1", "host2"):
        t = status(udp_lab, name)["traffic"]
        # inside_packets counts segments, so every one is forwarded (no drops above).
        assert t["forwarded_packets"] == t["inside_packets"], t


@pytest.fixture(scope="module")
def vxlan_lab() -> Iterator[Lab]:
    specs = [HostSpec(), HostSpec(), HostSpec(kernel_vxlan=True)]
    with Lab(specs, backend="vxlan") as lab:
        lab.wait_mesh(timeout_s=20.0)
        yield lab


def test_vxlan_routed_offloads_between_daemons(vxlan_lab: Lab) -> None:
    transfer_ok(vxlan_lab, "host1", "host2")
    assert_sender_offloaded(status(vxlan_lab, "host1"))
    assert_receiver_coalesced(status(vxlan_lab, "host2"))


def test_kernel_vtep_reads_what_offloads_put_on_the_wire(vxlan_lab: Lab) -> None:
    """Superpackets cut by overlayd and sent with GSO reach the kernel's vxlan device as
    ordinary datagrams with valid inner checksums (else the transfer would stall)."""
    before = status(vxlan_lab, "host1")["traffic"]["offload_gso_sends"]
    transfer_ok(vxlan_lab, "host1", "host3")
    after = status(vxlan_lab, "host1")
    assert after["traffic"]["offload_gso_sends"] > before, after["traffic"]
    transfer_ok(vxlan_lab, "host3", "host1")
    assert_no_drops(status(vxlan_lab, "host1"))


@pytest.fixture(scope="module")
def switched_lab() -> Iterator[Lab]:
    with Lab(2, backend="vxlan", backend_extra={"mode": "switched"}) as lab:
        lab.wait_mesh(timeout_s=20.0)
        yield lab


def test_vxlan_switched_offloads_on_tap(switched_lab: Lab) -> None:
    transfer_ok(switched_lab, "host1", "host2")
    assert_sender_offloaded(status(switched_lab, "host1"))
    assert_receiver_coalesced(status(switched_lab, "host2"))


@pytest.fixture(scope="module")
def plain_lab() -> Iterator[Lab]:
    specs = [HostSpec(config_extra={"dataplane": {"offloads": False}}) for _ in range(2)]
    with Lab(specs, backend="udp") as lab:
        lab.wait_mesh(timeout_s=20.0)
        yield lab


def test_offloads_off_means_none_used_and_traffic_flows(plain_lab: Lab) -> None:
    transfer_ok(plain_lab, "host1", "host2")
    for name in ("host1", "host2"):
        s = status(plain_lab, name)
        assert s["offloads"] == {"vnet_hdr": False, "udp_gso": False, "udp_gro": False,
                                 "device_uso": False}
        assert not any(v for k, v in s["traffic"].items() if k.startswith("offload_")), s
        assert_no_drops(s)
