"""Metrics, health, HTTP, control socket, CLI and capture, in one process, without root.

The daemon is a stand-in built the way the real one is (config and map validated by the real
parsers, the local view and tables by the real control plane) around a fake forwarder whose
counters the test sets. The servers are the real ones, on a real event loop in a thread, on a
temporary unix socket and an ephemeral loopback port; the CLI is the real `overlayd` entry
point. test_ops_netns.py repeats the essentials against a real daemon with real traffic.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import socket
import stat
import subprocess
import sys
import threading
import time
import tomllib
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dpkt
import pytest
from prometheus_client.parser import text_string_to_metric_families

from overlayd.cli import main as cli_main
from overlayd.control.config import parse_config
from overlayd.control.local_node import LocalView, build_local_view
from overlayd.control.subnet_map import SubnetMap, parse_subnet_map
from overlayd.dataplane.counters import (
    ALL_DROP_REASONS,
    BATCH_BUCKETS,
    COUNTER_NAMES,
    DROP_REASONS,
)
from overlayd.errors import EX_NOPERM, EX_OSERR, EX_UNAVAILABLE, StartupError
from overlayd.ops import capture, control_socket, health, state, tables
from overlayd.ops.http_server import LoopBridge, OpsHttpServer
from overlayd.ops.metrics import build_registry, read_sample

MAP = """
[network]
cidr = "10.44.0.0/16"
subnet_len = 24
[[nodes]]
name = "a"
subnet = "10.44.1.0/24"
public_ip = "192.0.2.1"
[[nodes]]
name = "b"
subnet = "10.44.2.0/24"
public_ip = "192.0.2.2"
[[nodes]]
name = "c"
subnet = "10.44.3.0/24"
public_ip = "192.0.2.3"
underlay_mtu = 1400
routes = ["172.20.0.0/16"]
"""


class FakeForwarder:
    """The forwarder's read interface, with counters the test sets; capture optional."""

    def __init__(self, peers: int, with_capture: bool) -> None:
        self.values = dict.fromkeys(COUNTER_NAMES, 0)
        self.peers = [(0, 0, 0, 0)] * peers
        self.rx_dropped: dict[int, int] = {}     # peer index -> received but failed a check
        self.hist = ([0] * BATCH_BUCKETS, [0] * BATCH_BUCKETS)
        self.capturing = False
        self.captured: list[tuple[int, int, bytes, float]] = []
        self.capture_calls: list[bool] = []
        if with_capture:
            self.set_capture = self._set_capture
            self.drain_capture = self._drain_capture

    def counters(self) -> dict[str, int]:
        return dict(self.values)

    def peer_counters(self) -> list[tuple[int, int, int, int]]:
        return list(self.peers)

    def peer_rx_accepted(self) -> list[int]:
        return [p[2] - self.rx_dropped.get(i, 0) for i, p in enumerate(self.peers)]

    def offloads(self) -> dict[str, bool]:
        return {"vnet_hdr": True, "udp_gso": False, "udp_gro": True}

    def batch_histogram(self) -> tuple[list[int], list[int]]:
        return list(self.hist[0]), list(self.hist[1])

    def _set_capture(self, enabled: bool) -> None:
        self.capturing = enabled
        self.capture_calls.append(enabled)

    def _drain_capture(self) -> list[tuple[int, int, bytes, float]]:
        out, self.captured = self.captured, []
        return out

    def packet_passes(self, direction: int, peer: int, packet: bytes) -> None:
        """What the data plane does per packet: copy only while capture is on."""
        if self.capturing:
            self.captured.append((direction, peer, packet, time.time()))


@dataclass
class FakeDaemon:
    config: Any
    smap: SubnetMap
    view: LocalView
    forwarder: Any
    implementation: str = "python"
    started_at: float = field(default_factory=time.monotonic)
    map_applied_at: float = field(default_factory=time.time)
    map_error: str | None = None
    last_loop_tick: float = field(default_factory=time.monotonic)
    device_broken: bool = False
    device_recreations: int = 0
    device_problem: str | None = None


