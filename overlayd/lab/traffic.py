"""Traffic checks between lab hosts: ping, a checksummed TCP transfer, hand-made tunnel
datagrams and a sniffer that says what a daemon wrote into its device.

The moving parts run as ``agents.py`` processes inside the namespaces; each is bounded by its own
timeout and killed at the latest when the lab closes.
"""

from __future__ import annotations

import json
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

from overlayd.lab.agents import UDP_BURST
from overlayd.lab.hosts import HostRef, HostsView
from overlayd.lab.netns import LabError
from overlayd.lab.processes import Agent

AGENTS = Path(__file__).with_name("agents.py")


class PingResult(NamedTuple):
    ok: bool                 # at least one echo reply
    transmitted: int
    received: int
    rtt_avg_ms: float | None
    output: str              # ping's stdout+stderr, for ICMP error lines ("Time to live exceeded")


class TransferResult(NamedTuple):
    bytes_ok: bool           # the receiver got exactly the bytes that were sent
    sha256_ok: bool
    seconds: float           # receiver side: first byte to EOF
    gbit_per_s: float        # received bits / seconds


class UdpTransferResult(NamedTuple):
    sent: int                # datagrams the sender sent
    received: int            # distinct datagrams that arrived with the right bytes
    shorts_sent: int         # the shorter last datagram of each burst
    shorts_received: int
    bad_bytes: int           # arrived with bytes (or a length) other than sent
    bad_tos: int             # arrived with a TOS other than the one sent
    ttl_deltas: list[int]    # sent TTL - received TTL, every value seen (one hop: [1])
    out_of_order: int        # behind a later datagram of its flow
    duplicates: int


