"""The developer's credential towards the traffic-manager: the user of their kubeconfig.

A kubeconfig user with a token (`token`, `tokenFile`) sends it as is; the manager checks it with
a TokenReview. A user with a client certificate (kubeadm, kind, the local cluster) proves it in
a TLS handshake with the manager's login port, which answers with a manager token for an hour;
the CLI logs in again when it expires or the manager restarts. Other kinds of user (exec
plugins, auth providers) are refused with an error naming them.
"""

from __future__ import annotations

import base64
import ipaddress
import os
import ssl
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp
import msgspec
import yaml

from tpcontrol.certs import load_pem_chain

LOGIN_TIMEOUT = aiohttp.ClientTimeout(total=15)
RENEW_BEFORE = 300.0


class CredentialError(ValueError):
    """A kubeconfig whose user cannot be presented; the message names the field."""


@dataclass(frozen=True)
class KubeUser:
    """One kubeconfig user's credential: a token, or a client certificate and key (PEM)."""

    name: str
    token: str = ""
    cert: bytes = b""
    key: bytes = b""


def kubeconfig_path(given: str | None) -> Path | None:
    """`--kubeconfig`, else the first file of $KUBECONFIG, else ~/.kube/config (if it exists)."""
    if given:
        return Path(given)
    for part in os.environ.get("KUBECONFIG", "").split(os.pathsep):
        if part and Path(part).is_file():
            return Path(part)
    default = Path.home() / ".kube" / "config"
    return default if default.is_file() else None


def _read(value: object, base: Path, field: str) -> bytes:
    path = Path(str(value))
    try:
        return (path if path.is_absolute() else base / path).read_bytes()
    except OSError as exc:
        raise CredentialError(f"kubeconfig {field}: cannot read {path}: {exc.strerror}") from None


def _data(value: object, field: str) -> bytes:
    try:
        return base64.b64decode(str(value), validate=True)
    except ValueError:
        raise CredentialError(f"kubeconfig {field}: not base64") from None


def _pem(user: dict[str, object], base: Path, field: str) -> bytes:
    """`FIELD-data` (base64) or `FIELD` (a path relative to the kubeconfig), else nothing."""
    if user.get(f"{field}-data"):
        return _data(user[f"{field}-data"], f"{field}-data")
    if user.get(field):
        return _read(user[field], base, field)
    return b""


def load_user(given: str | None) -> KubeUser | None:
    """The current context's user, or None when there is no kubeconfig at all."""
    path = kubeconfig_path(given)
    if path is None:
        return None
    try:
        config = yaml.safe_load(path.read_text()) or {}
    except OSError as exc:
        raise CredentialError(f"kubeconfig {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise CredentialError(f"kubeconfig {path}: not YAML ({exc})") from None
    if not isinstance(config, dict):
        raise CredentialError(f"kubeconfig {path}: not a mapping")
    current = config.get("current-context")
    contexts = {c.get("name"): c.get("context") or {} for c in config.get("contexts") or []}
    if current not in contexts:
        raise CredentialError(f"kubeconfig {path}: current-context {current!r} is not defined")
    name = contexts[current].get("user")
    users = {u.get("name"): u.get("user") or {} for u in config.get("users") or []}
    if name not in users:
        raise CredentialError(f"kubeconfig {path}: user {name!r} is not defined")
    user = users[name]
    base = path.parent
    if user.get("token"):
        return KubeUser(str(name), token=str(user["token"]).strip())
    if user.get("tokenFile"):
        return KubeUser(
            str(name), token=_read(user["tokenFile"], base, "tokenFile").decode().strip()
        )
    cert, key = (_pem(user, base, part) for part in ("client-certificate", "client-key"))
    if cert and key:
        return KubeUser(str(name), cert=cert, key=key)
    kinds = sorted(k for k in ("exec", "auth-provider", "username") if user.get(k))
    what = f"its {kinds[0]} credentials are" if kinds else "it has no token or client certificate"
    raise CredentialError(
        f"kubeconfig user {name!r}: {what} not supported by tpcontrol; "
        "use a token or a client certificate"
    )


def plain_http_refusal(url: str, user: KubeUser | None) -> str | None:
    """Why credentials must not go to `url`: plain HTTP to anything but this machine would
    hand a kubeconfig token (an API server credential) to whoever is on the way, or to a fake
    manager. None when it is fine (loopback, as the port-forward's local end is)."""
    parts = urlsplit(url)
    if user is None or parts.scheme != "http":
        return None
    host = parts.hostname or ""
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if loopback:
        return None
    return (
        f"--manager {url}: refusing to send the credentials of kubeconfig user {user.name!r} "
        f"over plain HTTP to {host}; use the port-forward (the default) or a loopback address"
    )


class _Login(msgspec.Struct, frozen=True, rename="camel"):
    token: str
    expires_at: float


class ManagerCredential:
    """What the CLI sends as `Authorization: Bearer`: the kubeconfig token, or a manager token
    bought at `login_url` with the kubeconfig's client certificate."""

    def __init__(self, user: KubeUser | None, login_url: str | None = None) -> None:
        self.user = user
        self.login_url = login_url
        self._token = ""
        self._expires = 0.0

    def invalidate(self) -> None:
        """The manager refused the manager token (it restarted): log in again next time."""
        self._expires = 0.0

    async def token(self) -> str:
        if self.user is None:
            return ""
        if self.user.token:
            return self.user.token
        if self._expires - RENEW_BEFORE < time.time():
            await self._login()
        return self._token

    def current(self) -> str:
        """The token as last known (for a tunnel stream's first line)."""
        if self.user is None:
            return ""
        return self.user.token or self._token

    async def headers(self) -> dict[str, str]:
        token = await self.token()
        return {"authorization": f"Bearer {token}"} if token else {}

    async def _login(self) -> None:
        assert self.user is not None
        if not self.login_url:
            raise CredentialError(
                f"kubeconfig user {self.user.name!r} has a client certificate, which needs the "
                "manager's login port (use the default port-forward, or a token)"
            )
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
        # What this handshake proves (a signature over it) is worth nothing to another server,
        # and the manager's port is reached through the API server's port-forward: the
        # manager's own self-signed certificate is not checked.
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        try:
            load_pem_chain(context, self.user.cert, self.user.key)
        except ssl.SSLError as exc:
            raise CredentialError(
                f"kubeconfig user {self.user.name!r}: client certificate or key unusable: {exc}"
            ) from None
        async with aiohttp.ClientSession(timeout=LOGIN_TIMEOUT) as http:
            try:
                async with http.post(f"{self.login_url}/v1/login", ssl=context) as r:
                    raw = await r.read()
                    if r.status != 200:
                        error = msgspec.json.decode(raw).get("error") if raw else r.status
                        raise CredentialError(f"the manager refused the login: {error}")
            except aiohttp.ClientSSLError as exc:
                raise CredentialError(
                    f"login with the client certificate of {self.user.name!r} failed: {exc}"
                ) from None
            except (aiohttp.ServerDisconnectedError, ConnectionResetError):
                # TLS 1.3: the server checks the certificate after the client's handshake ends.
                raise CredentialError(
                    f"login with the client certificate of {self.user.name!r} failed: the "
                    "manager ended the handshake (a certificate the cluster's client CA did not "
                    "sign?)"
                ) from None
        answer = msgspec.json.decode(raw, type=_Login)
        self._token, self._expires = answer.token, answer.expires_at
