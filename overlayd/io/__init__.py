"""I/O adapters: file descriptors, sockets and netlink. No packet logic lives here."""
