"""The shipped units under a real systemd: a Debian 12 container booted with systemd-nspawn.

Opt-in (``OVERLAYD_NSPAWN_TEST=1``; .ci/run sets it): it needs root, systemd-nspawn
(systemd-container) and debootstrap, and the first run debootstraps a minimal bookworm
(about a minute; cached in ``$OVERLAYD_NSPAWN_CACHE``, default /var/tmp/overlayd-nspawn).

Each run copies the cached tree, installs overlayd into it exactly as README's setup command
does (the venv at /opt/overlayd and its two pip commands, taken from README itself; the host's
pip configuration and local package mirrors are handed in), copies the units to
/etc/systemd/system as README says, and boots the container with its own network namespace: a
veth to a second namespace where a peer overlayd runs (outside systemd). Then, with systemctl
inside the container:

1. start: Type=notify returns only after READY=1; the daemon forwards (ping across the overlay
   through its tun), answers `overlayd status` on /run/overlayd and serves metrics: the sandbox
   (DevicePolicy, ProtectSystem=strict, RestrictAddressFamilies, the capability set, the
   syscall filter) allows tun, netlink, the sysctls and the runtime directory;
2. reload: `systemctl reload` (SIGHUP, RELOADING=1 ... READY=1) applies a changed map;
3. watchdog: a SIGSTOPped daemon is killed and restarted by systemd (a drop-in shortens
   WatchdogSec= to 4 s so the test does not wait 20);
4. two units: stopping overlayd.service leaves overlayd@blue's socket in /run/overlayd;
5. stop: the device is gone and the unit inactive;
6. boot race: started before its public IP exists, the daemon waits, says so in STATUS=, keeps
   systemd's start timeout (shortened to 5 s by the drop-in) at bay with EXTEND_TIMEOUT_USEC=,
   and comes up when the address appears 8 s later.

The container, its namespaces and its copy of the tree are removed at the end, also on failure.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from netns_helpers import wait_for

from overlayd.lab import configs, netns
from overlayd.lab.processes import DaemonProcess, child_pids

REPO = Path(__file__).resolve().parent.parent
ENABLED = os.environ.get("OVERLAYD_NSPAWN_TEST") == "1"
CACHE = Path(os.environ.get("OVERLAYD_NSPAWN_CACHE", "/var/tmp/overlayd-nspawn"))
SUITE = "bookworm"
MIRROR = os.environ.get("OVERLAYD_NSPAWN_MIRROR", "http://deb.debian.org/debian")
# What a booted container needs, plus what README's setup command installs (read from README
# below): the tree then proves that list is enough to build and run overlayd.
BOOT_PACKAGES = ("systemd", "systemd-sysv", "dbus", "procps", "python3", "libc6-dev")
# What this machine's pip uses: local mirrors and its CA bundle (absent or harmless elsewhere).
PIP_MIRRORS = ("/opt/pypi", "/opt/pypi-more", "/opt/wheels", "/etc/xdg/pip", "/etc/ssl/certs")
UNDERLAY = ("192.168.96.1", "192.168.96.2")     # container, peer
WATCHDOG_S = 4
START_TIMEOUT_S = 5     # drop-in: shorter than the boot-race wait below, which must extend it


def _why_not() -> str | None:
    if not ENABLED:
        return "opt-in: set OVERLAYD_NSPAWN_TEST=1 (boots a Debian container, ~3 min)"
    if os.geteuid() != 0:
        return "needs root"
    for tool in ("systemd-nspawn", "debootstrap", "nsenter", "ip"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (apt-get install systemd-container debootstrap)"
    return None


pytestmark = [pytest.mark.netns, pytest.mark.timeout(1500),
              pytest.mark.skipif(_why_not() is not None, reason=str(_why_not()))]


def run(cmd: list[str], timeout: float, check: bool = True,
        **kwargs: object) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False,
                            **kwargs)  # type: ignore[call-overload]
    if check and result.returncode != 0:
        raise AssertionError(f"{cmd!r} exited {result.returncode}:\n{result.stdout}\n"
                             f"{result.stderr}")
    return result


def readme_apt_packages() -> list[str]:
    """The packages README's setup command installs with apt-get."""
    (line,) = [ln for ln in (REPO / "README.md").read_text().splitlines()
               if ln.startswith("apt-get update && ")]
    (install,) = [s.strip() for s in line.split(" && ") if s.strip().startswith("apt-get install")]
    return [w for w in install.split()[2:] if not w.startswith("-")]


def tree_packages() -> str:
    return ",".join(sorted(set(BOOT_PACKAGES) | set(readme_apt_packages())))


