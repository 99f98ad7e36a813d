"""Loopback building blocks for tests: an event loop runner, free ports, echo and sink servers.

Everything binds to 127.0.0.1 and every wait is bounded.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

import uvloop

T = TypeVar("T")


def run(coro: Coroutine[Any, Any, T], timeout: float = 60.0) -> T:
    """Run a test coroutine on a fresh uvloop loop, failing it after `timeout` seconds."""

    async def bounded() -> T:
        async with asyncio.timeout(timeout):
            return await coro

    return uvloop.run(bounded())


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class EchoProtocol(asyncio.Protocol):
    """Echoes every byte back; on EOF it finishes writing and sends EOF back (half-close aware)."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)

    def eof_received(self) -> bool:
        self.transport.write_eof()
        return True


class TaggedProtocol(asyncio.Protocol):
    """Answers every connection with its tag and then echoes: tells tests which server got it."""

    def __init__(self, tag: bytes, seen: list[bytes]) -> None:
        self.tag = tag
        self.seen = seen

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]
        transport.write(self.tag)  # type: ignore[attr-defined]
        self.seen.append(self.tag)

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)


async def start_server(factory: Callable[[], asyncio.Protocol]) -> tuple[asyncio.Server, int]:
    """A server on a free loopback port."""
    loop = asyncio.get_running_loop()
    server = await loop.create_server(factory, "127.0.0.1", 0)
    port: int = server.sockets[0].getsockname()[1]
    return server, port


async def open_conn(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", port)


async def read_exactly(reader: asyncio.StreamReader, n: int, timeout: float = 10.0) -> bytes:
    async with asyncio.timeout(timeout):
        return await reader.readexactly(n)


async def stream_through(port: int, total: int, chunk: int = 1 << 20) -> tuple[str, str]:
    """Send `total` random bytes to an echo behind `port` while reading them back.

    Returns (sha256 sent, sha256 received): equal when every byte made the round trip intact.
    """
    reader, writer = await open_conn(port)
    sent, received = hashlib.sha256(), hashlib.sha256()
    block = os.urandom(chunk)

    async def send() -> None:
        left = total
        i = 0
        while left > 0:
            piece = block[i % 7 :][: min(chunk, left)] or block[: min(chunk, left)]
            sent.update(piece)
            writer.write(piece)
            await writer.drain()
            left -= len(piece)
            i += 1
        writer.write_eof()

    async def receive() -> None:
        got = 0
        while got < total:
            data = await reader.read(1 << 20)
            if not data:
                raise AssertionError(f"connection closed after {got} of {total} bytes")
            received.update(data)
            got += len(data)
        assert await reader.read() == b""  # the echo's EOF follows ours

    await asyncio.gather(send(), receive())
    writer.close()
    return sent.hexdigest(), received.hexdigest()


async def wait_until(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    """Poll a cheap in-process condition every 5 ms, failing after `timeout`."""
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.005)


async def gather_bounded(aws: list[Awaitable[T]], timeout: float) -> list[T]:
    async with asyncio.timeout(timeout):
        return list(await asyncio.gather(*aws))
