"""A switched tap in a Linux bridge (the usual VM host): `[device] bridge` makes overlayd enslave
its tap, keep the node's address off it (the address lives on the bridge), enslave it again when
it recreates the tap, and report (and repair) a tap that is not where it should be.

host1's tap is a port of brvm with a VM behind it; host2 is a plain switched host.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
from netns_helpers import VXLAN_MARKS, wait_for

from overlayd.lab import HostSpec, Lab

pytestmark = VXLAN_MARKS

VM = ("vm1", "10.77.1.11", "02:56:4d:00:01:0a")


@pytest.fixture
def lab() -> Iterator[Lab]:
    with Lab([HostSpec(vm_bridge=True), HostSpec()], backend="vxlan",
             backend_extra={"mode": "switched", "vni": 42}) as lab:
        lab.add_vm("host1", *VM)
        yield lab


def tap(lab: Lab) -> dict:
    (info,) = json.loads(lab.exec("host1", ["ip", "-j", "addr", "show", "overlay0"]).stdout)
    return info


def tap_ipv4(lab: Lab) -> list[str]:
    return [a["local"] for a in tap(lab).get("addr_info", []) if a.get("family") == "inet"]




def vm_reaches_host2(lab: Lab) -> bool:
    return lab.ping("vm1", dst=lab.host("host2").overlay_ip, count=2, interval_s=0.1,
                    wait_s=1.0).received >= 1


def test_the_tap_is_a_bridge_port_without_the_address(lab: Lab) -> None:
    assert tap(lab).get("master") == "brvm" and tap_ipv4(lab) == []
    assert vm_reaches_host2(lab)
    assert lab.ping("host2", "host1").ok                 # the address on the bridge answers
    status = lab.control("host1", "status")
    assert status["health"]["healthy"] and status["health"]["ready"], status["health"]


def test_a_recreated_tap_goes_back_into_the_bridge(lab: Lab) -> None:
    lab.exec("host1", ["ip", "link", "del", "overlay0"])
    assert wait_for(lambda: lab.control("host1", "status")["device"]["recreations"] == 1, 5.0)
    assert wait_for(lambda: tap(lab).get("master") == "brvm", 3.0), tap(lab)
    assert tap_ipv4(lab) == []                           # not put back on the tap
    assert wait_for(lambda: vm_reaches_host2(lab), 10.0)  # the VM is not cut off
    assert lab.control("host1", "status")["health"]["healthy"]


def test_a_tap_taken_out_of_the_bridge_is_reported_and_put_back(lab: Lab) -> None:
    lab.exec("host1", ["ip", "link", "set", "overlay0", "nomaster"])
    lab.exec("host1", ["ip", "addr", "add", "10.77.1.0/16", "dev", "overlay0"])
    # health says so until the tap is back (the check runs every second)
    assert wait_for(lambda: not lab.control("host1", "status")["health"]["healthy"], 3.0)
    log = lab.host("host1").log_path
    assert wait_for(lambda: "not in bridge brvm; putting it back" in log.read_text()
                    or "the address belongs on bridge brvm" in log.read_text(), 3.0), \
        log.read_text()
    assert wait_for(lambda: tap(lab).get("master") == "brvm" and tap_ipv4(lab) == [], 3.0), \
        tap(lab)
    assert wait_for(lambda: lab.control("host1", "status")["health"]["healthy"], 3.0)
    assert wait_for(lambda: vm_reaches_host2(lab), 10.0)
