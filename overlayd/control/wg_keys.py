"""This node's WireGuard private key: generated once into a file, read on every start.

The file holds the key in base64 on one line, as `wg genkey` writes it (so either tool can make
it), mode 0600 in a directory we create 0700. Its public key goes into the map (``public_key``
of the node); ``overlayd keys`` prints it.
"""

from __future__ import annotations

import base64
import os
from pathlib import Path

from overlayd.control.problems import ConfigError, Problem
from overlayd.control.subnet_map import decode_key
from overlayd.control.wg_noise import generate_private_key


def encode_key(key: bytes) -> str:
    return base64.b64encode(key).decode()


def load_or_create_private_key(path: Path, config_file: str) -> bytes:
    """The key in ``path``; created there (0600) if the file does not exist."""
    if not path.exists():
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        key = generate_private_key()
        # O_EXCL: two starts racing must not write two different keys.
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            return load_private_key(path, config_file)
        except OSError as exc:
            raise ConfigError([Problem(config_file, "wireguard.private_key_file",
                                       f"cannot create {path}: {exc.strerror}")]) from None
        with os.fdopen(fd, "w") as f:
            f.write(encode_key(key) + "\n")
        return key
    return load_private_key(path, config_file)


def load_private_key(path: Path, config_file: str, key_name: str = "private_key_file") -> bytes:
    where = f"wireguard.{key_name}"
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError([Problem(config_file, where,
                                   f"cannot read {path}: {exc.strerror}")]) from None
    if path.stat().st_mode & 0o077:
        raise ConfigError([Problem(config_file, where,
                                   f"{path} is readable by others (mode "
                                   f"{path.stat().st_mode & 0o777:o}): chmod 600 it")])
    key = decode_key(text)
    if key is None:
        raise ConfigError([Problem(config_file, where,
                                   f"{path} does not hold a WireGuard key (base64 of 32 bytes)")])
    return key
