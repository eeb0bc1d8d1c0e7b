"""Create the tun or tap device (python-pytun) and keep one raw, non-blocking fd for the data plane.

The data plane is handed ``fd`` once. If the device is deleted under us, ``reopen`` creates it
again and moves the new file onto the same fd number (dup2), so the forwarder, its buffers and
its counters carry on untouched.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket

import pytun

from overlayd.errors import EX_NOPERM, EX_OSERR, EX_UNAVAILABLE, StartupError

TUN_PATH = "/dev/net/tun"
TUNSETPERSIST = 0x400454CB  # _IOW('T', 203, int), <linux/if_tun.h>
TUNSETOFFLOAD = 0x400454D0  # _IOW('T', 208, unsigned int)
IFF_VNET_HDR = 0x4000
IFF_MULTI_QUEUE = 0x0100    # each open of the name attaches one more queue (one per thread)
# What the kernel may hand us: packets with a partial checksum (we finish it) and TCPv4
# superpackets, ECN-marked ones included (we cut them into segments, cext/offload.pxi).
TUN_F_CSUM = 0x01
TUN_F_TSO4 = 0x02
TUN_F_TSO_ECN = 0x08
OFFLOAD_FLAGS = TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO_ECN
# USO (kernel >= 6.2): UDP superpackets both ways - the kernel hands over runs an application
# sent with UDP_SEGMENT (we cut them), and takes runs of one UDP flow we write as one. The
# kernel accepts USO4 only together with USO6 (its one feature bit covers both); older kernels
# refuse the flags with EINVAL, and the device then runs with OFFLOAD_FLAGS alone.
TUN_F_USO4 = 0x20
TUN_F_USO6 = 0x40
USO_FLAGS = TUN_F_USO4 | TUN_F_USO6


class OverlayDevice:
    """A tun (L3: one read is one IP packet) or tap (L2: one read is one Ethernet frame) device,
    opened with IFF_NO_PI so reads and writes carry nothing but the packet or frame.

    Not persistent unless ``persist`` is set: closing the fd (or the daemon dying) removes the
    device with its addresses and routes.

    With ``offload``, the device is opened with IFF_VNET_HDR (every read and write carries a
    10-byte virtio-net header) and TUNSETOFFLOAD lets the kernel hand over TCP superpackets
    and unfinished checksums. ``vnet_hdr`` says whether reads carry the header; ``tso``
    whether the kernel accepted the offload flags (it may refuse on an old kernel, and then
    sends plain packets, still behind a header). With ``uso`` too, USO_FLAGS are asked for
    as well; ``uso`` afterwards says whether the kernel took them.

    With ``queues`` > 1 the device is multi-queue: ``fds`` holds one fd per queue (``fd`` is
    the first), and the kernel spreads flows over the queues by flow hash.
    """

    def __init__(self, name: str, kind: str = "tun", persist: bool = False,
                 offload: bool = False, queues: int = 1, uso: bool = False) -> None:
        if kind not in ("tun", "tap"):
            raise ValueError(f"device kind {kind!r}: expected tun or tap")
        self.name = name
        self.kind = kind
        self.persist = persist
        self.vnet_hdr = offload
        self.tso = False
        self.want_uso = offload and uso
        self.uso = False
        self.queues = queues
        self.fds: list[int] = []
        try:
            for _ in range(queues):
                self.fds.append(self._open_dup())
        except BaseException:
            for fd in self.fds:
                os.close(fd)
            raise
        self.fd = self.fds[0]

    def _open_dup(self) -> int:
        flags = (pytun.IFF_TUN if self.kind == "tun" else pytun.IFF_TAP) | pytun.IFF_NO_PI
        if self.vnet_hdr:
            flags |= IFF_VNET_HDR
        if self.queues > 1:
            flags |= IFF_MULTI_QUEUE
        dev = _open(self.name, self.kind, flags)
        try:
            if self.persist:
                dev.persist(True)
            if self.vnet_hdr:
                self.tso, self.uso = _set_offload(dev.fileno(), self.want_uso)
            fd = os.dup(dev.fileno())
        finally:
            dev.close()   # our dup keeps the device attached
        os.set_blocking(fd, False)
        return fd

    def fileno(self) -> int:
        return self.fd

    def exists(self) -> bool:
        """Whether the device is still there (someone may have run `ip link del`)."""
        try:
            socket.if_nametoindex(self.name)
        except OSError:
            return False
        return True

    def reopen(self) -> None:
        """Create the device again and put each queue on the same fd number."""
        for target in self.fds:
            fd = self._open_dup()
            try:
                os.dup2(fd, target)
            finally:
                os.close(fd)
            os.set_blocking(target, False)

    def close(self, keep: bool = False) -> None:
        if self.fd < 0:
            return
        if not keep and self.persist:
            # A persistent device outlives its fds; clear the flag so closing removes it.
            try:
                fcntl.ioctl(self.fd, TUNSETPERSIST, 0)
            except OSError:
                pass
        for fd in self.fds:
            os.close(fd)
        self.fds = []
        self.fd = -1


def _set_offload(fd: int, uso: bool) -> tuple[bool, bool]:
    """TUNSETOFFLOAD with USO if asked and taken, else without: (tso, uso) in effect."""
    if uso:
        try:
            fcntl.ioctl(fd, TUNSETOFFLOAD, OFFLOAD_FLAGS | USO_FLAGS)
            return True, True
        except OSError:
            pass                # before 6.2: no USO; the rest may still be taken
    try:
        fcntl.ioctl(fd, TUNSETOFFLOAD, OFFLOAD_FLAGS)
        return True, False
    except OSError:
        return False, False


def tune_device_sysctls(name: str) -> None:
    """Per-device kernel settings the routed overlay needs (only this device is touched).

    - accept_local: ICMP errors the data plane writes into the device come from this node's
      overlay address, which is also the device's own address; without this the kernel drops
      them as martians and `ping -t 1` or PMTU discovery never hear back. The kernel has no
      per-address form of it, so it also lets in packets with any other address of this host
      as source; the data plane therefore refuses every inner packet from a peer whose source
      is one of this host's addresses (ForwardingTables.host_addresses, re-read every few
      seconds: outside_local_source) and every martian (RFC 1812 5.3.7), before the device
      sees it. What accept_local admits is then only what the data plane itself wrote.
    - disable_ipv6: the overlay is IPv4; IPv6 router solicitations would only be counted drops.
    """
    for path in (f"/proc/sys/net/ipv4/conf/{name}/accept_local",
                 f"/proc/sys/net/ipv6/conf/{name}/disable_ipv6"):
        try:
            with open(path, "w") as f:
                f.write("1")
        except OSError:
            pass  # IPv6 off on the host, or a read-only /proc/sys: nothing more to do


def _open(name: str, kind: str, flags: int) -> pytun.TunTapDevice:
    try:
        return pytun.TunTapDevice(name=name, flags=flags, dev=TUN_PATH)
    except pytun.Error as exc:
        code = exc.args[0] if exc.args and isinstance(exc.args[0], int) else 0
        if code in (errno.ENOENT, errno.ENODEV, errno.ENXIO):
            raise StartupError(f"{TUN_PATH} is missing: load the tun module (modprobe tun) or "
                               f"give the container the device", EX_UNAVAILABLE) from None
        if code in (errno.EPERM, errno.EACCES):
            raise StartupError(f"not permitted to create {kind} device {name!r}: run as root or "
                               f"with CAP_NET_ADMIN", EX_NOPERM) from None
        if code == errno.EBUSY:
            raise StartupError(f"device name {name!r} is already in use (another overlayd, or "
                               f"another device of that name): set [device] name",
                               EX_OSERR) from None
        if code == errno.EINVAL:
            raise StartupError(f"device name {name!r} belongs to a device that is not a {kind} "
                               f"device: set [device] name", EX_OSERR) from None
        raise StartupError(f"cannot create {kind} device {name!r}: {exc}", EX_OSERR) from None
