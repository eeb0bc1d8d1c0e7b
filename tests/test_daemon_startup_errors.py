"""`overlayd run` refuses to start with one clear line and a specific exit status, never a traceback.

Each case runs the real daemon in a network namespace of its own (root needed) with the fault
made real: /dev/net/tun hidden by a private mount, the UDP port taken, the device name taken by
another device, CAP_NET_ADMIN dropped from the bounding set.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespaces)"),
    pytest.mark.skipif(not os.path.exists("/dev/net/tun"), reason="/dev/net/tun is missing"),
    pytest.mark.skipif(shutil.which("ip") is None, reason="iproute2 (ip) is not installed"),
]

REPO = Path(__file__).resolve().parent.parent
PUBLIC_IP = "192.168.91.1"
MAP = f"""
[network]
cidr = "10.91.0.0/16"
subnet_len = 24
[[nodes]]
name = "solo"
subnet = "10.91.1.0/24"
public_ip = "{PUBLIC_IP}"
[[nodes]]
name = "other"
subnet = "10.91.2.0/24"
public_ip = "192.168.91.2"
"""


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, timeout=10, capture_output=True)


@pytest.fixture
def netns(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A namespace with the node's public IP on a veth device, and a config for it."""
    name = f"ovd-err-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    ip("netns", "add", name)
    try:
        # veth, not dummy: some kernels (this CI's) are built without the dummy driver
        ip("-n", name, "link", "add", "ul0", "type", "veth", "peer", "name", "ul1")
        ip("-n", name, "addr", "add", f"{PUBLIC_IP}/24", "dev", "ul0")
        ip("-n", name, "link", "set", "ul0", "up")
        ip("-n", name, "link", "set", "lo", "up")
        (tmp_path / "map.toml").write_text(MAP)
        config = tmp_path / "overlayd.toml"
        config.write_text('[map]\nfile = "map.toml"\n[metrics]\nenabled = false\n'
                          f'[control]\nsocket = "{tmp_path}/ctl.sock"\n')
        yield name, config
    finally:
        subprocess.run(["ip", "netns", "del", name], timeout=10, capture_output=True, check=False)


def run_daemon(ns: str, config: Path, prefix: tuple[str, ...] = (),
               shell_setup: str = "") -> subprocess.CompletedProcess[str]:
    """Start `overlayd run` and expect it to exit by itself (bounded by a timeout)."""
    cmd = [*prefix, sys.executable, "-m", "overlayd", "run", "-c", str(config)]
    if shell_setup:
        cmd = ["sh", "-c", f'{shell_setup} && exec "$@"', "sh", *cmd]
    return subprocess.run(["ip", "netns", "exec", ns, *cmd], capture_output=True, text=True,
                          timeout=30, cwd=REPO, check=False)


def assert_one_clear_line(result: subprocess.CompletedProcess[str], code: int, words: str) -> None:
    assert result.returncode == code, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr
    assert words in result.stderr, result.stderr


def test_udp_port_in_use(netns: tuple[str, Path]) -> None:
    ns, config = netns
    # Hold the port from inside the namespace with a sleeping process that owns the socket.
    holder = subprocess.Popen(
        ["ip", "netns", "exec", ns, sys.executable, "-c",
         ("import socket,time; s=socket.socket(socket.AF_INET, socket.SOCK_DGRAM); "
          f"s.bind(('{PUBLIC_IP}', 8285)); print('bound', flush=True); time.sleep(30)")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "bound"
        result = run_daemon(ns, config)
        assert_one_clear_line(result, 71, "already in use")
    finally:
        holder.kill()
        holder.wait(timeout=10)


def test_device_name_in_use(netns: tuple[str, Path]) -> None:
    ns, config = netns
    ip("-n", ns, "link", "add", "overlay0", "type", "veth", "peer", "name", "squatter")
    result = run_daemon(ns, config)
    assert_one_clear_line(result, 71, "overlay0")
    assert "[device] name" in result.stderr


def test_missing_dev_net_tun(netns: tuple[str, Path]) -> None:
    ns, config = netns
    if shutil.which("unshare") is None:
        pytest.skip("unshare (util-linux) is not installed")
    # A private mount namespace where /dev/net is an empty tmpfs: the host's stays untouched.
    result = run_daemon(ns, config, prefix=("unshare", "--mount", "--propagation", "private"),
                        shell_setup="mount -t tmpfs none /dev/net")
    assert_one_clear_line(result, 69, "/dev/net/tun is missing")


def test_no_permission(netns: tuple[str, Path]) -> None:
    ns, config = netns
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv (util-linux) is not installed")
    result = run_daemon(ns, config, prefix=("setpriv", "--bounding-set", "-net_admin"))
    assert_one_clear_line(result, 77, "CAP_NET_ADMIN")


def test_config_error_is_78(netns: tuple[str, Path]) -> None:
    ns, config = netns
    config.write_text(config.read_text() + '[node]\nname = "ghost"\n')
    result = run_daemon(ns, config)
    assert_one_clear_line(result, 78, "unknown own node 'ghost'")


def test_bind_address_not_local(netns: tuple[str, Path]) -> None:
    ns, config = netns
    # The daemon waits for a bind address that is not (yet) local (a boot race); 0.5 s here.
    config.write_text(config.read_text() + '[node]\nname = "solo"\nwait_for_address_seconds = 0.5\n'
                      '[tunnel]\nbind = "192.168.91.77"\n')
    result = run_daemon(ns, config)
    assert_one_clear_line(result, 71, "not an address of this host")


def test_port_is_free_again_after_failures(netns: tuple[str, Path]) -> None:
    """A failed start leaves nothing behind: the device is gone and the port can be bound."""
    ns, config = netns
    ip("-n", ns, "link", "add", "overlay0", "type", "veth", "peer", "name", "squatter")
    run_daemon(ns, config)
    out = subprocess.run(["ip", "-n", ns, "-o", "link"], capture_output=True, text=True,
                         timeout=10, check=False).stdout
    assert "tun" not in out
    bind = ("import socket; socket.socket(socket.AF_INET, socket.SOCK_DGRAM)"
            f".bind(('{PUBLIC_IP}', 8285))")
    probe = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", bind],
                           capture_output=True, timeout=10, check=False)
    assert probe.returncode == 0, probe.stderr
