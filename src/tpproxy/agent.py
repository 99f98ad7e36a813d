"""The traffic-agent: the sidecar that runs the engine for a pod and takes orders from the manager.

It starts forwarding every agent port to the app at once, then arrives at the manager, watches
its intercepts and applies them as routes without restarting anything; each intercept it takes
on is reviewed ACTIVE (or AGENT_ERROR with the reason). When the manager goes away the agent
keeps forwarding to the app (intercept routes are dropped: nobody would be there to receive
them), and arrives again with a growing delay until the manager answers.

Intercepted traffic goes through the manager's tunnel (`tpproxy.tunnel`): one stream per
intercepted connection, paired by the manager with an idle stream of the intercepting client.
A manager that advertises no tunnel gets the intercept's target address dialled directly.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable, Mapping
from urllib.parse import urlsplit

import aiohttp
import msgspec
from aiohttp.http_exceptions import LineTooLong

from tpproxy import __version__
from tpproxy.config import ConfigError, Sidecar
from tpproxy.mounts import EXPORTS_DIR, AgentMounts
from tpproxy.routing import PortRoutes
from tpproxy.server import Proxy, load
from tpproxy.specs import InterceptSpec, build_routes
from tpproxy.targets import ConnectorTarget
from tpproxy.tunnel import Hello, tunnel_connector
from tpproxy.wire import MANAGER_TOKEN_FILE, AgentInfo, Intercept, Review

log = logging.getLogger("tpproxy.agent")

APP_ENV_PREFIX = "_TEL_APP_"
HEARTBEAT = 5.0
MAX_BACKOFF = 10.0
CALL_TIMEOUT = 15.0  # seconds for one call to the manager (not the watch)
MAX_TOKEN = 16 * 1024
MAX_WATCH_LINE = 16 << 20  # one snapshot of the agent's intercepts, environments included


def _stamp(path: str) -> tuple[float, int] | None:
    """What changes when the file is replaced: modification time and inode (None if missing)."""
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return stat.st_mtime, stat.st_ino


class SessionLost(Exception):
    """The manager no longer knows this agent's session (it restarted, or expired it)."""


def app_environment(sidecar: Sidecar, environ: Mapping[str, str]) -> dict[str, str]:
    """The app containers' environment as the agent got it: `_TEL_APP_<prefix>X` -> `X`."""
    env: dict[str, str] = {}
    for container in sidecar.containers:
        prefix = APP_ENV_PREFIX + container.env_prefix
        for key, value in environ.items():
            if key.startswith(prefix):
                env[key[len(prefix) :]] = value
    return env


def intercept_specs(intercepts: list[Intercept], tunnel: bool = False) -> list[InterceptSpec]:
    """The routes to apply: intercepts the manager still wants served (WAITING or ACTIVE).

    With `tunnel`, each target is the connector named `tunnel:<id>`; else the client's address.
    """
    specs = []
    for icept in intercepts:
        if icept.disposition not in ("WAITING", "ACTIVE"):
            continue
        req = icept.spec
        specs.append(
            InterceptSpec(
                id=icept.id,
                port=req.agent_port,
                target=f"tunnel:{icept.id}" if tunnel else f"{req.target_host}:{req.target_port}",
                mechanism=req.mechanism,
                headers=tuple(req.headers),
                path=req.path,
                methods=tuple(req.methods),
                fallback_to_app=req.fallback_to_app,
            )
        )
    return specs


async def watch_line(content: aiohttp.StreamReader) -> bytes:
    """The next line of the watch (b"" at its end). A line over MAX_WATCH_LINE bytes ends the
    session (SessionLost): the rest of it cannot be told from the next line, so the agent
    arrives again and gets a fresh snapshot."""
    try:
        line = await content.readuntil(b"\n", max_size=MAX_WATCH_LINE)
    except (ValueError, LineTooLong) as exc:  # over max_size (aiohttp's own error)
        raise SessionLost(f"a watch line over {MAX_WATCH_LINE} bytes: {exc}") from None
    return line  # at the end: b"", or a last line without its newline


