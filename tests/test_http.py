"""HTTP mode on loopback with real clients, every test run against both parser backends."""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import httptools
import httpx
import pytest
from websockets.asyncio.client import connect as ws_connect
from websockets.asyncio.server import ServerConnection
from websockets.asyncio.server import serve as ws_serve

from tpproxy.engine import Engine
from tpproxy.http.protocol import HttpSettings
from tpproxy.routing import (
    HeaderRule,
    HttpIntercept,
    PortRoutes,
    TcpIntercept,
    ValueRule,
    port_routes,
)
from tpproxy.targets import Address

from .helpers import EchoProtocol, free_port, run, start_server, wait_until
from .http_servers import Upstream, pattern_sha256

pytestmark = pytest.mark.parametrize("backend", ["httptools", "h11"])


def rule(name: str, value: str, op: str = "exact") -> tuple[HeaderRule, ...]:
    return (HeaderRule.make(name, op, value, "test"),)


@dataclass
class Rig:
    engine: Engine
    port: int
    app: Upstream
    alice: Upstream
    bob: Upstream

    def routes(self, *extra: HttpIntercept, tcp: TcpIntercept | None = None) -> PortRoutes:
        return port_routes(
            Address("127.0.0.1", self.app.port),
            [tcp] if tcp else [],
            [
                HttpIntercept(
                    "alice", Address("127.0.0.1", self.alice.port), rule("x-dev", "alice")
                ),
                HttpIntercept("bob", Address("127.0.0.1", self.bob.port), rule("x-dev", "bob")),
                *extra,
            ],
        )

    def http_stats(self) -> dict[tuple[str, str], int]:
        return self.engine.stats.http(self.port).outcomes()


@asynccontextmanager
async def rig(backend: str, **settings: float) -> AsyncIterator[Rig]:
    app, alice, bob = [await Upstream(n).start() for n in ("app", "alice", "bob")]
    engine = Engine(host="127.0.0.1", http=HttpSettings(backend=backend, **settings))  # type: ignore[arg-type]
    r = Rig(engine, free_port(), app, alice, bob)
    await engine.apply({r.port: r.routes()})
    try:
        yield r
    finally:
        await engine.close()
        for u in (app, alice, bob):
            u.close()


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes


class _Collector:
    def __init__(self) -> None:
        self.parser: httptools.HttpResponseParser | None = None
        self.status = 0
        self.done: list[Response] = []
        self._headers: dict[str, str] = {}
        self._body = b""

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers[name.decode().lower()] = value.decode()

    def on_headers_complete(self) -> None:
        assert self.parser is not None
        self.status = self.parser.get_status_code()

    def on_body(self, body: bytes) -> None:
        self._body += body

    def on_message_complete(self) -> None:
        self.done.append(Response(self.status, self._headers, self._body))
        self._headers, self._body = {}, b""


async def read_responses(
    reader: asyncio.StreamReader, n: int, timeout: float = 10
) -> list[Response]:
    """Read `n` responses with an independent parser (httptools' response parser)."""
    collector = _Collector()
    collector.parser = httptools.HttpResponseParser(collector)
    async with asyncio.timeout(timeout):
        while len(collector.done) < n:
            data = await reader.read(65536)
            if not data:
                raise AssertionError(f"closed after {len(collector.done)} of {n} responses")
            collector.parser.feed_data(data)
    return collector.done


async def send_raw(port: int, data: bytes) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    return reader, writer


def get(path: str, *headers: str, host: str = "svc") -> bytes:
    lines = "".join(f"{h}\r\n" for h in headers)
    return f"GET {path} HTTP/1.1\r\nHost: {host}\r\n{lines}\r\n".encode()


async def closed(reader: asyncio.StreamReader, timeout: float = 5) -> bool:
    async with asyncio.timeout(timeout):
        try:
            return await reader.read() == b""
        except ConnectionResetError:
            return True


