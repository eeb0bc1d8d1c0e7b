"""The fuzz targets: one function of input bytes each, raising Finding when a property breaks.

Each target returns the labels of the paths its input reached (generator names, and for the
forwarders every counter that moved), which the engines add up to show how deep the
generators get. Targets:

- ``udp``, ``routed``, ``switched``: the whole forwarders, both kernels, both directions,
  offloads on (forwarders.py);
- ``offload``: the offload kernels on their own (complete_checksum, segment_tcp4, coalesce),
  Cython against the twin;
- ``wire``: the wire parsers (IPv4, VXLAN, Ethernet, virtio header, ICMP error building) on
  bytes that are mostly a packet;
- ``config``: the daemon config and subnet map parsers on mutated TOML, and a map that parses
  turned into tables both kernels must accept alike;
- ``control``: the control socket's request parser, through a real ControlServer on a unix
  socket, and the capture request parser;
- ``wireguard``: the wireguard forwarder, both kernels on one keypair (wireguard.py).
"""

from __future__ import annotations

import asyncio
import importlib
import json
import os
import socket
import struct
import tempfile
import tomllib
from collections.abc import Callable
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any, Final

from overlayd.fuzz import forwarders as F
from overlayd.fuzz import packets as P
from overlayd.fuzz.forwarders import Finding
from overlayd.fuzz.source import ByteSource

Target = Callable[[bytes], set[str]]
KNOWN_PREFIX = "known:"


def known_labels(messages: list[str]) -> set[str]:
    """Labels naming the known open findings behind ``messages`` ("known:<issue>")."""
    return {f"{KNOWN_PREFIX}{F.known_issue(m)}" for m in messages}


# --- forwarders -------------------------------------------------------------------------------

class ForwarderTarget:
    def __init__(self, path: str) -> None:
        self.path = path
        self._rig: F.FuzzRig | None = None

    def __call__(self, data: bytes) -> set[str]:
        return self.run_case(F.draw_case(data, self.path))

    def run_case(self, case: F.Case) -> set[str]:
        if self._rig is None:
            self._rig = F.FuzzRig()
        cython, _, known = F.check_case(self._rig, case)
        labels = set(case.generators()) | known_labels(known)
        labels.update(name for name, value in cython.counters.items() if value)
        return labels

    def close(self) -> None:
        if self._rig is not None:
            self._rig.close()
            self._rig = None


# --- offload kernels --------------------------------------------------------------------------

def _kernels() -> tuple[ModuleType, ModuleType]:
    return (importlib.import_module("overlayd._dataplane"),
            importlib.import_module("overlayd.dataplane.offload"))


UDP_L4: Final = 5       # VIRTIO_NET_HDR_GSO_UDP_L4


def _as_udp(packet: bytes, l2: int) -> bytes:
    """A TCP superpacket's payload (its TCP header included) as one UDP superpacket, same
    IPv4 header fields; what does not parse as IPv4 comes back as it was."""
    ip = packet[l2:]
    if len(ip) < 20 or ip[0] >> 4 != 4:
        return packet
    ihl = max(20, (ip[0] & 0x0F) * 4)
    body = P.udp(ip[12:16], ip[16:20], ip[ihl:ihl + 65000])
    udp = P.ipv4(ip[12:16], ip[16:20], P.PROTO_UDP, body, ttl=ip[8], ident=int.from_bytes(
        ip[4:6], "big"), df=bool(ip[6] & 0x40))
    return packet[:l2] + udp


