"""Boot race: a daemon started before its public IP is configured waits for it (netlink), tells
systemd what it waits for, and comes up when the address appears; only an address that never
comes ends the start, with 75 (systemd retries), not 78 (systemd gives up).
"""

from __future__ import annotations

import os
import socket
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest
from netns_helpers import NETNS_MARKS

from overlayd.lab import Lab, configs, netns

pytestmark = NETNS_MARKS


@pytest.fixture
def lab() -> Iterator[Lab]:
    with Lab(2, start=False, cidr="10.79.0.0/16", underlay="192.168.79.0/24") as lab:
        yield lab


def unnamed_host1(lab: Lab, wait_s: float) -> str:
    """host1 finds itself by address (no [node] name) and its underlay address is gone."""
    host = lab.host("host1")
    cfg = tomllib.loads(host.config_path.read_text())
    del cfg["node"]["name"]
    cfg["node"]["wait_for_address_seconds"] = wait_s
    host.config_path.write_text(configs.dumps(cfg))
    cidr = f"{host.underlay_ip}/{lab.underlay.prefixlen}"
    netns.ns_run(host.netns, ["ip", "addr", "del", cidr, "dev", "ul0"])
    return cidr


def notify_listener(lab: Lab) -> socket.socket:
    assert lab.workdir is not None
    path = lab.workdir / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(0.2)
    lab.env = dict(os.environ, NOTIFY_SOCKET=str(path))
    return sock


def drain(sock: socket.socket) -> list[str]:
    out = []
    while True:
        try:
            out.append(sock.recv(4096).decode())
        except TimeoutError:
            return out


def test_a_daemon_started_before_its_address_waits_and_comes_up(lab: Lab) -> None:
    cidr = unnamed_host1(lab, wait_s=30.0)
    lab.start_daemon("host2")
    notify = notify_listener(lab)       # host1's systemd only
    try:
        host1 = lab.start_daemon("host1", wait=False)
        assert host1.daemon is not None
        time.sleep(2.0)
        assert host1.daemon.alive(), host1.daemon.log_tail()
        assert "waiting up to 30 s for one of the public IPs" in host1.log_path.read_text()
        before = drain(notify)
        waiting = [m for m in before if "STATUS=waiting for one of the public IPs" in m]
        assert waiting and all("EXTEND_TIMEOUT_USEC=" in m for m in waiting), before
        assert not any("READY=1" in m for m in before), before
        netns.add_address(host1.netns, "ul0", cidr)
        lab.wait_ready("host1", timeout_s=10.0)
        assert lab.ping("host1", "host2", count=3, interval_s=0.1).received == 3
        after = drain(notify)
        assert any("READY=1" in m for m in after), after
        assert lab.stop_daemons() == {"host1": 0, "host2": 0}
    finally:
        notify.close()


def wait_exit(lab: Lab, name: str, timeout_s: float) -> int | None:
    daemon = lab.host(name).daemon
    assert daemon is not None
    deadline = time.monotonic() + timeout_s
    while daemon.alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    return daemon.wrapper.poll()


def test_an_address_that_never_comes_is_tempfail_not_config_error(lab: Lab) -> None:
    unnamed_host1(lab, wait_s=1.0)
    lab.start_daemon("host1", wait=False)
    assert wait_exit(lab, "host1", 15.0) == 75
    log = lab.host("host1").log_path.read_text()
    assert "did not appear on this host within 1 s" in log, log


def test_without_waiting_a_missing_address_stays_a_config_error(lab: Lab) -> None:
    unnamed_host1(lab, wait_s=0.0)
    lab.start_daemon("host1", wait=False)
    assert wait_exit(lab, "host1", 15.0) == 78
    assert "no node's public_ip is an address of this host" in Path(
        lab.host("host1").log_path).read_text()


def test_pings_from_the_moment_the_device_is_up_are_all_answered(lab: Lab) -> None:
    """Issue 13, item 15 (pings lost right after start): the device is up with its address and
    routes before the readers are registered (start, then READY=1), so the kernel queues what it
    sends into the tun meanwhile; none of it may be lost. Ping at 10 ms from the moment the lab
    sees the device up (before READY), then account for every packet on both daemons."""
    lab.start_daemons()                  # returns when each device has its address and route
    ping = lab.ping("host1", "host2", count=20, interval_s=0.01, wait_s=1.0)
    assert ping.received == ping.transmitted == 20, ping.output
    for name in ("host1", "host2"):
        status = lab.control(name, "status")
        traffic, drops = status["traffic"], status["drops"]
        assert traffic["inside_packets"] == traffic["forwarded_packets"] == 20, traffic
        assert traffic["outside_packets"] == traffic["delivered_packets"] == 20, traffic
        assert not any(drops.values()), drops
