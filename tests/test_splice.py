"""Bulk TCP connections joined in the kernel with splice(2): same bytes, same half-close, reset,
flow control and drain semantics as the Protocol path, and nothing left open afterwards."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import socket
from collections.abc import Awaitable, Callable

import pytest

from tpproxy.engine import Engine
from tpproxy.routing import PortRoutes
from tpproxy.stats import TrafficStats
from tpproxy.targets import Address
from tpproxy.tunnel import LineReader, join

from .helpers import (
    EchoProtocol,
    free_port,
    open_conn,
    run,
    start_server,
    stream_through,
    wait_until,
)

MiB = 1 << 20


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


class Echo(EchoProtocol):
    """The echo app, closing its socket once the client's EOF is echoed (so that what is still
    open in this process afterwards can only be the proxy's)."""

    def eof_received(self) -> bool:
        return False


async def engine_to(app_port: int, splice_after: int = 256 * 1024) -> tuple[Engine, int]:
    engine = Engine(host="127.0.0.1", splice_after=splice_after)
    port = free_port()
    await engine.apply({port: PortRoutes(Address("127.0.0.1", app_port))})
    return engine, port


def only_entry(engine: Engine) -> TrafficStats:
    (stats,) = engine.stats.entries()
    return stats


@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
@pytest.mark.parametrize("splice_after", [0, 256 * 1024])
def test_bulk_both_ways_intact_counted_and_joined_only_when_enabled(
    loop: str, splice_after: int
) -> None:
    async def scenario() -> None:
        _, app_port = await start_server(Echo)
        engine, port = await engine_to(app_port, splice_after=splice_after)
        before = open_fds()
        total = 48 * MiB
        sent, received = await stream_through(port, total)
        assert sent == received
        await wait_until(lambda: engine.open_connections == 0)
        stats = only_entry(engine)
        assert stats.bytes_to_target == total
        assert stats.bytes_to_client == total
        assert stats.joined == (1 if splice_after else 0)
        assert stats.resets == 0
        await wait_until(lambda: open_fds() <= before)  # no dup, pipe or socket left behind
        await engine.close()

    if loop == "uvloop":
        run(scenario(), timeout=120)
    else:
        asyncio.run(asyncio.wait_for(scenario(), 120))


def test_small_exchanges_are_never_joined() -> None:
    """Many small messages (request/response traffic) stay on the Protocol path."""

    async def scenario() -> None:
        _, app_port = await start_server(Echo)
        engine, port = await engine_to(app_port, splice_after=64 * 1024)
        reader, writer = await open_conn(port)
        for i in range(2000):  # 2000 x 1 KiB = 2 MiB, far past the threshold, in small reads
            writer.write(b"%04d" % i * 256)
            assert await reader.readexactly(1024) == b"%04d" % i * 256
        writer.close()
        await wait_until(lambda: engine.open_connections == 0)
        assert only_entry(engine).joined == 0
        await engine.close()

    run(scenario(), timeout=60)


class Collect(asyncio.Protocol):
    """An app that hashes what it receives and answers only after the client's EOF."""

    def __init__(self, answer: bytes, got_eof: asyncio.Future[str]) -> None:
        self.answer = answer
        self.got_eof = got_eof
        self.digest = hashlib.sha256()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.digest.update(data)

    def eof_received(self) -> bool:
        self.got_eof.set_result(self.digest.hexdigest())
        self.transport.write(self.answer)  # the other way is still open after our EOF
        self.transport.close()
        return True


def test_half_close_after_joining_keeps_the_other_way_open() -> None:
    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        got_eof: asyncio.Future[str] = loop.create_future()
        answer = os.urandom(4 * MiB)
        _, app_port = await start_server(lambda: Collect(answer, got_eof))
        engine, port = await engine_to(app_port)
        reader, writer = await open_conn(port)
        upload = os.urandom(8 * MiB)
        writer.write(upload)
        await writer.drain()
        await wait_until(lambda: only_entry(engine).joined == 1, timeout=10)
        writer.write_eof()
        async with asyncio.timeout(10):
            assert await got_eof == hashlib.sha256(upload).hexdigest()
            assert await reader.read() == answer  # then the app's EOF, passed on
        writer.close()
        await wait_until(lambda: engine.open_connections == 0)
        assert only_entry(engine).resets == 0
        await engine.close()

    run(scenario(), timeout=60)