def offload_target(data: bytes) -> set[str]:
    cython, python = _kernels()
    src = ByteSource(data)
    l2 = src.choice((0, 14))
    labels = set()
    kind = src.below(3)
    if kind == 0:
        read = F.needs_csum(src, l2)
        packet = src.mutate(read[10:], 2)
        start, offset = struct.unpack_from("<HH", read, 6)
        a = cython.complete_checksum(packet, start, offset)
        b = python.complete_checksum(packet, start, offset)
        labels.add("complete_checksum" if a is not None else "complete_checksum:refused")
        if a != b:
            raise Finding(f"complete_checksum({packet.hex()}, {start}, {offset}) differs: "
                          f"cython {a!r}, python {b!r}")
    elif kind == 1:
        read = F.superpacket(src, l2)
        mss = struct.unpack_from("<H", read, 4)[0]
        packet = read[10:]
        a, b = cython.segment_tcp4(packet, l2, mss), python.segment_tcp4(packet, l2, mss)
        labels.add("segment_tcp4" if a is not None else "segment_tcp4:refused")
        if a != b:
            raise Finding(f"segment_tcp4(l2={l2}, mss={mss}) differs on {packet[:80].hex()}: "
                          f"cython {None if a is None else len(a)} segments, python "
                          f"{None if b is None else len(b)}")
        # The same superpacket as UDP (USO reads), and the TCP one, which both must refuse.
        for candidate in (packet, _as_udp(packet, l2)):
            a, b = cython.segment_udp4(candidate, l2, mss), python.segment_udp4(candidate, l2,
                                                                                 mss)
            labels.add("segment_udp4" if a is not None else "segment_udp4:refused")
            if a != b:
                raise Finding(f"segment_udp4(l2={l2}, mss={mss}) differs on "
                              f"{candidate[:80].hex()}: cython "
                              f"{None if a is None else len(a)} datagrams, python "
                              f"{None if b is None else len(b)}")
    else:
        case = F.Case("switched" if l2 else "udp", True, True, True, 64, 100, (1500,) * 3,
                      False, 0, [], device_uso=F.uso_of(data, True))
        packets: list[bytes] = []
        while len(packets) < 40 and src.remaining:
            for item in F.outside_items(src, case):
                size = item.gso_size or len(item.data) or 1
                for offset in range(0, len(item.data), size):
                    datagram = item.data[offset:offset + size]
                    packet = datagram[8:] if l2 else datagram
                    # The routed paths hand the coalescer only packets whose IPv4 header
                    # checksum they verified; the switched path checks nothing.
                    if l2 or P.header_checksum_ok(packet):
                        packets.append(packet)
        uso = case.device_uso
        a, b = cython.coalesce(packets, l2, uso), python.coalesce(packets, l2, uso)
        labels.add("coalesce:merged" if any(h[1] for h, _ in a) else "coalesce")
        if any(h[1] == UDP_L4 for h, _ in a):
            labels.add("coalesce:merged-udp")
        inner = [p[l2:] for p in packets if not l2 or p[12:14] == b"\x08\x00"]
        known: list[str] = []
        for writes in (a, b):       # what each merged must be mergeable (names a known issue)
            for header, body in writes:
                if header[1] & 0x7F == 1:
                    with F.unless_known(known):
                        F.check_coalesced(case, bytes(header) + bytes(body), inner)
                elif header[1] == UDP_L4:
                    F.check_udp_coalesced(case, bytes(header) + bytes(body), inner)
        labels |= known_labels(known)
        if known and a != b:
            return labels       # the known merge is the difference
        if a != b:
            raise Finding(f"coalesce(l2={l2}) differs on {len(packets)} packets: cython "
                          f"{len(a)} writes, python {len(b)}")
    return labels


# --- wire parsers -----------------------------------------------------------------------------

