"""The pure-Python twins of the Cython kernels, gathered under the names the extension exports."""

from overlayd.dataplane.forwarder_base import CAPTURE_BYTES, CAPTURE_RECORDS
from overlayd.dataplane.route_table import RouteTable
from overlayd.dataplane.udp_forwarder import UdpForwarder
from overlayd.dataplane.vxlan_routed import VxlanRoutedForwarder
from overlayd.dataplane.vxlan_switch import AGE_LIMIT, VxlanSwitchForwarder
from overlayd.dataplane.wireguard_forwarder import KeypairShare, WireguardForwarder

IMPLEMENTATION = "python"

__all__ = ["AGE_LIMIT", "CAPTURE_BYTES", "CAPTURE_RECORDS", "IMPLEMENTATION", "KeypairShare",
           "RouteTable",
           "UdpForwarder", "VxlanRoutedForwarder", "VxlanSwitchForwarder", "WireguardForwarder"]
