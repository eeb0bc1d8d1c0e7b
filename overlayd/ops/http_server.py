"""/metrics, /healthz and /readyz over HTTP, served from threads so the event loop never waits.

1. The listening socket is bound at start (before READY=1), so a taken port is a startup error
   with one clear line, not a silent gap in monitoring.
2. Each request runs on its own thread (http.server.ThreadingHTTPServer). It reads the daemon only
   through ``LoopBridge.call``: the read is scheduled on the event loop and waited for with a
   timeout. So the data plane is only ever touched from its own thread, and a loop that does not
   answer makes /healthz say so (503) instead of hanging or reading torn state.
3. No per-request log lines: a scraper every 15 s would drown the journal.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import errno
import logging
import socket
import sys
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, TypeVar

from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import CollectorRegistry

from overlayd.errors import EX_OSERR, StartupError
from overlayd.ops.health import Verdict
from overlayd.rate_limited_log import RateLimitedLog

log = logging.getLogger("overlayd")

T = TypeVar("T")

LOOP_TIMEOUT_SECONDS = 2.0   # a loop that cannot run one short callback in 2 s is not alive


class LoopUnavailable(Exception):
    """The event loop did not run the read in time, or is gone."""


class LoopBridge:
    """Run a short function on the event loop from another thread and wait for its result."""

    def __init__(self, loop: asyncio.AbstractEventLoop,
                 timeout: float = LOOP_TIMEOUT_SECONDS) -> None:
        self.loop = loop
        self.timeout = timeout

    def call(self, fn: Callable[[], T]) -> T:
        future: concurrent.futures.Future[T] = concurrent.futures.Future()

        def run() -> None:
            if not future.set_running_or_notify_cancel():
                return           # the caller gave up already
            try:
                future.set_result(fn())
            except Exception as exc:  # noqa: BLE001 -- re-raised in the caller's thread
                future.set_exception(exc)

        try:
            self.loop.call_soon_threadsafe(run)
        except RuntimeError:      # loop closed: the daemon is shutting down
            raise LoopUnavailable("the daemon is stopping") from None
        try:
            return future.result(self.timeout)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise LoopUnavailable(f"event loop did not respond within {self.timeout:g} s") \
                from None


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], registry: CollectorRegistry,
                 verdict: Callable[[], Verdict]) -> None:
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.registry = registry
        self.verdict = verdict
        self.errors = RateLimitedLog(log, interval=60.0)
        super().__init__(address, _Handler)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # socketserver's default prints a traceback to stderr per failed request.
        exc = sys.exc_info()[1]
        if isinstance(exc, ConnectionError):
            return          # the scraper hung up: nothing to say
        self.errors.warning("http", "metrics/health request from %s failed: %r",
                            client_address, exc)


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    server_version = "overlayd"
    protocol_version = "HTTP/1.0"

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path == "/metrics":
            self._metrics()
        elif path in ("/healthz", "/readyz"):
            self._health(ready=path == "/readyz")
        elif path == "/":
            self._send(200, "text/plain; charset=utf-8",
                       b"overlayd: /metrics (Prometheus), /healthz (alive), /readyz (ready)\n")
        else:
            self._send(404, "text/plain; charset=utf-8", b"not found\n")

    def _metrics(self) -> None:
        encoder, content_type = choose_encoder(self.headers.get("Accept", ""))
        try:
            body = encoder(self.server.registry)
        except LoopUnavailable as exc:
            self._send(503, "text/plain; charset=utf-8", f"unavailable: {exc}\n".encode())
            return
        self._send(200, content_type, body)

    def _health(self, ready: bool) -> None:
        try:
            verdict = self.server.verdict()
        except LoopUnavailable as exc:
            self._send(503, "text/plain; charset=utf-8", f"unhealthy: {exc}\n".encode())
            return
        ok = verdict.ready if ready else verdict.healthy
        if ok:
            self._send(200, "text/plain; charset=utf-8", b"ok\n")
            return
        # /healthz lists only what makes the daemon unhealthy; /readyz everything in the way.
        problems = verdict.problems if ready else verdict.live_problems
        word = "not ready" if ready else "unhealthy"
        body = word + ": " + "; ".join(problems) + "\n"
        self._send(503, "text/plain; charset=utf-8", body.encode())

    def _send(self, code: int, content_type: str, body: bytes) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)


class OpsHttpServer:
    """The metrics/health listener; ``start`` serves it on a daemon thread, ``close`` stops it."""

    def __init__(self, host: str, port: int, registry: CollectorRegistry,
                 verdict: Callable[[], Verdict]) -> None:
        try:
            self._server = _Server((host, port), registry, verdict)
        except OSError as exc:
            where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
            if exc.errno == errno.EADDRINUSE:
                why = "the port is in use (another overlayd on this host? set [metrics] listen)"
            elif exc.errno == errno.EADDRNOTAVAIL:
                why = "not an address of this host"
            else:
                why = exc.strerror or str(exc)
            raise StartupError(f"metrics listener {where}: {why}", EX_OSERR) from None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        address = self._server.server_address
        host, port = str(address[0]), int(address[1])    # an AF_INET/AF_INET6 address
        host_text = f"[{host}]" if ":" in host else host
        return f"http://{host_text}:{port}"

    def start(self) -> None:
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={
            "poll_interval": 0.25}, name="overlayd-http", daemon=True)
        self._thread.start()

    def close(self) -> None:
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join(timeout=5)
            self._thread = None
        self._server.server_close()
