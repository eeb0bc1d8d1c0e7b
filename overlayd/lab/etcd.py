"""Real etcd 3.4 processes for tests, the demo and the benchmark: one member or a cluster.

    with EtcdCluster([EtcdMemberSpec("etcd1", "10.99.0.10", ns=ns)]) as etcd:
        ...etcd.endpoints...                         # ["http://10.99.0.10:2379"]
    with loopback_cluster(3) as etcd:                # 127.0.0.1, free ports, root namespace
        etcd.kill_member("etcd2"); etcd.restart_member("etcd2")
    with Lab(3, start=False) as lab, underlay_cluster(lab, 3) as etcd:   # on a lab's underlay
        ...

Each member runs in the namespace the caller names (daemons in a namespace cannot reach the root
namespace's loopback, so a lab puts etcd on its own underlay), on the address the caller gives,
with its data in a temporary directory removed on stop. Members run under DaemonProcess (killed
by `timeout` even if this process dies), are stopped and killed by pid, and start-up waits until
every member's /health says true, bounded in time. A member that dies while we wait raises
LabError with the end of its log.

The health probe for a member inside a namespace runs inside it too:
``python3 -m overlayd.lab.etcd health URL SECONDS [CA CERT KEY]``.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Protocol, Self

from overlayd.lab.netns import LabError, ns_run, run_prefix
from overlayd.lab.processes import DEFAULT_LIFETIME_S, DaemonProcess

if TYPE_CHECKING:
    from overlayd.lab.hosts import LabHost

START_TIMEOUT_S = 30.0       # a member is healthy within ~2 s on an idle machine; CI is not idle
STOP_GRACE_S = 5.0
PORT_ATTEMPTS = 3            # loopback: fresh ports when another process took ours meanwhile
_UNSUPPORTED_ARCH = {"aarch64": "arm64", "armv7l": "arm", "s390x": "s390x"}   # uname -> GOARCH


def etcd_binary() -> str | None:
    """Path of the etcd server binary (Debian's etcd-server puts it in /usr/bin), or None."""
    return shutil.which("etcd") or (os.path.exists("/usr/bin/etcd") and "/usr/bin/etcd") or None


def etcd_unavailable() -> str | None:
    """Why etcd cannot be started here, or None."""
    if etcd_binary() is None:
        return "etcd is not installed (Debian: apt-get install etcd-server)"
    return None


@dataclass(frozen=True, slots=True)
class EtcdTLS:
    """TLS for the client port. With client_cert_auth etcd accepts only clients whose
    certificate ca_file signed; the lab's health probe then presents probe_cert/probe_key."""

    ca_file: Path
    cert_file: Path               # the server's; its SANs must cover every member address
    key_file: Path
    client_cert_auth: bool = True
    probe_cert_file: Path | None = None
    probe_key_file: Path | None = None


@dataclass(frozen=True, slots=True)
class EtcdMemberSpec:
    name: str
    address: str                  # an IPv4 address of ns (127.0.0.1 in the root namespace)
    ns: str | None = None         # None: the root namespace
    client_port: int = 2379
    peer_port: int = 2380


class EtcdMember:
    def __init__(self, spec: EtcdMemberSpec, workdir: Path, scheme: str) -> None:
        self.spec = spec
        self.name = spec.name
        self.client_url = f"{scheme}://{spec.address}:{spec.client_port}"
        self.peer_url = f"http://{spec.address}:{spec.peer_port}"
        self.data_dir = workdir / f"{spec.name}.etcd"
        self.log_path = workdir / f"{spec.name}.log"
        self.process: DaemonProcess | None = None
        self.frozen = False

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None and self.process.alive() else None

    def alive(self) -> bool:
        return self.process is not None and self.process.alive()

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


class EtcdCluster:
    """The members given, started together as one new cluster (a single spec: a lone member)."""

    def __init__(self, members: Sequence[EtcdMemberSpec], *, tls: EtcdTLS | None = None,
                 start_timeout_s: float = START_TIMEOUT_S,
                 lifetime_s: int = DEFAULT_LIFETIME_S) -> None:
        if not members:
            raise LabError("an etcd cluster needs at least one member")
        if len({m.name for m in members}) != len(members):
            raise LabError("etcd member names must be unique")
        binary = etcd_binary()
        if binary is None:
            raise LabError(etcd_unavailable() or "etcd is not installed")
        self.binary = binary
        self.tls = tls
        self.start_timeout_s = start_timeout_s
        self.lifetime_s = lifetime_s
        self.token = run_prefix("ovd-etcd")
        self.workdir = Path(tempfile.mkdtemp(prefix=f"{self.token}-"))
        scheme = "https" if tls is not None else "http"
        self.members = [EtcdMember(spec, self.workdir, scheme) for spec in members]

    # -- queries ------------------------------------------------------------------------------

    @property
    def endpoints(self) -> list[str]:
        return [m.client_url for m in self.members]

    def member(self, name: str) -> EtcdMember:
        for m in self.members:
            if m.name == name:
                return m
        raise LabError(f"no etcd member {name!r} (have: {', '.join(m.name for m in self.members)})")

    def member_at(self, endpoint: str) -> EtcdMember:
        """The member serving a client URL (e.g. the one a store currently uses)."""
        for m in self.members:
            if m.client_url == endpoint:
                return m
        raise LabError(f"no etcd member serves {endpoint}")

    def logs(self, lines: int = 15) -> str:
        return "\n".join(f"--- {m.name} ({m.log_path}):\n{m.log_tail(lines)}" for m in self.members)

    # -- life cycle ---------------------------------------------------------------------------

    def start(self) -> Self:
        """Start every member (a new cluster has no leader until a quorum runs), then wait.
        A started cluster is returned as it is (so ``with loopback_cluster()`` starts once)."""
        if any(m.process is not None for m in self.members):
            return self
        try:
            for m in self.members:
                self._launch(m)
            # By name, not "every running one": a member that already exited must fail the start.
            self.wait_healthy([m.name for m in self.members])
        except BaseException:
            self.stop()
            raise
        return self

    def wait_healthy(self, names: Sequence[str] | None = None,
                     timeout_s: float | None = None) -> None:
        """Block until each named member (default: every running one) answers /health true."""
        deadline = time.monotonic() + (timeout_s or self.start_timeout_s)
        chosen = [self.member(n) for n in names] if names is not None else [
            m for m in self.members if m.alive()]
        for m in chosen:
            self._wait_member(m, deadline)

    def kill_member(self, name: str) -> None:
        """SIGKILL one member (a crash: no goodbye to its peers) and reap it."""
        m = self.member(name)
        if m.process is not None and m.process.alive():
            m.process.signal(signal.SIGKILL)    # ends a frozen (stopped) member too
            m.frozen = False
            try:
                m.process.wrapper.wait(timeout=STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                m.process.stop(grace_s=0.0)

    def freeze_member(self, name: str) -> None:
        """SIGSTOP one member: its sockets stay open but it answers nothing (a hung server, or
        one behind a silent network partition). ``thaw_member`` lets it go on."""
        m = self.member(name)
        if m.process is not None:
            m.process.signal(signal.SIGSTOP)
            m.frozen = True

    def thaw_member(self, name: str) -> None:
        m = self.member(name)
        if m.process is not None:
            m.process.signal(signal.SIGCONT)
            m.frozen = False

    def stop_member(self, name: str) -> int | None:
        """SIGTERM one member (a clean shutdown); its exit code."""
        m = self.member(name)
        if m.frozen:
            self.thaw_member(name)           # a stopped process would sit on our SIGTERM
        return m.process.stop(grace_s=STOP_GRACE_S) if m.process is not None else None

    def restart_member(self, name: str, *, wait: bool = True) -> None:
        """Start a stopped or killed member again on its own data (it rejoins its cluster)."""
        m = self.member(name)
        if m.alive():
            raise LabError(f"etcd member {name} is still running")
        self._launch(m)
        m.frozen = False
        if wait:
            self.wait_healthy([name])

    def stop(self) -> None:
        """Stop every member and remove the data. Safe to call more than once."""
        for m in self.members:
            if m.process is not None:
                self.stop_member(m.name)
        shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    # -- internals ----------------------------------------------------------------------------

    def _argv(self, m: EtcdMember) -> list[str]:
        initial = ",".join(f"{x.name}={x.peer_url}" for x in self.members)
        argv = [self.binary, "--name", m.name, "--data-dir", str(m.data_dir),
                "--listen-client-urls", m.client_url, "--advertise-client-urls", m.client_url,
                "--listen-peer-urls", m.peer_url, "--initial-advertise-peer-urls", m.peer_url,
                "--initial-cluster", initial, "--initial-cluster-state", "new",
                "--initial-cluster-token", self.token,
                "--logger", "zap", "--log-outputs", "stderr"]
        if self.tls is not None:
            argv += ["--cert-file", str(self.tls.cert_file), "--key-file", str(self.tls.key_file),
                     "--trusted-ca-file", str(self.tls.ca_file),
                     f"--client-cert-auth={'true' if self.tls.client_cert_auth else 'false'}"]
        return argv

    def _launch(self, m: EtcdMember) -> None:
        # ETCD_* variables would silently override our flags; etcd gets none of them, except
        # the one etcd 3.4 demands on architectures it calls unsupported (arm64 among them).
        env = {k: v for k, v in os.environ.items() if not k.startswith("ETCD_")}
        goarch = _UNSUPPORTED_ARCH.get(platform.machine())
        if goarch is not None:
            env["ETCD_UNSUPPORTED_ARCH"] = goarch
        m.process = DaemonProcess(m.spec.ns, self._argv(m), m.log_path,
                                  lifetime_s=self.lifetime_s, env=env)

    def _probe_args(self, m: EtcdMember) -> list[str]:
        if self.tls is None:
            return []
        files = [self.tls.ca_file, self.tls.probe_cert_file, self.tls.probe_key_file]
        return [str(f) if f is not None else "" for f in files]

    def _wait_member(self, m: EtcdMember, deadline: float) -> None:
        while True:
            left = deadline - time.monotonic()
            if m.process is None or not m.process.alive():
                raise LabError(f"etcd member {m.name} exited while starting:\n{m.log_tail()}")
            if left <= 0:
                raise LabError(f"etcd member {m.name} not healthy at {m.client_url} within "
                               f"{self.start_timeout_s:g}s:\n{m.log_tail()}")
            # Probe in slices so a member that dies meanwhile is noticed within a second.
            slice_s = min(left, 1.0)
            if m.spec.ns is None:
                healthy = probe_health(m.client_url, slice_s, *self._probe_args(m))
            else:
                proc = ns_run(m.spec.ns, [sys.executable, "-m", "overlayd.lab.etcd", "health",
                                          m.client_url, f"{slice_s:.2f}", *self._probe_args(m)],
                              timeout=slice_s + 10.0, check=False)
                healthy = proc.returncode == 0
            if healthy:
                return


def probe_health(url: str, seconds: float, ca_file: str = "", cert_file: str = "",
                 key_file: str = "") -> bool:
    """True once GET url/health answers {"health": "true"}, polling for at most ``seconds``."""
    context = None
    if url.startswith("https://"):
        context = ssl.create_default_context(cafile=ca_file or None)
        if cert_file:
            context.load_cert_chain(cert_file, key_file or None)
    deadline = time.monotonic() + seconds
    while True:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=max(0.2, seconds),
                                        context=context) as answer:
                if json.loads(answer.read()).get("health") == "true":
                    return True
        except (OSError, urllib.error.URLError, ValueError):
            pass
        if time.monotonic() + 0.1 >= deadline:
            return False
        time.sleep(0.1)


def free_loopback_ports(count: int) -> list[int]:
    """Ports free on 127.0.0.1 right now (held open together, so they differ)."""
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def loopback_cluster(size: int = 1, *, tls: EtcdTLS | None = None,
                     start_timeout_s: float = START_TIMEOUT_S,
                     lifetime_s: int = DEFAULT_LIFETIME_S) -> EtcdCluster:
    """A started cluster of ``size`` members on 127.0.0.1 in the root namespace, for client
    tests that need no namespace. Members are etcd1..etcdN. Stop it (or use ``with``)."""
    last: LabError | None = None
    for _ in range(PORT_ATTEMPTS):
        ports = free_loopback_ports(2 * size)
        specs = [EtcdMemberSpec(f"etcd{i + 1}", "127.0.0.1", None, ports[2 * i], ports[2 * i + 1])
                 for i in range(size)]
        cluster = EtcdCluster(specs, tls=tls, start_timeout_s=start_timeout_s,
                              lifetime_s=lifetime_s)
        try:
            return cluster.start()
        except LabError as exc:
            if "address already in use" not in str(exc):
                raise
            last = exc
    assert last is not None
    raise last


class UnderlayLab(Protocol):
    """What underlay_cluster needs of a lab (overlayd.lab.Lab has it)."""

    def add_bystander(self, name: str = ..., address: str | None = ...) -> LabHost: ...


def underlay_cluster(lab: UnderlayLab, size: int = 1, *, tls: EtcdTLS | None = None,
                     start_timeout_s: float = START_TIMEOUT_S,
                     lifetime_s: int = DEFAULT_LIFETIME_S) -> EtcdCluster:
    """A started cluster of ``size`` members etcd1..etcdN, each in a namespace of its own on
    the lab's underlay bridge (so every lab host reaches it, and nothing outside the lab
    does). The lab removes those namespaces; stop the cluster first (or use ``with``)."""
    hosts = [lab.add_bystander(f"etcd{i}") for i in range(1, size + 1)]
    specs = [EtcdMemberSpec(h.name, h.underlay_ip, ns=h.netns) for h in hosts]
    return EtcdCluster(specs, tls=tls, start_timeout_s=start_timeout_s,
                       lifetime_s=lifetime_s).start()


def _main(argv: list[str]) -> int:
    if len(argv) >= 3 and argv[0] == "health":
        return 0 if probe_health(argv[1], float(argv[2]), *argv[3:6]) else 1
    print("usage: python3 -m overlayd.lab.etcd health URL SECONDS [CA CERT KEY]", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
