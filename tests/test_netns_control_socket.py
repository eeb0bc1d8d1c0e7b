"""Two daemons in two network namespaces share /run: one control socket path for both is a
startup error (71) that says so, naming the other daemon and the namespace clash."""

from __future__ import annotations

import time

from netns_helpers import NETNS_MARKS

from overlayd.lab import HostSpec, Lab

pytestmark = NETNS_MARKS


def test_a_socket_taken_from_another_namespace_is_named_as_such() -> None:
    with Lab(2, start=False) as lab:
        assert lab.workdir is not None
        shared = {"control": {"socket": str(lab.workdir / "shared.sock")}}
        lab.specs = [HostSpec(config_extra=shared), HostSpec(config_extra=shared)]
        for host, spec in zip(lab.hosts, lab.specs, strict=True):
            host.spec = spec
        lab.write_configs()
        first = lab.start_daemon("host1")
        second = lab.start_daemon("host2", wait=False).daemon
        assert second is not None
        deadline = time.monotonic() + 15
        while second.alive() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert second.wrapper.poll() == 71
        log = lab.host("host2").log_path.read_text()
        assert first.daemon is not None and f"(pid {first.daemon.pid})" in log, log
        assert "in another network namespace; namespaces share /run" in log, log
        assert first.daemon.alive()