def test_keepalive_connection_mixes_app_and_intercepts(backend: str) -> None:
    async def scenario() -> None:
        async with (
            rig(backend) as r,
            httpx.AsyncClient(base_url=f"http://127.0.0.1:{r.port}") as client,
        ):
            plan = [None, "alice", None, "bob", "alice", "ALICE", None, "carol"]
            for i, who in enumerate(plan):
                headers = {"X-Dev": who} if who else {}
                response = await client.get(f"/req/{i}", headers=headers)
                expected = who if who in ("alice", "bob") else "app"
                assert response.status_code == 200
                assert response.headers["x-served-by"] == expected
                assert response.text == f"{expected} GET /req/{i}"
            traffic = r.engine.stats.entry(r.port, "http", "per-request")
            assert traffic.connections_total == 1  # all on one keep-alive connection
            assert r.app.connections == 1
            assert r.alice.connections == 1
            assert r.http_stats() == {
                ("app", "forwarded"): 5,
                ("alice", "forwarded"): 2,
                ("bob", "forwarded"): 1,
            }
            # Headers reach the target unchanged, the routing header included.
            assert (b"X-Dev", b"bob") in r.bob.seen[0].headers

    run(scenario())


def test_pipelined_requests_are_answered_in_request_order(backend: str) -> None:
    async def scenario() -> None:
        async with rig(backend) as r:
            requests = (
                get("/delay/300")
                + get("/a", "x-dev: alice")
                + get("/b")
                + get("/c", "x-dev: bob")
                + get("/delay/100", "x-dev: alice")
                + get("/d")
            )
            reader, writer = await send_raw(r.port, requests)
            responses = await read_responses(reader, 6)
            assert [x.body.decode() for x in responses] == [
                "app GET /delay/300",
                "alice GET /a",
                "app GET /b",
                "bob GET /c",
                "alice GET /delay/100",
                "app GET /d",
            ]
            writer.close()

    run(scenario())


def test_request_bodies_stream_with_content_length_and_chunked(backend: str) -> None:
    async def scenario() -> None:
        async with rig(backend) as r:
            body = os.urandom(20 * 1024 * 1024)
            sha = hashlib.sha256(body).hexdigest()
            async with httpx.AsyncClient(
                base_url=f"http://127.0.0.1:{r.port}", timeout=30
            ) as client:
                response = await client.post("/upload", content=body, headers={"x-dev": "alice"})
                assert response.text == f"alice got {len(body)} bytes sha256={sha}"

                async def pieces() -> AsyncIterator[bytes]:
                    for i in range(0, len(body), 1 << 20):
                        yield body[i : i + (1 << 20)]

                response = await client.post("/upload", content=pieces())  # chunked
                assert response.text == f"app got {len(body)} bytes sha256={sha}"
            assert r.app.seen[-1].body_size == len(body)

            # Chunked with extensions and trailers, byte-exact, then another request.
            raw = (
                b"POST /upload HTTP/1.1\r\nHost: s\r\nTransfer-Encoding: chunked\r\nx-dev: bob\r\n\r\n"
                b"5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nX-Trailer: t\r\n\r\n" + get("/after")
            )
            reader, writer = await send_raw(r.port, raw)
            first, second = await read_responses(reader, 2)
            assert (
                first.body
                == b"bob got 11 bytes sha256=" + hashlib.sha256(b"hello world").hexdigest().encode()
            )
            assert second.body == b"app GET /after"
            writer.close()

    run(scenario(), timeout=90)


def test_response_bodies_stream_chunked_and_sized(backend: str) -> None:
    async def scenario() -> None:
        async with (
            rig(backend) as r,
            httpx.AsyncClient(base_url=f"http://127.0.0.1:{r.port}", timeout=30) as client,
        ):
            for path, who in (("/chunked/20000000", "alice"), ("/bytes/20000001", None)):
                digest = hashlib.sha256()
                size = 0
                async with client.stream(
                    "GET", path, headers={"x-dev": who} if who else {}
                ) as resp:
                    assert resp.headers["x-served-by"] == (who or "app")
                    async for piece in resp.aiter_raw():
                        digest.update(piece)
                        size += len(piece)
                n = int(path.rsplit("/", 1)[1])
                assert size == n
                assert digest.hexdigest() == pattern_sha256(n)
            # HEAD: the Content-Length describes a body that does not follow.
            response = await client.head("/bytes/100")
            assert response.headers["content-length"] == "100"
            assert response.content == b""
            assert (await client.get("/next")).text == "app GET /next"

    run(scenario(), timeout=90)


