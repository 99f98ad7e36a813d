"""The traffic-manager: sessions, the prepare/create intercept flow, and ConfigMap upkeep.

Clients and agents talk to it over HTTP with JSON bodies (msgspec structs, camelCase). The
manager never edits a workload except through a rollout (`tpcontrol.rollout`): preparing an
intercept writes the workload's entry in `telepresence-agents`, the watcher rolls the workload
out, and the webhook injects the agent into the new pods.

Endpoints (all JSON; errors are `{"error": ..., "code": ...}` with a 4xx status):
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
  POST   /v1/upgrade                       regenerate every entry with a new agent image
  GET    /healthz
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
from collections.abc import Awaitable, Callable
from typing import Annotated, Literal, TypeVar

import msgspec
from aiohttp import web
from aiohttp.typedefs import Middleware
from kubernetes_asyncio import client as k8s

from tpcontrol import state as st
from tpcontrol.agentconfig import AgentConfigError, GeneratorSettings, generate
from tpcontrol.configmap import AgentConfigStore
from tpcontrol.images import ImageResolver
from tpcontrol.prepare import PrepareError, check_interceptable, find_intercept
from tpcontrol.rendezvous import Rendezvous
from tpcontrol.rollout import AgentConfigWatcher, Rollouts
from tpcontrol.workloads import Workloads
from tpproxy.config import ConfigError

log = logging.getLogger("tpcontrol.manager")

T = TypeVar("T")
HOUSEKEEPING_INTERVAL = 1.0


class ManagerSettings(msgspec.Struct, frozen=True, kw_only=True):
    """What the manager needs to generate agent configs and where it asks for images."""

    namespace: str = "ambassador"
    agent_image: str = "docker.io/tpproxy/agent:0.1.0"
    image_resolver_url: str | None = None
    agent_port: int = 9900
    api_port: int = 0
    agent_log_level: str = "info"
    manager_port: int = 8081
    # Clients heartbeat every 5 s: one that has been silent this long has vanished, and its
    # intercepts are removed so traffic goes back to the app (2.6 waited 24 h).
    client_ttl: float = 60.0
    agent_ttl: float = 15.0
    no_agent_timeout: float = 120.0
    tunnel_port: int = 0  # 0: any free port (tests); the deployment uses 8082


# Kubernetes' own rules for the names a request carries: checked before any API call, so a bad
# name is a 400 naming the field rather than whatever the API server makes of it.
Namespace = Annotated[str, msgspec.Meta(pattern=r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")]
ObjectName = Annotated[
    str, msgspec.Meta(pattern=r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$", max_length=253)
]


class PrepareRequest(msgspec.Struct, frozen=True, rename="camel"):
    workload: ObjectName
    namespace: Namespace
    kind: Literal["", "Deployment", "ReplicaSet", "StatefulSet"] = ""
    service: str = ""
    port: str = ""
    mechanism: Literal["tcp", "http"] = "tcp"


class PreparedIntercept(msgspec.Struct, frozen=True, rename="camel"):
    namespace: str
    workload: str
    workload_kind: str
    service_name: str
    service_uid: str
    service_port_name: str
    service_port: int
    protocol: str
    container_name: str
    container_port: int
    agent_port: int
    agent_image: str
    agent_running: bool
    entry_changed: bool


class UninstallRequest(msgspec.Struct, frozen=True, rename="camel"):
    namespace: Namespace
    workload: ObjectName | Literal[""] = ""  # empty: every (non-manual) entry of the namespace


class UpgradeRequest(msgspec.Struct, frozen=True, rename="camel"):
    agent_image: str


class ErrorBody(msgspec.Struct, frozen=True):
    error: str
    code: str


class SessionId(msgspec.Struct, frozen=True, rename="camel"):
    session_id: str


STATUS = {
    "not_found": 404,
    "already_exists": 409,
    "conflict": 409,
    "invalid_argument": 400,
    "permission_denied": 403,
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


BROWSER_HEADERS = ("origin", "sec-fetch-site", "sec-fetch-mode", "sec-fetch-dest")


def host_allowed(host: str, namespace: str) -> bool:
    """Whether a request's Host names this manager as its callers do: an address (the local end
    of a port-forward, the pod's IP), `localhost`, or the Service's names. Any other name is a
    page in a browser that rebound its own DNS name to the port-forward (it sends no Origin)."""
    name = host.rsplit(":", 1)[0] if host.count(":") == 1 or host.startswith("[") else host
    name = name.strip("[]").rstrip(".").lower()
    service = f"traffic-manager.{namespace}"
    if name in {"localhost", "traffic-manager", service, f"{service}.svc",
                f"{service}.svc.cluster.local"}:  # fmt: skip
        return True
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def browser_guard(namespace: str) -> Middleware:
    """Refuse, before any handler runs, what a page in a developer's browser can send to the
    local end of a port-forward: requests the browser marks (Origin, Sec-Fetch-*), and requests
    for a DNS name that is not this manager's (DNS rebinding)."""

    @web.middleware
    async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
        marked = [h for h in BROWSER_HEADERS if h in request.headers]
        host = request.headers.get("host", "")
        if marked or not host_allowed(host, namespace):
            why = f"header {marked[0]}" if marked else f"Host {printable_host(host)}"
            return _json(
                ErrorBody(
                    f"refused: a browser's request ({why}); the traffic-manager is called by "
                    "tpcontrol and its agents only",
                    "forbidden",
                ),
                403,
            )
        return await handler(request)

    return guard


