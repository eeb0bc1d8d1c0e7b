"""`[dataplane] steering`: which thread handles a packet, and keeping that true.

- ``flow``: the kernel's own choice (tun automq flow hash, the SO_REUSEPORT 4-tuple hash),
  threads unpinned: one flow stays on one thread, wherever its packets were sent from.
- ``cpu``: thread i is pinned to its share of the daemon's CPUs and the device's and the
  sockets' eBPF programs (io/steering.py) hand each flowlet - a flow's packets until it falls
  silent for ``[dataplane] flowlet_gap_us`` (1 ms) - to the thread of the CPU its first
  packet is on, so every hop of a round trip wakes a thread on the CPU that is already awake,
  and no flow is reordered.

``plan_steering`` says whether ``cpu`` can apply at all (N > 1 native threads, each with a
CPU of its own); ``CpuSteering`` then loads and attaches the programs (``attach``, at start,
once the device and the sockets exist), pins the threads (``pin``, once they run), attaches
the device's program again after a device recreation (``reattach_device``), and on any
refusal by the kernel undoes what it did and leaves flow steering in force, saying why in
one log line and in ``describe()`` (status, metrics).
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Sequence
from typing import Any

from overlayd.io import steering as io_steering

log = logging.getLogger("overlayd")


class CpuSteering:
    """The steering in force and what it took; ``mode`` is "flow" or "cpu"."""

    def __init__(self, requested: str, shares: Sequence[Sequence[int]] = (),
                 reason: str | None = None, backend: str = "udp",
                 flowlet_gap_us: int = io_steering.FLOWLET_GAP_NS // 1000) -> None:
        self.requested = requested
        self.backend = backend                # what the sockets' program parses
        self.flowlet_gap_us = flowlet_gap_us
        self.mode = "cpu" if requested == "cpu" and shares else "flow"
        self.reason = reason                  # why "cpu" was asked for but is not in force
        self.shares = [list(s) for s in shares] if self.mode == "cpu" else []
        self.allowed = sorted({c for s in self.shares for c in s})
        self._program_fd = -1
        self._drains_fd = -1                  # until pin() hands it to the engine
        self._tun: Any = None
        self._socks: list[socket.socket] = []
        self._threaded: Any = None

    # -- life ------------------------------------------------------------------------------------

    def attach(self, tun: Any, rx_socks: Sequence[socket.socket]) -> None:
        """Load both programs, each with its flowlet map, and attach them (the threads are
        pinned by pin())."""
        if self.mode != "cpu":
            # A device kept from an earlier run (keep_device) keeps that run's program.
            try:
                io_steering.set_tun_steering(tun.fds[0], -1)
            except OSError:
                pass            # a kernel without steering programs has none to remove
            return
        self._tun, self._socks = tun, list(rx_socks)
        thread_of = io_steering.thread_of_cpu(self.shares)
        gap_ns = self.flowlet_gap_us * 1000
        try:
            self._drains_fd = io_steering.create_drain_map(len(self.shares))
            drains = self._drains_fd
            self._program_fd = io_steering.load_program(
                lambda flows: io_steering.tun_program(thread_of, flows, drains, gap_ns))
            io_steering.set_tun_steering(tun.fds[0], self._program_fd)
            # The group's program; its return value indexes the sockets in the order they
            # were bound, which is rx_socks' order (the daemon never rebinds one). The group
            # holds it from here on: nothing re-attaches it.
            sockets_fd = io_steering.load_program(
                lambda flows: io_steering.reuseport_program(thread_of, flows, drains,
                                                             self.backend, gap_ns))
            try:
                io_steering.attach_reuseport(self._socks[0], sockets_fd)
            finally:
                os.close(sockets_fd)
        except (OSError, ValueError) as exc:
            self.fall_back(_why(exc))

    def pin(self, threaded: Any) -> None:
        """Pin thread i to its share and have the threads report their drains to the programs
        (the threads run: ThreadedForwarder.start() was called)."""
        if self.mode != "cpu":
            return
        self._threaded = threaded
        try:
            for i, share in enumerate(self.shares):
                threaded.engine.pin(i, share)
            threaded.engine.report_drains(self._drains_fd,
                                          io_steering.drain_bytes(len(self.shares)))
        except (OSError, ValueError, RuntimeError) as exc:
            self.fall_back(_why(exc))
        finally:
            self._close_drains()        # the programs and the engine's mapping hold the map

    def reattach_device(self, tun: Any) -> None:
        """The device was recreated (a new device behind the same fds): it has no program."""
        if self.mode != "cpu":
            return
        try:
            io_steering.set_tun_steering(tun.fds[0], self._program_fd)
        except OSError as exc:
            self.fall_back(f"re-attaching the device's program after its recreation: "
                           f"{_why(exc)}")

    def close(self) -> None:
        if self._program_fd >= 0:
            os.close(self._program_fd)
            self._program_fd = -1
        self._close_drains()

    def _close_drains(self) -> None:
        if self._drains_fd >= 0:
            os.close(self._drains_fd)
            self._drains_fd = -1

    # -- faults ----------------------------------------------------------------------------------

    def fall_back(self, why: str) -> None:
        """Undo whatever part of cpu steering is in place; flow steering from now on."""
        self.mode = "flow"
        self.reason = f"cpu steering refused: {why}"
        log.warning("steering: %s; running with flow steering (kernel flow hash, threads "
                    "unpinned)", self.reason.removeprefix("cpu steering refused: "))
        if self._tun is not None and self._tun.fds:
            try:
                io_steering.set_tun_steering(self._tun.fds[0], -1)
            except OSError:
                pass            # never attached, or the device is gone: nothing to undo
        if self._socks:
            try:
                io_steering.detach_reuseport(self._socks[0])
            except OSError:
                pass            # ENOENT: no program was attached
        if self._threaded is not None:
            self._threaded.engine.stop_drain_reports()
            everywhere = io_steering.allowed_cpus()
            for i in range(len(self.shares)):
                try:
                    self._threaded.engine.pin(i, everywhere)
                except (OSError, RuntimeError):
                    pass        # a thread that cannot be moved back keeps its CPUs
        self.shares = []
        self.close()

    # -- reading ---------------------------------------------------------------------------------

    def describe(self) -> dict[str, Any]:
        return {"requested": self.requested, "mode": self.mode, "reason": self.reason,
                "cpus": [list(s) for s in self.shares],
                "flowlet_gap_us": self.flowlet_gap_us if self.mode == "cpu" else None}


def _why(exc: Exception) -> str:
    """The kernel's refusal in words ("bpf(BPF_PROG_LOAD): Operation not permitted")."""
    return (exc.strerror if isinstance(exc, OSError) and exc.strerror else None) or str(exc)