def wire_target(data: bytes) -> set[str]:
    from overlayd.dataplane import offload
    from overlayd.wire import ethernet, icmp, ipv4, vxlan

    src = ByteSource(data)
    if src.flag(70):
        packet = src.mutate(F.ip_packet(src) if src.flag() else F.icmp_trigger(src), 4)
    else:
        packet = src.blob(200)
    labels = set()
    reason = ipv4.validate(packet, verify_checksum=src.flag())
    labels.add(f"ipv4:{reason or 'valid'}")
    if reason is None:
        header = ipv4.parse_header(packet)
        if header.total_length != len(packet):
            raise Finding(f"validate passed a packet whose total length {header.total_length} "
                          f"!= {len(packet)}")
        if icmp.icmp_error_allowed(packet):
            labels.add("icmp:answered")
            error = icmp.build_icmp_error(int.from_bytes(F.LOCAL_ADDRESS, "big"), packet,
                                          src.choice((3, 11)), src.below(16), src.uint(2))
            if len(error) > 576 or not P.header_checksum_ok(error) or P.inet_sum(error[20:]):
                raise Finding(f"build_icmp_error made a bad packet: {error[:40].hex()}")
            if error[28:28 + min(len(packet), len(error) - 28)] != packet[:len(error) - 28]:
                raise Finding("the ICMP error does not quote the offending packet")
    frame = src.mutate(P.vxlan(F.VNI, P.ethernet(F.OUR_MAC, F.peer_mac(0), packet)), 3)
    labels.add(f"vxlan:{vxlan.check(frame, F.VNI, ethernet.HEADER_LEN) or 'valid'}")
    if len(packet) >= 20:           # the hashes' stated precondition
        vxlan.flow_hash_ipv4(packet)
    if len(frame) >= 22:
        vxlan.flow_hash_frame(frame[8:])
        ethernet.ethertype(frame[8:])
        ethernet.is_valid_source(ethernet.source(frame[8:]))
    if len(data) >= 10:
        offload.parse_vnet_hdr(data[:10])
    for text in (src.blob(20).decode("latin-1"), ethernet.format_mac(src.take(6))):
        try:
            mac = ethernet.parse_mac(text)
        except ValueError:
            labels.add("mac:refused")
        else:
            labels.add("mac:parsed")
            if ethernet.format_mac(mac) != text.lower():
                raise Finding(f"parse_mac/format_mac do not round-trip: {text!r}")
    return labels


# --- config and map ---------------------------------------------------------------------------

MAP_TEMPLATE: Final = """\
[network]
cidr = "{cidr}"
subnet_len = {subnet_len}
underlay_mtu = {mtu}

[backend]
type = "{backend}"
{mode}vni = {vni}
port = {port}
{nodes}"""
NODE_TEMPLATE: Final = """
[[nodes]]
name = "{name}"
subnet = "{subnet}"
public_ip = "{ip}"
{extra}"""
CONFIG_TEMPLATE: Final = """\
[node]
name = "{name}"
[map]
file = "map.toml"
poll_seconds = {poll}
[device]
name = "{device}"
[dataplane]
batch_size = {batch}
[switch]
fdb_max_entries = {fdb}
static_macs = [{{ mac = "{mac}", node = "{name}" }}]
[metrics]
listen = "{listen}"
"""


def _value(src: ByteSource, good: str, bad: tuple[str, ...]) -> str:
    return good if src.flag(80) else src.choice(bad)


def _map_text(src: ByteSource) -> str:
    nodes = []
    for i in range(src.between(0, 4)):
        extra = src.choice(("", f'vtep_mac = "02:00:00:00:00:0{i}"\n',
                            'routes = ["172.20.0.0/16"]\n', 'underlay_mtu = 9000\n',
                            'vtep_mac = "zz"\n', 'routes = ["0.0.0.0/0"]\n'))
        nodes.append(NODE_TEMPLATE.format(
            name=_value(src, f"host{i}", ("", "host0", "x" * 300, "a\\u0000b")),
            subnet=_value(src, f"10.9.{i}.0/24", ("10.9.0.0/24", "10.9.0.1/24", "10.10.0.0/24",
                                                  "10.9.0.0/16", "garbage", "10.9.256.0/24")),
            ip=_value(src, f"192.0.2.{i + 1}", ("192.0.2.1", "::1", "300.1.1.1", "", "0.0.0.0")),
            extra=extra))
    return MAP_TEMPLATE.format(
        cidr=_value(src, "10.9.0.0/16", ("10.9.0.0/33", "10.9.0.1/16", "nonsense", "0.0.0.0/0")),
        subnet_len=_value(src, "24", ("16", "0", "33", "-1", "\"24\"", "1e3")),
        mtu=_value(src, "1500", ("100", "70000", "1500.5", "true")),
        backend=_value(src, src.choice(("udp", "vxlan")), ("wireguard", "", "UDP")),
        mode=src.choice(("", 'mode = "switched"\n', 'mode = "routed"\n', 'mode = "bridge"\n')),
        vni=_value(src, "1", ("0", "16777216", "-5", "\"x\"")),
        port=_value(src, "8472", ("0", "65536", "-1")),
        nodes="".join(nodes))


