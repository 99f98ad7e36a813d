"""The agent injector's own TLS, made and kept in the cluster: `kubectl apply -k deploy/` is the
whole install.

On start, `tpcontrol webhook` gets or creates one Secret in its namespace (SECRET_NAME) holding a
CA (`ca.crt`, `ca.key`) and a serving certificate (`tls.crt`, `tls.key`) for
`<service>.<ns>.svc` (and `<service>.<ns>`, `<service>.<ns>.svc.cluster.local`); writes the CA
into the `caBundle` of every webhook entry of its MutatingWebhookConfiguration (a strategic merge
patch of that one field per entry, so the rest stays as deploy/ wrote it); serves the certificate
from the Secret's content (loaded in memory, never from a mounted volume, which the kubelet
refreshes a minute or more late); and checks all of it every `check_interval`, so a wiped
`caBundle` is written again and certificates are renewed before they expire.

Replicas cooperate through the API server, not with each other: the Secret is created (a 409 means
another replica won, and what it wrote is read and used) or replaced under its resourceVersion (a
409 means read again and re-decide). Nothing is written when the Secret is already good, so a
restart serves the same CA and certificate, byte for byte.

Renewal, when less than `renew_fraction` (a third) of a certificate's lifetime is left:
- The serving certificate is simply re-issued by the same CA: the bundle does not change.
- The CA is rotated in three steps, because every API server must trust whatever any replica
  serves at every moment, and replicas pick the Secret up at different times:
  1. a new CA is made and put first in the bundle, the old one kept after it (`ca-previous.crt`,
     without its key); the serving certificate, still signed by the old CA, stays;
  2. once the new CA has been in every webhook entry's caBundle for `overlap`, the serving
     certificate is re-issued by the new CA;
  3. `overlap` later (every replica has re-read the Secret by then: `overlap` > `check_interval`)
     the old CA leaves the bundle.
  The steps' times are annotations on the Secret (ROTATED_AT, ISSUED_AT), so a restart in the
  middle resumes where it was. With the default lifetimes (CA 10 years, certificate 1 year) the CA
  starts rotating with more than 3 years left, so a serving certificate always fits.

What the Secret holds that cannot be used (not PEM, a key that is not the certificate's, a serving
certificate the CA did not sign or without the names) is replaced, with a warning naming the key:
the Secret belongs to the injector (people who bring their own certificates use `--tls-dir`).
A usable CA is kept even when the serving certificate is replaced, so the bundle stays.

Long on purpose: one rotation state machine (bootstrap, renewal, CA overlap, caBundle upkeep)
whose steps must be read together.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import datetime
import ipaddress
import json
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, cast

import msgspec
from cryptography import x509
from kubernetes_asyncio import client as k8s
from prometheus_client import CollectorRegistry, Gauge

from tpcontrol.certs import (
    Authority,
    CertError,
    issued_by,
    key_matches,
    key_pem,
    load_certificate,
    load_key,
    subject_alt_names,
)
from tpcontrol.injector.webhook import PemTls

log = logging.getLogger("tpcontrol.injector.tls")

SECRET_NAME = "mutator-webhook-tls"  # the 2.6 chart's name for the injector's TLS Secret
WEBHOOK_CONFIGURATION_NAME = "agent-injector-webhook"
SERVICE_NAME = "agent-injector"

CA_CERT, CA_KEY, TLS_CERT, TLS_KEY = "ca.crt", "ca.key", "tls.crt", "tls.key"
PREVIOUS_CA = "ca-previous.crt"
ROTATED_AT = "tpcontrol.dev/ca-rotated-at"
ISSUED_AT = "tpcontrol.dev/cert-issued-at"
CA_COMMON_NAME = "tpcontrol-agent-injector-ca"
CERT_COMMON_NAME = "agent-injector"
WRITE_ATTEMPTS = 8
RETRY_INTERVAL = 5.0  # seconds between checks while the configuration is missing or a check failed

Json = dict[str, Any]
Clock = Callable[[], datetime.datetime]

_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")


class TlsSettingsError(ValueError):
    """A setting of the injector's TLS is unusable; the message names the field."""