def test_expect_100_continue(backend: str) -> None:
    async def scenario() -> None:
        async with rig(backend) as r:
            head = (
                b"POST /upload HTTP/1.1\r\nHost: s\r\nx-dev: alice\r\nContent-Length: 4\r\n"
                b"Expect: 100-continue\r\n\r\n"
            )
            reader, writer = await send_raw(r.port, head)
            async with asyncio.timeout(5):
                interim = await reader.readuntil(b"\r\n\r\n")
            assert interim.startswith(b"HTTP/1.1 100 ")
            writer.write(b"data")
            (response,) = await read_responses(reader, 1)
            assert response.body.startswith(b"alice got 4 bytes")
            writer.close()

    run(scenario())


def test_connection_close_and_http10_are_honoured(backend: str) -> None:
    async def scenario() -> None:
        async with rig(backend) as r:
            reader, writer = await send_raw(
                r.port, get("/x", "Connection: close", "x-dev: bob") + get("/ignored")
            )
            (response,) = await read_responses(reader, 1)
            assert response.body == b"bob GET /x"
            assert await closed(reader)
            assert [s.target for s in r.app.seen] == []  # the request after close was not sent

            reader, writer = await send_raw(r.port, b"GET /old HTTP/1.0\r\n\r\n")
            async with asyncio.timeout(5):
                data = await reader.read()
            assert data.endswith(b"app GET /old")
            # HTTP/1.0 keep-alive is up to the server; this one (h11) closes, and so do we.
            reader, writer = await send_raw(
                r.port, b"GET /ka HTTP/1.0\r\nConnection: keep-alive\r\n\r\n" + get("/second")
            )
            (first,) = await read_responses(reader, 1)
            assert first.body == b"app GET /ka"
            assert await closed(reader)
            # A server that closes after its response: the client connection survives.
            reader, writer = await send_raw(r.port, get("/close", "x-dev: alice"))
            (response,) = await read_responses(reader, 1)
            assert response.headers["connection"] == "close"
            writer.close()

    run(scenario())


def test_h2c_upgrade_that_the_target_declines_keeps_routing_per_request(backend: str) -> None:
    """`Upgrade: h2c` (deprecated by RFC 9113) is an upgrade like any other: the chosen target
    may decline it by answering normally, and then the connection stays HTTP/1.1, its next
    requests routed one by one."""

    async def scenario() -> None:
        async with rig(backend) as r:
            upgrade = get(
                "/a", "Connection: Upgrade, HTTP2-Settings", "Upgrade: h2c",
                "HTTP2-Settings: AAMAAABkAAQAAP__",
            )  # fmt: skip
            reader, writer = await send_raw(r.port, upgrade + get("/b", "x-dev: alice"))
            responses = await read_responses(reader, 2)
            assert [x.body.decode() for x in responses] == ["app GET /a", "alice GET /b"]
            writer.write(get("/c", "x-dev: bob"))
            (third,) = await read_responses(reader, 1)
            assert third.body.decode() == "bob GET /c"
            writer.close()

    run(scenario())


def test_websocket_upgrade_is_routed_per_request(backend: str) -> None:
    async def scenario() -> None:
        async def named(name: str) -> tuple[object, int]:
            async def handler(ws: ServerConnection) -> None:
                async for message in ws:
                    text = message if isinstance(message, str) else message.decode()
                    await ws.send(f"{name}: {text}")

            server = await ws_serve(handler, "127.0.0.1", 0)
            return server, server.sockets[0].getsockname()[1]

        app_ws, app_port = await named("app")
        alice_ws, alice_port = await named("alice")
        engine = Engine(host="127.0.0.1", http=HttpSettings(backend=backend))
        port = free_port()
        await engine.apply(
            {
                port: port_routes(
                    Address("127.0.0.1", app_port),
                    (),
                    [
                        HttpIntercept(
                            "alice", Address("127.0.0.1", alice_port), rule("x-dev", "alice")
                        )
                    ],
                )
            }
        )
        async with ws_connect(
            f"ws://127.0.0.1:{port}/chat", additional_headers={"x-dev": "alice"}
        ) as ws:
            for i in range(3):
                await ws.send(f"hi {i}")
                assert await ws.recv() == f"alice: hi {i}"
        async with ws_connect(f"ws://127.0.0.1:{port}/chat") as ws:
            await ws.send("hello")
            assert await ws.recv() == "app: hello"
            big = "x" * 900_000
            await ws.send(big)
            assert await ws.recv() == "app: " + big
        await engine.close()
        app_ws.close()  # type: ignore[attr-defined]
        alice_ws.close()  # type: ignore[attr-defined]

    run(scenario())


