"""The etcd map with real daemons in namespaces and a real etcd on the lab's underlay: hosts claim
subnets and find each other, join and leave live, survive etcd going away (one member or all),
a compaction under their watch, flannel's own leases, and bad keys."""

from __future__ import annotations

import base64
import json
import signal
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from netns_helpers import NETNS_MARKS, VXLAN_UNAVAILABLE, wait_for

from overlayd.lab import HostSpec, PingResult
from overlayd.lab.etcd import etcd_unavailable
from overlayd.lab.etcd_lab import PREFIX, EtcdLab, etcdctl_unavailable

pytestmark = [*NETNS_MARKS, pytest.mark.skipif(
    (etcd_unavailable() or etcdctl_unavailable()) is not None,
    reason=f"etcd: {etcd_unavailable() or etcdctl_unavailable()}")]

FIXTURE = json.loads((Path(__file__).parent / "fixtures" / "flannel_leases.json").read_text())




def peer_subnets(lab: EtcdLab, ref: Any) -> set[str]:
    return {p["subnet"] for p in lab.control(ref, "peers")}


def datastore(lab: EtcdLab, ref: Any) -> dict[str, Any]:
    return lab.control(ref, "status")["map"]["datastore"]


def key_of(lab: EtcdLab, ref: Any) -> str:
    subnet = lab.host(ref).subnet
    assert subnet is not None
    return f"{PREFIX}/subnets/{subnet.network_address}-{subnet.prefixlen}"


def get_kv(lab: EtcdLab, key: str) -> dict[str, Any] | None:
    out = json.loads(lab.etcdctl("get", key, "-w", "json"))
    kvs = out.get("kvs") or []
    if not kvs:
        return None
    kv = kvs[0]
    kv["value"] = base64.b64decode(kv["value"])
    return kv


def background_ping(lab: EtcdLab, a: str, b: str, count: int) -> tuple[threading.Thread, list]:
    out: list[PingResult] = []
    thread = threading.Thread(target=lambda: out.append(
        lab.ping(a, b, count=count, interval_s=0.02, wait_s=1.0)))
    thread.start()
    return thread, out


@pytest.fixture
def lab() -> Iterator[EtcdLab]:
    # Claims stay below 10.81.200.0: the tests write leases by hand from there on, and a daemon
    # that had claimed one of those subnets at random would see its own lease overwritten.
    with EtcdLab(3, cidr="10.81.0.0/16", underlay="192.168.81.0/24", ready_timeout_s=30,
                 net_init=("--subnet-max", "10.81.199.0")) as lab:
        lab.wait_mesh(timeout_s=20)
        yield lab


def test_hosts_claim_distinct_subnets_join_and_leave_live(lab: EtcdLab) -> None:
    subnets = {str(h.subnet) for h in lab.hosts}
    assert len(subnets) == 3
    # subnet.env for the flannel CNI plugin: first usable address, the device's MTU
    env = (lab.hosts[0].dir / "subnet.env").read_text().splitlines()
    first = lab.hosts[0].subnet.network_address + 1   # type: ignore[union-attr]
    assert env == ["FLANNEL_NETWORK=10.81.0.0/16", f"FLANNEL_SUBNET={first}/24",
                   "FLANNEL_MTU=1472", "FLANNEL_IPMASQ=false"]
    # Each lease is what flannel's udp backend writes, field by field and byte for byte,
    # attached to an etcd lease with the configured TTL.
    want = json.loads(FIXTURE["udp"])
    for host in lab.hosts:
        kv = get_kv(lab, key_of(lab, host))
        assert kv is not None and kv["lease"] > 0
        value = json.loads(kv["value"])
        assert list(value) == list(want) and value["PublicIPv6"] is None
        assert value["PublicIP"] == host.underlay_ip
        assert kv["value"] == FIXTURE["udp"].replace("192.168.77.2", host.underlay_ip).encode()
    pids = {h.name: h.daemon.pid for h in lab.hosts}   # type: ignore[union-attr]

    # a fourth host joins: the others reach it without a restart
    lab.add_host("host4")
    for other in ("host1", "host2", "host3"):
        assert wait_for(lambda o=other: lab.ping(o, "host4", count=1, wait_s=1).ok, 10), other
    assert {h.name: h.daemon.pid for h in lab.hosts[:3]} == pids   # type: ignore[union-attr]

    # host4 leaves (daemon stopped, key deleted): its routes disappear from the others
    gone = str(lab.host("host4").subnet)
    assert lab.stop_daemon("host4") == 0
    lab.etcdctl("del", key_of(lab, "host4"))
    for other in ("host1", "host2", "host3"):
        assert wait_for(lambda o=other: gone not in peer_subnets(lab, o), 5), other
    # host3 leaves by its etcd lease being revoked (what its TTL running out does)
    gone3 = str(lab.host("host3").subnet)
    kv = get_kv(lab, key_of(lab, "host3"))
    assert kv is not None
    assert lab.stop_daemon("host3") == 0
    lab.etcdctl("lease", "revoke", format(kv["lease"], "x"))
    assert wait_for(lambda: gone3 not in peer_subnets(lab, "host1"), 5)
    assert lab.ping("host1", "host2", count=2).ok      # the rest never noticed

    # restarts keep the subnet: host3 from its subnet.env (its key is gone), host2 from its lease
    lab.start_daemon("host3")
    assert str(lab.host("host3").subnet) == gone3
    lab.stop_daemon("host2")
    before = str(lab.host("host2").subnet)
    lab.start_daemon("host2")
    assert str(lab.host("host2").subnet) == before
    assert "(reused)" in lab.host("host2").log_path.read_text()
    assert "(previous subnet.env)" in lab.host("host3").log_path.read_text()
    lab.wait_mesh(timeout_s=20)


