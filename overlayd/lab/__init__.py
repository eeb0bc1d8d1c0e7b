"""Multi-host overlay testbeds in network namespaces, shared by `overlayd demo` and the tests.

    from overlayd.lab import Lab, HostSpec
    with Lab([HostSpec(), HostSpec(), HostSpec(underlay_mtu=1400)]) as lab:
        assert lab.ping("host1", "host3").ok

Needs root, /dev/net/tun and iproute2; ``lab_unavailable()`` says why not, in one line.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence

from overlayd.lab.hosts import HostSpec, LabHost
from overlayd.lab.netns import LabError, add_netns, del_netns, ip, list_netns, run_prefix
from overlayd.lab.overlay_lab import Lab
from overlayd.lab.traffic import PingResult, TransferResult, UdpTransferResult

__all__ = ["HostSpec", "Lab", "LabError", "LabHost", "PingResult", "TransferResult",
           "UdpTransferResult",
           "lab_unavailable", "list_netns", "run_prefix", "vxlan_unavailable"]


def lab_unavailable(tools: Sequence[str] = ("ip", "ping", "timeout")) -> str | None:
    """Why a lab cannot be built on this machine, or None if it can: not root, no
    /dev/net/tun, one of ``tools`` missing, or `ip netns` refusing to work."""
    if os.geteuid() != 0:
        return "needs root (creates network namespaces and tun devices)"
    if not os.path.exists("/dev/net/tun"):
        return "/dev/net/tun is missing (modprobe tun, or give the container the device)"
    for tool in tools:
        if shutil.which(tool) is None:
            return f"{tool!r} is not installed (iproute2, iputils-ping, coreutils)"
    probe = run_prefix("ovd-probe")
    try:
        add_netns(probe)
        del_netns(probe)
    except LabError as exc:
        return f"`ip netns` is unusable here: {exc}"
    return None


def vxlan_unavailable() -> str | None:
    """Why this kernel cannot give a lab kernel VXLAN devices (no vxlan module), or None.
    Call only where ``lab_unavailable()`` is None: it creates and deletes one namespace."""
    probe = run_prefix("ovd-probe")
    try:
        add_netns(probe)
        ip("-n", probe, "link", "add", "vxprobe", "type", "vxlan", "id", "1", "dstport", "4789")
    except LabError as exc:
        return f"the kernel has no usable vxlan devices: {exc}"
    finally:
        del_netns(probe)
    return None