def make_daemon(tmp_path: Path, with_capture: bool = True, map_text: str = MAP,
                **config_extra: Any) -> FakeDaemon:
    (tmp_path / "map.toml").write_text(map_text)
    smap = parse_subnet_map(tomllib.loads(map_text), "map.toml")
    data = {"map": {"file": "map.toml"}, "node": {"name": "a"},
            "control": {"socket": str(tmp_path / "run" / "ctl.sock")}, **config_extra}
    config, problems = parse_config(data, tmp_path / "overlayd.toml")
    assert config is not None, problems
    me = smap.node_named("a")
    assert me is not None
    view = build_local_view(smap, me, 1500)
    return FakeDaemon(config, smap, view, FakeForwarder(len(view.peers), with_capture))


class LoopThread:
    """An asyncio loop in a thread, standing in for the daemon's (the servers run on it)."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Any, timeout: float = 10.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def call(self, fn: Callable[[], Any], timeout: float = 10.0) -> Any:
        return LoopBridge(self.loop, timeout).call(fn)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


@pytest.fixture
def loop() -> Iterator[LoopThread]:
    lt = LoopThread()
    try:
        yield lt
    finally:
        lt.close()


# -- state and metrics -----------------------------------------------------------------------


def scrape(d: FakeDaemon, info: state.RuntimeInfo) -> dict[str, Any]:
    from prometheus_client import generate_latest

    registry = build_registry(lambda: read_sample(d, info))
    text = generate_latest(registry).decode()
    samples: dict[str, Any] = {"_text": text}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            key = s.name + ("{" + ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
                            + "}" if s.labels else "")
            samples[key] = s.value
    return samples


def test_metrics_export_every_counter_peer_and_table(tmp_path: Path) -> None:
    d = make_daemon(tmp_path)
    fw = d.forwarder
    for i, name in enumerate(COUNTER_NAMES):
        fw.values[name] = 1000 + i
    fw.peers = [(11, 1100, 12, 1200), (21, 2100, 22, 2200)]
    # 3 batches of 1, 2 of 3..4, 1 of 64 (bucket 6) inside; outside empty.
    fw.hist = ([3, 0, 2, 0, 0, 0, 1, 0, 0, 0], [0] * BATCH_BUCKETS)
    fw.rx_dropped = {1: 5}
    d.device_recreations = 2
    m = scrape(d, state.RuntimeInfo(phase=state.RUNNING, peer_last_rx={"c": 1234.0}))

    assert m["overlayd_build_info{dataplane=python,version=0.1.0}"] == 1
    assert m["overlayd_peer_tx_packets_total{peer=b}"] == 11
    assert m["overlayd_peer_tx_bytes_total{peer=b}"] == 1100
    assert m["overlayd_peer_rx_packets_total{peer=c}"] == 22
    assert m["overlayd_peer_rx_bytes_total{peer=c}"] == 2200
    assert m["overlayd_peer_info{peer=c,public_ip=192.0.2.3,subnet=10.44.3.0/24,vtep_mac=}"] == 1
    assert m["overlayd_peer_rx_dropped_packets_total{peer=c}"] == 5
    assert m["overlayd_peer_rx_dropped_packets_total{peer=b}"] == 0
    assert m["overlayd_peer_last_rx_timestamp_seconds{peer=c}"] == 1234.0
    assert "overlayd_peer_last_rx_timestamp_seconds{peer=b}" not in m     # never heard from
    assert m["overlayd_device_recreations_total"] == 2
    assert m["overlayd_peer_path_mtu_bytes{peer=c}"] == 1400 - 28
    for i, reason in enumerate(DROP_REASONS):
        assert m[f"overlayd_drops_total{{reason={reason}}}"] == fw.values[reason], reason
    assert m["overlayd_inside_packets_total"] == fw.values["inside_packets"]
    assert m["overlayd_icmp_errors_sent_total"] == fw.values["icmp_sent"]
    assert m["overlayd_peers"] == 2
    assert m["overlayd_routes"] == 4          # own /24, b's /24, c's /24 and c's 172.20/16
    assert m["overlayd_fdb_entries"] == 0
    assert m["overlayd_batch_size_packets_bucket{direction=inside,le=1.0}"] == 3
    assert m["overlayd_batch_size_packets_bucket{direction=inside,le=4.0}"] == 5
    assert m["overlayd_batch_size_packets_bucket{direction=inside,le=+Inf}"] == 6
    assert m["overlayd_batch_size_packets_sum{direction=inside}"] == fw.values["inside_packets"]
    assert m["overlayd_map_nodes"] == 3
    assert m["overlayd_map_current"] == 1
    assert m["overlayd_ready"] == 1 and m["overlayd_healthy"] == 1
    assert abs(m["overlayd_map_last_change_timestamp_seconds"] - d.map_applied_at) < 1e-3
    assert m[f"overlayd_map_info{{location={d.config.map_file},source=file}}"] == 1
    assert "process_resident_memory_bytes" in m
    assert "_created" not in m["_text"]
    # A counter the data plane adds later is never invisible.
    fw.values["gso_segments"] = 7
    assert scrape(d, state.RuntimeInfo())["overlayd_gso_segments_total"] == 7


def test_metric_names_follow_prometheus_conventions(tmp_path: Path) -> None:
    text = scrape(make_daemon(tmp_path), state.RuntimeInfo())["_text"]
    for family in text_string_to_metric_families(text):
        if not family.name.startswith("overlayd_"):
            continue
        assert family.name == family.name.lower()
        if family.type == "counter":
            assert all(s.name.endswith("_total") for s in family.samples), family.name
        if family.type == "gauge":
            assert not family.name.endswith("_total"), family.name


def test_fdb_metric_and_command_follow_a_forwarder_that_has_one(tmp_path: Path) -> None:
    d = make_daemon(tmp_path)
    assert state.fdb(d)["supported"] is False
    now = time.monotonic()
    d.forwarder.fdb_entries = lambda: [(bytes.fromhex("020000000001"), 0, False, now - 12.5),
                                       (bytes.fromhex("020000000002"), -1, True, 0.0)]
    assert scrape(d, state.RuntimeInfo())["overlayd_fdb_entries"] == 2
    got = state.fdb(d, now)
    assert got["supported"] is True
    assert got["entries"][0] == {"mac": "02:00:00:00:00:01", "target": 0, "peer": "b",
                                 "kind": "peer", "static": False, "age_seconds": 12.5}
    assert got["entries"][1] == {"mac": "02:00:00:00:00:02", "target": -1, "peer": None,
                                 "kind": "local", "static": True}
    text = tables.render_fdb(got).splitlines()
    assert text[0].split() == ["MAC", "TARGET", "TYPE", "AGE"]
    assert text[1].split() == ["02:00:00:00:00:01", "b", "learned", "12", "s"]
    assert text[2].split() == ["02:00:00:00:00:02", "local", "static", "-"]


# -- health ------------------------------------------------------------------------------------


def test_health_verdicts(tmp_path: Path) -> None:
    d = make_daemon(tmp_path)
    info = state.RuntimeInfo(phase=state.RUNNING)
    now = time.monotonic()
    v = health.check(d, info, now)
    assert v.healthy and v.ready and v.problems == ()

    starting = health.check(d, state.RuntimeInfo(phase=state.STARTING), now)
    assert starting.healthy and not starting.ready and starting.ready_problems == ("starting",)

    d.map_error = "map.toml: nodes[1].subnet: 10.45.0.0/24 is outside the network\nmore"
    v = health.check(d, info, now)
    assert v.healthy and not v.ready
    assert "subnet map not current" in v.ready_problems[0]
    assert "is outside the network" in v.ready_problems[0]
    d.map_error = None

    d.device_broken = True
    v = health.check(d, info, now)
    assert not v.healthy and not v.ready and "recreating" in v.live_problems[0]
    d.device_broken = False

    v = health.check(d, info, now + health.LOOP_STALL_SECONDS + 1)
    assert not v.healthy and "event loop stalled" in v.live_problems[0]

    v = health.check(d, state.RuntimeInfo(phase=state.STOPPING), now)
    assert not v.healthy and v.live_problems == ("stopping",)


# -- HTTP ---------------------------------------------------------------------------------------


def http_get(url: str, timeout: float = 10.0) -> tuple[int, str, float]:
    start = time.monotonic()
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read().decode(), time.monotonic() - start
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(), time.monotonic() - start


def tick_like_the_daemon(d: FakeDaemon, loop: LoopThread) -> None:
    """The daemon's periodic timers stamp last_loop_tick every 0.1 s; so does this."""
    def tick() -> None:
        d.last_loop_tick = time.monotonic()
        loop.loop.call_later(0.1, tick)

    loop.loop.call_soon_threadsafe(tick)


