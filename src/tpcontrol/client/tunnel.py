"""The developer's side of an intercept: idle tunnel streams that deliver to a local port.

For each intercept the client keeps `pool` streams open to the manager's tunnel, each waiting to
be paired with an agent's stream. A paired stream is joined to a new connection to the local
port, and a fresh idle stream takes its place, so an intercepted connection never waits for the
client to dial the manager.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

import msgspec

from tpproxy.stats import TrafficStats
from tpproxy.tunnel import Hello, LineReader, TunnelError, Welcome, join

log = logging.getLogger("tpcontrol.client.tunnel")


class TunnelClient:
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
        self.manager = (manager_host, tunnel_port)
        self.hello = Hello(role="client", session=session, intercept=intercept)
        self.token = token
        self.local = (local_host, local_port)
        self.pool = pool
        self.stats = TrafficStats(local_port, intercept, f"{local_host}:{local_port}")
        self.served = 0
        self.refused: str | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False

    def start(self) -> None:
        for _ in range(self.pool):
            self._spawn()

    def _spawn(self) -> None:
        if self._closed:
            return
        task = asyncio.get_running_loop().create_task(self._one_stream())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _one_stream(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            transport, reader = await loop.create_connection(LineReader, *self.manager)
        except OSError as exc:
            log.warning("cannot reach the manager's tunnel: %s", exc)
            await asyncio.sleep(1)
            self._spawn()
            return
        try:
            hello = msgspec.structs.replace(self.hello, token=self.token())
            transport.write(msgspec.json.encode(hello) + b"\n")
            line, rest = await reader.line  # answered when an agent's stream is paired with us
            welcome = msgspec.json.decode(line, type=Welcome)
        except (TunnelError, msgspec.DecodeError) as exc:
            transport.abort()
            if not self._closed:
                await asyncio.sleep(1)
                self._spawn()
            log.debug("idle stream ended: %s", exc)
            return
        except asyncio.CancelledError:
            transport.abort()
            raise
        if not welcome.ok:
            self.refused = welcome.error
            log.error("the manager refused the tunnel: %s", welcome.error)
            transport.close()
            return
        self._spawn()  # replace ourselves in the pool before serving
        try:
            _, local = await loop.create_connection(LineReader, *self.local)
        except OSError as exc:
            log.warning("intercepted connection: local %s:%d: %s", *self.local, exc)
            transport.abort()
            return
        self.served += 1
        self.stats.connections_total += 1
        early, local.buffer = local.buffer, b""  # anything the local server already said
        join(local, early, reader, rest, self.stats)

    async def close(self) -> None:
        self._closed = True
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError):
                await task