class TlsBootstrapError(RuntimeError):
    """The Secret cannot be read or written; the message names it and says what is needed."""


def _utcnow() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


class TlsSettings(msgspec.Struct, frozen=True, kw_only=True):
    """Where the injector keeps its TLS and how long certificates live. Defaults match deploy/."""

    namespace: str  # the injector's own namespace: the Secret's and the Service's
    secret: str = SECRET_NAME
    webhook_configuration: str = WEBHOOK_CONFIGURATION_NAME  # "": write no caBundle anywhere
    service: str = SERVICE_NAME
    extra_names: tuple[str, ...] = ()  # more DNS names or IP addresses for the certificate
    ca_lifetime: datetime.timedelta = datetime.timedelta(days=3650)
    cert_lifetime: datetime.timedelta = datetime.timedelta(days=365)
    renew_fraction: float = 1 / 3
    check_interval: float = 60.0  # seconds
    overlap: datetime.timedelta = datetime.timedelta(minutes=10)

    def __post_init__(self) -> None:
        """Refuse at start-up what would make a certificate no API server accepts."""
        for field, value in (("namespace", self.namespace), ("service", self.service)):
            if len(value) > 63 or not _LABEL.fullmatch(value):
                raise TlsSettingsError(
                    f"TlsSettings.{field}: must be a DNS label (a-z, 0-9, '-'), got {value!r}"
                )
        for field, value in (
            ("secret", self.secret),
            ("webhook_configuration", self.webhook_configuration),
        ):
            if value == "" and field == "webhook_configuration":
                continue
            if len(value) > 253 or not _SUBDOMAIN.fullmatch(value):
                raise TlsSettingsError(
                    f"TlsSettings.{field}: must be a DNS subdomain name, got {value!r}"
                )
        for name in self.extra_names:
            if not _is_ip(name) and not _SUBDOMAIN.fullmatch(name.lower()):
                raise TlsSettingsError(
                    f"TlsSettings.extra_names: {name!r} is neither a DNS name nor an IP address"
                )
        for field, span in (
            ("ca_lifetime", self.ca_lifetime),
            ("cert_lifetime", self.cert_lifetime),
        ):
            if span <= datetime.timedelta(0):
                raise TlsSettingsError(f"TlsSettings.{field}: must be positive, got {span}")
        if not 0 < self.renew_fraction < 1:
            raise TlsSettingsError(
                f"TlsSettings.renew_fraction: must be between 0 and 1, got {self.renew_fraction}"
            )
        if self.check_interval <= 0:
            raise TlsSettingsError(
                f"TlsSettings.check_interval: must be positive, got {self.check_interval}"
            )
        if self.overlap.total_seconds() <= self.check_interval:
            raise TlsSettingsError(
                f"TlsSettings.overlap: must be longer than check_interval ({self.check_interval} s)"
                f" so that every replica re-reads the Secret within it, got {self.overlap}"
            )

    @property
    def dns_names(self) -> list[str]:
        """The names the API server uses for the Service, then the extra DNS names."""
        base = f"{self.service}.{self.namespace}"
        names = [f"{base}.svc", base, f"{base}.svc.cluster.local"]
        return names + [n for n in self.extra_names if not _is_ip(n) and n not in names]

    @property
    def ips(self) -> list[str]:
        return [str(ipaddress.ip_address(n)) for n in self.extra_names if _is_ip(n)]


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


