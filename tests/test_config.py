"""Config and subnet-map validation: every problem named by file, key and reason; exit 78."""

from __future__ import annotations

import ipaddress
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from overlayd.control.config import load_config
from overlayd.control.local_node import build_local_view, find_local_node
from overlayd.control.problems import ConfigError
from overlayd.control.subnet_map import derive_vtep_mac, parse_subnet_map
from overlayd.dataplane.tables import LOCAL

REPO = Path(__file__).resolve().parent.parent

GOOD_MAP = """
[network]
cidr = "10.5.0.0/16"
subnet_len = 24

[backend]
type = "udp"

[[nodes]]
name = "a"
subnet = "10.5.1.0/24"
public_ip = "192.0.2.1"

[[nodes]]
name = "b"
subnet = "10.5.2.0/24"
public_ip = "192.0.2.2"
underlay_mtu = 1400
routes = ["172.20.0.0/16"]
"""


def write(tmp_path: Path, config: str, smap: str = GOOD_MAP) -> Path:
    (tmp_path / "map.toml").write_text(smap)
    path = tmp_path / "overlayd.toml"
    path.write_text(config)
    return path


def problems_of(path: Path) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config(path)
    return [str(p) for p in info.value.problems]


def test_minimal_config_gets_documented_defaults(tmp_path: Path) -> None:
    config, smap = load_config(write(tmp_path, '[map]\nfile = "map.toml"\n'))
    assert config.device_name == "overlay0"
    assert config.batch_size == 64
    assert config.map_file == tmp_path / "map.toml"
    assert smap.backend.port == 8285          # flannel's udp default
    assert smap.nodes[0].address == ipaddress.IPv4Address("10.5.1.0")   # flannel: subnet .0


def test_every_problem_of_both_files_is_reported(tmp_path: Path) -> None:
    bad_map = """
[network]
cidr = "10.5.0.1/16"
subnet_len = 24
[backend]
type = "udpx"
[[nodes]]
name = "a"
subnet = "10.5.1.0/24"
public_ip = "192.0.2.1"
colour = 3
"""
    path = write(tmp_path, '[map]\nfile = "map.toml"\n[device]\nname = "x" \n'
                           '[dataplane]\nbatch_size = 0\n[bogus]\n', bad_map)
    found = problems_of(path)
    cfg, mp = str(path), str(tmp_path / "map.toml")
    assert f"{cfg}: dataplane.batch_size: 0 is out of range 1..512" in found
    assert any(p.startswith(f"{cfg}: bogus: unknown key") for p in found)
    assert any(p.startswith(f"{mp}: network.cidr:") and "host bits" in p for p in found)
    assert any(p.startswith(f"{mp}: backend.type:") for p in found)
    assert any(p.startswith(f"{mp}: nodes[0].colour: unknown key") for p in found)


TWO_NODES = ('name="a"\nsubnet="10.5.1.0/24"\npublic_ip="192.0.2.1"\n[[nodes]]\n'
             'name="{name_b}"\nsubnet="{subnet_b}"\npublic_ip="{ip_b}"')


@pytest.mark.parametrize("nodes, key, words", [
    (TWO_NODES.format(subnet_b="10.5.1.0/24", ip_b="192.0.2.2", name_b="b"),
     "nodes[1].subnet", "overlaps"),
    ('name="a"\nsubnet="10.6.1.0/24"\npublic_ip="192.0.2.1"', "nodes[0].subnet", "outside"),
    ('name="a"\nsubnet="10.5.1.0/25"\npublic_ip="192.0.2.1"', "nodes[0].subnet", "subnet_len"),
    (TWO_NODES.format(subnet_b="10.5.2.0/24", ip_b="192.0.2.1", name_b="b"),
     "nodes[1].public_ip", "duplicate"),
    (TWO_NODES.format(subnet_b="10.5.2.0/24", ip_b="192.0.2.2", name_b="a"),
     "nodes[1].name", "duplicate"),
    ('name="a"\nsubnet="10.5.1.0/24"\npublic_ip="nope"', "nodes[0].public_ip", "not an IPv4"),
    ('name="a"\nsubnet="10.5.1.0/24"\npublic_ip="192.0.2.1"\naddress="10.5.9.1"',
     "nodes[0].address", "not inside"),
    ('subnet="10.5.1.0/24"\npublic_ip="192.0.2.1"', "nodes[0].name", "missing"),
])
def test_map_errors_name_the_key(nodes: str, key: str, words: str) -> None:
    text = f'[network]\ncidr="10.5.0.0/16"\nsubnet_len=24\n[[nodes]]\n{nodes}\n'
    import tomllib
    with pytest.raises(ConfigError) as info:
        parse_subnet_map(tomllib.loads(text), "m.toml")
    assert any(p.key == key and words in p.reason for p in info.value.problems), \
        info.value.problems


