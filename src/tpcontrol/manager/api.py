"""The traffic-manager: sessions, the prepare/create intercept flow, and ConfigMap upkeep.

Clients and agents talk to it over HTTP with JSON bodies (msgspec structs, camelCase). The
manager never edits a workload except through a rollout (`tpcontrol.manager.rollout`): preparing an
intercept writes the workload's entry in `telepresence-agents`, the watcher rolls the workload
out, and the webhook injects the agent into the new pods.

Every call but `/healthz` carries a Kubernetes identity (`tpcontrol.manager.auth`) and is authorized
for its target namespace (`tpcontrol.manager.access`); a session answers only to the identity that
opened it. `auth_mode="permissive"` logs what enforcing would refuse and lets it through.

Endpoints (all JSON; errors are `{"error": ..., "code": ...}` with a 4xx status):
  POST   /v1/login                         (TLS port, client certificate) -> {"token", ...}
  POST   /v1/clients                       arrive as a client -> {"sessionId"}
  POST   /v1/agents                        arrive as an agent -> {"sessionId"}
  POST   /v1/sessions/{sid}/remain         heartbeat
  DELETE /v1/sessions/{sid}                depart
  POST   /v1/prepare                       PrepareIntercept
  POST   /v1/sessions/{sid}/intercepts     CreateIntercept
  DELETE /v1/sessions/{sid}/intercepts/{name}
  GET    /v1/sessions/{sid}/intercepts     snapshot; ?watch=1 streams one JSON line per change
  POST   /v1/sessions/{sid}/reviews/{id}   an agent's review of an intercept
  POST   /v1/uninstall                     remove entries (one workload or a namespace's all)
  POST   /v1/upgrade                       regenerate every entry with the configured agent image
  GET    /v1/intercepts                    what the caller may see, others' environments left out
  GET    /v1/info                          the tunnel's port
  GET    /healthz

Watches cost per change what the change touches (issue 15): each watch waits on an event of
its own, subscribed to the state's topics its snapshot depends on (its session, and for an agent
its workload), and a handler that changed the state sets only the events of the topics
`ManagerState.changes()` names. A watch that wakes recomputes its snapshot and writes a line only
if it differs from the last one it wrote, as before; the other watches stay asleep. A client's
watch also looks again at each of its heartbeats, so that what it may see of the app's
environment (a permission, not a state change) is re-checked as often as its intercepts are.

Long on purpose: it is the whole HTTP API, a few lines per handler, with the endpoint table
above as its map; who calls lives in `callers`, the browser guard in `browsers`, the rules in
`state`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

import msgspec
from aiohttp import web
from kubernetes_asyncio import client as k8s

from tpcontrol.kube.agentconfig import AgentConfigError, GeneratorSettings, generate
from tpcontrol.kube.configmap import AgentConfigStore
from tpcontrol.kube.workloads import Workloads
from tpcontrol.manager import access
from tpcontrol.manager import state as st
from tpcontrol.manager.auth import (
    ANONYMOUS,
    AuthMode,
    Identity,
    Unauthenticated,
    bearer,
)
from tpcontrol.manager.browsers import browser_guard, printable_host
from tpcontrol.manager.callers import Callers
from tpcontrol.manager.images import ImageResolver
from tpcontrol.manager.prepare import PrepareError, check_interceptable, find_intercept
from tpcontrol.manager.rendezvous import Rendezvous
from tpcontrol.manager.rollout import AgentConfigWatcher, Rollouts
from tpcontrol.names import AGENT_TTL, CLIENT_TTL
from tpproxy.config import ConfigError
from tpproxy.wire import (
    ErrorBody,
    LoginAnswer,
    ManagerInfo,
    PreparedIntercept,
    PrepareRequest,
    Removed,
    SessionId,
    UninstallRequest,
    Updated,
    UpgradeRequest,
)

log = logging.getLogger("tpcontrol.manager.api")

T = TypeVar("T")
HOUSEKEEPING_INTERVAL = 1.0


DEFAULT_AGENT_IMAGE = "docker.io/tpproxy/agent:0.1.0"


def _default_generator() -> GeneratorSettings:
    return GeneratorSettings(agent_image=DEFAULT_AGENT_IMAGE)


class ManagerSettings(msgspec.Struct, frozen=True, kw_only=True):
    """The manager's settings: the generator's (which hold its namespace, its port and the
    agent image; the image resolver may prefer another image), and its own."""

    generator: GeneratorSettings = msgspec.field(default_factory=_default_generator)
    image_resolver_url: str | None = None
    client_ttl: float = CLIENT_TTL
    agent_ttl: float = AGENT_TTL
    no_agent_timeout: float = 120.0
    tunnel_port: int = 0  # 0: any free port (tests); the deployment uses 8082
    # The TLS port where a client certificate buys a manager token; None: none (0: any port).
    login_port: int | None = None
    auth_mode: AuthMode = "enforcing"

    @property
    def namespace(self) -> str:
        """The manager's own namespace (the generator writes it into every entry)."""
        return self.generator.manager_namespace