@pytest.fixture
def http(tmp_path: Path, loop: LoopThread) -> Iterator[tuple[FakeDaemon, state.RuntimeInfo,
                                                             OpsHttpServer]]:
    d = make_daemon(tmp_path)
    tick_like_the_daemon(d, loop)
    info = state.RuntimeInfo(phase=state.RUNNING)
    bridge = LoopBridge(loop.loop, timeout=1.0)
    registry = build_registry(lambda: bridge.call(lambda: read_sample(d, info)))
    server = OpsHttpServer("127.0.0.1", 0, registry,
                           lambda: bridge.call(lambda: health.check(d, info, time.monotonic())))
    server.start()
    try:
        yield d, info, server
    finally:
        server.close()


def test_http_metrics_health_and_readiness(http: tuple[FakeDaemon, state.RuntimeInfo,
                                                       OpsHttpServer]) -> None:
    d, info, server = http
    d.forwarder.peers = [(5, 500, 6, 600), (0, 0, 0, 0)]
    code, body, _ = http_get(server.url + "/metrics")
    assert code == 200 and 'overlayd_peer_tx_packets_total{peer="b"} 5.0' in body
    assert http_get(server.url + "/healthz")[:2] == (200, "ok\n")
    assert http_get(server.url + "/readyz")[:2] == (200, "ok\n")
    assert http_get(server.url + "/nope")[0] == 404

    d.map_error = "map.toml: nodes[0].public_ip: missing"
    code, body, _ = http_get(server.url + "/readyz")
    assert code == 503 and body.startswith("not ready: subnet map not current")
    assert "nodes[0].public_ip: missing" in body
    assert http_get(server.url + "/healthz")[0] == 200       # still forwarding: alive

    info.phase = state.STOPPING
    code, body, _ = http_get(server.url + "/healthz")
    assert code == 503 and body == "unhealthy: stopping\n"


