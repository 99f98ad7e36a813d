"""Who is calling the traffic-manager: Kubernetes identities, checked on every call.

Three kinds of credential reach the manager, each as `Authorization: Bearer ...` (or as the
`token` of a tunnel stream's first line):

- a client's kubeconfig token, checked by a TokenReview with the API server's own audiences;
- an agent's projected service-account token, audience `traffic-manager` (the webhook mounts
  it), checked by a TokenReview for that audience; the pod it is bound to (name and uid from the
  token's claims) is the agent's identity, never what a request body says;
- a manager token (`tpm1.`), which the manager signs at `/v1/login` for a client that proved a
  kubeconfig client certificate in a TLS handshake against the cluster's client CA. It lives an
  hour and dies with the manager process (its key is never stored), so the CLI logs in again.

The audiences keep the kinds apart: an agent token is no client credential and a user's token
no agent's. Answers are cached for `CACHE_TTL` seconds by the token's hash, as the API server
caches its webhook authenticators, so a tunnel stream costs no API call.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Literal

import msgspec
from kubernetes_asyncio import client as k8s

from tpcontrol.names import AGENT_AUDIENCE

MANAGER_TOKEN_PREFIX = "tpm1."
MANAGER_TOKEN_LIFETIME = 3600.0
CACHE_TTL = 30.0
CACHE_SIZE = 4096
MAX_REVIEWS_IN_FLIGHT = 16  # a flood of made-up tokens queues here, not at the API server
MAX_TOKEN = 16 * 1024
POD_NAME = "authentication.kubernetes.io/pod-name"
POD_UID = "authentication.kubernetes.io/pod-uid"

AuthMode = Literal["enforcing", "permissive"]


class Unauthenticated(Exception):
    """No credential, or one the cluster does not vouch for; the message says which."""


class Identity(msgspec.Struct, frozen=True, kw_only=True):
    """A Kubernetes user as the API server (or the client CA) names it."""

    username: str
    uid: str = ""
    groups: tuple[str, ...] = ()
    extra: dict[str, list[str]] = {}
    via: Literal["token", "certificate", "agent-token", "none"] = "token"

    @property
    def key(self) -> str:
        """What a session is bound to: the user, and for a pod's token the pod's uid."""
        pod = self.extra.get(POD_UID)
        if self.via == "agent-token" and pod:
            return f"pod:{pod[0]}"
        return f"user:{self.username}:{self.uid}"

    @property
    def pod(self) -> tuple[str, str] | None:
        """(pod name, pod uid) for an agent token bound to a pod."""
        name, uid = self.extra.get(POD_NAME), self.extra.get(POD_UID)
        return (name[0], uid[0]) if name and uid else None

    @property
    def service_account_namespace(self) -> str:
        parts = self.username.split(":")
        if len(parts) == 4 and parts[:2] == ["system", "serviceaccount"]:
            return parts[2]
        return ""


ANONYMOUS = Identity(username="system:anonymous", groups=("system:unauthenticated",), via="none")


def bearer(header: str | None) -> str:
    """The token of an `Authorization: Bearer` header; Unauthenticated says what is wrong."""
    if not header:
        raise Unauthenticated(
            "no credentials: send Authorization: Bearer with a token of your kubeconfig "
            "(tpcontrol does), or log in with a client certificate"
        )
    scheme, _, token = header.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise Unauthenticated("Authorization header: expected 'Bearer <token>'")
    if len(token) > MAX_TOKEN:
        raise Unauthenticated(f"Authorization header: token longer than {MAX_TOKEN} bytes")
    return token


class _Claims(msgspec.Struct, frozen=True):
    u: str
    g: list[str]
    exp: float


class ManagerTokens:
    """Short-lived tokens this manager signs for users that proved a client certificate."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._key = secrets.token_bytes(32)
        self.clock = clock

    def issue(self, username: str, groups: list[str]) -> tuple[str, float]:
        expires = self.clock() + MANAGER_TOKEN_LIFETIME
        payload = base64.urlsafe_b64encode(msgspec.json.encode(_Claims(username, groups, expires)))
        mac = hmac.new(self._key, payload, hashlib.sha256).digest()
        text = payload.decode().rstrip("=") + "." + base64.urlsafe_b64encode(mac).decode()
        return MANAGER_TOKEN_PREFIX + text.rstrip("="), expires

    def check(self, token: str) -> Identity:
        body = token.removeprefix(MANAGER_TOKEN_PREFIX)
        payload, _, mac = body.partition(".")
        try:
            raw = base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4))
            given = base64.urlsafe_b64decode(mac + "=" * (-len(mac) % 4))
        except ValueError:
            raise Unauthenticated("manager token: not base64") from None
        padded = base64.urlsafe_b64encode(raw)
        if not hmac.compare_digest(hmac.new(self._key, padded, hashlib.sha256).digest(), given):
            raise Unauthenticated(
                "manager token: not signed by this traffic-manager (it restarted? log in again)"
            )
        claims = msgspec.json.decode(raw, type=_Claims)
        if claims.exp < self.clock():
            raise Unauthenticated("manager token: expired; log in again")
        return Identity(username=claims.u, groups=tuple(claims.g), via="certificate")


