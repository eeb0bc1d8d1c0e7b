"""Holes of issue 10 on the routed paths and the sockets, shown in namespaces this test makes.

Each test puts the kernel where the hole was found (a real egress MTU, a real kernel VTEP with
its offloads left at their defaults, real sockets a stranger floods) and fails when the
protection is removed. Forwarders that need a private loopback run in a child process inside
their own namespace (``run_in_namespace``): the parent's loopback is never touched.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from netns_helpers import NETNS_MARKS

from overlayd.lab import netns

pytestmark = NETNS_MARKS

REPO = Path(__file__).resolve().parents[1]
CHILD_TIMEOUT_S = 60.0


@pytest.fixture
def namespace() -> Iterator[str]:
    """A namespace of our own with its loopback up, deleted afterwards."""
    name = netns.run_prefix("ovd-l3h")
    netns.add_netns(name)
    try:
        netns.link_up(name, "lo")
        yield name
    finally:
        netns.del_netns(name)


def run_in_namespace(ns: str, code: str, *args: str) -> Any:
    """Run ``code`` with this tree's overlayd and the tests' helpers importable, inside
    ``ns``; what it printed as its last line, parsed as JSON."""
    env = dict(os.environ, PYTHONPATH=f"{REPO}{os.pathsep}{REPO / 'tests'}")
    proc = subprocess.run(netns.ns_cmd(ns, [sys.executable, "-c", code, *args]), cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=CHILD_TIMEOUT_S,
                          check=False)
    assert proc.returncode == 0, f"child failed:\n{proc.stdout}\n{proc.stderr}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


KERNEL_MODULES = [pytest.param("overlayd._dataplane", id="cython"),
                  pytest.param("overlayd.dataplane.python_kernels", id="python")]


# --- item 12: one EINVAL from a GSO send that did not fit must not end GSO --------------------

GSO_DID_NOT_FIT = r"""
import importlib, json, socket, sys
from test_offload import OffloadRig, overlay, tcp_packet, tso
rig = OffloadRig(importlib.import_module(sys.argv[1]), "udp")
# As the daemon's tunnel socket: the kernel fragments a datagram larger than the path.
from overlayd.io.tunnel_socket import IP_MTU_DISCOVER, IP_PMTUDISC_DONT
rig.local.setsockopt(socket.IPPROTO_IP, IP_MTU_DISCOVER, IP_PMTUDISC_DONT)
out = {}
# Not DF, 1440-byte segments: each fits when sent alone (fragmented on this 1400-byte
# loopback), but a GSO send of them is refused (EINVAL before Linux 6.x, EMSGSIZE after).
for _ in range(2):
    rig.read(tso(tcp_packet(bytes(3 * 1400), dst=overlay(0), df=False), 1400))
out["big_received"] = len(rig.received(0, 6))
out["gso_after_big"] = rig.fwd.offloads()["udp_gso"]
rig.read(tso(tcp_packet(bytes(3 * 1000), dst=overlay(0), seq=5000), 1000))
out["small_received"] = len(rig.received(0, 3))
out["gso_after_small"] = rig.fwd.offloads()["udp_gso"]
out["counters"] = rig.counters()
print(json.dumps(out))
"""


@pytest.mark.parametrize("module", KERNEL_MODULES)
def test_gso_send_that_does_not_fit_the_mtu_keeps_gso_on(namespace: str, module: str) -> None:
    netns.ip("-n", namespace, "link", "set", "lo", "mtu", "1400")
    out = run_in_namespace(namespace, GSO_DID_NOT_FIT, module)
    c = out["counters"]
    assert out["big_received"] == 6 and out["small_received"] == 3, out
    # The first 1440-byte run only: the second went singly without asking again.
    assert c["offload_gso_refused"] == 1, c
    assert out["gso_after_big"] is True and out["gso_after_small"] is True, out
    assert c["offload_gso_sends"] == 1, c              # the 1040-byte run still went as one
    assert c["forwarded_packets"] == 9 and "tx_error" not in c, c


# --- item 5: a kernel VTEP on a veth sends inner checksums unfinished --------------------------

def tcp_checksum_errors(ns: str) -> int:
    """TcpInCsumErrors of a namespace's kernel (netstat counters, /proc/net/snmp)."""
    out = netns.ns_run(ns, ["cat", "/proc/net/snmp"]).stdout.splitlines()
    tcp = [line.split()[1:] for line in out if line.startswith("Tcp:")]
    return int(dict(zip(tcp[0], tcp[1], strict=True))["InCsumErrors"])


@pytest.mark.parametrize("mode", ["routed", "switched"])
@pytest.mark.parametrize("tuned", [False, True], ids=["kernel-defaults", "tx-checksum-off"])
def test_tcp_from_a_kernel_vtep_with_default_offloads(mode: str, tuned: bool) -> None:
    """TCP from the kernel host to a daemon's host arrives: with the kernel host's offloads at
    their defaults every inner segment comes with the pseudo-header sum only, and the daemon
    must finish it (else its host drops them all: TcpInCsumErrors, and the transfer hangs).
    With `tx off` on the kernel host (the tuned case) there is nothing to finish."""
    from netns_helpers import VXLAN_UNAVAILABLE, logs

    from overlayd.lab import HostSpec, Lab

    if VXLAN_UNAVAILABLE is not None:
        pytest.skip(f"vxlan netns tests: {VXLAN_UNAVAILABLE}")
    extra = {"mode": "switched"} if mode == "switched" else {}
    specs = [HostSpec(), HostSpec(kernel_vxlan=True, kernel_tx_checksum_off=tuned)]
    with Lab(specs, backend="vxlan", backend_extra=extra) as lab:
        lab.wait_mesh(timeout_s=20.0)
        errors_before = tcp_checksum_errors(lab.host("host1").netns)
        result = lab.tcp_transfer("host2", "host1", 2_000_000, timeout_s=30.0)
        assert result.bytes_ok and result.sha256_ok, f"{result}\n{logs(lab)}"
        status = lab.control("host1", "status")
        traffic = status["traffic"]
        assert tcp_checksum_errors(lab.host("host1").netns) == errors_before
        if tuned:
            assert traffic["offload_checksums_finished"] == 0, traffic
        else:
            assert traffic["offload_checksums_finished"] > 0, traffic
        assert {k: v for k, v in status["drops"].items() if v} == {}, status["drops"]
