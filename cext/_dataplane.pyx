# distutils: define_macros=_GNU_SOURCE=1
# cython: language_level=3
"""overlayd's compiled data plane: the Cython twins of overlayd/dataplane/*.py.

Exports RouteTable, UdpForwarder, VxlanRoutedForwarder, VxlanSwitchForwarder and
WireguardForwarder with the same
names and signatures as the pure-Python kernels, plus the C copies of the ICMP builders and the
VXLAN flow hash (for tests against the twins and independent parsers).
"""

cimport cython
from operator import index as operator_index
from os import strerror
from time import time as wall_clock

include "sys.pxi"
include "counters.pxi"
include "route_table.pxi"
include "icmp.pxi"
include "offload.pxi"
include "forwarder_base.pxi"
include "udp_forwarder.pxi"
include "vxlan_common.pxi"
include "fdb.pxi"
include "vxlan_routed.pxi"
include "vxlan_switch.pxi"
include "wireguard.pxi"
include "engine.pxi"
include "steering.pxi"

IMPLEMENTATION = "cython"
LOCAL = LOCAL_C
NO_ROUTE = NO_ROUTE_C
