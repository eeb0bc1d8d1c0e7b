"""The systemd units: `systemd-analyze verify` accepts them and the hardening stays in place.

`verify` checks that ExecStart's binary exists. The units name /opt/overlayd/bin/overlayd, the
venv README's setup command creates (and .ci/run creates the same way): the first test verifies
the units exactly as shipped against that install. The others verify copies whose ExecStart
points at a stand-in script that runs this tree's `python -m overlayd`, so they also run on a
machine without the install.

Without systemd (PID 1 here is not systemd), the last test runs real daemons under the unit's
main restrictions made by hand: root with only CAP_NET_ADMIN in the bounding set, no new
privileges, and the kernel's W^X rule (PR_SET_MDWE) for MemoryDenyWriteExecute=.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
UNITS = REPO / "systemd"
INSTALLED = "/opt/overlayd/bin/overlayd"   # README's setup command puts it there
MAX_EXPOSURE = 3.0     # systemd's scale: < 2 "OK-ish" ... 10 "UNSAFE"; README states the score

pytestmark = pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                                reason="systemd-analyze is not installed (apt-get install systemd)")


def staged(tmp_path: Path, unit: str, name: str | None = None) -> Path:
    stand_in = tmp_path / "overlayd"
    stand_in.write_text(f"#!/bin/sh\nexec {sys.executable} -m overlayd \"$@\"\n")
    stand_in.chmod(0o755)
    text = (UNITS / unit).read_text()
    assert INSTALLED in text
    target = tmp_path / unit
    target.write_text(text.replace(INSTALLED, str(stand_in)))
    if name is not None:           # an instance of a template: a link named like the instance
        link = tmp_path / name
        link.symlink_to(target.name)
        return link
    return target


def analyze(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["systemd-analyze", *args], capture_output=True, text=True,
                          timeout=60, check=False, cwd="/")


@pytest.mark.parametrize(("unit", "instance"), [("overlayd.service", None),
                                                ("overlayd@.service", "overlayd@blue.service")])
def test_units_as_shipped_verify_against_the_readme_install(tmp_path: Path, unit: str,
                                                            instance: str | None) -> None:
    if not os.access(INSTALLED, os.X_OK):
        pytest.skip(f"{INSTALLED} is not installed (README's setup command creates it)")
    assert f"ExecStart={INSTALLED} run -c " in (UNITS / unit).read_text()
    if instance is None:
        path = UNITS / unit
    else:                      # an instance of a template: a link named like the instance
        path = tmp_path / instance
        path.symlink_to(UNITS / unit)
    result = analyze("verify", str(path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == "" and result.stderr.strip() == "", result.stderr


@pytest.mark.parametrize(("unit", "instance"), [("overlayd.service", None),
                                                ("overlayd@.service", "overlayd@blue.service")])
def test_units_verify_cleanly(tmp_path: Path, unit: str, instance: str | None) -> None:
    path = staged(tmp_path, unit, instance)
    result = analyze("verify", str(path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == "" and result.stderr.strip() == "", result.stderr


@pytest.mark.parametrize(("unit", "instance"), [("overlayd.service", None),
                                                ("overlayd@.service", "overlayd@blue.service")])
def test_security_exposure_stays_low(tmp_path: Path, unit: str, instance: str | None) -> None:
    path = staged(tmp_path, unit, instance)
    result = analyze("security", "--offline=yes", str(path))
    found = re.search(r"Overall exposure level for \S+: (\d+\.\d)", result.stdout)
    assert found, result.stdout + result.stderr
    assert float(found.group(1)) <= MAX_EXPOSURE, result.stdout


@pytest.mark.parametrize("unit", ["overlayd.service", "overlayd@.service"])
def test_units_say_what_the_daemon_needs(unit: str) -> None:
    lines = {ln.strip() for ln in (UNITS / unit).read_text().splitlines()
             if ln.strip() and not ln.startswith("#")}
    for required in ("Type=notify", "ExecReload=/bin/kill -HUP $MAINPID", "Restart=on-failure",
                     "RestartPreventExitStatus=78", "CapabilityBoundingSet=CAP_NET_ADMIN",
                     "DevicePolicy=closed", "DeviceAllow=/dev/net/tun rw",
                     "ProtectSystem=strict", "NoNewPrivileges=yes", "RuntimeDirectory=overlayd"):
        assert required in lines, required
    assert any(ln.startswith("WatchdogSec=") for ln in lines)
    # Every unit shares /run/overlayd: without Preserve, stopping one would remove the
    # directory with every other instance's control socket in it.
    assert "RuntimeDirectoryPreserve=yes" in lines
    # A tun daemon needs /dev/net/tun and /proc/sys/net: these would break it.
    for forbidden in ("PrivateDevices=yes", "ProcSubset=pid", "ProtectKernelTunables=yes",
                      "PrivateNetwork=yes"):
        assert forbidden not in lines, forbidden


# -- the daemon under the unit's restrictions, without systemd -----------------------------------

# Re-exec Python with the kernel's own W^X rule (PR_SET_MDWE, Linux >= 6.3): what
# MemoryDenyWriteExecute=yes enforces with seccomp. Exit 3 when the kernel lacks it.
MDWE_EXEC = """
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
if libc.prctl(65, 1, 0, 0, 0) != 0:      # PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN
    sys.exit(3)
os.execv(sys.executable, [sys.executable, *sys.argv[1:]])
"""


def _restricted_cmd() -> list[str]:
    """Root with CAP_NET_ADMIN only (CapabilityBoundingSet=), NoNewPrivileges=, W^X."""
    return ["setpriv", "--no-new-privs", "--bounding-set=-all,+net_admin", "--inh-caps=-all",
            sys.executable, "-c", MDWE_EXEC, "-m", "overlayd"]


@pytest.mark.netns
def test_the_daemon_works_under_the_units_restrictions() -> None:
    from overlayd.lab import HostSpec, Lab, lab_unavailable

    why = lab_unavailable() or (None if shutil.which("setpriv") else "setpriv is not installed")
    if why:
        pytest.skip(why)
    probe = subprocess.run([sys.executable, "-c", MDWE_EXEC, "-c", "pass"], check=False,
                           timeout=30)
    if probe.returncode == 3:
        pytest.skip("the kernel has no PR_SET_MDWE (Linux >= 6.3) to stand in for "
                    "MemoryDenyWriteExecute=")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    metrics = {"metrics": {"enabled": True, "listen": "127.0.0.1:9585"}}
    fetch = "import urllib.request as u; print(u.urlopen('http://127.0.0.1:9585/metrics').status)"
    # A LabError here (a daemon that exits at start) fails the test with the daemon's log.
    with Lab([HostSpec(config_extra=metrics), HostSpec()], overlayd_cmd=_restricted_cmd(),
             env=env) as lab:
        assert lab.ping(1, 2, count=3, interval_s=0.1).received == 3
        accept_local = lab.exec(1, ["cat", "/proc/sys/net/ipv4/conf/overlay0/accept_local"])
        assert accept_local.stdout.strip() == "1"      # the per-device sysctl was written
        assert lab.exec(1, [sys.executable, "-c", fetch]).stdout.strip() == "200"
        status = subprocess.run([sys.executable, "-m", "overlayd", "status", "--socket",
                                 str(lab.host(1).dir / "control.sock")], capture_output=True,
                                text=True, timeout=30, env=env, cwd=REPO, check=False)
        assert status.returncode == 0 and "healthy, ready" in status.stdout
        assert lab.stop_daemons() == {"host1": 0, "host2": 0}