def _config_text(src: ByteSource) -> str:
    return CONFIG_TEMPLATE.format(
        name=_value(src, "host0", ("nosuch", "")),
        poll=_value(src, "2.0", ("-1", "nan", "inf", "\"2\"")),
        device=_value(src, "overlay0", ("x" * 16, "", "bad/name", "a b")),
        batch=_value(src, "64", ("0", "513", "1.5")),
        fdb=_value(src, "16384", ("0", str(1 << 25), "-1")),
        mac=_value(src, "02:00:00:00:0a:01", ("ff:ff:ff:ff:ff:ff", "00:00:00:00:00:00", "x")),
        listen=_value(src, "127.0.0.1:9585", ("127.0.0.1", ":99999", "[::1]:80", "")))


class ConfigTarget:
    """Parse a mutated map and config; a map that parses must become tables that both kernels
    accept (or refuse) alike."""

    def __init__(self) -> None:
        self._dir = tempfile.TemporaryDirectory(prefix="overlayd-fuzz-")
        self._fds: list[socket.socket] = []
        self._forwarders: dict[str, list[Any]] | None = None

    def _kernel_forwarders(self) -> dict[str, list[Any]]:
        if self._forwarders is None:
            a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
            self._fds = [a, b]
            out: dict[str, list[Any]] = {}
            for name, module in (("cython", importlib.import_module("overlayd._dataplane")),
                                 ("python", importlib.import_module(
                                     "overlayd.dataplane.python_kernels"))):
                out[name] = [module.UdpForwarder(a.fileno(), b.fileno(), 4, 1),
                             module.VxlanRoutedForwarder(a.fileno(), b.fileno(), F.OUR_MAC, 1,
                                                         (), 4, 1),
                             module.VxlanSwitchForwarder(a.fileno(), b.fileno(), 1, (), 4, 64)]
            self._forwarders = out
        return self._forwarders

    def __call__(self, data: bytes) -> set[str]:
        from overlayd.control import config, local_node, subnet_map
        from overlayd.control.problems import ConfigError

        src = ByteSource(data)
        labels: set[str] = set()
        map_text = _map_text(src)
        config_text = _config_text(src)
        if src.flag(20):
            map_text = src.mutate(map_text.encode(), 4).decode("utf-8", "replace")
        directory = Path(self._dir.name)
        (directory / "map.toml").write_text(map_text)
        (directory / "overlayd.toml").write_text(config_text)
        try:
            config.load_config(directory / "overlayd.toml")
        except ConfigError as exc:
            labels.add("config:rejected")
            for problem in exc.problems:
                if not str(problem.file).endswith(".toml"):
                    raise Finding(f"a config problem names no file: {problem!r}") from None
        else:
            labels.add("config:loaded")
        try:
            smap = subnet_map.parse_subnet_map(tomllib.loads(map_text), "map.toml")
        except (ConfigError, tomllib.TOMLDecodeError):
            labels.add("map:rejected")
            return labels
        labels.add("map:parsed")
        for node in smap.nodes:
            view = local_node.build_local_view(smap, node, smap.underlay_mtu_of(node))
            tables = [view.tables, view.tables, local_node.build_switch_tables(view, ())]
            results: dict[str, list[str]] = {}
            for kernel, forwarders in self._kernel_forwarders().items():
                results[kernel] = []
                for fwd, table in zip(forwarders, tables, strict=True):
                    try:
                        fwd.set_tables(table)
                        results[kernel].append("ok")
                    except ValueError as exc:
                        results[kernel].append(f"refused: {exc}")
            if results["cython"] != results["python"]:
                raise Finding(f"set_tables differs for node {node.name}: {results}")
            labels.update(f"tables:{r.split(':')[0]}" for r in results["cython"])
        return labels

    def close(self) -> None:
        self._forwarders = None
        for s in self._fds:
            s.close()
        self._dir.cleanup()


# --- control socket ---------------------------------------------------------------------------

COMMANDS: Final = ("status", "peers", "routes", "fdb", "capture", "nosuch", "")


