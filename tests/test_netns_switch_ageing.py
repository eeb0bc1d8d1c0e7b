"""MAC ageing of a real switched daemon at the largest capacity costs what the table holds.

Two overlayd hosts, vxlan switched, fdb_max_entries = 2^24 (2^26 slots, a 2 GiB calloc'd
table). The daemon ages its FDB every 0.5 s. An ageing that walks the slot array reads every
page of the table each tick: tens of milliseconds of event-loop time per tick, and a page fault
for each of the table's 524,288 pages the first time (reads map the kernel's zero page, so RSS
does not show it; the fault count does). Ageing by the list of learned entries reads none of
the empty slots: the daemon's page faults stay those of a small process while ticks run.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from netns_helpers import VXLAN_MARKS, close_leaving_nothing, logs

from overlayd.bench.memory import rss_kib
from overlayd.lab import HostSpec, Lab, list_netns

pytestmark = VXLAN_MARKS

CAPACITY = 1 << 24
SMALL_DAEMON_KIB = 300 << 10       # a switched daemon with a small table holds ~50 MiB
TABLE_PAGES = (4 * CAPACITY * 32) // 4096   # 2^26 slots of 32 bytes, 4 KiB pages


@pytest.fixture(scope="module")
def namespaces_before() -> set[str]:
    return set(list_netns())


@pytest.fixture(scope="module")
def lab(namespaces_before: set[str]) -> Iterator[Lab]:
    extra = {"switch": {"fdb_max_entries": CAPACITY}}
    specs = [HostSpec(config_extra=extra) for _ in range(2)]
    with Lab(specs, backend="vxlan", backend_extra={"mode": "switched", "vni": 42}) as lab:
        lab.wait_mesh(timeout_s=20.0)
        yield lab


def minor_faults(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[7])     # field 10, minflt


def test_idle_ticks_at_the_largest_capacity_touch_no_table_pages(lab: Lab) -> None:
    time.sleep(2.0)                                    # four ageing ticks
    for name in ("host1", "host2"):
        daemon = lab.host(name).daemon
        assert daemon is not None and daemon.pid is not None
        faults = minor_faults(daemon.pid)
        rss, peak = rss_kib(daemon.pid)
        assert faults < TABLE_PAGES // 4, f"{name}: {faults} page faults\n{logs(lab)}"
        assert peak < SMALL_DAEMON_KIB, f"{name}: RSS {rss} KiB, peak {peak} KiB"
    result = lab.ping("host1", "host2", count=5, interval_s=0.2)
    assert result.received == 5, f"{result.output}\n{logs(lab)}"


def test_nothing_left_behind(lab: Lab, namespaces_before: set[str]) -> None:
    close_leaving_nothing(lab, namespaces_before)