def cached_tree() -> Path:
    """A minimal Debian tree with systemd and README's packages, built once (atomically) and
    reused; its name carries a digest of the package list, so a changed list builds a new one."""
    packages = tree_packages()
    tree = CACHE / f"{SUITE}-{hashlib.sha256(packages.encode()).hexdigest()[:12]}"
    if (tree / "usr/lib/systemd/systemd").exists():
        return tree
    CACHE.mkdir(parents=True, exist_ok=True)
    partial = CACHE / f"{SUITE}.partial-{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    try:
        run(["debootstrap", "--variant=minbase", f"--include={packages}", SUITE, str(partial),
             MIRROR], timeout=1200)
        partial.rename(tree)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return tree


def readme_install_commands() -> list[str]:
    """README's setup command without its apt-get steps (the tree has those packages) and
    without the demo: the venv and the two pip installs, word for word."""
    text = (REPO / "README.md").read_text()
    (line,) = [ln for ln in text.splitlines() if ln.startswith("apt-get update && ")]
    steps = [s.strip() for s in line.split(" && ")]
    kept = [s for s in steps if not s.startswith("apt-get") and not s.endswith(" demo")]
    assert any(s.startswith("python3 -m venv /opt/overlayd") for s in kept), steps
    return kept


def copy_sources(dest: Path) -> None:
    """The files git tracks (what a clone has), as they are in the working tree."""
    files = run(["git", "ls-files", "-z"], timeout=60, cwd=REPO).stdout.split("\0")
    for name in filter(None, files):
        src = REPO / name
        if src.is_file():
            target = dest / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, target)


def pip_binds() -> list[str]:
    binds = [f"--bind-ro={p}" for p in PIP_MIRRORS if Path(p).exists()]
    return binds + [f"--setenv={k}={v}" for k, v in os.environ.items() if k.startswith("PIP_")]


def install_overlayd(tree: Path) -> None:
    src = tree / "opt/overlayd/src"        # README: not under /root (ProtectHome=)
    copy_sources(src)
    if Path("/etc/pip.conf").exists():
        shutil.copy2("/etc/pip.conf", tree / "etc/pip.conf")
    script = "set -e; cd /opt/overlayd/src; " + "; ".join(readme_install_commands())
    # Not booted: a plain container process; it uses the host's network only to fetch packages.
    run(["systemd-nspawn", "-q", "-D", str(tree), "--register=no", "--keep-unit", "--pipe",
         *pip_binds(), "/bin/sh", "-c", script], timeout=900)
    assert (tree / "opt/overlayd/bin/overlayd").exists()


def node_map(port: int, nodes: list[tuple[str, str, str]]) -> str:
    return configs.dumps(configs.subnet_map(
        "10.96.0.0/16", 24, {"type": "udp", "port": port},
        [{"name": n, "subnet": s, "public_ip": ip} for n, s, ip in nodes], {}))


def write_configs(tree: Path) -> None:
    etc = tree / "etc/overlayd"
    etc.mkdir(parents=True, exist_ok=True)
    nodes = [("c1", "10.96.1.0/24", UNDERLAY[0]), ("p1", "10.96.2.0/24", UNDERLAY[1])]
    (etc / "map.toml").write_text(node_map(8285, nodes))
    (etc / "overlayd.toml").write_text(configs.dumps({
        "map": {"file": "map.toml", "poll_seconds": 0},     # only SIGHUP reloads: step 2
        "metrics": {"enabled": True, "listen": "127.0.0.1:9585"}}))
    # overlayd@blue: a second overlay on the same host (own device, port, metrics port).
    (etc / "blue-map.toml").write_text(node_map(8286, [("c1", "10.96.1.0/24", UNDERLAY[0])]))
    (etc / "blue.toml").write_text(configs.dumps({
        "map": {"file": "blue-map.toml"}, "device": {"name": "blue0"},
        "metrics": {"enabled": True, "listen": "127.0.0.1:9586"}}))
    units = tree / "etc/systemd/system"
    for unit in ("overlayd.service", "overlayd@.service"):          # README: cp systemd/...
        shutil.copy2(tree / "opt/overlayd/src/systemd" / unit, units / unit)
    dropin = units / "overlayd.service.d"
    dropin.mkdir(exist_ok=True)
    (dropin / "short.conf").write_text(f"[Service]\nWatchdogSec={WATCHDOG_S}s\n"
                                       f"TimeoutStartSec={START_TIMEOUT_S}s\n")


