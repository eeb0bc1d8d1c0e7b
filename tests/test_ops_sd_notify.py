"""sd_notify without systemd: a real AF_UNIX datagram socket stands in for the service manager.

No root needed. The end-to-end sequence with a real daemon (READY after the device is up,
RELOADING/READY on SIGHUP, watchdog stopping while the loop is blocked, STOPPING on SIGTERM)
is in test_ops_netns.py.
"""

from __future__ import annotations

import logging
import os
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from overlayd.ops.sd_notify import Notifier, monotonic_usec, watchdog_interval


@pytest.fixture
def manager(tmp_path: Path) -> Iterator[tuple[str, socket.socket]]:
    """A bound datagram socket where systemd's would be; yields (NOTIFY_SOCKET value, socket)."""
    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(2.0)
    try:
        yield str(path), sock
    finally:
        sock.close()


def fields(datagram: bytes) -> dict[str, str]:
    return dict(line.split("=", 1) for line in datagram.decode().split("\n"))


def test_without_notify_socket_every_call_is_a_no_op() -> None:
    n = Notifier({})
    assert not n.enabled
    assert n.ready("x") is False
    assert n.watchdog() is False
    assert n.stopping() is False


def test_messages_arrive_as_systemd_reads_them(manager: tuple[str, socket.socket]) -> None:
    address, rx = manager
    n = Notifier({"NOTIFY_SOCKET": address})
    assert n.enabled
    assert n.ready("forwarding: 2 peers")
    assert fields(rx.recv(4096)) == {"READY": "1", "STATUS": "forwarding: 2 peers"}
    before = monotonic_usec()
    assert n.reloading("reloading the map")
    got = fields(rx.recv(4096))
    after = monotonic_usec()
    assert got["RELOADING"] == "1" and got["STATUS"] == "reloading the map"
    assert before <= int(got["MONOTONIC_USEC"]) <= after
    assert n.watchdog()
    assert rx.recv(4096) == b"WATCHDOG=1"
    assert n.stopping()
    assert fields(rx.recv(4096)) == {"STOPPING": "1", "STATUS": "stopping"}
    # STATUS= is one line: a multi-line reason must not smuggle in another KEY=.
    assert n.status("map rejected:\nREADY=1 oops")
    assert rx.recv(4096) == b"STATUS=map rejected: READY=1 oops"
    n.close()


def test_abstract_namespace_address() -> None:
    name = f"overlayd-test-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    rx = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    rx.bind("\0" + name)
    rx.settimeout(2.0)
    try:
        n = Notifier({"NOTIFY_SOCKET": "@" + name})
        assert n.ready("up")
        assert rx.recv(4096).startswith(b"READY=1\n")
    finally:
        rx.close()


def test_a_vanished_manager_is_logged_once_and_never_raises(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    n = Notifier({"NOTIFY_SOCKET": str(tmp_path / "gone.sock")})
    with caplog.at_level(logging.WARNING, logger="overlayd"):
        logger = logging.getLogger("overlayd")
        propagate, logger.propagate = logger.propagate, True
        try:
            assert n.watchdog() is False
            assert n.watchdog() is False
        finally:
            logger.propagate = propagate
    assert len([r for r in caplog.records if "sd_notify" in r.getMessage()]) == 1


def test_unsupported_address_disables_notification() -> None:
    assert not Notifier({"NOTIFY_SOCKET": "vsock:2:1234"}).enabled
    assert not Notifier({"NOTIFY_SOCKET": "relative/path"}).enabled


@pytest.mark.parametrize(("env", "expected"), [
    ({}, None),
    ({"WATCHDOG_USEC": "0"}, None),
    ({"WATCHDOG_USEC": "junk"}, None),
    ({"WATCHDOG_USEC": "20000000"}, 20.0),
    ({"WATCHDOG_USEC": "500000", "WATCHDOG_PID": str(os.getpid())}, 0.5),
    ({"WATCHDOG_USEC": "500000", "WATCHDOG_PID": "1"}, None),   # meant for another process
])
def test_watchdog_interval(env: dict[str, str], expected: float | None) -> None:
    assert watchdog_interval(env) == expected


def test_monotonic_usec_is_clock_monotonic() -> None:
    a = monotonic_usec()
    b = int(time.clock_gettime(time.CLOCK_MONOTONIC) * 1_000_000)
    assert abs(b - a) < 1_000_000