MAX_WATCHES_PER_SESSION = 4
MAX_WATCHES = 10_000
CLIENT_CA = ("kube-system", "extension-apiserver-authentication", "client-ca-file")


STATUS = {
    "not_found": 404,
    "already_exists": 409,
    "conflict": 409,
    "invalid_argument": 400,
    "permission_denied": 403,
    "unauthenticated": 401,
    "limit_exceeded": 429,
    "user": 422,
    "config": 422,
}


def _json(obj: object, status: int = 200) -> web.Response:
    return web.Response(
        body=msgspec.json.encode(obj), status=status, content_type="application/json"
    )


def _error(message: str, code: str) -> web.Response:
    return _json(ErrorBody(message, code), STATUS.get(code, 400))


class BadBody(Exception):
    """A request body that does not decode; the message names the field."""


async def _body(request: web.Request, kind: type[T]) -> T:
    """The request body as `kind`; a bad one is a 400 naming the field."""
    try:
        return msgspec.json.decode(await request.read(), type=kind)
    except msgspec.ValidationError as exc:
        raise BadBody(f"bad request body: {exc}") from None
    except msgspec.DecodeError as exc:
        raise BadBody(f"request body is not JSON: {exc}") from None


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _errors(handler: Handler) -> Handler:
    """Turn the typed errors of the state and the prepare logic into JSON error answers."""

    async def wrapped(request: web.Request) -> web.StreamResponse:
        try:
            return await handler(request)
        except BadBody as exc:
            return _error(str(exc), "invalid_argument")
        except Unauthenticated as exc:
            answer = _error(str(exc), "unauthenticated")
            answer.headers["WWW-Authenticate"] = 'Bearer realm="traffic-manager"'
            return answer
        except st.StateError as exc:
            return _error(str(exc), exc.code)
        except PrepareError as exc:
            return _error(str(exc), exc.category)
        except (AgentConfigError, ConfigError) as exc:
            return _error(str(exc), "config")
        except k8s.ApiException as exc:
            log.warning("%s %s: Kubernetes API: %s", request.method, request.path, exc.reason)
            return _json(ErrorBody(f"Kubernetes API: {exc.status} {exc.reason}", "api"), 502)

    return wrapped