@dataclass
class Container:
    name: str
    tree: Path
    netns: str
    peer_ns: str
    nspawn: subprocess.Popen[bytes]
    init_pid: int
    peer: DaemonProcess
    workdir: Path

    def sh(self, *cmd: str, timeout: float = 60.0,
           check: bool = True) -> subprocess.CompletedProcess[str]:
        """A command inside the container (its mount, pid, net, ... namespaces)."""
        return run(["nsenter", "-t", str(self.init_pid), "-a", *cmd], timeout=timeout,
                   check=check)

    def systemctl(self, *args: str, timeout: float = 90.0) -> None:
        """systemctl inside the container; on failure, the unit's journal says why."""
        result = self.sh("systemctl", *args, timeout=timeout, check=False)
        if result.returncode != 0:
            unit = args[-1]
            raise AssertionError(f"systemctl {' '.join(args)}: {result.stderr}\n"
                                 f"{self.sh('systemctl', 'status', unit, check=False).stdout}\n"
                                 f"{self.journal(unit)[-4000:]}")

    def show(self, unit: str) -> dict[str, str]:
        out = self.sh("systemctl", "show", unit, "-p",
                      "ActiveState,SubState,MainPID,StatusText,NRestarts").stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def journal(self, unit: str) -> str:
        return self.sh("journalctl", "-u", unit, "--no-pager", "-o", "cat").stdout




def boot(tree: Path, name: str, ns: str, log: Path) -> tuple[subprocess.Popen[bytes], int]:
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            ["timeout", "--kill-after=10", "1200", "systemd-nspawn", "-q", "-D", str(tree),
             "-b", "--register=no", "--keep-unit", f"--network-namespace-path=/run/netns/{ns}",
             # a joined namespace is not --private-network: ask for CAP_NET_ADMIN explicitly
             "--capability=CAP_NET_ADMIN",
             "--console=passive", "-M", name],
            stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True)
    init_pid = 0

    def booted() -> bool:
        nonlocal init_pid
        for nspawn in child_pids(proc.pid):
            for child in child_pids(nspawn):
                init_pid = child
        if not init_pid:
            return False
        state = subprocess.run(["nsenter", "-t", str(init_pid), "-a", "systemctl",
                                "is-system-running"], capture_output=True, text=True,
                               timeout=20, check=False).stdout.strip()
        return state in ("running", "degraded")

    if not wait_for(booted, 120, 0.5):
        stop_container(proc)
        raise AssertionError(f"the container did not boot:\n{log.read_text()[-3000:]}")
    return proc, init_pid


