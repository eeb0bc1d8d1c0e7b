"""MapStore on a real etcd v3 cluster: endpoint failover, bounded calls, TLS, honest watches.

Built on aetcd 1.0's generated etcd v3 gRPC stubs (``aetcd.rpc``), not on its ``Client``: that
client opens only plaintext channels, hands watch events over one by one (losing the response
header and the batch a revision's events came in) and ignores a watch that etcd cancels. Here:

- Endpoints are tried round robin: the store talks to one at a time and moves to the next when
  that one does not answer (unreachable, refused, timed out, or without a raft leader). A call
  fails with StoreUnavailable only after every endpoint was tried once. Moving on closes the old
  channel, so a watch still open on it ends with StoreUnavailable and its caller resumes on the
  new endpoint from its last revision + 1.
- Every RPC carries a deadline (``timeout_s``). A failed call is sent to the next endpoint,
  except a write whose deadline passed: that one raises StoreUnavailable at once, so a hung
  endpoint costs a write one timeout, and the next call goes to the next endpoint.
- A write that failed on one endpoint may still have been applied there (a member dying between
  commit and answer, etcd's "request timed out"), so a resent conditional write can answer
  "not applied" (None, False) for a change that is in fact ours, and a timed-out one raises
  without knowing. Either way the caller re-reads the key and compares the value; the compare
  on revision guarantees a resend never overwrites anyone else's write.
- ``last_contact`` is the time.time() of the last answer from etcd (None before the first), for
  "unreachable since" in status and metrics; ``stats`` counts requests by kind, errors,
  failovers and calls that found no endpoint.
- ``watch_prefix`` yields each watch response's events as one batch, raises CompactedError when
  etcd reports the start revision compacted, StoreUnavailable when the stream breaks or etcd
  cancels it, and never reconnects by itself. Watches ask etcd to require a leader, so a member
  cut off from its cluster ends the watch instead of going silent.
- https:// endpoints use TLS: ca_file verifies the server (system roots without it), cert_file
  and key_file are the client certificate for etcd's --client-cert-auth.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import grpc
from aetcd import rpc
from aetcd.utils import prefix_range_end

from overlayd.io.store_protocol import (
    CompactedError,
    KeyValue,
    StoreError,
    StoreUnavailable,
    WatchEvent,
)

T = TypeVar("T")

DEFAULT_TIMEOUT_S = 5.0
# Codes that mean "this endpoint cannot serve us now" (as opposed to "the request is wrong"):
# down or refused (UNAVAILABLE, also etcd's "no leader"), or too slow (DEADLINE_EXCEEDED).
_ENDPOINT_DOWN = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
                  grpc.StatusCode.CANCELLED}
# etcd's answers are large when the map is (1,000 leases is ~200 kB); gRPC's default cap is 4 MiB.
_CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    # Notice a dead connection under an idle watch within ~15 s. etcd refuses pings more often
    # than every 5 s (--grpc-keepalive-min-time) and any ping without an open call.
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    # gRPC 1.6x+ times every ping by this one (default 60 s), the keepalive ping included.
    ("grpc.http2.ping_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 0),
    # An idle watch sends no data, yet needs its pings: no cap on their number, and no 5 min
    # minimum interval between them (gRPC's defaults for a connection without data).
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.http2.min_sent_ping_interval_without_data_ms", 10_000),
    # Fail a call on a dead endpoint at once instead of queueing it behind gRPC's reconnects.
    ("grpc.enable_retries", 0),
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 2_000),
]
_REQUIRE_LEADER = (("hasleader", "true"),)   # etcd's rpctypes.MetadataRequireLeaderKey
STAT_KEYS = ("get", "list", "txn", "put", "delete", "lease_grant", "lease_ttl", "lease_revoke",
             "compact", "status", "watch", "watch_events", "errors", "failovers", "unavailable")


class EtcdStore:
    """A MapStore on etcd (see overlayd.io.store_protocol); use it from one event loop."""

    def __init__(self, endpoints: list[str], *, ca_file: str | Path | None = None,
                 cert_file: str | Path | None = None, key_file: str | Path | None = None,
                 timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        if not endpoints:
            raise StoreError("no etcd endpoints given")
        if (cert_file is None) != (key_file is None):
            raise StoreError("cert_file and key_file go together (the client certificate "
                             "and its private key)")
        if timeout_s <= 0:
            raise StoreError(f"timeout {timeout_s} must be positive")
        self._endpoints = [_split_endpoint(url) for url in endpoints]
        tls_files = [f for f in (ca_file, cert_file, key_file) if f is not None]
        plain = [url for url, _, secure in self._endpoints if not secure]
        if tls_files and plain:
            raise StoreError(f"TLS files are given but {plain[0]} is http://; use https:// "
                             f"endpoints (a TLS setting must never be silently ignored)")
        self._credentials = (_credentials(ca_file, cert_file, key_file)
                             if any(secure for _, _, secure in self._endpoints) else None)
        self._client_cert = cert_file is not None
        self.timeout_s = timeout_s
        self._index = 0
        self._channel: grpc.aio.Channel | None = None
        self._kv: Any = None
        self._lease: Any = None
        self._watch: Any = None
        self._maintenance: Any = None
        self.stats: dict[str, int] = dict.fromkeys(STAT_KEYS, 0)
        self.last_contact: float | None = None   # time.time() of the last answered call

    # -- endpoints and channels ---------------------------------------------------------------

    @property
    def endpoint(self) -> str:
        return self._endpoints[self._index][0]

    @property
    def endpoints(self) -> list[str]:
        return [url for url, _, _ in self._endpoints]

    def _open(self) -> None:
        if self._channel is not None:
            return
        _, target, secure = self._endpoints[self._index]
        if secure:
            assert self._credentials is not None
            self._channel = grpc.aio.secure_channel(target, self._credentials, _CHANNEL_OPTIONS)
        else:
            self._channel = grpc.aio.insecure_channel(target, _CHANNEL_OPTIONS)
        self._kv = rpc.KVStub(self._channel)
        self._lease = rpc.LeaseStub(self._channel)
        self._watch = rpc.WatchStub(self._channel)
        self._maintenance = rpc.MaintenanceStub(self._channel)

    async def _fail_over(self, failed_index: int) -> None:
        """Leave the endpoint at failed_index (if still current) for the next one."""
        if failed_index != self._index:
            return                       # a concurrent call already moved on
        channel, self._channel = self._channel, None
        self._index = (self._index + 1) % len(self._endpoints)
        if len(self._endpoints) > 1:
            self.stats["failovers"] += 1
        if channel is not None:
            await channel.close()

    async def _call(self, kind: str, request: Callable[[], Awaitable[T]], *,
                    idempotent: bool = True) -> T:
        """Run one RPC on the current endpoint, moving on to the next while endpoints are down."""
        self.stats[kind] += 1
        failures: list[str] = []
        for _ in range(len(self._endpoints)):
            index = self._index
            self._open()
            try:
                answer = await request()
            except asyncio.CancelledError:
                if _we_are_cancelled():
                    raise
                # Our channel was closed under us: a concurrent call moved to another endpoint.
                failures.append(f"{self._endpoints[index][0]}: left for another endpoint")
                continue
            except grpc.aio.AioRpcError as exc:
                if exc.code() not in _ENDPOINT_DOWN:
                    self.stats["errors"] += 1
                    raise StoreError(f"etcd {self.endpoint} refused {kind}: "
                                     f"{_describe(exc, self._client_cert)}") from None
                where = self._endpoints[index][0]
                failures.append(f"{where}: {_describe(exc, self._client_cert)}")
                await self._fail_over(index)
                if not idempotent and exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                    failures[-1] += " (the write may have been applied)"
                    break                # a hung endpoint: keep the call within one timeout
                continue
            self.last_contact = time.time()
            return answer
        self.stats["unavailable"] += 1
        raise StoreUnavailable(f"etcd unavailable for {kind}: " + "; ".join(failures))

    # -- reads --------------------------------------------------------------------------------

    async def get(self, key: str) -> KeyValue | None:
        request = rpc.RangeRequest(key=key.encode())
        answer = await self._call("get", lambda: self._kv.Range(request, timeout=self.timeout_s))
        return _key_value(answer.kvs[0]) if answer.kvs else None

    async def list_prefix(self, prefix: str) -> tuple[list[KeyValue], int]:
        start = prefix.encode()
        request = rpc.RangeRequest(key=start, range_end=prefix_range_end(start))
        answer = await self._call("list", lambda: self._kv.Range(request, timeout=self.timeout_s))
        return [_key_value(kv) for kv in answer.kvs], answer.header.revision

    # -- writes -------------------------------------------------------------------------------

    async def create(self, key: str, value: bytes, lease: int = 0) -> int | None:
        compare = rpc.Compare(result=rpc.Compare.EQUAL, target=rpc.Compare.CREATE,
                              key=key.encode(), create_revision=0)
        return await self._put_if(compare, key, value, lease)

    async def put_if_revision(self, key: str, value: bytes, mod_revision: int,
                              lease: int = 0) -> int | None:
        compare = rpc.Compare(result=rpc.Compare.EQUAL, target=rpc.Compare.MOD,
                              key=key.encode(), mod_revision=mod_revision)
        return await self._put_if(compare, key, value, lease)

    async def delete_if_revision(self, key: str, mod_revision: int) -> bool:
        compare = rpc.Compare(result=rpc.Compare.EQUAL, target=rpc.Compare.MOD,
                              key=key.encode(), mod_revision=mod_revision)
        op = rpc.RequestOp(request_delete_range=rpc.DeleteRangeRequest(key=key.encode()))
        answer = await self._txn(compare, op)
        return bool(answer.succeeded and answer.responses[0].response_delete_range.deleted)

    async def put(self, key: str, value: bytes, lease: int = 0) -> int:
        request = rpc.PutRequest(key=key.encode(), value=value, lease=lease)
        answer = await self._call("put", lambda: self._kv.Put(request, timeout=self.timeout_s),
                                  idempotent=False)
        return int(answer.header.revision)

    async def delete(self, key: str) -> bool:
        request = rpc.DeleteRangeRequest(key=key.encode())
        answer = await self._call(
            "delete", lambda: self._kv.DeleteRange(request, timeout=self.timeout_s),
            idempotent=False)
        return bool(answer.deleted)

    async def _put_if(self, compare: Any, key: str, value: bytes, lease: int) -> int | None:
        op = rpc.RequestOp(request_put=rpc.PutRequest(key=key.encode(), value=value, lease=lease))
        answer = await self._txn(compare, op)
        # A transaction's writes all carry the revision in its header.
        return int(answer.header.revision) if answer.succeeded else None

    async def _txn(self, compare: Any, op: Any) -> Any:
        request = rpc.TxnRequest(compare=[compare], success=[op], failure=[])
        return await self._call("txn", lambda: self._kv.Txn(request, timeout=self.timeout_s),
                                idempotent=False)

    # -- leases -------------------------------------------------------------------------------

    async def grant_lease(self, ttl_seconds: int) -> int:
        request = rpc.LeaseGrantRequest(TTL=ttl_seconds, ID=0)
        answer = await self._call(
            "lease_grant", lambda: self._lease.LeaseGrant(request, timeout=self.timeout_s),
            idempotent=False)
        if answer.error:
            raise StoreError(f"etcd {self.endpoint} granted no lease: {answer.error}")
        return int(answer.ID)

    async def lease_ttl(self, lease_id: int) -> int:
        request = rpc.LeaseTimeToLiveRequest(ID=lease_id, keys=False)
        answer = await self._call(
            "lease_ttl", lambda: self._lease.LeaseTimeToLive(request, timeout=self.timeout_s))
        return int(answer.TTL)           # etcd answers -1 for a lease that expired or never was

    async def revoke_lease(self, lease_id: int) -> None:
        request = rpc.LeaseRevokeRequest(ID=lease_id)
        try:
            await self._call(
                "lease_revoke", lambda: self._lease.LeaseRevoke(request, timeout=self.timeout_s))
        except StoreError as exc:
            if "lease not found" not in str(exc):   # already gone is what revoking wants
                raise

    # -- watch --------------------------------------------------------------------------------

    async def watch_prefix(self, prefix: str,
                           start_revision: int) -> AsyncIterator[list[WatchEvent]]:
        start = prefix.encode()
        create = rpc.WatchCreateRequest(key=start, range_end=prefix_range_end(start),
                                        start_revision=start_revision)
        stream = await self._call("watch", lambda: self._start_watch(create))
        where = self.endpoint
        try:
            while True:
                try:
                    answer = await stream.read()
                except asyncio.CancelledError:
                    if _we_are_cancelled():
                        raise
                    raise StoreUnavailable(f"watch on {where} ended: the store moved to "
                                           f"another endpoint") from None
                except grpc.aio.AioRpcError as exc:
                    raise StoreUnavailable(f"watch on {where} broke: "
                                           f"{_describe(exc, self._client_cert)}") from None
                if answer is grpc.aio.EOF:
                    raise StoreUnavailable(f"watch on {where} ended")
                _check_watch_answer(answer)
                self.last_contact = time.time()
                if answer.events:
                    self.stats["watch_events"] += len(answer.events)
                    yield [_watch_event(event) for event in answer.events]
        finally:
            stream.cancel()

    async def _start_watch(self, create: Any) -> Any:
        """Open a watch stream and wait (bounded) for etcd to confirm it was created."""
        stream = self._watch.Watch(metadata=_REQUIRE_LEADER)
        try:
            # Both steps wait on the connection, which gRPC alone would give ~20 s to come up.
            async with asyncio.timeout(self.timeout_s):
                await stream.write(rpc.WatchRequest(create_request=create))
                answer = await stream.read()
        except TimeoutError:
            stream.cancel()
            raise _deadline_error() from None
        except BaseException:
            stream.cancel()
            raise
        if answer is grpc.aio.EOF:
            stream.cancel()
            raise StoreUnavailable(f"watch on {self.endpoint} ended before it started")
        try:
            _check_watch_answer(answer)
        except StoreError:
            stream.cancel()
            raise
        return stream

    # -- maintenance --------------------------------------------------------------------------

    async def compact(self, revision: int) -> None:
        request = rpc.CompactionRequest(revision=revision, physical=True)
        await self._call("compact", lambda: self._kv.Compact(request, timeout=self.timeout_s))

    async def status(self) -> dict[str, object]:
        request = rpc.StatusRequest()
        answer = await self._call(
            "status", lambda: self._maintenance.Status(request, timeout=self.timeout_s))
        return {"endpoint": self.endpoint, "version": answer.version,
                "revision": int(answer.header.revision), "member_id": int(answer.header.member_id),
                "leader": int(answer.leader), "raft_term": int(answer.raftTerm),
                "db_size": int(answer.dbSize)}

    async def close(self) -> None:
        channel, self._channel = self._channel, None
        if channel is not None:
            await channel.close()


# -- conversions ------------------------------------------------------------------------------

def _split_endpoint(url: str) -> tuple[str, str, bool]:
    """(url as given, gRPC target host:port, TLS?) of one endpoint URL."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise StoreError(f"etcd endpoint {url!r} must look like http://HOST:PORT or "
                         f"https://HOST:PORT")
    try:
        port = parts.port or 2379
    except ValueError:
        raise StoreError(f"etcd endpoint {url!r} has a bad port") from None
    if parts.path not in ("", "/"):
        raise StoreError(f"etcd endpoint {url!r} must not have a path")
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    return url, f"{host}:{port}", parts.scheme == "https"


def _credentials(ca_file: str | Path | None, cert_file: str | Path | None,
                 key_file: str | Path | None) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(root_certificates=_read(ca_file, "ca_file"),
                                        private_key=_read(key_file, "key_file"),
                                        certificate_chain=_read(cert_file, "cert_file"))


def _read(path: str | Path | None, what: str) -> bytes | None:
    if path is None:
        return None
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise StoreError(f"{what} {path}: {exc.strerror or exc}") from None
    if b"-----BEGIN " not in data:
        raise StoreError(f"{what} {path}: not a PEM file")
    return data


_TLS_FAILURES = ("handshake", "ssl", "certificate", "tsi_", "unwrap failed")


def _describe(exc: grpc.aio.AioRpcError, has_client_cert: bool) -> str:
    details = (exc.details() or "").strip()
    text = f"{exc.code().name.lower()}: {details}" if details else exc.code().name.lower()
    if any(word in details.lower() for word in _TLS_FAILURES):
        # With TLS 1.3 a server refusing our certificate (or its absence) shows only as a
        # broken stream after the handshake, so the raw text rarely says what happened.
        text += " (TLS failed: check ca_file against the server's certificate"
        text += ", and cert_file/key_file against etcd's --trusted-ca-file)" if has_client_cert \
            else "; no client certificate was given, which etcd's --client-cert-auth requires)"
    return text


def _we_are_cancelled() -> bool:
    """Whether the running task itself is being cancelled (gRPC raises CancelledError also for
    a call whose channel we closed, which must not pass for the caller's cancellation)."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


def _deadline_error() -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(grpc.StatusCode.DEADLINE_EXCEEDED, grpc.aio.Metadata(),
                                grpc.aio.Metadata(), details="watch was not created in time")


def _check_watch_answer(answer: Any) -> None:
    if answer.compact_revision:
        raise CompactedError(int(answer.compact_revision))
    if answer.canceled:
        reason = answer.cancel_reason or "no reason given"
        raise StoreUnavailable(f"etcd canceled the watch: {reason}")


def _key_value(kv: Any) -> KeyValue:
    return KeyValue(key=kv.key.decode(errors="replace"), value=bytes(kv.value),
                    create_revision=int(kv.create_revision), mod_revision=int(kv.mod_revision),
                    lease=int(kv.lease))


def _watch_event(event: Any) -> WatchEvent:
    if event.type == rpc.Event.DELETE:
        return WatchEvent("delete", _key_value(event.kv))
    return WatchEvent("put", _key_value(event.kv))
