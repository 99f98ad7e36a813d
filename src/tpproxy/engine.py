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

from tpproxy.forward import ClientRelay
from tpproxy.routing import PortRoutes, RouteTable
from tpproxy.stats import StatsBook, TrafficStats
from tpproxy.targets import Target

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
    ) -> None:
        self.host = host
        self.connect_timeout = connect_timeout
        self.backlog = backlog
        self.stats = StatsBook()
        self.generation = 0
        self.draining = False
        self.started = False
        self._routes: dict[int, PortRoutes] = {}
        self._servers: dict[int, asyncio.Server] = {}
        self._open: set[ClientRelay] = set()
        self._idle: asyncio.Event | None = None
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

    def _protocol_factory(self, port: int) -> Callable[[], ClientRelay]:
        last: list[PortRoutes] = []

        def choose() -> tuple[Target, TrafficStats]:
            routes = self._routes.get(port)
            if routes is None:  # accepted in the same loop turn the port was removed
                routes = last[0]
            elif not last:
                last.append(routes)
            else:
                last[0] = routes
            route, target = routes.connection_route()
            return target, self.stats.entry(port, route, target.label)

        def factory() -> ClientRelay:
            return ClientRelay(choose, self._open.add, self._closed, self.connect_timeout)

        return factory

    def _closed(self, relay: ClientRelay) -> None:
        self._open.discard(relay)
        if not self._open and self._idle is not None:
            self._idle.set()

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
        deadline = time.monotonic() + grace
        if self._open:
            self._idle = asyncio.Event()
            log.info("draining %d open connection(s), up to %.1f s", len(self._open), grace)
            try:
                async with asyncio.timeout_at(asyncio.get_running_loop().time() + grace):
                    await self._idle.wait()
            except TimeoutError:
                pass
        left = list(self._open)
        for relay in left:
            relay.abort()
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