def test_http_reports_a_blocked_loop_instead_of_hanging(
        http: tuple[FakeDaemon, state.RuntimeInfo, OpsHttpServer], loop: LoopThread) -> None:
    _, _, server = http
    loop.loop.call_soon_threadsafe(time.sleep, 3.0)     # the loop is stuck for 3 s
    time.sleep(0.1)
    code, body, took = http_get(server.url + "/healthz")
    assert code == 503 and "event loop did not respond" in body
    assert took < 2.5
    code, body, _ = http_get(server.url + "/metrics")
    assert code == 503
    time.sleep(3.0)
    assert http_get(server.url + "/healthz")[0] == 200     # and recovers with the loop


def test_http_port_in_use_is_a_startup_error() -> None:
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    try:
        port = taken.getsockname()[1]
        with pytest.raises(StartupError) as err:
            OpsHttpServer("127.0.0.1", port, build_registry(dict), lambda: None)  # type: ignore
        assert err.value.exit_code == EX_OSERR
        assert f"127.0.0.1:{port}" in str(err.value) and "in use" in str(err.value)
    finally:
        taken.close()


# -- control socket and CLI -------------------------------------------------------------------


@dataclass
class Control:
    daemon: FakeDaemon
    server: control_socket.ControlServer
    hub: capture.CaptureHub
    path: Path
    loop: LoopThread


def start_control(d: FakeDaemon, loop: LoopThread) -> Control:
    path = d.config.control_socket
    sock = control_socket.bind(path)
    info = state.RuntimeInfo(phase=state.RUNNING, control_socket=str(path))
    hub = capture.CaptureHub(d, loop.loop)
    handlers: dict[str, control_socket.Handler] = {
        "status": lambda _r: state.status(d, info),
        "peers": lambda _r: state.peers(d),
        "routes": lambda _r: state.routes(d),
        "fdb": lambda _r: state.fdb(d),
    }

    async def make() -> control_socket.ControlServer:
        server = control_socket.ControlServer(sock, path, handlers, hub)
        await server.start()
        return server

    return Control(d, loop.run(make()), hub, path, loop)


@pytest.fixture
def control(tmp_path: Path, loop: LoopThread) -> Iterator[Control]:
    ctl = start_control(make_daemon(tmp_path), loop)
    try:
        yield ctl
    finally:
        loop.run(ctl.server.close())