def test_unknown_own_node_by_name_and_by_address() -> None:
    import tomllib
    smap = parse_subnet_map(tomllib.loads(GOOD_MAP), "m.toml")
    with pytest.raises(ConfigError, match="unknown own node 'zz'"):
        find_local_node(smap, "m.toml", "zz", [])
    with pytest.raises(ConfigError, match="unknown own node"):
        find_local_node(smap, "m.toml", None, [ipaddress.IPv4Address("203.0.113.9")])
    me = find_local_node(smap, "m.toml", None, [ipaddress.IPv4Address("192.0.2.2")])
    assert me.name == "b"


def test_local_view_routes_and_path_mtu() -> None:
    import tomllib
    smap = parse_subnet_map(tomllib.loads(GOOD_MAP), "m.toml")
    view = build_local_view(smap, smap.nodes[0], underlay_mtu=1500)
    assert view.device_mtu == 1472                       # underlay - 28 for udp
    (peer,) = view.tables.peers
    assert peer.path_mtu == 1400 - 28                    # the smaller underlay wins
    assert peer.port == 8285
    routes = set(view.tables.routes)
    assert (int(ipaddress.IPv4Address("10.5.1.0")), 24, LOCAL) in routes
    assert (int(ipaddress.IPv4Address("10.5.2.0")), 24, 0) in routes
    assert (int(ipaddress.IPv4Address("172.20.0.0")), 16, 0) in routes


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "overlayd", *args], capture_output=True,
                          text=True, timeout=60, cwd=REPO, check=False)


def test_check_accepts_shipped_examples() -> None:
    result = run_cli("check", "-c", str(REPO / "configs" / "overlayd.toml"), "--any-host")
    assert result.returncode == 0, result.stderr
    assert "ok" in result.stdout


def test_check_exits_78_with_lines_not_tracebacks(tmp_path: Path) -> None:
    path = write(tmp_path, '[map]\nfile = "map.toml"\n[node]\nname = "nobody"\n')
    result = run_cli("check", "-c", str(path))
    assert result.returncode == 78
    assert "Traceback" not in result.stderr
    assert "unknown own node 'nobody'" in result.stderr
    broken = tmp_path / "broken.toml"
    broken.write_text("[map\n")
    result = run_cli("check", "-c", str(broken))
    assert result.returncode == 78 and f"{broken}: invalid TOML" in result.stderr
    result = run_cli("check", "-c", str(tmp_path / "missing.toml"))
    assert result.returncode == 78 and "file not found" in result.stderr


VXLAN_MAP = GOOD_MAP.replace('type = "udp"', 'type = "vxlan"\nmode = "switched"\nvni = 7')


def vtep_mac_of(name: str) -> str:
    import tomllib
    smap = parse_subnet_map(tomllib.loads(VXLAN_MAP), "m.toml")
    node = smap.node_named(name)
    assert node is not None
    return node.vtep_mac


