"""``EtcdLab``: a Lab whose hosts take their map from a real etcd on the lab's underlay.

Topology: the Lab's hosts, plus one namespace per etcd member on the same bridge (daemons in
namespaces cannot reach the root namespace's loopback, so etcd lives on the underlay;
``lab.etcd.underlay_cluster``). The lab writes the network config with ``overlayd net init`` (run inside a
member's namespace), and one daemon config per host with ``[map] source = "etcd"``, its
``public_ip`` the host's underlay address and its subnet.env in the host's directory.

A host's subnet is not known before its daemon claims it: ``wait_ready`` reads the daemon's
subnet.env (FLANNEL_SUBNET) and fills in ``subnet``/``overlay_ip`` before checking the device.
``add_host`` adds a host later (a node joining); ``etcdctl`` runs etcd's own client inside a
member's namespace (raw keys, leases, compaction), as an operator would.
"""

from __future__ import annotations

import ipaddress
import json
import shutil
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from overlayd.control import subnet_env
from overlayd.lab import configs
from overlayd.lab.etcd import EtcdCluster, EtcdTLS, underlay_cluster
from overlayd.lab.hosts import HostRef, HostSpec, LabHost
from overlayd.lab.netns import LabError, ns_run
from overlayd.lab.overlay_lab import Lab

PREFIX = "/coreos.com/network"


def etcdctl_unavailable() -> str | None:
    return None if shutil.which("etcdctl") else "etcdctl is not installed (Debian: etcd-client)"


