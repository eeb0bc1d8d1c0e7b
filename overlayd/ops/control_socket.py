"""The control socket: a root-only unix stream socket the CLI asks for the daemon's live state.

Protocol, one connection per request: the client sends one JSON object on one line,
``{"command": "status" | "peers" | "routes" | "fdb" | "capture", ...}``; the daemon answers one
JSON line, ``{"ok": true, "result": ...}`` or ``{"ok": false, "error": "..."}``. ``capture`` is
the one streaming command: after its answer the daemon sends binary records (capture.py) until
the session ends.

1. ``bind`` (synchronous, before the loop runs, so a problem is a startup error): create the
   directory, refuse if another daemon answers on the path, remove a stale socket file, bind
   with umask 0177 so the socket is never reachable by others even briefly, chmod 0600.
2. ``start``: an asyncio unix server on that socket; handlers run on the loop, next to the
   data plane they read (state.py).
3. Peers are checked with SO_PEERCRED as well as the file mode: root or our own uid only.
4. ``close``: stop serving, end capture sessions, remove the socket file if it is still ours.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import os
import socket
import stat
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

from overlayd.errors import EX_OSERR, StartupError
from overlayd.ops.capture import CaptureError, CaptureHub
from overlayd.rate_limited_log import RateLimitedLog

log = logging.getLogger("overlayd")

MAX_REQUEST_BYTES = 64 * 1024
REQUEST_TIMEOUT_SECONDS = 5.0
REFUSAL_READ_SECONDS = 0.5     # how long a refused client may take to send its request
PERMISSION_DENIED = "permission denied"   # the refusal; the CLI exits 77 (EX_NOPERM) on it
SOCKET_MODE = 0o600
DIRECTORY_MODE = 0o755        # the socket's own mode is what keeps others out

Handler = Callable[[dict[str, Any]], Any]


def _listener_pid(path: Path) -> int | None:
    """The pid of the process listening on ``path`` (SO_PEERCRED of a probe connection; 0 if
    it cannot be told), or None when nothing listens there."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(str(path))
        creds = probe.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except OSError:
        return None
    finally:
        probe.close()
    return int(struct.unpack("3i", creds)[0])


def _same_network_namespace(pid: int) -> bool | None:
    """Whether ``pid`` shares our network namespace; None if /proc does not say."""
    try:
        return os.stat(f"/proc/{pid}/ns/net").st_ino == os.stat("/proc/self/ns/net").st_ino
    except OSError:
        return None


def _in_use_message(path: Path, pid: int) -> str:
    # /run is one file system for every network namespace on the host, so two daemons with
    # the same device name in two namespaces (containers, `ip netns exec`) meet here.
    who = f"another overlayd (pid {pid})" if pid else "another overlayd"
    if pid and _same_network_namespace(pid) is False:
        return (f"control socket {path}: {who} is listening there, in another network "
                f"namespace; namespaces share /run, so give each daemon its own [control] "
                f"socket")
    return (f"control socket {path}: {who} is listening there (set a different [control] "
            f"socket or device name; daemons in other network namespaces share /run too)")


def bind(path: Path) -> socket.socket:
    """Create the listening socket at ``path`` (mode 0600); StartupError if that is impossible."""
    try:
        path.parent.mkdir(mode=DIRECTORY_MODE, parents=True, exist_ok=True)
        if path.exists() or path.is_symlink():
            if not stat.S_ISSOCK(path.lstat().st_mode):
                raise StartupError(f"control socket {path}: exists and is not a socket; "
                                   f"remove it or set [control] socket", EX_OSERR)
            pid = _listener_pid(path)
            if pid is not None:
                raise StartupError(_in_use_message(path, pid), EX_OSERR)
            path.unlink()        # stale: left by a daemon that did not exit cleanly
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        old = os.umask(0o177)
        try:
            sock.bind(str(path))
        finally:
            os.umask(old)
        os.chmod(path, SOCKET_MODE)
        sock.listen(16)
        sock.setblocking(False)
        return sock
    except StartupError:
        raise
    except OSError as exc:
        raise StartupError(f"control socket {path}: {exc.strerror or exc}", EX_OSERR) from None


