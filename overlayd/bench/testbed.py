"""The two-host underlay: namespaces A and B, one veth pair between them, nothing in the root ns."""

from __future__ import annotations

from dataclasses import dataclass
from types import TracebackType
from typing import Self

from overlayd.lab import netns

UNDER_A, UNDER_B = "198.18.0.1", "198.18.0.2"
UNDER_PREFIX = 24
UNDER_MTU = 1500
INNER_MTU = 1450          # every encapsulating subject uses it, so per-packet costs compare


@dataclass
class Testbed:
    ns_a: str
    ns_b: str

    @classmethod
    def create(cls) -> Testbed:
        prefix = netns.run_prefix("ovd-bench")
        bed = cls(f"{prefix}-a", f"{prefix}-b")
        try:
            for ns in (bed.ns_a, bed.ns_b):
                netns.add_netns(ns)
            netns.add_veth_pair(bed.ns_a, "ul0", bed.ns_b, "ul0", mtu=UNDER_MTU)
            for ns, addr in ((bed.ns_a, UNDER_A), (bed.ns_b, UNDER_B)):
                netns.add_address(ns, "ul0", f"{addr}/{UNDER_PREFIX}")
                netns.link_up(ns, "ul0")
        except BaseException:
            bed.destroy()
            raise
        return bed

    def destroy(self) -> None:
        for ns in (self.ns_a, self.ns_b):
            netns.del_netns(ns)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.destroy()
