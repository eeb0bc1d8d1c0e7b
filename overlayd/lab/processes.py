"""Processes the lab starts inside namespaces: long-lived daemons and short-lived agents.

A daemon runs as ``timeout --kill-after=5 LIFETIME ip netns exec NS CMD...``: if this Python
process dies without cleaning up (SIGKILL, OOM), the daemon still ends by itself. `ip netns exec`
execs, so the wrapper's only child *is* the daemon, and we signal that pid directly: SIGTERM is
what an operator (or systemd) sends, and its exit code is what the tests check. Each process gets
its own session, so a Ctrl-C on the terminal reaches only us, and we stop daemons in order.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

from overlayd.lab.netns import LabError, ns_cmd

DEFAULT_LIFETIME_S = 600     # a daemon dies by itself after this even if nobody stops it
PID_WAIT_S = 5.0             # wrapper -> daemon pid discovery


def child_pids(pid: int) -> list[int]:
    """Direct children of ``pid`` (via /proc; stdlib has no portable call for it)."""
    path = Path(f"/proc/{pid}/task/{pid}/children")
    try:
        return [int(p) for p in path.read_text().split()]
    except OSError:
        pass
    out = []
    for entry in os.listdir("/proc"):    # kernels without CONFIG_PROC_CHILDREN
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(entry))
    return out


class DaemonProcess:
    """One daemon in one namespace (None: the root namespace), logging to a file, stopped by pid."""

    def __init__(self, ns: str | None, argv: Sequence[str], log_path: Path,
                 lifetime_s: int = DEFAULT_LIFETIME_S, env: dict[str, str] | None = None) -> None:
        self.ns = ns
        self.argv = list(argv)
        self.log_path = log_path
        inner = ns_cmd(ns, self.argv) if ns is not None else self.argv
        wrapped = ["timeout", "--kill-after=5", str(lifetime_s), *inner]
        with open(log_path, "ab") as log:   # the child keeps its own copy of the fd
            self.wrapper = subprocess.Popen(wrapped, stdin=subprocess.DEVNULL, stdout=log,
                                            stderr=subprocess.STDOUT, start_new_session=True,
                                            env=env)
        self.pid: int | None = self._find_daemon_pid()
        self.returncode: int | None = None
        self.terminated_at: float | None = None   # monotonic time of our SIGTERM

    def _find_daemon_pid(self) -> int | None:
        deadline = time.monotonic() + PID_WAIT_S
        while time.monotonic() < deadline:
            kids = child_pids(self.wrapper.pid)
            if kids:
                return kids[0]
            if self.wrapper.poll() is not None:
                return None          # it died before forking: the log says why
            time.sleep(0.01)
        return None

    def alive(self) -> bool:
        return self.wrapper.poll() is None

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def signal(self, sig: int) -> None:
        """Send ``sig`` to the daemon itself, only while its wrapper still holds it: the wrapper
        is our unreaped child, so its pid cannot be reused, and while it runs its child's pid is
        the daemon's."""
        if self.pid is not None and self.alive() and self.pid in child_pids(self.wrapper.pid):
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:
                pass

    def terminate(self) -> None:
        """SIGTERM once. A second one while the daemon is already shutting down could hit the
        default disposition (its handlers are gone by then) and kill it mid-cleanup."""
        if self.terminated_at is None and self.alive():
            self.terminated_at = time.monotonic()
            if self.pid is not None:
                self.signal(signal.SIGTERM)
            else:
                self.wrapper.terminate()        # timeout(1) forwards TERM to its child

    def stop(self, grace_s: float = 5.0) -> int | None:
        """SIGTERM, wait up to ``grace_s``, then SIGKILL. The daemon's exit code (negative:
        killed by that signal); None only if even SIGKILL did not end it within 5 s."""
        if self.alive():
            self.terminate()
            assert self.terminated_at is not None
            left = self.terminated_at + grace_s - time.monotonic()
            try:
                self.wrapper.wait(timeout=max(0.0, left))
            except subprocess.TimeoutExpired:
                self.signal(signal.SIGKILL)
                self.wrapper.kill()
                try:
                    self.wrapper.wait(timeout=5.0)
                except subprocess.TimeoutExpired:
                    pass
        self.returncode = self.wrapper.poll()
        return self.returncode


class Agent:
    """A short-lived helper (``overlayd.lab.agents``) in a namespace, talking over a pipe."""

    def __init__(self, ns: str, argv: Sequence[str]) -> None:
        self.proc = subprocess.Popen(ns_cmd(ns, argv), stdin=subprocess.DEVNULL,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     start_new_session=True)

    def wait_ready(self, timeout_s: float = 10.0) -> None:
        """Block until the agent printed READY (bounded), or raise with what it said instead."""
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout_s
        line = b""
        while (left := deadline - time.monotonic()) > 0:
            readable, _, _ = select.select([self.proc.stdout], [], [], left)
            if not readable:
                break
            byte = os.read(self.proc.stdout.fileno(), 1)
            if not byte:
                break
            if byte == b"\n":
                if line.strip() == b"READY":
                    return
                line = b""
            else:
                line += byte
        out, err = self.finish(1.0)
        raise LabError(f"agent {self.proc.args!r} did not get ready: {out} {err}".strip())

    def finish(self, timeout_s: float) -> tuple[str, str]:
        """Wait for the agent to exit (bounded; killed after) and return (stdout, stderr)."""
        try:
            out, err = self.proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, err = self.proc.communicate(timeout=5.0)
        return out.decode(errors="replace"), err.decode(errors="replace")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            try:
                self.proc.wait(timeout=5.0)
            except subprocess.TimeoutExpired:
                pass