# -- what the Secret holds, and what it should hold -----------------------------------------------
@dataclass(frozen=True)
class Stored:
    """The Secret's content as raw bytes (PEM), and the rotation times of its annotations."""

    ca_cert: bytes
    ca_key: bytes
    tls_cert: bytes
    tls_key: bytes
    previous_ca: bytes = b""
    rotated_at: datetime.datetime | None = None
    issued_at: datetime.datetime | None = None

    def bundle(self) -> bytes:
        """The caBundle: the current CA, then the one being retired, if any."""
        parts = [p if p.endswith(b"\n") else p + b"\n" for p in (self.ca_cert, self.previous_ca)]
        return b"".join(p for p in parts if p.strip())


Change = tuple[int, str]  # a logging level and why the Secret changes


def _due(cert: x509.Certificate, fraction: float, now: datetime.datetime) -> bool:
    """Whether less than `fraction` of the certificate's lifetime is left at `now`."""
    end = cert.not_valid_after_utc
    return end - now < (end - cert.not_valid_before_utc) * fraction


def _issue(
    authority: Authority, settings: TlsSettings, now: datetime.datetime
) -> tuple[bytes, bytes]:
    return authority.issue(
        CERT_COMMON_NAME,
        dns=settings.dns_names,
        ips=settings.ips,
        lifetime=settings.cert_lifetime,
        now=now,
    )


def _new_ca(settings: TlsSettings, now: datetime.datetime) -> Authority:
    """A CA named for its time (as client-go names self-signed ones), so that the old and the new
    CA of a rotation differ by name as well as by key."""
    name = f"{CA_COMMON_NAME}@{int(now.timestamp())}"
    return Authority.create(name, lifetime=settings.ca_lifetime, now=now)


def _fresh(settings: TlsSettings, now: datetime.datetime) -> Stored:
    authority = _new_ca(settings, now)
    cert, key = _issue(authority, settings, now)
    return Stored(authority.pem, key_pem(authority.key), cert, key, issued_at=now)


def _serving_problem(
    stored: Stored,
    signers: dict[str, x509.Certificate],
    settings: TlsSettings,
    now: datetime.datetime,
) -> tuple[str | None, x509.Certificate | None, str]:
    """(which CA signed the serving certificate, the certificate, what is wrong with it or '')."""
    try:
        cert = load_certificate(stored.tls_cert)
    except CertError as exc:
        return None, None, f"{TLS_CERT}: {exc}"
    try:
        key = load_key(stored.tls_key)
    except CertError as exc:
        return None, None, f"{TLS_KEY}: {exc}"
    if not key_matches(cert, key):
        return None, None, f"{TLS_KEY}: does not belong to {TLS_CERT}"
    signer = next((role for role, ca in signers.items() if issued_by(cert, ca)), None)
    if signer is None:
        return None, None, f"{TLS_CERT}: not signed by the CA in {CA_CERT}"
    missing = set(settings.dns_names + settings.ips) - subject_alt_names(cert)
    if missing:
        return None, None, f"{TLS_CERT}: not valid for {', '.join(sorted(missing))}"
    if cert.not_valid_after_utc <= now:
        return None, None, f"{TLS_CERT}: expired at {cert.not_valid_after_utc:%Y-%m-%d %H:%M:%S}Z"
    return signer, cert, ""