def test_connect_switches_to_a_byte_tunnel(backend: str) -> None:
    async def scenario() -> None:
        class ConnectThenEcho(asyncio.Protocol):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                self.transport: asyncio.Transport = transport  # type: ignore[assignment]
                self.tunnel = False
                self.buffer = b""

            def data_received(self, data: bytes) -> None:
                if self.tunnel:
                    self.transport.write(data)
                    return
                self.buffer += data
                if b"\r\n\r\n" in self.buffer:
                    _, rest = self.buffer.split(b"\r\n\r\n", 1)
                    self.transport.write(b"HTTP/1.1 200 Connection established\r\n\r\n" + rest)
                    self.tunnel = True

        _, target_port = await start_server(ConnectThenEcho)
        engine = Engine(host="127.0.0.1", http=HttpSettings(backend=backend))
        port = free_port()
        await engine.apply({port: PortRoutes(Address("127.0.0.1", target_port), http=True)})
        reader, writer = await send_raw(
            port, b"CONNECT db:5432 HTTP/1.1\r\nHost: db:5432\r\n\r\nearly bytes "
        )
        async with asyncio.timeout(5):
            assert (
                await reader.readuntil(b"\r\n\r\n")
                == b"HTTP/1.1 200 Connection established\r\n\r\n"
            )
            assert await reader.readexactly(12) == b"early bytes "
        tunnelled = b"GET / HTTP/1.1\r\n\r\n not parsed any more"
        writer.write(tunnelled)
        async with asyncio.timeout(5):
            assert await reader.readexactly(len(tunnelled)) == tunnelled
        writer.close()
        await engine.close()

    run(scenario())


def test_http2_prior_knowledge_is_forwarded_as_tcp(backend: str) -> None:
    async def scenario() -> None:
        _, echo_port = await start_server(EchoProtocol)
        engine = Engine(host="127.0.0.1", http=HttpSettings(backend=backend))
        port = free_port()
        await engine.apply({port: PortRoutes(Address("127.0.0.1", echo_port), http=True)})
        preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(preface[:10])  # the preface may arrive in pieces
        await asyncio.sleep(0.01)
        writer.write(preface[10:] + b"\x00\x00\x00frames")
        async with asyncio.timeout(5):
            assert await reader.readexactly(len(preface) + 9) == preface + b"\x00\x00\x00frames"
        writer.close()
        await wait_until(lambda: engine.open_connections == 0)
        assert engine.stats.entry(port, "app", f"127.0.0.1:{echo_port}").connections_total == 1
        await engine.close()

    run(scenario())


def test_new_routes_apply_from_the_next_request(backend: str) -> None:
    async def scenario() -> None:
        async with (
            rig(backend) as r,
            httpx.AsyncClient(base_url=f"http://127.0.0.1:{r.port}") as client,
        ):
            assert (await client.get("/one")).text == "app GET /one"
            everything = HttpIntercept(
                "carol",
                Address("127.0.0.1", r.bob.port),
                path=ValueRule.make("prefix", "/", "path"),
            )
            await r.engine.apply({r.port: r.routes(everything)})
            assert (await client.get("/two")).text == "bob GET /two"
            tcp = TcpIntercept("global", Address("127.0.0.1", r.alice.port))
            await r.engine.apply({r.port: r.routes(tcp=tcp)})
            assert (await client.get("/three")).text == "alice GET /three"  # TCP owns the port
            await r.engine.apply({r.port: r.routes()})
            assert (await client.get("/four")).text == "app GET /four"
            assert r.engine.stats.entry(r.port, "http", "per-request").connections_total == 1

    run(scenario())


def test_unreachable_intercept_gets_502_at_once_or_falls_back(backend: str) -> None:
    async def scenario() -> None:
        async with rig(backend) as r:
            dead = Address("127.0.0.1", free_port())
            await r.engine.apply(
                {
                    r.port: r.routes(
                        HttpIntercept("gone", dead, rule("x-dev", "gone")),
                        HttpIntercept("soft", dead, rule("x-dev", "soft"), fallback_to_app=True),
                    )
                }
            )
            reader, writer = await send_raw(
                r.port, get("/1", "x-dev: gone") + get("/2", "x-dev: soft") + get("/3")
            )
            started = time.monotonic()
            first, second, third = await read_responses(reader, 3)
            assert time.monotonic() - started < 3
            assert first.status == 502
            assert b"intercept 'gone' target" in first.body
            assert b"unreachable" in first.body
            assert second.body == b"app GET /2"
            assert third.body == b"app GET /3"  # the connection stays usable after a 502
            writer.close()
            stats = r.http_stats()
            assert stats[("gone", "unreachable")] == 1
            assert stats[("soft", "fallback")] == 1

    run(scenario())


