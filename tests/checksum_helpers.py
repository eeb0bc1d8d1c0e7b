"""The Internet checksum written out independently of the code under test (tests only)."""

from __future__ import annotations


def naive_checksum(data: bytes) -> int:
    """RFC 1071 the slow way: end-around carry after every word."""
    if len(data) % 2:
        data += b"\x00"
    total = 0
    for i in range(0, len(data), 2):
        total += (data[i] << 8) | data[i + 1]
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF
