"""The manager's side of the tunnel: pairs a stream with an idle (parked) stream of the other
side of the same intercept, and splices them (see `tpproxy.tunnel` for the stream format).

For intercepted traffic the client parks and the agent opens; for the developer's mounts the
agent parks and the client opens. Either way each side is checked against the intercept: the
client must own it, the agent must serve its workload."""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections import deque
from collections.abc import Awaitable, Callable

import msgspec
from kubernetes_asyncio import client as k8s

from tpcontrol.manager.auth import Unauthenticated
from tpcontrol.manager.state import LimitExceeded, ManagerState, StateError
from tpproxy.stats import TrafficStats
from tpproxy.tunnel import Hello, LineReader, Welcome, join

log = logging.getLogger("tpcontrol.tunnel")

PAIRING_TIMEOUT = 5.0
MAX_IDLE_PER_INTERCEPT = 16  # a client keeps 4
MAX_IDLE = 4096


async def _anyone(_hello: Hello) -> None:
    """No check: for a rendezvous whose callers were vetted elsewhere."""


class Rendezvous:
    """Idle client streams per intercept, and the agents waiting for one."""

    def __init__(
        self, state: ManagerState, check: Callable[[Hello], Awaitable[None]] = _anyone
    ) -> None:
        """`check` vets each stream's Hello (its session's owner and credential) and raises
        StateError or Unauthenticated to refuse it."""
        self.state = state
        self.check = check
        # Parked streams and their arrival events, by (purpose, intercept id).
        self.idle: dict[tuple[str, str], deque[tuple[LineReader, bytes]]] = {}
        self.arrived: dict[tuple[str, str], asyncio.Event] = {}
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

    def prune(self, live: set[str]) -> int:
        """Drop parked streams that closed, and every stream of an intercept that is gone (a
        client that left, an intercept removed): called by the manager's housekeeping, so that
        what is parked is only what can still be paired. Returns how many were dropped."""
        dropped = 0
        for key in list(self.idle):
            streams = self.idle[key]
            keep = deque(
                (r, rest) for r, rest in streams
                if key[1] in live and r.transport is not None and not r.transport.is_closing()
            )  # fmt: skip
            for reader, _ in streams:
                if all(reader is not k for k, _ in keep) and reader.transport is not None:
                    reader.transport.abort()
            dropped += len(streams) - len(keep)
            if keep:
                self.idle[key] = keep
            else:
                del self.idle[key]
        for key in [k for k in self.arrived if k[1] not in live]:
            del self.arrived[key]
        return dropped

    def parked(self) -> int:
        return sum(len(q) for q in self.idle.values())

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
            await self.check(hello)
        except (StateError, Unauthenticated) as exc:
            self._refuse(reader, f"refused: {exc}")
            return
        except k8s.ApiException as exc:
            self._refuse(reader, f"cannot check the credential now: {exc.status} {exc.reason}")
            return
        try:
            self._check_side(hello)
            if (hello.role == "client") == (hello.purpose == "traffic"):
                self._park(reader, rest, hello)
            else:
                await self._pair(reader, rest, hello)
        except StateError as exc:
            self._refuse(reader, str(exc))

    def _check_side(self, hello: Hello) -> None:
        """The stream's session is on the intercept's side it claims: the client owns it, the
        agent serves its workload."""
        if hello.role == "client":
            if hello.intercept not in {
                i.id for i in self.state.intercepts_for_client(hello.session)
            }:
                raise StateError(f"intercept {hello.intercept!r} is not one of this session's")
            return
        if not self.state.is_agent(hello.session):
            raise StateError("not an agent session")
        if hello.intercept not in {i.id for i in self.state.intercepts_for_agent(hello.session)}:
            raise StateError(f"intercept {hello.intercept!r} is not one of this agent's")

    def _refuse(self, reader: LineReader, why: str) -> None:
        log.info("tunnel stream refused: %s", why)
        if reader.transport is not None:
            reader.transport.write(msgspec.json.encode(Welcome(ok=False, error=why)) + b"\n")
            reader.transport.close()

    def _park(self, reader: LineReader, rest: bytes, hello: Hello) -> None:
        key = (hello.purpose, hello.intercept)
        parked = self.idle.setdefault(key, deque())
        while parked and (parked[0][0].transport is None or parked[0][0].transport.is_closing()):
            parked.popleft()
        if len(parked) >= MAX_IDLE_PER_INTERCEPT:
            raise LimitExceeded(
                f"idle streams per intercept: {MAX_IDLE_PER_INTERCEPT} are parked, the limit"
            )
        if self.parked() >= MAX_IDLE:
            raise LimitExceeded(f"idle streams: the manager holds its limit ({MAX_IDLE})")
        parked.append((reader, rest))
        self.arrived.setdefault(key, asyncio.Event()).set()

    def _take(self, key: tuple[str, str]) -> tuple[LineReader, bytes] | None:
        streams = self.idle.get(key)
        while streams:
            reader, rest = streams.popleft()
            if reader.transport is not None and not reader.transport.is_closing():
                return reader, rest
        self.arrived.setdefault(key, asyncio.Event()).clear()
        return None

    async def _pair(self, reader: LineReader, rest: bytes, hello: Hello) -> None:
        key = (hello.purpose, hello.intercept)
        taken = self._take(key)
        if taken is None:
            other = "agent" if hello.role == "client" else "client"
            try:
                async with asyncio.timeout(PAIRING_TIMEOUT):
                    while taken is None:
                        await self.arrived.setdefault(key, asyncio.Event()).wait()
                        taken = self._take(key)
            except TimeoutError:
                raise StateError(
                    f"no {other} stream for {hello.intercept!r} ({hello.purpose}) within "
                    f"{PAIRING_TIMEOUT:.0f} s"
                ) from None
        parked, parked_rest = taken
        stream = secrets.token_urlsafe(12)
        for side in (reader, parked):
            assert side.transport is not None
            side.transport.write(msgspec.json.encode(Welcome(ok=True, stream=stream)) + b"\n")
        self.paired += 1
        self.stats.connections_total += 1
        join(reader, rest, parked, parked_rest, self.stats)
