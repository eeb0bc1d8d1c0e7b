"""overlayd: a userspace overlay-network daemon (tun/tap + UDP/VXLAN tunnels, flannel compatible)."""

__version__ = "0.1.0"
