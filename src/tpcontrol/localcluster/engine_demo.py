"""A local intercept demo on loopback: the app, the agent's engine in front of it, a developer.

It shows the core of an intercept without a cluster: traffic reaches the app, a TCP intercept is
switched on (new connections go to the developer's process, a connection opened before keeps
going to the app), then off again; then the port switches to HTTP mode and two developers share
it by header, request by request, on one keep-alive connection. Every step checks where each
request went and the run exits non-zero if any went astray.
"""

from __future__ import annotations

import asyncio
import time

from tpproxy.engine import Engine
from tpproxy.routing import HeaderRule, HttpIntercept, PortRoutes, TcpIntercept, port_routes
from tpproxy.targets import Address


class HttpResponder(asyncio.Protocol):
    """A tiny keep-alive HTTP/1.1 server that says who it is (stands in for a real app)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.buffer = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while b"\r\n\r\n" in self.buffer:
            _, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
            body = f"hello from {self.name}\n".encode()
            self.transport.write(
                b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\n"
                b"content-length: %d\r\n\r\n%s" % (len(body), body)
            )


class Client:
    """A keep-alive HTTP client connection, enough to show where each request lands."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, port: int) -> Client:
        return cls(*await asyncio.open_connection("127.0.0.1", port))

    async def get(self, path: str, headers: dict[str, str] | None = None) -> str:
        extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
        self.writer.write(f"GET {path} HTTP/1.1\r\nhost: echo\r\n{extra}\r\n".encode())
        async with asyncio.timeout(5):
            head = await self.reader.readuntil(b"\r\n\r\n")
            length = next(
                int(line.split(b":")[1])
                for line in head.split(b"\r\n")
                if line.lower().startswith(b"content-length:")
            )
            return (await self.reader.readexactly(length)).decode().strip()

    def close(self) -> None:
        self.writer.close()


async def _serve(name: str) -> tuple[asyncio.Server, int]:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: HttpResponder(name), "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


async def _free_port() -> int:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(asyncio.Protocol, "127.0.0.1", 0)
    port: int = server.sockets[0].getsockname()[1]
    server.close()
    return port


async def run_demo(requests: int = 3) -> int:
    """Run every step, print where each request went, return 0 when all went where expected."""
    results: list[tuple[str, bool]] = []
    app_server, app_port = await _serve("the app (echo container)")
    dev_server, dev_port = await _serve("alice's laptop")
    app = Address("127.0.0.1", app_port)
    dev = Address("127.0.0.1", dev_port)
    servers = [app_server, dev_server]
    engine = Engine(host="127.0.0.1")
    agent_port = await _free_port()
    print(f"app listening on 127.0.0.1:{app_port}; alice's local process on 127.0.0.1:{dev_port}")
    await engine.apply({agent_port: PortRoutes(app)})
    print(f"traffic-agent engine listening on 127.0.0.1:{agent_port} -> app\n")

    async def step(
        title: str, client: Client, expect: str, headers: dict[str, str] | None = None
    ) -> None:
        print(f"== {title}")
        ok = True
        for i in range(requests):
            started = time.perf_counter()
            answer = await client.get(f"/step/{len(results) + 1}/{i}", headers)
            took = (time.perf_counter() - started) * 1e6
            hit = expect in answer
            ok &= hit
            print(f"   GET #{i + 1} -> {answer!r} ({took:.0f} us){'' if hit else '  UNEXPECTED'}")
        results.append((title, ok))

    try:
        before = await Client.open(agent_port)
        await step("1. no intercept: requests reach the app", before, "the app")

        intercept = TcpIntercept("alice:echo-http", dev)
        await engine.apply({agent_port: PortRoutes(app, intercept)})
        print(f"\n-- TCP intercept {intercept.id!r} switched on (port {agent_port} -> alice)")
        during = await Client.open(agent_port)
        await step("2. new connection while intercepted: reaches alice's laptop", during, "alice")
        await step("3. connection opened before the intercept: still the app", before, "the app")

        await engine.apply({agent_port: PortRoutes(app)})
        print(f"\n-- intercept {intercept.id!r} switched off")
        after = await Client.open(agent_port)
        await step("4. new connection after leaving: the app again", after, "the app")
        await step("5. connection opened while intercepted: keeps going to alice", during, "alice")

        # HTTP mode: each request is routed on its own, by its headers.
        bob_server, bob_port = await _serve("bob's laptop")
        servers.append(bob_server)
        routes = port_routes(
            app,
            http_intercepts=[
                HttpIntercept(
                    "alice:echo", dev, (HeaderRule.make("x-dev", "exact", "alice", "demo"),)
                ),
                HttpIntercept(
                    "bob:echo",
                    Address("127.0.0.1", bob_port),
                    (HeaderRule.make("x-dev", "exact", "bob", "demo"),),
                ),
            ],
        )
        await engine.apply({agent_port: routes})
        print(f"\n-- port {agent_port} in HTTP mode: alice and bob intercept by header x-dev")
        mixed = await Client.open(agent_port)
        await step("6. one keep-alive connection, no header: the app", mixed, "the app")
        await step("7. same connection, x-dev: alice -> alice", mixed, "alice", {"x-dev": "alice"})
        await step("8. same connection, x-dev: bob -> bob", mixed, "bob", {"x-dev": "bob"})
        await step(
            "9. same connection, x-dev: carol -> the app", mixed, "the app", {"x-dev": "carol"}
        )
        for client in (before, during, after, mixed):
            client.close()
    finally:
        await engine.drain(2.0)
        for server in servers:
            server.close()

    print("\nsummary:")
    for title, ok in results:
        print(f"   {'PASS' if ok else 'FAIL'}  {title}")
    stats = sorted(engine.stats.entries(), key=lambda s: s.route)
    for s in stats:
        print(
            f"   route {s.route:<16} {s.connections_total} connection(s), "
            f"{s.bytes_to_target} B in, {s.bytes_to_client} B out"
        )
    return 0 if all(ok for _, ok in results) else 1
