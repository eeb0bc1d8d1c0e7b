"""The files a lab hands to its daemons: the shared subnet map and one daemon config per host.

Written as TOML by a tiny writer (the stdlib reads TOML but cannot write it). The values come
from plain dicts so callers can add keys the lab does not know about yet (a vxlan VNI, metrics
listen addresses, ...) without changing this module: extra keys are merged in, section by section.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")

Table = dict[str, Any]


def merge(base: Table, extra: Mapping[str, Any]) -> Table:
    """``base`` updated by ``extra``, recursing into tables (so {"metrics": {"listen": ..}} keeps
    the other metrics keys); a value of None removes the key."""
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if value is None:
            out.pop(key, None)
        elif isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def dumps(doc: Mapping[str, Any]) -> str:
    """TOML text for a document of scalars, lists of scalars, tables and arrays of tables."""
    lines: list[str] = []
    _emit_table(lines, doc, ())
    return "\n".join(lines).lstrip("\n") + "\n"


def _emit_table(lines: list[str], table: Mapping[str, Any], path: tuple[str, ...]) -> None:
    # Scalars first: in TOML every key after a [header] belongs to that header's table.
    for key, value in table.items():
        if not _is_table(value) and not _is_table_array(value):
            lines.append(f"{_key(key)} = {_value(value)}")
    for key, value in table.items():
        sub = (*path, key)
        if _is_table(value):
            lines.append("")
            lines.append(f"[{'.'.join(_key(k) for k in sub)}]")
            _emit_table(lines, value, sub)
        elif _is_table_array(value):
            for item in value:
                lines.append("")
                lines.append(f"[[{'.'.join(_key(k) for k in sub)}]]")
                _emit_table(lines, item, sub)


def _is_table(value: Any) -> bool:
    return isinstance(value, Mapping)


def _is_table_array(value: Any) -> bool:
    return (isinstance(value, Sequence) and not isinstance(value, str) and bool(value)
            and all(isinstance(v, Mapping) for v in value))


def _key(key: str) -> str:
    return key if _BARE_KEY.match(key) else _string(key)


def _string(text: str) -> str:
    escaped = text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return f'"{escaped}"'


def _value(value: Any) -> str:
    if isinstance(value, bool):          # before int: bool is an int subclass
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return _string(value)
    if isinstance(value, Sequence):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    return _string(str(value))          # ip addresses, networks, paths


def subnet_map(cidr: str, subnet_len: int, backend: Mapping[str, Any],
               nodes: Sequence[Mapping[str, Any]], extra: Mapping[str, Any] | None = None) -> Table:
    """The map document: [network], [backend], [[nodes]]; ``extra`` is merged at the top."""
    doc: Table = {
        "network": {"cidr": cidr, "subnet_len": subnet_len},
        "backend": dict(backend),
        "nodes": [dict(n) for n in nodes],
    }
    return merge(doc, extra or {})


def daemon_config(node_name: str, map_file: str, device: str, control_socket: str,
                  log_level: str = "info", extra: Mapping[str, Any] | None = None) -> Table:
    """One host's daemon config.

    The node is named explicitly (no guessing by address), metrics stay off so no two daemons
    ever compete for a port, and the control socket lives in the lab's own directory: the
    default /run/overlayd/<device>.sock is on the filesystem all namespaces share, so three
    daemons with the same device name would fight over one socket path.
    """
    doc: Table = {
        "node": {"name": node_name},
        # subnet.env next to the control socket: never the host's /run/flannel
        "map": {"file": map_file, "subnet_env": str(Path(control_socket).parent / "subnet.env")},
        "device": {"name": device},
        "log": {"level": log_level},
        "metrics": {"enabled": False},
        "control": {"socket": control_socket},
    }
    return merge(doc, extra or {})
