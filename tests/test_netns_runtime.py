"""The daemon's life beyond forwarding, with real daemons in namespaces: the map changes while
traffic flows (file change and SIGHUP), a broken map is refused without losing the old one, a
deleted device comes back by itself, and a killed daemon takes its device with it.
"""

from __future__ import annotations

import signal
import sys
import threading
import time
from collections.abc import Iterator

import pytest
from netns_helpers import NETNS_MARKS, logs, wait_for

from overlayd.lab import HostSpec, Lab, PingResult

pytestmark = NETNS_MARKS

POLL = {"map": {"poll_seconds": 0.2}}


@pytest.fixture
def lab() -> Iterator[Lab]:
    with Lab([HostSpec(config_extra=POLL), HostSpec(config_extra=POLL),
              HostSpec(config_extra={"map": {"poll_seconds": 0}})],
             cidr="10.78.0.0/16", underlay="192.168.78.0/24") as lab:
        lab.wait_mesh(timeout_s=20.0)
        yield lab


def log_of(lab: Lab, name: str) -> str:
    return lab.host(name).log_path.read_text(errors="replace")




def background_ping(lab: Lab, a: str, b: str, count: int) -> tuple[threading.Thread, list]:
    out: list[PingResult] = []
    thread = threading.Thread(target=lambda: out.append(
        lab.ping(a, b, count=count, interval_s=0.02, wait_s=1.0)))
    thread.start()
    return thread, out


def set_host3_in_map(lab: Lab, present: bool) -> None:
    """Rewrite the shared map without host3 (or with it again), atomically (rename)."""
    text = lab.map_path.read_text()
    if not present:
        blocks = text.split("[[nodes]]")
        text = "[[nodes]]".join(b for b in blocks if 'name = "host3"' not in b)
    tmp = lab.map_path.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.replace(lab.map_path)


def test_map_change_applies_live_without_disturbing_other_peers(lab: Lab) -> None:
    original = lab.map_path.read_text()
    thread, result = background_ping(lab, "host1", "host2", count=150)   # ~3 s of traffic
    time.sleep(0.3)
    set_host3_in_map(lab, present=False)
    # host1 polls the file: within a second host3's subnet is no longer routed.
    assert wait_for(lambda: "Net Unreachable" in lab.ping("host1", "host3", wait_s=0.5).output,
                    timeout_s=3.0), logs(lab)
    lab.map_path.write_text(original)
    assert wait_for(lambda: lab.ping("host1", "host3", wait_s=0.5).ok, timeout_s=3.0)
    thread.join(timeout=20)
    (ping,) = result
    assert ping.transmitted == 150 and ping.received == 150, ping.output   # nothing lost
    assert lab.host("host1").daemon.alive()


def test_sighup_reloads_a_daemon_that_does_not_poll(lab: Lab) -> None:
    """host1 starts announcing an extra prefix; host3 (polling off) routes it only after SIGHUP."""
    text = lab.map_path.read_text()
    lab.map_path.write_text(text.replace('name = "host1"', 'name = "host1"\nroutes = ["10.99.0.0/16"]'))

    def host3_routes_extra() -> bool:
        return any(r.get("dst") == "10.99.0.0/16" for r in lab.device_routes("host3"))

    assert wait_for(lambda: "map reloaded" in log_of(lab, "host2"), timeout_s=3.0)
    assert not host3_routes_extra()
    assert "map reloaded" not in log_of(lab, "host3")
    lab.host("host3").daemon.signal(signal.SIGHUP)
    assert wait_for(host3_routes_extra, timeout_s=3.0), log_of(lab, "host3")
    # the daemon installs the routes and then logs: the line may follow the routes by a moment
    assert wait_for(lambda: "map reloaded (SIGHUP)" in log_of(lab, "host3"), timeout_s=3.0)
    assert lab.ping("host3", "host1").ok


