"""Certificates made with `cryptography`: a CA and the serving certificates it signs.

The webhook needs a serving certificate the API server trusts (its CA goes into the
MutatingWebhookConfiguration's `caBundle`); the local control plane needs one for the API server.
Go verifies names only from subjectAltNames, so every serving certificate carries them.

Key identifiers (SKI on a CA, AKI on what it signs) let a verifier that trusts an old and a new CA
of the same name, as during a rotation, pick the one that signed. Every certificate starts
BACKDATE before it is made, so a verifier whose clock is a little behind
accepts it at once; `now` and `lifetime` can be given so that rotation can be tested with a clock
of the test's choosing. A serving certificate never outlives the CA that signs it.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import ssl
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

PrivateKey = ec.EllipticCurvePrivateKey
BACKDATE = datetime.timedelta(hours=1)


class CertError(ValueError):
    """PEM data that is not the certificate or key it should be; the message says what is wrong."""


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


def _span(
    days: int, lifetime: datetime.timedelta | None, now: datetime.datetime | None
) -> tuple[datetime.datetime, datetime.datetime]:
    """(not before, not after) of a certificate made at `now` (default: the real time)."""
    start = now or _now()
    return start - BACKDATE, start + (lifetime or datetime.timedelta(days=days))


def load_certificate(pem: bytes) -> x509.Certificate:
    """One PEM certificate, or CertError."""
    if b"-----BEGIN CERTIFICATE-----" not in pem:
        raise CertError("not a PEM certificate")
    try:
        return x509.load_pem_x509_certificate(pem)
    except ValueError as exc:
        raise CertError(f"unreadable certificate: {exc}") from None


def load_key(pem: bytes) -> PrivateKey:
    """A PEM private key of the kind this module makes (EC), or CertError."""
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError) as exc:
        raise CertError(f"unreadable private key: {exc}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise CertError(f"a {type(key).__name__}, not an EC private key")
    return key


def key_matches(cert: x509.Certificate, key: PrivateKey) -> bool:
    """Whether `key` is the private half of `cert`'s public key."""
    return cert.public_key() == key.public_key()


def issued_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    """Whether `issuer` signed `cert` (its name and its signature, not the validity dates)."""
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def subject_alt_names(cert: x509.Certificate) -> set[str]:
    """The DNS names and IP addresses (as text) a certificate is valid for."""
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return set()
    names = set(sans.get_values_for_type(x509.DNSName))
    return names | {str(ip) for ip in sans.get_values_for_type(x509.IPAddress)}


@dataclass(frozen=True)
class Authority:
    """A certificate authority that can sign serving certificates."""

    key: PrivateKey
    cert: x509.Certificate

    @classmethod
    def create(
        cls,
        name: str,
        days: int = 365,
        *,
        lifetime: datetime.timedelta | None = None,
        now: datetime.datetime | None = None,
    ) -> Authority:
        """A new CA valid for `lifetime` (else `days`) from `now`."""
        key = new_key()
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        start, end = _span(days, lifetime, now)
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
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

    @classmethod
    def load(cls, cert_pem: bytes, key_pem: bytes) -> Authority:
        """A CA from its PEM certificate and key; CertError says which part is unusable."""
        try:
            cert = load_certificate(cert_pem)
        except CertError as exc:
            raise CertError(f"CA certificate: {exc}") from None
        try:
            key = load_key(key_pem)
        except CertError as exc:
            raise CertError(f"CA key: {exc}") from None
        try:
            constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
            is_ca = constraints.ca
        except x509.ExtensionNotFound:
            is_ca = False
        if not is_ca:
            raise CertError("CA certificate: not a CA (no basicConstraints ca=true)")
        if not key_matches(cert, key):
            raise CertError("CA key: does not belong to the CA certificate")
        return cls(key, cert)

    @property
    def pem(self) -> bytes:
        """The CA certificate, for a `caBundle` or a client's trust store."""
        return cert_pem(self.cert)

    def issue(
        self,
        name: str,
        *,
        dns: Sequence[str] = (),
        ips: Sequence[str] = (),
        days: int = 365,
        lifetime: datetime.timedelta | None = None,
        now: datetime.datetime | None = None,
    ) -> tuple[bytes, bytes]:
        """A serving certificate and its key (both PEM) for the given names and addresses,
        valid for `lifetime` (else `days`) from `now` but never after the CA itself."""
        key = new_key()
        sans: list[x509.GeneralName] = [x509.DNSName(d) for d in dns]
        sans += [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
        start, end = _span(days, lifetime, now)
        end = min(end, self.cert.not_valid_after_utc)
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(end)
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), False
            )
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


def _private_dir() -> str | None:
    """Where a key may touch the disk for the moment it is loaded: memory-backed when possible."""
    shm = "/dev/shm"
    return shm if os.path.isdir(shm) and os.access(shm, os.W_OK | os.X_OK) else None


def load_pem_chain(context: ssl.SSLContext, cert: bytes, key: bytes) -> None:
    """Load a certificate and key given as PEM bytes into `context`. Python's ssl loads a chain
    only from files, so the pair is written into a private (0700) temporary directory, loaded,
    and removed at once: the key lives on disk only for the duration of the load."""
    with tempfile.TemporaryDirectory(prefix="tpcontrol-tls-", dir=_private_dir()) as tmp:
        paths = Path(tmp) / "tls.crt", Path(tmp) / "tls.key"
        for path, data in zip(paths, (cert, key), strict=True):
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
        context.load_cert_chain(*paths)


def context_from_pem(cert: bytes, key: bytes) -> ssl.SSLContext:
    """A server context from PEM bytes (see `tpcontrol.certs.load_pem_chain`): nothing depends
    on a mounted Secret volume, which the kubelet refreshes a minute or more after the Secret
    changes."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    load_pem_chain(context, cert, key)
    return context