class _Cache:
    """A bounded map from a token's hash to its identity (or refusal), for CACHE_TTL seconds."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self.clock = clock
        self._items: OrderedDict[bytes, tuple[float, Identity | str]] = OrderedDict()

    def get(self, key: bytes) -> Identity | str | None:
        found = self._items.get(key)
        if found is None or found[0] < self.clock():
            self._items.pop(key, None)
            return None
        return found[1]

    def clear(self) -> None:
        self._items.clear()

    def put(self, key: bytes, value: Identity | str) -> None:
        self._items[key] = (self.clock() + CACHE_TTL, value)
        self._items.move_to_end(key)
        while len(self._items) > CACHE_SIZE:
            self._items.popitem(last=False)


class Authenticator:
    """Turns a bearer token into an Identity, through the API server's TokenReview."""

    def __init__(self, api: k8s.ApiClient, clock: Callable[[], float] = time.monotonic) -> None:
        self.reviews = k8s.AuthenticationV1Api(api)
        self.manager_tokens = ManagerTokens()
        self._cache = _Cache(clock)
        self.calls = 0  # TokenReviews sent (what the cache saves)
        self._in_flight = asyncio.Semaphore(MAX_REVIEWS_IN_FLIGHT)

    def forget(self) -> None:
        """Review every token afresh from now on."""
        self._cache.clear()

    async def client(self, token: str) -> Identity:
        """A developer (or a program with a kubeconfig): a user token or a manager token."""
        if token.startswith(MANAGER_TOKEN_PREFIX):
            return self.manager_tokens.check(token)
        identity = await self._review(token, None)
        if identity.via == "agent-token":  # pragma: no cover - the audiences exclude it
            raise Unauthenticated("an agent's token is not a client credential")
        return identity

    async def agent(self, token: str) -> Identity:
        """An agent: a pod-bound service-account token for the audience `traffic-manager`."""
        if token.startswith(MANAGER_TOKEN_PREFIX):
            raise Unauthenticated("a manager token is not an agent credential")
        identity = await self._review(token, AGENT_AUDIENCE)
        if identity.pod is None or not identity.service_account_namespace:
            raise Unauthenticated(
                "agent token: not bound to a pod (use the projected token the injector mounts)"
            )
        return identity

    async def _review(self, token: str, audience: str | None) -> Identity:
        key = hashlib.sha256(f"{audience}\0{token}".encode()).digest()
        cached = self._cache.get(key)
        if isinstance(cached, str):
            raise Unauthenticated(cached)
        if cached is not None:
            return cached
        self.calls += 1
        spec = k8s.V1TokenReviewSpec(token=token, audiences=[audience] if audience else None)
        async with self._in_flight:
            answer = await self.reviews.create_token_review(k8s.V1TokenReview(spec=spec))
        status = answer.status
        what = f"token for audience {audience!r}" if audience else "token"
        if status is None or not status.authenticated or status.user is None:
            why = (status.error if status is not None else "") or "not authenticated"
            message = f"{what}: the API server does not accept it ({why})"
            self._cache.put(key, message)
            raise Unauthenticated(message)
        if audience and audience not in (status.audiences or []):
            message = f"{what}: issued for {status.audiences}, not {audience!r}"
            self._cache.put(key, message)
            raise Unauthenticated(message)
        user = status.user
        identity = Identity(
            username=user.username or "",
            uid=user.uid or "",
            groups=tuple(user.groups or ()),
            extra={k: list(v) for k, v in (user.extra or {}).items()},
            via="agent-token" if audience else "token",
        )
        self._cache.put(key, identity)
        return identity
