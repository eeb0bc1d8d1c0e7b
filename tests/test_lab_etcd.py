"""overlayd.lab.etcd: real etcd members start bounded, fail loudly, and leave nothing behind."""

from __future__ import annotations

import os
import socket
import time

import pytest
from etcd_helpers import ETCD_MARKS

from overlayd.lab.etcd import EtcdCluster, EtcdMemberSpec, free_loopback_ports, loopback_cluster
from overlayd.lab.netns import LabError

pytestmark = ETCD_MARKS


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_stop_ends_every_member_and_removes_the_data() -> None:
    cluster = loopback_cluster(3)
    pids = [m.pid for m in cluster.members]
    assert all(pid is not None for pid in pids) and len(set(pids)) == 3
    assert cluster.workdir.is_dir()
    cluster.stop()
    assert all(gone(pid) for pid in pids if pid is not None)
    assert not cluster.workdir.exists()
    assert [m.pid for m in cluster.members] == [None, None, None]
    cluster.stop()                                   # twice is fine


def test_a_killed_member_restarts_on_its_own_data_with_a_new_pid() -> None:
    with loopback_cluster(3) as cluster:
        member = cluster.member("etcd2")
        old = member.pid
        cluster.kill_member("etcd2")
        assert member.pid is None and old is not None and gone(old)
        with pytest.raises(LabError, match="still running"):
            cluster.restart_member("etcd1")
        cluster.restart_member("etcd2")
        assert member.pid not in (None, old)
        assert (member.data_dir / "member").is_dir()


def test_a_member_that_cannot_start_fails_fast_with_its_log() -> None:
    client_port, peer_port = free_loopback_ports(2)
    holder = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    holder.bind(("127.0.0.1", client_port))
    holder.listen(1)
    cluster = EtcdCluster([EtcdMemberSpec("etcd1", "127.0.0.1", None, client_port, peer_port)],
                          start_timeout_s=20)
    began = time.monotonic()
    try:
        with pytest.raises(LabError) as caught:
            cluster.start()
    finally:
        holder.close()
    took = time.monotonic() - began
    assert took < 10, f"{took:.1f}s: {caught.value}"
    assert "etcd1 exited while starting" in str(caught.value), caught.value
    assert "address already in use" in str(caught.value), caught.value
    assert not cluster.workdir.exists() and not cluster.members[0].alive()


def test_bad_cluster_specs_are_refused() -> None:
    with pytest.raises(LabError, match="at least one member"):
        EtcdCluster([])
    spec = EtcdMemberSpec("a", "127.0.0.1")
    with pytest.raises(LabError, match="unique"):
        EtcdCluster([spec, spec])
