"""The CLI side of the control socket: `overlayd status|peers|routes|fdb|capture`.

The socket is found from ``--socket PATH``, else from the daemon config (``-c``, default
/etc/overlayd/overlayd.toml: ``[control] socket``, default /run/overlayd/<device>.sock). Only
those two keys are read, so a config whose map is broken still finds its daemon.

Exit statuses (sysexits.h): 0 done; 69 no daemon listening (or capture unsupported by its data
plane); 77 not permitted (the socket is root only); 78 the config named by -c is unreadable;
1 the daemon refused the request. Each failure is one line on stderr.
"""

from __future__ import annotations

import argparse
import json
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from overlayd.control.problems import read_toml
from overlayd.errors import EX_NOPERM, EX_UNAVAILABLE, EX_USAGE
from overlayd.ops import capture as cap
from overlayd.ops import tables
from overlayd.ops.control_socket import PERMISSION_DENIED

COMMANDS = {"status", "peers", "routes", "fdb", "capture"}

DEFAULT_CONFIG = "/etc/overlayd/overlayd.toml"
DEFAULT_DEVICE = "overlay0"
TIMEOUT_SECONDS = 5.0
CAPTURE_GRACE_SECONDS = 2.0   # past --seconds, the client stops even if the daemon did not


class ClientError(Exception):
    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


def add_subcommands(sub: Any) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-c", "--config", default=None,
                        help=f"daemon config that names the control socket (default "
                             f"{DEFAULT_CONFIG})")
    common.add_argument("--socket", default=None, help="control socket path (overrides -c)")
    as_json = argparse.ArgumentParser(add_help=False)
    as_json.add_argument("--json", action="store_true", help="print JSON for scripts")

    sub.add_parser("status", parents=[common, as_json],
                   help="the running daemon: node, device, map, traffic, drops, health")
    sub.add_parser("peers", parents=[common, as_json],
                   help="peers with their endpoints, prefixes and traffic")
    sub.add_parser("routes", parents=[common, as_json],
                   help="the forwarding table (longest prefixes first)")
    sub.add_parser("fdb", parents=[common, as_json],
                   help="the MAC table of a switched backend")
    capture = sub.add_parser("capture", parents=[common],
                             help="write the daemon's decapsulated traffic to a pcap file")
    capture.add_argument("-w", "--write", required=True, metavar="FILE",
                         help="pcap file to write ('-' for stdout, e.g. | tcpdump -r -)")
    capture.add_argument("--peer", help="only traffic to/from this peer (name or public IP)")
    capture.add_argument("--direction", choices=("inside", "outside"),
                         help="inside: read from the device, toward peers; outside: received "
                              "from peers (default: both)")
    capture.add_argument("--count", type=int, metavar="N", help="stop after N packets")
    capture.add_argument("--seconds", type=float, metavar="S", help="stop after S seconds")


def run(args: argparse.Namespace) -> int:
    try:
        path = socket_path(args.socket, args.config)
        if args.command == "capture":
            return run_capture(args, path)
        result = request(path, {"command": args.command})
    except ClientError as exc:
        print(f"overlayd {args.command}: {exc}", file=sys.stderr)
        return exc.code
    except OSError as exc:    # whatever else the socket says: one line, never a traceback
        print(f"overlayd {args.command}: talking to overlayd failed: {exc.strerror or exc}",
              file=sys.stderr)
        return EX_UNAVAILABLE
    if args.json:
        print(json.dumps(result, indent=2, sort_keys=True))
        return 0
    renderers: dict[str, Callable[[Any], str]] = {
        "status": tables.render_status, "peers": tables.render_peers,
        "routes": tables.render_routes, "fdb": tables.render_fdb}
    print(renderers[args.command](result))
    return 0


def socket_path(explicit: str | None, config: str | None) -> Path:
    if explicit:
        return Path(explicit)
    config_path = Path(config or DEFAULT_CONFIG)
    if config is None and not config_path.exists():
        return Path(f"/run/overlayd/{DEFAULT_DEVICE}.sock")
    data = read_toml(config_path)          # ConfigError (exit 78) names the file and reason
    control = data.get("control") if isinstance(data.get("control"), dict) else {}
    device = data.get("device") if isinstance(data.get("device"), dict) else {}
    text = control.get("socket") if isinstance(control, dict) else None
    if isinstance(text, str) and text:
        return Path(text)
    name = device.get("name") if isinstance(device, dict) else None
    return Path(f"/run/overlayd/{name if isinstance(name, str) and name else DEFAULT_DEVICE}.sock")


