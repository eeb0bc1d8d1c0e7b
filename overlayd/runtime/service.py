"""Run one Daemon under uvloop until it is told to stop."""

from __future__ import annotations

import logging
from types import ModuleType

import uvloop

from overlayd.control.config import DaemonConfig
from overlayd.control.subnet_map import SubnetMap
from overlayd.runtime.daemon import Daemon

log = logging.getLogger("overlayd")


def serve(config: DaemonConfig, smap: SubnetMap, dataplane: ModuleType) -> int:
    daemon = Daemon(config, smap, dataplane, dataplane.IMPLEMENTATION)
    try:
        daemon.start()
        uvloop.run(daemon.run())
    finally:
        daemon.close()
    log.info("stopped")
    return 0
