"""The agent injector: an HTTPS mutating admission webhook that adds the traffic-agent to pods.

Each new pod whose workload has an entry in the namespace's `telepresence-agents` ConfigMap (or
that is annotated `inject-traffic-agent: enabled`) gets a JSON patch that adds the agent, built
from that entry (or, for an annotated pod without one, from a config generated from the workload
and its services, which is then stored). Unlike 2.6, an existing entry is not regenerated and
rewritten here: the manager owns it, and a concurrent rewrite could undo a newer one.

Unlike Telepresence 2.6, a user error never rejects the pod: it is admitted unchanged, with an
AdmissionReview warning and a log line, so a broken intercept set-up cannot stop a workload
from scaling.

A little long: the decision logic of spec section 3.4 and the server that carries it, which
share the outcome type.
"""

from __future__ import annotations

import base64
import logging
import os
import ssl
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import msgspec
from aiohttp import web
from kubernetes_asyncio import client as k8s
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)

from tpcontrol.certs import Authority, context_from_pem
from tpcontrol.injector.podpatch import PatchError, pod_patch
from tpcontrol.kube.agentconfig import AgentConfigError, GeneratorSettings, generate
from tpcontrol.kube.configmap import AgentConfigStore
from tpcontrol.kube.workloads import Json, Workloads
from tpcontrol.names import INJECT_ANNOTATION
from tpproxy.config import ConfigError, Sidecar

log = logging.getLogger("tpcontrol.injector.webhook")

SYSTEM_NAMESPACES = frozenset({"kube-system", "kube-public", "kube-node-lease"})
WEBHOOK_PATH = "/traffic-agent"
MAX_BODY = 8 * 1024 * 1024


# -- the AdmissionReview wire format (admission.k8s.io/v1) ------------------------------------
class GroupVersionKind(msgspec.Struct, frozen=True):
    group: str = ""
    version: str = ""
    kind: str = ""


class GroupVersionResource(msgspec.Struct, frozen=True):
    group: str = ""
    version: str = ""
    resource: str = ""


class AdmissionRequest(msgspec.Struct, frozen=True, rename="camel"):
    uid: str
    kind: GroupVersionKind = GroupVersionKind()
    resource: GroupVersionResource = GroupVersionResource()
    namespace: str = ""
    name: str = ""
    operation: str = ""
    object: dict[str, Any] | None = None
    old_object: dict[str, Any] | None = None
    dry_run: bool = False


class AdmissionReview(msgspec.Struct, frozen=True, rename="camel"):
    request: AdmissionRequest | None = None
    api_version: str = ""
    kind: str = ""


class Status(msgspec.Struct, frozen=True, omit_defaults=True):
    message: str = ""
    code: int = 0


class AdmissionResponse(msgspec.Struct, frozen=True, rename="camel", omit_defaults=True):
    uid: str
    allowed: bool  # no default: always written, as the API server requires
    patch_type: str | None = None
    patch: str | None = None
    warnings: list[str] | None = None
    status: Status | None = None


class ReviewResponse(msgspec.Struct, frozen=True, rename="camel"):
    response: AdmissionResponse
    api_version: str = "admission.k8s.io/v1"
    kind: str = "AdmissionReview"


# -- settings and decisions --------------------------------------------------------------------
@dataclass(frozen=True)
class WebhookSettings:
    """How pods are injected: the generator's settings plus the inject policy."""

    generator: GeneratorSettings
    inject_policy: Literal["OnDemand", "WhenEnabled"] = "OnDemand"
    agent_command: list[str] | None = None


@dataclass
class Outcome:
    """What one admission decided: a patch (possibly empty), warnings, and why, for the log."""

    patch: list[Json] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    reason: str = ""