class ControlTarget:
    """One real ControlServer on a unix socket; each input is one client request."""

    def __init__(self) -> None:
        self._dir = tempfile.TemporaryDirectory(prefix="overlayd-fuzz-")
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: Any = None
        self._path = Path(self._dir.name) / "control.sock"

    def _start(self) -> asyncio.AbstractEventLoop:
        from overlayd.ops import control_socket

        loop = asyncio.new_event_loop()
        def handler(request: dict[str, Any]) -> Any:
            return {"command": request.get("command"), "keys": len(request)}

        handlers: dict[str, control_socket.Handler] = dict.fromkeys(
            ("status", "peers", "routes", "fdb"), handler)
        self._server = control_socket.ControlServer(control_socket.bind(self._path),
                                                    self._path, handlers)
        loop.run_until_complete(self._server.start())
        self._loop = loop
        return loop

    def __call__(self, data: bytes) -> set[str]:
        loop = self._loop or self._start()
        src = ByteSource(data)
        request: Any = None
        if src.flag(70):
            request = {"command": src.choice(COMMANDS)}
            for _ in range(src.below(4)):
                request[src.choice(("direction", "peer", "count", "seconds", "x"))] = src.choice(
                    ("inside", "outside", "peer0", 0, 1, -1, 1e308, True, None, [], {}, "x" * 50))
            if src.flag(10):
                request = src.choice(([request], "status", 5, None))
            line = json.dumps(request).encode()
        else:
            line = src.blob(300)
        line = src.mutate(line, 2) + (b"\n" if src.flag(90) else b"")
        answer = loop.run_until_complete(asyncio.wait_for(self._ask(line), 10))
        _capture_request(request, src)
        return {f"control:{'ok' if answer.get('ok') else 'refused'}"}

    async def _ask(self, line: bytes) -> dict[str, Any]:
        reader, writer = await asyncio.open_unix_connection(str(self._path))
        try:
            writer.write(line)
            await writer.drain()
            writer.write_eof()
            raw = await reader.read()
        finally:
            writer.close()
        lines = raw.split(b"\n")
        if len(lines) != 2 or lines[1]:
            raise Finding(f"control socket answered {raw[:200]!r} to {line[:100]!r}, not one line")
        answer = json.loads(lines[0])
        if not isinstance(answer, dict) or not isinstance(answer.get("ok"), bool):
            raise Finding(f"control socket answer without ok: {answer!r}")
        if not answer["ok"] and not isinstance(answer.get("error"), str):
            raise Finding(f"a refusal without an error text: {answer!r}")
        return answer

    def close(self) -> None:
        if self._loop is not None:
            self._loop.run_until_complete(self._server.close())
            self._loop.close()
            self._loop = None
        self._dir.cleanup()


def _capture_request(request: Any, src: ByteSource) -> None:
    """capture.parse_request refuses a bad request with CaptureError, nothing else."""
    from overlayd.ops.capture import CaptureError, parse_request

    if not isinstance(request, dict):
        return
    peers = [SimpleNamespace(name=f"peer{i}", public_ip=f"192.0.2.{i}") for i in range(3)]
    daemon: Any = SimpleNamespace(view=SimpleNamespace(peers=peers) if src.flag(90) else None)
    try:
        parse_request(daemon, request)
    except CaptureError:
        pass


# --- the registry -----------------------------------------------------------------------------

def make_target(name: str) -> Any:
    """A fresh target by name (forwarder and socket targets hold fds: call close())."""
    if name in F.PATHS:
        return ForwarderTarget(name)
    if name == "config":
        return ConfigTarget()
    if name == "control":
        return ControlTarget()
    if name == "wireguard":
        from overlayd.fuzz.wireguard import WireguardTarget

        return WireguardTarget()
    return {"offload": offload_target, "wire": wire_target}[name]


TARGETS: Final = (*F.PATHS, "offload", "wire", "config", "control", "wireguard")


def close_target(target: Any) -> None:
    close = getattr(target, "close", None)
    if close is not None:
        close()


def environment_problems() -> list[str]:
    """Why the targets cannot run here (the forwarder targets need the extension)."""
    try:
        importlib.import_module("overlayd._dataplane")
    except ImportError as exc:
        return [(f"the Cython extension does not import ({exc}); build it first: "
                 "python3 setup.py -q build_ext --inplace")]
    return [] if os.path.exists("/proc/self") else ["needs Linux"]