def test_app_half_close_after_joining_keeps_the_client_way_open() -> None:
    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        heard: asyncio.Future[str] = loop.create_future()
        download = os.urandom(8 * MiB)

        class SendThenEof(asyncio.Protocol):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                self.digest = hashlib.sha256()
                transport.write(download)  # type: ignore[attr-defined]
                transport.write_eof()  # type: ignore[attr-defined]

            def data_received(self, data: bytes) -> None:
                self.digest.update(data)

            def eof_received(self) -> bool:
                heard.set_result(self.digest.hexdigest())
                return False

        _, app_port = await start_server(SendThenEof)
        engine, port = await engine_to(app_port)
        reader, writer = await open_conn(port)
        async with asyncio.timeout(10):
            assert await reader.read() == download
        assert only_entry(engine).joined == 1
        upload = os.urandom(2 * MiB)
        writer.write(upload)
        writer.write_eof()
        async with asyncio.timeout(10):
            assert await heard == hashlib.sha256(upload).hexdigest()
        writer.close()
        await wait_until(lambda: engine.open_connections == 0)
        await engine.close()

    run(scenario(), timeout=60)


def test_reset_after_joining_resets_the_client() -> None:
    async def scenario() -> None:
        class ResetAfterBulk(asyncio.Protocol):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                self.transport = transport
                self.got = 0

            def data_received(self, data: bytes) -> None:
                self.got += len(data)
                if self.got >= 4 * MiB:
                    sock = self.transport.get_extra_info("socket")
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
                    self.transport.abort()  # type: ignore[attr-defined]

        _, app_port = await start_server(ResetAfterBulk)
        engine, port = await engine_to(app_port)
        before = open_fds()
        reader, writer = await open_conn(port)
        block = os.urandom(MiB)
        async with asyncio.timeout(10):
            with pytest.raises(ConnectionResetError):
                for _ in range(64):  # bounded: the app resets after 4 MiB
                    writer.write(block)
                    await writer.drain()
                while await reader.read(MiB):
                    pass
                raise ConnectionResetError("closed without reset")  # a clean EOF is wrong here
        await wait_until(lambda: engine.open_connections == 0)
        stats = only_entry(engine)
        assert stats.joined == 1
        assert stats.resets == 1
        writer.close()
        await wait_until(lambda: open_fds() <= before)
        await engine.close()

    run(scenario(), timeout=60)


def test_joined_connection_holds_a_slow_reader_to_kernel_buffers() -> None:
    """A client that stops reading stops the app: the proxy does not take the app's bytes."""

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        app_blocked = asyncio.Event()
        total = 256 * MiB
        chunk = os.urandom(MiB)

        class Flood(asyncio.Protocol):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                self.transport: asyncio.Transport = transport  # type: ignore[assignment]
                self.left = total
                self.paused = False
                self.send()

            def send(self) -> None:
                while self.left and not self.paused:
                    self.transport.write(chunk)
                    self.left -= MiB
                if not self.left:
                    self.transport.close()

            def pause_writing(self) -> None:
                self.paused = True
                app_blocked.set()

            def resume_writing(self) -> None:
                self.paused = False
                loop.call_soon(self.send)

        _, app_port = await start_server(Flood)
        engine, port = await engine_to(app_port)
        reader, writer = await open_conn(port)
        # Read a little (enough to join), then stop.
        assert len(await reader.readexactly(2 * MiB)) == 2 * MiB
        await wait_until(lambda: only_entry(engine).joined == 1, timeout=10)
        async with asyncio.timeout(10):
            await app_blocked.wait()
        taken = only_entry(engine).bytes_to_client
        # Nothing reads the client socket: what the proxy took is at most what the kernel's
        # socket buffers and the pipe hold, far from the 256 MiB on offer.
        assert taken < 48 * MiB, taken
        got = 2 * MiB
        async with asyncio.timeout(60):
            while got < total:
                data = await reader.read(4 * MiB)
                assert data, f"closed after {got} bytes"
                got += len(data)
            assert await reader.read() == b""
        writer.close()
        await wait_until(lambda: engine.open_connections == 0)
        assert only_entry(engine).bytes_to_client == total
        await engine.close()

    run(scenario(), timeout=120)