def test_switch_keys_defaults_and_values(tmp_path: Path) -> None:
    config, smap = load_config(write(tmp_path, '[map]\nfile = "map.toml"\n', VXLAN_MAP))
    assert (config.mac_ageing_seconds, config.fdb_max_entries, config.static_macs) == (
        300.0, 16384, ())
    assert (config.fdb_max_entries_per_port, config.mac_move_hold_seconds,
            config.storm_rate_per_second, config.storm_burst) == (8192, 1.0, 1000.0, 1000.0)
    assert config.tx_sockets == 8
    assert smap.backend.port == 4789 and smap.backend.switched
    config, _ = load_config(write(tmp_path, '[map]\nfile = "map.toml"\n[tunnel]\ntx_sockets = 0\n'
                                  '[switch]\nmac_ageing_seconds = 30\nfdb_max_entries = 4\n'
                                  'static_macs = [{ mac = "02:AA:00:00:00:01", node = "b" },'
                                  ' { mac = "02:aa:00:00:00:02", node = "a" }]\n'
                                  'mac_move_hold_seconds = 0\nstorm_rate_per_second = 50\n',
                                  VXLAN_MAP))
    assert (config.tx_sockets, config.mac_ageing_seconds, config.fdb_max_entries) == (0, 30.0, 4)
    assert (config.fdb_max_entries_per_port, config.mac_move_hold_seconds,
            config.storm_rate_per_second, config.storm_burst) == (2, 0.0, 50.0, 50.0)
    assert [(s.mac, s.node) for s in config.static_macs] == [
        ("02:aa:00:00:00:01", "b"), ("02:aa:00:00:00:02", "a")]


@pytest.mark.parametrize(("switch", "key", "words"), [
    ('static_macs = [{ mac = "01:00:5e:00:00:01", node = "a" }]', "switch.static_macs[0].mac",
     "not a unicast"),
    ('static_macs = [{ mac = "02:00:00:00:00", node = "a" }]', "switch.static_macs[0].mac",
     "not a MAC"),
    ('static_macs = [{ mac = "02:00:00:00:00:01", node = "zz" }]',
     "switch.static_macs[0].node", "unknown node 'zz'"),
    (('static_macs = [{ mac = "02:00:00:00:00:01", node = "a" },'
     ' { mac = "02:00:00:00:00:01", node = "b" }]'), "switch.static_macs[1].mac", "already"),
    ('static_macs = [{ mac = "02:00:00:00:00:01" }]', "switch.static_macs[0].node", "missing"),
    ('static_macs = "02:00:00:00:00:01"', "switch.static_macs", "array of tables"),
    (('fdb_max_entries = 1\nstatic_macs = [{ mac = "02:00:00:00:00:01", node = "a" },'
     ' { mac = "02:00:00:00:00:02", node = "b" }]'), "switch.static_macs", "exceed"),
    ("mac_ageing_seconds = 0", "switch.mac_ageing_seconds", "out of range"),
    ("fdb_max_entries = 10\nfdb_max_entries_per_port = 11",
     "switch.fdb_max_entries_per_port", "more than fdb_max_entries 10"),
    ("fdb_max_entries_per_port = 0", "switch.fdb_max_entries_per_port", "out of range"),
    ("mac_move_hold_seconds = -1", "switch.mac_move_hold_seconds", "out of range"),
    ("mac_move_hold_seconds = nan", "switch.mac_move_hold_seconds", "out of range"),
    ('storm_rate_per_second = "fast"', "switch.storm_rate_per_second", "must be a number"),
    ("storm_burst = 0.5", "switch.storm_burst", "out of range"),
    ("fdb_max_entries = 1", "switch.fdb_max_entries", "cannot hold the 2 pinned MACs"),
    ('static_macs = [{ mac = "VTEP_B", node = "a" }]', "switch.static_macs[0].mac",
     "is the VTEP MAC of node 'b'"),
    ("colour = 1", "switch.colour", "unknown key"),
])
def test_switch_key_problems(tmp_path: Path, switch: str, key: str, words: str) -> None:
    switch = switch.replace("VTEP_B", vtep_mac_of("b"))
    path = write(tmp_path, f'[map]\nfile = "map.toml"\n[switch]\n{switch}\n', VXLAN_MAP)
    found = problems_of(path)
    assert any(p.startswith(f"{path}: {key}: ") and words in p for p in found), found