def test_etcd_down_loses_no_packets_and_a_host_joining_meanwhile_appears_after(
        lab: EtcdLab) -> None:
    assert lab.cluster is not None
    thread, out = background_ping(lab, "host1", "host2", count=200)
    time.sleep(0.5)
    lab.cluster.stop_member("etcd1")
    thread.join(timeout=30)
    assert out and out[0].transmitted == 200 and out[0].received == 200, out
    assert wait_for(lambda: not datastore(lab, "host1")["reachable"], 10)
    ds = datastore(lab, "host1")
    assert ds["last_contact_seconds"] > 0 and ds["lease"]["remaining_seconds"] > 86000
    ready = lab.control("host1", "status")["health"]
    assert ready["healthy"]
    # a host joins while etcd is down: it waits (no subnet yet), and comes up when etcd is back
    lab.add_host("host4", start=False)
    lab.start_daemon("host4", wait=False)
    time.sleep(2)
    assert lab.host("host4").daemon.alive() and lab.learn_subnet("host4") is None  # type: ignore[union-attr]
    lab.cluster.restart_member("etcd1")
    lab.wait_ready("host4", timeout_s=30)
    for other in ("host1", "host2", "host3"):
        assert wait_for(lambda o=other: lab.ping(o, "host4", count=1, wait_s=1).ok, 15), other
    ds = datastore(lab, "host1")
    assert ds["reachable"] and ds["watch"]["reconnects"] >= 1 and ds["watch"]["resumes"] >= 1
    log = lab.host("host1").log_path.read_text()
    assert log.count("etcd unreachable") == 1 and "etcd answers again after" in log, log[-3000:]
    # the status command shows the same
    text = lab.exec("host1", ["python3", "-m", "overlayd", "status", "--socket",
                              str(lab.host("host1").control_socket)]).stdout
    assert "etcd      reachable" in text and "lease" in text


def test_compaction_under_a_stopped_watcher_ends_with_the_right_table(lab: EtcdLab) -> None:
    assert lab.cluster is not None
    daemon = lab.host("host1").daemon
    assert daemon is not None and daemon.pid is not None
    daemon.signal(signal.SIGSTOP)
    try:
        # the watch breaks while host1 sleeps, and everything after it is compacted away
        lab.cluster.stop_member("etcd1")
        lab.cluster.restart_member("etcd1")
        for i in range(200, 210):
            lab.etcdctl("put", f"{PREFIX}/subnets/10.81.{i}.0-24",
                        f'{{"PublicIP":"192.168.81.{i - 100}","PublicIPv6":null}}')
        for i in range(200, 205):
            lab.etcdctl("del", f"{PREFIX}/subnets/10.81.{i}.0-24")
        rev = json.loads(lab.etcdctl("endpoint", "status", "-w", "json"))[0]["Status"][
            "header"]["revision"]
        lab.etcdctl("compaction", str(rev))
    finally:
        daemon.signal(signal.SIGCONT)
    want = {f"10.81.{i}.0/24" for i in range(205, 210)} | {str(lab.host(n).subnet)
                                                         for n in ("host2", "host3")}
    assert wait_for(lambda: peer_subnets(lab, "host1") == want, 20), peer_subnets(lab, "host1")
    assert datastore(lab, "host1")["watch"]["compaction_relists"] >= 1
    assert lab.ping("host1", "host2", count=2).ok