def test_drain_aborts_a_joined_connection_and_closes_everything() -> None:
    async def scenario() -> None:
        _, app_port = await start_server(Echo)
        engine, port = await engine_to(app_port)
        before = open_fds()
        reader, writer = await open_conn(port)
        writer.write(os.urandom(4 * MiB))
        await reader.readexactly(4 * MiB)
        await wait_until(lambda: only_entry(engine).joined == 1, timeout=10)
        aborted = await engine.drain(0.2)
        assert aborted == 1
        async with asyncio.timeout(5):
            with contextlib.suppress(ConnectionResetError):
                assert await reader.read() == b""
        writer.close()
        await wait_until(lambda: open_fds() <= before)
        await engine.close()

    run(scenario(), timeout=60)


def test_many_joined_connections_at_once() -> None:
    count = 8

    async def scenario() -> None:
        _, app_port = await start_server(Echo)
        engine, port = await engine_to(app_port)
        before = open_fds()
        jobs: list[Callable[[], Awaitable[tuple[str, str]]]] = [
            lambda: stream_through(port, 8 * MiB) for _ in range(count)
        ]
        results = await asyncio.gather(*(job() for job in jobs))
        assert all(sent == received for sent, received in results)
        await wait_until(lambda: engine.open_connections == 0)
        stats = only_entry(engine)
        assert stats.joined == count
        assert stats.bytes_to_target == stats.bytes_to_client == count * 8 * MiB
        await wait_until(lambda: open_fds() <= before)
        await engine.close()

    run(scenario(), timeout=120)


@pytest.mark.parametrize("splice_after", [0, 256 * 1024])
def test_two_tunnel_streams_joined_by_the_manager_are_spliced_when_asked(
    splice_after: int,
) -> None:
    """`tpproxy.tunnel.join` (the manager pairing an agent's and a client's stream, the client
    pairing a stream with its local port) joins bulk streams in the kernel when asked (it is
    not by default: measured slower there)."""

    async def scenario() -> None:
        readers: asyncio.Queue[LineReader] = asyncio.Queue()

        def accept() -> LineReader:
            reader = LineReader()
            readers.put_nowait(reader)
            return reader

        server = await asyncio.get_running_loop().create_server(accept, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        (agent_r, agent_w), (client_r, client_w) = [await open_conn(port) for _ in range(2)]
        agent_w.write(b"agent\nearly")
        client_w.write(b"client\n")
        agent, client = await readers.get(), await readers.get()
        (_, agent_rest), (_, client_rest) = await agent.line, await client.line
        stats = TrafficStats(0, "tunnel", "test")
        join(agent, agent_rest, client, client_rest, stats, splice_after)
        up, down = os.urandom(16 * MiB), os.urandom(16 * MiB)

        async def send(writer: asyncio.StreamWriter, data: bytes) -> None:
            writer.write(data)
            await writer.drain()
            writer.write_eof()

        async with asyncio.timeout(30):
            _, _, got_by_client, got_by_agent = await asyncio.gather(
                send(agent_w, up), send(client_w, down), client_r.read(), agent_r.read()
            )
        assert got_by_client == b"early" + up
        assert got_by_agent == down
        assert stats.joined == (1 if splice_after else 0)
        assert stats.bytes_to_target == len(b"early" + up)
        assert stats.bytes_to_client == len(down)
        agent_w.close()
        client_w.close()
        server.close()

    run(scenario(), timeout=60)
