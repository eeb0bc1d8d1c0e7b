"""The udp path end to end: three hosts in namespaces, a real `overlayd run` process in each.

host1 and host2 have a 1500-byte underlay, host3 a 1400-byte one (path MTU toward it: 1372).
A bystander namespace sits on the same underlay bridge without being in the map. Tests run in
file order and share one lab; the SIGTERM test stops the daemons, so it comes last but one, and
the last test proves the lab left nothing behind.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from itertools import permutations

import pytest
from netns_helpers import NETNS_MARKS, drop_counters_or_skip, logs, marker, own_namespaces

from overlayd.lab import HostSpec, Lab, list_netns

pytestmark = NETNS_MARKS

NAMES = ("host1", "host2", "host3")
CIDR = "10.77.0.0/16"
SMALL_MTU = 1400
PATH_MTU_TO_HOST3 = SMALL_MTU - 28      # IPv4 (20) + UDP (8) of the tunnel


@pytest.fixture(scope="module")
def namespaces_before() -> set[str]:
    return set(list_netns())


@pytest.fixture(scope="module")
def lab(namespaces_before: set[str]) -> Iterator[Lab]:
    specs = [HostSpec(), HostSpec(), HostSpec(underlay_mtu=SMALL_MTU)]
    with Lab(specs, cidr=CIDR, underlay="192.168.77.0/24") as lab:
        lab.add_bystander("stranger")
        lab.wait_mesh(timeout_s=20.0)
        yield lab


def test_devices_configured(lab: Lab) -> None:
    """Each daemon's tun: up, its subnet's network address as /32, MTU = underlay - 28, and the
    whole network routed through it with that source address."""
    for host in lab:
        info = lab.device_info(host)
        assert info is not None, f"{host.name}: no device\n{logs(lab)}"
        assert "UP" in info["flags"]
        addrs = [(a["local"], a["prefixlen"]) for a in info["addr_info"] if a["family"] == "inet"]
        assert addrs == [(host.overlay_ip, 32)]
        assert info["mtu"] == lab.device_mtu(host) == host.underlay_mtu - 28
        routes = {r["dst"]: r for r in lab.device_routes(host)}
        assert routes[CIDR].get("prefsrc") == host.overlay_ip
    assert lab.device_info("host3")["mtu"] == PATH_MTU_TO_HOST3  # type: ignore[index]


@pytest.mark.parametrize(("a", "b"), list(permutations(NAMES, 2)),
                         ids=[f"{a}-{b}" for a, b in permutations(NAMES, 2)])
def test_ping(lab: Lab, a: str, b: str) -> None:
    result = lab.ping(a, b, count=3, interval_s=0.05)
    assert result.received == 3, f"{result.output}\n{logs(lab)}"


def test_tcp_transfer_20mb(lab: Lab) -> None:
    result = lab.tcp_transfer("host1", "host2", 20_000_000, timeout_s=60.0)
    assert result.bytes_ok and result.sha256_ok, f"{result}\n{logs(lab)}"


def test_ttl_expiry_answered_by_sending_daemon(lab: Lab) -> None:
    result = lab.ping("host1", "host2", ttl=1)
    assert re.search(r"From 10\.77\.1\.0 icmp_seq=\d+ Time to live exceeded", result.output), \
        f"{result.output}\n{logs(lab)}"
    assert not result.ok


def test_unassigned_subnet_is_net_unreachable(lab: Lab) -> None:
    result = lab.ping("host1", dst="10.77.200.1")
    assert re.search(r"From 10\.77\.1\.0 icmp_seq=\d+ Destination Net Unreachable",
                     result.output), f"{result.output}\n{logs(lab)}"


def test_df_packet_over_path_mtu_gets_frag_needed(lab: Lab) -> None:
    # A cached PMTU from an earlier run of this check would make ping fail locally instead.
    lab.exec("host1", ["ip", "route", "flush", "cache"])
    too_big = lab.ping("host1", "host3", size=1400, dont_fragment=True)   # 1428 > 1372
    assert re.search(rf"From 10\.77\.1\.0 icmp_seq=\d+ Frag needed and DF set "
                     rf"\(mtu = {PATH_MTU_TO_HOST3}\)", too_big.output), \
        f"{too_big.output}\n{logs(lab)}"
    # The largest echo that fits the path goes through.
    fits = lab.ping("host1", "host3", size=PATH_MTU_TO_HOST3 - 28, dont_fragment=True)
    assert fits.ok, fits.output


def _arrivals_from(lab: Lab, sender: str, src_ip: str, inner_src: str) -> int:
    """Inject one tunnel datagram at host2 and count how many reach host2's device."""
    mark = marker()
    host2 = lab.host("host2")
    dst = host2.overlay_ip
    assert dst is not None
    return lab.count_arrivals(host2, mark, lambda: lab.inject(
        sender, host2, inner_src, dst, mark, src_ip=src_ip), seconds=1.0)


def test_crafted_datagram_from_peer_is_delivered(lab: Lab) -> None:
    """Control for the two drop tests below: the same crafted datagram, legitimate this time,
    does arrive, so 'nothing arrived' there means 'dropped', not 'the probe is broken'."""
    assert _arrivals_from(lab, "host1", lab.host("host1").underlay_ip, "10.77.1.77") == 1


def test_datagram_from_unknown_peer_is_dropped(lab: Lab) -> None:
    stranger = lab.host("stranger")
    assert _arrivals_from(lab, "stranger", stranger.underlay_ip, "10.77.1.77") == 0


def test_datagram_from_unknown_peer_is_counted(lab: Lab) -> None:
    before = drop_counters_or_skip(lab, "host2")
    stranger = lab.host("stranger")
    assert _arrivals_from(lab, "stranger", stranger.underlay_ip, "10.77.1.77") == 0
    after = drop_counters_or_skip(lab, "host2")
    assert after["outside_unknown_peer"] - before["outside_unknown_peer"] == 1


def test_spoofed_inner_source_is_dropped(lab: Lab) -> None:
    """From host1's real public IP, but the inner source lies in host3's subnet."""
    assert _arrivals_from(lab, "host1", lab.host("host1").underlay_ip, "10.77.3.5") == 0


def test_spoofed_inner_source_is_counted(lab: Lab) -> None:
    before = drop_counters_or_skip(lab, "host2")
    assert _arrivals_from(lab, "host1", lab.host("host1").underlay_ip, "10.77.3.5") == 0
    after = drop_counters_or_skip(lab, "host2")
    assert after["outside_spoofed_source"] - before["outside_spoofed_source"] == 1


def test_sigterm_exits_zero_and_removes_device_and_routes(lab: Lab) -> None:
    start = time.monotonic()
    codes = lab.stop_daemons(grace_s=5.0)
    elapsed = time.monotonic() - start
    assert codes == dict.fromkeys(NAMES, 0), f"{codes}\n{logs(lab)}"
    assert elapsed < 5.0
    for host in lab:
        assert lab.device_info(host) is None, f"{host.name}: device still there"
        left = [r for r in lab.exec(host, ["ip", "-4", "route", "show"]).stdout.splitlines()
                if "10.77." in r]
        assert left == [], f"{host.name}: routes left: {left}"


def test_nothing_left_behind(lab: Lab, namespaces_before: set[str]) -> None:
    lab.close()
    assert lab.leftovers() == []
    assert own_namespaces() - namespaces_before == set()
    assert lab.workdir is not None and not lab.workdir.exists()
    for host in lab:
        assert host.daemon is not None and not host.daemon.alive()
