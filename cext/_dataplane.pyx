# distutils: define_macros=_GNU_SOURCE=1
# cython: language_level=3
"""overlayd's compiled data plane: the Cython twins of overlayd/dataplane/*.py.

Exports RouteTable and UdpForwarder with the same names and signatures as the pure-Python
kernels, plus the C copies of the ICMP builders (for tests against independent parsers).
"""

cimport cython
from operator import index as operator_index
from os import strerror

include "sys.pxi"
include "counters.pxi"
include "route_table.pxi"
include "icmp.pxi"
include "udp_forwarder.pxi"

IMPLEMENTATION = "cython"
LOCAL = LOCAL_C
NO_ROUTE = NO_ROUTE_C
