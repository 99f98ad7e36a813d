"""The engine on real loopback sockets: forwarding, flow control, half-close, hot route changes."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from functools import partial

import pytest

from tpproxy.engine import Engine, ListenError
from tpproxy.routing import PortRoutes, TcpIntercept
from tpproxy.targets import Address, ConnectorTarget, ProtocolFactory

from .helpers import (
    EchoProtocol,
    TaggedProtocol,
    free_port,
    open_conn,
    read_exactly,
    run,
    start_server,
    stream_through,
    wait_until,
)


def test_many_ports_each_reach_their_own_app() -> None:
    async def scenario() -> None:
        seen: list[bytes] = []
        apps = [await start_server(partial(TaggedProtocol, b"app%02d" % i, seen)) for i in range(8)]
        engine = Engine(host="127.0.0.1")
        ports = [free_port() for _ in apps]
        await engine.apply(
            {p: PortRoutes(Address("127.0.0.1", a[1])) for p, a in zip(ports, apps, strict=False)}
        )
        assert engine.ports == sorted(ports)
        for i, port in enumerate(ports):
            reader, writer = await open_conn(port)
            assert await read_exactly(reader, 5) == b"app%02d" % i
            writer.write(b"ping")
            assert await read_exactly(reader, 4) == b"ping"
            writer.close()
        stats = {s.port: s for s in engine.stats.entries()}
        assert all(stats[p].connections_total == 1 for p in ports)
        assert stats[ports[0]].bytes_to_target == 4
        assert stats[ports[0]].bytes_to_client == 5 + 4
        await engine.close()

    run(scenario())


@pytest.mark.slow
def test_100_mb_each_way_arrive_intact() -> None:
    async def scenario() -> None:
        _, app_port = await start_server(EchoProtocol)
        engine = Engine(host="127.0.0.1")
        port = free_port()
        await engine.apply({port: PortRoutes(Address("127.0.0.1", app_port))})
        total = 100 * 1024 * 1024
        sent, received = await stream_through(port, total)
        assert sent == received
        await wait_until(lambda: engine.open_connections == 0)
        (stats,) = engine.stats.entries()
        assert stats.bytes_to_target == total
        assert stats.bytes_to_client == total
        await engine.close()

    run(scenario(), timeout=120)


def test_half_close_keeps_the_other_direction_open() -> None:
    """The client sends EOF first; the app answers afterwards and the answer still arrives."""

    async def scenario() -> None:
        got_eof = asyncio.Event()

        class AnswerAfterEof(asyncio.Protocol):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                self.transport: asyncio.Transport = transport  # type: ignore[assignment]
                self.data = b""

            def data_received(self, data: bytes) -> None:
                self.data += data

            def eof_received(self) -> bool:
                got_eof.set()
                # Answer only after the client's EOF, later, in pieces: the way must stay open.
                loop = asyncio.get_running_loop()
                loop.call_later(0.05, self.transport.write, b"you said: ")
                loop.call_later(0.1, self.transport.write, self.data)
                loop.call_later(0.15, self.transport.close)
                return True

        _, app_port = await start_server(AnswerAfterEof)
        engine = Engine(host="127.0.0.1")
        port = free_port()
        await engine.apply({port: PortRoutes(Address("127.0.0.1", app_port))})
        reader, writer = await open_conn(port)
        writer.write(b"hello")
        writer.write_eof()
        async with asyncio.timeout(5):
            await got_eof.wait()
            assert await reader.read() == b"you said: hello"
        writer.close()
        await wait_until(lambda: engine.open_connections == 0)
        await engine.close()

    run(scenario())


def test_app_half_close_keeps_client_direction_open() -> None:
    """The app sends EOF first (a banner then EOF); the client can still send and be heard."""

    async def scenario() -> None:
        heard = asyncio.get_running_loop().create_future()

        class BannerThenEof(asyncio.Protocol):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                transport.write(b"banner")  # type: ignore[attr-defined]
                transport.write_eof()  # type: ignore[attr-defined]
                self.data = b""

            def data_received(self, data: bytes) -> None:
                self.data += data

            def eof_received(self) -> bool:
                heard.set_result(self.data)
                return False

        _, app_port = await start_server(BannerThenEof)
        engine = Engine(host="127.0.0.1")
        port = free_port()
        await engine.apply({port: PortRoutes(Address("127.0.0.1", app_port))})
        reader, writer = await open_conn(port)
        async with asyncio.timeout(5):
            assert await reader.read() == b"banner"  # EOF from the app arrived
        writer.write(b"still talking")
        writer.write_eof()
        async with asyncio.timeout(5):
            assert await heard == b"still talking"
        writer.close()
        await engine.close()

    run(scenario())


def test_refusing_target_closes_client_at_once_and_is_counted() -> None:
    async def scenario() -> None:
        dead = free_port()  # nothing listens there
        engine = Engine(host="127.0.0.1")
        port = free_port()
        await engine.apply({port: PortRoutes(Address("127.0.0.1", dead))})
        for _ in range(3):
            reader, writer = await open_conn(port)
            writer.write(b"anyone?")
            async with asyncio.timeout(2):
                with contextlib.suppress(ConnectionResetError):
                    assert await reader.read() == b""
            writer.close()
        await wait_until(lambda: engine.open_connections == 0)
        (stats,) = engine.stats.entries()
        assert stats.connect_errors == 3
        assert stats.connections_open == 0
        await engine.close()

    run(scenario())


def test_target_that_never_answers_times_out() -> None:
    """A target that accepts nothing within connect_timeout: the client is closed, not left hanging."""

    async def scenario() -> None:
        async def never(
            factory: ProtocolFactory,
        ) -> tuple[asyncio.BaseTransport, asyncio.BaseProtocol]:
            await asyncio.Event().wait()
            raise AssertionError("unreachable")

        engine = Engine(host="127.0.0.1", connect_timeout=0.2)
        port = free_port()
        await engine.apply({port: PortRoutes(ConnectorTarget("blackhole", never))})
        reader, _writer = await open_conn(port)
        async with asyncio.timeout(3):
            with contextlib.suppress(ConnectionResetError):
                assert await reader.read() == b""
        (stats,) = engine.stats.entries()
        assert stats.connect_errors == 1
        assert stats.target == "blackhole"
        await engine.close()

    run(scenario())


def test_reset_by_app_resets_client() -> None:
    async def scenario() -> None:
        class ResetOnData(asyncio.Protocol):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                self.transport = transport

            def data_received(self, data: bytes) -> None:
                sock = self.transport.get_extra_info("socket")
                sock.setsockopt(
                    socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00"
                )
                self.transport.abort()  # type: ignore[attr-defined]

        _, app_port = await start_server(ResetOnData)
        engine = Engine(host="127.0.0.1")
        port = free_port()
        await engine.apply({port: PortRoutes(Address("127.0.0.1", app_port))})
        reader, writer = await open_conn(port)
        writer.write(b"boom")
        async with asyncio.timeout(3):
            with pytest.raises(ConnectionResetError):
                while await reader.read(100):
                    pass
                raise ConnectionResetError("closed without reset")  # a clean EOF is wrong here
        await wait_until(lambda: engine.open_connections == 0)
        (stats,) = engine.stats.entries()
        assert stats.resets == 1
        await engine.close()

    run(scenario())


def test_apply_switches_new_connections_and_keeps_old_ones() -> None:
    async def scenario() -> None:
        seen: list[bytes] = []
        _, app_port = await start_server(lambda: TaggedProtocol(b"APP", seen))
        _, dev_port = await start_server(lambda: TaggedProtocol(b"DEV", seen))
        app = Address("127.0.0.1", app_port)
        engine = Engine(host="127.0.0.1")
        port = free_port()
        await engine.apply({port: PortRoutes(app)})

        old_reader, old_writer = await open_conn(port)
        assert await read_exactly(old_reader, 3) == b"APP"

        dev = TcpIntercept("alice:echo", Address("127.0.0.1", dev_port))
        await engine.apply({port: PortRoutes(app, dev)})
        new_reader, new_writer = await open_conn(port)
        assert await read_exactly(new_reader, 3) == b"DEV"

        # The old connection still works and still talks to the app.
        old_writer.write(b"old")
        assert await read_exactly(old_reader, 3) == b"old"

        await engine.apply({port: PortRoutes(app)})  # leave the intercept
        third_reader, third_writer = await open_conn(port)
        assert await read_exactly(third_reader, 3) == b"APP"
        new_writer.write(b"new")
        assert await read_exactly(new_reader, 3) == b"new"  # intercepted one keeps its target

        routes = {(s.route, s.target) for s in engine.stats.entries()}
        assert ("alice:echo", f"127.0.0.1:{dev_port}") in routes
        assert ("app", f"127.0.0.1:{app_port}") in routes
        for w in (old_writer, new_writer, third_writer):
            w.close()
        await engine.close()

    run(scenario())


def test_ports_added_and_removed_at_run_time() -> None:
    async def scenario() -> None:
        seen: list[bytes] = []
        _, app_port = await start_server(lambda: TaggedProtocol(b"APP", seen))
        app = Address("127.0.0.1", app_port)
        engine = Engine(host="127.0.0.1")
        first, second = free_port(), free_port()
        await engine.apply({first: PortRoutes(app)})
        kept_reader, kept_writer = await open_conn(first)
        assert await read_exactly(kept_reader, 3) == b"APP"

        await engine.apply({second: PortRoutes(app)})
        assert engine.ports == [second]
        reader, writer = await open_conn(second)
        assert await read_exactly(reader, 3) == b"APP"
        with pytest.raises(ConnectionRefusedError):
            await open_conn(first)
        kept_writer.write(b"still here")  # accepted before the port was removed: not dropped
        assert await read_exactly(kept_reader, 10) == b"still here"
        for w in (kept_writer, writer):
            w.close()
        await engine.close()

    run(scenario())


def test_apply_is_all_or_nothing_when_a_port_is_taken() -> None:
    async def scenario() -> None:
        seen: list[bytes] = []
        _, app_port = await start_server(lambda: TaggedProtocol(b"APP", seen))
        app = Address("127.0.0.1", app_port)
        taken = socket.socket()
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        engine = Engine(host="127.0.0.1")
        first, fresh = free_port(), free_port()
        await engine.apply({first: PortRoutes(app)})
        with pytest.raises(ListenError, match=f"127.0.0.1:{busy}: address already in use") as info:
            await engine.apply(
                {first: PortRoutes(app), fresh: PortRoutes(app), busy: PortRoutes(app)}
            )
        assert info.value.port == busy
        assert engine.ports == [first]
        with pytest.raises(ConnectionRefusedError):
            await open_conn(fresh)  # bound during the failed apply, then released
        taken.close()
        await engine.close()

    run(scenario())


@pytest.mark.slow
def test_1000_concurrent_connections_through_one_port() -> None:
    async def scenario() -> None:
        _, app_port = await start_server(EchoProtocol)
        engine = Engine(host="127.0.0.1", backlog=2048)
        port = free_port()
        await engine.apply({port: PortRoutes(Address("127.0.0.1", app_port))})
        conns = await asyncio.gather(*(open_conn(port) for _ in range(1000)))
        await wait_until(lambda: engine.open_connections == 1000, timeout=20)
        for i, (_, writer) in enumerate(conns):
            writer.write(b"%06d" % i)
        answers = await asyncio.gather(*(read_exactly(r, 6, timeout=30) for r, _ in conns))
        assert answers == [b"%06d" % i for i in range(1000)]
        for _, writer in conns:
            writer.close()
        await wait_until(lambda: engine.open_connections == 0, timeout=20)
        (stats,) = engine.stats.entries()
        assert stats.connections_total == 1000
        assert stats.connect_errors == 0
        await engine.close()

    run(scenario(), timeout=90)


def test_connector_target_and_bytes_sent_before_it_answers() -> None:
    """A slow connector (a tunnel stand-in): bytes and EOF sent before it connects are kept."""

    async def scenario() -> None:
        _, app_port = await start_server(EchoProtocol)
        release = asyncio.Event()
        calls = []

        async def slow_tunnel(
            factory: ProtocolFactory,
        ) -> tuple[asyncio.BaseTransport, asyncio.BaseProtocol]:
            calls.append(1)
            await release.wait()
            loop = asyncio.get_running_loop()
            return await loop.create_connection(factory, "127.0.0.1", app_port)

        engine = Engine(host="127.0.0.1")
        port = free_port()
        await engine.apply({port: PortRoutes(ConnectorTarget("tunnel", slow_tunnel))})
        reader, writer = await open_conn(port)
        writer.write(b"early bytes")
        writer.write_eof()
        await wait_until(lambda: bool(calls))
        release.set()
        async with asyncio.timeout(5):
            assert await reader.read() == b"early bytes"
        writer.close()
        await engine.close()

    run(scenario())


def test_client_that_leaves_while_connecting_leaves_nothing_open() -> None:
    async def scenario() -> None:
        _, app_port = await start_server(EchoProtocol)
        release = asyncio.Event()
        opened: list[asyncio.BaseTransport] = []

        async def slow(
            factory: ProtocolFactory,
        ) -> tuple[asyncio.BaseTransport, asyncio.BaseProtocol]:
            await release.wait()
            loop = asyncio.get_running_loop()
            transport, proto = await loop.create_connection(factory, "127.0.0.1", app_port)
            opened.append(transport)
            return transport, proto

        engine = Engine(host="127.0.0.1")
        port = free_port()
        await engine.apply({port: PortRoutes(ConnectorTarget("slow", slow))})
        _, writer = await open_conn(port)
        await wait_until(lambda: engine.open_connections == 1)
        writer.transport.abort()
        await asyncio.sleep(0)  # let the reset be seen once reading resumes
        release.set()
        await wait_until(lambda: bool(opened))
        await wait_until(lambda: opened[0].is_closing() and engine.open_connections == 0)
        await engine.close()

    run(scenario())


def test_drain_waits_for_open_connections_then_aborts_the_rest() -> None:
    async def scenario() -> None:
        _, app_port = await start_server(EchoProtocol)
        engine = Engine(host="127.0.0.1")
        port = free_port()
        await engine.apply({port: PortRoutes(Address("127.0.0.1", app_port))})
        finishing_reader, finishing_writer = await open_conn(port)
        stuck_reader, _stuck_writer = await open_conn(port)
        await wait_until(lambda: engine.open_connections == 2)

        drain = asyncio.create_task(engine.drain(0.5))
        await asyncio.sleep(0)
        with pytest.raises(ConnectionRefusedError):
            await open_conn(port)  # no longer accepting
        finishing_writer.write(b"in flight")
        assert await read_exactly(finishing_reader, 9) == b"in flight"
        finishing_writer.close()
        aborted = await drain
        assert aborted == 1  # the one that never finished
        async with asyncio.timeout(2):
            with contextlib.suppress(ConnectionResetError):
                assert await stuck_reader.read() == b""

    run(scenario())