class Manager:
    """The manager's state, its view of the cluster, and its HTTP application."""

    def __init__(
        self, api: k8s.ApiClient, settings: ManagerSettings, state: st.ManagerState | None = None
    ) -> None:
        self.settings = settings
        self.state = state or st.ManagerState(
            client_ttl=settings.client_ttl,
            agent_ttl=settings.agent_ttl,
            no_agent_timeout=settings.no_agent_timeout,
        )
        self.workloads = Workloads(api)
        labels = {
            "app.kubernetes.io/name": "telepresence-agents",
            "app.kubernetes.io/created-by": "traffic-manager",
        }
        self.store = AgentConfigStore(api, created_by_labels=labels)
        self.rollouts = Rollouts(api)
        self.watcher = AgentConfigWatcher(
            api, self.rollouts, untouchable=access.SYSTEM_NAMESPACES | {settings.namespace}
        )
        self.images = ImageResolver(settings.generator.agent_image, settings.image_resolver_url)
        self._tasks: list[asyncio.Task[None]] = []
        # The open watches' wake-up events by the topic they follow (see the module docstring).
        self._watching: dict[st.Topic, set[asyncio.Event]] = {}
        self.state.changes()  # starts the state's record of topics changed
        self.stopping = False
        self.callers = Callers(
            api, self.state, self.workloads, settings.namespace, settings.auth_mode
        )
        self.auth, self.access = self.callers.auth, self.callers.access
        self.tunnel = Rendezvous(self.state, self.callers.tunnel_check)
        self.tunnel_port = 0
        self.login_port: int | None = None
        self.watches: dict[str, int] = {}
        app = web.Application(
            client_max_size=1024 * 1024, middlewares=[browser_guard(settings.namespace)]
        )
        routes: list[tuple[str, str, Handler]] = [
            ("POST", "/v1/clients", self.arrive_client),
            ("POST", "/v1/agents", self.arrive_agent),
            ("POST", "/v1/sessions/{sid}/remain", self.remain),
            ("DELETE", "/v1/sessions/{sid}", self.depart),
            ("POST", "/v1/prepare", self.prepare),
            ("POST", "/v1/sessions/{sid}/intercepts", self.create_intercept),
            ("DELETE", "/v1/sessions/{sid}/intercepts/{name}", self.remove_intercept),
            ("GET", "/v1/sessions/{sid}/intercepts", self.list_intercepts),
            ("POST", "/v1/sessions/{sid}/reviews/{id}", self.review),
            ("POST", "/v1/uninstall", self.uninstall),
            ("POST", "/v1/upgrade", self.upgrade),
            ("POST", "/v1/login", self.login),
            ("GET", "/v1/info", self.info),
            ("GET", "/v1/intercepts", self.all_intercepts),
        ]
        for method, path, handler in routes:
            app.router.add_route(method, path, _errors(handler))
        app.router.add_get("/healthz", self.healthz)
        self.app = app

    # -- life ---------------------------------------------------------------------------------
    async def start(self, host: str = "127.0.0.1", port: int = 0) -> tuple[web.AppRunner, int]:
        """Watch ConfigMaps (synced before returning), keep sessions tidy, and listen."""
        self._tasks.append(asyncio.create_task(self.watcher.run()))
        self._tasks.append(asyncio.create_task(self._housekeeping()))
        async with asyncio.timeout(30):
            await self.watcher.synced.wait()
        self.tunnel_port = await self.tunnel.start(host, self.settings.tunnel_port)
        runner = web.AppRunner(self.app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, host, port, reuse_address=True).start()
        bound: int = runner.addresses[0][1]
        if self.settings.login_port is not None:
            tls = await self.callers.login_tls()
            if tls is not None:
                # Loopback only: the login is reached through a port-forward (which the kubelet
                # delivers inside the pod), never from another pod.
                site = web.TCPSite(
                    runner,
                    "127.0.0.1",
                    self.settings.login_port,
                    ssl_context=tls,
                    reuse_address=True,
                )
                await site.start()
                self.login_port = runner.addresses[-1][1]
        log.info(
            "traffic-manager listening on %s:%d (login %s, authentication %s)",
            host, bound, self.login_port, self.settings.auth_mode,
        )  # fmt: skip
        return runner, bound

    async def stop(self) -> None:
        """Stop watching and end every intercept stream (so the runner's cleanup need not wait)."""
        self.stopping = True
        self.tunnel.close()
        for events in self._watching.values():
            for event in events:
                event.set()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()

    async def _housekeeping(self) -> None:
        while True:
            await asyncio.sleep(HOUSEKEEPING_INTERVAL)
            self.state.expire()
            self.state.check_waiting()
            self.tunnel.prune({i.id for i in self.state.all_intercepts()})
            self._wake()

    def _wake(self, *also: st.Topic) -> None:
        """Wake the watches of the topics changed since the last wake (and of `also`)."""
        for topic in (*self.state.changes(), *also):
            for event in self._watching.get(topic, ()):
                event.set()

    async def healthz(self, _request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def login(self, request: web.Request) -> web.Response:
        """Trade a verified client certificate (TLS port) for an hour's manager token."""
        peer = request.transport.get_extra_info("peercert") if request.transport else None
        if not peer:
            where = "" if self.login_port else " (this manager has no login port: no client CA)"
            raise Unauthenticated(
                "login needs a client certificate signed by the cluster's client CA, presented "
                f"in the TLS handshake of the login port{where}"
            )
        subject = peer.get("subject", ())
        if any(len(part) != 1 for part in subject):
            raise Unauthenticated("client certificate: a multi-valued name is not accepted")
        names = [rdn for part in subject for rdn in part]
        users = [value for key, value in names if key == "commonName"]
        groups = [value for key, value in names if key == "organizationName"]
        if len(users) != 1 or not users[0]:
            # The API server takes the last CN, a naive reader the first: exactly one, or none.
            raise Unauthenticated(
                f"client certificate: {len(users)} common names; exactly one (the user) is needed"
            )
        user = users[0]
        groups.append("system:authenticated")
        token, expires = self.auth.manager_tokens.issue(user, groups)
        log.info("login: %s by client certificate", user)
        return _json(LoginAnswer(token, expires, user, groups))

    async def all_intercepts(self, request: web.Request) -> web.Response:
        """The intercepts of namespaces where the caller may intercept (`tpcontrol list`);
        another client's environment is never shown."""
        identity = await self.callers.client_identity(request)
        visible: dict[str, bool] = {}
        shown: list[st.Intercept] = []
        for icept in self.state.all_intercepts():
            ns = icept.spec.namespace
            if ns not in visible:
                visible[ns] = identity is ANONYMOUS or await self.access.allowed(
                    identity, access.port_forward(ns)
                )
            if not visible[ns]:
                continue
            try:
                owner, _ = self.state.owner(icept.client_session)
            except st.NotFound:
                owner = ""
            if owner != identity.key or not await self._sees_environment(identity, ns):
                icept = msgspec.structs.replace(icept, environment={})
            shown.append(icept)
        return _json(shown)

    async def info(self, request: web.Request) -> web.Response:
        """Where the tunnel listens (same host as this API); for clients and agents alike."""
        header = request.headers.get("authorization")
        try:
            await self.auth.client(bearer(header))
        except Unauthenticated:
            await self.callers.identify(header, agent=True, what="GET /v1/info")
        return _json(ManagerInfo(tunnel_port=self.tunnel_port, version="0.1.0"))

    # -- sessions -------------------------------------------------------------------------------
    async def arrive_client(self, request: web.Request) -> web.Response:
        identity = await self.callers.client_identity(request)
        if identity is not ANONYMOUS:
            await self.access.require_client(identity)
        info = await _body(request, st.ClientInfo)
        sid = self.state.arrive_client(info, identity.key)
        log.info("client %s arrived as %s", printable_host(info.name), identity.username)
        self._wake()
        return _json(SessionId(sid), 201)

    async def arrive_agent(self, request: web.Request) -> web.Response:
        identity = await self.callers.identify(
            request.headers.get("authorization"), agent=True, what="POST /v1/agents"
        )
        info = await _body(request, st.AgentInfo)
        if identity is not ANONYMOUS:
            info = await self.callers.verified_agent(identity, info)
        sid = self.state.arrive_agent(info, identity.key)
        self._wake()
        return _json(SessionId(sid), 201)

    async def remain(self, request: web.Request) -> web.Response:
        sid, identity = await self.callers.session_identity(request)
        self.state.remain(sid)
        if not self.state.is_agent(sid) and identity is not ANONYMOUS:
            await self._reauthorize(sid, identity)
            self._wake(st.session_topic(sid))  # its watches re-check what they may show
        return web.Response(status=204)

    async def _reauthorize(self, sid: str, identity: Identity) -> None:
        """Each heartbeat checks again (cached for seconds) that the caller may still hold
        each of its intercepts: a removed RoleBinding ends them, and their traffic goes back
        to the app."""
        revoked = False
        for icept in self.state.intercepts_for_client(sid):
            spec = icept.spec
            checks = (
                access.port_forward(spec.namespace),
                access.get_workload(spec.workload_kind, spec.namespace, spec.workload),
            )
            lost = [c for c in checks if not await self.access.allowed(identity, c)]
            if not lost:
                continue
            why = f"{identity.username} may no longer {access.describe(lost[0])}"
            if self.callers.permissive(f"intercept {icept.id}", why):
                continue
            log.warning("intercept %s ended: %s", icept.id, why)
            self.state.revoke(icept.id, why)
            revoked = True
        if revoked:
            self._wake()

    async def depart(self, request: web.Request) -> web.Response:
        sid, _ = await self.callers.session_identity(request)
        self.state.depart(sid)
        self._wake()
        return web.Response(status=204)

    # -- intercepts -------------------------------------------------------------------------------
    async def prepare(self, request: web.Request) -> web.Response:
        identity = await self.callers.client_identity(request)
        prepared = await self.prepare_intercept(await _body(request, PrepareRequest), identity)
        return _json(prepared)

    async def prepare_intercept(
        self, req: PrepareRequest, identity: Identity = ANONYMOUS
    ) -> PreparedIntercept:
        """Spec 4.3: find the workload, make its entry current, check the port is unambiguous.

        Nothing is written when the request is ambiguous; an unchanged entry is not rewritten
        (so nothing rolls out). The caller must be allowed to intercept in the namespace before
        anything there is looked up, so a refusal says nothing of what exists.
        """
        await self.callers.require(identity, access.port_forward(req.namespace))
        workload = await self.workloads.find(req.workload, req.namespace, req.kind)
        if workload is None:
            what = req.kind or "Deployment, ReplicaSet or StatefulSet"
            raise PrepareError(f"{what} {req.workload!r} not found in namespace {req.namespace!r}")
        kind = workload.get("kind", "Deployment")
        await self.callers.require(identity, access.get_workload(kind, req.namespace, req.workload))
        workload.setdefault("metadata", {}).setdefault("namespace", req.namespace)
        check_interceptable(workload)
        image = await self.images.resolve(required=req.mechanism != "tcp")
        services = await self.workloads.services(req.namespace)
        sidecar = generate(workload, services, self._generator(image))
        match = find_intercept(sidecar, req.service, req.port)
        existing = await self.store.get(req.namespace, sidecar.agent_name)
        if existing is not None and existing.manual:
            sidecar, changed = existing, False
        else:
            changed = await self.store.put(sidecar)
        icept = match.intercept
        return PreparedIntercept(
            namespace=req.namespace,
            workload=sidecar.workload_name,
            workload_kind=sidecar.workload_kind,
            service_name=icept.service_name,
            service_uid=icept.service_uid,
            service_port_name=icept.service_port_name,
            service_port=icept.service_port,
            protocol=icept.protocol,
            container_name=match.container.name,
            container_port=icept.container_port,
            agent_port=icept.agent_port,
            agent_image=sidecar.agent_image,
            agent_running=bool(self.state.agents_of(req.namespace, sidecar.agent_name)),
            entry_changed=changed,
            app_protocol=icept.app_protocol,
        )

    def _generator(self, image: str) -> GeneratorSettings:
        return msgspec.structs.replace(self.settings.generator, agent_image=image)

    async def create_intercept(self, request: web.Request) -> web.Response:
        sid, identity = await self.callers.session_identity(request)
        body = await _body(request, st.InterceptRequest)
        await self.callers.require(identity, access.port_forward(body.namespace))
        # Agents are found by name: the kind checked is the enrolled workload's, not the
        # request's (a grant on a StatefulSet `x` must not open the Deployment `x`).
        entry = await self.store.get(body.namespace, body.workload)
        kind = (entry.workload_kind if entry else "") or body.workload_kind or "Deployment"
        await self.callers.require(
            identity, access.get_workload(kind, body.namespace, body.workload)
        )
        intercept = self.state.create_intercept(sid, body)
        self._wake()
        return _json(intercept, 201)

    async def remove_intercept(self, request: web.Request) -> web.Response:
        sid, _ = await self.callers.session_identity(request)
        self.state.remove_intercept(sid, request.match_info["name"])
        self._wake()
        return web.Response(status=204)

    async def _snapshot(self, sid: str, identity: Identity) -> list[st.Intercept]:
        if self.state.is_agent(sid):
            return self.state.intercepts_for_agent(sid)
        return [
            i if await self._sees_environment(identity, i.spec.namespace)
            else msgspec.structs.replace(i, environment={})
            for i in self.state.intercepts_for_client(sid)
        ]  # fmt: skip

    async def _sees_environment(self, identity: Identity, namespace: str) -> bool:
        """The app's environment holds its secrets: only for who may exec into its pods."""
        if identity is ANONYMOUS:
            return True  # permissive: nobody to ask
        return await self.access.allowed(identity, access.exec_pods(namespace))

    async def list_intercepts(self, request: web.Request) -> web.StreamResponse:
        sid, identity = await self.callers.session_identity(request)
        version = self.state.version
        snapshot = await self._snapshot(sid, identity)
        if request.query.get("watch") not in ("1", "true"):
            return _json(snapshot)
        if self.watches.get(sid, 0) >= MAX_WATCHES_PER_SESSION:
            raise st.LimitExceeded(
                f"watches per session: this session has {MAX_WATCHES_PER_SESSION} open, the limit"
            )
        if sum(self.watches.values()) >= MAX_WATCHES:
            raise st.LimitExceeded(f"watches: the manager holds its limit ({MAX_WATCHES})")
        self.watches[sid] = self.watches.get(sid, 0) + 1
        try:
            return await self._watch(request, sid, identity, snapshot, version)
        finally:
            self.watches[sid] -= 1
            if not self.watches[sid]:
                del self.watches[sid]

    def _topics(self, sid: str) -> list[st.Topic]:
        """What a session's snapshot depends on: the session, and an agent's workload."""
        topics = [st.session_topic(sid)]
        agent = self.state.agent_info(sid)
        if agent is not None:
            topics.append(st.workload_topic(agent.namespace, agent.name))
        return topics

    async def _watch(
        self,
        request: web.Request,
        sid: str,
        identity: Identity,
        snapshot: list[st.Intercept],
        version: int,
    ) -> web.StreamResponse:
        """One JSON line per change of the snapshot. Woken by its own event only: set by the
        changes of its topics, and kept set while a line is written, so no change is missed."""
        woken = asyncio.Event()
        topics = self._topics(sid)
        for topic in topics:
            self._watching.setdefault(topic, set()).add(woken)
        if self.state.version != version:  # changed while the first snapshot was made
            woken.set()
        try:
            response = web.StreamResponse(headers={"content-type": "application/x-ndjson"})
            await response.prepare(request)
            last: bytes | None = None
            while not self.stopping:
                line = msgspec.json.encode(snapshot) + b"\n"
                if line != last:
                    try:
                        await response.write(line)
                    except ConnectionResetError:  # the watcher went away (a client leaving)
                        break
                    last = line
                await woken.wait()
                woken.clear()
                if self.stopping:
                    break
                try:
                    snapshot = await self._snapshot(sid, identity)
                except st.StateError:
                    break  # the session is gone: end the stream
            return response
        finally:
            for topic in topics:
                events = self._watching.get(topic)
                if events is not None:
                    events.discard(woken)
                    if not events:
                        del self._watching[topic]

    async def review(self, request: web.Request) -> web.Response:
        sid, _ = await self.callers.session_identity(request)
        body = await _body(request, st.Review)
        self.state.review(sid, request.match_info["id"], body)
        self._wake()
        return web.Response(status=204)

    # -- cluster-wide operations --------------------------------------------------------------
    async def uninstall(self, request: web.Request) -> web.Response:
        """Remove entries; the watcher rolls the workloads back to pods without the agent."""
        identity = await self.callers.client_identity(request)
        body = await _body(request, UninstallRequest)
        # Allowed in the namespace at all before anything of it is read.
        await self.callers.require(identity, access.port_forward(body.namespace))
        if body.workload:
            entry = (await self.store.entries(body.namespace)).get(body.workload)
            kind = entry.workload_kind if entry is not None else "Deployment"
            check = access.patch_workload(kind, body.namespace, body.workload)
            await self.callers.require(identity, check)
        else:  # every kind it may remove entries of
            kinds = ("Deployment", "ReplicaSet", "StatefulSet")
            await self.callers.require(
                identity, *(access.patch_workload(k, body.namespace, "") for k in kinds)
            )
        entries = await self.store.entries(body.namespace)
        names = (
            [body.workload] if body.workload else [k for k, v in entries.items() if not v.manual]
        )
        if body.workload and body.workload not in entries:
            raise PrepareError(
                f"no agent installed for {body.workload!r} in namespace {body.namespace!r}"
            )
        removed = [name for name in names if await self.store.delete(body.namespace, name)]
        return _json(Removed(removed))

    async def upgrade(self, request: web.Request) -> web.Response:
        """Regenerate every non-manual entry with the configured agent image (what a Helm hook
        calls after changing it); a cluster admin's operation."""
        identity = await self.callers.client_identity(request)
        body = await _body(request, UpgradeRequest)
        await self.callers.require(identity, access.UPGRADE)
        image = await self.images.resolve(required=False)
        if body.agent_image and body.agent_image != image:
            raise st.PermissionDenied(
                f"agentImage: {body.agent_image[:200]!r} is not the configured agent image; the "
                "image comes from the manager's settings (TPCONTROL_AGENT_IMAGE), never a request"
            )
        updated: list[str] = []
        for namespace in sorted(self.watcher.snapshot):
            if self.access.refused_namespace(namespace):
                continue
            for name, entry in (await self.store.entries(namespace)).items():
                if entry.manual or entry.create:
                    continue
                workload = await self.workloads.find(
                    entry.workload_name or name, namespace, entry.workload_kind
                )
                if workload is None:
                    continue
                workload.setdefault("metadata", {}).setdefault("namespace", namespace)
                services = await self.workloads.services(namespace)
                try:
                    sidecar = generate(workload, services, self._generator(image))
                except AgentConfigError as exc:
                    log.warning("upgrade skips %s.%s: %s", name, namespace, exc)
                    continue
                if await self.store.put(sidecar):
                    updated.append(f"{namespace}/{name}")
        return _json(Updated(updated))