class EtcdLab(Lab):
    def __init__(self, hosts: int | Sequence[HostSpec] = 3, *, members: int = 1,
                 lease_ttl_seconds: int = 86400, net_init: Sequence[str] | None = (),
                 config_extra: Mapping[str, Any] | None = None, tls: EtcdTLS | None = None,
                 **kw: Any) -> None:
        super().__init__(hosts, **kw)
        # TLS: the members serve tls's certificate (its SANs must name their addresses,
        # ``member_addresses``); daemons, etcdctl and net init present tls.probe_cert_file.
        self.tls = tls
        self.member_count = members
        self.lease_ttl_seconds = lease_ttl_seconds
        self.net_init = None if net_init is None else list(net_init)
        self.config_extra = dict(config_extra or {})
        self.cluster: EtcdCluster | None = None
        self.etcd_hosts: list[LabHost] = []

    # -- build ----------------------------------------------------------------------------------

    def build(self) -> None:
        super().build()      # namespaces, bridge, hosts; write_configs() below writes etcd ones
        for host in self.hosts:
            if host.spec is None or host.spec.runs_daemon:
                host.subnet, host.overlay_ip = None, None   # claimed by the daemon, read later
        self.cluster = underlay_cluster(self, self.member_count, tls=self.tls)
        self.etcd_hosts = [self.host(m.name) for m in self.cluster.members]
        if self.net_init is not None:
            self.init_network(self.net_init)
        for host in self.hosts:
            if host.spec is not None and host.spec.kernel_vxlan and host.subnet is not None:
                # A kernel host's subnet is the lab's, not claimed: its lease goes in before any
                # daemon starts, or one of them may claim that subnet at random.
                self.write_kernel_lease(host)
        self.write_configs()     # now with the members' endpoints

    def member_addresses(self, members: int | None = None) -> list[str]:
        """Where the members will be (underlay_cluster's bystanders), for server certificates."""
        count = self.member_count if members is None else members
        return [str(self.underlay.broadcast_address - i) for i in range(1, count + 1)]

    def _client_tls(self, style: str) -> list[str]:
        """The client's TLS files as `overlayd net` (style "overlayd") or etcdctl flags."""
        tls = self.tls
        if tls is None:
            return []
        names = (("--ca-file", "--cert-file", "--key-file") if style == "overlayd"
                 else ("--cacert", "--cert", "--key"))
        files = (tls.ca_file, tls.probe_cert_file, tls.probe_key_file)
        return [arg for name, f in zip(names, files, strict=True) if f is not None
                for arg in (name, str(f))]

    @property
    def endpoints(self) -> list[str]:
        return self.cluster.endpoints if self.cluster is not None else []

    def init_network(self, extra: Sequence[str] = (), *, force: bool = False) -> None:
        if self.switched:
            # `net init` writes flannel's keys only; switched is overlayd's own Backend.Mode.
            self.etcdctl("put", f"{PREFIX}/config", json.dumps({
                "Network": str(self.network), "SubnetLen": self.subnet_len,
                "Backend": {"Type": "vxlan", "VNI": self.vni, "Port": self.port,
                            "Mode": "switched"}}))
            return
        backend = ["--backend", self.backend]
        if self.port:
            backend += ["--port", str(self.port)]
        if self.backend == "vxlan" and "vni" in self.backend_extra:
            backend += ["--vni", str(self.backend_extra["vni"])]
        argv = [sys.executable, "-m", "overlayd", "net", "init", "--etcd-endpoints",
                *self.endpoints, "--network", str(self.network), "--subnet-len",
                str(self.subnet_len), *backend, *self._client_tls("overlayd"), *extra,
                *(["--force"] if force else [])]
        proc = ns_run(self.etcd_hosts[0].netns, argv, timeout=30, check=False)
        if proc.returncode != 0:
            raise LabError(f"overlayd net init failed: {proc.stdout}{proc.stderr}")

    def write_configs(self) -> None:
        for host in self.hosts:
            self._write_config(host)

    def _write_config(self, host: LabHost) -> None:
        spec = host.spec or HostSpec()
        doc = configs.daemon_config(host.name, "unused", self.device,
                                    str(host.control_socket), self.log_level,
                                    configs.merge(self.config_extra, spec.config_extra))
        del doc["node"]          # with etcd a node is its public IP; its name is its lease
        # A wireguard network (the backend is etcd's to say) makes its key here, never in the
        # host's default /var/lib/overlayd.
        doc = configs.merge({"wireguard": {"private_key_file": str(host.dir / "wg.key")}}, doc)
        extras = {k: v for k, v in doc["map"].items() if k not in ("file", "subnet_env")}
        doc["map"] = {"source": "etcd", "endpoints": self.endpoints, "prefix": PREFIX,
                      "lease_ttl_seconds": self.lease_ttl_seconds,
                      "public_ip": host.underlay_ip,
                      "subnet_env": str(host.dir / "subnet.env"), **extras}
        if self.tls is not None:
            doc["map"]["ca_file"] = str(self.tls.ca_file)
            if self.tls.probe_cert_file is not None and self.tls.probe_key_file is not None:
                doc["map"]["cert_file"] = str(self.tls.probe_cert_file)
                doc["map"]["key_file"] = str(self.tls.probe_key_file)
        host.config_path.write_text(configs.dumps(doc))

    def add_host(self, name: str, spec: HostSpec | None = None, start: bool = True) -> LabHost:
        """A new host on the underlay (a node joining the fleet), with its daemon started."""
        index = len(self.hosts) + 1
        host = self._add_underlay_host(name, str(self.underlay.network_address + index),
                                       1500, f"p{index}")
        host.spec = spec or HostSpec()
        self.hosts.append(host)
        self._write_config(host)
        if start:
            self.start_daemon(host)
        return host

    # -- kernel hosts: flannel's vxlan node, by hand ---------------------------------------------

    def setup_kernel_vtep(self, ref: HostRef) -> None:
        """Deferred: a kernel host is programmed by ``join_kernel_host`` once the daemons have
        claimed their subnets (Lab.build calls this before they exist)."""

    def join_kernel_host(self, ref: HostRef) -> None:
        """Make a kernel_vxlan host a flannel vxlan node: its lease written by hand exactly as
        flannel writes it, and its flannel.<VNI> programmed toward every overlayd host with the
        VTEP MACs their leases carry (what flannel would do from its own watch)."""
        host = self.host(ref)
        assert host.subnet is not None and host.vtep_mac is not None
        for other in self.hosts:
            if other is not host and other.subnet is not None:
                kv = self.etcdctl("get", _key(other.subnet), "--print-value-only").strip()
                other.vtep_mac = json.loads(kv)["BackendData"]["VtepMAC"]
        self.write_kernel_lease(host)
        super().setup_kernel_vtep(host)

    def write_kernel_lease(self, host: LabHost) -> None:
        """A kernel host's lease, by hand, exactly as flannel writes it (a reservation: no TTL)."""
        assert host.subnet is not None and host.vtep_mac is not None
        lease = json.dumps({"PublicIP": host.underlay_ip, "PublicIPv6": None,
                            "BackendType": "vxlan",
                            "BackendData": {"VNI": self.vni, "VtepMAC": host.vtep_mac}},
                           separators=(",", ":"))
        self.etcdctl("put", _key(host.subnet), lease)

    # -- readiness: the subnet comes from the daemon ---------------------------------------------

    def _not_ready_reason(self, host: LabHost) -> str:
        self.learn_subnet(host)
        if host.overlay_ip is None:
            return "no subnet.env yet (lease not claimed)"
        return super()._not_ready_reason(host)

    def learn_subnet(self, ref: HostRef) -> ipaddress.IPv4Network | None:
        host = self.host(ref)
        try:
            text = (host.dir / "subnet.env").read_text()
        except OSError:
            return None
        subnet = subnet_env.previous_subnet(text)
        if subnet is not None:
            host.subnet, host.overlay_ip = subnet, str(subnet.network_address)
        return subnet

    # -- etcd itself ----------------------------------------------------------------------------

    def etcdctl(self, *args: str, member: int = 0, check: bool = True) -> str:
        """etcd's own CLI in a member's namespace, against every endpoint."""
        env_argv = ["env", "ETCDCTL_API=3", "etcdctl", "--endpoints",
                    ",".join(self.endpoints), "--command-timeout=5s",
                    *self._client_tls("etcdctl"), *args]
        proc = ns_run(self.etcd_hosts[member].netns, env_argv, timeout=20, check=False)
        if check and proc.returncode != 0:
            raise LabError(f"etcdctl {' '.join(args)} failed: {proc.stdout}{proc.stderr}")
        return proc.stdout

    def close(self) -> None:
        if self.cluster is not None:
            try:
                self.cluster.stop()
            except LabError:
                pass
        super().close()


def _key(subnet: ipaddress.IPv4Network) -> str:
    return f"{PREFIX}/subnets/{subnet.network_address}-{subnet.prefixlen}"
