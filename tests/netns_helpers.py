"""Helpers shared by the tests/test_netns_*.py modules (root: real namespaces, real daemons)."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any, TypeVar, cast

import pytest

from overlayd.lab import Lab, LabError, LabHost, lab_unavailable, vxlan_unavailable

# Evaluated once per session: the probe creates and deletes one namespace when we are root.
# Skip only for what the machine cannot give (root, tun, a working `ip netns`); a missing
# `ping` or `timeout` is a broken test environment and must fail loudly, not skip.
NETNS_UNAVAILABLE = lab_unavailable(tools=("ip",))

T = TypeVar("T")

# Put on every netns module: `pytestmark = NETNS_MARKS`.
NETNS_MARKS = [
    pytest.mark.netns,
    pytest.mark.skipif(NETNS_UNAVAILABLE is not None, reason=f"netns tests: {NETNS_UNAVAILABLE}"),
]


# The vxlan interop tests also need the kernel's own VXLAN (the vxlan module).
VXLAN_UNAVAILABLE = NETNS_UNAVAILABLE or vxlan_unavailable()
VXLAN_MARKS = [
    pytest.mark.netns,
    pytest.mark.skipif(VXLAN_UNAVAILABLE is not None,
                       reason=f"vxlan netns tests: {VXLAN_UNAVAILABLE}"),
]


def netns_required(obj: T) -> T:
    """NETNS_MARKS as a decorator, for a class or function in a module that also has plain
    unit tests."""
    for mark in NETNS_MARKS:
        obj = cast(T, mark(obj))
    return obj


def own_namespaces() -> set[str]:
    """Namespaces any Lab of *this* process created (their names start with ovd-<our pid>-)."""
    from overlayd.lab import list_netns

    return {ns for ns in list_netns() if ns.startswith(f"ovd-{os.getpid()}-")}


def marker() -> bytes:
    """A payload no other packet carries, to recognise one crafted packet on a sniffer."""
    return b"ovd-test-" + os.urandom(12)


def logs(lab: Lab) -> str:
    """The tail of every daemon's log, for assertion messages."""
    parts = []
    for host in lab.hosts:
        if host.daemon is not None:
            parts.append(f"--- {host.name} ({host.log_path}):\n{host.daemon.log_tail(15)}")
    return "\n".join(parts)


class CountersUnavailable(Exception):
    """The daemon does not (yet) expose its drop counters where we look."""


def read_drop_counters(lab: Lab, host: LabHost | str | int) -> dict[str, int]:
    """The daemon's drop counters by reason (``outside_unknown_peer``, ``outside_spoofed_source``,
    ...), read from its live status.

    Source: the control socket (``{"command": "status"}`` -> ``result["drops"]``, see
    overlayd/ops/control_socket.py and state.status). Raises CountersUnavailable while the
    running daemon serves no control socket, so the counter tests skip with that reason instead
    of failing; the non-arrival tests do not depend on this.
    """
    try:
        status = lab.control(host, "status")
    except LabError as exc:
        raise CountersUnavailable(str(exc)) from exc
    drops: Any = status.get("drops") if isinstance(status, dict) else None
    if not isinstance(drops, dict):
        raise CountersUnavailable(f"status has no 'drops' table: {str(status)[:300]}")
    return {str(k): int(v) for k, v in drops.items()}


def drop_counters_or_skip(lab: Lab, host: LabHost | str | int) -> dict[str, int]:
    try:
        return read_drop_counters(lab, host)
    except CountersUnavailable as exc:
        pytest.skip(f"drop counters not readable yet: {exc}")


def vxlan_datagrams(pcap: Any, port: int) -> list[Any]:
    """The VXLAN datagrams to ``port`` in a capture, decoded by scapy (an independent
    dissector: it knows VXLAN on 4789 and 8472 by itself)."""
    from scapy.layers.inet import UDP
    from scapy.layers.vxlan import VXLAN
    from scapy.utils import rdpcap

    out = []
    for pkt in rdpcap(str(pcap)):
        if UDP in pkt and pkt[UDP].dport == port:
            assert VXLAN in pkt, f"scapy does not see VXLAN in {pkt.summary()}"
            out.append(pkt)
    return out


def outside_drops(lab: Lab, host: LabHost | str | int) -> dict[str, int]:
    """The daemon's nonzero drop counters of the outside (underlay) direction."""
    return {k: v for k, v in read_drop_counters(lab, host).items()
            if v and k.startswith("outside")}


def stop_cleanly(lab: Lab, daemons: tuple[str, ...]) -> None:
    """SIGTERM every daemon: each exits 0 and takes its device with it."""
    codes = lab.stop_daemons(grace_s=5.0)
    assert codes == dict.fromkeys(daemons, 0), f"{codes}\n{logs(lab)}"
    for name in daemons:
        assert lab.device_info(name) is None, f"{name}: device still there"


def close_leaving_nothing(lab: Lab, namespaces_before: set[str]) -> None:
    lab.close()
    assert lab.leftovers() == []
    assert own_namespaces() - namespaces_before == set()


def wait_for(predicate: Callable[[], object], timeout_s: float, step_s: float = 0.1) -> bool:
    """Poll ``predicate`` until it is true or ``timeout_s`` passed (bounded); whether it was."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(step_s)
    return False