def test_broken_map_is_refused_and_the_old_one_kept(lab: Lab) -> None:
    original = lab.map_path.read_text()
    broken = original.replace('subnet_len = 24', 'subnet_len = "x"\ncidr_typo = 1')
    lab.map_path.write_text(broken)
    assert wait_for(lambda: "rejected" in log_of(lab, "host1"), timeout_s=3.0)
    assert "network.subnet_len" in log_of(lab, "host1")
    assert lab.ping("host1", "host2").ok and lab.ping("host2", "host3").ok
    time.sleep(1.2)       # 6 more polls of host1 (0.2 s) with the broken file still on disk
    lab.map_path.write_text(broken)        # rewritten, same content: nothing new to judge
    time.sleep(0.6)
    lines = log_of(lab, "host1").splitlines()
    rejections = [ln for ln in lines if "rejected" in ln]
    assert len(rejections) == 1, rejections           # judged once, not at every poll
    # One record, one line: both problems are in the rejection's own (timestamped) line.
    assert "network.subnet_len" in rejections[0] and "cidr_typo" in rejections[0]
    assert all(" overlayd[" in ln for ln in lines), [ln for ln in lines if " overlayd[" not in ln]
    assert lab.control("host1", "status")["map"]["reloads_rejected"] == 1
    lab.map_path.write_text(original)
    assert wait_for(lambda: "map reloaded" in log_of(lab, "host1"), timeout_s=3.0)
    assert lab.control("host1", "status")["map"]["reloads_applied"] == 1


def test_deleted_device_is_recreated(lab: Lab) -> None:
    lab.exec("host2", ["ip", "link", "del", "overlay0"])
    assert wait_for(lambda: lab.ping("host1", "host2", wait_s=0.5).ok, timeout_s=5.0), logs(lab)
    info = lab.device_info("host2")
    assert info is not None and info["mtu"] == 1472
    assert any(r.get("dst") == "10.78.0.0/16" for r in lab.device_routes("host2"))
    assert "recreated" in log_of(lab, "host2")
    # The gap is short enough to slip between two scrapes; the counter does not.
    assert lab.control("host2", "status")["device"]["recreations"] == 1
    peers = {p["name"]: p for p in lab.control("host2", "peers")}
    assert peers["host1"]["last_rx_seconds_ago"] is not None   # host1's pings were heard
    assert peers["host1"]["last_rx_seconds_ago"] < 3.0


def test_killed_daemon_takes_its_device_along(lab: Lab) -> None:
    daemon = lab.host("host2").daemon
    daemon.signal(signal.SIGKILL)
    assert wait_for(lambda: not daemon.alive(), timeout_s=5.0)
    assert wait_for(lambda: lab.device_info("host2") is None, timeout_s=5.0)
    assert "Net Unreachable" not in lab.ping("host1", "host2", wait_s=0.5).output
    assert not lab.ping("host1", "host2", wait_s=0.5).ok
    lab.start_daemon("host2")
    assert wait_for(lambda: lab.ping("host1", "host2", wait_s=0.5).ok, timeout_s=5.0)


def test_garbage_from_a_peer_counts_as_that_peers_drop(lab: Lab) -> None:
    """A silent peer and a peer that sends only garbage look alike in rx_packets; the per-peer
    drop count and the last-received time tell them apart."""
    host2 = lab.host("host2")
    send = ("import socket; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); "
            f"s.bind(('{lab.host('host1').underlay_ip}', 0)); "
            f"[s.sendto(bytes([0x45]) + bytes(40), ('{host2.underlay_ip}', {lab.port})) "
            "for _ in range(3)]")
    lab.exec("host1", [sys.executable, "-c", send])

    def dropped() -> int:
        peers = {p["name"]: p for p in lab.control("host2", "peers")}
        return int(peers["host1"]["rx_dropped"])

    assert wait_for(lambda: dropped() == 3, timeout_s=3.0), lab.control("host2", "peers")
    peers = {p["name"]: p for p in lab.control("host2", "peers")}
    assert peers["host3"]["rx_dropped"] == 0
    assert lab.ping("host1", "host2").ok and dropped() == 3     # good traffic is no drop