def test_vxlan_local_view_carries_vtep_macs() -> None:
    import tomllib

    from overlayd.control.local_node import build_switch_tables
    from overlayd.control.subnet_map import derive_vtep_mac
    smap = parse_subnet_map(tomllib.loads(VXLAN_MAP), "m.toml")
    view = build_local_view(smap, smap.nodes[0], underlay_mtu=1500)
    assert view.device_mtu == 1450                       # underlay - 50 for vxlan
    (peer,) = view.tables.peers
    assert peer.path_mtu == 1400 - 50 and peer.port == 4789
    assert peer.mac == bytes.fromhex(derive_vtep_mac(smap.nodes[1].public_ip, 7).replace(":", ""))
    tables = build_switch_tables(view, [("02:aa:00:00:00:01", "b"), ("02:aa:00:00:00:02", "a"),
                                        ("02:aa:00:00:00:03", "gone")])
    assert tables.peers == view.tables.peers
    own, peer_mac = (bytes.fromhex(n.vtep_mac.replace(":", "")) for n in smap.nodes)
    # Every node's VTEP MAC first (pinned to its node), then the config's pins; a config pin
    # of a VTEP MAC to another node does not displace the map's.
    assert tables.static_macs == ((own, LOCAL), (peer_mac, 0),
                                  (bytes.fromhex("02aa00000001"), 0),
                                  (bytes.fromhex("02aa00000002"), LOCAL))
    again = build_switch_tables(view, [(smap.nodes[1].vtep_mac, "a")])
    assert again.static_macs == ((own, LOCAL), (peer_mac, 0))


@pytest.mark.parametrize("map_name", ["map-vxlan.toml", "map-vxlan-switched.toml"])
def test_check_accepts_shipped_vxlan_maps(tmp_path: Path, map_name: str) -> None:
    config = tmp_path / "overlayd.toml"
    config.write_text(f'[map]\nfile = "{REPO / "configs" / map_name}"\n')
    result = run_cli("check", "-c", str(config), "--any-host")
    assert result.returncode == 0, result.stderr
    # Every node's VTEP MAC is shown, and where it came from: a flannel host needs them.
    smap = parse_subnet_map(tomllib.loads((REPO / "configs" / map_name).read_text()), map_name)
    for node in smap.nodes:
        derived = node.vtep_mac == derive_vtep_mac(node.public_ip, smap.backend.vni)
        assert re.search(rf"^{re.escape(node.name)} +{node.public_ip} +{node.vtep_mac} +"
                         rf"{'derived' if derived else 'map'}$", result.stdout, re.MULTILINE), \
            result.stdout
    if map_name == "map-vxlan.toml":
        assert "0e:8a:1c:22:4b:01  map" in result.stdout      # the flannel host's, pinned


def test_overlap_found_among_thousands_of_nodes() -> None:
    """The overlap check scales to a fleet map (a sort, not all pairs) and still names the node."""
    import tomllib
    nodes = "".join(
        f'[[nodes]]\nname="n{i}"\nsubnet="10.{i // 256}.{i % 256}.0/24"\n'
        f'public_ip="172.16.{i // 256}.{i % 256}"\n' for i in range(5000))
    nodes += '[[nodes]]\nname="late"\nsubnet="10.3.7.0/24"\npublic_ip="172.31.0.1"\n'
    text = f'[network]\ncidr="10.0.0.0/8"\nsubnet_len=24\n{nodes}'
    with pytest.raises(ConfigError) as info:
        parse_subnet_map(tomllib.loads(text), "m.toml")
    (problem,) = info.value.problems
    assert problem.key == "nodes[5000].subnet"
    assert "overlaps 10.3.7.0/24 of nodes[775]" in problem.reason


def test_engine_keys_defaults_and_values(tmp_path: Path) -> None:
    config, _ = load_config(write(tmp_path, '[map]\nfile = "map.toml"\n'))
    assert (config.engine, config.threads, config.busy_poll_us) == ("auto", 0, 0)
    config, _ = load_config(write(tmp_path, '[map]\nfile = "map.toml"\n[dataplane]\n'
                                  'engine = "loop"\nthreads = 3\nbusy_poll_us = 50\n'))
    assert (config.engine, config.threads, config.busy_poll_us) == ("loop", 3, 50)


@pytest.mark.parametrize("line, key, words", [
    ('engine = "fibers"', "dataplane.engine", "threads"),
    ("threads = 65", "dataplane.threads", "out of range"),
    ("threads = -1", "dataplane.threads", "out of range"),
    ("busy_poll_us = 100001", "dataplane.busy_poll_us", "out of range"),
])
def test_engine_key_problems(tmp_path: Path, line: str, key: str, words: str) -> None:
    path = write(tmp_path, f'[map]\nfile = "map.toml"\n[dataplane]\n{line}\n')
    found = problems_of(path)
    assert any(p.startswith(f"{path}: {key}: ") and words in p for p in found), found