def connect(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(TIMEOUT_SECONDS)
    try:
        sock.connect(str(path))
    except (FileNotFoundError, ConnectionRefusedError):
        sock.close()
        raise ClientError(f"overlayd is not running (nothing listens on {path})",
                          EX_UNAVAILABLE) from None
    except PermissionError:
        sock.close()
        raise ClientError(f"permission denied on {path}: the control socket is root only",
                          EX_NOPERM) from None
    except OSError as exc:
        sock.close()
        raise ClientError(f"cannot reach overlayd on {path}: {exc.strerror or exc}",
                          EX_UNAVAILABLE) from None
    return sock


def _read_line(sock: socket.socket) -> bytes:
    data = bytearray()
    while not data.endswith(b"\n"):
        try:
            chunk = sock.recv(65536 if not data else 4096, socket.MSG_PEEK)
        except TimeoutError:
            raise ClientError("overlayd did not answer in time", EX_UNAVAILABLE) from None
        except ConnectionResetError:
            chunk = b""
        if not chunk:
            raise ClientError("overlayd closed the connection without an answer",
                              EX_UNAVAILABLE)
        end = chunk.find(b"\n")
        take = len(chunk) if end < 0 else end + 1
        data += sock.recv(take)             # consume only the answer line, not what follows
    return bytes(data)


def _answer(sock: socket.socket) -> Any:
    try:
        message = json.loads(_read_line(sock))
    except ValueError as exc:
        raise ClientError(f"unreadable answer from overlayd: {exc}", EX_UNAVAILABLE) from None
    if not message.get("ok"):
        error = str(message.get("error", "request refused"))
        if error == PERMISSION_DENIED:
            raise ClientError(f"{error}: the control socket is for root (or the daemon's user) "
                              f"only", EX_NOPERM)
        raise ClientError(error, EX_UNAVAILABLE if error == cap.NOT_SUPPORTED else 1)
    return message.get("result")


def request(path: Path, message: dict[str, Any]) -> Any:
    sock = connect(path)
    try:
        try:
            sock.sendall(json.dumps(message).encode() + b"\n")
        except (BrokenPipeError, ConnectionResetError):
            pass      # the daemon answered and closed before reading (a refusal): read why
        return _answer(sock)
    finally:
        sock.close()


# -- capture -------------------------------------------------------------------------------------


def _recv_exact(sock: socket.socket, n: int, deadline: float | None) -> bytes | None:
    """n bytes, or None at the deadline or when the daemon closed the stream."""
    buf = bytearray()
    while len(buf) < n:
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            sock.settimeout(left)
        else:
            sock.settimeout(None)
        try:
            chunk = sock.recv(n - len(buf))
        except TimeoutError:
            return None
        if not chunk:
            return None
        buf += chunk
    return bytes(buf)


def run_capture(args: argparse.Namespace, path: Path) -> int:
    import dpkt

    if args.count is not None and args.count < 1:
        print("overlayd capture: --count must be >= 1", file=sys.stderr)
        return EX_USAGE
    if args.seconds is not None and args.seconds <= 0:
        print("overlayd capture: --seconds must be > 0", file=sys.stderr)
        return EX_USAGE
    sock = connect(path)
    out: IO[bytes] | None = None
    written = 0
    summary: dict[str, Any] = {}
    # SIGTERM ends a capture like Ctrl-C does: the file is flushed and the summary printed.
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler) if main_thread else None
    try:
        sock.sendall(json.dumps({"command": "capture", "peer": args.peer,
                                 "direction": args.direction, "count": args.count,
                                 "seconds": args.seconds}).encode() + b"\n")
        link = (_answer(sock) or {}).get("link", "ip")
        try:
            out = sys.stdout.buffer if args.write == "-" else open(args.write, "wb")  # noqa: SIM115
        except OSError as exc:
            raise ClientError(f"{args.write}: {exc.strerror or exc}", 73) from None  # EX_CANTCREAT
        # Routed paths: inner IP packets in Linux cooked headers (direction and peer kept).
        # A switched (tap) path carries whole Ethernet frames: written as they are.
        ethernet = link == "ethernet"
        pcap = dpkt.pcap.Writer(out, snaplen=65535, linktype=cap.LINKTYPE_ETHERNET if ethernet
                                else cap.LINKTYPE_LINUX_SLL)
        out.flush()
        scope = ", ".join([f"direction {args.direction or 'both'}",
                           f"peer {args.peer or 'any'}"]
                          + ([f"{args.count} packets"] if args.count else [])
                          + ([f"{args.seconds:g} s"] if args.seconds else []))
        print(f"overlayd capture: writing to {args.write} ({scope}); Ctrl-C to stop",
              file=sys.stderr)
        deadline = (time.monotonic() + args.seconds + CAPTURE_GRACE_SECONDS
                    if args.seconds else None)
        while True:
            header = _recv_exact(sock, cap.RECORD.size, deadline)
            if header is None:
                break
            ts, kind, peer_ip, length = cap.RECORD.unpack(header)
            payload = _recv_exact(sock, length, deadline) if length else b""
            if payload is None:
                break
            if kind == cap.END:
                summary = json.loads(payload or b"{}")
                break
            pcap.writepkt(payload if ethernet else cap.sll_frame(kind, peer_ip, payload), ts=ts)
            out.flush()
            written += 1
            if args.count is not None and written >= args.count:
                break
    except KeyboardInterrupt:
        summary.setdefault("reason", "interrupted")
    except ClientError as exc:
        print(f"overlayd capture: {exc}", file=sys.stderr)
        return exc.code
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)
        sock.close()
        if out is not None:
            out.flush()
            if out is not sys.stdout.buffer:
                out.close()
    reason = summary.get("reason", "stopped")
    dropped = summary.get("dropped", 0)
    note = (f"; {dropped} packets dropped because this reader fell behind" if dropped else "")
    print(f"overlayd capture: {written} packets written to {args.write} ({reason}){note}",
          file=sys.stderr)
    return 0
