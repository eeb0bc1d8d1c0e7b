"""The wireguard backend's config: map keys, the [wireguard] section, the key file and
`overlayd keys`; every problem named by file, key and reason (exit 78)."""

from __future__ import annotations

import base64
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from overlayd.control.config import load_config
from overlayd.control.local_node import build_local_view
from overlayd.control.problems import ConfigError
from overlayd.control.wg_keys import load_or_create_private_key
from overlayd.control.wg_noise import generate_private_key, public_key
from overlayd.runtime.wireguard import check_own_public_key

REPO = Path(__file__).resolve().parent.parent


def b64(key: bytes) -> str:
    return base64.b64encode(key).decode()


KEY_A, KEY_B = generate_private_key(), generate_private_key()


def wg_map(a_key: str | None = b64(public_key(KEY_A)), b_key: str = b64(public_key(KEY_B)),
           backend: str = 'type = "wireguard"') -> str:
    a_line = f'public_key = "{a_key}"' if a_key is not None else ""
    return f"""
[network]
cidr = "10.5.0.0/16"
subnet_len = 24

[backend]
{backend}

[[nodes]]
name = "a"
subnet = "10.5.1.0/24"
public_ip = "192.0.2.1"
{a_line}

[[nodes]]
name = "b"
subnet = "10.5.2.0/24"
public_ip = "192.0.2.2"
public_key = "{b_key}"
routes = ["172.20.0.0/16"]
"""


def write(tmp_path: Path, smap: str, extra: str = "") -> Path:
    (tmp_path / "map.toml").write_text(smap)
    path = tmp_path / "overlayd.toml"
    path.write_text(f'[node]\nname = "a"\n[map]\nfile = "map.toml"\n{extra}')
    return path


def problems(path: Path) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config(path)
    return [str(p) for p in info.value.problems]


def test_wireguard_map_defaults_port_mtu_and_allowed_ips(tmp_path: Path) -> None:
    config, smap = load_config(write(tmp_path, wg_map()))
    assert smap.backend.type == "wireguard" and smap.backend.port == 51820
    me = smap.node_named("a")
    assert me is not None
    view = build_local_view(smap, me, 1500)
    assert view.device_mtu == 1500 - 60
    (peer,) = view.tables.peers
    assert peer.public_key == public_key(KEY_B) and peer.path_mtu == 1440
    # the peer's allowed IPs are its subnet and its extra prefixes
    assert sorted(r[:2] for r in view.tables.routes if r[2] == 0) == sorted(
        [(0x0A050200, 24), (0xAC140000, 16)])
    assert config.wireguard is not None
    assert config.wireguard.private_key_file == Path("/var/lib/overlayd/overlay0.key")
    assert config.wireguard.rekey_after_seconds == 120.0


def test_public_key_required_valid_and_unique(tmp_path: Path) -> None:
    found = problems(write(tmp_path, wg_map(a_key=None)))
    assert any("nodes[0].public_key" in p and "required" in p for p in found), found
    found = problems(write(tmp_path, wg_map(a_key="not-a-key")))
    assert any("nodes[0].public_key" in p and "not a WireGuard key" in p for p in found), found
    same = b64(public_key(KEY_B))
    found = problems(write(tmp_path, wg_map(a_key=same)))
    assert any("nodes[1].public_key" in p and "duplicate" in p for p in found), found


def test_public_key_refused_on_other_backends(tmp_path: Path) -> None:
    found = problems(write(tmp_path, wg_map(backend='type = "udp"')))
    assert any("public_key" in p and "only meaningful" in p for p in found), found


def test_wireguard_section_is_validated(tmp_path: Path) -> None:
    extra = "[wireguard]\nrekey_after_seconds = 200\nreject_after_seconds = 100\nbogus = 1\n"
    found = problems(write(tmp_path, wg_map(), extra))
    assert any("wireguard.reject_after_seconds" in p for p in found), found
    assert any("wireguard.bogus" in p for p in found), found


def test_private_key_created_once_with_mode_0600(tmp_path: Path) -> None:
    path = tmp_path / "keys" / "wg.key"
    key = load_or_create_private_key(path, "cfg")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert load_or_create_private_key(path, "cfg") == key       # never regenerated
    path.chmod(0o644)
    with pytest.raises(ConfigError, match="readable by others"):
        load_or_create_private_key(path, "cfg")


def test_own_public_key_must_match_the_private_key(tmp_path: Path) -> None:
    _, smap = load_config(write(tmp_path, wg_map()))
    check_own_public_key(smap, "map.toml", "a", public_key(KEY_A))
    with pytest.raises(ConfigError) as info:
        check_own_public_key(smap, "map.toml", "a", public_key(KEY_B))
    assert "nodes[0].public_key" in str(info.value)
    assert b64(public_key(KEY_B)) in str(info.value)      # tells the operator the right one


def test_overlayd_keys_prints_the_public_key_before_the_map_has_it(tmp_path: Path) -> None:
    # the map has no key for this node yet: `keys` must still work (that is how one gets it)
    config = write(tmp_path, wg_map(a_key=None), '[wireguard]\nprivate_key_file = "my.key"\n')
    run = [sys.executable, "-m", "overlayd", "keys", "-c", str(config)]
    first = subprocess.run(run, check=False, capture_output=True, text=True, cwd=REPO, timeout=30)
    assert first.returncode == 0, first.stderr
    private = base64.b64decode((tmp_path / "my.key").read_text())
    assert first.stdout.strip() == b64(public_key(private))
    again = subprocess.run(run, check=False, capture_output=True, text=True, cwd=REPO, timeout=30)
    assert again.stdout == first.stdout
    # and `wg pubkey` agrees, where wireguard-tools are installed
    try:
        wg = subprocess.run(["wg", "pubkey"], check=False, input=(tmp_path / "my.key").read_text(),
                            capture_output=True, text=True, timeout=10)
    except FileNotFoundError:
        return
    assert wg.stdout.strip() == first.stdout.strip()


def test_check_accepts_the_shipped_wireguard_map_and_config(tmp_path: Path) -> None:
    shipped = (REPO / "configs" / "overlayd.toml").read_text()
    config = tmp_path / "overlayd.toml"
    # the shipped config, pointed at the shipped wireguard map
    config.write_text(shipped.replace('file = "map.toml"',
                                      f'file = "{REPO / "configs" / "map-wireguard.toml"}"'))
    result = subprocess.run([sys.executable, "-m", "overlayd", "check", "-c", str(config),
                             "--any-host"], check=False, capture_output=True, text=True,
                            cwd=REPO, timeout=30)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "backend wireguard port 51820" in result.stdout
