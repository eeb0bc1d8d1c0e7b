"""``python3 -m overlayd.fuzz``: fuzz the parsers and the forwarders for a bounded time.

    python3 -m overlayd.fuzz                          # every target, 60 s each, atheris
    python3 -m overlayd.fuzz udp switched --seconds 600 --corpus /var/tmp/overlayd-corpus
    python3 -m overlayd.fuzz --engine random --seconds 10 --strict

Each target runs in a child process of its own (libFuzzer ends its process when the time is
up). The seeds in tests/fuzz_corpus/<target>/ are read, never written; new corpus entries go
to ``--corpus DIR/<target>`` (a temporary directory when not given) and inputs that found
something to ``--crashes DIR`` (default ./fuzz-crashes). It prints, per target, the executions
and how many inputs reached each path (generator, and every data-plane counter that moved),
and exits 1 when any target found something new (known open findings, see
forwarders.KNOWN_OPEN, are listed but fail only with ``--strict``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

from overlayd.fuzz import engine

SEEDS = Path(__file__).resolve().parents[2] / "tests" / "fuzz_corpus"
ALL_TARGETS = ("udp", "routed", "switched", "offload", "wire", "config", "control")
# What a structured generator exists for: printed first, so a run shows whether they got there.
DEEP_PATHS = ("offload_superpackets", "offload_segments", "offload_gso_sends",
              "offload_gro_receives", "offload_coalesced_writes", "icmp_sent",
              "flooded_copies", "fdb_full", "delivered_packets", "forwarded_packets")


def _arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python3 -m overlayd.fuzz",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("targets", nargs="*", default=list(ALL_TARGETS),
                        help=f"targets to run (default: all of {', '.join(ALL_TARGETS)})")
    parser.add_argument("--seconds", type=float, default=60.0, help="per target (default 60)")
    parser.add_argument("--engine", choices=("atheris", "random"), default="atheris")
    parser.add_argument("--corpus", type=Path, help="keep the growing corpus here (per target)")
    parser.add_argument("--seeds", type=Path, default=SEEDS, help="seed corpus (read only)")
    parser.add_argument("--crashes", type=Path, default=Path("fuzz-crashes"))
    parser.add_argument("--strict", action="store_true",
                        help="known open findings fail the run too")
    parser.add_argument("--seed", type=int, default=int(time.time()), help="random engine")
    parser.add_argument("--minimise", type=Path, metavar="FILE",
                        help="shrink the input in FILE (one target) to FILE.min, keeping its "
                             "finding")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--stats", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    unknown = [t for t in args.targets if t not in ALL_TARGETS]
    if unknown:
        parser.error(f"unknown target(s) {unknown}; choose from {', '.join(ALL_TARGETS)}")
    if (args.minimise is not None or args.child) and len(args.targets) != 1:
        parser.error("--minimise needs exactly one target")
    return args


def _child(args: argparse.Namespace) -> int:
    """Run one target in this process (started by the parent with --child)."""
    (name,) = args.targets
    stats = engine.Stats(name, args.engine, args.stats)
    seeds = args.seeds / name if args.seeds is not None else None
    if args.engine == "atheris":
        try:
            import atheris  # type: ignore[import-not-found,unused-ignore]
        except ImportError:
            print("overlayd.fuzz: atheris is not installed; using the random engine",
                  file=sys.stderr)
            args.engine = stats.engine = "random"
    if args.engine == "atheris":
        with atheris.instrument_imports(include=["overlayd"]):
            from overlayd.fuzz import targets
    else:
        from overlayd.fuzz import targets
    problems = targets.environment_problems()
    if problems:
        print(f"overlayd.fuzz: {'; '.join(problems)}", file=sys.stderr)
        return 2
    target = targets.make_target(name)
    try:
        if args.engine == "atheris":
            return engine.run_atheris(target, stats, args.seconds, args.corpus, seeds,
                                      args.crashes, args.strict)
        return engine.run_random(target, stats, args.seconds, args.corpus, seeds,
                                 args.crashes, args.strict, args.seed)
    finally:
        stats.write(force=True)
        targets.close_target(target)


def _summary(stats: dict[str, object], returncode: int) -> str:
    labels = stats.get("labels") or {}
    known = stats.get("known") or {}
    findings = stats.get("findings") or []
    assert isinstance(labels, dict) and isinstance(known, dict) and isinstance(findings, list)
    execs = int(str(stats.get("execs", 0)))
    seconds = float(str(stats.get("seconds", 0))) or 1.0
    head = (f"{stats.get('target')}: {execs} execs in {seconds:.0f} s ({execs / seconds:.0f}/s), "
            f"{len(findings)} new finding(s), exit {returncode}")
    lines = [head]
    deep = [f"{k} {labels[k]}" for k in DEEP_PATHS if k in labels]
    if deep:
        lines.append("  deep paths (inputs reaching): " + ", ".join(deep))
    generators = [f"{k} {v}" for k, v in sorted(labels.items()) if ":" in k]
    if generators:
        lines += textwrap.wrap("generators/outcomes: " + ", ".join(generators), 100,
                               initial_indent="  ", subsequent_indent="    ")
    drops = [f"{k} {v}" for k, v in sorted(labels.items())
             if ":" not in k and k not in DEEP_PATHS and not k.endswith(("_packets", "_bytes"))]
    if drops:
        lines += textwrap.wrap(f"other counters ({len(drops)}): " + ", ".join(drops), 100,
                               initial_indent="  ", subsequent_indent="    ")
    for issue, count in sorted(known.items()):
        lines.append(f"  known open finding: {issue}: {count} input(s)")
    for finding in findings:
        lines.append(f"  NEW FINDING: {finding}")
    return "\n".join(lines)


def _minimise(args: argparse.Namespace) -> int:
    from overlayd.fuzz import targets

    (name,) = args.targets
    target = targets.make_target(name)
    try:
        data = args.minimise.read_bytes()
        wanted = engine.signature(lambda: target(data))
        if wanted is None:
            print(f"{args.minimise}: no finding on target {name}", file=sys.stderr)
            return 1
        small = engine.minimise(target, data, wanted)
        _write_minimised(args, name, target, data, small, wanted)
    finally:
        targets.close_target(target)
    return 0


def _write_minimised(args: argparse.Namespace, name: str, target: object, data: bytes,
                     small: bytes, message: str) -> None:
    out = args.minimise.with_name(args.minimise.name + ".min")
    out.write_bytes(small)
    print(f"{len(data)} -> {len(small)} bytes, {out}: {message[:200]}")
    if name in ALL_TARGETS[:3]:     # a forwarder: also the decoded case, which stays valid
        from overlayd.fuzz.forwarders import case_to_json, draw_case  # when generators change

        case_file = args.minimise.with_name(args.minimise.name + ".json")
        case = engine.minimise_case(target, draw_case(small, name), message)
        case_file.write_text(case_to_json(case))
        print(f"the case as JSON (keep this one as a regression): {case_file}")


def main(argv: list[str] | None = None) -> int:
    args = _arguments(argv)
    if args.child:
        return _child(args)
    if args.minimise is not None:
        return _minimise(args)
    failed = False
    with tempfile.TemporaryDirectory(prefix="overlayd-fuzz-") as tmp:
        corpus_root = args.corpus or Path(tmp) / "corpus"
        for name in args.targets:
            stats_file = Path(tmp) / f"{name}.json"
            cmd = [sys.executable, "-m", "overlayd.fuzz", name, "--child",
                   "--engine", args.engine, "--seconds", str(args.seconds),
                   "--corpus", str(corpus_root / name), "--seeds", str(args.seeds),
                   "--crashes", str(args.crashes.resolve()), "--stats", str(stats_file),
                   "--seed", str(args.seed)] + (["--strict"] if args.strict else [])
            try:
                proc = subprocess.run(cmd, timeout=args.seconds + 120, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True, env=os.environ.copy(),
                                      check=False)
                returncode, output = proc.returncode, proc.stdout
            except subprocess.TimeoutExpired as exc:
                returncode, output = -1, f"timed out: {exc}"
            stats = json.loads(stats_file.read_text()) if stats_file.exists() else {
                "target": name}
            print(_summary(stats, returncode), flush=True)
            if returncode != 0:
                failed = True
                print(textwrap.indent(output[-3000:], "  | "), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
