"""Deterministic decoding of fuzz input bytes into structured choices.

The fuzzer (atheris, or the plain random engine) hands a target one ``bytes`` value; the
target's generators draw every decision from it through a ByteSource, so one input always
builds the same packets, whichever engine made it and whether or not atheris is installed.
That is what lets a crasher or a corpus entry be replayed by the normal pytest suite.

When the input runs out every draw returns its smallest value (zeros), so a short input is a
short, simple case, and appending bytes only ever adds decisions at the end.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

T = TypeVar("T")


class ByteSource:
    """Reads choices from the front of ``data``."""

    __slots__ = ("_data", "_pos")

    def __init__(self, data: bytes) -> None:
        self._data = data
        self._pos = 0

    @property
    def remaining(self) -> int:
        return len(self._data) - self._pos

    def byte(self) -> int:
        if self._pos >= len(self._data):
            return 0
        value = self._data[self._pos]
        self._pos += 1
        return value

    def uint(self, nbytes: int) -> int:
        """A big-endian unsigned integer of ``nbytes`` bytes."""
        value = 0
        for _ in range(nbytes):
            value = value << 8 | self.byte()
        return value

    def below(self, bound: int) -> int:
        """An integer in [0, bound): one byte for small bounds, more for large ones."""
        if bound <= 1:
            return 0
        nbytes = (bound - 1).bit_length() + 7 >> 3
        return self.uint(nbytes) % bound

    def between(self, low: int, high: int) -> int:
        """An integer in [low, high]."""
        return low + self.below(high - low + 1)

    def flag(self, percent: int = 50) -> bool:
        """True with about ``percent`` % probability over uniform input bytes."""
        return self.byte() * 100 < percent * 256

    def choice(self, options: Sequence[T]) -> T:
        return options[self.below(len(options))]

    def take(self, n: int) -> bytes:
        """The next ``n`` bytes (fewer when the input ends; zero padded to ``n``)."""
        chunk = self._data[self._pos:self._pos + n]
        self._pos += len(chunk)
        return chunk + bytes(n - len(chunk))

    def blob(self, max_len: int) -> bytes:
        """A byte string of a drawn length up to ``max_len``, taken from the input."""
        return self.take(self.below(max_len + 1))

    def mutate(self, data: bytes, max_edits: int = 3) -> bytes:
        """``data`` with up to ``max_edits`` drawn edits: set a byte, flip a bit, cut the end,
        or append a few bytes. Zero edits (the usual case for short inputs) keeps it valid."""
        out = bytearray(data)
        for _ in range(self.below(max_edits + 1)):
            kind = self.below(4)
            if kind == 0 and out:
                out[self.below(len(out))] = self.byte()
            elif kind == 1 and out:
                out[self.below(len(out))] ^= 1 << self.below(8)
            elif kind == 2 and out:
                del out[self.below(len(out)):]
            elif kind == 3:
                out += self.blob(8)
        return bytes(out)
