"""EtcdStore against real etcd 3.4 processes on 127.0.0.1 (overlayd.lab.etcd), no mocks.

One single-member etcd serves the tests of the protocol methods (each test under its own key
prefix); the failover, outage and TLS tests start clusters of their own, since they kill members.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from etcd_helpers import ETCD_MARKS, make_tls, run, unique_prefix

from overlayd.io.etcd_store import EtcdStore
from overlayd.io.store_protocol import (
    CompactedError,
    KeyValue,
    MapStore,
    StoreError,
    StoreUnavailable,
    WatchEvent,
)
from overlayd.lab.etcd import EtcdCluster, EtcdTLS, loopback_cluster

pytestmark = ETCD_MARKS


@pytest.fixture(scope="module")
def etcd() -> Iterator[EtcdCluster]:
    with loopback_cluster(1) as cluster:
        yield cluster


def store_on(cluster: EtcdCluster, timeout_s: float = 3.0) -> EtcdStore:
    return EtcdStore(cluster.endpoints, timeout_s=timeout_s)


async def collect(store: MapStore, prefix: str, start: int, count: int,
                  timeout_s: float = 10.0) -> list[WatchEvent]:
    """The first ``count`` events of a watch from ``start`` (then the watch is closed)."""
    events: list[WatchEvent] = []

    async def take() -> None:
        async for batch in store.watch_prefix(prefix, start):
            events.extend(batch)
            if len(events) >= count:
                return
    await asyncio.wait_for(take(), timeout_s)
    return events


async def running_watch(store: MapStore, prefix: str) -> AsyncIterator[list[WatchEvent]]:
    """A watch on prefix that has delivered its first event (a put of prefix + "a")."""
    _, start = await store.list_prefix(prefix)
    revision = await store.put(f"{prefix}a", b"1")
    stream = store.watch_prefix(prefix, start + 1)
    assert [e.kv.mod_revision for e in await anext(stream)] == [revision]
    return stream


# -- the protocol, one method at a time ---------------------------------------------------------

def test_store_satisfies_the_protocol(etcd: EtcdCluster) -> None:
    store: MapStore = store_on(etcd)       # mypy checks the structural match here
    assert store.endpoint == etcd.endpoints[0]


def test_put_get_delete_round_trip(etcd: EtcdCluster) -> None:
    key = f"{unique_prefix()}/a"

    async def body() -> None:
        store = store_on(etcd)
        try:
            first = await store.put(key, b"one")
            second = await store.put(key, b"two")
            assert second > first
            kv = await store.get(key)
            assert kv == KeyValue(key, b"two", create_revision=first, mod_revision=second, lease=0)
            assert await store.delete(key) is True
            assert await store.delete(key) is False
            assert await store.get(key) is None
        finally:
            await store.close()
    run(body())


def test_create_is_create_only(etcd: EtcdCluster) -> None:
    key = f"{unique_prefix()}/subnets/10.5.1.0-24"

    async def body() -> None:
        store = store_on(etcd)
        try:
            revision = await store.create(key, b"mine")
            assert revision is not None
            assert await store.create(key, b"theirs") is None
            kv = await store.get(key)
            assert kv is not None and kv.value == b"mine" and kv.mod_revision == revision
            await store.delete(key)
            assert await store.create(key, b"again") is not None   # free again once deleted
        finally:
            await store.close()
    run(body())


def test_compare_on_revision_refuses_after_someone_else_wrote(etcd: EtcdCluster) -> None:
    key = f"{unique_prefix()}/subnets/10.5.2.0-24"

    async def body() -> None:
        me, other = store_on(etcd), store_on(etcd)
        try:
            mine = await me.create(key, b"mine")
            assert mine is not None
            theirs = await other.put(key, b"theirs")
            assert await me.put_if_revision(key, b"renewed", mine) is None
            assert await me.delete_if_revision(key, mine) is False
            kv = await me.get(key)
            assert kv is not None and kv.value == b"theirs" and kv.mod_revision == theirs
            renewed = await me.put_if_revision(key, b"renewed", theirs)
            assert renewed is not None and renewed > theirs
            assert await me.delete_if_revision(key, renewed) is True
            assert await me.get(key) is None
            assert await me.put_if_revision(key, b"x", renewed) is None   # gone: no resurrection
        finally:
            await me.close()
            await other.close()
    run(body())


def test_list_prefix_is_sorted_complete_and_carries_the_revision(etcd: EtcdCluster) -> None:
    prefix = unique_prefix()

    async def body() -> None:
        store = store_on(etcd)
        try:
            for name in ("c", "a", "b"):
                await store.put(f"{prefix}/subnets/{name}", name.encode())
            await store.put(f"{prefix}/subnetsX", b"not under the slash")
            last = await store.put(f"{prefix}/config", b"{}")
            kvs, revision = await store.list_prefix(f"{prefix}/subnets/")
            assert [kv.key for kv in kvs] == [f"{prefix}/subnets/{n}" for n in "abc"]
            assert [kv.value for kv in kvs] == [b"a", b"b", b"c"]
            assert revision >= last
            empty, _ = await store.list_prefix(f"{prefix}/nothing/")
            assert empty == []
        finally:
            await store.close()
    run(body())


def test_lease_attaches_counts_down_and_expires(etcd: EtcdCluster) -> None:
    key = f"{unique_prefix()}/subnets/10.5.3.0-24"

    async def body() -> None:
        store = store_on(etcd)
        try:
            lease = await store.grant_lease(2)
            assert lease > 0
            assert 1 <= await store.lease_ttl(lease) <= 2
            await store.create(key, b"leased", lease=lease)
            kv = await store.get(key)
            assert kv is not None and kv.lease == lease
            deadline = time.monotonic() + 10.0
            while await store.get(key) is not None:
                assert time.monotonic() < deadline, "the key outlived its 2 s lease"
                await asyncio.sleep(0.2)
            assert await store.lease_ttl(lease) == -1
        finally:
            await store.close()
    run(body())


def test_revoke_lease_deletes_its_keys_and_is_idempotent(etcd: EtcdCluster) -> None:
    key = f"{unique_prefix()}/subnets/10.5.4.0-24"

    async def body() -> None:
        store = store_on(etcd)
        try:
            lease = await store.grant_lease(60)
            await store.put(key, b"v", lease=lease)
            await store.revoke_lease(lease)
            assert await store.get(key) is None
            assert await store.lease_ttl(lease) == -1
            await store.revoke_lease(lease)          # already gone: not an error
        finally:
            await store.close()
    run(body())


def test_status_names_endpoint_version_and_revision(etcd: EtcdCluster) -> None:
    async def body() -> None:
        store = store_on(etcd)
        try:
            revision = await store.put(f"{unique_prefix()}/x", b"1")
            status = await store.status()
            assert status["endpoint"] == etcd.endpoints[0]
            assert str(status["version"]).startswith("3.4.")
            assert isinstance(status["revision"], int) and status["revision"] >= revision
        finally:
            await store.close()
    run(body())


def test_stats_count_requests_by_kind(etcd: EtcdCluster) -> None:
    async def body() -> None:
        store = store_on(etcd)
        try:
            key = f"{unique_prefix()}/k"
            await store.put(key, b"1")
            await store.get(key)
            await store.get(key)
            await store.create(key, b"2")
            await store.list_prefix(key)
            assert {k: store.stats[k] for k in ("put", "get", "txn", "list", "failovers")} == \
                {"put": 1, "get": 2, "txn": 1, "list": 1, "failovers": 0}
        finally:
            await store.close()
    run(body())


# -- watches ------------------------------------------------------------------------------------

def test_watch_delivers_every_change_in_revision_order(etcd: EtcdCluster) -> None:
    prefix = f"{unique_prefix()}/subnets/"

    async def body() -> None:
        store = store_on(etcd)
        try:
            _, start = await store.list_prefix(prefix)
            watcher = asyncio.create_task(collect(store, prefix, start + 1, 4))
            await asyncio.sleep(0.2)
            writer = store_on(etcd)
            r1 = await writer.put(f"{prefix}a", b"1")
            r2 = await writer.put(f"{prefix}b", b"2")
            r3 = await writer.put(f"{prefix}a", b"3")
            await writer.put(f"{prefix[:-1]}X", b"outside the prefix")
            assert await writer.delete(f"{prefix}b")
            events = await watcher
            await writer.close()
            seen = [(e.kind, e.kv.key, e.kv.value, e.kv.mod_revision) for e in events]
            assert seen[:3] == [("put", f"{prefix}a", b"1", r1), ("put", f"{prefix}b", b"2", r2),
                                ("put", f"{prefix}a", b"3", r3)]
            assert seen[3][:3] == ("delete", f"{prefix}b", b"")
            assert seen[3][3] > r3
        finally:
            await store.close()
    run(body())


def test_watch_resumed_from_last_revision_plus_one_loses_and_repeats_nothing(
        etcd: EtcdCluster) -> None:
    prefix = f"{unique_prefix()}/subnets/"

    async def body() -> None:
        store = store_on(etcd)
        try:
            _, start = await store.list_prefix(prefix)
            written = [await store.put(f"{prefix}{i % 3}", str(i).encode()) for i in range(10)]
            # The watcher handles four events, then its stream breaks (the history may have
            # come in one batch: what it did not handle is not "seen").
            first = (await collect(store, prefix, start + 1, 4))[:4]
            last_seen = first[-1].kv.mod_revision
            written += [await store.put(f"{prefix}{i % 3}", str(i).encode())
                        for i in range(10, 15)]
            rest = await collect(store, prefix, last_seen + 1, len(written) - 4)
            revisions = [e.kv.mod_revision for e in first + rest]
            assert revisions == written            # all of them, each once, in order
            assert [e.kv.value for e in rest][-1] == b"14"
        finally:
            await store.close()
    run(body())


def test_watch_from_a_compacted_revision_raises_compacted_error(etcd: EtcdCluster) -> None:
    prefix = f"{unique_prefix()}/subnets/"

    async def body() -> None:
        store = store_on(etcd)
        try:
            _, start = await store.list_prefix(prefix)
            await store.put(f"{prefix}a", b"1")
            seen = await collect(store, prefix, start + 1, 1)
            # The watcher is gone for a while; leases change and etcd compacts meanwhile.
            await store.put(f"{prefix}b", b"2")
            await store.delete(f"{prefix}a")
            _, now = await store.list_prefix(prefix)
            await store.compact(now)
            with pytest.raises(CompactedError) as caught:
                await collect(store, prefix, seen[-1].kv.mod_revision + 1, 1)
            assert caught.value.compact_revision == now
            # What the caller does next: list (the table as of `now`) and watch from there.
            kvs, listed_at = await store.list_prefix(prefix)
            assert [(kv.key, kv.value) for kv in kvs] == [(f"{prefix}b", b"2")]
            watcher = asyncio.create_task(collect(store, prefix, listed_at + 1, 1))
            await asyncio.sleep(0.2)
            revision = await store.put(f"{prefix}c", b"3")
            assert [e.kv.mod_revision for e in await watcher] == [revision]
        finally:
            await store.close()
    run(body())


def test_watch_ends_with_unavailable_when_the_member_dies_and_never_resumes_alone() -> None:
    async def body(cluster: EtcdCluster) -> None:
        store = store_on(cluster)
        prefix = f"{unique_prefix()}/subnets/"
        try:
            stream = await running_watch(store, prefix)
            began = time.monotonic()
            cluster.kill_member("etcd1")
            with pytest.raises(StoreUnavailable):
                await asyncio.wait_for(anext(stream), 20)
            assert time.monotonic() - began < 10
            with pytest.raises(StoreUnavailable):       # down: every call says so
                await store.get(f"{prefix}a")
            cluster.restart_member("etcd1")
            with pytest.raises(StopAsyncIteration):      # ended for good: the caller resumes
                await anext(stream)
            kv = await store.get(f"{prefix}a")           # and the store recovers by itself
            assert kv is not None and kv.value == b"1"
        finally:
            await store.close()
    with loopback_cluster(1) as cluster:
        run(body(cluster))


# -- failover and outages -----------------------------------------------------------------------

def test_failover_when_the_member_in_use_dies() -> None:
    async def body(cluster: EtcdCluster) -> None:
        store = store_on(cluster)
        prefix = f"{unique_prefix()}/subnets/"
        try:
            before = await store.put(f"{prefix}a", b"1")
            used = store.endpoint
            killed = cluster.member_at(used).name
            cluster.kill_member(killed)
            # If it led the cluster, writes wait for the election (seconds on a busy machine);
            # that is etcd's business, the store's is to leave the dead endpoint.
            cluster.wait_healthy([m.name for m in cluster.members if m.name != killed])
            after = await store.put(f"{prefix}b", b"2")        # goes on against the others
            assert store.endpoint != used and after > before
            kvs, _ = await store.list_prefix(prefix)
            assert [kv.value for kv in kvs] == [b"1", b"2"]
            assert store.stats["failovers"] >= 1
            watcher = asyncio.create_task(collect(store, prefix, after + 1, 1))
            await asyncio.sleep(0.2)
            revision = await store.put(f"{prefix}c", b"3")
            assert [e.kv.mod_revision for e in await watcher] == [revision]
        finally:
            await store.close()
    with loopback_cluster(3) as cluster:
        run(body(cluster))


def test_a_hung_member_ends_the_watch_and_calls_move_on() -> None:
    """SIGSTOP: the member's sockets stay open and nothing answers, as behind a silent
    partition. gRPC keepalive ends the watch; deadlines move calls to the other members."""
    async def body(cluster: EtcdCluster) -> None:
        store = store_on(cluster, timeout_s=2.0)
        prefix = f"{unique_prefix()}/subnets/"
        try:
            stream = await running_watch(store, prefix)
            used = store.endpoint
            cluster.freeze_member(cluster.member_at(used).name)
            began = time.monotonic()
            with pytest.raises(StoreUnavailable, match="broke"):
                await asyncio.wait_for(anext(stream), 40)
            assert time.monotonic() - began < 30        # keepalive: 10 s idle + 5 s to answer
            began = time.monotonic()
            kv = await store.get(f"{prefix}a")           # one timeout, then another member
            assert kv is not None and kv.value == b"1" and store.endpoint != used
            assert time.monotonic() - began < 2.0 + 1.0
        finally:
            await store.close()
    with loopback_cluster(3) as cluster:
        run(body(cluster))


def test_unavailable_when_every_member_is_down_then_recovery() -> None:
    async def body(cluster: EtcdCluster) -> None:
        store = store_on(cluster, timeout_s=2.0)
        key = f"{unique_prefix()}/k"
        try:
            await store.put(key, b"kept")
            for member in cluster.members:
                cluster.kill_member(member.name)
            began = time.monotonic()
            with pytest.raises(StoreUnavailable) as caught:
                await store.get(key)
            assert time.monotonic() - began < 3 * 2.0 + 1
            for endpoint in cluster.endpoints:              # it tried every one of them
                assert endpoint in str(caught.value)
            assert store.stats["unavailable"] == 1
            cluster.restart_member("etcd2", wait=False)     # a quorum of two comes back
            cluster.restart_member("etcd3", wait=False)
            cluster.wait_healthy(["etcd2", "etcd3"])
            kv = await store.get(key)
            assert kv is not None and kv.value == b"kept"
            assert store.endpoint in (cluster.member("etcd2").client_url,
                                      cluster.member("etcd3").client_url)
        finally:
            await store.close()
    with loopback_cluster(3) as cluster:
        run(body(cluster))


@pytest.fixture
def silent_endpoint() -> Iterator[str]:
    """An endpoint that accepts TCP connections and never says a word (a hung server)."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        listener.close()


