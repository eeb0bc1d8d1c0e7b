"""Network-namespace primitives on top of iproute2's `ip`, each call bounded by a timeout.

Why `ip` and not pyroute2 here: the lab must be an independent witness of what the daemon does
(the daemon itself uses pyroute2), and `ip` is what an operator would type to check it.

Rules this module keeps so a lab can never disturb the host:
- nothing is ever created in the root namespace: veth pairs are created with both ends already
  inside their target namespaces (`ip link add A netns X type veth peer name B netns Y`);
- every namespace name is given by the caller, who makes it unique per run (``run_prefix``);
- every subprocess has a timeout; a hung `ip` raises instead of hanging the caller.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import time
from collections.abc import Sequence
from typing import Any

IP_TIMEOUT_S = 10.0        # any single `ip` invocation; they take milliseconds when healthy
NETNS_DIR = "/run/netns"   # where `ip netns add` puts its bind mounts


class LabError(RuntimeError):
    """A lab step failed; the message says which command and why."""


def run_prefix(tag: str = "ovd") -> str:
    """A per-run name prefix, e.g. ``ovd-4711-a3f9``: the pid tells whose leftovers they are,
    the random part keeps two labs in one process (or a reused pid) apart."""
    return f"{tag}-{os.getpid()}-{secrets.token_hex(2)}"


def run(cmd: Sequence[str], timeout: float = IP_TIMEOUT_S, check: bool = True,
        input: bytes | None = None) -> subprocess.CompletedProcess[str]:
    """Run a command with a timeout, capturing text output; raise LabError on failure."""
    try:
        proc = subprocess.run(list(cmd), input=input.decode() if input is not None else None,
                              capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired as exc:
        raise LabError(f"timed out after {timeout:g}s: {' '.join(cmd)}") from exc
    except FileNotFoundError as exc:
        raise LabError(f"command not found: {cmd[0]}") from exc
    if check and proc.returncode != 0:
        detail = (proc.stderr or proc.stdout).strip()
        raise LabError(f"failed (exit {proc.returncode}): {' '.join(cmd)}: {detail}")
    return proc


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return run(["ip", *args], check=check)


def ip_json(*args: str) -> list[dict[str, Any]]:
    """`ip -j ...` parsed; an empty answer is an empty list."""
    out = run(["ip", "-j", *args]).stdout.strip()
    return json.loads(out) if out else []


def ns_cmd(ns: str, cmd: Sequence[str]) -> list[str]:
    """The argv that runs ``cmd`` inside namespace ``ns`` (`ip netns exec` execs, no extra pid)."""
    return ["ip", "netns", "exec", ns, *cmd]


def ns_run(ns: str, cmd: Sequence[str], timeout: float = IP_TIMEOUT_S, check: bool = True,
           input: bytes | None = None) -> subprocess.CompletedProcess[str]:
    return run(ns_cmd(ns, cmd), timeout=timeout, check=check, input=input)


# -- namespaces ---------------------------------------------------------------------------------

def list_netns() -> list[str]:
    """Names of all named network namespaces (the same set `ip netns list` shows)."""
    try:
        return sorted(os.listdir(NETNS_DIR))
    except FileNotFoundError:
        return []


def add_netns(name: str) -> None:
    ip("netns", "add", name)
    # lo up: tools bind to 127.0.0.1 inside; IPv6 off: router solicitations and DAD would
    # only add noise to device counters and sniffers.
    ip("-n", name, "link", "set", "lo", "up")
    for key in ("net.ipv6.conf.all.disable_ipv6", "net.ipv6.conf.default.disable_ipv6"):
        ns_run(name, ["sysctl", "-q", "-w", f"{key}=1"], check=False)


def netns_pids(name: str) -> list[int]:
    """Pids of processes living in namespace ``name`` (all of them were started by its lab)."""
    proc = ip("netns", "pids", name, check=False)
    return [int(p) for p in proc.stdout.split() if p.isdigit()]


def del_netns(name: str, grace_s: float = 2.0) -> None:
    """Delete a namespace we created, and with it every device inside it.

    A process still inside would keep the namespace (and its devices) alive after the name is
    gone, so stragglers are ended first: they can only be ours, since the name is unique to
    this run. TERM, a bounded wait, then KILL.
    """
    if name not in list_netns():
        return
    pids = netns_pids(name)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace_s
        while pids and time.monotonic() < deadline:
            pids = [p for p in pids if _alive(p)]
            time.sleep(0.05)
        if not pids:
            break
    ip("netns", "del", name, check=False)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


# -- links and addresses ------------------------------------------------------------------------

def add_veth_pair(ns_a: str, name_a: str, ns_b: str, name_b: str, mtu: int = 1500) -> None:
    """A veth pair whose ends are born inside ``ns_a`` and ``ns_b``: nothing touches the root
    namespace, not even for a moment."""
    ip("link", "add", name_a, "netns", ns_a, "mtu", str(mtu), "type", "veth",
       "peer", "name", name_b, "netns", ns_b, "mtu", str(mtu))


def add_bridge(ns: str, name: str) -> None:
    ip("-n", ns, "link", "add", name, "type", "bridge")
    # No STP and no forwarding delay: ports forward at once, so the lab is usable immediately.
    ip("-n", ns, "link", "set", name, "type", "bridge", "stp_state", "0", "forward_delay", "0")
    ip("-n", ns, "link", "set", name, "up")


def set_master(ns: str, dev: str, bridge: str) -> None:
    ip("-n", ns, "link", "set", dev, "master", bridge)


def link_up(ns: str, dev: str) -> None:
    ip("-n", ns, "link", "set", dev, "up")


def add_address(ns: str, dev: str, cidr: str) -> None:
    ip("-n", ns, "addr", "add", cidr, "dev", dev)


def link_info(ns: str, dev: str) -> dict[str, Any] | None:
    """`ip -j addr show dev DEV` for one device, or None if it does not exist."""
    if dev not in {link.get("ifname") for link in ip_json("-n", ns, "link", "show")}:
        return None
    found = ip_json("-n", ns, "addr", "show", "dev", dev)
    return found[0] if found else None


def routes_via(ns: str, dev: str) -> list[dict[str, Any]]:
    """IPv4 routes of the main table that use ``dev`` (empty if the device is gone)."""
    return [r for r in ip_json("-n", ns, "-4", "route", "show") if r.get("dev") == dev]