def test_bad_keys_are_counted_skips_and_the_table_stays_whole(lab: EtcdLab) -> None:
    for name, value in (("10.81.240.0-24", "garbage{"),
                        ("10.81.241.0-24", '{"PublicIP":"not-an-address"}'),
                        ("banana", '{"PublicIP":"192.168.81.77"}'),
                        ("10.81.242.0-24", '{"PublicIP":"192.168.81.78","PublicIPv6":null}')):
        lab.etcdctl("put", f"{PREFIX}/subnets/{name}", value)
    assert wait_for(lambda: "10.81.242.0/24" in peer_subnets(lab, "host1"), 10)
    ds = datastore(lab, "host1")
    assert ds["skipped_keys"] == {"lease_not_json": 1, "lease_invalid": 1, "bad_key": 1}
    assert len(peer_subnets(lab, "host1")) == 3
    # a broken network config: still forwarding, /readyz says why, recovers when fixed
    good = get_kv(lab, f"{PREFIX}/config")
    assert good is not None
    lab.etcdctl("put", f"{PREFIX}/config", "{not json")
    assert wait_for(lambda: not lab.control("host1", "status")["health"]["ready"], 10)
    problems = lab.control("host1", "status")["health"]["problems"]
    assert any("network config" in p and "not JSON" in p for p in problems), problems
    assert lab.ping("host1", "host2", count=2).ok
    lab.etcdctl("put", f"{PREFIX}/config", good["value"].decode())
    assert wait_for(lambda: lab.control("host1", "status")["health"]["ready"], 10)
    assert all(h.daemon is not None and h.daemon.alive() for h in lab.hosts)


def test_three_member_cluster_member_in_use_killed() -> None:
    with EtcdLab(2, members=3, cidr="10.82.0.0/16", underlay="192.168.82.0/24",
                 ready_timeout_s=40) as lab:
        assert lab.cluster is not None
        lab.wait_mesh(timeout_s=20)
        used = datastore(lab, "host1")["endpoint"]
        lab.cluster.kill_member(lab.cluster.member_at(used).name)
        lab.add_host("host3")
        assert wait_for(lambda: str(lab.host("host3").subnet) in peer_subnets(lab, "host1"), 20)
        assert wait_for(lambda: lab.ping("host1", "host3", count=1, wait_s=1).ok, 15)
        assert datastore(lab, "host1")["endpoint"] != used


def test_vxlan_backend_from_etcd_and_a_hand_written_flannel_lease() -> None:
    with EtcdLab(2, backend="vxlan", backend_extra={"vni": 1}, cidr="10.83.0.0/16",
                 underlay="192.168.83.0/24", ready_timeout_s=30) as lab:
        lab.wait_mesh(timeout_s=20)
        want = json.loads(FIXTURE["vxlan"])
        macs = {}
        for host in lab.hosts:
            kv = get_kv(lab, key_of(lab, host))
            assert kv is not None
            value = json.loads(kv["value"])
            assert list(value) == list(want) and list(value["BackendData"]) == \
                list(want["BackendData"])
            assert value["BackendType"] == "vxlan" and value["BackendData"]["VNI"] == 1
            macs[host.name] = value["BackendData"]["VtepMAC"]
            link = lab.device_info(host)
            assert link is not None
        # A lease written by hand exactly as flannel writes it is understood as a peer.
        lab.etcdctl("put", f"{PREFIX}/subnets/10.83.250.0-24",
                    FIXTURE["vxlan"].replace("192.168.77.1", "192.168.83.250"))
        assert wait_for(lambda: "10.83.250.0/24" in peer_subnets(lab, "host1"), 10)
        peer = next(p for p in lab.control("host1", "peers") if p["subnet"] == "10.83.250.0/24")
        assert peer["public_ip"] == "192.168.83.250" and peer["port"] == 8472


def test_vxlan_switched_from_etcd() -> None:
    """Backend.Mode "switched" (overlayd's own key; flannel ignores it): one L2 segment."""
    with EtcdLab(3, backend="vxlan", backend_extra={"mode": "switched"}, cidr="10.84.0.0/16",
                 underlay="192.168.84.0/24", ready_timeout_s=30) as lab:
        lab.wait_mesh(timeout_s=20)
        status = lab.control("host1", "status")
        assert status["tunnel"]["mode"] == "switched" and status["tunnel"]["port"] == 4789
        kv = get_kv(lab, key_of(lab, "host2"))
        assert kv is not None
        mac = json.loads(kv["value"])["BackendData"]["VtepMAC"]
        link = lab.device_info("host2")
        assert link is not None and link["address"] == mac    # the tap's MAC is the lease's


