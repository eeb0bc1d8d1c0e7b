"""`overlayd net init` and `overlayd net leases`: flannel's network in etcd, without etcdctl.

`net init` writes the network config at <prefix>/config, exactly as an operator would for
flannel. It never replaces a different config unless told (--force), and then only the version
it looked at (a compare on the key's revision). An equivalent config already there is success.

`net leases` lists <prefix>/subnets/: subnet, public IP, backend, VNI, VTEP MAC and the time
left on the etcd lease each key is attached to ("reservation" for a key without one, which no
node ever takes over). A key that does not parse is listed with the reason, never skipped.

Exit statuses: 0 done; 1 refused (a different config is there, or it changed meanwhile);
64 bad arguments; 69 etcd unavailable (every endpoint tried) or it refused the request.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import sys
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from overlayd.control.flannel_schema import (
    BACKEND_TYPES,
    DEFAULT_PREFIX,
    Lease,
    NetworkConfig,
    config_key,
    network_config_json,
    parse_lease,
    parse_network_config,
    subnets_prefix,
)
from overlayd.control.problems import ConfigError
from overlayd.errors import EX_UNAVAILABLE, EX_USAGE
from overlayd.io.store_protocol import KeyValue, MapStore, StoreError, StoreUnavailable
from overlayd.ops.tables import human_duration, table

EX_REFUSED = 1
DEFAULT_TIMEOUT_S = 5.0
# Where each flannel config field comes from on the command line, to name it in errors.
OPTION_OF_FIELD = {"Network": "--network", "SubnetLen": "--subnet-len",
                   "SubnetMin": "--subnet-min", "SubnetMax": "--subnet-max",
                   "Backend.Type": "--backend", "Backend.VNI": "--vni", "Backend.Port": "--port"}


class NetCommandError(Exception):
    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


def add_subcommands(sub: Any) -> None:
    net = sub.add_parser("net", help="the flannel network in etcd: write its config, list leases")
    net_sub = net.add_subparsers(dest="net_command", metavar="NET_COMMAND", required=True)
    store = argparse.ArgumentParser(add_help=False)
    store.add_argument("--etcd-endpoints", nargs="+", required=True, metavar="URL",
                       help="etcd client URLs (http:// or https://; several, or comma-separated)")
    store.add_argument("--prefix", default=DEFAULT_PREFIX,
                       help=f"flannel's etcd prefix (default {DEFAULT_PREFIX})")
    store.add_argument("--ca-file", help="CA certificate that signed etcd's server certificate")
    store.add_argument("--cert-file", help="client certificate (etcd --client-cert-auth)")
    store.add_argument("--key-file", help="private key of --cert-file")
    store.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S, metavar="SECONDS",
                       help=f"per etcd request and endpoint (default {DEFAULT_TIMEOUT_S:g})")

    init = net_sub.add_parser("init", parents=[store],
                              help="write the network config (<prefix>/config)")
    init.add_argument("--network", required=True, type=_network, metavar="CIDR",
                      help="the whole overlay, e.g. 10.5.0.0/16")
    init.add_argument("--subnet-len", type=int, metavar="N",
                      help="prefix length of each node's subnet (flannel's default: 24)")
    init.add_argument("--subnet-min", type=_address, metavar="IP",
                      help="first subnet nodes may claim (default: the second one)")
    init.add_argument("--subnet-max", type=_address, metavar="IP",
                      help="last subnet nodes may claim (default: the last one)")
    init.add_argument("--backend", choices=BACKEND_TYPES, default="udp",
                      help="udp (default) or vxlan")
    init.add_argument("--vni", type=int, metavar="N", help="VXLAN network identifier (vxlan)")
    init.add_argument("--port", type=int, metavar="N", help="the backend's UDP port")
    init.add_argument("--force", action="store_true",
                      help="replace a different network config that is already there")

    leases = net_sub.add_parser("leases", parents=[store], help="list the subnet leases")
    leases.add_argument("--json", action="store_true", help="print JSON for scripts")


def run(args: argparse.Namespace) -> int:
    command = f"net {args.net_command}"
    try:
        prefix = _prefix(args.prefix)
        if args.net_command == "init":
            config = _config_json(args)
            _with_store(args, lambda s: init_config(s, prefix, config, args.force))
            return 0
        result = _with_store(args, lambda s: list_leases(s, prefix))
        print(json.dumps(result, indent=2) if args.json else render_leases(result, prefix))
        return 0
    except NetCommandError as exc:
        for line in str(exc).splitlines():
            print(f"overlayd {command}: {line}", file=sys.stderr)
        return exc.code


def _with_store(args: argparse.Namespace,
                action: Callable[[MapStore], Coroutine[Any, Any, Any]]) -> Any:
    """Run action on a store for the endpoints and TLS files given, then close it."""
    from overlayd.io.etcd_store import EtcdStore

    endpoints = [url for item in args.etcd_endpoints for url in item.split(",") if url]

    async def session() -> Any:
        try:
            store: MapStore = EtcdStore(endpoints, ca_file=args.ca_file, cert_file=args.cert_file,
                                  key_file=args.key_file, timeout_s=args.timeout)
        except StoreError as exc:
            raise NetCommandError(str(exc), EX_USAGE) from None
        try:
            return await action(store)
        except StoreUnavailable as exc:
            raise NetCommandError(str(exc), EX_UNAVAILABLE) from None
        except StoreError as exc:
            raise NetCommandError(str(exc), EX_UNAVAILABLE) from None
        finally:
            await store.close()
    return asyncio.run(session())


# -- net init -----------------------------------------------------------------------------------

def _config_json(args: argparse.Namespace) -> bytes:
    """The config the arguments describe, checked as flannel (and overlayd) will read it."""
    if args.vni is not None and args.backend != "vxlan":
        raise NetCommandError("--vni applies only to --backend vxlan", EX_USAGE)
    raw = network_config_json(args.network, subnet_len=args.subnet_len,
                              subnet_min=args.subnet_min, subnet_max=args.subnet_max,
                              backend_type=args.backend, vni=args.vni, port=args.port)
    try:
        parse_network_config(raw)
    except ConfigError as exc:
        lines = [f"{OPTION_OF_FIELD.get(p.key, p.key)}: {p.reason}" for p in exc.problems]
        raise NetCommandError("\n".join(lines), EX_USAGE) from None
    return raw


async def init_config(store: MapStore, prefix: str, raw: bytes, force: bool) -> None:
    key = config_key(prefix)
    wanted = parse_network_config(raw, key)
    existing = await store.get(key)
    if existing is None:
        if await store.create(key, raw) is None:
            raise NetCommandError(f"{key} was written by someone else meanwhile; run again "
                                  f"to compare", EX_REFUSED)
        print(f"{key}: written: {raw.decode()}")
        return
    if _same_config(existing.value, wanted, key):
        print(f"{key}: already holds this network config: {_text(existing.value)}")
        return
    if not force:
        raise NetCommandError(f"{key} already holds a different network config: "
                              f"{_text(existing.value)} (--force replaces it)", EX_REFUSED)
    if await store.put_if_revision(key, raw, existing.mod_revision) is None:
        raise NetCommandError(f"{key} changed while we looked at it; nothing written",
                              EX_REFUSED)
    print(f"{key}: replaced {_text(existing.value)} with {raw.decode()}")
    outside = await _leases_outside(store, prefix, wanted)
    if outside:
        print(f"warning: {len(outside)} lease(s) lie outside the new network or range: "
              f"{', '.join(outside[:5])}{' ...' if len(outside) > 5 else ''}", file=sys.stderr)


def _same_config(value: bytes, wanted: NetworkConfig, key: str) -> bool:
    try:
        return parse_network_config(value, key) == wanted
    except ConfigError:
        return False


async def _leases_outside(store: MapStore, prefix: str, config: NetworkConfig) -> list[str]:
    kvs, _ = await store.list_prefix(subnets_prefix(prefix))
    outside = []
    for kv in kvs:
        try:
            lease = parse_lease(kv.key, kv.value)
        except ConfigError:
            continue
        first = lease.subnet.network_address
        if (lease.subnet.prefixlen != config.subnet_len or not
                config.subnet_min <= first <= config.subnet_max):
            outside.append(str(lease.subnet))
    return outside


# -- net leases ---------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class LeaseRow:
    kv: KeyValue
    lease: Lease
    ttl_seconds: int | None          # None: a reservation (no etcd lease); -1: expired


async def list_leases(store: MapStore, prefix: str) -> dict[str, Any]:
    kvs, revision = await store.list_prefix(subnets_prefix(prefix))
    rows: list[LeaseRow] = []
    invalid: list[dict[str, str]] = []
    ttls: dict[int, int] = {}
    for kv in kvs:
        try:
            lease = parse_lease(kv.key, kv.value)
        except ConfigError as exc:
            invalid.append({"key": kv.key, "error": "; ".join(p.reason for p in exc.problems)})
            continue
        if kv.lease and kv.lease not in ttls:
            ttls[kv.lease] = await store.lease_ttl(kv.lease)
        rows.append(LeaseRow(kv, lease, ttls[kv.lease] if kv.lease else None))
    rows.sort(key=lambda r: r.lease.subnet)
    return {"prefix": prefix, "revision": revision,
            "leases": [_lease_json(r) for r in rows], "invalid": invalid}


def _lease_json(row: LeaseRow) -> dict[str, Any]:
    lease = row.lease
    return {"key": row.kv.key, "subnet": str(lease.subnet), "public_ip": str(lease.public_ip),
            "public_ipv6": str(lease.public_ipv6) if lease.public_ipv6 else None,
            # flannel's udp backend writes no BackendType; every other one does.
            "backend": lease.backend_type or "udp", "vni": lease.vni, "vtep_mac": lease.vtep_mac,
            "etcd_lease": row.kv.lease, "reservation": row.ttl_seconds is None,
            "ttl_seconds": row.ttl_seconds}


def render_leases(result: dict[str, Any], prefix: str) -> str:
    leases = result["leases"]
    lines = []
    if leases:
        rows = [[lease["subnet"], lease["public_ip"], lease["backend"], lease["vni"],
                 lease["vtep_mac"], _ttl_text(lease["ttl_seconds"])] for lease in leases]
        lines.append(table(["SUBNET", "PUBLIC IP", "BACKEND", "VNI", "VTEP MAC", "TTL"], rows))
    else:
        lines.append(f"no leases under {subnets_prefix(prefix)}")
    for bad in result["invalid"]:
        lines.append(f"invalid: {bad['key']}: {bad['error']}")
    return "\n".join(lines)


def _ttl_text(ttl: int | None) -> str:
    if ttl is None:
        return "reservation"
    if ttl < 0:
        return "expired"
    return human_duration(ttl)


# -- argument types -----------------------------------------------------------------------------

def _prefix(text: str) -> str:
    if not text.startswith("/") or text.rstrip("/") == "":
        raise NetCommandError(f"--prefix {text!r} must be an absolute etcd key path such as "
                              f"{DEFAULT_PREFIX}", EX_USAGE)
    return text.rstrip("/")


def _network(text: str) -> ipaddress.IPv4Network:
    if "/" not in text:
        raise argparse.ArgumentTypeError(f"{text!r} needs a prefix length, e.g. {text}/16")
    try:
        return ipaddress.IPv4Network(text, strict=True)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{text!r} is not an IPv4 network in CIDR form "
                                         f"({exc})") from None


def _address(text: str) -> ipaddress.IPv4Address:
    try:
        return ipaddress.IPv4Address(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an IPv4 address") from None


def _text(value: bytes) -> str:
    return value.decode(errors="replace")
