"""flannel's subnet.env: what the flannel CNI plugin reads to build pod networks on this node.

    FLANNEL_NETWORK=10.5.0.0/16
    FLANNEL_SUBNET=10.5.1.1/24        # the first usable address of this node's subnet, its length
    FLANNEL_MTU=1450                  # the overlay device's MTU
    FLANNEL_IPMASQ=false              # overlayd does not masquerade; the CNI plugin may

Pure: ``render`` builds the text, ``previous_subnet`` reads the subnet back (a restarted node
asks etcd for the subnet it had). The runtime writes it atomically (io/atomic_file.py).
"""

from __future__ import annotations

import ipaddress


def render(network: ipaddress.IPv4Network, subnet: ipaddress.IPv4Network, mtu: int,
           ipmasq: bool = False) -> str:
    first = subnet.network_address + 1 if subnet.num_addresses > 1 else subnet.network_address
    return (f"FLANNEL_NETWORK={network}\n"
            f"FLANNEL_SUBNET={first}/{subnet.prefixlen}\n"
            f"FLANNEL_MTU={mtu}\n"
            f"FLANNEL_IPMASQ={'true' if ipmasq else 'false'}\n")


def previous_subnet(text: str) -> ipaddress.IPv4Network | None:
    """The subnet FLANNEL_SUBNET names (10.5.1.1/24 -> 10.5.1.0/24); None if absent or bad."""
    for line in text.splitlines():
        name, sep, value = line.strip().partition("=")
        if sep and name == "FLANNEL_SUBNET":
            try:
                return ipaddress.IPv4Network(value.strip().strip('"'), strict=False)
            except ValueError:
                return None
    return None