def plan(
    stored: Stored | None,
    settings: TlsSettings,
    now: datetime.datetime,
    published: Callable[[bytes], bool],
) -> tuple[Stored, list[Change]]:
    """What the Secret should hold at `now`, and why it differs (nothing: it is `stored` as is).

    `published(ca_pem)` says whether every webhook entry's caBundle already carries that CA; a
    serving certificate of a new CA is only issued once it does (see the module's docstring).
    """
    if stored is None:
        return _fresh(settings, now), [(logging.INFO, "made a CA and a serving certificate")]
    try:
        authority = Authority.load(stored.ca_cert, stored.ca_key)
    except CertError as exc:
        return _fresh(settings, now), [
            (logging.WARNING, f"{CA_CERT}/{CA_KEY}: {exc}; replaced by a new CA and certificate")
        ]
    if authority.cert.not_valid_after_utc <= now:
        return _fresh(settings, now), [
            (logging.WARNING, f"{CA_CERT}: expired; replaced by a new CA and certificate")
        ]
    changes: list[Change] = []
    state = stored
    previous: x509.Certificate | None = None
    if state.previous_ca:
        try:
            previous = load_certificate(state.previous_ca)
        except CertError as exc:
            changes.append((logging.WARNING, f"{PREVIOUS_CA}: {exc}; dropped"))
        else:
            if previous.not_valid_after_utc <= now:
                changes.append((logging.INFO, f"{PREVIOUS_CA}: expired; dropped from the bundle"))
                previous = None
        if previous is None:
            state = replace(state, previous_ca=b"", rotated_at=None)
    if previous is None and _due(authority.cert, settings.renew_fraction, now):
        old = authority
        authority = _new_ca(settings, now)
        previous = old.cert
        state = replace(
            state,
            ca_cert=authority.pem,
            ca_key=key_pem(authority.key),
            previous_ca=stored.ca_cert,
            rotated_at=now,
        )
        changes.append(
            (
                logging.INFO,
                f"the CA expires at {old.cert.not_valid_after_utc:%Y-%m-%d %H:%M:%S}Z: made its "
                "successor; both stay in the caBundle until every replica serves a certificate "
                "of the new one",
            )
        )
    signers = {"current": authority.cert}
    if previous is not None:
        signers["previous"] = previous
    signer, cert, problem = _serving_problem(state, signers, settings, now)
    renew = ""
    if problem:
        level = logging.WARNING if stored.tls_cert else logging.INFO
        changes.append((level, f"{problem}; issued a new serving certificate"))
        renew = problem
    elif signer == "previous":
        if state.rotated_at is None:  # annotation lost: the overlap starts again now
            state = replace(state, rotated_at=now)
            changes.append((logging.INFO, f"{ROTATED_AT}: missing; the CA overlap starts now"))
        elif now >= state.rotated_at + settings.overlap and published(state.ca_cert):
            renew = "the new CA is in every caBundle"
            changes.append(
                (logging.INFO, "the new CA is in every caBundle: serving certificate re-issued")
            )
    elif cert is not None and _due(cert, settings.renew_fraction, now):
        renew = "due"
        changes.append(
            (
                logging.INFO,
                f"the serving certificate expires at {cert.not_valid_after_utc:%Y-%m-%d %H:%M:%S}Z:"
                " renewed",
            )
        )
    if renew:
        tls_cert, tls_key = _issue(authority, settings, now)
        state = replace(state, tls_cert=tls_cert, tls_key=tls_key, issued_at=now)
        signer = "current"
    if state.previous_ca and signer == "current":
        if state.issued_at is None:
            state = replace(state, issued_at=now)
            changes.append(
                (logging.INFO, f"{ISSUED_AT}: missing; the old CA stays for the overlap")
            )
        elif now >= state.issued_at + settings.overlap:
            state = replace(state, previous_ca=b"", rotated_at=None)
            changes.append(
                (
                    logging.INFO,
                    "every replica has had the overlap to serve the new certificate: the old CA "
                    "left the caBundle",
                )
            )
    return state, changes


# -- the Secret on the wire -----------------------------------------------------------------------
def _time(text: object) -> datetime.datetime | None:
    if not isinstance(text, str):
        return None
    try:
        when = datetime.datetime.fromisoformat(text)
    except ValueError:
        return None
    return when if when.tzinfo is not None else None


def _decode(data: Json, key: str) -> bytes:
    value = data.get(key)
    if not isinstance(value, str):
        return b""
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        return b""