MALFORMED = [
    (b"GARBAGE\r\n\r\n", 400),
    (
        b"GET / HTTP/1.1\r\nHost: s\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\nabc",
        400,
    ),
    (b"GET / HTTP/1.1\r\nHost: s\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd", 400),
    (b"POST / HTTP/1.1\r\nHost: s\r\nContent-Length: abc\r\n\r\n", 400),
    (b"POST / HTTP/1.1\r\nHost: s\r\nTransfer-Encoding: gzip\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\n\r\n", 400),  # no Host
    (b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400),
    (b"GET / HTTP/1.1\nHost: s\n\n", 400),  # bare LF
    (b"GET / HTTP/1.1\r\nHost: s\r\nBad Header: x\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nHost: s\r\nX: a\x00b\r\n\r\n", 400),
    (b"GET / HTTP/9.9\r\nHost: s\r\n\r\n", 505),
    (b"FOO / HTTP/1.1\r\nHost: s\r\n\r\n", 501),
    (b"get / HTTP/1.1\r\nHost: s\r\n\r\n", 501),
    (b"GET / HTTP/1.1\r\nHost: s\r\nX: a\x01b\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nHost: s\r\n folded\r\n\r\n", 400),
    (b"GET /a b HTTP/1.1\r\nHost: s\r\n\r\n", 400),
    (b"GET /\xff HTTP/1.1\r\nHost: s\r\n\r\n", 400),
    (b"GET / HTTP/1.1\rHost: s\r\n\r\n", 400),
]


@pytest.mark.parametrize(("raw", "status"), MALFORMED)
def test_malformed_requests_get_an_error_and_a_close(
    backend: str, raw: bytes, status: int | None
) -> None:
    async def scenario() -> None:
        async with rig(backend) as r:
            healthy_reader, healthy_writer = await send_raw(r.port, get("/before"))
            await read_responses(healthy_reader, 1)
            reader, _writer = await send_raw(r.port, raw)
            (response,) = await read_responses(reader, 1)
            assert response.status == status
            assert response.headers["connection"] == "close"
            assert await closed(reader)
            assert [s.target for s in r.app.seen] == ["/before"]  # nothing malformed got through
            healthy_writer.write(get("/after"))  # other connections keep being served
            (after,) = await read_responses(healthy_reader, 1)
            assert after.body == b"app GET /after"

    run(scenario())


def test_bad_chunked_body_is_refused_mid_stream(backend: str) -> None:
    async def scenario() -> None:
        async with rig(backend) as r:
            raw = b"POST /upload HTTP/1.1\r\nHost: s\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhelloXX"
            reader, _writer = await send_raw(r.port, raw)
            (response,) = await read_responses(reader, 1)
            assert response.status == 400
            assert b"not followed by CRLF" in response.body
            assert await closed(reader)

    run(scenario())


def test_oversized_head_gets_431(backend: str) -> None:
    async def scenario() -> None:
        async with rig(backend, max_head_size=4096) as r:
            for raw in (get("/", "x-big: " + "a" * 5000), b"GET / HTTP/1.1\r\nx: " + b"b" * 6000):
                reader, writer = await send_raw(r.port, raw)
                (response,) = await read_responses(reader, 1)
                assert response.status == 431
                assert await closed(reader)
            many = get("/", *[f"h{i}: v" for i in range(150)])
            reader, _writer = await send_raw(r.port, many)
            (response,) = await read_responses(reader, 1)
            assert response.status == 431
            assert r.http_stats()[("-", "too_large")] == 3

    run(scenario())


def test_slow_head_gets_408_and_idle_connections_close(backend: str) -> None:
    async def scenario() -> None:
        async with rig(backend, header_timeout=0.3, idle_timeout=0.6) as r:
            reader, writer = await send_raw(
                r.port, b"GET / HTTP/1.1\r\nHost: s\r\n"
            )  # never finished
            (response,) = await read_responses(reader, 1, timeout=5)
            assert response.status == 408
            assert await closed(reader)
            reader, _writer = await send_raw(r.port, get("/idle"))
            await read_responses(reader, 1)
            assert await closed(reader, timeout=5)  # idle after its response: closed
            assert r.http_stats()[("-", "timeout")] == 1

    run(scenario())


