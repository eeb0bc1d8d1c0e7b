"""The vxlan parts of a Lab: hosts running the kernel's own VXLAN, "VMs" behind a Linux bridge
on a host, and captures of the underlay.

Kernel hosts are the independent peers of the interop tests, configured with `ip`/`bridge` the
way a person (or flannel) would, nothing from overlayd:

- routed, exactly as flannel's vxlan backend programs a node (DESIGN.md section 2):
  ``flannel.<VNI>`` (vxlan, dstport 8472, nolearning), the subnet's ``.0/32`` on it, and per
  peer a permanent neighbour ``<subnet>.0 -> VtepMAC``, an FDB entry ``VtepMAC -> public IP``
  and a route ``<subnet> via <subnet>.0 dev flannel.<VNI> onlink``;
- switched, a plain kernel VTEP: ``vx0`` (vxlan, dstport 4789, learning), the node address with
  the network's prefix length, and one all-zeros flood entry per peer.

A VM is a namespace whose ``eth0`` is a veth into a bridge ``brvm`` on its host; the host's
tap is a port of that bridge too and the host's overlay address moves onto the bridge.
Everything is created inside namespaces of this lab only.
"""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from overlayd.lab import netns
from overlayd.lab.hosts import HostRef, HostsView, LabHost
from overlayd.lab.netns import LabError

VM_BRIDGE = "brvm"
CAPTURE_START_S = 5.0


