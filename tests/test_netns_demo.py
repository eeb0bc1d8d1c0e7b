"""`overlayd demo`: its arguments, the one-line refusal without root, and a real run."""

from __future__ import annotations

import os
import shutil

import pytest
from netns_helpers import netns_required, own_namespaces

from overlayd import demo


def test_not_root_is_one_clear_line(monkeypatch: pytest.MonkeyPatch,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert demo.main([]) == demo.EX_NOPERM
    out, err = capsys.readouterr()
    assert out == ""
    assert err.count("\n") == 1 and "needs root" in err


@pytest.mark.parametrize("argv", [["--hosts", "1"], ["--hosts", "9"], ["--bytes", "lots"],
                                  ["--backend", "carrier-pigeon"]])
def test_bad_arguments_are_usage_errors(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        demo.main(argv)
    assert exc.value.code == 2


@pytest.mark.parametrize(("text", "value"), [("50M", 50_000_000), ("1g", 10**9),
                                             ("2000", 2000), ("1.5MB", 1_500_000)])
def test_byte_counts(text: str, value: int) -> None:
    assert demo._byte_count(text) == value


@netns_required
@pytest.mark.parametrize("backend", ["udp", "vxlan-switched", "wireguard"])
def test_demo_runs_and_leaves_nothing(capsys: pytest.CaptureFixture[str], backend: str) -> None:
    before = own_namespaces()
    assert demo.main(["--hosts", "2", "--bytes", "5M", "--pings", "1",
                      "--backend", backend]) == 0
    out = capsys.readouterr().out
    assert "== PASS" in out and "sha256 matches" in out
    if backend == "wireguard":
        assert "sealed PASS" in out and "on its underlay ul0 0 (sealed)" in out
    assert own_namespaces() == before


@netns_required
@pytest.mark.skipif(shutil.which("etcd") is None and not os.path.exists("/usr/bin/etcd"),
                    reason="etcd-server is not installed")
@pytest.mark.parametrize("backend", ["vxlan", "wireguard"])
def test_demo_with_etcd_claims_subnets_and_a_joining_host_is_reached(
        capsys: pytest.CaptureFixture[str], backend: str) -> None:
    before = own_namespaces()
    assert demo.main(["--hosts", "2", "--bytes", "1M", "--pings", "1", "--map", "etcd",
                      "--backend", backend]) == 0
    out = capsys.readouterr().out
    assert "== PASS" in out and "join   PASS" in out and "claimed 10.77." in out
    if backend == "wireguard":      # leases carry each node's key; the joiner is sealed too
        assert "sealed PASS" in out
    assert "PUBLIC IP" in out                     # `overlayd net leases` listed the claims
    assert own_namespaces() == before