def test_every_call_is_bounded_and_a_hung_endpoint_is_passed_over(
        etcd: EtcdCluster, silent_endpoint: str) -> None:
    async def body() -> None:
        store = EtcdStore([silent_endpoint, *etcd.endpoints], timeout_s=1.0)
        lone = EtcdStore([silent_endpoint], timeout_s=1.0)
        key = f"{unique_prefix()}/k"
        try:
            began = time.monotonic()
            assert await store.get(key) is None              # a read moves on and succeeds
            assert time.monotonic() - began < 3.0
            assert store.endpoint == etcd.endpoints[0]
            began = time.monotonic()
            with pytest.raises(StoreUnavailable):
                await lone.put(key, b"x")
            assert time.monotonic() - began < 2.5
            with pytest.raises(StoreUnavailable):
                await anext(lone.watch_prefix(key, 1))
            assert time.monotonic() - began < 5.0
        finally:
            await store.close()
            await lone.close()
    run(body())


def test_a_timed_out_write_is_not_repeated_elsewhere(
        etcd: EtcdCluster, silent_endpoint: str) -> None:
    """It may have been applied; the caller re-reads. The next call uses the next endpoint."""
    async def body() -> None:
        store = EtcdStore([silent_endpoint, *etcd.endpoints], timeout_s=1.0)
        key = f"{unique_prefix()}/k"
        try:
            with pytest.raises(StoreUnavailable, match="deadline"):
                await store.create(key, b"x")
            assert store.endpoint == etcd.endpoints[0]
            assert await store.create(key, b"x") is not None
        finally:
            await store.close()
    run(body())