class VxlanHosts(HostsView):
    """Mixed into Lab; uses its namespaces, prefix and map parameters."""

    prefix: str
    network: Any
    backend_extra: dict[str, Any]
    workdir: Path | None
    _namespaces: list[str]

    def _add_ns(self, name: str) -> None:
        raise NotImplementedError

    @property
    def switched(self) -> bool:
        return self.backend == "vxlan" and self.backend_extra.get("mode") == "switched"

    @property
    def vni(self) -> int:
        return int(self.backend_extra.get("vni", 1))

    @property
    def kernel_device(self) -> str:
        return "vx0" if self.switched else f"flannel.{self.vni}"

    def overlay_prefixlen(self) -> int:
        """Prefix length of overlay addresses: the network's when switched (one segment)."""
        return int(self.network.prefixlen) if self.switched else 32

    # -- kernel VTEPs ---------------------------------------------------------------------------

    def setup_kernel_vtep(self, ref: HostRef) -> None:
        host = self.host(ref)
        if self.backend != "vxlan" or host.vtep_mac is None or host.subnet is None:
            raise LabError(f"{host.name}: a kernel VTEP needs the vxlan backend and a VTEP MAC")
        dev = self.kernel_device
        ns = host.netns
        # veth "offloads" the inner TCP/UDP checksum of the kernel's VXLAN datagrams by never
        # computing it: across namespaces it arrives as CHECKSUM_PARTIAL, which a UDP socket
        # (overlayd's) cannot see, so the inner packet carries only the pseudo-header sum, and
        # overlayd finishes it (offload.pxi 6.). That is the default a host comes with, kept
        # unless the spec asks for the tuned case: `tx off` makes the kernel compute it.
        if host.spec is not None and host.spec.kernel_tx_checksum_off:
            netns.ns_run(ns, ["ethtool", "-K", "ul0", "tx", "off"])
        add = ["link", "add", dev, "type", "vxlan", "id", str(self.vni), "dstport",
               str(self.port), "local", host.underlay_ip, "dev", "ul0"]
        netns.ip("-n", ns, *add, *([] if self.switched else ["nolearning"]))
        netns.ip("-n", ns, "link", "set", dev, "address", host.vtep_mac,
                 "mtu", str(self.device_mtu(host)))
        netns.add_address(ns, dev, f"{host.overlay_ip}/{self.overlay_prefixlen()}")
        netns.link_up(ns, dev)
        for peer in self.hosts:
            if peer is host:
                continue
            assert peer.subnet is not None and peer.vtep_mac is not None
            if self.switched:
                self._bridge(ns, "fdb", "append", "00:00:00:00:00:00", "dev", dev,
                             "dst", peer.underlay_ip)
                continue
            gateway = str(peer.subnet.network_address)
            netns.ip("-n", ns, "neigh", "replace", gateway, "lladdr", peer.vtep_mac,
                     "dev", dev, "nud", "permanent")
            self._bridge(ns, "fdb", "append", peer.vtep_mac, "dev", dev, "dst", peer.underlay_ip)
            netns.ip("-n", ns, "route", "replace", str(peer.subnet), "via", gateway,
                     "dev", dev, "onlink")

    @staticmethod
    def _bridge(ns: str, *args: str) -> None:
        netns.ns_run(ns, ["bridge", *args])

    def kernel_fdb(self, ref: HostRef) -> list[dict[str, Any]]:
        """`bridge -j fdb show dev <kernel device>` of a kernel host."""
        import json

        out = netns.ns_run(self.host(ref).netns,
                           ["bridge", "-j", "fdb", "show", "dev", self.kernel_device]).stdout
        return json.loads(out) if out.strip() else []

    # -- VMs behind a bridge --------------------------------------------------------------------

    def setup_vm_bridge(self, host: LabHost) -> None:
        """brvm on ``host``, before its daemon starts, with the node's overlay address on it;
        the daemon's config names it (`[device] bridge`), so overlayd makes its tap a port."""
        netns.add_bridge(host.netns, VM_BRIDGE)
        # A fixed MAC, as README tells operators: a bridge without one takes its lowest port's,
        # so a VM port with a lower random MAC would answer ARP for the node's address.
        if host.vtep_mac:
            netns.ip("-n", host.netns, "link", "set", VM_BRIDGE, "address", host.vtep_mac)
        netns.add_address(host.netns, VM_BRIDGE, f"{host.overlay_ip}/{self.overlay_prefixlen()}")

    def _vm_bridge(self, host: LabHost) -> None:
        if host.spec is None or not host.spec.vm_bridge:
            raise LabError(f"{host.name}: VMs need a bridge: build it with HostSpec(vm_bridge=True)")

    def add_vm(self, ref: HostRef, name: str, address: str, mac: str) -> LabHost:
        """A namespace ``name`` with eth0 (``mac``, ``address``/network) bridged on ``ref``."""
        host = self.host(ref)
        assert self.workdir is not None
        ns = f"{self.prefix}-{name}"
        self._add_ns(ns)
        vm = LabHost(name=name, netns=ns, underlay_ip="", underlay_mtu=0,
                     dir=self.workdir / name, subnet=None, overlay_ip=address, vtep_mac=mac)
        vm.dir.mkdir(exist_ok=True)
        self.vms.append(vm)
        self._plug_vm(vm, host)
        return vm

    def _plug_vm(self, vm: LabHost, host: LabHost) -> None:
        self._vm_bridge(host)
        port = f"v-{vm.name}"[:15]
        mtu = str(self.device_mtu(host))
        netns.ip("link", "add", "eth0", "netns", vm.netns, "address", str(vm.vtep_mac),
                 "mtu", mtu, "type", "veth", "peer", "name", port, "netns", host.netns,
                 "mtu", mtu)
        netns.set_master(host.netns, port, VM_BRIDGE)
        netns.link_up(host.netns, port)
        netns.add_address(vm.netns, "eth0", f"{vm.overlay_ip}/{self.network.prefixlen}")
        netns.link_up(vm.netns, "eth0")

    def move_vm(self, vm_ref: HostRef, to: HostRef) -> None:
        """Unplug the VM (deleting its veth) and plug it, same MAC and address, into ``to``."""
        vm = self.host(vm_ref)
        netns.ip("-n", vm.netns, "link", "del", "eth0")
        self._plug_vm(vm, self.host(to))

    def announce(self, ref: HostRef, iface: str = "eth0") -> None:
        """One gratuitous ARP from a VM or host: its first frame in a new place."""
        from overlayd.lab.traffic import _agent_json

        host = self.host(ref)
        agent = self.agent(host, "garp", iface, str(host.overlay_ip))
        result = _agent_json(agent, 10.0)
        if "error" in result:
            raise LabError(f"garp from {host.name} failed: {result['error']}")

    def agent(self, ref: HostRef, *args: str) -> Any:
        raise NotImplementedError

    # -- capture --------------------------------------------------------------------------------

    @contextmanager
    def capture(self, ref: HostRef, iface: str, bpf: str, count: int = 20,
                seconds: float = 10.0) -> Iterator[Path]:
        """tcpdump on ``iface`` in a host while the block runs: the pcap's path (complete when
        the block has ended). Stops at ``count`` packets or ``seconds``, whichever is first."""
        host = self.host(ref)
        path = host.dir / f"capture-{iface}-{time.monotonic_ns()}.pcap"
        cmd = ["timeout", f"{seconds:g}", "tcpdump", "-n", "-U", "-i", iface, "-c", str(count),
               "-w", str(path), bpf]
        proc = subprocess.Popen(netns.ns_cmd(host.netns, cmd), stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, start_new_session=True)
        try:
            self._wait_listening(proc)
            yield path
        finally:
            try:
                proc.wait(timeout=1.0)
            except subprocess.TimeoutExpired:
                proc.send_signal(signal.SIGINT)        # tcpdump flushes and exits on SIGINT
                try:
                    proc.wait(timeout=5.0)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=5.0)
            if proc.stderr is not None:
                proc.stderr.close()

    @staticmethod
    def _wait_listening(proc: subprocess.Popen[bytes]) -> None:
        import os
        import select

        assert proc.stderr is not None
        deadline = time.monotonic() + CAPTURE_START_S
        text = b""
        while (left := deadline - time.monotonic()) > 0:
            readable, _, _ = select.select([proc.stderr], [], [], left)
            if not readable:
                break
            chunk = os.read(proc.stderr.fileno(), 4096)
            if not chunk:
                break
            text += chunk
            if b"listening on" in text:
                return
        proc.kill()
        raise LabError(f"tcpdump did not start: {text.decode(errors='replace').strip()}")
