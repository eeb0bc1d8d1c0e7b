"""What the benchmark measures: overlays set up across the testbed, each started and stopped here.

- ``KernelVxlan``: the reference. Linux vxlan devices, VNI 1, port 4789, static FDB and permanent
  neighbour entries (no learning on the data path), as a flannel-vxlan kernel is configured.
- ``Overlayd``: a real ``overlayd run`` process per side for one backend and one data-plane
  implementation (the compiled kernels or the pure-Python twins).
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from overlayd.bench.testbed import INNER_MTU, UNDER_A, UNDER_B, Testbed
from overlayd.lab import configs, netns
from overlayd.lab.processes import DaemonProcess

OVERLAY_UP_TIMEOUT_S = 30.0


def wait_overlay(bed: Testbed, over_a: str, over_b: str) -> None:
    """Bounded wait until one ping crosses each way."""
    deadline = time.monotonic() + OVERLAY_UP_TIMEOUT_S
    while time.monotonic() < deadline:
        ok = all(netns.ns_run(ns, ["ping", "-n", "-q", "-c", "1", "-W", "1", dst],
                              check=False, timeout=5).returncode == 0
                 for ns, dst in ((bed.ns_a, over_b), (bed.ns_b, over_a)))
        if ok:
            return
        time.sleep(0.2)
    raise RuntimeError(f"overlay {over_a} <-> {over_b} did not answer ping within "
                       f"{OVERLAY_UP_TIMEOUT_S:g}s")


@dataclass
class KernelVxlan:
    name: str = "kernel-vxlan"
    over_a: str = "100.64.0.1"
    over_b: str = "100.64.0.2"
    bed: Testbed | None = None

    MAC_A = "02:00:64:40:00:0a"
    MAC_B = "02:00:64:40:00:0b"

    def up(self, bed: Testbed, workdir: Path) -> None:
        self.bed = bed
        sides = ((bed.ns_a, UNDER_A, UNDER_B, self.MAC_A, self.MAC_B, self.over_a, self.over_b),
                 (bed.ns_b, UNDER_B, UNDER_A, self.MAC_B, self.MAC_A, self.over_b, self.over_a))
        for ns, local, remote, mac, peer_mac, over, peer_over in sides:
            netns.ip("-n", ns, "link", "add", "vx0", "address", mac, "mtu", str(INNER_MTU),
                     "type", "vxlan", "id", "1", "dstport", "4789", "local", local, "dev", "ul0",
                     "nolearning")
            for fdb_mac in ("00:00:00:00:00:00", peer_mac):
                netns.run(["bridge", "-n", ns, "fdb", "append", fdb_mac, "dev", "vx0",
                           "dst", remote])
            netns.add_address(ns, "vx0", f"{over}/24")
            netns.link_up(ns, "vx0")
            netns.ip("-n", ns, "neigh", "replace", peer_over, "lladdr", peer_mac, "dev", "vx0",
                     "nud", "permanent")
        wait_overlay(bed, self.over_a, self.over_b)

    def pids(self) -> list[int]:
        return []          # all of its work is the kernel's (softirq), not a process's

    def down(self) -> None:
        if self.bed is not None:
            for ns in (self.bed.ns_a, self.bed.ns_b):
                netns.ip("-n", ns, "link", "del", "vx0", check=False)


BACKENDS = {
    # name: (map [backend] table, overhead bytes)
    "udp": ({"type": "udp"}, 28),
    "vxlan": ({"type": "vxlan", "mode": "routed"}, 50),
    "vxlan-switched": ({"type": "vxlan", "mode": "switched"}, 50),
    "wireguard": ({"type": "wireguard"}, 60),
}


@dataclass
class Overlayd:
    backend: str
    implementation: str = "cython"
    options: str = ""          # the name's "+" options (engine_options), shown in the name
    over_a: str = "100.64.1.1"
    over_b: str = "100.64.2.1"
    daemons: list[DaemonProcess] = field(default_factory=list)
    # merged into each daemon's config (the profiler turns metrics on inside the namespaces)
    config_extra: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        suffix = "" if self.implementation == "cython" else "-py"
        return f"overlayd-{self.backend}{suffix}{self.options}"

    def up(self, bed: Testbed, workdir: Path) -> None:
        backend, overhead = BACKENDS[self.backend]
        nodes = [{"name": "a", "subnet": "100.64.1.0/24", "public_ip": UNDER_A,
                  "address": self.over_a},
                 {"name": "b", "subnet": "100.64.2.0/24", "public_ip": UNDER_B,
                  "address": self.over_b}]
        if self.backend == "wireguard":
            for entry in nodes:
                entry["public_key"] = write_wireguard_key(workdir / f"{entry['name']}.key")
        (workdir / "map.toml").write_text(configs.dumps(
            configs.subnet_map("100.64.0.0/16", 24, backend, nodes)))
        env = dict(os.environ, OVERLAYD_DATAPLANE=self.implementation)
        for node, ns in (("a", bed.ns_a), ("b", bed.ns_b)):
            doc = configs.daemon_config(
                node, "map.toml", "ovl0", str(workdir / f"{node}.sock"), "warning",
                # inner MTU 1450 for every subject: the underlay overlayd plans for is set so
                configs.merge({"device": {"underlay_mtu": INNER_MTU + overhead},
                               "wireguard": {"private_key_file": f"{node}.key"}},
                              self.config_extra))
            path = workdir / f"{node}.toml"
            path.write_text(configs.dumps(doc))
            self.daemons.append(DaemonProcess(
                ns, [sys.executable, "-m", "overlayd", "run", "-c", str(path)],
                workdir / f"{node}.log", lifetime_s=3600, env=env))
        for daemon in self.daemons:
            if daemon.pid is None:
                raise RuntimeError(f"{self.name}: daemon did not start:\n{daemon.log_tail()}")
        wait_overlay(bed, self.over_a, self.over_b)

    def pids(self) -> list[int]:
        return [d.pid for d in self.daemons if d.pid is not None and d.alive()]

    def down(self) -> None:
        for daemon in self.daemons:
            daemon.stop()
        self.daemons = []


def write_wireguard_key(path: Path) -> str:
    """A fresh private key file (0600); its public key, base64, for the map."""
    from overlayd.control.wg_keys import encode_key
    from overlayd.control.wg_noise import generate_private_key, public_key

    key = generate_private_key()
    path.write_text(encode_key(key) + "\n")
    path.chmod(0o600)
    return encode_key(public_key(key))


def engine_options(options: list[str]) -> dict[str, Any]:
    """"+loop", "+t2" (threads engine, 2 threads), "+poll50" (busy-poll 50 µs), "+nouso" (no
    UDP superpackets to and from the device: device_uso = false), "+cpu" / "+flow" (steering),
    "+gap5000" (flowlet_gap_us = 5000, with +cpu) -> [dataplane]."""
    out: dict[str, Any] = {}
    for option in options:
        if option == "loop":
            out["engine"] = "loop"
        elif option[:1] == "t" and option[1:].isdigit():
            out.update(engine="threads", threads=int(option[1:]))
        elif option.startswith("poll") and option[4:].isdigit():
            out["busy_poll_us"] = int(option[4:])
        elif option == "nouso":
            out["device_uso"] = False
        elif option in ("cpu", "flow"):
            out["steering"] = option
        elif option.startswith("gap") and option[3:].isdigit():
            out["flowlet_gap_us"] = int(option[3:])
        else:
            raise ValueError(f"unknown subject option +{option} (known: +loop, +tN, +pollN, "
                             "+nouso, +cpu, +flow, +gapN)")
    return out


def make_subject(name: str) -> KernelVxlan | Overlayd:
    if name == "kernel-vxlan":
        return KernelVxlan()
    name, *options = name.split("+")
    base = name.removeprefix("overlayd-")
    implementation = "cython"
    if base.endswith("-py"):
        base, implementation = base[:-3], "python"
    if not name.startswith("overlayd-") or base not in BACKENDS:
        known = ", ".join(["kernel-vxlan"] + [f"overlayd-{b}[-py]" for b in BACKENDS])
        raise ValueError(f"unknown subject {name!r} (known: {known})")
    return Overlayd(base, implementation, options="".join(f"+{o}" for o in options),
                    config_extra={"dataplane": engine_options(options)})
