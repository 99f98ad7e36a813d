"""The admin endpoint: `/livez`, `/readyz` (`/healthz` alias) and `/metrics` on their own port.

It sits off the data path, so it uses h11 for strict, simple HTTP/1.1 over asyncio streams.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import h11
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import CollectorRegistry

log = logging.getLogger("tpproxy.admin")

MAX_REQUEST_HEAD = 16 * 1024
READ_TIMEOUT = 10.0


class AdminServer:
    """Serves health and metrics; `ready()` says whether the engine should get traffic."""

    def __init__(self, registry: CollectorRegistry, ready: Callable[[], tuple[bool, str]]) -> None:
        self.registry = registry
        self.ready = ready
        self._server: asyncio.Server | None = None

    async def start(self, host: str, port: int) -> int:
        """Listen; returns the bound port (useful with port 0)."""
        self._server = await asyncio.start_server(self._serve, host, port, reuse_address=True)
        bound: int = self._server.sockets[0].getsockname()[1]
        return bound

    def close(self) -> None:
        """Stop listening."""
        if self._server is not None:
            self._server.close()

    def respond(self, method: str, target: str) -> tuple[int, str, bytes]:
        """Status, content type and body for one request (sans-IO, testable directly)."""
        path = target.split("?", 1)[0]
        if method not in ("GET", "HEAD"):
            return 405, "text/plain", b"method not allowed\n"
        if path == "/livez":
            return 200, "text/plain", b"ok\n"
        if path in ("/readyz", "/healthz"):
            ok, why = self.ready()
            return (200 if ok else 503), "text/plain", (why + "\n").encode()
        if path == "/metrics":
            return 200, CONTENT_TYPE_LATEST, generate_latest(self.registry)
        return 404, "text/plain", b"not found: try /livez, /readyz or /metrics\n"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_REQUEST_HEAD)
        try:
            while True:
                event = await self._next_event(conn, reader)
                if isinstance(event, h11.Request):
                    status, ctype, body = self.respond(event.method.decode(), event.target.decode())
                    headers = [("content-type", ctype), ("content-length", str(len(body)))]
                    writer.write(conn.send(h11.Response(status_code=status, headers=headers)))
                    if event.method != b"HEAD":
                        writer.write(conn.send(h11.Data(data=body)))
                    writer.write(conn.send(h11.EndOfMessage()))
                    await writer.drain()
                elif isinstance(event, h11.ConnectionClosed) or event is h11.PAUSED:
                    break
                if conn.our_state is h11.MUST_CLOSE or conn.their_state is h11.MUST_CLOSE:
                    break
                if conn.our_state is h11.DONE and conn.their_state is h11.DONE:
                    conn.start_next_cycle()
        except h11.RemoteProtocolError as exc:
            if conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                body = f"bad request: {exc}\n".encode()
                headers = [("content-type", "text/plain"), ("content-length", str(len(body)))]
                writer.write(conn.send(h11.Response(status_code=400, headers=headers)))
                writer.write(conn.send(h11.Data(data=body)))
        except (TimeoutError, ConnectionError):
            pass
        finally:
            writer.close()

    async def _next_event(
        self, conn: h11.Connection, reader: asyncio.StreamReader
    ) -> h11.Event | type[h11.NEED_DATA] | type[h11.PAUSED]:
        while True:
            event = conn.next_event()
            if event is not h11.NEED_DATA:
                return event
            async with asyncio.timeout(READ_TIMEOUT):
                data = await reader.read(65536)
            conn.receive_data(data)