def _peer_uid(writer: asyncio.StreamWriter) -> int | None:
    sock = writer.get_extra_info("socket")
    if sock is None:
        return None
    try:
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except OSError:
        return None
    _pid, uid, _gid = struct.unpack("3i", creds)
    return uid


class ControlServer:
    def __init__(self, sock: socket.socket, path: Path, handlers: dict[str, Handler],
                 capture: CaptureHub | None = None) -> None:
        self.sock = sock
        self.path = path
        self.handlers = handlers
        self.capture = capture
        self._inode = os.stat(path).st_ino
        self._server: asyncio.AbstractServer | None = None
        self._clients: set[asyncio.Task[None]] = set()
        self._errors = RateLimitedLog(log, interval=60.0)

    async def start(self) -> None:
        self._server = await asyncio.start_unix_server(self._client, sock=self.sock,
                                                       limit=MAX_REQUEST_BYTES)

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._clients.add(task)
        try:
            await self._serve(reader, writer)
        except (ConnectionError, asyncio.CancelledError):
            pass
        except Exception as exc:  # noqa: BLE001 -- one bad client must never stop the daemon
            self._errors.warning("request", "control socket: request failed: %r", exc)
        finally:
            if task is not None:
                self._clients.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        uid = _peer_uid(writer)
        if uid is not None and uid not in (0, os.geteuid()):
            # Take the request off the socket first (bounded): closing with unread data makes
            # the kernel reset the connection, and the client would lose the answer.
            with contextlib.suppress(TimeoutError, ValueError, asyncio.LimitOverrunError):
                await asyncio.wait_for(reader.readline(), REFUSAL_READ_SECONDS)
            await self._answer(writer, {"ok": False, "error": PERMISSION_DENIED})
            return
        try:
            line = await asyncio.wait_for(reader.readline(), REQUEST_TIMEOUT_SECONDS)
            request = json.loads(line)
        except (TimeoutError, ValueError, asyncio.LimitOverrunError) as exc:
            await self._answer(writer, {"ok": False, "error": f"bad request: {exc}"})
            return
        if not isinstance(request, dict) or not isinstance(request.get("command"), str):
            await self._answer(writer, {"ok": False, "error": "bad request: expected "
                                                              "{\"command\": ...}"})
            return
        command = request["command"]
        if command == "capture":
            await self._capture(reader, writer, request)
            return
        handler = self.handlers.get(command)
        if handler is None:
            known = ", ".join(sorted([*self.handlers, "capture"]))
            await self._answer(writer, {"ok": False,
                                        "error": f"unknown command {command!r} ({known})"})
            return
        await self._answer(writer, {"ok": True, "result": handler(request)})

    async def _answer(self, writer: asyncio.StreamWriter, message: dict[str, Any]) -> None:
        writer.write(json.dumps(message).encode() + b"\n")
        await writer.drain()

    async def _capture(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                       request: dict[str, Any]) -> None:
        if self.capture is None:
            await self._answer(writer, {"ok": False, "error": "capture is not available"})
            return
        try:
            session = self.capture.open(writer, request)
        except CaptureError as exc:
            await self._answer(writer, {"ok": False, "error": str(exc)})
            return
        req = session.request
        await self._answer(writer, {"ok": True, "result": {
            "link": self.capture.link, "direction": req.direction, "peer": req.peer, "count": req.count,
            "seconds": req.seconds}})
        eof = asyncio.ensure_future(reader.read(1))   # the client closing ends the session
        waiters: set[asyncio.Future[Any]] = {eof, session.done}
        try:
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        finally:
            eof.cancel()
            self.capture.close(session)
        with contextlib.suppress(ConnectionError):
            await asyncio.wait_for(writer.drain(), REQUEST_TIMEOUT_SECONDS)

    async def close(self) -> None:
        if self.capture is not None:
            self.capture.shutdown()
        if self._server is not None:
            self._server.close()
        for task in list(self._clients):
            task.cancel()
        if self._clients:
            await asyncio.wait(list(self._clients), timeout=2)
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)
        self.remove_file()

    def remove_file(self) -> None:
        """Remove the socket path, unless another daemon has replaced it since."""
        try:
            if os.stat(self.path).st_ino == self._inode:
                os.unlink(self.path)
        except OSError as exc:
            if exc.errno != errno.ENOENT:
                log.warning("removing control socket %s: %s", self.path, exc.strerror or exc)
