"""This node's subnet lease in etcd, in flannel's schema: claim, renew, notice a loss, win it back.

1. claim (``acquire``), in flannel's order: a lease that already names our public IP (reattached
   to a fresh etcd lease by compare-on-revision; a reservation, TTL 0, is used as it is and
   never expires); else the subnet of our previous subnet.env if nobody holds it; else a random
   free subnet between SubnetMin and SubnetMax. New keys are written with a create-only
   transaction, so two nodes racing for one subnet cannot both win; the loser re-lists and
   tries another;
2. renew (``renew``) well before expiry (flannel's margin: an hour before; half the TTL for
   short TTLs): grant a new etcd lease and move the key onto it *only if the key's revision is
   still the one we wrote* -- unlike flannel's unconditional put, a node never overwrites a
   lease someone else holds now;
3. lost (the key was deleted or expired, or someone else wrote it): ``reacquire`` claims the
   same subnet again if it is free; the caller keeps forwarding on it meanwhile and says so.
   The subnet never changes while the daemon runs: the device carries it.

Time (``clock``: monotonic seconds) and randomness (``rng``) are passed in.
"""

from __future__ import annotations

import ipaddress
import random
import time
from collections.abc import Callable
from dataclasses import dataclass

from overlayd.control.flannel_schema import (
    NetworkConfig,
    parse_lease,
    parse_subnet_key,
    subnet_key,
    subnets_prefix,
)
from overlayd.control.problems import ConfigError
from overlayd.io.store_protocol import KeyValue, MapStore, StoreError

RENEW_MARGIN_SECONDS = 3600.0   # flannel renews an hour before expiry
CLAIM_ATTEMPTS = 10             # create-only races lost in a row before giving up for now
RANDOM_PROBES = 64              # random picks before scanning for a free subnet


class NoFreeSubnet(StoreError):
    """Every subnet between SubnetMin and SubnetMax is taken (or reserved)."""


@dataclass
class HeldLease:
    subnet: ipaddress.IPv4Network
    key: str
    mod_revision: int             # of our last write: renewals compare on it
    lease_id: int                 # 0: a reservation (no etcd lease, never expires)
    expires_at: float | None      # monotonic; None for a reservation
    how: str                      # "reused", "previous subnet.env", "claimed", "reservation"


def renew_after(ttl: float) -> float:
    """Seconds after a grant when the lease is renewed: an hour before expiry, or at half."""
    return ttl - min(RENEW_MARGIN_SECONDS, ttl / 2)