class Injector:
    """The decision logic of spec section 3.4, over a pod in its JSON form."""

    def __init__(self, api: k8s.ApiClient, settings: WebhookSettings) -> None:
        self.settings = settings
        self.store = AgentConfigStore(api)
        self.workloads = Workloads(api)

    async def admit(self, request: AdmissionRequest) -> Outcome:
        """The patch for a pod CREATE; every user error becomes a warning, never a rejection."""
        if request.operation != "CREATE":
            return Outcome(reason=f"{request.operation or 'no'} operation: nothing to inject")
        pod = request.object
        if not isinstance(pod, dict):
            return Outcome(reason="no pod object in the request")
        meta = pod.get("metadata") or {}
        namespace = meta.get("namespace") or request.namespace
        name = meta.get("name") or meta.get("generateName") or request.name
        where = f"pod {name}.{namespace}"
        if not namespace:
            return Outcome(warnings=[f"{where}: no namespace; traffic-agent not injected"])
        if namespace in SYSTEM_NAMESPACES:
            return Outcome(reason=f"{where}: system namespace")
        if namespace == self.settings.generator.manager_namespace:
            return Outcome(reason=f"{where}: the traffic-manager's own namespace")
        value = (meta.get("annotations") or {}).get(INJECT_ANNOTATION, "")
        if value in ("false", "disabled"):
            return Outcome(reason=f"{where}: {INJECT_ANNOTATION}={value}")
        if value not in ("", "enabled"):
            return Outcome(
                warnings=[
                    f"{where}: invalid value {value!r} for annotation {INJECT_ANNOTATION} "
                    "(use enabled, disabled or false); traffic-agent not injected"
                ]
            )
        if value == "" and self.settings.inject_policy == "WhenEnabled":
            why = f"not annotated {INJECT_ANNOTATION}=enabled (WhenEnabled)"
            return Outcome(reason=f"{where}: {why}")
        try:
            return await self._inject(
                pod, namespace, where, enabled=value == "enabled", dry_run=request.dry_run
            )
        except (AgentConfigError, PatchError, ConfigError) as exc:
            return Outcome(warnings=[f"{where}: traffic-agent not injected: {exc}"])

    def stored_entry_problem(self, entry: Sidecar, key: str, namespace: str) -> str | None:
        """Why a stored entry must not be injected: whoever may write the namespace's
        ConfigMap could otherwise point the agent at another manager or namespace."""
        wanted_host = f"traffic-manager.{self.settings.generator.manager_namespace}"
        if entry.agent_name != key:
            return f"agentName {entry.agent_name[:100]!r} is not its key {key!r}"
        if entry.namespace != namespace:
            return f"namespace {entry.namespace[:100]!r} is not the pod's {namespace!r}"
        if entry.manager_host != wanted_host:
            return f"managerHost {entry.manager_host[:100]!r} is not {wanted_host!r}"
        if entry.manager_port != self.settings.generator.manager_port:
            return f"managerPort {entry.manager_port} is not {self.settings.generator.manager_port}"
        return None

    async def _inject(
        self, pod: Json, namespace: str, where: str, *, enabled: bool, dry_run: bool = False
    ) -> Outcome:
        entries = await self.store.entries(namespace)
        entry = await self.workloads.entry_for(pod, namespace, entries)
        if entry is None and not enabled:
            return Outcome(reason=f"{where}: no agent config for its workload")
        if entry is not None and entry.manual:
            return Outcome(reason=f"{where}: manually injected ({entry.agent_name})")
        if entry is not None and not entry.create:
            # The manager owns existing entries (prepare and upgrade regenerate them): the pod is
            # patched from the entry as stored, which is also what its agent will read. Writing
            # a regeneration here could overwrite a newer entry written in between.
            key = next(k for k, v in entries.items() if v is entry)
            problem = self.stored_entry_problem(entry, key, namespace)
            if problem is not None:
                return Outcome(warnings=[f"{where}: traffic-agent not injected: entry {problem}"])
            sidecar: Sidecar = entry
        else:
            workload = await self.workloads.owner_workload(pod, namespace)
            if workload is None:
                problem = "has no Deployment, ReplicaSet or StatefulSet controller"
                if enabled:
                    return Outcome(warnings=[f"{where} {problem}; traffic-agent not injected"])
                return Outcome(reason=f"{where} {problem}")
            template = workload.get("spec", {}).get("template", {}).get("metadata", {})
            if (template.get("annotations") or {}).get(INJECT_ANNOTATION) != "enabled":
                # The request's pod is what the caller says; the workload is what the API
                # server holds. Only a workload that asks for the agent is enrolled, so a forged
                # AdmissionReview cannot enrol one.
                return Outcome(
                    warnings=[
                        f"{where}: its {workload.get('kind')} does not annotate its pods "
                        f"{INJECT_ANNOTATION}=enabled; traffic-agent not injected"
                    ]
                )
            services = await self.workloads.services(namespace)
            sidecar = generate(workload, services, self.settings.generator)
            if dry_run:  # sideEffects NoneOnDryRun: a dry run writes nothing
                pass
            elif await self.store.create(sidecar):
                log.info("%s: stored the agent config of %s", where, sidecar.agent_name)
        # The image is the injector's own setting, whatever an entry says: an entry is as
        # trusted as whoever may write the ConfigMap, and the image runs with the app's secrets.
        image = self.settings.generator.agent_image
        if sidecar.agent_image != image:
            log.warning("%s: entry image %r replaced by %r", where, sidecar.agent_image[:99], image)
            sidecar = msgspec.structs.replace(sidecar, agent_image=image)
        patch = pod_patch(pod, sidecar, agent_command=self.settings.agent_command)
        return Outcome(patch=patch, reason=f"{where}: {len(patch)} patch operation(s)")


