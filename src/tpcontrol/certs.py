"""Certificates made with `cryptography`: a CA and the serving certificates it signs.

The webhook needs a serving certificate the API server trusts (its CA goes into the
MutatingWebhookConfiguration's `caBundle`); the local control plane needs one for the API server.
Go verifies names only from subjectAltNames, so every serving certificate carries them.
"""

from __future__ import annotations

import datetime
import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

PrivateKey = ec.EllipticCurvePrivateKey


def new_key() -> PrivateKey:
    """A P-256 key: fast to make, accepted by Go's TLS and by the API server."""
    return ec.generate_private_key(ec.SECP256R1())


def key_pem(key: PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


@dataclass(frozen=True)
class Authority:
    """A certificate authority that can sign serving certificates."""

    key: PrivateKey
    cert: x509.Certificate

    @classmethod
    def create(cls, name: str, days: int = 365) -> Authority:
        key = new_key()
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(_now() - datetime.timedelta(hours=1))
            .not_valid_after(_now() + datetime.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    key_cert_sign=True,
                    crl_sign=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .sign(key, hashes.SHA256())
        )
        return cls(key, cert)

    @property
    def pem(self) -> bytes:
        """The CA certificate, for a `caBundle` or a client's trust store."""
        return cert_pem(self.cert)

    def issue(
        self, name: str, *, dns: Sequence[str] = (), ips: Sequence[str] = (), days: int = 365
    ) -> tuple[bytes, bytes]:
        """A serving certificate and its key (both PEM) for the given names and addresses."""
        key = new_key()
        sans: list[x509.GeneralName] = [x509.DNSName(d) for d in dns]
        sans += [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(_now() - datetime.timedelta(hours=1))
            .not_valid_after(_now() + datetime.timedelta(days=days))
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(self.key, hashes.SHA256())
        )
        return cert_pem(cert), key_pem(key)

    def write(self, directory: Path) -> Path:
        """Write `ca.crt` into `directory`; returns its path."""
        path = directory / "ca.crt"
        path.write_bytes(self.pem)
        return path


def not_after(pem: bytes) -> datetime.datetime:
    """When a PEM certificate expires (for the expiry metric and for rotation)."""
    return x509.load_pem_x509_certificate(pem).not_valid_after_utc
