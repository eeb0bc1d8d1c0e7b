"""The fuzz harness (overlayd/fuzz) inside the normal suite: its seed corpus, every input it
ever found something with, and proof that its structured generators reach the deep paths.

1. Every seed in tests/fuzz_corpus/<target>/ runs without a new finding (both kernels, both
   directions; a seed may show a known open finding of another branch: seeds are for reach).
2. Every input in tests/fuzz_corpus/regressions/<target>/ once broke a property; each must now
   run clean, strictly: a known open finding fails too. A forwarder's is the decoded case in
   JSON, which `python3 -m overlayd.fuzz TARGET --minimise FILE` writes, so changing a generator
   does not void it. The ones whose fix belongs to another branch of issue 10 are strict xfails
   (XPASS fails: un-xfail them when that branch is merged).
3. The seeds of each forwarder reach what the generators exist for: TSO superpackets, UDP GSO
   sends, GRO runs, coalesced device writes, ICMP errors (routed), floods (switched), and a
   fair part of the drop reasons.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from overlayd.fuzz import engine, targets
from overlayd.fuzz.forwarders import Finding, case_from_json
from overlayd.ops.capture import CaptureError, parse_request

CORPUS = Path(__file__).resolve().parent / "fuzz_corpus"
REGRESSIONS = CORPUS / "regressions"

# Reproducers of holes another helper of issue 10 is fixing: (target, file) -> xfail reason.
OPEN_ELSEWHERE: dict[tuple[str, str], str] = {}


@pytest.fixture(scope="module", autouse=True)
def _needs_extension() -> None:
    try:
        importlib.import_module("overlayd._dataplane")
    except ImportError as exc:
        if os.environ.get("OVERLAYD_DATAPLANE", "").strip().lower() == "cython":
            pytest.fail(f"OVERLAYD_DATAPLANE=cython but the extension does not import: {exc}")
        pytest.skip(f"the fuzz targets compare both kernels; extension not built: {exc}")


_open: dict[str, Any] = {}


@pytest.fixture(scope="module")
def target_of() -> Iterator[Any]:
    """One instance per target for the module (the forwarder ones hold sockets)."""
    def get(name: str) -> Any:
        if name not in _open:
            _open[name] = targets.make_target(name)
        return _open[name]

    yield get
    for target in _open.values():
        targets.close_target(target)
    _open.clear()


def _files(directory: Path) -> list[Any]:
    out = []
    for name in targets.TARGETS:
        for path in sorted((directory / name).glob("*")) if (directory / name).is_dir() else []:
            reason = OPEN_ELSEWHERE.get((name, path.name))
            marks = ([pytest.mark.xfail(strict=True, raises=Finding, reason=reason)]
                     if reason else [])
            out.append(pytest.param(name, path, id=f"{name}/{path.name}", marks=marks))
    return out


def _strict(labels: set[str]) -> set[str]:
    """A known open finding fails here as a new one would."""
    known = sorted(label for label in labels if label.startswith(targets.KNOWN_PREFIX))
    if known:
        raise Finding(f"known open finding(s): {known}")
    return labels


def _run_strict(target: Any, data: bytes) -> set[str]:
    return _strict(target(data))


@pytest.mark.parametrize(("name", "path"), _files(CORPUS))
def test_seed_runs_clean(target_of: Any, name: str, path: Path) -> None:
    target_of(name)(path.read_bytes())


@pytest.mark.parametrize(("name", "path"), _files(REGRESSIONS))
def test_regression_runs_clean(target_of: Any, name: str, path: Path) -> None:
    """A forwarder's regression is its decoded case (JSON), which generator changes leave
    valid; the other targets' are raw inputs."""
    if path.suffix == ".json":
        _strict(target_of(name).run_case(case_from_json(path.read_text())))
    else:
        _run_strict(target_of(name), path.read_bytes())


def test_every_target_has_seeds() -> None:
    assert all(len(list((CORPUS / name).glob("*"))) >= 2 for name in targets.TARGETS)


# What each forwarder's seeds must reach: the deep paths the structured generators exist for.
DEEP = {
    "udp": {"offload_superpackets", "offload_gso_sends", "offload_gro_receives",
            "offload_coalesced_writes", "icmp_sent", "inside_ttl_expired", "inside_too_big",
            "outside_spoofed_source", "delivered_packets", "forwarded_packets"},
    "routed": {"offload_superpackets", "offload_gso_sends", "offload_gro_receives",
               "offload_coalesced_writes", "icmp_sent", "outside_wrong_vni",
               "outside_wrong_inner_mac", "delivered_packets", "forwarded_packets"},
    "switched": {"offload_superpackets", "offload_gso_sends", "offload_gro_receives",
                 "offload_coalesced_writes", "flooded_copies", "fdb_full",
                 "outside_not_for_us", "delivered_packets", "forwarded_packets"},
}


@pytest.mark.parametrize("name", sorted(DEEP))
def test_seeds_reach_the_deep_paths(target_of: Any, name: str) -> None:
    reached: set[str] = set()
    for path in sorted((CORPUS / name).glob("*")):
        reached |= target_of(name)(path.read_bytes())
    assert DEEP[name] <= reached, f"never reached: {sorted(DEEP[name] - reached)}"
    generators = {label for label in reached if ":" in label}
    assert {"inside:tso", "inside:csum", "inside:icmp", "outside:gro", "outside:run",
            "outside:valid", "outside:raw", "inside:raw"} <= generators


def test_finding_is_raised_for_a_divergence(target_of: Any, monkeypatch: pytest.MonkeyPatch
                                            ) -> None:
    """The harness itself: a twin that corrupts the last byte of what it delivers (headers
    and counters stay right) must be reported, not passed."""
    from overlayd.dataplane import forwarder_base

    seed = next(p for p in sorted((CORPUS / "udp").glob("*"))
                if "delivered_packets" in target_of("udp")(p.read_bytes()))
    deliver = forwarder_base.ForwarderBase._deliver_to_device

    def corrupting(self: Any, pkt: Any, peer: int) -> None:
        data = bytearray(pkt)
        data[-1] ^= 0xFF
        deliver(self, memoryview(data), peer)

    monkeypatch.setattr(forwarder_base.ForwarderBase, "_deliver_to_device", corrupting)
    with pytest.raises(Finding, match="cython and python differ"):
        target_of("udp")(seed.read_bytes())


def test_minimise_keeps_the_finding() -> None:
    def target(data: bytes) -> set[str]:
        if data.count(7) >= 2:
            raise Finding("two sevens")
        return set()

    small = engine.minimise(target, bytes([1, 7, 3, 4, 7, 9, 9]), "two sevens")
    assert small == bytes([7, 7])


@pytest.mark.parametrize("request_", [{"direction": []}, {"direction": {}}, {"direction": 5}])
def test_capture_request_with_a_non_string_direction_is_refused(request_: dict[str, Any]
                                                                ) -> None:
    """Found by the control target: a list as direction raised TypeError (unhashable) out of
    the request handler, so the client got no answer at all."""
    daemon: Any = type("D", (), {"view": None})()
    with pytest.raises(CaptureError, match="expected inside or outside"):
        parse_request(daemon, request_)
