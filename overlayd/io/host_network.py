"""Netlink (pyroute2): the host's addresses and MTUs, and the device's address, MTU and routes.

Called at start, on map changes and when the device is recreated — never from the packet path.
pyroute2's synchronous IPRoute drives an asyncio loop of its own, which fails inside a thread
whose (uv)loop is already running, so every call runs in one worker thread and is waited for:
these are rare, millisecond-long operations, and doing them in order keeps routes consistent.
"""

from __future__ import annotations

import errno
import functools
import ipaddress
import select
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import ParamSpec, TypeVar

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.rtnl import RTMGRP_IPV4_IFADDR

from overlayd.errors import EX_NOPERM, EX_OSERR, StartupError

_P = ParamSpec("_P")
_R = TypeVar("_R")
_worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="netlink")


def _in_worker(fn: Callable[_P, _R]) -> Callable[_P, _R]:
    @functools.wraps(fn)
    def call(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        return _worker.submit(fn, *args, **kwargs).result()
    return call


@dataclass(frozen=True, slots=True)
class HostAddress:
    address: ipaddress.IPv4Address
    interface: str
    mtu: int


@_in_worker
def host_addresses() -> list[HostAddress]:
    """Every IPv4 address of this host (this network namespace) with its interface's MTU."""
    with IPRoute() as ipr:
        return _addresses(ipr)


@_in_worker
def wait_for_address(wanted: frozenset[ipaddress.IPv4Address],
                     timeout: float) -> list[HostAddress]:
    """The host's addresses as soon as one of ``wanted`` is among them, or after ``timeout``
    seconds (then without it). Subscribed to address events before the first look, so an
    address added in between is not missed."""
    deadline = time.monotonic() + timeout
    with IPRoute() as ipr:
        ipr.bind(groups=RTMGRP_IPV4_IFADDR)
        while True:
            found = _addresses(ipr)
            left = deadline - time.monotonic()
            if left <= 0 or wanted & {h.address for h in found}:
                return found
            if select.select([ipr], [], [], left)[0]:
                ipr.get()     # drain the events; the next dump says what is there now


def _addresses(ipr: IPRoute) -> list[HostAddress]:
    links = {link["index"]: (link.get_attr("IFLA_IFNAME"), link.get_attr("IFLA_MTU"))
             for link in ipr.get_links()}
    out = []
    for msg in ipr.get_addr(family=2):
        name, mtu = links.get(msg["index"], ("?", 1500))
        out.append(HostAddress(ipaddress.IPv4Address(msg.get_attr("IFA_ADDRESS")), name, mtu))
    return out


@_in_worker
def configure_device(name: str, address: ipaddress.IPv4Address, mtu: int, tx_queue_len: int,
                     routes: Iterable[ipaddress.IPv4Network], *, prefixlen: int = 32,
                     mac: str | None = None, bridge: str | None = None) -> None:
    """Bring the device up with its overlay address (/32 when routed), MTU and a route per
    overlay prefix; a tap also gets its MAC, and (switched: one L2 segment) the network's
    prefix length, whose connected route is the only route it needs.

    With ``bridge`` (a switched tap that is a port of a Linux bridge) the tap carries no
    address: it is enslaved to the bridge, and the node's address lives on the bridge, which
    the operator owns. An address left on the tap would make the kernel route the segment
    past the bridge, cutting off what is behind it.

    Routes carry ``src`` = the overlay address, so this host's own traffic into the overlay leaves
    with an address the peers accept (inside its subnet) rather than the underlay address.
    """
    try:
        with IPRoute() as ipr:
            index = _index(ipr, name)
            ipr.link("set", index=index, mtu=mtu, txqlen=tx_queue_len)
            if mac is not None:
                ipr.link("set", index=index, address=mac)
            if bridge is None:
                ipr.addr("replace", index=index, address=str(address), prefixlen=prefixlen)
            else:
                found = ipr.link_lookup(ifname=bridge)
                if not found:
                    raise StartupError(f"[device] bridge {bridge} does not exist on this host "
                                       f"(create it, with the node's address {address})",
                                       EX_OSERR)
                for msg in ipr.get_addr(family=2, index=index):
                    ipr.addr("del", index=index, address=msg.get_attr("IFA_ADDRESS"),
                             prefixlen=msg["prefixlen"])
                ipr.link("set", index=index, master=int(found[0]))
            ipr.link("set", index=index, state="up")
            for route in routes:
                _route(ipr, "replace", index, route, address)
    except NetlinkError as exc:
        raise _startup_error(f"configuring device {name}", exc) from None


@dataclass(frozen=True, slots=True)
class Placement:
    """Where the device is now: its bridge (if it is a port of one) and its IPv4 addresses."""

    master: str | None
    addresses: frozenset[ipaddress.IPv4Address]


@_in_worker
def device_placement(name: str) -> Placement | None:
    """The device's bridge and addresses, or None when it does not exist (or vanished while
    being looked at: the device check notices that on its own)."""
    with IPRoute() as ipr:
        try:
            found = ipr.link_lookup(ifname=name)
            if not found:
                return None
            (link,) = ipr.get_links(found[0])
            master_index = link.get_attr("IFLA_MASTER")
            master = None
            if master_index:
                (upper,) = ipr.get_links(master_index)
                master = upper.get_attr("IFLA_IFNAME")
            addresses = frozenset(ipaddress.IPv4Address(m.get_attr("IFA_ADDRESS"))
                                  for m in ipr.get_addr(family=2, index=found[0]))
        except NetlinkError as exc:
            if exc.code in (errno.ENODEV, errno.ENOENT):
                return None
            raise
        return Placement(master, addresses)


@_in_worker
def set_routes(name: str, address: ipaddress.IPv4Address,
               remove: Iterable[ipaddress.IPv4Network],
               add: Iterable[ipaddress.IPv4Network]) -> None:
    """Apply a change of the routed prefixes (map reload); missing routes are not an error."""
    with IPRoute() as ipr:
        index = _index(ipr, name)
        for route in remove:
            try:
                _route(ipr, "del", index, route, address)
            except NetlinkError as exc:
                if exc.code not in (errno.ESRCH, errno.ENOENT):
                    raise
        for route in add:
            _route(ipr, "replace", index, route, address)


def _index(ipr: IPRoute, name: str) -> int:
    found = ipr.link_lookup(ifname=name)
    if not found:
        raise StartupError(f"device {name} disappeared while it was being configured", EX_OSERR)
    return int(found[0])


def _route(ipr: IPRoute, op: str, index: int, route: ipaddress.IPv4Network,
           src: ipaddress.IPv4Address) -> None:
    ipr.route(op, dst=str(route), oif=index, prefsrc=str(src))


def _startup_error(what: str, exc: NetlinkError) -> StartupError:
    if exc.code in (errno.EPERM, errno.EACCES):
        return StartupError(f"{what}: not permitted (needs CAP_NET_ADMIN)", EX_NOPERM)
    return StartupError(f"{what}: {exc.args[1] if len(exc.args) > 1 else exc}", EX_OSERR)


@_in_worker
def default_route_interface() -> str | None:
    """The interface of the IPv4 default route, as flannel picks its public interface."""
    with IPRoute() as ipr:
        for route in ipr.get_default_routes(family=2):
            index = route.get_attr("RTA_OIF")
            if index is not None:
                links = ipr.get_links(index)
                if links:
                    return str(links[0].get_attr("IFLA_IFNAME"))
    return None