def printable_host(host: str) -> str:
    return repr(host[:100])


def _errors(handler: Handler) -> Handler:
    """Turn the typed errors of the state and the prepare logic into JSON error answers."""

    async def wrapped(request: web.Request) -> web.StreamResponse:
        try:
            return await handler(request)
        except BadBody as exc:
            return _error(str(exc), "invalid_argument")
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
        self.watcher = AgentConfigWatcher(api, self.rollouts)
        self.images = ImageResolver(settings.agent_image, settings.image_resolver_url)
        self.changed = asyncio.Condition()
        self._tasks: list[asyncio.Task[None]] = []
        self._version = -1
        self.stopping = False
        self.tunnel = Rendezvous(self.state)
        self.tunnel_port = 0
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
        ]
        for method, path, handler in routes:
            app.router.add_route(method, path, _errors(handler))
        app.router.add_get("/healthz", self.healthz)
        app.router.add_get("/v1/info", self.info)
        app.router.add_get("/v1/intercepts", self.all_intercepts)
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
        log.info("traffic-manager listening on %s:%d", host, bound)
        return runner, bound

    async def stop(self) -> None:
        """Stop watching and end every intercept stream (so the runner's cleanup need not wait)."""
        self.stopping = True
        self.tunnel.close()
        async with self.changed:
            self.changed.notify_all()
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
            await self._wake()

    async def _wake(self) -> None:
        if self.state.version != self._version:
            self._version = self.state.version
            async with self.changed:
                self.changed.notify_all()

    async def healthz(self, _request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def all_intercepts(self, _request: web.Request) -> web.Response:
        """Every intercept, for `tpcontrol list` (ids, owners, dispositions)."""
        return _json(self.state.all_intercepts())

    async def info(self, _request: web.Request) -> web.Response:
        """Where the tunnel listens (same host as this API)."""
        return _json({"tunnelPort": self.tunnel_port, "version": "0.1.0"})

    # -- sessions -------------------------------------------------------------------------------
    async def arrive_client(self, request: web.Request) -> web.Response:
        info = await _body(request, st.ClientInfo)
        sid = self.state.arrive_client(info)
        await self._wake()
        return _json(SessionId(sid), 201)

    async def arrive_agent(self, request: web.Request) -> web.Response:
        info = await _body(request, st.AgentInfo)
        sid = self.state.arrive_agent(info)
        await self._wake()
        return _json(SessionId(sid), 201)

    async def remain(self, request: web.Request) -> web.Response:
        self.state.remain(request.match_info["sid"])
        return web.Response(status=204)

    async def depart(self, request: web.Request) -> web.Response:
        self.state.depart(request.match_info["sid"])
        await self._wake()
        return web.Response(status=204)

    # -- intercepts -------------------------------------------------------------------------------
    async def prepare(self, request: web.Request) -> web.Response:
        prepared = await self.prepare_intercept(await _body(request, PrepareRequest))
        return _json(prepared)

    async def prepare_intercept(self, req: PrepareRequest) -> PreparedIntercept:
        """Spec 4.3: find the workload, make its entry current, check the port is unambiguous.

        Nothing is written when the request is ambiguous; an unchanged entry is not rewritten
        (so nothing rolls out).
        """
        workload = await self.workloads.find(req.workload, req.namespace, req.kind)
        if workload is None:
            what = req.kind or "Deployment, ReplicaSet or StatefulSet"
            raise PrepareError(f"{what} {req.workload!r} not found in namespace {req.namespace!r}")
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
        )

    def _generator(self, image: str) -> GeneratorSettings:
        s = self.settings
        return GeneratorSettings(
            agent_image=image,
            manager_namespace=s.namespace,
            agent_port=s.agent_port,
            api_port=s.api_port,
            log_level=s.agent_log_level,
            manager_port=s.manager_port,
        )

    async def create_intercept(self, request: web.Request) -> web.Response:
        body = await _body(request, st.InterceptRequest)
        intercept = self.state.create_intercept(request.match_info["sid"], body)
        await self._wake()
        return _json(intercept, 201)

    async def remove_intercept(self, request: web.Request) -> web.Response:
        self.state.remove_intercept(request.match_info["sid"], request.match_info["name"])
        await self._wake()
        return web.Response(status=204)

    def _snapshot(self, sid: str) -> list[st.Intercept]:
        if self.state.is_agent(sid):
            return self.state.intercepts_for_agent(sid)
        return self.state.intercepts_for_client(sid)

    async def list_intercepts(self, request: web.Request) -> web.StreamResponse:
        sid = request.match_info["sid"]
        snapshot = self._snapshot(sid)
        if request.query.get("watch") not in ("1", "true"):
            return _json(snapshot)
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
            async with self.changed:
                await self.changed.wait()
            if self.stopping:
                break
            try:
                snapshot = self._snapshot(sid)
            except st.StateError:
                break  # the session is gone: end the stream
        return response

    async def review(self, request: web.Request) -> web.Response:
        body = await _body(request, st.Review)
        self.state.review(request.match_info["sid"], request.match_info["id"], body)
        await self._wake()
        return web.Response(status=204)

    # -- cluster-wide operations --------------------------------------------------------------
    async def uninstall(self, request: web.Request) -> web.Response:
        """Remove entries; the watcher rolls the workloads back to pods without the agent."""
        body = await _body(request, UninstallRequest)
        entries = await self.store.entries(body.namespace)
        names = (
            [body.workload] if body.workload else [k for k, v in entries.items() if not v.manual]
        )
        if body.workload and body.workload not in entries:
            raise PrepareError(
                f"no agent installed for {body.workload!r} in namespace {body.namespace!r}"
            )
        removed = [name for name in names if await self.store.delete(body.namespace, name)]
        return _json({"removed": removed})

    async def upgrade(self, request: web.Request) -> web.Response:
        """Regenerate every non-manual entry with a new image (what a Helm hook calls)."""
        body = await _body(request, UpgradeRequest)
        if not body.agent_image.strip():
            raise st.InvalidArgument("agentImage must not be empty")
        updated: list[str] = []
        for namespace in sorted(self.watcher.snapshot):
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
                    sidecar = generate(workload, services, self._generator(body.agent_image))
                except AgentConfigError as exc:
                    log.warning("upgrade skips %s.%s: %s", name, namespace, exc)
                    continue
                if await self.store.put(sidecar):
                    updated.append(f"{namespace}/{name}")
        return _json({"updated": updated})
