"""The wireguard backend end to end: three `overlayd run` hosts from one map, and a fourth
host in the same map that runs stock WireGuard (Debian's wireguard-go, configured with `wg`
and `ip` only) - the independent implementation the interop claims are checked against.

host1..host3: overlayd, rekey timer shortened to REKEY_S (the whitepaper's 120 s otherwise);
host4: wireguard-go, with host3's public key deliberately wrong (the "wrong key" case).
Tests run in file order and share the lab; the order matters where a test needs a pair that
has not talked yet (who initiates) and roaming comes late. The whole file runs once per
engine: the asyncio loop, and two native data-plane threads per daemon (compiled data plane).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from itertools import permutations

import pytest
from netns_helpers import NETNS_MARKS, drop_counters_or_skip, logs, marker

from overlayd.control.wg_noise import generate_private_key, public_key
from overlayd.lab import HostSpec, Lab, netns
from overlayd.lab.netns import ns_run
from overlayd.lab.traffic import PingResult
from overlayd.lab.wireguard_go import WireguardGoPeer, b64, wireguard_go_unavailable

pytestmark = [*NETNS_MARKS, pytest.mark.skipif(
    wireguard_go_unavailable() is not None, reason=f"{wireguard_go_unavailable()}")]

CIDR = "10.77.0.0/16"
REKEY_S = 3.0
OVERLAYD = ("host1", "host2", "host3")
TIMERS = {"wireguard": {"rekey_after_seconds": REKEY_S, "rekey_timeout_seconds": 1.0}}
ENGINES = {"loop": {"engine": "loop"}, "threads": {"engine": "threads", "threads": 2}}


@pytest.fixture(scope="module", params=sorted(ENGINES))
def engine(request: pytest.FixtureRequest) -> str:
    if request.param == "threads" and os.environ.get("OVERLAYD_DATAPLANE") == "python":
        pytest.skip("the threads engine drives the compiled data plane")
    return str(request.param)


@pytest.fixture(scope="module")
def lab(engine: str) -> Iterator[Lab]:
    extra = {**TIMERS, "dataplane": ENGINES[engine]}
    specs = [HostSpec(config_extra=extra) for _ in OVERLAYD] + [HostSpec(start_daemon=False)]
    with Lab(specs, backend="wireguard", cidr=CIDR) as lab:
        lab.add_bystander("stranger")
        yield lab


@pytest.fixture(scope="module")
def wg_go(lab: Lab) -> Iterator[WireguardGoPeer]:
    host4 = lab.host("host4")
    assert host4.wg_private_key is not None and host4.subnet is not None
    device = f"wg{lab.prefix[-8:]}"[-15:]
    peer = WireguardGoPeer(host4.netns, device, host4.wg_private_key, lab.port,
                           f"{host4.overlay_ip}/32", host4.dir, mtu=1440)
    try:
        netns.ip("-n", host4.netns, "route", "add", CIDR, "dev", device)
        for host in lab.hosts[:3]:
            assert host.wg_private_key is not None
            key = public_key(host.wg_private_key)
            if host.name == "host3":
                key = public_key(generate_private_key())       # the wrong key
            peer.set_peer(key, str(host.subnet), f"{host.underlay_ip}:{lab.port}")
        yield peer
    finally:
        peer.stop()


def host_key(lab: Lab, name: str) -> str:
    key = lab.host(name).wg_private_key
    assert key is not None
    return b64(public_key(key))


def peer_row(lab: Lab, host: str, peer: str) -> dict:
    rows = lab.control(host, "peers")
    return next(r for r in rows if r["name"] == peer)


def test_first_ping_between_two_overlayd_hosts_is_held_and_answered(lab: Lab,
                                                                    engine: str) -> None:
    """host1 has no session to host2: its first packet waits for the handshake host1 starts
    (initiator-side staging) and is sent sealed when it completes."""
    assert lab.control("host1", "status")["engine"]["kind"] == engine
    first = lab.ping("host1", "host2", count=1, wait_s=3.0)
    assert first.received == 1, f"{first.output}\n{logs(lab)}"
    held = lab.control("host1", "status")["traffic"]
    assert held["wg_staged"] >= 1 and held["wg_staged_sent"] == held["wg_staged"]


def test_responder_holds_its_packets_until_the_session_is_confirmed(lab: Lab) -> None:
    """host1's underlay egress is throttled (a token bucket of 200 bytes at 125 bytes/s, no
    netem here): its initiation leaves at once, but its next datagram - the first transport
    message, which confirms the session at host3 - waits about 1.3 s. A ping from host3 sent
    inside that time is held (its keypair is only "next") and delivered once confirmed."""
    host1, host3 = lab.host("host1"), lab.host("host3")
    ns_run(host1.netns, ["ping", "-c", "1", "-W", "2", str(host3.underlay_ip)])   # ARP first
    ns_run(host1.netns, ["tc", "qdisc", "add", "dev", "ul0", "root", "tbf", "rate", "1kbit",
                         "burst", "200", "latency", "20s"])
    try:
        outcome: list[PingResult] = []
        initiator = threading.Thread(target=lambda: outcome.append(
            lab.ping("host1", "host3", count=1, wait_s=8.0)))
        initiator.start()
        time.sleep(0.6)     # host3 answered at once; the confirmation arrives at about 1.3 s
        reply = lab.ping("host3", "host1", count=1, wait_s=8.0)
        initiator.join()
    finally:
        ns_run(host1.netns, ["tc", "qdisc", "del", "dev", "ul0", "root"])
    assert outcome[0].received == 1 and reply.received == 1, f"{reply.output}\n{logs(lab)}"
    held = lab.control("host3", "status")["traffic"]
    assert held["wg_staged"] >= 1 and held["wg_staged_sent"] == held["wg_staged"]


def test_three_overlayd_hosts_from_one_map(lab: Lab) -> None:
    lab.wait_mesh(timeout_s=20.0)
    for a, b in permutations(OVERLAYD, 2):
        assert lab.ping(a, b, count=2, interval_s=0.1).received == 2, f"{a}->{b}\n{logs(lab)}"
    row = peer_row(lab, "host1", "host2")
    assert row["wireguard"]["keypairs"] >= 1 and row["wireguard"]["latest_handshake_unix"]


def test_device_mtu_is_underlay_minus_60(lab: Lab) -> None:
    info = lab.device_info("host1")
    assert info is not None and info["mtu"] == 1500 - 60


def test_overlayd_initiates_to_wireguard_go(lab: Lab, wg_go: WireguardGoPeer) -> None:
    assert wg_go.latest_handshakes()[host_key(lab, "host1")] == 0     # never talked
    # The very first packet to a peer without a session is held while the handshake runs and
    # sent sealed when it completes (as wireguard-go stages it), not lost: one ping, answered.
    first = lab.ping("host1", "host4", count=1, wait_s=3.0)
    assert first.received == 1, f"{first.output}\n{logs(lab)}"
    held = lab.control("host1", "status")["traffic"]
    assert held["wg_staged"] >= 1 and held["wg_staged_sent"] == held["wg_staged"]
    result = lab.ping("host1", "host4", count=3, interval_s=0.2)
    assert result.received >= 2, f"{result.output}\n{logs(lab)}"
    assert wg_go.latest_handshakes()[host_key(lab, "host1")] > 0


def test_wireguard_go_initiates_to_overlayd(lab: Lab, wg_go: WireguardGoPeer) -> None:
    assert wg_go.latest_handshakes()[host_key(lab, "host2")] == 0     # never talked
    before = peer_row(lab, "host2", "host4")["wireguard"]["handshakes"]
    assert before == 0
    result = lab.ping("host4", "host2", count=3, interval_s=0.2)
    assert result.received >= 2, f"{result.output}\n{logs(lab)}"
    assert peer_row(lab, "host2", "host4")["wireguard"]["handshakes"] == 1   # as responder
    assert wg_go.latest_handshakes()[host_key(lab, "host2")] > 0


@pytest.mark.parametrize(("a", "b"), [("host1", "host4"), ("host4", "host2")])
def test_tcp_transfer_with_checksum(lab: Lab, wg_go: WireguardGoPeer, a: str, b: str) -> None:
    result = lab.tcp_transfer(a, b, 8_000_000, timeout_s=60.0)
    assert result.bytes_ok and result.sha256_ok, result


def test_rekey_after_the_timer(lab: Lab, wg_go: WireguardGoPeer) -> None:
    first = wg_go.latest_handshakes()[host_key(lab, "host1")]
    handshakes = peer_row(lab, "host1", "host4")["wireguard"]["handshakes"]
    # keep data flowing for three rekey periods: the initiator (host1) renews the session
    # each time its keypair passes REKEY_S, and traffic goes on across the switch
    result = lab.ping("host1", "host4", count=int(3 * REKEY_S / 0.1), interval_s=0.1,
                      wait_s=1.0)
    assert result.received >= result.transmitted - 2, result.output
    assert peer_row(lab, "host1", "host4")["wireguard"]["handshakes"] >= handshakes + 2
    assert wg_go.latest_handshakes()[host_key(lab, "host1")] > first


def test_wrong_key_gets_nowhere(lab: Lab, wg_go: WireguardGoPeer) -> None:
    before = drop_counters_or_skip(lab, "host3")
    assert not lab.ping("host4", "host3", count=2, interval_s=0.2, wait_s=1.0).ok
    assert not lab.ping("host3", "host4", count=2, interval_s=0.2, wait_s=1.0).ok
    after = drop_counters_or_skip(lab, "host3")
    # wireguard-go's initiations are MACed for the key it was given, not host3's
    assert after["wg_bad_mac1"] > before["wg_bad_mac1"]
    assert wg_go.latest_handshakes()[_go_key_of(wg_go, lab, "host3")] == 0


def _go_key_of(wg_go: WireguardGoPeer, lab: Lab, host: str) -> str:
    """The key wireguard-go holds for ``host`` (the peer whose endpoint is that host)."""
    target = f"{lab.host(host).underlay_ip}:{lab.port}"
    return next(k for k, e in wg_go.endpoints().items() if e == target)


def _forged_arrivals(lab: Lab, src_ip: str) -> int:
    mark = marker()
    host2 = lab.host("host2")
    return lab.count_arrivals(host2, mark, lambda: lab.inject(
        "host1", host2, "10.77.1.77", str(host2.overlay_ip), mark, src_ip=src_ip), seconds=1.0)


def test_forged_datagram_with_a_members_source_is_dropped_and_counted(lab: Lab) -> None:
    """On udp and vxlan this very datagram (host1's real underlay address, a plain inner
    packet) is delivered; here it is not a WireGuard message at all."""
    before = drop_counters_or_skip(lab, "host2")
    assert _forged_arrivals(lab, lab.host("host1").underlay_ip) == 0
    after = drop_counters_or_skip(lab, "host2")
    assert after["wg_bad_message"] - before["wg_bad_message"] == 1


def test_counter_identities_hold_on_the_live_daemons(lab: Lab) -> None:
    """After handshakes, rekeys, keepalives, forgeries and wrong keys: every datagram landed in
    exactly one place (README: counter identities)."""
    from overlayd.dataplane.counters import identity_violations

    for name in OVERLAYD:
        status = lab.control(name, "status")
        peers = [(p["tx_packets"], p["tx_bytes"], p["rx_packets"], p["rx_bytes"])
                 for p in lab.control(name, "peers")]
        assert identity_violations({**status["traffic"], **status["drops"]}, peers) == [], \
            (name, status)


def test_roaming_wireguard_go_changes_its_underlay_address(lab: Lab,
                                                           wg_go: WireguardGoPeer) -> None:
    host4 = lab.host("host4")
    new_ip, new_port = "192.168.77.44", lab.port + 1
    assert peer_row(lab, "host1", "host4")["wireguard"]["endpoint"].startswith(
        f"{host4.underlay_ip}:")
    # (deleted first: deleting a primary address takes the secondaries of its subnet along)
    netns.ip("-n", host4.netns, "addr", "del", f"{host4.underlay_ip}/24", "dev", "ul0")
    netns.ip("-n", host4.netns, "addr", "add", f"{new_ip}/24", "dev", "ul0")
    # As a NAT rebinding would also do, the port moves too: wireguard-go (0.0.20220316) keeps
    # sending from the vanished address (ENETUNREACH) until its socket is rebound.
    wg_go.wg("set", wg_go.device, "listen-port", str(new_port))
    # wireguard-go now sends from the new address; its authenticated packets move host1's
    # endpoint, and host1's replies (and later its own traffic) follow
    deadline = time.monotonic() + 15.0
    while time.monotonic() < deadline:
        if lab.ping("host4", "host1", count=1, wait_s=1.0).ok:
            break
    assert peer_row(lab, "host1", "host4")["wireguard"]["endpoint"] == f"{new_ip}:{new_port}"
    assert lab.ping("host1", "host4", count=3, interval_s=0.2).received == 3
