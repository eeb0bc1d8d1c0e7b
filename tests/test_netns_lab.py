"""The lab itself: what it builds, the files it writes, and that it removes everything it made,
however the body ends (exception, Ctrl-C, a daemon that fails or ignores SIGTERM)."""

from __future__ import annotations

import time
import tomllib
from pathlib import Path
from typing import Any

import pytest
from netns_helpers import netns_required, own_namespaces

from overlayd.control.config import load_config
from overlayd.lab import HostSpec, Lab, LabError, configs, list_netns, netns
from overlayd.lab.netns import _alive

# -- no root needed -----------------------------------------------------------------------------

def test_toml_writer_round_trips() -> None:
    doc = {
        "network": {"cidr": "10.77.0.0/16", "subnet_len": 24},
        "backend": {"type": "udp", "port": 8285, "flag": True, "ratio": 0.5},
        "nodes": [{"name": "a", "routes": ["172.20.0.0/16"], "odd key": 'q"uote\\'},
                  {"name": "b", "underlay_mtu": 1400, "meta": {"x": 1}}],
    }
    assert tomllib.loads(configs.dumps(doc)) == doc


def test_merge_is_deep_and_none_removes() -> None:
    base: dict[str, Any] = {"metrics": {"enabled": False, "listen": "x"},
                            "log": {"level": "info"}}
    merged = configs.merge(base, {"metrics": {"enabled": True}, "log": None, "new": {"k": 1}})
    assert merged == {"metrics": {"enabled": True, "listen": "x"}, "new": {"k": 1}}
    assert base["metrics"]["enabled"] is False       # the input is not modified


# -- root: real namespaces ----------------------------------------------------------------------

def _root_links() -> set[str]:
    return {link["ifname"] for link in netns.ip_json("link", "show")}


@netns_required
class TestLabInNamespaces:
    def test_builds_underlay_and_valid_configs(self) -> None:
        links_before = _root_links()
        specs = [HostSpec(), HostSpec(config_extra={"log": {"level": "debug"}}),
                 HostSpec(underlay_mtu=1400, node_extra={"routes": ["172.20.0.0/16"]})]
        with Lab(specs, start=False) as lab:
            names = {h.netns for h in lab} | {lab.hub}
            assert names <= set(list_netns())
            # Nothing of ours in the root namespace, not even the veth ends.
            assert not (_root_links() - links_before) & {"ul0", "p1", "p2", "p3", "br0"}
            stranger = lab.add_bystander()
            for a in [*lab, stranger]:
                for b in lab:
                    if a is not b:
                        assert lab.ping(a, dst=b.underlay_ip).ok, (a.name, b.name)
            mtus = [netns.link_info(h.netns, "ul0")["mtu"] for h in lab]  # type: ignore[index]
            assert mtus == [1500, 1500, 1400]
            transfer = lab.tcp_transfer(1, 3, 2_000_000, underlay=True)
            assert transfer.bytes_ok and transfer.sha256_ok
            # The daemon's own validator accepts what the lab wrote, with the per-host extras.
            for host in lab:
                config, smap = load_config(host.config_path)
                assert config.node_name == host.name
                assert config.metrics_enabled is False
                assert config.control_socket == host.control_socket
            assert load_config(lab.hosts[1].config_path)[0].log_level == "debug"
            node3 = smap.node_named("host3")
            assert node3 is not None and node3.underlay_mtu == 1400
            assert [str(r) for r in node3.routes] == ["172.20.0.0/16"]
            assert smap.node_named("stranger") is None
            workdir = lab.workdir
        assert lab.leftovers() == [] and names.isdisjoint(list_netns())
        assert workdir is not None and not workdir.exists()

    @pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
    def test_cleans_up_when_the_body_raises(self, error: type[BaseException]) -> None:
        with pytest.raises(error), Lab(2, start=False) as lab:
            lab.add_bystander()
            assert len(lab.leftovers()) == 4
            raise error("boom")
        assert lab.leftovers() == []
        assert lab.workdir is not None and not lab.workdir.exists()

    def test_daemon_that_fails_to_start_is_reported_and_cleaned_up(self) -> None:
        before = own_namespaces()
        lab = Lab(2, overlayd_cmd=["sh", "-c", "echo 'cannot start: no reason' >&2; exit 3",
                                   "fake-overlayd"], ready_timeout_s=5.0)
        with pytest.raises(LabError, match=r"exited \(status 3\)[\s\S]*cannot start"), lab:
            pass
        assert lab.leftovers() == [] and own_namespaces() == before

    def test_daemon_ignoring_sigterm_is_killed_and_its_children_reaped(self, tmp_path: Path
                                                                       ) -> None:
        stubborn = ["sh", "-c", "trap '' TERM; sleep 30 & wait; sleep 30", "stubborn"]
        with Lab(2, start=False, overlayd_cmd=stubborn, keep_logs=tmp_path / "logs") as lab:
            host = lab.start_daemon(1, wait=False)
            assert host.daemon is not None and host.daemon.pid is not None
            deadline = time.monotonic() + 5.0
            while len(inside := netns.netns_pids(host.netns)) < 2:   # sh, then its sleep
                assert time.monotonic() < deadline, inside
                time.sleep(0.02)
            assert host.daemon.pid in inside
            assert lab.stop_daemon(1, grace_s=0.5) == -9
            # The orphaned `sleep` is still in the namespace; closing the lab must end it.
            orphans = netns.netns_pids(host.netns)
        assert all(not _alive(pid) for pid in [*inside, *orphans])
        assert lab.leftovers() == []
        assert (tmp_path / "logs" / "map.toml").exists()
        assert (tmp_path / "logs" / "host1" / "overlayd.toml").exists()
