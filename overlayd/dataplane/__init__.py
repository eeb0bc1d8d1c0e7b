"""The data plane: sans-IO packet kernels, compiled (Cython, cext/) or pure Python (this package).

Which implementation runs is chosen once, at import, by ``OVERLAYD_DATAPLANE``:

- ``auto`` (default): the compiled extension when it imports, else the pure-Python twins;
- ``cython``: the compiled extension, and an ImportError if it is missing (CI and packaging use
  this so a broken build can never fall back silently);
- ``python``: the pure-Python twins (tests run the whole suite once more this way).

Both implementations expose the same names with the same signatures: RouteTable, UdpForwarder,
VxlanRoutedForwarder, VxlanSwitchForwarder, WireguardForwarder.
"""

from __future__ import annotations

import os
from types import ModuleType
from typing import Any

from overlayd.dataplane.tables import (
    LOCAL,
    NO_ROUTE,
    ForwardingTables,
    PeerEntry,
    SwitchTables,
)

KERNELS = ("RouteTable", "UdpForwarder", "VxlanRoutedForwarder", "VxlanSwitchForwarder",
           "WireguardForwarder")

__all__ = [
    "IMPLEMENTATION", "KERNELS", "LOCAL", "NO_ROUTE", "ForwardingTables", "PeerEntry",
    "RouteTable", "SwitchTables", "UdpForwarder", "VxlanRoutedForwarder",
    "VxlanSwitchForwarder", "WireguardForwarder", "load_implementation",
]


def load_implementation(choice: str | None = None) -> tuple[str, ModuleType]:
    """Return (name, module) of the kernels to use; ``choice`` defaults to $OVERLAYD_DATAPLANE."""
    choice = (choice or os.environ.get("OVERLAYD_DATAPLANE") or "auto").strip().lower()
    if choice not in ("auto", "cython", "python"):
        raise ValueError(f"OVERLAYD_DATAPLANE={choice!r}: expected auto, cython or python")
    if choice in ("auto", "cython"):
        try:
            from overlayd import _dataplane  # type: ignore[attr-defined]
        except ImportError:
            if choice == "cython":
                raise
        else:
            return "cython", _dataplane
    from overlayd.dataplane import python_kernels

    return "python", python_kernels


_chosen: tuple[str, ModuleType] | None = None


def __getattr__(name: str) -> Any:
    """Load the kernels on first use, so importing tables or counters never needs them."""
    global _chosen
    if name != "IMPLEMENTATION" and name not in KERNELS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    if _chosen is None:
        _chosen = load_implementation()
    implementation, kernels = _chosen
    return implementation if name == "IMPLEMENTATION" else getattr(kernels, name)