class Traffic(HostsView):
    """The traffic half of a Lab (``Lab`` inherits it)."""

    _agents: list[Agent]

    def ping(self, a: HostRef, b: HostRef | None = None, *,
             dst: str | None = None, count: int = 1, interval_s: float = 0.2,
             wait_s: float = 2.0, size: int | None = None, ttl: int | None = None,
             dont_fragment: bool = False) -> PingResult:
        """`ping` from ``a`` to ``b``'s overlay address (or to ``dst``); never raises on loss."""
        target = dst or self.host(b if b is not None else 1).overlay_ip
        assert target is not None
        cmd = ["ping", "-n", "-c", str(count), "-i", f"{interval_s:g}", "-W", f"{wait_s:g}"]
        if size is not None:
            cmd += ["-s", str(size)]
        if ttl is not None:
            cmd += ["-t", str(ttl)]
        if dont_fragment:
            cmd += ["-M", "do"]
        budget = count * (interval_s + wait_s) + 5.0
        proc = self.exec(a, [*cmd, target], timeout_s=budget, check=False)
        return _parse_ping(proc.stdout + proc.stderr)

    def agent(self, ref: HostRef, *args: str) -> Agent:
        """Start an ``agents.py`` command in a host (killed at close if still running)."""
        agent = Agent(self.host(ref).netns, [sys.executable, str(AGENTS), *args])
        self._agents.append(agent)
        return agent

    def tcp_transfer(self, a: HostRef, b: HostRef, nbytes: int, *,
                     port: int = 5201, timeout_s: float = 120.0, seed: int = 1,
                     underlay: bool = False) -> TransferResult:
        """Send ``nbytes`` over TCP from a's overlay address to b's (or between their underlay
        addresses: the lab's own self-test, and a baseline), and check what arrived."""
        src, dst = self.host(a), self.host(b)
        src_ip, dst_ip = ((src.underlay_ip, dst.underlay_ip) if underlay
                          else (src.overlay_ip, dst.overlay_ip))
        assert src_ip is not None and dst_ip is not None
        recv = self.agent(dst, "tcp-recv", dst_ip, str(port), f"{timeout_s:g}")
        try:
            recv.wait_ready()
            send = self.agent(src, "tcp-send", src_ip, dst_ip, str(port),
                              str(nbytes), str(seed), f"{timeout_s:g}")
            sent = _agent_json(send, timeout_s + 5.0)
            got = _agent_json(recv, 10.0)
        finally:
            recv.kill()
        if "error" in sent or "error" in got:
            raise LabError(f"tcp transfer {src.name} -> {dst.name} failed: "
                           f"sender {sent}, receiver {got}")
        seconds = float(got["seconds"]) or 1e-9
        return TransferResult(got["bytes"] == nbytes == sent["bytes"],
                              got["sha256"] == sent["sha256"], seconds,
                              got["bytes"] * 8 / seconds / 1e9)

    def udp_transfer(self, a: HostRef, b: HostRef, *, flows: int = 4, bursts: int = 200,
                     size: int = 64, gso: bool = False, port: int = 5301, seed: int = 1,
                     timeout_s: float = 60.0,
                     beyond: tuple[str, str] | None = None) -> UdpTransferResult:
        """Bursts of UDP datagrams from a's overlay address to b's over ``flows`` flows, each
        burst of a flow ``size``-byte datagrams and a shorter last one, TOS and TTL changing
        from burst to burst (``gso``: each flow's burst in one UDP_SEGMENT send); b checks
        every datagram's bytes, TOS, TTL and order (agents.py udp-send / udp-recv). ``beyond``:
        (namespace, address) of a receiver behind b instead, that b routes to."""
        src, dst = self.host(a), self.host(b)
        assert src.overlay_ip is not None and dst.overlay_ip is not None
        expected = flows * bursts * (UDP_BURST + 1)
        ns, dst_ip = beyond or (dst.netns, dst.overlay_ip)
        recv = Agent(ns, [sys.executable, str(AGENTS), "udp-recv", dst_ip, str(port),
                          str(expected), str(seed), f"{timeout_s:g}"])
        self._agents.append(recv)
        try:
            recv.wait_ready()
            send = self.agent(src, "udp-send", src.overlay_ip, dst_ip, str(port),
                              str(flows), str(bursts), str(size), str(seed),
                              "1" if gso else "0", f"{timeout_s:g}")
            sent = _agent_json(send, timeout_s + 5.0)
            got = _agent_json(recv, timeout_s + 5.0)
        finally:
            recv.kill()
        if "error" in sent or "error" in got:
            raise LabError(f"udp transfer {src.name} -> {dst.name} failed: "
                           f"sender {sent}, receiver {got}")
        return UdpTransferResult(sent["sent"], got["received"], sent["shorts"], got["shorts"],
                                 got["bad_bytes"], got["bad_tos"], got["ttl_deltas"],
                                 got["out_of_order"], got["duplicates"])

    def count_arrivals(self, ref: HostRef, marker: bytes,
                       action: Callable[[], object], seconds: float = 1.5,
                       iface: str | None = None) -> int:
        """Packets carrying ``marker`` that arrived on a host's overlay device (or ``iface``)
        while ``action`` ran and ``seconds`` after: what the daemon wrote into the device."""
        sniffer = self.agent(ref, "sniff", iface or self.device, marker.hex(), f"{seconds:g}")
        try:
            sniffer.wait_ready()
            action()
            result = _agent_json(sniffer, seconds + 10.0)
        finally:
            sniffer.kill()
        if "error" in result:
            raise LabError(f"sniffer on {self.host(ref).name} failed: {result['error']}")
        return int(result["matches"])

    def inject(self, sender: HostRef, to: HostRef, inner_src: str,
               inner_dst: str, marker: bytes, *, src_ip: str | None = None,
               inner_dport: int = 9) -> None:
        """Send one hand-made tunnel datagram from ``sender``'s namespace (from ``src_ip``,
        default its underlay address) to ``to``'s daemon: payload = an IPv4/UDP packet
        inner_src -> inner_dst carrying ``marker``. Bypasses the sender's daemon entirely."""
        s, t = self.host(sender), self.host(to)
        result = _agent_json(self.agent(s, "inject", src_ip or s.underlay_ip, t.underlay_ip,
                                        str(self.port), inner_src, inner_dst, str(inner_dport),
                                        marker.hex()), 10.0)
        if "error" in result:
            raise LabError(f"inject from {s.name} failed: {result['error']}")

    def wait_mesh(self, timeout_s: float = 15.0) -> None:
        """Bounded wait until every ordered pair of running hosts (and kernel VTEP hosts) answers
        one overlay ping (the first echoes can be lost while the underlay resolves ARP)."""
        running = [h for h in self.hosts if (h.daemon is not None and h.daemon.alive())
                   or (h.spec is not None and h.spec.kernel_vxlan)]
        pending = [(a, b) for a in running for b in running if a is not b]
        deadline = time.monotonic() + timeout_s
        while pending and time.monotonic() < deadline:
            still = []
            for a, b in pending:
                # Past the deadline, stop pinging: each ping may take its whole wait.
                if time.monotonic() >= deadline or not self.ping(a, b, wait_s=1.0).ok:
                    still.append((a, b))
            pending = still
        if pending:
            pairs = ", ".join(f"{a.name}->{b.name}" for a, b in pending)
            raise LabError(f"overlay pings unanswered after {timeout_s:g}s: {pairs}")


def _agent_json(agent: Agent, timeout_s: float) -> dict[str, Any]:
    out, err = agent.finish(timeout_s)
    lines = [line for line in out.splitlines() if line.startswith("{")]
    if not lines:
        return {"error": f"no result (exit {agent.proc.returncode}): {err.strip()[-500:]}"}
    result: dict[str, Any] = json.loads(lines[-1])
    return result


_PING_COUNTS = re.compile(r"(\d+) packets transmitted, (\d+) received")
_PING_RTT = re.compile(r"= [\d.]+/([\d.]+)/")


def _parse_ping(output: str) -> PingResult:
    counts = _PING_COUNTS.search(output)
    rtt = _PING_RTT.search(output)
    tx, rx = (int(counts.group(1)), int(counts.group(2))) if counts else (0, 0)
    return PingResult(rx > 0, tx, rx, float(rtt.group(1)) if rtt else None, output)
