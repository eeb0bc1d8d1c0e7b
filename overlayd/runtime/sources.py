"""Which map source a config asks for, built with its I/O: the one place that knows them all.

A new source is a module in control/ implementing control/map_source.py, and a branch here.
Also here: what every source shares at run time, writing flannel's subnet.env.
"""

from __future__ import annotations

import ipaddress
import logging

from overlayd.control import subnet_env
from overlayd.control.config import DaemonConfig, EtcdSettings
from overlayd.control.etcd_source import EtcdMapSource
from overlayd.control.file_source import FileMapSource
from overlayd.control.local_node import LocalView
from overlayd.control.map_source import MapSource
from overlayd.control.subnet_map import SubnetMap
from overlayd.errors import EX_UNAVAILABLE, StartupError
from overlayd.io import host_network
from overlayd.io.atomic_file import read_text, write_atomic

log = logging.getLogger("overlayd")


def open_source(config: DaemonConfig) -> MapSource:
    if config.map_source == "etcd":
        assert config.etcd is not None   # validated with the config
        from overlayd.io.etcd_store import EtcdStore  # aetcd/grpc only when etcd is used

        etcd = config.etcd
        previous = None
        if config.subnet_env is not None and (text := read_text(config.subnet_env)):
            previous = subnet_env.previous_subnet(text)
        store = EtcdStore(list(etcd.endpoints), ca_file=etcd.ca_file, cert_file=etcd.cert_file,
                          key_file=etcd.key_file)
        return EtcdMapSource(store, etcd, public_ip(etcd), previous_subnet=previous,
                             wireguard_public_key=lambda: own_public_key(config))
    return FileMapSource(config.map_file, config.map_poll_seconds, config.node_name)


def own_public_key(config: DaemonConfig) -> str:
    """This node's WireGuard public key (base64), creating its private key file on first use."""
    from overlayd.control.wg_keys import encode_key, load_or_create_private_key
    from overlayd.control.wg_noise import public_key

    assert config.wireguard is not None
    return encode_key(public_key(load_or_create_private_key(config.wireguard.private_key_file,
                                                            str(config.path))))


def public_ip(etcd: EtcdSettings) -> ipaddress.IPv4Address:
    """This node's identity in etcd: ``public_ip``, else the first IPv4 address of
    ``interface``, else that of the interface holding the default route (flannel's rules)."""
    if etcd.public_ip is not None:
        return etcd.public_ip
    name = etcd.interface or host_network.default_route_interface()
    if name is None:
        raise StartupError("no IPv4 default route to find this node's public IP by: set "
                           "[map] public_ip or [map] interface", EX_UNAVAILABLE)
    held = [a.address for a in host_network.host_addresses() if a.interface == name]
    if not held:
        raise StartupError(f"interface {name} has no IPv4 address to use as this node's public "
                           "IP (set [map] public_ip or [map] interface)", EX_UNAVAILABLE)
    return held[0]


class SubnetEnvWriter:
    """Writes subnet.env whenever the map in force changes what it says (either source)."""

    def __init__(self, config: DaemonConfig) -> None:
        self.path = config.subnet_env
        self.written: str | None = None
        self.error: str | None = None

    def __call__(self, smap: SubnetMap, view: LocalView) -> None:
        if self.path is None:
            return
        text = subnet_env.render(smap.network, view.node.subnet, view.device_mtu)
        if text == self.written:
            return
        try:
            write_atomic(self.path, text)
        except OSError as exc:
            # The overlay works without it; only the flannel CNI plugin needs it.
            self.error = f"writing {self.path}: {exc.strerror or exc}"
            log.error("subnet.env: %s", self.error)
            return
        self.written, self.error = text, None
        log.info("wrote %s (subnet %s, mtu %d)", self.path, view.node.subnet, view.device_mtu)


def check_etcd(config: DaemonConfig, connect: bool, any_host: bool) -> int:
    """`overlayd check` for the etcd source: this node's public IP, and with ``connect``
    whether etcd answers and holds a valid network config. 0 / 69 unreachable / 78 invalid."""
    import asyncio

    from overlayd.control.flannel_schema import config_key, parse_network_config
    from overlayd.control.problems import EX_CONFIG, ConfigError
    from overlayd.io.etcd_store import EtcdStore
    from overlayd.io.store_protocol import StoreError

    etcd = config.etcd
    assert etcd is not None
    print(f"map: etcd {', '.join(etcd.endpoints)} prefix {etcd.prefix}, lease TTL "
          f"{etcd.lease_ttl_seconds} s, subnet.env {config.subnet_env or 'not written'}")
    if not any_host:
        try:
            print(f"this node: public IP {public_ip(etcd)}")
        except StartupError as exc:
            print(f"this node: {exc}")
            return exc.exit_code
    if not connect:
        return 0

    async def probe() -> int:
        store = EtcdStore(list(etcd.endpoints), ca_file=etcd.ca_file, cert_file=etcd.cert_file,
                          key_file=etcd.key_file)
        try:
            status = await store.status()
            print(f"etcd: answers at {store.endpoint} (version {status.get('version')}, "
                  f"revision {status.get('revision')})")
            key = config_key(etcd.prefix)
            kv = await store.get(key)
            if kv is None:
                print(f"network config: {key} is missing (write it with `overlayd net init`)")
                return EX_CONFIG
            try:
                net = parse_network_config(kv.value, key)
            except ConfigError as exc:
                print(f"network config: invalid:\n{exc}")
                return EX_CONFIG
            leases, _ = await store.list_prefix(f"{etcd.prefix}/subnets/")
            print(f"network config: ok: network {net.network}, /{net.subnet_len} subnets "
                  f"{net.subnet_min}..{net.subnet_max}, backend {net.backend_type} port "
                  f"{net.port}, {len(leases)} leases")
            return 0
        except StoreError as exc:
            print(f"etcd: does not answer: {exc}")
            return EX_UNAVAILABLE
        finally:
            await store.close()

    return asyncio.run(probe())