# -- TLS with reload -----------------------------------------------------------------------------
def _server_context(cert: Path, key: Path) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert, key)
    return context


class SwitchingTls:
    """A server SSL context whose certificate can change between handshakes.

    The SNI callback runs on every handshake (with or without a server name) and hands the
    connection the newest loaded context, so a renewed certificate is served from the next
    connection on, without a restart and without touching open connections.
    """

    def __init__(self, first: ssl.SSLContext) -> None:
        self._current = first
        self.context = first
        self.context.sni_callback = self._pick
        self.loads = 1

    def _refresh(self) -> None:
        """Called before each handshake: subclasses load a newer pair here."""

    def _pick(self, sock: ssl.SSLObject, _name: str | None, _ctx: ssl.SSLContext) -> None:
        self._refresh()
        sock.context = self._current


class ReloadingTls(SwitchingTls):
    """Certificate files that are reloaded when they change (people who bring their own).

    Each handshake checks the files' modification times (two stat calls) and swaps in a freshly
    loaded context when they changed; a pair that fails to load is logged and the old one kept.
    """

    def __init__(self, cert: Path, key: Path) -> None:
        self.cert, self.key = cert, key
        self._stamp: tuple[float, float] = (0.0, 0.0)
        super().__init__(self._load())

    def _load(self) -> ssl.SSLContext:
        stamp = (os.stat(self.cert).st_mtime, os.stat(self.key).st_mtime)
        context = _server_context(self.cert, self.key)
        self._stamp = stamp
        return context

    def _refresh(self) -> None:
        try:
            stamp = (os.stat(self.cert).st_mtime, os.stat(self.key).st_mtime)
            if stamp != self._stamp:
                self._current = self._load()
                self.loads += 1
                log.info("reloaded the serving certificate from %s", self.cert)
        except (OSError, ssl.SSLError) as exc:
            log.error(
                "cannot reload %s / %s, keeping the previous pair: %s", self.cert, self.key, exc
            )


class PemTls(SwitchingTls):
    """A certificate handed over in memory (the injector's Secret), swapped by `update`."""

    def __init__(self, cert: bytes, key: bytes) -> None:
        super().__init__(context_from_pem(cert, key))
        self.cert = cert

    def update(self, cert: bytes, key: bytes) -> bool:
        """Serve this pair from the next handshake on; False if it is already served. A pair
        that does not load raises ssl.SSLError and the previous one stays."""
        if cert == self.cert:
            return False
        self._current = context_from_pem(cert, key)
        self.cert = cert
        self.loads += 1
        return True


def self_signed(directory: Path, host: str, dns: list[str]) -> tuple[Path, Path, bytes]:
    """Make a CA and a serving certificate for `host`/`dns` in `directory`; returns the CA PEM."""
    directory.mkdir(parents=True, exist_ok=True)
    authority = Authority.create("tpcontrol-agent-injector-ca")
    ips = [host] if host.replace(".", "").isdigit() or ":" in host else []
    cert, key = authority.issue("agent-injector", dns=dns, ips=ips)
    (directory / "tls.crt").write_bytes(cert)
    (directory / "tls.key").write_bytes(key)
    (directory / "ca.crt").write_bytes(authority.pem)
    return directory / "tls.crt", directory / "tls.key", authority.pem