def stored_from_secret(secret: Json) -> Stored:
    """A Secret (JSON form) as Stored; missing or undecodable keys become empty."""
    data = secret.get("data") or {}
    annotations = (secret.get("metadata") or {}).get("annotations") or {}
    return Stored(
        ca_cert=_decode(data, CA_CERT),
        ca_key=_decode(data, CA_KEY),
        tls_cert=_decode(data, TLS_CERT),
        tls_key=_decode(data, TLS_KEY),
        previous_ca=_decode(data, PREVIOUS_CA),
        rotated_at=_time(annotations.get(ROTATED_AT)),
        issued_at=_time(annotations.get(ISSUED_AT)),
    )


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _secret_data(stored: Stored) -> dict[str, str]:
    data = {
        CA_CERT: _b64(stored.ca_cert),
        CA_KEY: _b64(stored.ca_key),
        TLS_CERT: _b64(stored.tls_cert),
        TLS_KEY: _b64(stored.tls_key),
    }
    if stored.previous_ca:
        data[PREVIOUS_CA] = _b64(stored.previous_ca)
    return data


def _secret_annotations(stored: Stored, existing: dict[str, str]) -> dict[str, str]:
    annotations = {k: v for k, v in existing.items() if k not in (ROTATED_AT, ISSUED_AT)}
    if stored.rotated_at is not None:
        annotations[ROTATED_AT] = stored.rotated_at.isoformat()
    if stored.issued_at is not None:
        annotations[ISSUED_AT] = stored.issued_at.isoformat()
    return annotations


def _api_message(exc: k8s.ApiException) -> str:
    try:
        message = json.loads(exc.body or "{}").get("message")
    except (ValueError, AttributeError):
        message = None
    return str(message or exc.reason or exc.status)


