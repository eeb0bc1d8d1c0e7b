"""`overlayd net init|leases` against real etcd: on 127.0.0.1 (in-process CLI), and across
network namespaces with a three-member cluster (the CLI as an operator runs it, on a host)."""

from __future__ import annotations

import ipaddress
import json
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from etcd_helpers import ETCD_MARKS, TLSFiles, make_tls, run, unique_prefix
from netns_helpers import netns_required

from overlayd.cli import main
from overlayd.control.flannel_schema import config_key, lease_json, subnet_key
from overlayd.io.etcd_store import EtcdStore
from overlayd.io.store_protocol import KeyValue
from overlayd.lab import Lab
from overlayd.lab.etcd import EtcdCluster, EtcdTLS, loopback_cluster, underlay_cluster

pytestmark = ETCD_MARKS


@pytest.fixture(scope="module")
def etcd() -> Iterator[EtcdCluster]:
    with loopback_cluster(1) as cluster:
        yield cluster


def net(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """Run `overlayd net ...` in-process: (exit code, stdout, stderr)."""
    try:
        code = main(["net", *args])
    except SystemExit as exc:          # argparse's own refusals
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def read(cluster: EtcdCluster, key: str) -> KeyValue | None:
    async def get() -> KeyValue | None:
        store = EtcdStore(cluster.endpoints)
        try:
            return await store.get(key)
        finally:
            await store.close()
    return run(get())


def write(cluster: EtcdCluster, items: list[tuple[str, bytes, int | None]]) -> None:
    """Put (key, value, ttl) by hand; a ttl attaches a fresh etcd lease, None means none."""
    async def put_all() -> None:
        store = EtcdStore(cluster.endpoints)
        try:
            for key, value, ttl in items:
                lease = await store.grant_lease(ttl) if ttl is not None else 0
                await store.put(key, value, lease=lease)
        finally:
            await store.close()
    run(put_all())


# -- net init -----------------------------------------------------------------------------------

def test_init_writes_flannels_config(etcd: EtcdCluster, capsys: pytest.CaptureFixture[str]) -> None:
    prefix = unique_prefix()
    code, out, err = net(capsys, "init", "--etcd-endpoints", *etcd.endpoints, "--prefix", prefix,
                         "--network", "10.5.0.0/16", "--subnet-len", "26", "--backend", "vxlan",
                         "--vni", "4", "--port", "4789")
    assert (code, err) == (0, "")
    kv = read(etcd, config_key(prefix))
    assert kv is not None and kv.lease == 0
    assert kv.value == (b'{"Network":"10.5.0.0/16","SubnetLen":26,'
                        b'"Backend":{"Type":"vxlan","VNI":4,"Port":4789}}')
    assert f"{prefix}/config: written" in out


def test_init_accepts_an_equivalent_config_and_leaves_it(
        etcd: EtcdCluster, capsys: pytest.CaptureFixture[str]) -> None:
    prefix = unique_prefix()
    by_hand = b'{ "network": "10.5.0.0/16", "backend": { "type": "udp" } }'   # flannel reads it
    write(etcd, [(config_key(prefix), by_hand, None)])
    before = read(etcd, config_key(prefix))
    code, out, _ = net(capsys, "init", "--etcd-endpoints", *etcd.endpoints, "--prefix", prefix,
                       "--network", "10.5.0.0/16")
    assert code == 0 and "already holds this network config" in out
    assert read(etcd, config_key(prefix)) == before


def test_init_refuses_a_different_config_unless_forced(
        etcd: EtcdCluster, capsys: pytest.CaptureFixture[str]) -> None:
    prefix = unique_prefix()
    args = ["init", "--etcd-endpoints", *etcd.endpoints, "--prefix", prefix]
    assert net(capsys, *args, "--network", "10.5.0.0/16")[0] == 0
    first = read(etcd, config_key(prefix))
    code, out, err = net(capsys, *args, "--network", "10.6.0.0/16")
    assert code == 1 and out == ""
    assert err.count("\n") == 1 and "already holds a different network config" in err
    assert "--force" in err and config_key(prefix) in err
    assert read(etcd, config_key(prefix)) == first
    code, out, _ = net(capsys, *args, "--network", "10.6.0.0/16", "--force")
    assert code == 0 and "replaced" in out
    kv = read(etcd, config_key(prefix))
    assert kv is not None and kv.value == b'{"Network":"10.6.0.0/16","Backend":{"Type":"udp"}}'


def test_init_force_warns_about_leases_the_new_network_leaves_out(
        etcd: EtcdCluster, capsys: pytest.CaptureFixture[str]) -> None:
    prefix = unique_prefix()
    args = ["init", "--etcd-endpoints", *etcd.endpoints, "--prefix", prefix]
    net(capsys, *args, "--network", "10.5.0.0/16")
    write(etcd, [(subnet_key(ipaddress.IPv4Network("10.5.3.0/24"), prefix),
                  lease_json(ipaddress.IPv4Address("192.0.2.3"), ""), None)])
    code, _, err = net(capsys, *args, "--network", "10.6.0.0/16", "--force")
    assert code == 0 and "1 lease(s) lie outside" in err and "10.5.3.0/24" in err


@pytest.mark.parametrize("extra, message", [
    (["--network", "10.5.0.0/16", "--subnet-len", "17"],
     "--subnet-len: /17 does not fit four times into Network 10.5.0.0/16"),
    (["--network", "10.5.0.0/16", "--subnet-min", "10.9.0.0"],
     "--subnet-min: 10.9.0.0 is outside Network 10.5.0.0/16"),
    (["--network", "10.5.0.0/16", "--subnet-max", "10.5.0.7"], "--subnet-max: 10.5.0.7 is not"),
    (["--network", "10.5.0.0/16", "--vni", "3"], "--vni applies only to --backend vxlan"),
    (["--network", "10.5.0.0/16", "--backend", "vxlan", "--vni", "70000"], "--vni: 70000"),
    (["--network", "10.5.0.0/30"], "--network: 10.5.0.0/30 is too small"),
    (["--network", "10.5.0.0/16", "--prefix", "coreos"], "--prefix 'coreos' must be"),
])
def test_init_refuses_bad_input_with_the_option_named(
        etcd: EtcdCluster, capsys: pytest.CaptureFixture[str], extra: list[str],
        message: str) -> None:
    prefix = unique_prefix()
    code, _, err = net(capsys, "init", "--etcd-endpoints", *etcd.endpoints, "--prefix", prefix,
                       *extra)
    assert code == 64
    assert message in err, err
    assert read(etcd, config_key(prefix)) is None


def test_init_refuses_a_network_that_is_not_one(
        etcd: EtcdCluster, capsys: pytest.CaptureFixture[str]) -> None:
    for bad, reason in (("10.5.0.1/16", "host bits set"), ("10.5.0.0", "needs a prefix length"),
                        ("banana/8", "not an IPv4 network")):
        code, _, err = net(capsys, "init", "--etcd-endpoints", *etcd.endpoints,
                           "--network", bad)
        assert code == 2 and reason in err


# -- net leases ---------------------------------------------------------------------------------

def flannel_written_leases(prefix: str) -> list[tuple[str, bytes, int | None]]:
    """What three flannel nodes leave in etcd, byte for byte: a vxlan node, a udp node (whose
    lease has no BackendType) and an operator's reservation; plus one garbage value."""
    return [
        (f"{prefix}/subnets/10.5.1.0-24",
         (b'{"PublicIP":"192.0.2.1","PublicIPv6":null,"BackendType":"vxlan",'
         b'"BackendData":{"VNI":1,"VtepMAC":"0e:2a:00:00:00:01"}}'), 3600),
        (f"{prefix}/subnets/10.5.2.0-24", b'{"PublicIP":"192.0.2.2","PublicIPv6":null}', 120),
        (f"{prefix}/subnets/10.5.9.0-24", b'{"PublicIP":"192.0.2.9","PublicIPv6":null}', None),
        (f"{prefix}/subnets/10.5.4.0-24", b"not json", None),
    ]


def test_leases_json_lists_every_field_and_ttl(
        etcd: EtcdCluster, capsys: pytest.CaptureFixture[str]) -> None:
    prefix = unique_prefix()
    write(etcd, flannel_written_leases(prefix))
    code, out, _ = net(capsys, "leases", "--etcd-endpoints", *etcd.endpoints, "--prefix", prefix,
                       "--json")
    assert code == 0
    result = json.loads(out)
    leases = {lease["subnet"]: lease for lease in result["leases"]}
    assert list(leases) == ["10.5.1.0/24", "10.5.2.0/24", "10.5.9.0/24"]
    vxlan = leases["10.5.1.0/24"]
    assert (vxlan["public_ip"], vxlan["backend"], vxlan["vni"], vxlan["vtep_mac"],
            vxlan["reservation"]) == ("192.0.2.1", "vxlan", 1, "0e:2a:00:00:00:01", False)
    assert 3590 <= vxlan["ttl_seconds"] <= 3600 and vxlan["etcd_lease"] > 0
    udp = leases["10.5.2.0/24"]
    assert (udp["backend"], udp["vni"], udp["vtep_mac"]) == ("udp", None, None)
    assert 110 <= udp["ttl_seconds"] <= 120
    reserved = leases["10.5.9.0/24"]
    assert (reserved["reservation"], reserved["ttl_seconds"], reserved["etcd_lease"]) == \
        (True, None, 0)
    assert [bad["key"] for bad in result["invalid"]] == [f"{prefix}/subnets/10.5.4.0-24"]
    assert "not JSON" in result["invalid"][0]["error"]


def test_leases_table(etcd: EtcdCluster, capsys: pytest.CaptureFixture[str]) -> None:
    prefix = unique_prefix()
    write(etcd, flannel_written_leases(prefix))
    code, out, _ = net(capsys, "leases", "--etcd-endpoints", *etcd.endpoints, "--prefix", prefix)
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split() == ["SUBNET", "PUBLIC", "IP", "BACKEND", "VNI", "VTEP", "MAC", "TTL"]
    assert lines[1].split()[:5] == ["10.5.1.0/24", "192.0.2.1", "vxlan", "1", "0e:2a:00:00:00:01"]
    assert lines[1].split()[5].startswith("59m")
    assert lines[2].split() == ["10.5.2.0/24", "192.0.2.2", "udp", "-", "-", lines[2].split()[5]]
    assert lines[3].split()[-1] == "reservation"
    assert lines[4].startswith(f"invalid: {prefix}/subnets/10.5.4.0-24: not JSON")


def test_leases_when_there_are_none(etcd: EtcdCluster,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    prefix = unique_prefix()
    code, out, _ = net(capsys, "leases", "--etcd-endpoints", *etcd.endpoints, "--prefix", prefix)
    assert (code, out.strip()) == (0, f"no leases under {prefix}/subnets/")


def test_unreachable_etcd_is_one_line_and_exit_69(capsys: pytest.CaptureFixture[str]) -> None:
    from overlayd.lab.etcd import free_loopback_ports

    port = free_loopback_ports(1)[0]
    code, out, err = net(capsys, "leases", "--etcd-endpoints", f"http://127.0.0.1:{port}",
                         "--timeout", "1")
    assert code == 69 and out == ""
    assert err.count("\n") == 1 and "etcd unavailable" in err and str(port) in err


def test_endpoint_lists_may_be_comma_separated(
        etcd: EtcdCluster, capsys: pytest.CaptureFixture[str]) -> None:
    from overlayd.lab.etcd import free_loopback_ports

    dead = f"http://127.0.0.1:{free_loopback_ports(1)[0]}"
    code, out, _ = net(capsys, "leases", "--etcd-endpoints", f"{dead},{etcd.endpoints[0]}",
                       "--prefix", unique_prefix())
    assert code == 0 and out.startswith("no leases")


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> TLSFiles:
    return make_tls(tmp_path_factory.mktemp("tls"))


def test_leases_over_tls_with_a_client_certificate(
        tls_files: TLSFiles, capsys: pytest.CaptureFixture[str]) -> None:
    server = EtcdTLS(tls_files.ca_cert, tls_files.server_cert, tls_files.server_key,
                     probe_cert_file=tls_files.client_cert, probe_key_file=tls_files.client_key)
    with loopback_cluster(1, tls=server) as cluster:
        common = ["--etcd-endpoints", *cluster.endpoints, "--ca-file", str(tls_files.ca_cert)]
        client = ["--cert-file", str(tls_files.client_cert),
                  "--key-file", str(tls_files.client_key)]
        code, _, err = net(capsys, "init", *common, *client, "--network", "10.5.0.0/16")
        assert (code, err) == (0, "")
        code, out, _ = net(capsys, "leases", *common, *client)
        assert code == 0 and out.startswith("no leases")
        code, _, err = net(capsys, "leases", *common, "--timeout", "2")
        assert code == 69 and "no client certificate was given" in err
        code, _, err = net(capsys, "leases", *common, "--cert-file", str(tls_files.client_cert))
        assert code == 64 and "go together" in err
        plain = cluster.endpoints[0].replace("https://", "http://")
        code, _, err = net(capsys, "leases", "--etcd-endpoints", plain, "--ca-file",
                           str(tls_files.ca_cert), *client)
        assert code == 64 and "is http://" in err


# -- across namespaces, three members -----------------------------------------------------------

@netns_required
def test_cli_on_a_host_against_a_three_member_cluster_in_namespaces(tmp_path: Path) -> None:
    """etcd members each in a namespace of their own on the lab underlay; the CLI runs on a
    host, reaches them over the underlay, and goes on when the member it used is killed."""
    with Lab(1, start=False) as lab, underlay_cluster(lab, 3) as cluster:
        host = lab.hosts[0]
        cli = [sys.executable, "-m", "overlayd", "net"]
        endpoints = ["--etcd-endpoints", *cluster.endpoints, "--timeout", "2"]
        done = lab.exec(host, [*cli, "init", *endpoints, "--network", "10.5.0.0/16",
                               "--backend", "vxlan"], timeout_s=30)
        assert done.returncode == 0, done.stderr
        cluster.kill_member("etcd1")            # the first endpoint, the one the CLI uses
        cluster.wait_healthy(["etcd2", "etcd3"])  # past a new election, if etcd1 led
        listed = lab.exec(host, [*cli, "leases", *endpoints, "--json"], timeout_s=30)
        assert listed.returncode == 0, listed.stderr + cluster.logs()
        assert json.loads(listed.stdout)["leases"] == []
        again = lab.exec(host, [*cli, "init", *endpoints, "--network", "10.5.0.0/16",
                                "--backend", "vxlan"], timeout_s=30)
        assert again.returncode == 0 and "already holds" in again.stdout, again.stderr
