"""Netlink (pyroute2): the host's addresses and MTUs, and the device's address, MTU and routes.

Called at start, on map changes and at exit — never from the packet path — so the synchronous
IPRoute API is used directly (its async API does not run under uvloop).
"""

from __future__ import annotations

import errno
import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from overlayd.errors import EX_NOPERM, EX_OSERR, StartupError


@dataclass(frozen=True, slots=True)
class HostAddress:
    address: ipaddress.IPv4Address
    interface: str
    mtu: int


def host_addresses() -> list[HostAddress]:
    """Every IPv4 address of this host (this network namespace) with its interface's MTU."""
    with IPRoute() as ipr:
        links = {link["index"]: (link.get_attr("IFLA_IFNAME"), link.get_attr("IFLA_MTU"))
                 for link in ipr.get_links()}
        out = []
        for msg in ipr.get_addr(family=2):
            name, mtu = links.get(msg["index"], ("?", 1500))
            out.append(HostAddress(ipaddress.IPv4Address(msg.get_attr("IFA_ADDRESS")), name, mtu))
        return out


def underlay_mtu_of(address: ipaddress.IPv4Address) -> int | None:
    """MTU of the interface that holds ``address``, or None if no interface does."""
    return next((h.mtu for h in host_addresses() if h.address == address), None)


def configure_device(name: str, address: ipaddress.IPv4Address, mtu: int, tx_queue_len: int,
                     routes: Iterable[ipaddress.IPv4Network]) -> None:
    """Bring the device up with its overlay address (/32), MTU and a route per overlay prefix.

    Routes carry ``src`` = the overlay address, so this host's own traffic into the overlay leaves
    with an address the peers accept (inside its subnet) rather than the underlay address.
    """
    try:
        with IPRoute() as ipr:
            index = _index(ipr, name)
            ipr.link("set", index=index, mtu=mtu, txqlen=tx_queue_len)
            ipr.addr("replace", index=index, address=str(address), prefixlen=32)
            ipr.link("set", index=index, state="up")
            for route in routes:
                _route(ipr, "replace", index, route, address)
    except NetlinkError as exc:
        raise _startup_error(f"configuring device {name}", exc) from None


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
