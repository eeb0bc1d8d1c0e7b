"""Config problems: every error names the file, the key and what is wrong.

Validation never stops at the first problem: a ``Problems`` collector gathers them all so that
``overlayd check`` can print every one, and raises ``ConfigError`` at the end.
"""

from __future__ import annotations

import ipaddress
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

EX_CONFIG = 78  # sysexits.h: configuration error (systemd's RestartPreventExitStatus)


@dataclass(frozen=True, slots=True)
class Problem:
    file: str
    key: str      # dotted path, e.g. "nodes[2].subnet"; "" for the file as a whole
    reason: str

    def __str__(self) -> str:
        where = f"{self.file}: {self.key}" if self.key else self.file
        return f"{where}: {self.reason}"


class ConfigError(Exception):
    """One or more problems with a config or subnet map; str() lists them one per line."""

    def __init__(self, problems: list[Problem]) -> None:
        super().__init__("\n".join(str(p) for p in problems))
        self.problems = problems


@dataclass
class Problems:
    """Collects problems for one file; typed getters record a problem and return None on a bad value."""

    file: str
    found: list[Problem] = field(default_factory=list)

    def add(self, key: str, reason: str) -> None:
        self.found.append(Problem(self.file, key, reason))

    def raise_if_any(self) -> None:
        if self.found:
            raise ConfigError(list(self.found))

    # -- typed getters ------------------------------------------------------------------------

    def table(self, data: dict[str, Any], key: str, path: str = "") -> dict[str, Any]:
        """A sub-table (missing → empty); a non-table is a problem."""
        value = data.get(key, {})
        if not isinstance(value, dict):
            self.add(_join(path, key), f"must be a table ([{_join(path, key)}]), not {_kind(value)}")
            return {}
        return value

    def unknown_keys(self, data: dict[str, Any], allowed: set[str], path: str = "") -> None:
        for key in data:
            if key not in allowed:
                self.add(_join(path, key), f"unknown key (allowed here: {', '.join(sorted(allowed))})")

    def string(self, data: dict[str, Any], key: str, path: str = "", *, required: bool = False,
               default: str | None = None, choices: tuple[str, ...] = ()) -> str | None:
        if key not in data:
            if required:
                self.add(_join(path, key), "missing (required)")
            return default
        value = data[key]
        if not isinstance(value, str) or not value:
            self.add(_join(path, key), f"must be a non-empty string, not {_kind(value)}")
            return default
        if choices and value not in choices:
            self.add(_join(path, key), f"{value!r} is not one of: {', '.join(choices)}")
            return default
        return value

    def integer(self, data: dict[str, Any], key: str, path: str = "", *, required: bool = False,
                default: int | None = None, low: int | None = None,
                high: int | None = None) -> int | None:
        if key not in data:
            if required:
                self.add(_join(path, key), "missing (required)")
            return default
        value = data[key]
        if isinstance(value, bool) or not isinstance(value, int):
            self.add(_join(path, key), f"must be an integer, not {_kind(value)}")
            return default
        if (low is not None and value < low) or (high is not None and value > high):
            self.add(_join(path, key), f"{value} is out of range {low}..{high}")
            return default
        return value

    def number(self, data: dict[str, Any], key: str, path: str = "", *, default: float,
               low: float, high: float) -> float:
        if key not in data:
            return default
        value = data[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            self.add(_join(path, key), f"must be a number, not {_kind(value)}")
            return default
        if not low <= value <= high:
            self.add(_join(path, key), f"{value} is out of range {low}..{high}")
            return default
        return float(value)

    def boolean(self, data: dict[str, Any], key: str, path: str = "", *, default: bool) -> bool:
        if key not in data:
            return default
        value = data[key]
        if not isinstance(value, bool):
            self.add(_join(path, key), f"must be true or false, not {_kind(value)}")
            return default
        return value

    def ipv4_address(self, data: dict[str, Any], key: str, path: str = "", *,
                     required: bool = False) -> ipaddress.IPv4Address | None:
        text = self.string(data, key, path, required=required)
        if text is None:
            return None
        try:
            return ipaddress.IPv4Address(text)
        except ValueError:
            self.add(_join(path, key), f"{text!r} is not an IPv4 address")
            return None

    def ipv4_network(self, data: dict[str, Any], key: str, path: str = "", *,
                     required: bool = False) -> ipaddress.IPv4Network | None:
        text = self.string(data, key, path, required=required)
        if text is None:
            return None
        return self.parse_network(text, _join(path, key))

    def parse_network(self, text: str, key: str) -> ipaddress.IPv4Network | None:
        if "/" not in text:
            self.add(key, f"{text!r} needs a prefix length (e.g. {text}/24)")
            return None
        try:
            return ipaddress.IPv4Network(text, strict=True)
        except ValueError as exc:
            if "has host bits set" in str(exc):
                fixed = ipaddress.IPv4Network(text, strict=False)
                self.add(key, f"{text!r} has host bits set (did you mean {fixed}?)")
            else:
                self.add(key, f"{text!r} is not an IPv4 network in CIDR form")
            return None


def read_toml(path: Path) -> dict[str, Any]:
    """Parse a TOML file; any failure becomes a ConfigError naming the file."""
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError([Problem(str(path), "", "file not found")]) from None
    except PermissionError:
        raise ConfigError([Problem(str(path), "", "permission denied")]) from None
    except IsADirectoryError:
        raise ConfigError([Problem(str(path), "", "is a directory, expected a TOML file")]) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([Problem(str(path), "", f"invalid TOML: {exc}")]) from None
    except UnicodeDecodeError:
        raise ConfigError([Problem(str(path), "", "not UTF-8 text")]) from None
    except OSError as exc:
        raise ConfigError([Problem(str(path), "", exc.strerror or str(exc))]) from None


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _kind(value: object) -> str:
    names = {str: "a string", int: "an integer", float: "a number", bool: "a boolean",
             list: "an array", dict: "a table"}
    return names.get(type(value), type(value).__name__)
