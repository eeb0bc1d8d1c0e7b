"""Running one target for a bounded time: with atheris (coverage-guided) or without it.

``run_target`` is what one child process of ``python3 -m overlayd.fuzz`` does. Both engines
feed the target bytes, count executions and the labels (paths) each input reached, and write
those statistics to a JSON file at least once a second (libFuzzer ends the process with C's
exit(), so nothing can be written at the very end).

- ``atheris``: libFuzzer's mutator with coverage of the Python code (atheris instruments the
  overlayd modules on import) and, when the extension is built with
  ``-fsanitize=fuzzer-no-link``, of the compiled kernels too. It stops at the first new
  finding and leaves the input in the crash directory.
- ``random``: no atheris needed. Fresh random inputs and mutations of the corpus; an input that
  reaches a label no earlier input reached joins the corpus (written to the corpus directory
  when one is given). It records every new finding and goes on.

A finding KNOWN_OPEN names (a hole another branch is fixing) is counted as known and does not
stop or fail the run unless it is strict.
"""

from __future__ import annotations

import hashlib
import json
import random
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

MAX_INPUT = 2048
MAX_SAVED_FINDINGS = 20


class Stats:
    def __init__(self, target: str, engine: str, path: Path | None) -> None:
        self.target = target
        self.engine = engine
        self.path = path
        self.started = time.monotonic()
        self.execs = 0
        self.labels: Counter[str] = Counter()
        self.known: Counter[str] = Counter()
        self.findings: list[str] = []
        self._written = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {"target": self.target, "engine": self.engine, "execs": self.execs,
                "seconds": round(time.monotonic() - self.started, 1),
                "labels": dict(self.labels), "known": dict(self.known),
                "findings": self.findings}

    def write(self, force: bool = False) -> None:
        now = time.monotonic()
        if self.path is None or not force and now - self._written < 1.0:
            return
        self._written = now
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.as_dict()))
        tmp.replace(self.path)


def _save(directory: Path | None, prefix: str, data: bytes) -> Path | None:
    if directory is None:
        return None
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{prefix}-{hashlib.sha1(data).hexdigest()[:16]}"
    path.write_bytes(data)
    return path


def load_corpus(*directories: Path | None) -> list[bytes]:
    out = []
    for directory in directories:
        if directory is not None and directory.is_dir():
            out += [p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()]
    return out


def one_input(target: Any, data: bytes, stats: Stats, strict: bool,
              crashes: Path | None) -> set[str]:
    """Run one input; the labels it reached. A new finding (and with ``strict`` a known one)
    is recorded and raised: atheris then stops, the random engine goes on."""
    from overlayd.fuzz.forwarders import Finding
    from overlayd.fuzz.targets import KNOWN_PREFIX

    stats.execs += 1
    try:
        labels = target(data)
    except Finding as exc:
        _record(stats, crashes, data, f"{exc}")
        raise
    except Exception as exc:  # any other exception is a finding too
        _record(stats, crashes, data, f"{type(exc).__name__}: {exc}")
        raise
    known = sorted(label[len(KNOWN_PREFIX):] for label in labels
                   if label.startswith(KNOWN_PREFIX))
    for issue in known:
        if not stats.known[issue]:
            _save(crashes, f"known-{stats.target}", data)
        stats.known[issue] += 1
    stats.labels.update(label for label in labels if not label.startswith(KNOWN_PREFIX))
    stats.write()
    if strict and known:
        message = f"known open finding(s), failing as --strict asks: {', '.join(known)}"
        _record(stats, crashes, data, message)
        raise Finding(message)
    return labels


def _record(stats: Stats, crashes: Path | None, data: bytes, message: str) -> None:
    if len(stats.findings) < MAX_SAVED_FINDINGS:
        saved = _save(crashes, f"crash-{stats.target}", data)
        stats.findings.append(f"{message[:500]} [{saved or data.hex()[:200]}]")
    stats.write(force=True)


def mutate(rng: random.Random, data: bytes, corpus: list[bytes]) -> bytes:
    out = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        kind = rng.randrange(5)
        if kind == 0 and out:
            out[rng.randrange(len(out))] = rng.randrange(256)
        elif kind == 1 and out:
            out[rng.randrange(len(out))] ^= 1 << rng.randrange(8)
        elif kind == 2:
            at = rng.randint(0, len(out))
            out[at:at] = rng.randbytes(rng.randint(1, 16))
        elif kind == 3 and out:
            at = rng.randrange(len(out))
            del out[at:at + rng.randint(1, 16)]
        elif corpus:
            other = rng.choice(corpus)
            at = rng.randint(0, len(out))
            out[at:] = other[rng.randint(0, len(other)):]
    return bytes(out[:MAX_INPUT])


