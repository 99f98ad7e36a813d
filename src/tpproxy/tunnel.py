"""Tunnel streams through the traffic-manager: one TCP connection per intercepted connection.

A stream starts with one JSON line (a `Hello`), is answered with one JSON line (a `Welcome`), and
then carries raw bytes both ways. Clients keep a few idle streams open per intercept; when the
agent opens a stream for an intercepted connection, the manager pairs it with an idle client
stream of that intercept and joins the two with the engine's relays, so the warm path costs no
extra round trip. The manager checks that a client stream belongs to an intercept of that
client's session, and an agent stream to an intercept of that agent's workload.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Literal, cast

import msgspec

from tpproxy.forward import JoinedRelay
from tpproxy.stats import TrafficStats
from tpproxy.targets import Connector, ProtocolFactory

log = logging.getLogger("tpproxy.tunnel")

MAX_LINE = 20 * 1024  # a Hello with a bearer token of up to 16 KiB


class Hello(msgspec.Struct, frozen=True, rename="camel"):
    """The first line of a stream: who opens it, for which intercept, with which credential
    (the same bearer token as the API calls of the session)."""

    role: Literal["client", "agent"]
    session: str
    intercept: str
    token: str = ""
    # traffic: the agent opens the stream for an intercepted connection, the client parks;
    # mount: the client opens it for its sshfs mount, the agent parks.
    purpose: Literal["traffic", "mount"] = "traffic"


class Welcome(msgspec.Struct, frozen=True, rename="camel", omit_defaults=True):
    """The manager's answer: `ok` (then raw bytes follow), else the reason it refused."""

    ok: bool
    stream: str = ""
    error: str = ""


class TunnelError(ConnectionError):
    """A stream the manager refused; the message says why."""


class LineReader(asyncio.Protocol):
    """Reads the one handshake line, then hands the transport over to another protocol."""

    def __init__(self) -> None:
        self.buffer = b""
        self.line: asyncio.Future[tuple[bytes, bytes]] = asyncio.get_running_loop().create_future()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        end = self.buffer.find(b"\n")
        if end >= 0 and not self.line.done():
            assert self.transport is not None
            self.transport.pause_reading()  # what follows belongs to the next protocol
            self.line.set_result((self.buffer[:end], self.buffer[end + 1 :]))
        elif len(self.buffer) > MAX_LINE and not self.line.done():
            self.line.set_exception(TunnelError("handshake line too long"))

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.line.done():
            self.line.set_exception(TunnelError("closed during the handshake"))

    def hand_over(self, protocol: asyncio.Protocol, leftover: bytes) -> None:
        """Give the transport (and bytes already read) to `protocol`, and resume reading."""
        transport = self.transport
        assert transport is not None
        transport.set_protocol(protocol)
        protocol.connection_made(transport)
        if leftover:
            protocol.data_received(leftover)
        transport.resume_reading()


def tunnel_connector(host: str, port: int, hello: Callable[[], Hello]) -> Connector:
    """A connector that opens a stream through the manager at host:port for `hello()`."""

    async def connect(
        factory: ProtocolFactory,
    ) -> tuple[asyncio.BaseTransport, asyncio.BaseProtocol]:
        loop = asyncio.get_running_loop()
        transport, reader = await loop.create_connection(LineReader, host, port)
        try:
            transport.write(msgspec.json.encode(hello()) + b"\n")
            line, leftover = await reader.line
            welcome = msgspec.json.decode(line, type=Welcome)
            if not welcome.ok:
                raise TunnelError(welcome.error or "refused")
        except BaseException:
            transport.abort()
            raise
        protocol = factory()
        reader.hand_over(protocol, leftover)
        return transport, protocol

    return connect


def join(
    agent: LineReader,
    agent_rest: bytes,
    client: LineReader,
    client_rest: bytes,
    stats: TrafficStats,
    splice_after: int = 0,
) -> None:
    """Join two handshaken streams: bytes flow both ways with flow control and half-close.

    `splice_after` > 0 joins them in the kernel once they move bulk data, as the engine does
    for TCP connections. Off here: in `benchmarks/tunnel.py` (2026-12-02) splicing the
    manager's and the client's streams lowered intercepted bulk from 0.45x to 0.38-0.40x direct,
    where splicing only the agent's own connection left it at 0.45x.
    """
    a = JoinedRelay(stats, inbound=True, splice_after=splice_after)
    c = JoinedRelay(stats, inbound=False)
    a.peer, c.peer = c, a
    a.lead = c.lead = a
    # Both transports must be known before either side's leftover bytes are passed on.
    assert agent.transport is not None
    assert client.transport is not None
    a.transport, c.transport = agent.transport, client.transport
    agent.hand_over(a, b"")
    client.hand_over(c, b"")
    if agent_rest:
        a.data_received(agent_rest)
    if client_rest:
        c.data_received(client_rest)


class StreamPool:
    """Keeps `pool` streams parked at the manager for one `hello` (its role, session, intercept
    and purpose); each one the manager pairs is joined to a new connection to `local`, and a
    fresh one takes its place. The developer's client parks streams for intercepted traffic,
    the agent parks streams for the developer's mounts."""

    def __init__(
        self,
        manager: tuple[str, int],
        hello: Hello,
        local: tuple[str, int],
        pool: int = 4,
        token: Callable[[], str] = lambda: "",
    ) -> None:
        self.manager = manager
        self.hello = hello
        self.token = token
        self.local = local
        self.pool = pool
        self.stats = TrafficStats(local[1], hello.intercept, f"{local[0]}:{local[1]}")
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
            log.warning("paired stream: local %s:%d: %s", *self.local, exc)
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