# -- configuration and TLS ----------------------------------------------------------------------

@pytest.mark.parametrize("endpoints, message", [
    ([], "no etcd endpoints"),
    (["127.0.0.1:2379"], "must look like http://HOST:PORT"),
    (["ftp://127.0.0.1:2379"], "must look like"),
    (["http://127.0.0.1:99999"], "bad port"),
    (["http://127.0.0.1:2379/v3"], "must not have a path"),
])
def test_bad_endpoints_are_refused_with_a_reason(endpoints: list[str], message: str) -> None:
    with pytest.raises(StoreError, match=message):
        EtcdStore(endpoints)


def test_tls_files_with_a_plain_endpoint_are_refused(tmp_path: Path) -> None:
    tls = make_tls(tmp_path)
    with pytest.raises(StoreError, match="http://"):
        EtcdStore(["http://127.0.0.1:2379"], ca_file=tls.ca_cert)
    with pytest.raises(StoreError, match="go together"):
        EtcdStore(["https://127.0.0.1:2379"], cert_file=tls.client_cert)
    with pytest.raises(StoreError, match="missing.pem"):
        EtcdStore(["https://127.0.0.1:2379"], ca_file=tmp_path / "missing.pem")
    (tmp_path / "junk.pem").write_text("not a certificate")
    with pytest.raises(StoreError, match="not a PEM file"):
        EtcdStore(["https://127.0.0.1:2379"], ca_file=tmp_path / "junk.pem")


