"""`[map] source = "etcd"`: its keys validated like every other (file, key, reason; exit 78),
`overlayd check --connect` against a real etcd, and subnet.env written atomically."""

from __future__ import annotations

import ipaddress
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from overlayd.control import subnet_env
from overlayd.control.config import load_config
from overlayd.control.problems import ConfigError
from overlayd.io.atomic_file import write_atomic
from overlayd.lab.etcd import EtcdCluster, etcd_unavailable, loopback_cluster

REPO = Path(__file__).resolve().parent.parent
ETCD = '[map]\nsource = "etcd"\nendpoints = ["http://10.0.0.1:2379", "https://etcd-2:2379"]\n'


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "overlayd.toml"
    path.write_text(text)
    return path


def problems(tmp_path: Path, text: str) -> list[tuple[str, str]]:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text))
    return [(p.key, p.reason) for p in info.value.problems]


def check(path: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "overlayd", "check", "-c", str(path), *extra],
                          check=False, capture_output=True, text=True, timeout=60, cwd=REPO)


def test_etcd_source_defaults() -> None:
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        config, smap = load_config(write(Path(d), ETCD))
    assert smap is None and config.map_source == "etcd" and config.etcd is not None
    e = config.etcd
    assert e.endpoints == ("http://10.0.0.1:2379", "https://etcd-2:2379")
    assert e.prefix == "/coreos.com/network" and e.lease_ttl_seconds == 86400
    assert e.public_ip is None and e.interface is None and e.ca_file is None
    assert config.subnet_env == Path("/run/flannel/subnet.env")


@pytest.mark.parametrize("extra,key,reason", [
    ("", "map.endpoints", "missing"),
    ('endpoints = []\n', "map.endpoints", "non-empty array"),
    ('endpoints = ["10.0.0.1"]\n', "map.endpoints[0]", "http://HOST:PORT"),
    ('endpoints = ["http://a:1"]\nfile = "map.toml"\n', "map.file", "unknown key"),
    ('endpoints = ["http://a:1"]\nprefix = "coreos"\n', "map.prefix", "absolute"),
    ('endpoints = ["http://a:1"]\nlease_ttl_seconds = 5\n', "map.lease_ttl_seconds",
     "out of range"),
    ('endpoints = ["http://a:1"]\npublic_ip = "1.2.3"\n', "map.public_ip", "IPv4"),
    ('endpoints = ["http://a:1"]\npublic_ip = "1.2.3.4"\ninterface = "eth0"\n',
     "map.interface", "not both"),
    ('endpoints = ["https://a:1"]\nca_file = "nope.pem"\n', "map.ca_file", "file not found"),
    ('endpoints = ["https://a:1"]\ncert_file = "overlayd.toml"\n', "map.cert_file",
     "go together"),
    ('endpoints = ["http://a:1"]\nca_file = "overlayd.toml"\n', "map.endpoints[0]",
     "use https://"),
    ('endpoints = ["http://a:1"]\nsubnet_env = 3\n', "map.subnet_env", "file path"),
])
def test_bad_etcd_keys_name_key_and_reason(tmp_path: Path, extra: str, key: str,
                                           reason: str) -> None:
    found = problems(tmp_path, '[map]\nsource = "etcd"\n' + extra)
    assert any(k == key and reason in r for k, r in found), found


def test_check_exits_78_naming_the_key(tmp_path: Path) -> None:
    result = check(write(tmp_path, '[map]\nsource = "etcd"\nendpoints = ["x"]\n'), "--any-host")
    assert result.returncode == 78
    assert f"{tmp_path / 'overlayd.toml'}: map.endpoints[0]: 'x'" in result.stderr