def run_random(target: Any, stats: Stats, seconds: float, corpus_dir: Path | None,
               seeds: Path | None, crashes: Path | None, strict: bool, seed: int) -> int:
    rng = random.Random(seed)
    corpus = load_corpus(seeds, corpus_dir)
    seen: set[str] = set()
    for data in corpus:          # the seeds first: they define what is already reached
        try:
            seen |= one_input(target, data, stats, strict, crashes)
        except Exception:  # noqa: BLE001, S110 -- recorded in stats; a random run goes on
            pass
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if corpus and rng.random() < 0.7:
            data = mutate(rng, rng.choice(corpus), corpus)
        else:
            data = rng.randbytes(rng.randint(0, 600))
        try:
            labels = one_input(target, data, stats, strict, crashes)
        except Exception:  # noqa: BLE001, S112 -- recorded in stats; a random run goes on
            continue
        if labels and not labels <= seen:
            seen |= labels
            corpus.append(data)
            _save(corpus_dir, "seed", data)
    stats.write(force=True)
    return 1 if stats.findings else 0


def run_atheris(target: Any, stats: Stats, seconds: float, corpus_dir: Path | None,
                seeds: Path | None, crashes: Path | None, strict: bool) -> int:
    import atheris  # type: ignore[import-not-found,unused-ignore]

    def test_one_input(data: bytes) -> None:
        one_input(target, data, stats, strict, crashes)

    args = [sys.argv[0], f"-max_total_time={max(1, int(seconds))}", f"-max_len={MAX_INPUT}",
            "-timeout=30", "-rss_limit_mb=4096", "-print_final_stats=1"]
    if crashes is not None:
        crashes.mkdir(parents=True, exist_ok=True)
        args.append(f"-artifact_prefix={crashes}/atheris-{stats.target}-")
    dirs = [d for d in (corpus_dir, seeds) if d is not None]
    for d in dirs[:1]:
        d.mkdir(parents=True, exist_ok=True)
    args += [str(d) for d in dirs if d.is_dir()]
    atheris.Setup(args, test_one_input)
    atheris.Fuzz()
    return 0


def signature(run: Any) -> str | None:
    """What a finding looks like, to tell whether a smaller input still has it: the start of
    the message of what ``run()`` raised, or the known open finding it reported; None when it
    found nothing."""
    from overlayd.fuzz.targets import KNOWN_PREFIX

    try:
        labels = run()
    except Exception as exc:  # noqa: BLE001 -- every exception is a finding here
        text = str(exc) if type(exc).__name__ == "Finding" else f"{type(exc).__name__}: {exc}"
        return text[:40]
    known = sorted(label for label in labels if label.startswith(KNOWN_PREFIX))
    return known[0] if known else None


def minimise(target: Any, data: bytes, wanted: str, budget: int = 2000) -> bytes:
    """A shorter/simpler input whose finding has the signature ``wanted``: cut chunks from the
    end and the middle, then zero bytes (a zero is every draw's simplest choice), each change
    kept only if the finding stays."""
    def still(candidate: bytes) -> bool:
        return signature(lambda: target(candidate)) == wanted

    runs = 0
    chunk = max(1, len(data) // 2)
    while chunk >= 1 and runs < budget:
        i = 0
        while i < len(data) and runs < budget:
            candidate = data[:i] + data[i + chunk:]
            runs += 1
            if still(candidate):
                data = candidate
            else:
                i += chunk
        chunk //= 2
    for i in range(len(data)):
        if runs >= budget:
            break
        if data[i]:
            candidate = data[:i] + b"\x00" + data[i + 1:]
            runs += 1
            if still(candidate):
                data = candidate
    return data


def minimise_case(target: Any, case: Any, wanted: str) -> Any:
    """A forwarder case with every step and item dropped that the finding does not need."""
    import copy

    def still(candidate: Any) -> bool:
        return signature(lambda: target.run_case(candidate)) == wanted

    for s in reversed(range(len(case.steps))):
        candidate = copy.deepcopy(case)
        del candidate.steps[s]
        if candidate.steps and still(candidate):
            case = candidate
    for s in range(len(case.steps)):
        for i in reversed(range(len(case.steps[s].items))):
            candidate = copy.deepcopy(case)
            del candidate.steps[s].items[i]
            if candidate.steps[s].items and still(candidate):
                case = candidate
    return case