class Agent:
    """One agent: its proxy, its base (app-only) routes, and its manager session loop."""

    def __init__(
        self,
        proxy: Proxy,
        sidecar: Sidecar,
        base: dict[int, PortRoutes],
        manager_url: str,
        pod_name: str,
        pod_ip: str,
        environ: Mapping[str, str] | None = None,
        token_file: str | None = None,
    ) -> None:
        self.proxy = proxy
        self.token_file = token_file
        self.sidecar = sidecar
        self.base = base
        self.manager_url = manager_url.rstrip("/")
        self.info = AgentInfo(
            name=sidecar.agent_name,
            namespace=sidecar.namespace,
            pod_name=pod_name,
            pod_ip=pod_ip,
            version=__version__,
            mechanisms=["tcp", "http"],
            environment=app_environment(sidecar, os.environ if environ is None else environ),
        )
        self.session_id: str | None = None
        self.tunnel_port = 0
        self.connected = asyncio.Event()
        self.applied: list[str] = []  # intercept ids currently routed
        self.intercepts: list[Intercept] = []  # the manager's last word, re-applied on reload
        self.reloads = 0
        self.reload_errors = 0
        self.mounts = AgentMounts(sidecar.containers)

    def token(self) -> str:
        """The pod's projected token for the manager, read afresh (the kubelet rotates it)."""
        if not self.token_file:
            return ""
        try:
            with open(self.token_file, encoding="ascii") as f:
                return f.read(MAX_TOKEN).strip()
        except (OSError, UnicodeDecodeError) as exc:
            log.warning("no token for the manager in %s: %s", self.token_file, exc)
            return ""

    def _headers(self, **extra: str) -> dict[str, str]:
        token = self.token()
        return {**extra, "authorization": f"Bearer {token}"} if token else extra

    async def run(self) -> None:
        """Arrive, serve the session, and after any failure arrive again (1 s, 2 s, ... 10 s)."""
        delay = 1.0
        while True:
            try:
                await self._session()
                delay = 1.0
            except asyncio.CancelledError:
                raise
            except (aiohttp.ClientError, OSError, SessionLost, msgspec.DecodeError) as exc:
                log.warning(
                    "manager session ended: %s; arriving again in %.0f s",
                    exc or type(exc).__name__,
                    delay,
                )
            except Exception:  # whatever the manager sent: the loop must outlive it
                log.exception("manager session failed; arriving again in %.0f s", delay)
            self.connected.clear()
            self.session_id = None
            await self._apply([])  # back to the app: no client is reachable through us now
            await asyncio.sleep(delay)
            delay = min(delay * 2, MAX_BACKOFF)

    async def _session(self) -> None:
        # Each call must answer within CALL_TIMEOUT (a manager that accepts and never answers
        # must not hang the agent); only the watch stays open for as long as the session.
        timeout = aiohttp.ClientTimeout(total=CALL_TIMEOUT, connect=5)
        async with aiohttp.ClientSession(timeout=timeout) as http:
            async with http.post(
                f"{self.manager_url}/v1/agents",
                data=msgspec.json.encode(self.info),
                headers=self._headers(**{"content-type": "application/json"}),
            ) as r:
                if r.status != 201:
                    raise SessionLost(f"arrival refused: {r.status} {await r.text()}")
                self.session_id = sid = msgspec.json.decode(await r.read())["sessionId"]
            log.info(
                "arrived at %s as %s.%s", self.manager_url, self.info.name, self.info.namespace
            )
            async with http.get(f"{self.manager_url}/v1/info", headers=self._headers()) as r:
                self.tunnel_port = int(msgspec.json.decode(await r.read()).get("tunnelPort", 0))
            heartbeat = asyncio.create_task(self._heartbeat(http, sid))
            watch = asyncio.create_task(self._watch(http, sid))
            try:
                # The session ends with whichever ends first: the watch, or a heartbeat the
                # manager no longer answers (a dropped connection may never end the watch).
                done, _ = await asyncio.wait({watch, heartbeat}, return_when="FIRST_COMPLETED")
            finally:
                watch.cancel()
                heartbeat.cancel()
                await asyncio.gather(watch, heartbeat, return_exceptions=True)
            for task in done:
                task.result()  # its error ends the session
            raise SessionLost("the manager ended the watch")

    async def _watch(self, http: aiohttp.ClientSession, sid: str) -> None:
        url = f"{self.manager_url}/v1/sessions/{sid}/intercepts?watch=1"
        forever = aiohttp.ClientTimeout(total=None, connect=5, sock_read=None)
        async with http.get(url, timeout=forever, headers=self._headers()) as stream:
            if stream.status != 200:
                raise SessionLost(f"watch refused: {stream.status}")
            self.connected.set()
            while line := await watch_line(stream.content):
                try:
                    intercepts = msgspec.json.decode(line, type=list[Intercept])
                except msgspec.DecodeError as exc:  # skipped: the next one may do
                    log.warning("ignored a watch line from the manager: %s", str(exc)[:200])
                    continue
                await self._apply(intercepts, http, sid)

    async def _heartbeat(self, http: aiohttp.ClientSession, sid: str) -> None:
        while True:
            await asyncio.sleep(HEARTBEAT)
            remain = f"{self.manager_url}/v1/sessions/{sid}/remain"
            async with http.post(remain, headers=self._headers()) as r:
                if r.status == 404:
                    log.warning("the manager lost this agent's session")
                    # Ends the watch as well: the session loop arrives again.
                    raise SessionLost("session not found")

    async def _apply(
        self,
        intercepts: list[Intercept],
        http: aiohttp.ClientSession | None = None,
        sid: str | None = None,
    ) -> None:
        """Route what the manager asks for; review each intercept that waits for us."""
        if self.proxy.engine.draining:
            return  # shutting down: the table stays as it is while connections finish
        self.intercepts = intercepts
        tunnel = bool(self.tunnel_port and sid)
        specs = intercept_specs(intercepts, tunnel)
        connectors = {s.target: self._tunnel(s.id) for s in specs} if tunnel else None
        try:
            table = build_routes(self.base, specs, "manager", connectors)
        except ConfigError as exc:
            log.error("cannot apply the intercepts: %s", exc)
            if http is not None and sid is not None:
                for icept in intercepts:
                    if icept.disposition == "WAITING":
                        await self._review(
                            http, sid, icept.id, Review(disposition="AGENT_ERROR", message=str(exc))
                        )
            return
        await self.proxy.engine.apply(table)
        self.applied = [s.id for s in specs]
        self._serve_mounts(intercepts if tunnel else [], sid or "")
        if http is None or sid is None:
            return
        for icept in intercepts:
            if icept.disposition == "WAITING":
                routes = table[icept.spec.agent_port]
                desc = next(
                    (h.describe() for h in routes.http_intercepts if h.id == icept.id),
                    "all TCP connections",
                )
                export = self.mounts.exports.get(icept.spec.agent_port) if tunnel else None
                environment = self.info.environment
                if export is not None:
                    environment = {**environment, **export.environment()}
                await self._review(
                    http,
                    sid,
                    icept.id,
                    Review(
                        disposition="ACTIVE",
                        message="serving",
                        pod_ip=self.info.pod_ip,
                        environment=environment,
                        mechanism_desc=desc,
                        mount_point=str(export.root) if export is not None else "",
                    ),
                )

    def _serve_mounts(self, intercepts: list[Intercept], sid: str) -> None:
        """Mount streams parked for each routed intercept whose container is exported."""
        host = urlsplit(self.manager_url).hostname or "127.0.0.1"
        self.mounts.serve(
            {i.id: i.spec.agent_port for i in intercepts if i.id in self.applied},
            (host, self.tunnel_port),
            lambda iid: Hello(role="agent", session=sid, intercept=iid, purpose="mount"),
            self.token,
        )

    async def watch_config(self, path: str, every: float = 2.0) -> None:
        """Reload when the mounted config changes (kubelet swaps ConfigMap volumes atomically):
        new ports and app ports apply at once; a broken file is logged and the old one kept."""
        stamp = _stamp(path)
        while True:
            await asyncio.sleep(every)
            now = _stamp(path)
            if now == stamp:
                continue
            stamp = now
            try:
                sidecar, base = load(self.proxy.settings)
            except ConfigError as exc:
                log.error("config changed but cannot be used, keeping the previous one: %s", exc)
                self.reload_errors += 1
                continue
            if sidecar is not None:
                self.sidecar = sidecar
            self.base = base
            self.reloads += 1
            log.info("config reloaded: listening on %s", sorted(base))
            await self._apply(self.intercepts)

    def _tunnel(self, intercept_id: str) -> ConnectorTarget:
        host = urlsplit(self.manager_url).hostname or "127.0.0.1"
        sid = self.session_id or ""
        connector = tunnel_connector(
            host,
            self.tunnel_port,
            lambda: Hello(role="agent", session=sid, intercept=intercept_id, token=self.token()),
        )
        return ConnectorTarget(f"tunnel:{intercept_id}", connector)

    async def _review(
        self, http: aiohttp.ClientSession, sid: str, icept: str, review: Review
    ) -> None:
        url = f"{self.manager_url}/v1/sessions/{sid}/reviews/{icept}"
        async with http.post(
            url,
            data=msgspec.json.encode(review),
            headers=self._headers(**{"content-type": "application/json"}),
        ) as r:
            if r.status >= 400:
                log.warning("review of %s refused: %s %s", icept, r.status, await r.text())


