"""The etcd lease and watch logic (control/) on an in-memory store: fast, deterministic, and
with the failures real etcd produces on purpose (outage, broken watch, compaction, lost lease)."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from memory_store import MemoryStore

from overlayd.control.config import EtcdSettings
from overlayd.control.etcd_lease import LeaseKeeper, NoFreeSubnet, renew_after
from overlayd.control.etcd_source import EtcdMapSource
from overlayd.control.etcd_watch import LeaseTable, LeaseWatcher
from overlayd.control.flannel_schema import lease_json, parse_network_config
from overlayd.control.problems import ConfigError
from overlayd.io.store_protocol import KeyValue, WatchEvent

PREFIX = "/coreos.com/network"
CONFIG = b'{"Network": "10.50.0.0/16", "SubnetLen": 24, "Backend": {"Type": "udp"}}'
VXLAN_CONFIG = b'{"network": "10.50.0.0/16", "backend": {"type": "vxlan", "vni": 7}}'


def ip(text: str) -> ipaddress.IPv4Address:
    return ipaddress.IPv4Address(text)


def net(text: str) -> ipaddress.IPv4Network:
    return ipaddress.IPv4Network(text)


def settings(ttl: int = 86400) -> EtcdSettings:
    return EtcdSettings(("http://memory:2379",), PREFIX, None, None, None, ttl, None, None)


def run(coro: Awaitable[Any]) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 10))  # type: ignore[arg-type]


async def until(predicate: Callable[[], bool], timeout_s: float = 3.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.005)


class Running:
    """A source with its changes() running in a task; ``whys`` collects what it yielded."""

    def __init__(self, source: EtcdMapSource) -> None:
        self.source = source
        self.whys: list[str] = []
        self.task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        changes: AsyncIterator[str] = self.source.changes()
        async for why in changes:
            self.whys.append(why)

    def peers(self) -> dict[str, str]:
        """subnet -> public IP of every node in the map now."""
        smap = self.source.load()
        return {str(n.subnet): str(n.public_ip) for n in smap.nodes}

    async def stop(self) -> None:
        self.task.cancel()
        await self.source.close()


async def start(store: MemoryStore, public_ip: str, **kw: Any) -> Running:
    r = Running(EtcdMapSource(store, settings(kw.pop("ttl", 86400)), ip(public_ip),
                              rng=random.Random(public_ip), **kw))
    await until(lambda: bool(r.whys))
    return r


async def with_config(raw: bytes = CONFIG) -> MemoryStore:
    store = MemoryStore()
    await store.put(f"{PREFIX}/config", raw)
    return store


def subnet_of(r: Running) -> str:
    assert r.source.keeper is not None and r.source.keeper.held is not None
    return str(r.source.keeper.held.subnet)


# -- leases -------------------------------------------------------------------------------------

def test_three_nodes_claim_distinct_subnets_and_see_each_other() -> None:
    async def main() -> None:
        store = await with_config()
        nodes = [await start(store, f"192.0.2.{i}") for i in (1, 2, 3)]
        subnets = {subnet_of(n) for n in nodes}
        assert len(subnets) == 3
        for s in subnets:   # SubnetMin default: the network's subnet 0 is never handed out
            assert net(s).subnet_of(net("10.50.0.0/16")) and s != "10.50.0.0/24"
        want = {subnet_of(n): f"192.0.2.{i}" for i, n in enumerate(nodes, 1)}
        for n in nodes:
            await until(lambda n=n: n.peers() == want)
        # each lease is flannel's JSON on an etcd lease with the configured TTL
        for n, (i, s) in zip(nodes, enumerate(sorted(want)), strict=False):
            kv = store.data[f"{PREFIX}/subnets/{subnet_of(n).replace('/', '-')}"]
            assert kv.lease in store.leases and store.leases[kv.lease] == 86400
            assert json.loads(kv.value) == {"PublicIP": str(n.source.public_ip),
                                            "PublicIPv6": None}
        for n in nodes:
            await n.stop()
    run(main())


def test_restart_reuses_own_lease_then_previous_subnet_env() -> None:
    async def main() -> None:
        store = await with_config()
        a = await start(store, "192.0.2.1")
        first = subnet_of(a)
        old_lease = store.data[f"{PREFIX}/subnets/{first.replace('/', '-')}"].lease
        await a.stop()
        again = await start(store, "192.0.2.1")
        assert subnet_of(again) == first and again.source.keeper.held.how == "reused"
        # moved onto a fresh etcd lease; the old one revoked (nothing else was on it)
        assert store.data[f"{PREFIX}/subnets/{first.replace('/', '-')}"].lease != old_lease
        assert old_lease not in store.leases
        await again.stop()
        # a fresh etcd (no lease of ours): the subnet recorded in subnet.env is claimed again
        store2 = await with_config()
        b = await start(store2, "192.0.2.9", previous_subnet=net("10.50.77.0/24"))
        assert subnet_of(b) == "10.50.77.0/24" and b.source.keeper.held.how == \
            "previous subnet.env"
        await b.stop()
        # ...unless someone holds it now: then a random free one
        store3 = await with_config()
        await store3.put(f"{PREFIX}/subnets/10.50.77.0-24", lease_json(ip("192.0.2.50"), ""))
        c = await start(store3, "192.0.2.9", previous_subnet=net("10.50.77.0/24"))
        assert subnet_of(c) != "10.50.77.0/24" and c.source.keeper.held.how == "claimed"
        await c.stop()
    run(main())


def test_reservations_are_never_taken_and_ours_is_used() -> None:
    async def main() -> None:
        # Room for exactly two subnets: one reserved (TTL 0) for another node.
        store = await with_config(b'{"Network": "10.50.0.0/16", "SubnetMin": "10.50.1.0", '
                                  b'"SubnetMax": "10.50.2.0"}')
        await store.put(f"{PREFIX}/subnets/10.50.1.0-24", lease_json(ip("192.0.2.99"), ""))
        a = await start(store, "192.0.2.1")
        assert subnet_of(a) == "10.50.2.0/24"
        network = parse_network_config(b'{"Network": "10.50.0.0/16", "SubnetMin": "10.50.1.0",'
                                       b' "SubnetMax": "10.50.2.0"}')
        late = LeaseKeeper(store, PREFIX, network, ip("192.0.2.2"), b"{}", 60)
        with pytest.raises(NoFreeSubnet):
            await late.acquire()
        assert json.loads(store.data[f"{PREFIX}/subnets/10.50.1.0-24"].value)["PublicIP"] == \
            "192.0.2.99"
        await a.stop()
        # The reserved node itself uses its reservation, and it stays without a TTL.
        owner = await start(store, "192.0.2.99")
        assert subnet_of(owner) == "10.50.1.0/24"
        assert owner.source.keeper.held.lease_id == 0
        assert store.data[f"{PREFIX}/subnets/10.50.1.0-24"].lease == 0
        assert owner.source.report()["lease"]["reservation"] is True
        await owner.stop()
    run(main())


def test_racing_nodes_never_share_a_subnet() -> None:
    async def main() -> None:
        store = await with_config(b'{"Network": "10.50.0.0/16", "SubnetMin": "10.50.1.0", '
                                  b'"SubnetMax": "10.50.4.0"}')
        network = parse_network_config(store.data[f"{PREFIX}/config"].value)
        keepers = [LeaseKeeper(store, PREFIX, network, ip(f"192.0.2.{i}"),
                               lease_json(ip(f"192.0.2.{i}"), ""), 60,
                               rng=random.Random(0))     # same rng: all try the same subnet
                   for i in range(1, 7)]
        results = await asyncio.gather(*(k.acquire() for k in keepers), return_exceptions=True)
        won = [r for r in results if not isinstance(r, Exception)]
        assert len(won) == 4 and len({h.subnet for h in won}) == 4
        assert all(isinstance(r, NoFreeSubnet) for r in results if isinstance(r, Exception))
    run(main())


def test_renewal_compares_on_revision_and_never_overwrites_another_holder() -> None:
    async def main() -> None:
        now = [1000.0]
        store = await with_config()
        network = parse_network_config(CONFIG)
        mine = lease_json(ip("192.0.2.1"), "")
        k = LeaseKeeper(store, PREFIX, network, ip("192.0.2.1"), mine, 100, clock=lambda: now[0])
        held = await k.acquire()
        assert k.remaining(now[0]) == 100 and renew_after(100) == 50
        assert k.renew_due_at() == 1050.0 and renew_after(86400) == 86400 - 3600
        now[0] = 1050.0
        assert await k.renew() and k.renewals == 1 and k.remaining(now[0]) == 100
        assert store.data[held.key].lease == held.lease_id
        # someone else takes the key (e.g. a flannel node's unconditional put)
        theirs = lease_json(ip("192.0.2.66"), "")
        await store.put(held.key, theirs, await store.grant_lease(100))
        assert not await k.renew()
        assert store.data[held.key].value == theirs          # untouched
        assert k.lost is not None and "192.0.2.66" in k.lost
        assert not await k.reacquire()                       # held by someone else: not ours
        await store.delete(held.key)
        assert await k.reacquire() and k.lost is None and k.held.subnet == held.subnet
        assert json.loads(store.data[held.key].value)["PublicIP"] == "192.0.2.1"
    run(main())


def test_lost_lease_is_claimed_back_with_the_same_subnet_and_forwarding_goes_on() -> None:
    async def main() -> None:
        store = await with_config()
        a = await start(store, "192.0.2.1")
        b = await start(store, "192.0.2.2")
        mine = subnet_of(a)
        key = f"{PREFIX}/subnets/{mine.replace('/', '-')}"
        await store.expire(store.data[key].lease)            # TTL ran out while etcd was away
        await until(lambda: a.source.keeper.reacquired == 1)
        assert subnet_of(a) == mine and store.data[key].value == lease_json(ip("192.0.2.1"), "")
        assert a.source.keeper.losses == 1
        # now another node grabs it: a keeps its subnet, says so, and keeps trying
        await store.delete(key)
        await store.put(key, lease_json(ip("192.0.2.77"), ""))
        await until(lambda: a.source.keeper.lost is not None)
        assert subnet_of(a) == mine and a.peers()[mine] == "192.0.2.1"
        problems = a.source.report()["problems"]
        assert any("lease lost" in p and mine in p for p in problems)
        await a.stop()
        await b.stop()
    run(main())


# -- watch ---------------------------------------------------------------------------------------

def test_join_and_leave_reach_a_watching_node() -> None:
    async def main() -> None:
        store = await with_config()
        a = await start(store, "192.0.2.1")
        await store.put(f"{PREFIX}/subnets/10.50.200.0-24", lease_json(ip("192.0.2.200"), ""))
        await until(lambda: "10.50.200.0/24" in a.peers())
        await store.delete(f"{PREFIX}/subnets/10.50.200.0-24")
        await until(lambda: "10.50.200.0/24" not in a.peers())
        assert any("-10.50.200.0-24" in w for w in a.whys)
        await a.stop()
    run(main())


def test_broken_watch_resumes_from_the_next_revision_without_relisting() -> None:
    async def main() -> None:
        store = await with_config()
        a = await start(store, "192.0.2.1")
        lists = a.source.watcher.counters.lists
        store.set_down(True)
        await until(lambda: not a.source.report()["reachable"])
        assert a.source.load().nodes                          # the last map stays
        store.down = False      # back, but the change happened while the watch was broken
        await store.put(f"{PREFIX}/subnets/10.50.9.0-24", lease_json(ip("192.0.2.9"), ""))
        await until(lambda: "10.50.9.0/24" in a.peers())
        c = a.source.watcher.counters
        assert c.resumes >= 1 and c.reconnects >= 1 and c.lists == lists
        assert a.source.report()["reachable"] and a.source.report()["last_contact_seconds"] < 1
        await a.stop()
    run(main())


def test_compaction_under_a_watcher_relists_and_ends_with_the_right_table() -> None:
    async def main() -> None:
        store = await with_config()
        a = await start(store, "192.0.2.1")
        store.set_down(True)
        await until(lambda: not a.source.report()["reachable"])
        store.down = False
        for i in range(10, 20):
            await store.put(f"{PREFIX}/subnets/10.50.{i}.0-24", lease_json(ip(f"192.0.2.{i}"), ""))
        for i in range(10, 15):
            await store.delete(f"{PREFIX}/subnets/10.50.{i}.0-24")
        await store.compact(store.revision)
        await until(lambda: a.source.watcher.counters.compaction_relists >= 1)
        want = {f"10.50.{i}.0/24" for i in range(15, 20)} | {subnet_of(a)}
        await until(lambda: set(a.peers()) == want)
        await a.stop()
    run(main())


def test_periodic_resync_repairs_a_missed_event() -> None:
    async def main() -> None:
        store = await with_config()
        a = await start(store, "192.0.2.1", resync_seconds=0.2)
        # a key that appears without any event reaching the watcher (a missed event)
        store.revision += 1
        key = f"{PREFIX}/subnets/10.50.42.0-24"
        store.data[key] = KeyValue(key, lease_json(ip("192.0.2.42"), ""), store.revision,
                                   store.revision, 0)
        await until(lambda: "10.50.42.0/24" in a.peers(), 3.0)
        assert a.source.watcher.counters.resyncs >= 1
        await a.stop()
    run(main())


def test_lease_table_never_moves_a_key_backwards() -> None:
    t = LeaseTable()
    kv = lambda rev, v=b"x": KeyValue("/k", v, 1, rev, 0)
    assert t.apply_event(WatchEvent("put", kv(5)))
    assert not t.apply_event(WatchEvent("put", kv(4, b"old")))          # replayed older put
    assert t.apply_event(WatchEvent("delete", kv(7)))
    assert not t.apply_list([kv(5)], 6)                # a snapshot older than the delete
    assert "/k" not in t.entries
    assert t.apply_list([kv(8, b"new")], 8) and t.entries["/k"].value == b"new"
    assert not t.apply_event(WatchEvent("put", kv(6)))


def test_outage_counts_reconnects_with_bounded_jittered_backoff() -> None:
    async def main() -> None:
        store = await with_config()
        delays: list[float] = []

        async def sleep(s: float) -> None:
            delays.append(s)
            await asyncio.sleep(0)

        store.down = True
        w = LeaseWatcher(store, PREFIX + "/", lambda why: None, sleep=sleep,
                         rng=random.Random(1))
        task = asyncio.get_running_loop().create_task(w.run())
        await until(lambda: len(delays) >= 12)
        task.cancel()
        assert w.counters.reconnects >= 12 and not w.contact.reachable
        assert delays[0] <= 0.1 and max(delays) <= 3.0 and delays[-1] >= 1.5
        assert len(set(delays)) == len(delays)             # jittered: no two alike
    run(main())


# -- bad input -------------------------------------------------------------------------------------

def test_bad_leases_are_counted_skips_never_a_crash_or_a_torn_table() -> None:
    async def main() -> None:
        store = await with_config()
        a = await start(store, "192.0.2.1")
        good = f"{PREFIX}/subnets/10.50.5.0-24"
        await store.put(good, lease_json(ip("192.0.2.5"), ""))
        bad = {
            "10.50.6.0-24": b"garbage{",                                # not JSON
            "10.50.7.0-24": b'{"PublicIP": "not-an-ip"}',               # not an address
            "10.50.8.0-24": b'["PublicIP"]',                            # not an object
            "banana": b'{"PublicIP": "192.0.2.8"}',                     # not a subnet key
            "10.50.9.0-26": lease_json(ip("192.0.2.9"), ""),            # wrong length
            "10.51.1.0-24": lease_json(ip("192.0.2.10"), ""),           # outside the network
            "10.50.11.0-24": lease_json(ip("192.0.2.11"), "vxlan", vni=1,
                                        vtep_mac="02:00:00:00:00:11"),  # other backend
            "10.50.12.0-24": lease_json(ip("192.0.2.5"), ""),           # duplicate public IP
        }
        for name, value in bad.items():
            await store.put(f"{PREFIX}/subnets/{name}", value)
        await store.put(f"{PREFIX}/subnets/10.50.13.0-24", lease_json(ip("192.0.2.13"), ""))
        await until(lambda: "10.50.13.0/24" in a.peers())
        assert set(a.peers()) == {subnet_of(a), "10.50.5.0/24", "10.50.13.0/24"}
        assert a.source.report()["skipped_keys"] == {
            "lease_not_json": 2, "lease_invalid": 1, "bad_key": 1, "wrong_subnet_len": 1,
            "outside_network": 1, "backend_mismatch": 1, "duplicate_public_ip": 1}
        await a.stop()
    run(main())


@pytest.mark.parametrize("raw,why", [
    (None, "is missing"),
    (b"{not json", "not JSON"),
    (b'{"Network": "10.50.0.0/16", "SubnetLen": 15}', "SubnetLen"),
    (b'{"Network": "10.50.0.0/16", "Backend": {"Type": "host-gw"}}', "Type"),
])
def test_missing_or_invalid_network_config_waits_reports_and_recovers(raw: bytes | None,
                                                                      why: str) -> None:
    async def main() -> None:
        store = MemoryStore()
        if raw is not None:
            await store.put(f"{PREFIX}/config", raw)
        source = EtcdMapSource(store, settings(), ip("192.0.2.1"))
        r = Running(source)
        await until(lambda: source.config_problem is not None and why in source.config_problem)
        with pytest.raises(ConfigError):
            source.load()
        assert not r.whys and any(why in p for p in source.report()["problems"])
        await store.put(f"{PREFIX}/config", CONFIG)          # fixed: it starts by itself
        await until(lambda: bool(r.whys))
        assert source.report()["problems"] == []
        # turning invalid again keeps the last valid config in force, reported
        await store.put(f"{PREFIX}/config", b"[]")
        await until(lambda: bool(source.report()["problems"]))
        assert source.load().network == net("10.50.0.0/16")
        await r.stop()
    run(main())


def test_vxlan_leases_carry_vni_and_a_stable_vtep_mac() -> None:
    async def main() -> None:
        store = await with_config(VXLAN_CONFIG)
        a = await start(store, "192.0.2.1")
        b = await start(store, "192.0.2.2")
        value = json.loads(store.data[f"{PREFIX}/subnets/{subnet_of(a).replace('/', '-')}"].value)
        assert value["BackendType"] == "vxlan" and value["BackendData"]["VNI"] == 7
        mac = value["BackendData"]["VtepMAC"]
        smap = b.source.load()
        await until(lambda: len(b.source.load().nodes) == 2)
        smap = b.source.load()
        assert smap.backend.type == "vxlan" and smap.backend.vni == 7 and smap.backend.port == 8472
        assert {n.vtep_mac for n in smap.nodes if str(n.public_ip) == "192.0.2.1"} == {mac}
        await a.stop()
        again = await start(store, "192.0.2.1")
        value2 = json.loads(store.data[f"{PREFIX}/subnets/{subnet_of(a).replace('/', '-')}"]
                            .value)
        assert value2["BackendData"]["VtepMAC"] == mac
        await again.stop()
        await b.stop()
    run(main())


