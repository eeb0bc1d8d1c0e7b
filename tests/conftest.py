"""Shared fixtures. Keep this file small: fixtures only, helpers live next to their tests."""

from __future__ import annotations

import importlib
import os
from types import ModuleType

import pytest


def _cython_kernels() -> ModuleType:
    """The compiled extension; a missing one skips, unless OVERLAYD_DATAPLANE=cython demands it."""
    try:
        return importlib.import_module("overlayd._dataplane")
    except ImportError as exc:
        if os.environ.get("OVERLAYD_DATAPLANE", "").strip().lower() == "cython":
            pytest.fail(f"OVERLAYD_DATAPLANE=cython but the extension does not import: {exc}")
        pytest.skip(f"Cython extension not built: {exc}")


@pytest.fixture(params=["cython", "python"])
def kernels(request: pytest.FixtureRequest) -> ModuleType:
    """Each data-plane kernel module in turn: the compiled extension and the pure-Python twins."""
    if request.param == "python":
        return importlib.import_module("overlayd.dataplane.python_kernels")
    return _cython_kernels()


@pytest.fixture
def kernel_pair() -> tuple[ModuleType, ModuleType]:
    """(Cython, Python) kernel modules together, for parity tests."""
    return _cython_kernels(), importlib.import_module("overlayd.dataplane.python_kernels")
