"""The engine: one listener per agent port, a route table swapped atomically, and draining.

Each accepted connection reads the route table once, when it is accepted, and keeps that target
until it closes. `apply()` replaces the whole table in one assignment, so new connections follow
the new table while open ones are untouched; ports that appear are bound first (all or none),
ports that disappear stop accepting but their open connections keep going.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Protocol

from tpproxy.forward import ClientRelay
from tpproxy.http import protocol_class
from tpproxy.http.h2_proxy import H2Proxy
from tpproxy.http.protocol import HttpProxy, HttpSettings, PortContext
from tpproxy.routing import PortRoutes, RouteTable
from tpproxy.settings import SPLICE_AFTER
from tpproxy.stats import StatsBook, TrafficStats
from tpproxy.targets import Target

REAP_INTERVAL = 0.5
HTTP_ROUTE = "http"
HTTP_TARGET = "per-request"


class OpenConnection(Protocol):
    """What the engine needs of an accepted connection, TCP relay or HTTP proxy alike."""

    def abort(self) -> None: ...

    def shutdown(self) -> None: ...


log = logging.getLogger("tpproxy.engine")


class ListenError(OSError):
    """A port that could not be bound; the message names the address and port."""

    def __init__(self, host: str, port: int, cause: OSError) -> None:
        reason = cause.strerror or str(cause)
        if cause.errno == 98:  # EADDRINUSE
            reason = "address already in use"
        super().__init__(cause.errno, f"cannot listen on {host or '*'}:{port}: {reason}")
        self.port = port


class Engine:
    """Listeners, the current route table, and the set of open connections."""

    def __init__(
        self,
        *,
        host: str = "0.0.0.0",
        connect_timeout: float = 5.0,
        backlog: int = 1024,
        http: HttpSettings | None = None,
        splice_after: int = SPLICE_AFTER,
    ) -> None:
        self.host = host
        self.splice_after = splice_after
        self.connect_timeout = connect_timeout
        self.backlog = backlog
        self.http = http or HttpSettings()
        self._http_class = protocol_class(self.http.backend)
        self._reaper: asyncio.TimerHandle | None = None
        self._clock = [0.0]  # loop time, ticked by the reaper: coarse, and free to read
        self.stats = StatsBook()
        self.generation = 0
        self.draining = False
        self.started = False
        self._routes: dict[int, PortRoutes] = {}
        self._servers: dict[int, asyncio.Server] = {}
        self._open: set[OpenConnection] = set()
        self._idle: asyncio.Event | None = None
        self._pending_routes: dict[int, PortRoutes] = {}
        self._applying = asyncio.Lock()

    @property
    def ports(self) -> list[int]:
        """The ports listened on now."""
        return sorted(self._servers)

    @property
    def routes(self) -> RouteTable:
        """The table new connections follow."""
        return self._routes

    @property
    def open_connections(self) -> int:
        """Connections accepted and not yet closed."""
        return len(self._open)

    async def apply(self, routes: RouteTable) -> None:
        """Make `routes` the table for new connections; bind new ports, unbind missing ones.

        Atomic: if any new port cannot be bound, nothing changes and `ListenError` names it.
        """
        if self.draining:
            raise RuntimeError("the engine is draining; it takes no new routes")
        async with self._applying:
            table = dict(routes)
            self._pending_routes = table
            added = sorted(table.keys() - self._servers.keys())
            removed = sorted(self._servers.keys() - table.keys())
            bound: dict[int, asyncio.Server] = {}
            try:
                for port in added:
                    bound[port] = await self._listen(port)
            except ListenError:
                for server in bound.values():
                    server.close()
                raise
            # From here to the end there is no await: the swap is one step for the event loop.
            self._routes = table
            self._servers.update(bound)
            for port in removed:
                self._servers.pop(port).close()
            self.generation += 1
            self.started = True
            if self._reaper is None:
                loop = asyncio.get_running_loop()
                self._clock[0] = loop.time()
                self._reaper = loop.call_later(REAP_INTERVAL, self._reap)
            if added or removed:
                log.info("listening on %s (added %s, removed %s)", self.ports, added, removed)

    async def _listen(self, port: int) -> asyncio.Server:
        loop = asyncio.get_running_loop()
        try:
            return await loop.create_server(
                self._protocol_factory(port),
                self.host,
                port,
                reuse_address=True,
                backlog=self.backlog,
            )
        except OSError as exc:
            raise ListenError(self.host, port, exc) from exc

    def _protocol_factory(self, port: int) -> Callable[[], ClientRelay | HttpProxy]:
        last: list[PortRoutes] = [self._routes_for_new_port(port)]

        def current() -> PortRoutes:
            routes = self._routes.get(port)
            if routes is None:  # the port was removed; its open connections keep the last table
                return last[0]
            last[0] = routes
            return routes

        def choose() -> tuple[Target, TrafficStats]:
            route, target = current().connection_route()
            return target, self.stats.entry(port, route, target.label)

        def relay() -> ClientRelay:
            return ClientRelay(
                choose, self._open.add, self._closed, self.connect_timeout, self.splice_after
            )

        def handover(transport: asyncio.Transport, data: bytes) -> None:
            # An HTTP-mode connection that turned out not to be HTTP/1 (an HTTP/2 preface).
            tcp = relay()
            transport.set_protocol(tcp)
            tcp.connection_made(transport)
            tcp.data_received(data)

        def handover_h2(transport: asyncio.Transport, data: bytes) -> None:
            # An HTTP-mode connection that began with the HTTP/2 preface: routed per stream.
            h2 = H2Proxy(contexts[0])
            transport.set_protocol(h2)
            h2.connection_made(transport)
            h2.data_received(data)

        contexts: list[PortContext] = []  # made when the first HTTP connection arrives
        http_class = self._http_class

        def factory() -> ClientRelay | HttpProxy:
            if not current().routes_requests:
                return relay()
            if not contexts:
                contexts.append(
                    PortContext(
                        port=port,
                        routes=current,
                        settings=self.http,
                        connect_timeout=self.connect_timeout,
                        traffic=self.stats.entry(port, HTTP_ROUTE, HTTP_TARGET),
                        clock=self._clock,
                        stats=self.stats.http(port),
                        on_open=self._open.add,  # type: ignore[arg-type]
                        on_close=self._closed,  # type: ignore[arg-type]
                        handover_tcp=handover,
                        handover_h2=handover_h2,
                    )
                )
            return http_class(contexts[0])

        return factory

    def _routes_for_new_port(self, port: int) -> PortRoutes:
        routes = self._pending_routes.get(port)
        assert routes is not None
        return routes

    def _closed(self, conn: OpenConnection) -> None:
        self._open.discard(conn)
        if not self._open and self._idle is not None:
            self._idle.set()

    def _reap(self) -> None:
        """Header and idle timeouts of HTTP connections, checked twice a second for all."""
        loop = asyncio.get_running_loop()
        now = self._clock[0] = loop.time()
        for conn in list(self._open):
            if isinstance(conn, (HttpProxy, H2Proxy)):
                conn.check_timeouts(now)
        self._reaper = loop.call_later(REAP_INTERVAL, self._reap)

    def stop_accepting(self) -> None:
        """Close every listener; open connections keep going."""
        for server in self._servers.values():
            server.close()
        self._servers.clear()

    async def drain(self, grace: float) -> int:
        """Stop accepting, wait up to `grace` seconds for open connections, then abort the rest.

        Returns how many connections had to be aborted.
        """
        self.draining = True
        self.stop_accepting()
        if self._reaper is not None and grace == 0:
            self._reaper.cancel()
        for conn in list(self._open):
            conn.shutdown()
        deadline = time.monotonic() + grace
        if self._open:
            self._idle = asyncio.Event()
            log.info("draining %d open connection(s), up to %.1f s", len(self._open), grace)
            try:
                async with asyncio.timeout_at(asyncio.get_running_loop().time() + grace):
                    await self._idle.wait()
            except TimeoutError:
                pass
        if self._reaper is not None:
            self._reaper.cancel()
        left = list(self._open)
        for conn in left:
            conn.abort()
        if left:
            log.warning(
                "drain timeout after %.1f s: closed %d connection(s) still open",
                grace - max(0.0, deadline - time.monotonic()),
                len(left),
            )
        return len(left)

    async def close(self) -> None:
        """Stop at once: no waiting for open connections."""
        await self.drain(0)