def plan_steering(requested: str, engine: str, threads: int, switched: bool,
                  cpus: Sequence[int] | None = None, backend: str = "udp",
                  flowlet_gap_us: int = io_steering.FLOWLET_GAP_NS // 1000) -> CpuSteering:
    """What ``steering = "cpu"`` can be here (``backend``: the map's, udp, vxlan or
    wireguard; ``flowlet_gap_us``: [dataplane] flowlet_gap_us); a plan without shares says
    why not (no fault: nothing to pin or nothing to choose between)."""
    if requested != "cpu":
        return CpuSteering(requested)
    if engine != "threads":
        why = "the loop engine has no data-plane threads to pin"
    elif switched:
        why = ("the switched backend runs one data-plane thread: nothing to steer between "
               "(it stays unpinned, free to run where it is woken)")
    elif threads < 2:
        why = ("one data-plane thread: nothing to steer between (it stays unpinned, free to "
               "run where it is woken)")
    else:
        allowed = list(cpus) if cpus is not None else io_steering.allowed_cpus()
        if threads > len(allowed):
            why = (f"{threads} data-plane threads on {len(allowed)} allowed CPU(s) "
                   f"({','.join(map(str, allowed))}): cpu steering needs a CPU for each "
                   f"thread (set [dataplane] threads to at most {len(allowed)})")
        else:
            return CpuSteering(requested, io_steering.cpu_shares(allowed, threads),
                               backend=backend, flowlet_gap_us=flowlet_gap_us)
    steering = CpuSteering(requested, reason=f"cpu steering not applied: {why}")
    log.info("steering: %s; flow steering in force", steering.reason)
    return steering
