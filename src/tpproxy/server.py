"""Running the engine as a program: routes from the config, admin endpoint, signals, draining."""

from __future__ import annotations

import asyncio
import logging
import signal
from dataclasses import dataclass, field

from tpproxy.admin import AdminServer
from tpproxy.config import ConfigError, Sidecar, load_sidecar, unserved
from tpproxy.engine import Engine, ListenError
from tpproxy.http.protocol import HttpSettings
from tpproxy.metrics import engine_registry
from tpproxy.routing import PortRoutes, app_routes
from tpproxy.settings import ProxySettings
from tpproxy.specs import build_routes as apply_specs
from tpproxy.specs import load_specs

log = logging.getLogger("tpproxy.server")


def initial_routes(settings: ProxySettings, sidecar: Sidecar | None) -> dict[int, PortRoutes]:
    """The initial table: the config's TCP listeners to the app, plus `--forward` entries."""
    http = settings.mode == "http"
    routes = app_routes(sidecar, settings.app_host, http=http) if sidecar is not None else {}
    for port, address in settings.forwards():
        if port in routes:
            raise ConfigError(f"--forward {port}: port {port} is already an agent port")
        routes[port] = PortRoutes(address, http=http)
    if not routes:
        raise ConfigError(
            f"{settings.config or '--forward'}: nothing to listen on "
            "(no TCP intercepts in the config and no --forward)"
        )
    if settings.intercepts:
        routes = apply_specs(routes, load_specs(settings.intercepts), settings.intercepts)
    return routes


def load(settings: ProxySettings) -> tuple[Sidecar | None, dict[int, PortRoutes]]:
    """Read the agent config (if any) and build the initial route table."""
    sidecar = load_sidecar(settings.config) if settings.config else None
    for line in unserved(sidecar) if sidecar is not None else ():
        log.warning("%s", line)
    return sidecar, initial_routes(settings, sidecar)


@dataclass
class Proxy:
    """An engine plus its admin endpoint, run until a signal asks it to drain."""

    settings: ProxySettings
    engine: Engine = field(init=False)
    admin: AdminServer | None = field(init=False, default=None)
    stopping: asyncio.Event = field(init=False, default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        s = self.settings
        http = HttpSettings(
            backend=s.http_parser,
            max_head_size=s.max_head_size,
            header_timeout=s.header_timeout,
            idle_timeout=s.idle_timeout,
        )
        self.engine = Engine(
            host=s.listen_host,
            connect_timeout=s.connect_timeout,
            backlog=s.backlog,
            http=http,
            splice_after=s.splice_after,
        )

    def readiness(self) -> tuple[bool, str]:
        """Ready when listening and not draining; the reason is shown by /readyz."""
        if self.engine.draining or self.stopping.is_set():
            return False, "draining"
        if not self.engine.started:
            return False, "starting"
        return True, f"ok: listening on {', '.join(map(str, self.engine.ports))}"

    async def start(self, routes: dict[int, PortRoutes]) -> None:
        """Bind everything; raises ListenError (naming the port) with nothing left bound."""
        await self.engine.apply(routes)
        address = self.settings.admin_address()
        if address is not None:
            self.admin = AdminServer(engine_registry(self.engine), self.readiness)
            try:
                port = await self.admin.start(address.host, address.port)
            except OSError as exc:
                await self.engine.close()
                raise ListenError(address.host, address.port, exc) from exc
            log.info("admin endpoint on %s:%d (/livez /readyz /metrics)", address.host, port)

    async def reload(self) -> None:
        """Re-read the config file and apply it; on any error keep serving the old table."""
        try:
            _, routes = load(self.settings)
            await self.engine.apply(routes)
        except (ConfigError, OSError) as exc:
            log.error("reload failed, keeping the previous configuration: %s", exc)
        else:
            log.info("configuration reloaded (generation %d)", self.engine.generation)

    async def run_until_stopped(self) -> int:
        """Serve until SIGTERM/SIGINT, then drain; a second signal closes at once."""
        loop = asyncio.get_running_loop()
        forced = asyncio.Event()

        def on_stop(signame: str) -> None:
            if self.stopping.is_set():
                log.warning("%s again: closing open connections now", signame)
                forced.set()
            else:
                log.info("%s: draining", signame)
                self.stopping.set()

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, on_stop, sig.name)
        loop.add_signal_handler(signal.SIGHUP, lambda: loop.create_task(self.reload()))
        await self.stopping.wait()
        drain = loop.create_task(self.engine.drain(self.settings.drain_timeout))
        force = loop.create_task(forced.wait())
        await asyncio.wait([drain, force], return_when=asyncio.FIRST_COMPLETED)
        if not drain.done():
            await self.engine.close()
            await drain
        force.cancel()
        if self.admin is not None:
            self.admin.close()
        log.info("stopped")
        return 0
