"""The admin endpoint over a real socket: health, metrics, and bad requests."""

from __future__ import annotations

import asyncio

from tpproxy.admin import AdminServer
from tpproxy.engine import Engine
from tpproxy.metrics import engine_registry

from .helpers import run


async def exchange(port: int, raw: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(raw)
    async with asyncio.timeout(5):
        data = await reader.read()
    writer.close()
    return data


def test_health_metrics_and_errors() -> None:
    async def scenario() -> None:
        ready = [False, "starting"]
        admin = AdminServer(engine_registry(Engine()), lambda: (bool(ready[0]), str(ready[1])))
        port = await admin.start("127.0.0.1", 0)

        def get(path: str, method: str = "GET") -> bytes:
            return f"{method} {path} HTTP/1.1\r\nhost: a\r\nconnection: close\r\n\r\n".encode()

        assert (await exchange(port, get("/livez"))).startswith(b"HTTP/1.1 200 ")
        answer = await exchange(port, get("/readyz"))
        assert answer.startswith(b"HTTP/1.1 503 ")
        assert answer.endswith(b"starting\n")
        ready[:] = [True, "ok"]
        assert (await exchange(port, get("/healthz?verbose"))).startswith(b"HTTP/1.1 200 ")
        metrics = await exchange(port, get("/metrics"))
        assert b"tpproxy_listeners 0.0" in metrics
        assert b"process_cpu_seconds_total" in metrics
        assert (await exchange(port, get("/nope"))).startswith(b"HTTP/1.1 404 ")
        assert (await exchange(port, get("/livez", "POST"))).startswith(b"HTTP/1.1 405 ")
        head = await exchange(port, get("/livez", "HEAD"))
        assert head.startswith(b"HTTP/1.1 200 ")
        assert head.endswith(b"\r\n\r\n")  # no body for HEAD

        # Two requests on one keep-alive connection.
        two = b"GET /livez HTTP/1.1\r\nhost: a\r\n\r\nGET /livez HTTP/1.1\r\nhost: a\r\nconnection: close\r\n\r\n"
        assert (await exchange(port, two)).count(b"HTTP/1.1 200 ") == 2

        bad = await exchange(port, b"GARBAGE\x00\r\n\r\n")
        assert bad.startswith(b"HTTP/1.1 400 ")
        huge = await exchange(port, b"GET / HTTP/1.1\r\nx: " + b"a" * 20000 + b"\r\n\r\n")
        assert huge.startswith(b"HTTP/1.1 400 ")
        # The server still answers after the bad ones.
        assert (await exchange(port, get("/livez"))).startswith(b"HTTP/1.1 200 ")
        admin.close()

    run(scenario())