@pytest.mark.skipif(VXLAN_UNAVAILABLE is not None, reason=f"{VXLAN_UNAVAILABLE}")
def test_a_flannel_vxlan_node_with_a_hand_written_lease_is_a_peer() -> None:
    """host3 is no overlayd but the kernel's VXLAN, set up as flannel's vxlan backend sets up a
    node, with its lease written by hand in flannel's format: traffic flows both ways."""
    with EtcdLab([HostSpec(), HostSpec(), HostSpec(kernel_vxlan=True)], backend="vxlan",
                 cidr="10.85.0.0/16", underlay="192.168.85.0/24", ready_timeout_s=30) as lab:
        lab.join_kernel_host("host3")
        assert wait_for(lambda: str(lab.host("host3").subnet) in peer_subnets(lab, "host1"), 10)
        lab.wait_mesh(timeout_s=20)
        assert lab.tcp_transfer("host3", "host1", 2_000_000).sha256_ok


def test_a_daemon_waits_for_a_missing_network_config_and_stops_cleanly_meanwhile() -> None:
    with EtcdLab(2, net_init=None, cidr="10.86.0.0/16", underlay="192.168.86.0/24",
                 start=False, ready_timeout_s=30) as lab:
        lab.start_daemon("host1", wait=False)
        lab.start_daemon("host2", wait=False)
        for name in ("host1", "host2"):
            log = lab.host(name).log_path
            assert wait_for(lambda log=log: "/coreos.com/network/config is missing"
                            in log.read_text(), 15)
        assert lab.stop_daemon("host2") == 0          # SIGTERM while waiting: a clean exit
        assert lab.learn_subnet("host1") is None
        lab.init_network()
        lab.wait_ready("host1")
        lab.start_daemon("host2")
        lab.wait_mesh(timeout_s=20)


def test_short_lease_is_renewed_and_a_revoked_one_claimed_back_with_the_same_subnet() -> None:
    with EtcdLab(2, lease_ttl_seconds=10, cidr="10.87.0.0/16", underlay="192.168.87.0/24",
                 ready_timeout_s=30) as lab:
        lab.wait_mesh(timeout_s=20)
        first = get_kv(lab, key_of(lab, "host1"))
        assert first is not None
        # renewed at half the TTL, onto a fresh etcd lease, by compare-on-revision
        assert wait_for(lambda: datastore(lab, "host1")["lease"]["renewals"] >= 1, 12)
        renewed = get_kv(lab, key_of(lab, "host1"))
        assert renewed is not None and renewed["lease"] != first["lease"]
        assert renewed["mod_revision"] > first["mod_revision"]
        assert datastore(lab, "host1")["lease"]["remaining_seconds"] > 4
        # the lease revoked under a running daemon: it says so and claims the same subnet back
        thread, out = background_ping(lab, "host2", "host1", count=100)
        lab.etcdctl("lease", "revoke", format(renewed["lease"], "x"))
        assert wait_for(lambda: datastore(lab, "host1")["lease"]["reacquired"] >= 1, 10)
        thread.join(timeout=30)
        back = get_kv(lab, key_of(lab, "host1"))
        assert back is not None and json.loads(back["value"])["PublicIP"] == "192.168.87.1"
        log = lab.host("host1").log_path.read_text()
        assert "lost" in log and "claimed back" in log
        assert out and out[0].received >= 95, out     # a moment without a route on host2 at most
        assert datastore(lab, "host1")["lease"]["losses"] == 1


def test_daemons_reach_etcd_over_tls_with_client_certificates(tmp_path: Path) -> None:
    from etcd_helpers import make_tls

    from overlayd.lab.etcd import EtcdTLS

    underlay = "192.168.88.0/24"
    files = make_tls(tmp_path, server_ips=("192.168.88.254",))   # underlay_cluster's first
    tls = EtcdTLS(files.ca_cert, files.server_cert, files.server_key, client_cert_auth=True,
                  probe_cert_file=files.client_cert, probe_key_file=files.client_key)
    with EtcdLab(2, tls=tls, cidr="10.88.0.0/16", underlay=underlay, ready_timeout_s=30) as lab:
        assert lab.member_addresses() == ["192.168.88.254"]
        lab.wait_mesh(timeout_s=20)
        assert datastore(lab, "host1")["endpoint"].startswith("https://192.168.88.254")
        checked = lab.exec("host1", [sys.executable, "-m", "overlayd", "check", "-c",
                                     str(lab.host("host1").config_path), "--connect"],
                           timeout_s=30, check=False)
        assert checked.returncode == 0 and "network config: ok" in checked.stdout, \
            checked.stdout + checked.stderr
