"""The developer's side of an intercept: idle tunnel streams that deliver to a local port.

For each intercept the client keeps `pool` streams open to the manager's tunnel, each waiting to
be paired with an agent's stream. A paired stream is joined to a new connection to the local
port, and a fresh idle stream takes its place, so an intercepted connection never waits for the
client to dial the manager.
"""

from __future__ import annotations

from collections.abc import Callable

from tpproxy.tunnel import Hello, StreamPool


class TunnelClient(StreamPool):
    """Keeps `pool` idle streams for one intercept and serves each pairing from `local_port`."""

    def __init__(
        self,
        manager_host: str,
        tunnel_port: int,
        session: str,
        intercept: str,
        local_host: str,
        local_port: int,
        pool: int = 4,
        token: Callable[[], str] = lambda: "",
    ) -> None:
        hello = Hello(role="client", session=session, intercept=intercept)
        super().__init__((manager_host, tunnel_port), hello, (local_host, local_port), pool, token)
