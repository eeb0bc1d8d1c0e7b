"""Shared fixtures. Keep this file small: fixtures only, helpers live next to their tests."""

from __future__ import annotations

import importlib
import os
from types import ModuleType

import pytest


@pytest.fixture(params=["cython", "python"])
def kernels(request: pytest.FixtureRequest) -> ModuleType:
    """Each data-plane kernel module in turn: the compiled extension and the pure-Python twins.

    A missing extension skips the Cython case, unless OVERLAYD_DATAPLANE=cython demands it.
    """
    if request.param == "python":
        return importlib.import_module("overlayd.dataplane.python_kernels")
    try:
        return importlib.import_module("overlayd._dataplane")
    except ImportError as exc:
        if os.environ.get("OVERLAYD_DATAPLANE", "").strip().lower() == "cython":
            pytest.fail(f"OVERLAYD_DATAPLANE=cython but the extension does not import: {exc}")
        pytest.skip(f"Cython extension not built: {exc}")