# -- the HTTP side -------------------------------------------------------------------------------
class WebhookServer:
    """The aiohttp application: `POST /traffic-agent`, `GET /healthz`, `GET /metrics`."""

    def __init__(self, injector: Injector) -> None:
        self.injector = injector
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "tpcontrol_admission_requests",
            "Admission reviews by result.",
            ["result"],
            registry=self.registry,
        )
        self.duration = Histogram(
            "tpcontrol_admission_duration_seconds",
            "Time to answer an admission review.",
            registry=self.registry,
        )
        self.app = web.Application(client_max_size=MAX_BODY)
        self.app.router.add_post(WEBHOOK_PATH, self.review)
        self.app.router.add_get("/healthz", self.healthz)
        self.app.router.add_get("/metrics", self.metrics)

    async def healthz(self, _request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def metrics(self, _request: web.Request) -> web.Response:
        return web.Response(
            body=generate_latest(self.registry), headers={"content-type": CONTENT_TYPE_LATEST}
        )

    def _bad(self, reason: str) -> web.Response:
        self.requests.labels("bad_request").inc()
        log.warning("bad admission review: %s", reason)
        return web.Response(status=400, text=f"bad admission review: {reason}\n")

    async def review(self, request: web.Request) -> web.Response:
        started = time.perf_counter()
        if request.content_type != "application/json":
            return self._bad(f"content type must be application/json, not {request.content_type!r}")
        try:
            body = await request.read()
        except web.HTTPRequestEntityTooLarge:
            return self._bad(f"body larger than {MAX_BODY} bytes")
        try:
            review = msgspec.json.decode(body, type=AdmissionReview)
        except msgspec.ValidationError as exc:
            return self._bad(str(exc))
        except msgspec.DecodeError as exc:
            return self._bad(f"not JSON: {exc}")
        if review.request is None:
            return self._bad("no `request` in the AdmissionReview")
        outcome = await self._decide(review.request)
        response = AdmissionResponse(
            uid=review.request.uid, allowed=True, warnings=outcome.warnings or None
        )
        if outcome.patch:
            patch = base64.b64encode(msgspec.json.encode(outcome.patch)).decode()
            response = msgspec.structs.replace(response, patch_type="JSONPatch", patch=patch)
        result = "patched" if outcome.patch else ("warned" if outcome.warnings else "unchanged")
        self.requests.labels(result).inc()
        self.duration.observe(time.perf_counter() - started)
        return web.Response(
            body=msgspec.json.encode(ReviewResponse(response)), content_type="application/json"
        )

    async def _decide(self, request: AdmissionRequest) -> Outcome:
        kind = request.kind
        if (kind.group, kind.version, kind.kind) != ("", "v1", "Pod"):
            return Outcome(reason=f"not a pod ({kind.group}/{kind.version} {kind.kind})")
        try:
            outcome = await self.injector.admit(request)
        except Exception as exc:  # the API or a bug: admit the pod, say why, keep serving
            log.exception("admission of %s failed", request.uid)
            outcome = Outcome(warnings=[f"traffic-agent not injected: internal error: {exc}"])
        for warning in outcome.warnings:
            log.warning("%s", warning)
        if outcome.reason:
            log.debug("%s", outcome.reason)
        return outcome


def webhook_configuration(
    *,
    url: str | None = None,
    service: Mapping[str, Any] | None = None,
    ca_bundle: bytes | None,
    name: str = "agent-injector-webhook",
    namespaces_excluded: tuple[str, ...] = (),
) -> Json:
    """The MutatingWebhookConfiguration that points the API server at this webhook. Without a
    `ca_bundle` it has none, as in deploy/: an injector that keeps its certificate in a Secret
    (tpcontrol.injector.tls) writes its CA there itself."""
    client_config: Json = {}
    if ca_bundle is not None:
        client_config["caBundle"] = base64.b64encode(ca_bundle).decode()
    if url is not None:
        client_config["url"] = url
    else:
        client_config["service"] = dict(service or {})
    hook: Json = {
        "name": "agent-injector.tpcontrol.dev",
        "admissionReviewVersions": ["v1"],
        "clientConfig": client_config,
        "rules": [
            {
                "apiGroups": [""],
                "apiVersions": ["v1"],
                "operations": ["CREATE"],
                "resources": ["pods"],
                "scope": "Namespaced",
            }
        ],
        "failurePolicy": "Ignore",
        "sideEffects": "NoneOnDryRun",
        "timeoutSeconds": 5,
        "reinvocationPolicy": "Never",
    }
    excluded = sorted(SYSTEM_NAMESPACES | set(namespaces_excluded))
    hook["namespaceSelector"] = {
        "matchExpressions": [
            {"key": "kubernetes.io/metadata.name", "operator": "NotIn", "values": excluded}
        ]
    }
    return {
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "MutatingWebhookConfiguration",
        "metadata": {"name": name},
        "webhooks": [hook],
    }


async def start(
    server: WebhookServer, host: str, port: int, tls: SwitchingTls
) -> tuple[web.AppRunner, int]:
    """Listen with TLS; returns the runner (for cleanup) and the bound port."""
    runner = web.AppRunner(server.app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port, ssl_context=tls.context, reuse_address=True)
    await site.start()
    bound: int = runner.addresses[0][1]
    return runner, bound