def stop_container(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM to systemd-nspawn powers the container off; SIGKILL if it takes too long."""
    for pid in child_pids(proc.pid):
        os.kill(pid, signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


@pytest.fixture(scope="module")
def container() -> Iterator[Container]:
    prefix = netns.run_prefix("ovdsd")
    workdir = CACHE / f"run-{prefix}"
    tree = workdir / "root"
    namespaces: list[str] = []
    nspawn: subprocess.Popen[bytes] | None = None
    peer: DaemonProcess | None = None
    try:
        base = cached_tree()
        workdir.mkdir(parents=True)
        run(["cp", "-a", "--reflink=auto", str(base), str(tree)], timeout=600)
        install_overlayd(tree)
        write_configs(tree)
        ns, peer_ns = f"{prefix}-c", f"{prefix}-p"
        for name in (ns, peer_ns):
            netns.add_netns(name)
            namespaces.append(name)
        netns.add_veth_pair(ns, "ul0", peer_ns, "ul0")
        for name, address in ((ns, UNDERLAY[0]), (peer_ns, UNDERLAY[1])):
            netns.add_address(name, "ul0", f"{address}/24")
            netns.link_up(name, "ul0")
            netns.link_up(name, "lo")
        peer_cfg = workdir / "peer.toml"
        (workdir / "map.toml").write_text((tree / "etc/overlayd/map.toml").read_text())
        peer_cfg.write_text(configs.dumps(configs.daemon_config(
            "p1", "map.toml", "overlay0", str(workdir / "peer.sock"))))
        env = dict(os.environ, PYTHONPATH=str(REPO))
        peer = DaemonProcess(peer_ns, [sys.executable, "-m", "overlayd", "run", "-c",
                                       str(peer_cfg)], workdir / "peer.log", 1200, env)
        nspawn, init_pid = boot(tree, prefix, ns, workdir / "boot.log")
        yield Container(prefix, tree, ns, peer_ns, nspawn, init_pid, peer, workdir)
    finally:
        if nspawn is not None:
            stop_container(nspawn)
        if peer is not None:
            peer.stop()
        for name in reversed(namespaces):
            netns.del_netns(name)
        shutil.rmtree(workdir, ignore_errors=True)


def test_start_waits_for_ready_and_the_sandbox_allows_what_the_daemon_needs(
        container: Container) -> None:
    c = container
    c.systemctl("start", "overlayd", timeout=90)        # Type=notify: returns at READY=1
    unit = c.show("overlayd")
    assert (unit["ActiveState"], unit["SubState"]) == ("active", "running"), unit
    assert unit["StatusText"].startswith("forwarding: node c1 10.96.1.0/24 on overlay0"), unit
    ping = c.sh("ping", "-n", "-c", "3", "-i", "0.2", "-W", "2", "10.96.2.0", timeout=30)
    assert " 0% packet loss" in ping.stdout                  # tun, netlink, routes: all allowed
    status = c.sh("/opt/overlayd/bin/overlayd", "status")
    assert "healthy, ready" in status.stdout and "systemd   notify, watchdog" in status.stdout
    fetch = ("import urllib.request as u; "
             "print(u.urlopen('http://127.0.0.1:9585/metrics').status)")
    assert c.sh("/opt/overlayd/bin/python", "-c", fetch).stdout.strip() == "200"
    accept_local = c.sh("cat", "/proc/sys/net/ipv4/conf/overlay0/accept_local").stdout
    assert accept_local.strip() == "1"                       # the per-device sysctl was written


def test_reload_applies_a_changed_map(container: Container) -> None:
    c = container
    path = c.tree / "etc/overlayd/map.toml"
    path.write_text(path.read_text().replace('name = "p1"', 'name = "p1"\nroutes = ["10.99.0.0/16"]'))
    c.systemctl("reload", "overlayd", timeout=60)
    # ExecReload= is `kill -HUP`, which returns once the signal is sent: the daemon's
    # RELOADING=1 can reach systemd after the reload job ended, and the unit then shows
    # "reloading" until the daemon's READY=1. It must come back to active by itself.
    assert wait_for(lambda: c.show("overlayd")["ActiveState"] == "active", 30, 0.2), \
        c.show("overlayd")
    assert wait_for(lambda: "map reloaded (SIGHUP)" in c.journal("overlayd"), 30, 0.5)
    routes = c.sh("ip", "-j", "route", "show", "dev", "overlay0").stdout
    assert "10.99.0.0/16" in {r.get("dst") for r in json.loads(routes)}


def test_the_watchdog_restarts_a_stopped_daemon(container: Container) -> None:
    c = container
    before = c.show("overlayd")
    pid = before["MainPID"]
    c.sh("kill", "-STOP", pid)

    def restarted() -> bool:
        now = c.show("overlayd")
        return (now["MainPID"] not in ("0", pid) and now["ActiveState"] == "active"
                and now["SubState"] == "running")

    assert wait_for(restarted, WATCHDOG_S + 30), c.show("overlayd")
    assert int(c.show("overlayd")["NRestarts"]) == int(before["NRestarts"]) + 1
    assert re.search(r"[Ww]atchdog timeout", c.journal("overlayd")), c.journal("overlayd")
    ping = c.sh("ping", "-n", "-c", "2", "-i", "0.2", "-W", "2", "10.96.2.0", timeout=30)
    assert " 0% packet loss" in ping.stdout


def test_stopping_one_unit_leaves_the_other_units_socket(container: Container) -> None:
    c = container
    c.systemctl("start", "overlayd@blue", timeout=90)
    assert c.sh("test", "-S", "/run/overlayd/blue0.sock", check=False).returncode == 0
    c.systemctl("stop", "overlayd", timeout=60)
    assert c.sh("test", "-S", "/run/overlayd/blue0.sock", check=False).returncode == 0
    status = c.sh("/opt/overlayd/bin/overlayd", "status", "-c", "/etc/overlayd/blue.toml")
    assert "healthy, ready" in status.stdout
    c.systemctl("stop", "overlayd@blue", timeout=60)


def test_stop_removes_the_device(container: Container) -> None:
    c = container
    c.systemctl("start", "overlayd", timeout=90)
    assert c.sh("ip", "link", "show", "overlay0", check=False).returncode == 0
    c.systemctl("stop", "overlayd", timeout=60)
    unit = c.show("overlayd")
    assert unit["ActiveState"] == "inactive", unit
    assert c.sh("ip", "link", "show", "overlay0", check=False).returncode != 0
    assert c.sh("test", "-e", "/run/overlayd/overlay0.sock", check=False).returncode != 0
    assert "stopped" in c.journal("overlayd")


def test_a_start_before_the_address_waits_past_the_start_timeout(container: Container) -> None:
    c = container
    cidr = f"{UNDERLAY[0]}/24"
    netns.ns_run(c.netns, ["ip", "addr", "del", cidr, "dev", "ul0"])
    c.sh("systemctl", "start", "--no-block", "overlayd")
    time.sleep(START_TIMEOUT_S + 3)                    # past TimeoutStartSec=: still starting
    unit = c.show("overlayd")
    assert unit["ActiveState"] == "activating", unit
    assert unit["StatusText"].startswith("waiting for one of the public IPs"), unit
    netns.add_address(c.netns, "ul0", cidr)
    assert wait_for(lambda: c.show("overlayd")["ActiveState"] == "active", 15), c.show("overlayd")
    ping = c.sh("ping", "-n", "-c", "2", "-i", "0.2", "-W", "2", "10.96.2.0", timeout=30)
    assert " 0% packet loss" in ping.stdout
    c.systemctl("stop", "overlayd", timeout=60)
