"""The data plane as native threads: N forwarders, each driven by its own C thread.

cext/engine.pxi runs the batch loops; this module owns the Python side of it and presents the
N forwarders to the rest of the daemon as one forwarder (the interface ops/ and runtime/ use):

- counters, per-peer counters, batch histograms: summed over the forwarders at read time,
  without stopping a thread (each counter has one writer);
- set_tables, set_capture, drain_capture: each forwarder in turn, while its thread is
  paused between two batches (the others keep forwarding), so a table swap stays one
  assignment no batch sees halfway and no generation is freed under a batch;
- MAC ageing (switched): set_ageing once, and the thread ages its own table in its clock step
  (cext/engine.pxi item 10); the daemon's FDB timer does not run, so nothing pauses for it
  (age() still works, paused, for a caller that wants a pass now);
- threads(): per thread, its share of the traffic and its loop statistics (overlayd status and
  the metrics show them).

Which engine runs is decided by ``choose_engine`` from ``[dataplane] engine`` and ``threads``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from overlayd.errors import EX_CONFIG, StartupError
from overlayd.io.steering import allowed_cpus

DEFAULT_MAX_THREADS = 4   # beyond this the device and socket queues, not the threads, limit


def choose_engine(engine: str, threads: int, implementation: str, switched: bool,
                  cpus: int | None = None, where: str = "config") -> tuple[str, int, str | None]:
    """(engine, thread count, note): "threads" or "loop"; note says why a choice was narrowed.

    The threads engine drives compiled forwarders only (the pure-Python twin keeps the asyncio
    loop). The switched path runs one thread: its MAC table and storm buckets are one state
    that every frame both reads and writes, which N unshared forwarders cannot share. The
    wireguard backend runs N threads like the other routed ones: what its forwarders must
    share per key (the send counter and the replay window) they share (runtime/wg_threads.py).
    """
    if engine == "threads" and implementation != "cython":
        raise StartupError(f"{where}: dataplane.engine: \"threads\" needs the Cython data plane "
                           f"(this daemon runs the {implementation} one): use \"loop\"",
                           EX_CONFIG)
    if engine == "loop" or (engine == "auto" and implementation != "cython"):
        return "loop", 1, None
    # the CPUs the daemon may run on (taskset, a cpuset, CPUAffinity=), not the host's: threads
    # beyond them would only take turns on the same CPUs
    fit = min(cpus or len(allowed_cpus()), DEFAULT_MAX_THREADS)
    count = threads or fit
    if switched and count > 1:
        return "threads", 1, (f"switched backend: 1 data-plane thread, not {count} (one MAC "
                              f"table serves every frame)")
    return "threads", count, None


class ThreadedForwarder:
    """N compiled forwarders on N native threads, seen as one forwarder."""

    def __init__(self, forwarders: Sequence[Any], dev_fds: Sequence[int],
                 sock_fds: Sequence[int], busy_poll_us: int) -> None:
        from overlayd import _dataplane  # type: ignore[attr-defined]  # compiled only

        self.forwarders = list(forwarders)
        self.engine = _dataplane.NativeEngine(self.forwarders, list(dev_fds), list(sock_fds),
                                           busy_poll_us)
        self.busy_poll_us = busy_poll_us
        self.switched = hasattr(self.forwarders[0], "fdb_entries")
        if self.switched:
            # A switched forwarder also answers the FDB questions (one thread: see choose_engine).
            # Its size and per-port counts are aligned integers the thread alone writes: read
            # as they are. The listing walks the learned list, which the running thread relinks
            # (learning) and, ageing itself, deletes from by shifting entries between slots: a
            # walk beside that could follow a stale link, so it pauses the thread (`overlayd
            # fdb`: an operator's request, never a timer's).
            self.fdb_entries = self._fdb_entries
            self.fdb_size = self.forwarders[0].fdb_size
            self.port_entries = self.forwarders[0].port_entries

    # -- life ----------------------------------------------------------------------------------

    def start(self) -> None:
        self.engine.start()

    def stop(self) -> None:
        """Join every thread; afterwards nothing touches the fds any more."""
        self.engine.stop()

    @contextmanager
    def _paused(self, i: int) -> Iterator[Any]:
        self.engine.pause(i)
        try:
            yield self.forwarders[i]
        finally:
            self.engine.resume(i)

    def _each_paused(self, call: Callable[[Any], Any]) -> list[Any]:
        out = []
        for i in range(len(self.forwarders)):
            with self._paused(i) as fwd:
                out.append(call(fwd))
        return out

    # -- control -------------------------------------------------------------------------------

    def set_tables(self, tables: Any) -> None:
        """Routed forwarders build every generation while their threads forward and pause each
        thread only for the swap; a refused map (ValueError) is refused before any swap. The
        switched forwarder's swap also remaps its MAC table: all of it runs paused."""
        if not all(hasattr(fwd, "prepare_tables") for fwd in self.forwarders):
            self._each_paused(lambda fwd: fwd.set_tables(tables))
            return
        built = [fwd.prepare_tables(tables) for fwd in self.forwarders]
        for i, generation in enumerate(built):
            with self._paused(i) as fwd:
                fwd.commit_tables(generation)

    def add_icmp_tokens(self, n: int, cap: int) -> None:
        # The rate is the daemon's: each of N threads gets its share. The add races with the
        # thread's spend of one token at most (a token more or less per refill, never a crash).
        count = len(self.forwarders)
        for fwd in self.forwarders:
            fwd.add_icmp_tokens(max(1, n // count), max(1, cap // count))

    def set_now(self, now: float) -> None:
        # The threads set the clock themselves before each batch; this is the tick's value.
        for fwd in self.forwarders:
            fwd.set_now(now)

    def age(self, now: float, max_age: float) -> int:
        return sum(self._each_paused(lambda fwd: fwd.age(now, max_age)))

    def set_ageing(self, max_age: float, period: float) -> None:
        """From now on the switched thread ages its MAC table itself, as age(now, max_age)
        every ``period`` seconds would (its clock step; it sleeps no longer than the next pass
        is due): the caller's timer stops calling age(), and no pause remains for ageing."""
        self._each_paused(lambda fwd: fwd.set_ageing(max_age, period))

    def set_capture(self, enabled: bool) -> None:
        self._each_paused(lambda fwd: fwd.set_capture(enabled))

    def drain_capture(self) -> list[tuple[int, int, bytes, float]]:
        """Every thread's ring, merged in time order (records of one thread keep their order)."""
        records: list[tuple[int, int, bytes, float]] = []
        for part in self._each_paused(lambda fwd: fwd.drain_capture()):
            records.extend(part)
        records.sort(key=lambda record: record[3])   # stable: per-thread order is kept
        return records

    def _fdb_entries(self) -> list[tuple[bytes, int, bool, float]]:
        with self._paused(0) as fwd:
            return list(fwd.fdb_entries())

    # -- reading (no pause) ----------------------------------------------------------------------

    def counters(self) -> dict[str, int]:
        total: dict[str, int] = {}
        for fwd in self.forwarders:
            for name, value in fwd.counters().items():
                total[name] = total.get(name, 0) + value
        return total

    def _sum_rows(self, rows: list[list[Any]]) -> list[Any]:
        # Every forwarder has the same peers in the same order (same tables, swapped together).
        if not rows:
            return []
        width = min(len(r) for r in rows)
        out = []
        for k in range(width):
            column = [r[k] for r in rows]
            if isinstance(column[0], tuple):
                out.append(tuple(sum(v) for v in zip(*column)))
            else:
                out.append(sum(column))
        return out

    def peer_counters(self) -> list[tuple[int, int, int, int]]:
        return self._sum_rows([list(f.peer_counters()) for f in self.forwarders])

    def peer_rx_accepted(self) -> list[int]:
        return self._sum_rows([list(f.peer_rx_accepted()) for f in self.forwarders])

    def offloads(self) -> dict[str, bool]:
        """An offload counts as in use while every thread still uses it."""
        views = [f.offloads() for f in self.forwarders]
        return {name: all(v[name] for v in views) for name in views[0]}

    def batch_histogram(self) -> tuple[list[int], list[int]]:
        inside = [list(f.batch_histogram()[0]) for f in self.forwarders]
        outside = [list(f.batch_histogram()[1]) for f in self.forwarders]
        return ([sum(c) for c in zip(*inside)], [sum(c) for c in zip(*outside)])

    def threads(self) -> list[dict[str, Any]]:
        """Per thread: its loop statistics, its packets, its share of all packets (0..1) and
        the CPUs it may run on (as the kernel has them)."""
        stats = self.engine.thread_stats()
        packets = []
        for fwd in self.forwarders:
            ctr = fwd.counters()
            packets.append((ctr["inside_packets"], ctr["outside_packets"]))
        total = sum(a + b for a, b in packets) or 1
        out = []
        for i, (stat, (inside, outside)) in enumerate(zip(stats, packets)):
            out.append({"thread": i, "inside_packets": inside, "outside_packets": outside,
                        "share": (inside + outside) / total, "cpus": self.engine.affinity(i),
                        **stat})
        return out

    # -- faults ----------------------------------------------------------------------------------

    def device_error(self) -> int:
        return int(self.engine.device_error())

    def take_socket_error(self) -> int:
        return int(self.engine.take_socket_error())

    def detach_device(self) -> None:
        self.engine.detach_device()

    def attach_device(self) -> None:
        self.engine.attach_device()
