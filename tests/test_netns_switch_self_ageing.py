"""A learned MAC ages out of a real switched daemon, and on the threads engine nothing pauses
the data-plane thread for it (the thread ages its own table: cext/engine.pxi item 10).

Two overlayd hosts, vxlan switched, mac_ageing_seconds = 2; a VM behind host1's bridge
announces itself once (a gratuitous ARP, flooded): host1 learns it behind its tap, host2 at
host1. Then the VM is silent: both tables must forget it once it is older than the ageing
time (within a tick of 0.5 s, plus the polling here), not before. With the Cython data plane
the daemons run the threads engine: its thread has acknowledged no pause in its whole life but
one per `overlayd fdb` listing asked here (main's FDB timer paused it twice a second).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator

import pytest
from netns_helpers import VXLAN_MARKS, close_leaving_nothing, logs

from overlayd.lab import HostSpec, Lab, list_netns

pytestmark = VXLAN_MARKS

AGEING_S = 2.0
TICK_S = 0.5
VM = ("vm1a", "10.78.1.11", "02:56:4d:00:07:0a")
THREADS = os.environ.get("OVERLAYD_DATAPLANE", "cython") == "cython"


@pytest.fixture(scope="module")
def namespaces_before() -> set[str]:
    return set(list_netns())


@pytest.fixture(scope="module")
def lab(namespaces_before: set[str]) -> Iterator[Lab]:
    extra = {"switch": {"mac_ageing_seconds": AGEING_S}}
    specs = [HostSpec(vm_bridge=True, config_extra=extra), HostSpec(config_extra=extra)]
    with Lab(specs, backend="vxlan", backend_extra={"mode": "switched", "vni": 43}) as lab:
        lab.wait_mesh(timeout_s=20.0)
        lab.add_vm("host1", *VM)
        yield lab


LISTINGS = {"host1": 0, "host2": 0}      # `overlayd fdb` requests made of each daemon


def learned(lab: Lab, host: str) -> dict[str, float]:
    """MAC -> age in seconds of the daemon's learned (not static) entries."""
    LISTINGS[host] += 1
    table = lab.control(host, "fdb")
    return {e["mac"]: e["age_seconds"] for e in table["entries"] if not e["static"]}


def test_a_silent_mac_ages_out_on_time(lab: Lab) -> None:
    mac = VM[2]
    lab.announce(VM[0])
    start = time.monotonic()
    seen = {"host1": learned(lab, "host1"), "host2": learned(lab, "host2")}
    assert mac in seen["host1"] and mac in seen["host2"], f"{seen}\n{logs(lab)}"
    gone: dict[str, float] = {}
    while len(gone) < 2 and time.monotonic() - start < AGEING_S + 5.0:
        for host in ("host1", "host2"):
            table = learned(lab, host)
            if host in gone:
                continue
            if mac in table:
                # still there: never older than the ageing time plus one tick
                assert table[mac] <= AGEING_S + TICK_S + 0.25, (host, table, logs(lab))
            else:
                gone[host] = time.monotonic() - start
        time.sleep(0.05)
    assert set(gone) == {"host1", "host2"}, f"{gone}\n{logs(lab)}"
    for host, after in gone.items():
        assert after > AGEING_S - 0.25, (host, after)        # not before its time


@pytest.mark.skipif(not THREADS, reason="the threads engine runs the Cython data plane only")
def test_the_switched_thread_was_paused_only_for_listings(lab: Lab) -> None:
    for host in ("host1", "host2"):
        engine = lab.control(host, "status")["engine"]
        assert engine["kind"] == "threads", engine
        (thread,) = engine["threads"]
        # its only pauses: the listings asked for above (the walk of the list it changes)
        assert thread["running"] and thread["pauses"] == LISTINGS[host], (thread, LISTINGS)
        # it woke for the ageing pass itself (no frame came when the VM's entry fell due)
        assert thread["deadline_wakeups"] >= 1, thread


def test_nothing_left_behind(lab: Lab, namespaces_before: set[str]) -> None:
    close_leaving_nothing(lab, namespaces_before)
