"""Stock WireGuard peers for the lab: Debian's ``wireguard-go`` configured with ``wg``.

The interop tests' independent implementation: nothing from overlayd configures it, only the
tools a person would use (``wireguard-go -f DEV``, ``wg set``, ``ip``). Its UAPI socket lives in
/var/run/wireguard (shared by every namespace), so device names carry the run prefix.
"""

from __future__ import annotations

import base64
import shutil
import time
from pathlib import Path

from overlayd.lab import netns
from overlayd.lab.netns import LabError
from overlayd.lab.processes import DaemonProcess

UAPI_WAIT_S = 10.0


def wireguard_go_unavailable() -> str | None:
    """Why this machine cannot run a wireguard-go peer, or None."""
    for tool in ("wireguard-go", "wg"):
        if shutil.which(tool) is None:
            return f"{tool!r} is not installed (Debian: wireguard-go wireguard-tools)"
    return None


def b64(key: bytes) -> str:
    return base64.b64encode(key).decode()


class WireguardGoPeer:
    """One wireguard-go interface in namespace ``ns``, addressed ``address`` (CIDR)."""

    def __init__(self, ns: str, device: str, private_key: bytes, listen_port: int,
                 address: str, workdir: Path, mtu: int = 1440) -> None:
        self.ns, self.device, self.port = ns, device, listen_port
        self.key_file = workdir / f"{device}.key"
        self.key_file.write_text(b64(private_key) + "\n")
        self.key_file.chmod(0o600)
        self.process = DaemonProcess(ns, ["wireguard-go", "-f", device],
                                     workdir / f"{device}.log")
        self._wait_uapi()
        self.wg("set", device, "private-key", str(self.key_file), "listen-port", str(listen_port))
        netns.add_address(ns, device, address)
        netns.ip("-n", ns, "link", "set", device, "mtu", str(mtu), "up")

    def _wait_uapi(self) -> None:
        deadline = time.monotonic() + UAPI_WAIT_S
        while time.monotonic() < deadline:
            if not self.process.alive():
                raise LabError(f"wireguard-go died: {self.process.log_tail()}")
            if netns.ns_run(self.ns, ["wg", "show", self.device], check=False).returncode == 0:
                return
            time.sleep(0.05)
        raise LabError(f"wireguard-go {self.device}: no UAPI socket after {UAPI_WAIT_S} s")

    def wg(self, *args: str) -> str:
        return netns.ns_run(self.ns, ["wg", *args]).stdout

    def set_peer(self, public_key: bytes, allowed_ips: str, endpoint: str | None = None,
                 persistent_keepalive: int = 0, preshared_key_file: Path | None = None) -> None:
        args = ["set", self.device, "peer", b64(public_key), "allowed-ips", allowed_ips]
        if endpoint:
            args += ["endpoint", endpoint]
        if persistent_keepalive:
            args += ["persistent-keepalive", str(persistent_keepalive)]
        if preshared_key_file is not None:
            args += ["preshared-key", str(preshared_key_file)]
        self.wg(*args)

    def latest_handshakes(self) -> dict[str, int]:
        """Public key (base64) -> unix time of its latest handshake (0 = none)."""
        out: dict[str, int] = {}
        for line in self.wg("show", self.device, "latest-handshakes").splitlines():
            key, _, when = line.partition("\t")
            out[key] = int(when or 0)
        return out

    def endpoints(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for line in self.wg("show", self.device, "endpoints").splitlines():
            key, _, where = line.partition("\t")
            out[key] = where
        return out

    def stop(self) -> None:
        self.process.stop()