def test_tls_with_client_certificates(tmp_path: Path) -> None:
    tls = make_tls(tmp_path)
    server_tls = EtcdTLS(tls.ca_cert, tls.server_cert, tls.server_key, client_cert_auth=True,
                         probe_cert_file=tls.client_cert, probe_key_file=tls.client_key)

    async def body(cluster: EtcdCluster) -> None:
        assert cluster.endpoints[0].startswith("https://")
        good = EtcdStore(cluster.endpoints, ca_file=tls.ca_cert, cert_file=tls.client_cert,
                         key_file=tls.client_key, timeout_s=3.0)
        no_cert = EtcdStore(cluster.endpoints, ca_file=tls.ca_cert, timeout_s=3.0)
        wrong_ca = EtcdStore(cluster.endpoints, ca_file=tls.other_ca_cert,
                             cert_file=tls.client_cert, key_file=tls.client_key, timeout_s=3.0)
        key = f"{unique_prefix()}/k"
        try:
            revision = await good.put(key, b"secret")
            kv = await good.get(key)
            assert kv is not None and kv.mod_revision == revision
            with pytest.raises(StoreUnavailable) as no_cert_error:
                await no_cert.get(key)
            with pytest.raises(StoreUnavailable) as wrong_ca_error:
                await wrong_ca.get(key)
            assert "TLS failed: check ca_file" in str(wrong_ca_error.value)
            assert "no client certificate was given" in str(no_cert_error.value)
        finally:
            for store in (good, no_cert, wrong_ca):
                await store.close()
    with loopback_cluster(1, tls=server_tls) as cluster:
        run(body(cluster))
