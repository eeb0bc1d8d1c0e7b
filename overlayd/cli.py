"""Command line: `overlayd run|check|keys|demo|net` and `--version`.

Every failure the operator can cause ends in one clear line on stderr and a sysexits status
(78 for a config error, so systemd does not restart a broken config), never a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from overlayd import __version__
from overlayd.control.problems import EX_CONFIG, ConfigError
from overlayd.control.subnet_map import SubnetMap
from overlayd.errors import EX_SOFTWARE, EX_USAGE, StartupError

DEFAULT_CONFIG = "/etc/overlayd/overlayd.toml"


def _implementation_name() -> str:
    try:
        from overlayd.dataplane import IMPLEMENTATION
    except ImportError as exc:
        return f"unavailable ({exc})"
    return IMPLEMENTATION


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="overlayd", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="store_true",
                        help="print the version and the data-plane implementation")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    run = sub.add_parser("run", help="run the daemon in the foreground")
    run.add_argument("-c", "--config", default=DEFAULT_CONFIG, help="daemon config (TOML)")

    check = sub.add_parser("check", help="validate a config and its subnet map")
    check.add_argument("-c", "--config", default=DEFAULT_CONFIG, help="daemon config (TOML)")
    check.add_argument("--any-host", action="store_true",
                       help="do not require this host to be a node of the map (for CI)")
    check.add_argument("--connect", action="store_true",
                       help="etcd source: also say whether etcd answers and whether the "
                            "network config there is valid")

    keys = sub.add_parser("keys", help="print this node's WireGuard public key (creating its "
                                       "private key file on first use)")
    keys.add_argument("-c", "--config", default=DEFAULT_CONFIG, help="daemon config (TOML)")

    from overlayd import demo
    demo_p = sub.add_parser("demo", help="build a 3-host overlay in namespaces and show it working")
    demo.add_arguments(demo_p)

    from overlayd.ops import commands as ops_commands
    ops_commands.add_subcommands(sub)

    from overlayd.ops import net_commands
    net_commands.add_subcommands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from overlayd.ops import commands as ops_commands

    parser = build_parser()
    args = parser.parse_args(argv)
    if args.version:
        print(f"overlayd {__version__} (data plane: {_implementation_name()})")
        return 0
    if args.command is None:
        parser.print_help(sys.stderr)
        return EX_USAGE
    try:
        if args.command == "run":
            return cmd_run(Path(args.config))
        if args.command == "check":
            return cmd_check(Path(args.config), args.any_host, args.connect)
        if args.command == "keys":
            return cmd_keys(Path(args.config))
        if args.command in ops_commands.COMMANDS:
            return ops_commands.run(args)
        if args.command == "net":
            from overlayd.ops import net_commands
            return net_commands.run(args)
        if args.command == "demo":
            from overlayd import demo
            return demo.run_from_args(args)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return EX_CONFIG
    except StartupError as exc:
        print(f"overlayd: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    parser.error(f"unknown command {args.command}")
    return EX_USAGE


def cmd_check(path: Path, any_host: bool, connect: bool = False) -> int:
    from overlayd.control.config import load_config
    from overlayd.control.local_node import find_local_node

    config, smap = load_config(path)
    if smap is None:                 # etcd: the map is not in a file
        from overlayd.runtime.sources import check_etcd

        print(f"{path}: ok")
        return check_etcd(config, connect, any_host)
    if connect:
        print("--connect: the file source has nothing to connect to")
    problems = []
    me_text = "not checked (--any-host)"
    if not any_host or config.node_name is not None:
        from overlayd.io.host_network import host_addresses

        held = [] if any_host else [h.address for h in host_addresses()]
        try:
            me = find_local_node(smap, str(config.map_file), config.node_name, held)
            me_text = f"{me.name} ({me.subnet}, public IP {me.public_ip})"
        except ConfigError as exc:
            problems = exc.problems
    if problems:
        raise ConfigError(problems)
    print(f"{path}: ok")
    print(f"{config.map_file}: ok: network {smap.network}, /{smap.subnet_len} subnets, "
          f"backend {smap.backend.type} port {smap.backend.port}, {len(smap.nodes)} nodes")
    print(f"this node: {me_text}")
    if smap.backend.type == "vxlan":
        print(vtep_table(smap))
    return 0


def cmd_keys(path: Path) -> int:
    """The public key to put into the map as this node's ``public_key``. Reads only the daemon
    config: the map cannot be complete before this node's key exists."""
    from overlayd.control.config import parse_config
    from overlayd.control.problems import read_toml
    from overlayd.runtime.wireguard import public_key_text

    config, problems = parse_config(read_toml(path), path)
    if config is None or config.wireguard is None:
        raise ConfigError(problems)
    print(public_key_text(config.wireguard, path))
    return 0
def vtep_table(smap: SubnetMap) -> str:
    """Every node's VTEP MAC, what a kernel VTEP (flannel.1) on another host must be told."""
    from overlayd.control.subnet_map import derive_vtep_mac
    from overlayd.ops.tables import table

    rows = [[n.name, str(n.public_ip), n.vtep_mac,
             "derived" if n.vtep_mac == derive_vtep_mac(n.public_ip, smap.backend.vni)
             else "map"] for n in smap.nodes]
    return "VTEP MACs:\n" + table(["NODE", "PUBLIC IP", "VTEP MAC", "FROM"], rows)


def cmd_run(path: Path) -> int:
    from overlayd.control.config import load_config
    from overlayd.runtime.logs import setup_logging

    config, smap = load_config(path)
    setup_logging(config.log_level)
    if "OVERLAYD_DATAPLANE" not in os.environ:
        os.environ["OVERLAYD_DATAPLANE"] = config.dataplane
    try:
        from overlayd import dataplane
    except ImportError as exc:
        raise StartupError(f"data plane {config.dataplane!r} unavailable: {exc}",
                           EX_SOFTWARE) from None
    from overlayd.runtime.service import serve

    return serve(config, smap, dataplane)