class LeaseKeeper:
    def __init__(self, store: MapStore, prefix: str, network: NetworkConfig,
                 public_ip: ipaddress.IPv4Address, value: bytes, ttl_seconds: int, *,
                 previous_subnet: ipaddress.IPv4Network | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 rng: random.Random | None = None) -> None:
        self.store, self.prefix, self.network = store, prefix, network
        self.public_ip, self.value, self.ttl = public_ip, value, ttl_seconds
        self.previous_subnet = previous_subnet
        self.clock = clock
        self.rng = rng or random.Random()
        self.held: HeldLease | None = None
        self.lost: str | None = None         # why the lease is not held any more (None: held)
        self.renewals = 0
        self.losses = 0
        self.reacquired = 0

    # -- 1. claim ------------------------------------------------------------------------------

    async def acquire(self) -> HeldLease:
        """Claim a subnet (see the module docstring); StoreError if etcd fails, NoFreeSubnet."""
        for _ in range(CLAIM_ATTEMPTS):
            kvs, _rev = await self.store.list_prefix(subnets_prefix(self.prefix))
            taken: set[ipaddress.IPv4Network] = set()
            own: list[tuple[KeyValue, ipaddress.IPv4Network]] = []
            for kv in kvs:
                try:
                    lease = parse_lease(kv.key, kv.value)
                except ConfigError:
                    continue          # a garbage value does not stop its key being taken
                finally:
                    taken.update(_subnet_of(kv.key))
                if lease.public_ip == self.public_ip and self.in_range(lease.subnet):
                    own.append((kv, lease.subnet))
            if own:
                # A reservation first (an operator pinned us), else the most recent of ours.
                kv, subnet = max(own, key=lambda o: (o[0].lease == 0, o[0].mod_revision))
                held = await self._reuse(kv, subnet)
                if held is not None:
                    return held
                continue
            for subnet, how in self._candidates(taken):
                held = await self._create(subnet, how)
                if held is not None:
                    return held
        raise StoreError(f"lost the race for a free subnet {CLAIM_ATTEMPTS} times in a row")

    def in_range(self, subnet: ipaddress.IPv4Network) -> bool:
        n = self.network
        return (subnet.prefixlen == n.subnet_len and subnet.subnet_of(n.network)
                and n.subnet_min <= subnet.network_address <= n.subnet_max)

    async def _reuse(self, kv: KeyValue, subnet: ipaddress.IPv4Network) -> HeldLease | None:
        if kv.lease == 0:      # a reservation: ours for good; refresh its value if it differs
            rev = kv.mod_revision
            if kv.value != self.value:
                got = await self.store.put_if_revision(kv.key, self.value, kv.mod_revision, 0)
                if got is None:
                    return None
                rev = got
            self.held = HeldLease(subnet, kv.key, rev, 0, None, "reservation")
            return self.held
        lease_id = await self.store.grant_lease(self.ttl)
        granted = self.clock()
        moved = await self.store.put_if_revision(kv.key, self.value, kv.mod_revision, lease_id)
        if moved is None:
            await self._revoke(lease_id)
            return None
        await self._revoke(kv.lease)           # our previous run's etcd lease: nothing else on it
        self.held = HeldLease(subnet, kv.key, moved, lease_id, granted + self.ttl, "reused")
        return self.held

    def _candidates(self, taken: set[ipaddress.IPv4Network]
                    ) -> list[tuple[ipaddress.IPv4Network, str]]:
        out: list[tuple[ipaddress.IPv4Network, str]] = []
        prev = self.previous_subnet
        if prev is not None and self.in_range(prev) and prev not in taken:
            out.append((prev, "previous subnet.env"))
        free = self._random_free(taken)
        if free is not None and free != prev:
            out.append((free, "claimed"))
        if not out:
            raise NoFreeSubnet(f"no free /{self.network.subnet_len} between "
                               f"{self.network.subnet_min} and {self.network.subnet_max}")
        return out

    def _random_free(self, taken: set[ipaddress.IPv4Network]) -> ipaddress.IPv4Network | None:
        n = self.network
        size = 1 << (32 - n.subnet_len)
        low, count = int(n.subnet_min), (int(n.subnet_max) - int(n.subnet_min)) // size + 1

        def at(i: int) -> ipaddress.IPv4Network:
            return ipaddress.IPv4Network((low + i * size, n.subnet_len))

        for _ in range(RANDOM_PROBES):
            subnet = at(self.rng.randrange(count))
            if subnet not in taken:
                return subnet
        start = self.rng.randrange(count)     # nearly full: scan from a random place
        for j in range(count):
            subnet = at((start + j) % count)
            if subnet not in taken:
                return subnet
        return None

    async def _create(self, subnet: ipaddress.IPv4Network, how: str) -> HeldLease | None:
        key = subnet_key(subnet, self.prefix)
        lease_id = await self.store.grant_lease(self.ttl)
        granted = self.clock()
        rev = await self.store.create(key, self.value, lease_id)
        if rev is None:
            await self._revoke(lease_id)
            return None
        self.held = HeldLease(subnet, key, rev, lease_id, granted + self.ttl, how)
        self.lost = None
        return self.held

    async def _revoke(self, lease_id: int) -> None:
        if lease_id:
            try:
                await self.store.revoke_lease(lease_id)
            except StoreError:
                pass     # it expires by itself; nothing else is attached to it

    # -- 2. renew ------------------------------------------------------------------------------

    def remaining(self, now: float) -> float | None:
        """Seconds until the lease expires; None for a reservation or nothing held."""
        if self.held is None or self.held.expires_at is None:
            return None
        return max(0.0, self.held.expires_at - now)

    def renew_due_at(self) -> float | None:
        held = self.held
        if held is None or held.expires_at is None or self.lost is not None:
            return None
        return held.expires_at - self.ttl + renew_after(self.ttl)

    async def renew(self) -> bool:
        """Move our key onto a fresh etcd lease if it is still ours; False if it was lost."""
        held = self.held
        assert held is not None
        lease_id = await self.store.grant_lease(self.ttl)
        granted = self.clock()
        rev = await self.store.put_if_revision(held.key, self.value, held.mod_revision, lease_id)
        if rev is None:
            await self._revoke(lease_id)
            current = await self.store.get(held.key)
            if current is not None and self._is_ours(current):
                # Rewritten with our own attributes (an operator, or our write whose answer was
                # lost): adopt its revision and renew again.
                held.mod_revision = current.mod_revision
                return await self.renew()
            self.mark_lost("the key was deleted or expired" if current is None
                           else f"now held by {_holder(current)}")
            return False
        await self._revoke(held.lease_id)
        held.mod_revision, held.lease_id, held.expires_at = rev, lease_id, granted + self.ttl
        self.renewals += 1
        return True

    # -- 3. lost -------------------------------------------------------------------------------

    def observe(self, kv: KeyValue | None) -> bool:
        """What the watch says our key is now; True if that means the lease was just lost."""
        held = self.held
        if held is None or self.lost is not None:
            return False
        if kv is None:
            self.mark_lost("the key was deleted or expired")
            return True
        if kv.mod_revision > held.mod_revision and not self._is_ours(kv):
            self.mark_lost(f"now held by {_holder(kv)}")
            return True
        held.mod_revision = max(held.mod_revision, kv.mod_revision)     # rewritten with our attributes: still ours
        return False

    def mark_lost(self, why: str) -> None:
        self.lost = why
        self.losses += 1

    async def reacquire(self) -> bool:
        """Claim the same subnet again if it is free (or names us); never another one."""
        held = self.held
        assert held is not None and self.lost is not None
        current = await self.store.get(held.key)
        if current is not None:
            if not self._is_ours(current):
                self.lost = f"now held by {_holder(current)}"
                return False
            got = await self._reuse(current, held.subnet)
        else:
            got = await self._create(held.subnet, held.how)
        if got is None:
            return False
        self.lost = None
        self.reacquired += 1
        return True

    def _is_ours(self, kv: KeyValue) -> bool:
        try:
            return parse_lease(kv.key, kv.value).public_ip == self.public_ip
        except ConfigError:
            return False


def _subnet_of(key: str) -> list[ipaddress.IPv4Network]:
    try:
        return [parse_subnet_key(key)[0]]
    except ConfigError:
        return []


def _holder(kv: KeyValue) -> str:
    try:
        return f"public IP {parse_lease(kv.key, kv.value).public_ip}"
    except ConfigError:
        return "an unreadable lease"
