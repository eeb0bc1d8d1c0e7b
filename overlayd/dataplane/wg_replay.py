"""The receive counter's sliding window (RFC 6479 style), pure-Python twin of the Cython one.

A bitmap of BLOCKS 64-bit words used as a ring: bit ``c % 64`` of word ``(c // 64) % BLOCKS``
says counter c was seen. Moving the window forward clears only the words it passes over (at
most the whole ring), so an update costs O(1) amortised whatever the jump. One word is kept
spare, so the window always covers WINDOW_SIZE counters behind the greatest seen.

``check`` before decrypting (cheap rejection of replays and ancient counters, no state change),
``update`` after the message authenticated (so a forged counter cannot move the window).
"""

from __future__ import annotations

from typing import Final

BLOCKS: Final = 33                          # 32 usable words + 1 spare
WINDOW_SIZE: Final = (BLOCKS - 1) * 64      # 2048 counters behind the newest one
_MASK64: Final = (1 << 64) - 1


class ReplayWindow:
    __slots__ = ("_bits", "_greatest", "_limit")

    def __init__(self, limit: int) -> None:
        self._bits = [0] * BLOCKS
        self._greatest = -1          # no counter seen yet
        self._limit = limit          # REJECT_AFTER_MESSAGES: counters at or past it never count

    def check(self, counter: int) -> bool:
        """Hot: could ``counter`` be new? (no state change)"""
        if counter >= self._limit:
            return False
        if counter > self._greatest:
            return True
        if self._greatest - counter >= WINDOW_SIZE:
            return False
        return not (self._bits[(counter >> 6) % BLOCKS] >> (counter & 63)) & 1

    def update(self, counter: int) -> bool:
        """Hot: record an authenticated ``counter``; False if it was a replay after all."""
        if not self.check(counter):
            return False
        block = counter >> 6
        if counter > self._greatest:
            current = self._greatest >> 6 if self._greatest >= 0 else -1
            for step in range(1, min(block - current, BLOCKS) + 1):
                self._bits[(current + step) % BLOCKS] = 0
            self._greatest = counter
        self._bits[block % BLOCKS] |= (1 << (counter & 63)) & _MASK64
        return True