def test_upstream_that_closes_without_answering_gives_502(backend: str) -> None:
    async def scenario() -> None:
        class Rude(asyncio.Protocol):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                self.transport = transport

            def data_received(self, data: bytes) -> None:
                self.transport.close()

        _, rude_port = await start_server(Rude)
        async with rig(backend) as r:
            await r.engine.apply(
                {
                    r.port: r.routes(
                        HttpIntercept(
                            "rude", Address("127.0.0.1", rude_port), rule("x-dev", "rude")
                        )
                    )
                }
            )
            reader, writer = await send_raw(r.port, get("/x", "x-dev: rude") + get("/y"))
            first, second = await read_responses(reader, 2)
            assert first.status == 502
            assert b"closed the connection before answering" in first.body
            assert second.body == b"app GET /y"
            writer.close()

    run(scenario())


def test_connection_that_never_sends_is_closed_when_idle(backend: str) -> None:
    async def scenario() -> None:
        async with rig(backend, idle_timeout=0.5) as r:
            reader, _ = await asyncio.open_connection("127.0.0.1", r.port)
            assert await closed(reader, timeout=5)
            await wait_until(lambda: r.engine.open_connections == 0)

    run(scenario())


def test_drain_closes_idle_keepalive_and_finishes_busy(backend: str) -> None:
    async def scenario() -> None:
        async with rig(backend) as r:
            idle_reader, _ = await send_raw(r.port, get("/idle"))
            await read_responses(idle_reader, 1)
            busy_reader, _busy_writer = await send_raw(r.port, get("/delay/300"))
            await wait_until(lambda: len(r.app.seen) == 1 or r.engine.open_connections == 2)
            drain = asyncio.create_task(r.engine.drain(5))
            assert await closed(idle_reader, timeout=2)
            (response,) = await read_responses(busy_reader, 1)
            assert response.body == b"app GET /delay/300"
            assert await closed(busy_reader)
            assert await drain == 0

    run(scenario())


def test_metrics_show_requests_by_route_and_outcome_and_latency(backend: str) -> None:
    from prometheus_client import generate_latest

    from tpproxy.metrics import engine_registry

    async def scenario() -> None:
        async with rig(backend) as r:
            reader, writer = await send_raw(
                r.port, get("/1") + get("/2", "x-dev: alice") + get("/3", "x-dev: alice")
            )
            await read_responses(reader, 3)
            writer.close()
            reader, writer = await send_raw(r.port, b"BAD\r\n\r\n")
            await read_responses(reader, 1)
            text = generate_latest(engine_registry(r.engine)).decode()
            p = f'port="{r.port}"'
            assert (
                f'tpproxy_http_requests_total{{outcome="forwarded",{p},route="alice"}} 2.0' in text
            )
            assert f'tpproxy_http_requests_total{{outcome="forwarded",{p},route="app"}} 1.0' in text
            assert f'tpproxy_http_requests_total{{outcome="bad_request",{p},route="-"}} 1.0' in text
            assert f"tpproxy_http_added_latency_seconds_count{{{p}}} 3.0" in text
            assert f'tpproxy_http_added_latency_seconds_bucket{{le="+Inf",{p}}} 3.0' in text

    run(scenario())


def test_bad_body_after_pipelined_requests_to_the_same_target_answers_them_first(
    backend: str,
) -> None:
    """Found by the differential fuzz: a malformed chunked body must not strand the earlier
    requests that went over the same upstream connection (it used to hang)."""

    async def scenario() -> None:
        async with rig(backend) as r:
            raw = (
                get("/one")
                + get("/two", "x-dev: alice")
                + get("/three")
                + b"POST /bad HTTP/1.1\r\nHost: s\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n"
            )
            reader, writer = await send_raw(r.port, raw)
            responses = await read_responses(reader, 4)
            assert [x.body for x in responses[:3]] == [
                b"app GET /one",
                b"alice GET /two",
                b"app GET /three",
            ]
            assert responses[3].status == 400
            assert await closed(reader)
            # The next client gets a fresh upstream connection and is served normally.
            reader, writer = await send_raw(r.port, get("/four"))
            (after,) = await read_responses(reader, 1)
            assert after.body == b"app GET /four"

    run(scenario())
