"""Helpers for the tests that run real etcd: skip marks, a coroutine runner, TLS material."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import uuid
from collections.abc import Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from overlayd.lab.etcd import etcd_unavailable

T = TypeVar("T")

ETCD_UNAVAILABLE = etcd_unavailable()
ETCD_MARKS = [pytest.mark.skipif(ETCD_UNAVAILABLE is not None,
                                 reason=f"etcd tests: {ETCD_UNAVAILABLE}")]
RUN_TIMEOUT_S = 60.0


def run(coro: Coroutine[Any, Any, T], timeout_s: float = RUN_TIMEOUT_S) -> T:
    """Run one test coroutine on a fresh loop, bounded in time."""
    async def bounded() -> T:
        return await asyncio.wait_for(coro, timeout_s)
    return asyncio.run(bounded())


def unique_prefix() -> str:
    """A key prefix no other test (or earlier run against the same etcd) uses."""
    return f"/ovd-test-{uuid.uuid4().hex[:12]}"


@dataclass(frozen=True)
class TLSFiles:
    ca_cert: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca_cert: Path          # a CA that signed nothing etcd knows


def make_tls(directory: Path, server_ips: tuple[str, ...] = ("127.0.0.1",)) -> TLSFiles:
    """A throwaway CA, a server certificate for server_ips and a client certificate, as PEM."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key, ca_cert = _self_signed("overlayd test CA", now)
    _, other_ca = _self_signed("unrelated CA", now)
    server_key = ec.generate_private_key(ec.SECP256R1())
    server = _issued(ca_key, ca_cert, server_key, "etcd server", now,
                     ExtendedKeyUsageOID.SERVER_AUTH,
                     x509.SubjectAlternativeName(
                         [x509.IPAddress(ipaddress.ip_address(ip)) for ip in server_ips]))
    client_key = ec.generate_private_key(ec.SECP256R1())
    client = _issued(ca_key, ca_cert, client_key, "overlayd client", now,
                     ExtendedKeyUsageOID.CLIENT_AUTH, None)
    files = TLSFiles(*(directory / name for name in (
        "ca.pem", "server.pem", "server-key.pem", "client.pem", "client-key.pem", "other-ca.pem")))
    files.ca_cert.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    files.other_ca_cert.write_bytes(other_ca.public_bytes(serialization.Encoding.PEM))
    files.server_cert.write_bytes(server.public_bytes(serialization.Encoding.PEM))
    files.client_cert.write_bytes(client.public_bytes(serialization.Encoding.PEM))
    for path, key in ((files.server_key, server_key), (files.client_key, client_key)):
        path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return files


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _self_signed(common_name: str, now: datetime.datetime,
                 ) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder().subject_name(_name(common_name))
            .issuer_name(_name(common_name)).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True,
                                         crl_sign=True, content_commitment=False,
                                         key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False,
                                         decipher_only=False), critical=True)
            .sign(key, hashes.SHA256()))
    return key, cert


def _issued(ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate,
            key: ec.EllipticCurvePrivateKey, common_name: str, now: datetime.datetime,
            usage: x509.ObjectIdentifier, san: x509.SubjectAlternativeName | None,
            ) -> x509.Certificate:
    builder = (x509.CertificateBuilder().subject_name(_name(common_name))
               .issuer_name(ca_cert.subject).public_key(key.public_key())
               .serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5))
               .not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(x509.ExtendedKeyUsage([usage]), critical=False))
    if san is not None:
        builder = builder.add_extension(san, critical=False)
    return builder.sign(ca_key, hashes.SHA256())