# -- the bootstrap --------------------------------------------------------------------------------
class InjectorTls:
    """Keeps the injector's Secret, caBundle and served certificate right (module docstring).

    `reconcile()` once before serving (it makes `tls`), then `run()` for the periodic checks.
    `clock` is for tests: rotation decisions use it, certificates are dated by it.
    """

    def __init__(
        self, api: k8s.ApiClient, settings: TlsSettings, *, clock: Clock = _utcnow
    ) -> None:
        self.api = api
        self.settings = settings
        self.clock = clock
        self.core = k8s.CoreV1Api(api)
        self.admission = k8s.AdmissionregistrationV1Api(api)
        self.stored: Stored | None = None
        self.writes = 0  # Secrets this instance created or replaced
        self.conflicts = 0  # writes another writer beat
        self.published = False  # the last check found (or made) every caBundle right
        self._tls: PemTls | None = None
        self._said: set[str] = set()
        self._expiry: Gauge | None = None

    @property
    def where(self) -> str:
        return f"Secret {self.settings.namespace}/{self.settings.secret}"

    @property
    def tls(self) -> PemTls:
        """The served certificate, swapped on renewal; exists after the first reconcile()."""
        if self._tls is None:
            raise RuntimeError("InjectorTls.tls: call reconcile() first")
        return self._tls

    def register_metrics(self, registry: CollectorRegistry) -> None:
        """Export when the served certificate and the CA expire (alert on it, not on failure)."""
        self._expiry = Gauge(
            "tpcontrol_webhook_certificate_expiry_timestamp_seconds",
            "When the agent injector's certificates expire (Unix time).",
            ["certificate"],
            registry=registry,
        )
        if self.stored is not None:
            self._export(self.stored)

    async def reconcile(self) -> Stored:
        """One check: the Secret decided and written if needed, served, its CA published."""
        config = await self._read_configuration()
        stored = await self._ensure_secret(config)
        self._serve(stored)
        await self._publish(stored, config)
        self.stored = stored
        return stored

    async def run(self) -> None:
        """Check every `check_interval` until cancelled; a failed check is logged, the current
        certificate keeps being served, and the next check comes sooner."""
        interval = self.settings.check_interval
        delay = interval if self.published else min(interval, RETRY_INTERVAL)
        while True:
            await asyncio.sleep(delay)
            try:
                await self.reconcile()
            except asyncio.CancelledError:
                raise
            except TlsBootstrapError as exc:
                log.error("%s", exc)
                delay = min(interval, RETRY_INTERVAL)
            except Exception:  # the API unreachable, or a bug: keep serving, try again
                log.exception("checking the agent injector's TLS failed")
                delay = min(interval, RETRY_INTERVAL)
            else:
                delay = interval if self.published else min(interval, RETRY_INTERVAL)

    # -- the Secret
    async def _read_secret(self) -> Json | None:
        try:
            secret = await self.core.read_namespaced_secret(
                self.settings.secret, self.settings.namespace
            )
        except k8s.ApiException as exc:
            if exc.status == 404:
                return None
            raise self._error("get", exc) from None
        result: Json = self.api.sanitize_for_serialization(secret)
        return result

    def _error(self, verb: str, exc: k8s.ApiException) -> TlsBootstrapError:
        hint = ""
        if exc.status == 403:
            hint = (
                f" (the injector's ServiceAccount needs get, create and update on {self.where};"
                " see deploy/rbac.yaml)"
            )
        return TlsBootstrapError(
            f"cannot {verb} {self.where}: {exc.status} {_api_message(exc)}{hint}"
        )

    async def _write(self, secret: Json | None, stored: Stored) -> None:
        name, namespace = self.settings.secret, self.settings.namespace
        if secret is None:
            body: Json = {
                "apiVersion": "v1",
                "kind": "Secret",
                "metadata": {
                    "name": name,
                    "namespace": namespace,
                    "labels": {"app.kubernetes.io/managed-by": "tpcontrol-agent-injector"},
                    "annotations": _secret_annotations(stored, {}),
                },
                "type": "kubernetes.io/tls",
                "data": _secret_data(stored),
            }
            await self.core.create_namespaced_secret(namespace, cast(Any, body))
            return
        # A replace under the read resourceVersion: a concurrent writer makes it a 409. The type
        # stays as it is (it cannot change); the data is exactly ours.
        body = dict(secret)
        meta = dict(body.get("metadata") or {})
        meta["annotations"] = _secret_annotations(stored, meta.get("annotations") or {})
        body["metadata"] = meta
        body["data"] = _secret_data(stored)
        body.pop("stringData", None)
        await self.core.replace_namespaced_secret(name, namespace, cast(Any, body))

    async def _ensure_secret(self, config: Json | None) -> Stored:
        for _ in range(WRITE_ATTEMPTS):
            secret = await self._read_secret()
            current = stored_from_secret(secret) if secret is not None else None
            desired, changes = plan(
                current, self.settings, self.clock(), lambda ca: self._carries(config, ca)
            )
            if desired == current:
                return desired
            try:
                await self._write(secret, desired)
            except k8s.ApiException as exc:
                if exc.status == 409:  # another replica wrote first: read what it wrote
                    self.conflicts += 1
                    continue
                raise self._error("create" if secret is None else "update", exc) from None
            self.writes += 1
            for level, why in changes:
                log.log(level, "%s: %s", self.where, why)
            return desired
        raise TlsBootstrapError(
            f"{self.where} changed under each of {WRITE_ATTEMPTS} attempts to write it"
        )

    # -- serving
    def _serve(self, stored: Stored) -> None:
        if self._tls is None:
            self._tls = PemTls(stored.tls_cert, stored.tls_key)
        elif not self._tls.update(stored.tls_cert, stored.tls_key):
            return
        cert = load_certificate(stored.tls_cert)
        log.info(
            "serving the certificate of %s (valid until %s)",
            self.where,
            f"{cert.not_valid_after_utc:%Y-%m-%d %H:%M:%S}Z",
        )
        self._export(stored)

    def _export(self, stored: Stored) -> None:
        if self._expiry is None:
            return
        for role, pem in (("serving", stored.tls_cert), ("ca", stored.ca_cert)):
            end = load_certificate(pem).not_valid_after_utc
            self._expiry.labels(role).set(end.timestamp())

    # -- the MutatingWebhookConfiguration
    def _once(self, level: int, message: str) -> None:
        """Log a standing problem once, not at every check."""
        if message not in self._said:
            self._said.add(message)
            log.log(level, "%s", message)

    async def _read_configuration(self) -> Json | None:
        name = self.settings.webhook_configuration
        if not name:
            return None
        try:
            config = await self.admission.read_mutating_webhook_configuration(name)
        except k8s.ApiException as exc:
            if exc.status == 404:
                self._once(
                    logging.WARNING,
                    f"MutatingWebhookConfiguration {name} not found: its caBundle is written "
                    "when it appears",
                )
            elif exc.status == 403:
                self._once(
                    logging.ERROR,
                    f"cannot get MutatingWebhookConfiguration {name}: {_api_message(exc)} (the "
                    "injector's ServiceAccount needs get and patch on it; see deploy/rbac.yaml)",
                )
            else:
                log.error(
                    "cannot get MutatingWebhookConfiguration %s: %s %s",
                    name,
                    exc.status,
                    _api_message(exc),
                )
            return None
        result: Json = self.api.sanitize_for_serialization(config)
        return result

    def _carries(self, config: Json | None, ca: bytes) -> bool:
        """Whether every webhook entry's caBundle has this CA (vacuously, with none to write)."""
        if not self.settings.webhook_configuration:
            return True
        if config is None:
            return False
        for hook in config.get("webhooks") or []:
            bundle = _decode(hook.get("clientConfig") or {}, "caBundle")
            if ca.strip() not in bundle:
                return False
        return True

    async def _publish(self, stored: Stored, config: Json | None) -> None:
        name = self.settings.webhook_configuration
        if not name:
            self.published = True
            return
        self.published = False
        want = _b64(stored.bundle())
        for _ in range(WRITE_ATTEMPTS):
            if config is None:
                return
            hooks = config.get("webhooks") or []
            self._check_targets(name, hooks)
            stale = [
                h["name"] for h in hooks if (h.get("clientConfig") or {}).get("caBundle") != want
            ]
            if not stale:
                self.published = True
                return
            # A strategic merge patch keyed by entry name touches caBundle and nothing else;
            # the resourceVersion makes it fail (409) rather than re-create a removed entry.
            patch = {
                "metadata": {"resourceVersion": config["metadata"]["resourceVersion"]},
                "webhooks": [{"name": n, "clientConfig": {"caBundle": want}} for n in stale],
            }
            try:
                await self.admission.patch_mutating_webhook_configuration(name, patch)
            except k8s.ApiException as exc:
                if exc.status == 409:  # changed since read: read again
                    config = await self._read_configuration()
                    continue
                self._once(
                    logging.ERROR,
                    f"cannot patch the caBundle of MutatingWebhookConfiguration {name}: "
                    f"{exc.status} {_api_message(exc)}"
                    + (" (see deploy/rbac.yaml)" if exc.status == 403 else ""),
                )
                return
            log.info(
                "wrote the CA of %s into the caBundle of %s (%s)",
                self.where,
                name,
                ", ".join(stale),
            )
            self.published = True
            return
        log.error("MutatingWebhookConfiguration %s changed under every patch; next check", name)

    def _check_targets(self, name: str, hooks: list[Json]) -> None:
        """Warn when an entry calls a Service the certificate is not made for."""
        for hook in hooks:
            service = (hook.get("clientConfig") or {}).get("service")
            if not service:
                continue
            target = f"{service.get('name')}.{service.get('namespace')}"
            mine = f"{self.settings.service}.{self.settings.namespace}"
            if target != mine:
                self._once(
                    logging.WARNING,
                    f"MutatingWebhookConfiguration {name}, webhook {hook.get('name')}: calls "
                    f"Service {target}, but the certificate is for {mine}.svc (--service, "
                    "--manager-namespace)",
                )