async def run_agent(
    proxy: Proxy,
    manager_url: str | None,
    environ: Mapping[str, str],
    on_ready: Callable[[], None] | None = None,
) -> int:
    """Start the engine from the config, then keep a manager session until SIGTERM drains.

    `on_ready` is called once every listener is bound and serving (the CLI writes the file the
    readiness probe looks for).
    """
    settings = proxy.settings
    sidecar, routes = load(settings)
    if sidecar is None:
        raise ConfigError("the agent needs --config (the sidecar's config.yaml)")
    await proxy.start(routes)
    url = manager_url or f"http://{sidecar.manager_host}:{sidecar.manager_port}"
    agent = Agent(
        proxy,
        sidecar,
        routes,
        url,
        environ.get("_TEL_AGENT_NAME", ""),
        environ.get("_TEL_AGENT_POD_IP", ""),
        environ,
        environ.get("TPPROXY_MANAGER_TOKEN_FILE", MANAGER_TOKEN_FILE),
    )
    await agent.mounts.start(environ.get("TPPROXY_EXPORTS_DIR", EXPORTS_DIR))
    tasks = [
        asyncio.create_task(agent.run()),
        asyncio.create_task(agent.watch_config(settings.config)),
    ]
    try:
        if on_ready is not None:
            on_ready()
        return await proxy.run_until_stopped()
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await agent.mounts.close()
