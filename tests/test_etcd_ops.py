"""What operators see of the etcd source: `overlayd status` lines, /readyz reasons and the
overlayd_datastore/lease/watch metrics, read from a real EtcdMapSource on an in-memory store."""

from __future__ import annotations

import asyncio
import ipaddress
import re
import time
from dataclasses import dataclass, field
from typing import Any

from memory_store import MemoryStore
from prometheus_client import generate_latest
from test_etcd_control import CONFIG, PREFIX, Running, settings, until

from overlayd.control.config import parse_config
from overlayd.control.etcd_source import EtcdMapSource
from overlayd.control.local_node import build_local_view, find_local_node
from overlayd.ops import health, state, tables
from overlayd.ops.metrics import build_registry, read_sample


class QuietForwarder:
    def counters(self) -> dict[str, int]:
        return {}

    def peer_counters(self) -> list[tuple[int, int, int, int]]:
        return []

    def peer_rx_accepted(self) -> list[int]:
        return []

    def batch_histogram(self) -> tuple[list[int], list[int]]:
        return [], []

    def offloads(self) -> dict[str, bool]:
        return {}


@dataclass
class EtcdDaemon:
    config: Any
    smap: Any
    view: Any
    source: Any
    forwarder: Any = field(default_factory=QuietForwarder)
    implementation: str = "python"
    started_at: float = field(default_factory=time.monotonic)
    map_applied_at: float = field(default_factory=time.time)
    map_error: str | None = None
    last_loop_tick: float = field(default_factory=time.monotonic)
    device_broken: bool = False
    device_recreations: int = 0
    device_problem: str | None = None


def test_status_readyz_and_metrics_show_the_datastore(tmp_path: Any) -> None:
    async def main() -> None:
        store = MemoryStore()
        await store.put(f"{PREFIX}/config", CONFIG)
        await store.put(f"{PREFIX}/subnets/10.50.9.0-24", b"garbage")
        source = EtcdMapSource(store, settings(), ipaddress.IPv4Address("192.0.2.1"))
        r = Running(source)
        await until(lambda: bool(r.whys))
        config, problems = parse_config({"map": {"source": "etcd",
                                                 "endpoints": ["http://memory:2379"],
                                                 "public_ip": "192.0.2.1"}},
                                        tmp_path / "overlayd.toml")
        assert config is not None, problems
        smap = source.load()
        me = find_local_node(smap, source.location, source.node_name, ())
        d = EtcdDaemon(config, smap, build_local_view(smap, me, 1500), source)
        info = state.RuntimeInfo(phase=state.RUNNING)

        s = state.status(d, info)
        assert s["map"]["source"] == "etcd" and s["map"]["datastore"]["reachable"]
        assert s["health"]["ready"]
        text = tables.render_status(s)
        assert "etcd      reachable at memory://0" in text
        held = source.keeper.held if source.keeper else None
        assert held is not None
        assert re.search(rf"lease +{held.key} held, (1d0h|23h59m) left, 0 renewals", text), text
        assert "1 bad keys skipped" in text

        metrics = generate_latest(build_registry(lambda: read_sample(d, info))).decode()
        for line in ("overlayd_datastore_reachable 1.0", "overlayd_lease_held 1.0",
                     "overlayd_watch_resumes_total 0.0", ('overlayd_map_skipped_keys_total'
                     '{reason="lease_not_json"} 1.0'), "overlayd_map_resyncs_total 0.0",
                     "overlayd_datastore_reconnects_total 0.0"):
            assert line in metrics, line
        assert re.search(r"^overlayd_lease_remaining_seconds 86(39\d|400)", metrics, re.MULTILINE)

        # etcd goes away: still healthy (forwarding), the figures say so
        store.set_down(True)
        await until(lambda: not source.report()["reachable"])
        await asyncio.sleep(0.05)
        metrics = generate_latest(build_registry(lambda: read_sample(d, info))).decode()
        assert "overlayd_datastore_reachable 0.0" in metrics
        assert "overlayd_datastore_last_contact_age_seconds 0.0" in metrics
        assert health.check(d, info, time.monotonic()).healthy
        store.down = False
        # a broken network config: not ready, with the reason
        await store.put(f"{PREFIX}/config", b"{nope")
        await until(lambda: bool(source.report()["problems"]))
        verdict = health.check(d, info, time.monotonic())
        assert verdict.healthy and not verdict.ready
        assert any("etcd network config" in p and "not JSON" in p for p in verdict.problems)
        await r.stop()

    asyncio.run(asyncio.wait_for(main(), 10))


def test_file_source_status_and_metrics_have_no_datastore(tmp_path: Any) -> None:
    (tmp_path / "map.toml").write_text('[network]\ncidr = "10.5.0.0/16"\nsubnet_len = 24\n'
                                       '[[nodes]]\nname = "a"\nsubnet = "10.5.1.0/24"\n'
                                       'public_ip = "192.0.2.1"\n')
    from overlayd.control.config import load_config
    from overlayd.control.file_source import FileMapSource

    (tmp_path / "overlayd.toml").write_text('[map]\nfile = "map.toml"\n')
    config, smap = load_config(tmp_path / "overlayd.toml")
    assert smap is not None
    source = FileMapSource(config.map_file)
    d = EtcdDaemon(config, smap, build_local_view(smap, smap.nodes[0], 1500), source)
    info = state.RuntimeInfo(phase=state.RUNNING)
    s = state.status(d, info)
    assert s["map"]["source"] == "file" and s["map"]["datastore"] is None
    assert "etcd" not in tables.render_status(s)
    metrics = generate_latest(build_registry(lambda: read_sample(d, info))).decode()
    assert not re.search(r"^overlayd_(datastore|lease|watch)_\w+ ", metrics, re.MULTILINE)
