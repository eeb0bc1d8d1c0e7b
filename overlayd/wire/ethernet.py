"""Ethernet II headers (IEEE 802.3 framing as Linux tap devices carry it), stdlib only.

MAC addresses are 6-byte ``bytes`` on the packet path and ``aa:bb:cc:dd:ee:ff`` strings in
configs and logs; ``mac_to_int`` gives the 48-bit integer the FDB keys on.
"""

from __future__ import annotations

import re
import struct
from typing import Final

HEADER_LEN: Final = 14                 # dst MAC, src MAC, ethertype; no 802.1Q tag
MIN_PAYLOAD: Final = 46                # 60-byte minimum frame without FCS: shorter is padded
ETHERTYPE_IPV4: Final = 0x0800
ETHERTYPE_ARP: Final = 0x0806
BROADCAST: Final = b"\xff" * 6
ZERO: Final = b"\x00" * 6

OFF_DST: Final = 0
OFF_SRC: Final = 6
OFF_TYPE: Final = 12

_MAC_TEXT = re.compile(r"^[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}$")


def parse_mac(text: str) -> bytes:
    """'02:00:5e:10:00:01' -> 6 bytes; ValueError for anything else."""
    if not isinstance(text, str) or not _MAC_TEXT.match(text):
        raise ValueError(f"not a MAC address (aa:bb:cc:dd:ee:ff): {text!r}")
    return bytes.fromhex(text.replace(":", ""))


def format_mac(mac: bytes | bytearray | memoryview) -> str:
    return ":".join(f"{b:02x}" for b in bytes(mac))


def mac_to_int(mac: bytes | bytearray | memoryview) -> int:
    return int.from_bytes(mac[:6], "big")


def int_to_mac(value: int) -> bytes:
    return value.to_bytes(6, "big")


def is_multicast(mac: bytes | bytearray | memoryview) -> bool:
    """Group bit (I/G) set: multicast, including broadcast."""
    return bool(mac[0] & 0x01)


def is_valid_source(mac: bytes | bytearray | memoryview) -> bool:
    """A MAC a frame may come from and a switch may learn: unicast and not all zeros
    (Linux's is_valid_ether_addr)."""
    return not is_multicast(mac) and bytes(mac[:6]) != ZERO


def destination(frame: bytes | bytearray | memoryview) -> bytes:
    return bytes(frame[OFF_DST:OFF_DST + 6])


def source(frame: bytes | bytearray | memoryview) -> bytes:
    return bytes(frame[OFF_SRC:OFF_SRC + 6])


def ethertype(frame: bytes | bytearray | memoryview) -> int:
    return (frame[OFF_TYPE] << 8) | frame[OFF_TYPE + 1]


def build_header(dst: bytes, src: bytes, ethertype: int) -> bytes:
    if len(dst) != 6 or len(src) != 6:
        raise ValueError("MAC addresses are 6 bytes")
    return struct.pack("!6s6sH", dst, src, ethertype)
