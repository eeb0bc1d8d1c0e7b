"""The etcd source of the subnet map (a MapSource, see control/map_source.py), flannel's schema.

One watcher follows everything under the prefix (``<prefix>/config`` and ``<prefix>/subnets/``),
so the network config and the leases arrive by the same list/watch/resync path
(control/etcd_watch.py). ``changes()`` runs the source:

1. wait until the network config is there and valid (each problem logged once and reported:
   /readyz says why), then claim this node's lease (control/etcd_lease.py), retrying with
   backoff while etcd is unreachable; the first item is yielded once the lease is held and the
   leases were listed;
2. after that, each change of the table rebuilds the map; renewals run when due; a lost lease
   is claimed back (same subnet only) while forwarding goes on with the map in force;
3. a config that turns invalid keeps the last valid one in force (reported as a problem); one
   that changes the network or backend is handed on, and the runtime refuses it (restart).

The map: this node as it holds its lease, plus every lease that parses, fits the network and
matches the backend. Any other key is skipped, counted by reason and logged once per revision:
never a crash, never a half-applied table. Node names are the lease keys' last segment
("10.5.1.0-24"), unique by construction.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import random
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from overlayd.control.config import EtcdSettings
from overlayd.control.etcd_lease import LeaseKeeper, NoFreeSubnet
from overlayd.control.etcd_watch import Backoff, Contact, LeaseWatcher
from overlayd.control.flannel_schema import (
    Lease,
    NetworkConfig,
    config_key,
    lease_json,
    parse_lease,
    parse_network_config,
    subnets_prefix,
)
from overlayd.control.problems import ConfigError, Problem
from overlayd.control.subnet_map import (
    DEFAULT_UNDERLAY_MTU,
    Backend,
    Node,
    SubnetMap,
    derive_vtep_mac,
)
from overlayd.io.store_protocol import KeyValue, MapStore, StoreError

log = logging.getLogger("overlayd")

CONFIG_RETRY_SECONDS = 5.0      # a missing/invalid config is looked at again this often anyway
LOST_RETRY_SECONDS = 5.0        # a lost lease is tried again this often
RENEW_RETRY_SECONDS = 10.0      # a renewal etcd did not answer is retried this often
RETRY_LOG_SECONDS = 60.0        # a problem that lasts is logged again this often


def node_name(subnet: ipaddress.IPv4Network) -> str:
    return f"{subnet.network_address}-{subnet.prefixlen}"


class EtcdMapSource:
    kind = "etcd"

    def __init__(self, store: MapStore, settings: EtcdSettings,
                 public_ip: ipaddress.IPv4Address, *,
                 previous_subnet: ipaddress.IPv4Network | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
                 rng: random.Random | None = None,
                 resync_seconds: float | None = None,
                 wireguard_public_key: Callable[[], str] | None = None) -> None:
        self.store, self.settings, self.public_ip = store, settings, public_ip
        # wireguard: our public key for the lease, asked for only on a wireguard network (it
        # may create the private key file)
        self.wireguard_public_key = wireguard_public_key
        self.previous_subnet = previous_subnet
        self.clock, self.sleep = clock, sleep
        self.rng = rng or random.Random()
        self.location = f"{','.join(settings.endpoints)} {settings.prefix}"
        self.node_name: str | None = None
        self.contact = Contact()
        extra = {} if resync_seconds is None else {"resync_seconds": resync_seconds}
        self.watcher = LeaseWatcher(store, settings.prefix + "/", self._on_change,
                                    contact=self.contact, clock=clock, sleep=sleep,
                                    rng=self.rng, **extra)
        self.network: NetworkConfig | None = None   # the valid config in force
        self.config_problem: str | None = "waiting for etcd"
        self.keeper: LeaseKeeper | None = None
        self.skipped: Counter[str] = Counter()      # bad keys by reason
        self._skip_seen: dict[str, int] = {}        # key -> revision already counted
        self._parsed: dict[str, tuple[int, Lease | None]] = {}   # key -> (revision, lease)
        self._config_rev = -1
        self._smap: SubnetMap | None = None
        self._yielded: SubnetMap | None = None      # the map the runtime was last told about
        self._whys: list[str] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._next_try = 0.0
        self._backoff = Backoff(self.rng)
        self._last_retry: tuple[str, float] = ("", 0.0)   # (message, when) last logged

    # -- MapSource ------------------------------------------------------------------------------

    def load(self) -> SubnetMap:
        if self._smap is None:
            raise ConfigError([Problem(self.location, "", self.config_problem or "no map yet")])
        return self._smap

    async def changes(self) -> AsyncIterator[str]:
        self._task = asyncio.get_running_loop().create_task(self.watcher.run())
        started = False
        while True:
            await self._step()
            smap, changed = self._smap, self._smap_changed()
            if smap is not None and (changed or not started):
                why = "; ".join(dict.fromkeys(self._whys)) or "etcd"
                self._whys = []
                if not started:
                    started = True
                    held = self.keeper.held if self.keeper else None
                    assert held is not None
                    why = f"etcd: lease {held.key} ({held.how}), {len(smap.nodes) - 1} peers"
                yield why
            await self._wait()

    def report(self) -> dict[str, Any]:
        now = self.clock()
        keeper = self.keeper
        held = keeper.held if keeper else None
        c = self.watcher.counters
        problems = []
        if self.config_problem:
            problems.append(f"etcd network config: {self.config_problem}")
        if keeper is not None and keeper.lost:
            problems.append(f"subnet lease lost ({keeper.lost}); still forwarding on "
                            f"{held.subnet if held else '?'}, claiming it back")
        elif keeper is not None and keeper.remaining(now) == 0.0:
            # etcd has been away longer than the TTL: it has most likely deleted the key.
            problems.append(f"subnet lease on {held.subnet if held else '?'} expired while "
                            "etcd was unreachable; still forwarding, claiming it back when "
                            "etcd answers")
        return {
            "endpoint": _endpoint(self.store),
            "reachable": self.contact.reachable,
            "last_contact_seconds": (None if self.contact.last_ok is None
                                     else round(now - self.contact.last_ok, 3)),
            "last_error": self.contact.last_error,
            "public_ip": str(self.public_ip),
            "lease": None if held is None else {
                "key": held.key, "subnet": str(held.subnet), "how": held.how,
                "reservation": held.lease_id == 0, "lost": keeper.lost if keeper else None,
                "remaining_seconds": (None if keeper is None or keeper.remaining(now) is None
                                      else round(keeper.remaining(now) or 0.0, 1)),
                "renewals": keeper.renewals if keeper else 0,
                "losses": keeper.losses if keeper else 0,
                "reacquired": keeper.reacquired if keeper else 0,
            },
            "revision": self.watcher.table.revision,
            "watch": {"lists": c.lists, "resumes": c.resumes,
                      "compaction_relists": c.compaction_relists, "reconnects": c.reconnects,
                      "resyncs": c.resyncs, "events": c.events},
            "skipped_keys": dict(self.skipped),
            "requests": dict(getattr(self.store, "stats", {})),   # by kind, as the store counts
            "problems": problems,
        }

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):   # closing anyway
                await self._task
        await self.store.close()

    # -- the work -------------------------------------------------------------------------------

    def _on_change(self, why: str) -> None:
        self._whys.append(why)
        self._wake.set()

    async def _wait(self) -> None:
        """Until the watcher changed the table, or the next timer (retry, renewal) is due."""
        if not self._wake.is_set():
            deadline = self._next_deadline()
            timeout = None if deadline is None else max(0.0, deadline - self.clock())
            try:
                await asyncio.wait_for(self._wake.wait(), timeout)
            except TimeoutError:
                pass
        self._wake.clear()
        await asyncio.sleep(0)     # a store that never suspends must not starve the loop

    def _next_deadline(self) -> float | None:
        times = [self._next_try] if self._next_try else []
        if self.keeper is not None and (due := self.keeper.renew_due_at()) is not None:
            times.append(due)
        return min(times) if times else None

    async def _step(self) -> None:
        if not self.watcher.listed:
            return
        self._read_config()
        if self.network is None:
            return
        now = self.clock()
        if self._next_try and now < self._next_try:
            return
        self._next_try = 0.0
        try:
            await self._keep_lease(now)
        except (NoFreeSubnet, ConfigError) as exc:
            self._retry_later(str(exc), CONFIG_RETRY_SECONDS)
        except StoreError as exc:
            self.contact.failed(str(exc) or type(exc).__name__)
            self._retry_later(str(exc) or type(exc).__name__, self._backoff.next())
            return
        self._backoff.reset()
        self._rebuild()

    def _retry_later(self, why: str, seconds: float) -> None:
        now = self.clock()
        # Said once, and again each minute it lasts: an outage is not a log flood.
        if why != self._last_retry[0] or now - self._last_retry[1] >= RETRY_LOG_SECONDS:
            log.warning("etcd: %s (retrying every few seconds)", why)
            self._last_retry = (why, now)
        self._next_try = now + seconds

    async def _keep_lease(self, now: float) -> None:
        assert self.network is not None
        keeper = self.keeper
        if keeper is None:
            keeper = LeaseKeeper(self.store, self.settings.prefix, self.network, self.public_ip,
                                 self._lease_value(self.network), self.settings.lease_ttl_seconds,
                                 previous_subnet=self.previous_subnet, clock=self.clock,
                                 rng=self.rng)
            claimed = await keeper.acquire()
            self.contact.ok(self.clock())
            self.keeper = keeper
            self.node_name = node_name(claimed.subnet)
            log.info("etcd: subnet %s (%s), lease %s", claimed.subnet, claimed.how,
                     "reservation, no TTL" if claimed.lease_id == 0
                     else f"TTL {self.settings.lease_ttl_seconds} s")
            return
        held = keeper.held
        assert held is not None
        table = self.watcher.table
        # Only a table that has seen our last write can tell us the key is gone or changed.
        if table.revision >= held.mod_revision and keeper.observe(table.entries.get(held.key)):
            log.error("etcd: lease on %s lost (%s); still forwarding on it, claiming it back",
                      held.subnet, keeper.lost)
        if keeper.lost is not None:
            if await keeper.reacquire():
                log.warning("etcd: lease on %s claimed back (%s)", held.subnet, held.how)
            else:
                self._retry_later(f"lease on {held.subnet} still lost ({keeper.lost}); "
                                  "forwarding goes on", LOST_RETRY_SECONDS)
            self.contact.ok(self.clock())
            return
        due = keeper.renew_due_at()
        if due is not None and now >= due:
            try:
                renewed = await keeper.renew()
            except StoreError:
                self._next_try = self.clock() + RENEW_RETRY_SECONDS
                raise
            self.contact.ok(self.clock())
            if renewed:
                log.info("etcd: lease on %s renewed for %d s", held.subnet,
                         self.settings.lease_ttl_seconds)
            else:
                log.error("etcd: renewing %s failed: lease lost (%s); claiming it back",
                          held.subnet, keeper.lost)
                self._next_try = self.clock()

    def _lease_value(self, network: NetworkConfig) -> bytes:
        if network.backend_type == "vxlan":
            return lease_json(self.public_ip, "vxlan", vni=network.vni,
                              vtep_mac=derive_vtep_mac(self.public_ip, network.vni))
        if network.backend_type == "wireguard":
            return lease_json(self.public_ip, "wireguard", public_key=self._own_public_key(),
                              port=network.port)
        return lease_json(self.public_ip, "")     # what flannel's udp backend writes

    def _own_public_key(self) -> str:
        if self.wireguard_public_key is None:
            raise ConfigError([Problem(self.location, "Backend.Type",
                                       "wireguard, but this daemon has no WireGuard key")])
        return self.wireguard_public_key()

    def _read_config(self) -> None:
        key = config_key(self.settings.prefix)
        kv = self.watcher.table.entries.get(key)
        rev = kv.mod_revision if kv is not None else 0
        if rev == self._config_rev:
            return
        self._config_rev = rev
        if kv is None:
            problem = f"{key} is missing (write it with `overlayd net init`)"
        else:
            try:
                parsed = parse_network_config(kv.value, key)
            except ConfigError as exc:
                problem = "; ".join(str(p) for p in exc.problems)
                self._count_skip(key, rev, _reason(exc, "config"))
            else:
                if self.network is not None and parsed != self.network:
                    log.warning("etcd: network config changed to %s /%d %s",
                                parsed.network, parsed.subnet_len, parsed.backend_type)
                self.network, self.config_problem = parsed, None
                self._whys.append("etcd: network config")
                return
        self.config_problem = problem
        log.error("etcd: %s%s", problem, "; keeping the last valid config" if self.network
                  else "; waiting for a valid one")

    def _rebuild(self) -> None:
        network, keeper = self.network, self.keeper
        if network is None or keeper is None or keeper.held is None:
            return
        held = keeper.held
        backend = Backend(network.backend_type, network.port, network.vni, network.mode)
        me = Node(node_name(held.subnet), held.subnet, self.public_ip,
                  held.subnet.network_address, None, (),
                  derive_vtep_mac(self.public_ip, network.vni)
                  if network.backend_type == "vxlan" else "",
                  self._own_public_key() if network.backend_type == "wireguard" else "")
        nodes, ips = [me], {self.public_ip}
        subnets = subnets_prefix(self.settings.prefix)
        leases = sorted((kv for key, kv in self.watcher.table.entries.items()
                         if key.startswith(subnets) and key != held.key),
                        key=lambda kv: kv.create_revision)
        for kv in leases:
            node = self._peer(kv, network, ips)
            if node is not None:
                nodes.append(node)
                ips.add(node.public_ip)
        nodes.sort(key=lambda n: int(n.subnet.network_address))
        live = self.watcher.table.entries
        self._parsed = {k: v for k, v in self._parsed.items() if k in live}
        self._smap = SubnetMap(network.network, network.subnet_len, backend,
                               DEFAULT_UNDERLAY_MTU, tuple(nodes))

    def _peer(self, kv: KeyValue, network: NetworkConfig,
              ips: set[ipaddress.IPv4Address]) -> Node | None:
        lease = self._parsed_lease(kv)
        if lease is None:
            return None
        reason = _misfit(lease, network, ips)
        if reason is not None:
            self._count_skip(kv.key, kv.mod_revision, reason[0], reason[1])
            return None
        vtep = ""
        if network.backend_type == "vxlan":
            vtep = lease.vtep_mac or derive_vtep_mac(lease.public_ip, network.vni)
        return Node(node_name(lease.subnet), lease.subnet, lease.public_ip,
                    lease.subnet.network_address, None, (), vtep, lease.public_key or "",
                    lease.port)

    def _parsed_lease(self, kv: KeyValue) -> Lease | None:
        """Parsed once per (key, revision): a change of one lease re-parses that one only."""
        cached = self._parsed.get(kv.key)
        if cached is not None and cached[0] == kv.mod_revision:
            return cached[1]
        try:
            lease: Lease | None = parse_lease(kv.key, kv.value)
        except ConfigError as exc:
            self._count_skip(kv.key, kv.mod_revision, _reason(exc, "lease"), str(exc))
            lease = None
        self._parsed[kv.key] = (kv.mod_revision, lease)
        return lease

    def _count_skip(self, key: str, revision: int, reason: str, detail: str = "") -> None:
        if self._skip_seen.get(key) == revision:
            return
        self._skip_seen[key] = revision
        self.skipped[reason] += 1
        if detail:
            log.warning("etcd: skipping %s (%s): %s", key, reason, detail)

    def _smap_changed(self) -> bool:
        new, old = self._smap, self._yielded
        self._yielded = new
        return new is not None and old is not None and new != old


def _misfit(lease: Lease, network: NetworkConfig,
            ips: set[ipaddress.IPv4Address]) -> tuple[str, str] | None:
    if lease.subnet.prefixlen != network.subnet_len:
        return "wrong_subnet_len", (f"/{lease.subnet.prefixlen}, the network's is " \
                                   f"/{network.subnet_len}")
    if not lease.subnet.subnet_of(network.network):
        return "outside_network", f"{lease.subnet} is outside {network.network}"
    kind = lease.backend_type or "udp"
    if kind != network.backend_type:
        return "backend_mismatch", f"backend {kind}, the network's is {network.backend_type}"
    if lease.public_ip in ips:
        return "duplicate_public_ip", f"{lease.public_ip} already holds another lease"
    return None


def _reason(exc: ConfigError, what: str) -> str:
    text = str(exc)
    if "not JSON" in text or "must be a JSON object" in text:
        return f"{what}_not_json"
    if "is not a subnet key" in text:
        return "bad_key"
    return f"{what}_invalid"


def _endpoint(store: MapStore) -> str | None:
    try:
        return store.endpoint
    except Exception:  # noqa: BLE001 - a report must never fail
        return None
