"""Route tables: for each listening port, where its connections go (sans-IO, no asyncio here).

A port always has an app target (the container port). A TCP intercept, when present, takes the
whole port: every new connection goes to its target instead. Tables are immutable values; the
engine swaps a whole table at once, which is what makes reconfiguration atomic.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from tpproxy.config import Sidecar, listeners
from tpproxy.targets import Address, Target

APP_ROUTE = "app"


class RouteConflict(ValueError):
    """Two intercepts that cannot both own a port; the message names both."""


@dataclass(frozen=True, slots=True)
class TcpIntercept:
    """An intercept that takes every connection of a port."""

    id: str
    target: Target


@dataclass(frozen=True, slots=True)
class PortRoutes:
    """Where the connections accepted on one port go."""

    app: Target
    tcp_intercept: TcpIntercept | None = None

    def connection_route(self) -> tuple[str, Target]:
        """The route name (`app` or the intercept id) and target for a new connection."""
        icept = self.tcp_intercept
        if icept is None:
            return APP_ROUTE, self.app
        return icept.id, icept.target


RouteTable = Mapping[int, PortRoutes]


def port_routes(app: Target, tcp_intercepts: Iterable[TcpIntercept] = ()) -> PortRoutes:
    """The routes of one port; a second TCP intercept on the port is a conflict naming both."""
    chosen: TcpIntercept | None = None
    for icept in tcp_intercepts:
        if chosen is not None:
            raise RouteConflict(
                f"TCP intercept {icept.id!r} conflicts with TCP intercept {chosen.id!r}: "
                "a TCP intercept takes the whole port"
            )
        chosen = icept
    return PortRoutes(app, chosen)


def app_routes(sidecar: Sidecar, app_host: str = "127.0.0.1") -> dict[int, PortRoutes]:
    """The table of an agent with no intercepts: every TCP agent port forwards to its app port."""
    return {
        listener.agent_port: PortRoutes(Address(app_host, listener.container_port))
        for listener in listeners(sidecar)
        if listener.protocol == "TCP"
    }
