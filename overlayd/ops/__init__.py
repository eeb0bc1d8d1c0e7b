"""Operations: how overlayd talks to systemd, Prometheus, health checkers and its operator.

- ``sd_notify``: READY/RELOADING/STOPPING/STATUS/WATCHDOG messages on ``$NOTIFY_SOCKET``;
- ``state``: the daemon's live state as plain data (read on the event loop thread only);
- ``health``: the /healthz and /readyz verdicts from that state (sans-IO);
- ``metrics``: one custom Prometheus Collector reading the data plane's counters at scrape time;
- ``http_server``: /metrics, /healthz, /readyz on a thread of their own, never blocking the loop;
- ``control_socket``: the root-only unix socket behind ``overlayd status|peers|routes|fdb|capture``;
- ``capture``: copies of decapsulated packets, streamed to ``overlayd capture`` (only while one runs);
- ``commands`` and ``tables``: the CLI side of the control socket and its readable tables.

Nothing here is on the packet path: the data plane counts in C, and these modules read the
counts when somebody asks.
"""