def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = cli_main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_control_socket_is_root_only_and_removed_on_close(tmp_path: Path,
                                                          loop: LoopThread) -> None:
    ctl = start_control(make_daemon(tmp_path), loop)
    mode = os.stat(ctl.path).st_mode
    assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o600
    assert ctl.path.parent.is_dir()
    loop.run(ctl.server.close())
    assert not ctl.path.exists()


def test_control_socket_refuses_a_live_one_and_replaces_a_stale_one(tmp_path: Path,
                                                                     loop: LoopThread) -> None:
    ctl = start_control(make_daemon(tmp_path), loop)
    try:
        busy = r"another overlayd \(pid \d+\) is listening there \(set"
        with pytest.raises(StartupError, match=busy):
            control_socket.bind(ctl.path)
    finally:
        loop.run(ctl.server.close())
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(ctl.path))
    stale.close()                     # a file nobody listens on: what a crash leaves
    sock = control_socket.bind(ctl.path)
    sock.close()
    ctl.path.unlink()
    ctl.path.write_text("not a socket")
    with pytest.raises(StartupError, match="not a socket"):
        control_socket.bind(ctl.path)


def test_status_peers_routes_fdb_as_text(control: Control,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    control.daemon.forwarder.peers = [(7, 700, 8, 800), (0, 0, 0, 0)]
    control.daemon.forwarder.values["inside_no_route"] = 3
    sock = str(control.path)
    code, out, _ = cli(capsys, "status", "--socket", sock)
    assert code == 0
    assert "healthy, ready" in out and "a: subnet 10.44.1.0/24" in out
    assert "drops     3 (inside_no_route 3)" in out
    code, out, _ = cli(capsys, "peers", "--socket", sock)
    lines = out.splitlines()
    assert code == 0 and lines[0].split()[:3] == ["PEER", "ENDPOINT", "PREFIXES"]
    assert lines[1].split()[:5] == ["b", "192.0.2.2:8285", "10.44.2.0/24", "1472", "7"]
    assert "10.44.3.0/24,172.20.0.0/16" in lines[2]
    code, out, _ = cli(capsys, "routes", "--socket", sock)
    assert code == 0
    assert [ln.split()[:2] for ln in out.splitlines()] == [
        ["PREFIX", "TARGET"], ["10.44.1.0/24", "local"], ["10.44.2.0/24", "b"],
        ["10.44.3.0/24", "c"], ["172.20.0.0/16", "c"]]
    code, out, _ = cli(capsys, "fdb", "--socket", sock)
    assert code == 0 and out.startswith("no FDB: the running backend, udp, routes by prefix")


def test_status_peers_routes_fdb_as_json(control: Control,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    sock = str(control.path)
    status = json.loads(cli(capsys, "status", "--socket", sock, "--json")[1])
    assert status["node"]["name"] == "a" and status["health"]["ready"] is True
    assert set(status["drops"]) == set(ALL_DROP_REASONS)
    peers = json.loads(cli(capsys, "peers", "--socket", sock, "--json")[1])
    assert [p["name"] for p in peers] == ["b", "c"]
    routes = json.loads(cli(capsys, "routes", "--socket", sock, "--json")[1])
    assert routes[-1] == {"prefix": "172.20.0.0/16", "target": 1, "peer": "c",
                          "via": "192.0.2.3:8285", "kind": "peer"}
    fdb = json.loads(cli(capsys, "fdb", "--socket", sock, "--json")[1])
    assert fdb["supported"] is False and fdb["entries"] == []


def test_the_socket_is_found_from_the_config(control: Control, tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "other.toml"
    cfg.write_text(f'[map]\nfile = "broken-or-missing.toml"\n'
                   f'[control]\nsocket = "{control.path}"\n')
    code, out, _ = cli(capsys, "peers", "-c", str(cfg), "--json")
    assert code == 0 and json.loads(out)[0]["name"] == "b"


def test_no_daemon_is_one_line_and_exit_69(tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "overlayd.toml"
    cfg.write_text('[map]\nfile = "map.toml"\n[device]\nname = "ovl-none"\n')
    for argv in (["status", "--socket", str(tmp_path / "none.sock")],
                 ["routes", "-c", str(cfg)]):
        code, out, err = cli(capsys, *argv)
        assert code == EX_UNAVAILABLE and out == ""
        assert len(err.strip().splitlines()) == 1 and "overlayd is not running" in err
    assert "/run/overlayd/ovl-none.sock" in err     # the default follows the device name


def test_bad_requests_get_an_answer_not_a_hang(control: Control) -> None:
    def ask(raw: bytes) -> dict[str, Any]:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(5)
        s.connect(str(control.path))
        s.sendall(raw)
        data = s.makefile("rb").readline()
        s.close()
        return json.loads(data)

    assert ask(b"nonsense\n")["error"].startswith("bad request")
    assert "unknown command 'reboot'" in ask(b'{"command": "reboot"}\n')["error"]
    assert ask(b'{"command": "routes"}\n')["ok"] is True


# -- capture -----------------------------------------------------------------------------------


def icmp_echo(src: str, dst: str, seq: int) -> bytes:
    echo = dpkt.icmp.ICMP(type=8, data=dpkt.icmp.ICMP.Echo(id=1, seq=seq, data=b"x" * 8))
    ip = dpkt.ip.IP(src=socket.inet_aton(src), dst=socket.inet_aton(dst), p=1, ttl=64,
                    data=echo)
    ip.len = len(bytes(ip))
    return bytes(ip)


def feed_while_capturing(ctl: Control, packets: list[tuple[int, int, bytes]],
                         rounds: int = 200) -> None:
    """From the loop: once a session is open, pass packets through the fake data plane."""
    def tick(left: int) -> None:
        if ctl.hub.sessions:
            for packet in packets:
                ctl.daemon.forwarder.packet_passes(*packet)
        elif left:
            ctl.loop.loop.call_later(0.02, tick, left - 1)

    ctl.loop.loop.call_soon_threadsafe(tick, rounds)


def read_pcap(path: Path) -> tuple[int, list[tuple[float, bytes]]]:
    with open(path, "rb") as f:
        reader = dpkt.pcap.Reader(f)
        return reader.datalink(), list(reader)


def test_capture_writes_pcap_with_direction_and_peer(control: Control, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    out_file = tmp_path / "cap.pcap"
    packets = [(0, 0, icmp_echo("10.44.1.0", "10.44.2.7", 1)),    # inside, toward b
               (1, 0, icmp_echo("10.44.2.7", "10.44.1.0", 1)),    # outside, from b
               (0, -1, icmp_echo("10.44.1.0", "10.44.9.9", 2)),   # inside, no route
               (1, 1, icmp_echo("10.44.3.1", "10.44.1.0", 3))]    # outside, from c
    feed_while_capturing(control, packets)
    code, _, err = cli(capsys, "capture", "--socket", str(control.path), "-w", str(out_file),
                       "--count", "4", "--seconds", "10")
    assert code == 0, err
    assert "4 packets written" in err
    linktype, records = read_pcap(out_file)
    assert linktype == capture.LINKTYPE_LINUX_SLL
    assert len(records) == 4
    frames = [dpkt.sll.SLL(buf) for _, buf in records]
    assert [f.type for f in frames] == [capture.PACKET_OUTGOING, capture.PACKET_HOST,
                                        capture.PACKET_OUTGOING, capture.PACKET_HOST]
    assert [f.hdr[:f.hlen] for f in frames] == [socket.inet_aton("192.0.2.2")] * 2 + [
        b"", socket.inet_aton("192.0.2.3")]
    assert [bytes(f.data) for f in frames] == [p for _, _, p in packets]
    assert all(abs(ts - time.time()) < 30 for ts, _ in records)
    # The session ended: capture is off again, so the data plane copies nothing.
    deadline = time.monotonic() + 5
    while control.daemon.forwarder.capturing and time.monotonic() < deadline:
        time.sleep(0.02)
    assert control.daemon.forwarder.capture_calls == [True, False]

    if shutil.which("tcpdump"):
        shown = subprocess.run(["tcpdump", "-nn", "-e", "-r", str(out_file)],
                               check=False, capture_output=True, text=True, timeout=20)
        assert shown.returncode == 0, shown.stderr
        lines = shown.stdout.splitlines()
        assert len(lines) == 4
        assert " Out " in lines[0] and "10.44.1.0 > 10.44.2.7: ICMP echo request" in lines[0]
        assert " In " in lines[1] and "10.44.2.7 > 10.44.1.0: ICMP echo request" in lines[1]


def test_capture_filters_by_peer_and_direction(control: Control, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    out_file = tmp_path / "cap.pcap"
    packets = [(0, 0, icmp_echo("10.44.1.0", "10.44.2.7", 1)),
               (1, 0, icmp_echo("10.44.2.7", "10.44.1.0", 2)),
               (1, 1, icmp_echo("10.44.3.1", "10.44.1.0", 3)),
               (1, 0, icmp_echo("10.44.2.7", "10.44.1.0", 4))]
    feed_while_capturing(control, packets)
    code, _, err = cli(capsys, "capture", "--socket", str(control.path), "-w", str(out_file),
                       "--peer", "192.0.2.2", "--direction", "outside", "--seconds", "1")
    assert code == 0, err
    assert "(time limit reached)" in err
    _, records = read_pcap(out_file)
    assert [bytes(dpkt.sll.SLL(buf).data) for _, buf in records] == [packets[1][2],
                                                                       packets[3][2]]


def test_capture_refusals(control: Control, tmp_path: Path,
                          capsys: pytest.CaptureFixture[str], loop: LoopThread) -> None:
    code, _, err = cli(capsys, "capture", "--socket", str(control.path), "-w",
                       str(tmp_path / "x.pcap"), "--peer", "zz", "--count", "1")
    assert code == 1 and "unknown peer 'zz' (peers: b, c)" in err
    assert not (tmp_path / "x.pcap").exists()

    (tmp_path / "plain").mkdir()
    ctl = start_control(make_daemon(tmp_path / "plain", with_capture=False), loop)
    try:
        code, _, err = cli(capsys, "capture", "--socket", str(ctl.path), "-w",
                           str(tmp_path / "y.pcap"), "--count", "1")
    finally:
        loop.run(ctl.server.close())
    assert code == EX_UNAVAILABLE
    assert err.strip() == "overlayd capture: capture is not supported by this data plane"


# -- the Grafana dashboard -------------------------------------------------------------------


def test_grafana_dashboard_queries_only_metrics_that_exist(tmp_path: Path) -> None:
    repo = Path(__file__).resolve().parent.parent
    dash = json.loads((repo / "configs" / "grafana-dashboard.json").read_text())
    d = make_daemon(tmp_path)
    d.forwarder.hist = ([1] * BATCH_BUCKETS, [1] * BATCH_BUCKETS)
    exported = {key.split("{")[0] for key in scrape(d, state.RuntimeInfo())}
    panels = dash["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    exprs = [t["expr"] for p in panels for t in p.get("targets", [])]
    assert len(exprs) >= 20
    for expr in exprs:
        assert expr.count("(") == expr.count(")") and expr.count("{") == expr.count("}"), expr
        names = re.findall(r"\b(?:overlayd|process)_[a-z_]+", expr)
        assert names, expr
        for name in names:
            assert name in exported, f"{name} (in {expr!r}) is not exported"
    used = {n for e in exprs for n in re.findall(r"\boverlayd_[a-z_]+", e)}
    for needed in ("overlayd_peer_tx_packets_total", "overlayd_drops_total",
                   "overlayd_batch_size_packets_bucket", "overlayd_map_current",
                   "overlayd_routes", "overlayd_build_info"):
        assert needed in used, needed


def test_capture_to_stdout_for_a_pipe(control: Control, tmp_path: Path) -> None:
    """`overlayd capture -w - | tcpdump -r -`: the pcap goes to stdout, the messages to stderr."""
    packets = [(1, 0, icmp_echo("10.44.2.7", "10.44.1.0", i)) for i in range(3)]
    feed_while_capturing(control, packets)
    repo = Path(__file__).resolve().parent.parent
    proc = subprocess.run(
        [sys.executable, "-m", "overlayd", "capture", "--socket", str(control.path), "-w", "-",
         "--count", "3", "--seconds", "20"], capture_output=True, timeout=60, check=False,
        cwd=repo, env=dict(os.environ, PYTHONPATH=str(repo)))
    assert proc.returncode == 0, proc.stderr
    assert b"3 packets written to -" in proc.stderr
    pcap_file = tmp_path / "piped.pcap"
    pcap_file.write_bytes(proc.stdout)
    _, records = read_pcap(pcap_file)
    assert [bytes(dpkt.sll.SLL(buf).data) for _, buf in records] == [p for _, _, p in packets]


def test_capture_on_a_switched_backend_writes_ethernet_frames(
        tmp_path: Path, loop: LoopThread, capsys: pytest.CaptureFixture[str]) -> None:
    switched = MAP.replace("subnet_len = 24\n", "subnet_len = 24\n[backend]\ntype = \"vxlan\"\n"
                           "mode = \"switched\"\n", 1).replace('routes = ["172.20.0.0/16"]', "")
    ctl = start_control(make_daemon(tmp_path, map_text=switched), loop)
    frame = bytes(dpkt.ethernet.Ethernet(dst=b"\xff" * 6, src=bytes.fromhex("020000000002"),
                                         type=0x0806, data=b"\0" * 28))
    try:
        feed_while_capturing(ctl, [(1, 0, frame)])
        code, _, err = cli(capsys, "capture", "--socket", str(ctl.path), "-w",
                           str(tmp_path / "l2.pcap"), "--count", "1", "--seconds", "10")
    finally:
        loop.run(ctl.server.close())
    assert code == 0, err
    linktype, records = read_pcap(tmp_path / "l2.pcap")
    assert linktype == capture.LINKTYPE_ETHERNET
    assert [buf for _, buf in records] == [frame]


def test_last_received_follows_each_peers_rx_counter(tmp_path: Path) -> None:
    d = make_daemon(tmp_path)
    fw, info = d.forwarder, state.RuntimeInfo(phase=state.RUNNING)
    state.observe_peer_rx(d, info, 100.0)
    assert info.peer_last_rx == {}                        # nobody heard from yet
    fw.peers = [(0, 0, 3, 300), (0, 0, 0, 0)]
    state.observe_peer_rx(d, info, 101.0)
    fw.peers = [(0, 0, 3, 300), (0, 0, 1, 100)]
    state.observe_peer_rx(d, info, 102.0)
    state.observe_peer_rx(d, info, 103.0)                 # silent second: nothing moves
    assert info.peer_last_rx == {"b": 101.0, "c": 102.0}
    rows = {p["name"]: p for p in state.peers(d, info, wall_now=110.0)}
    assert rows["b"]["last_rx_seconds_ago"] == 9.0 and rows["c"]["last_rx_at"] == 102.0
    text = tables.render_peers(list(rows.values()))
    assert "LAST RX" in text and "RX DROP" in text and "9s ago" in text
    assert "VTEP MAC" not in text                         # udp: no VTEPs


def _cli_as_nobody(argv: list[str]) -> tuple[int, str]:
    """Run the CLI in a forked child that dropped to uid 65534: (exit status, stderr)."""
    from overlayd.cli import build_parser

    build_parser()            # import everything now: uid 65534 may not read the interpreter's
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:                                    # child: no exec, the CLI is imported already
        code = 70
        try:
            os.dup2(write_end, 2)
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            sys.stderr = os.fdopen(2, "w", buffering=1)
            code = cli_main(argv)
        except BaseException:                       # noqa: BLE001 - report it as the test's
            import traceback
            traceback.print_exc()
        finally:
            os._exit(code)
    os.close(write_end)
    with os.fdopen(read_end) as err:
        text = err.read()
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), text


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to switch to another uid")
def test_a_refused_client_gets_one_line_and_77_every_time(loop: LoopThread) -> None:
    """The socket opened to others by hand: SO_PEERCRED refuses uid 65534. The daemon answers
    before the request was read; the CLI must still say why, never a BrokenPipe traceback."""
    import tempfile

    base = Path(tempfile.mkdtemp(prefix="ovd-peercred-"))
    try:
        base.chmod(0o755)
        ctl = start_control(make_daemon(base), loop)
        try:
            ctl.path.parent.chmod(0o755)
            ctl.path.chmod(0o666)
            for _ in range(30):
                code, err = _cli_as_nobody(["status", "--socket", str(ctl.path)])
                assert "Traceback" not in err, err
                assert err.count("\n") == 1 and err.startswith("overlayd status: "), err
                assert code == EX_NOPERM and "permission denied" in err, (code, err)
        finally:
            loop.run(ctl.server.close())
    finally:
        shutil.rmtree(base, ignore_errors=True)
