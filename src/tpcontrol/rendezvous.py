"""The manager's side of the tunnel: pairs an agent's stream with an idle stream of the client
that owns the intercept, and splices them (see `tpproxy.tunnel` for the stream format)."""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections import deque

import msgspec

from tpcontrol.state import ManagerState, StateError
from tpproxy.stats import TrafficStats
from tpproxy.tunnel import Hello, LineReader, Welcome, join

log = logging.getLogger("tpcontrol.tunnel")

PAIRING_TIMEOUT = 5.0


class Rendezvous:
    """Idle client streams per intercept, and the agents waiting for one."""

    def __init__(self, state: ManagerState) -> None:
        self.state = state
        self.idle: dict[str, deque[tuple[LineReader, bytes]]] = {}
        self.arrived: dict[str, asyncio.Event] = {}
        self.stats = TrafficStats(0, "tunnel", "manager")
        self.paired = 0
        self._server: asyncio.Server | None = None

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> int:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(self._accept, host, port, reuse_address=True)
        bound: int = self._server.sockets[0].getsockname()[1]
        return bound

    def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for streams in self.idle.values():
            for reader, _ in streams:
                if reader.transport is not None:
                    reader.transport.abort()
        self.idle.clear()

    def _accept(self) -> LineReader:
        reader = LineReader()
        asyncio.get_running_loop().create_task(self._handshake(reader))
        return reader

    async def _handshake(self, reader: LineReader) -> None:
        try:
            async with asyncio.timeout(PAIRING_TIMEOUT):
                line, rest = await reader.line
            hello = msgspec.json.decode(line, type=Hello)
        except (TimeoutError, ConnectionError, msgspec.DecodeError) as exc:
            self._refuse(reader, f"bad handshake: {exc}")
            return
        try:
            if hello.role == "client":
                self._park(reader, rest, hello)
            else:
                await self._pair(reader, rest, hello)
        except StateError as exc:
            self._refuse(reader, str(exc))

    def _refuse(self, reader: LineReader, why: str) -> None:
        log.info("tunnel stream refused: %s", why)
        if reader.transport is not None:
            reader.transport.write(msgspec.json.encode(Welcome(ok=False, error=why)) + b"\n")
            reader.transport.close()

    def _park(self, reader: LineReader, rest: bytes, hello: Hello) -> None:
        owned = {i.id for i in self.state.intercepts_for_client(hello.session)}
        if hello.intercept not in owned:
            raise StateError(f"intercept {hello.intercept!r} is not one of this session's")
        self.idle.setdefault(hello.intercept, deque()).append((reader, rest))
        self.arrived.setdefault(hello.intercept, asyncio.Event()).set()

    def _take(self, intercept: str) -> tuple[LineReader, bytes] | None:
        streams = self.idle.get(intercept)
        while streams:
            reader, rest = streams.popleft()
            if reader.transport is not None and not reader.transport.is_closing():
                return reader, rest
        self.arrived.setdefault(intercept, asyncio.Event()).clear()
        return None

    async def _pair(self, reader: LineReader, rest: bytes, hello: Hello) -> None:
        if not self.state.is_agent(hello.session):
            raise StateError("not an agent session")
        mine = {i.id for i in self.state.intercepts_for_agent(hello.session)}
        if hello.intercept not in mine:
            raise StateError(f"intercept {hello.intercept!r} is not one of this agent's")
        taken = self._take(hello.intercept)
        if taken is None:
            try:
                async with asyncio.timeout(PAIRING_TIMEOUT):
                    while taken is None:
                        await self.arrived.setdefault(hello.intercept, asyncio.Event()).wait()
                        taken = self._take(hello.intercept)
            except TimeoutError:
                raise StateError(
                    f"no client stream for {hello.intercept!r} within {PAIRING_TIMEOUT:.0f} s"
                ) from None
        client, client_rest = taken
        stream = secrets.token_urlsafe(12)
        for side in (reader, client):
            assert side.transport is not None
            side.transport.write(msgspec.json.encode(Welcome(ok=True, stream=stream)) + b"\n")
        self.paired += 1
        self.stats.connections_total += 1
        join(reader, rest, client, client_rest, self.stats)