def test_subnet_env_renders_flannels_variables_and_reads_back() -> None:
    text = subnet_env.render(ipaddress.IPv4Network("10.5.0.0/16"),
                             ipaddress.IPv4Network("10.5.7.0/24"), 1450)
    assert text == ("FLANNEL_NETWORK=10.5.0.0/16\nFLANNEL_SUBNET=10.5.7.1/24\n"
                    "FLANNEL_MTU=1450\nFLANNEL_IPMASQ=false\n")
    assert subnet_env.previous_subnet(text) == ipaddress.IPv4Network("10.5.7.0/24")
    assert subnet_env.previous_subnet("FLANNEL_SUBNET=banana\n") is None
    assert subnet_env.previous_subnet("") is None


def test_write_atomic_replaces_whole_and_leaves_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "run" / "flannel" / "subnet.env"
    write_atomic(target, "A=1\n")
    inode = os.stat(target).st_ino
    write_atomic(target, "A=2\n")
    assert target.read_text() == "A=2\n" and os.stat(target).st_ino != inode
    assert sorted(p.name for p in target.parent.iterdir()) == ["subnet.env"]
    assert oct(os.stat(target).st_mode & 0o777) == "0o644"


# -- check --connect against a real etcd -------------------------------------------------------

@pytest.fixture(scope="module")
def etcd() -> Iterator[EtcdCluster]:
    if etcd_unavailable():
        pytest.skip(etcd_unavailable() or "")
    with loopback_cluster() as cluster:
        yield cluster


def connect_config(tmp_path: Path, endpoints: list[str], prefix: str) -> Path:
    quoted = ", ".join(f'"{e}"' for e in endpoints)
    return write(tmp_path, f'[map]\nsource = "etcd"\nendpoints = [{quoted}]\n'
                           f'prefix = "{prefix}"\npublic_ip = "192.0.2.1"\n')


def put(cluster: EtcdCluster, key: str, value: str) -> None:
    subprocess.run(["etcdctl", "--endpoints", ",".join(cluster.endpoints), "put", key, value],
                   env={**os.environ, "ETCDCTL_API": "3"}, check=True, capture_output=True,
                   timeout=20)


def test_check_connect_says_whether_etcd_answers_and_the_config_is_valid(
        tmp_path: Path, etcd: EtcdCluster) -> None:
    path = connect_config(tmp_path, etcd.endpoints, "/check-test")
    missing = check(path, "--connect")
    assert missing.returncode == 78 and "etcd: answers at" in missing.stdout
    assert "/check-test/config is missing" in missing.stdout
    put(etcd, "/check-test/config", '{"Network": "10.9.0.0/16", "SubnetLen": 17}')
    bad = check(path, "--connect")
    assert bad.returncode == 78 and "SubnetLen" in bad.stdout, bad.stdout
    put(etcd, "/check-test/config", '{"Network": "10.9.0.0/16", "Backend": {"Type": "vxlan"}}')
    good = check(path, "--connect")
    assert good.returncode == 0, good.stdout + good.stderr
    assert "network 10.9.0.0/16, /24 subnets" in good.stdout and "backend vxlan" in good.stdout
    assert "this node: public IP 192.0.2.1" in good.stdout
    # without --connect, etcd is not asked
    assert check(connect_config(tmp_path, ["http://127.0.0.1:9"], "/x")).returncode == 0


def test_check_connect_when_etcd_does_not_answer(tmp_path: Path) -> None:
    result = check(connect_config(tmp_path, ["http://127.0.0.1:9"], "/x"), "--connect")
    assert result.returncode == 69 and "etcd: does not answer" in result.stdout, result.stdout


def test_node_name_is_refused_with_etcd(tmp_path: Path) -> None:
    found = problems(tmp_path, '[node]\nname = "a"\n' + ETCD)
    assert any(k == "node.name" and "public IP" in r for k, r in found), found


def test_the_shipped_etcd_example_passes_check() -> None:
    result = check(REPO / "configs" / "overlayd-etcd.toml", "--any-host")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "map: etcd http://10.0.0.5:2379" in result.stdout
