"""Real HTTP/1.1 servers for the HTTP-mode tests, built on h11 over asyncio streams.

Each `Upstream` records the requests it received (method, target, headers, body digest) and
answers according to the path, so tests can tell which server got which request:
- `/delay/<ms>`: answer after a delay (makes later pipelined responses arrive first);
- `/chunked/<n>`: a chunked response of n bytes;
- `/bytes/<n>`: a Content-Length response of n bytes (generated while sending);
- `/upload`: read the body and answer its size and sha256;
- `/close`: answer with `Connection: close`;
- `/head` works with HEAD; anything else answers `<name> <method> <target>`.
"""

from __future__ import annotations

import asyncio
import hashlib
from dataclasses import dataclass, field

import h11

CHUNK = 256 * 1024
PATTERN = bytes(range(256)) * (CHUNK // 256)


@dataclass
class Seen:
    method: str
    target: str
    headers: list[tuple[bytes, bytes]]
    body_size: int
    body_sha256: str


@dataclass
class Upstream:
    name: str
    seen: list[Seen] = field(default_factory=list)
    raw: bytearray = field(default_factory=bytearray)  # every byte received, in arrival order
    connections: int = 0
    server: asyncio.Server | None = None
    port: int = 0

    async def start(self) -> Upstream:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    def close(self) -> None:
        if self.server is not None:
            self.server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=256 * 1024)
        try:
            while True:
                event = await self._next(conn, reader)
                if isinstance(event, h11.ConnectionClosed) or event is h11.PAUSED:
                    break
                if not isinstance(event, h11.Request):
                    break
                if conn.they_are_waiting_for_100_continue:
                    writer.write(conn.send(h11.InformationalResponse(status_code=100, headers=[])))
                digest = hashlib.sha256()
                size = 0
                while True:
                    part = await self._next(conn, reader)
                    if isinstance(part, h11.Data):
                        digest.update(part.data)
                        size += len(part.data)
                    elif isinstance(part, h11.EndOfMessage):
                        break
                    else:
                        return
                method = event.method.decode()
                target = event.target.decode()
                self.seen.append(
                    Seen(method, target, list(event.headers.raw_items()), size, digest.hexdigest())
                )
                await self._respond(conn, writer, method, target, size, digest.hexdigest())
                if conn.our_state is h11.MUST_CLOSE or conn.their_state is h11.MUST_CLOSE:
                    break
                conn.start_next_cycle()
        except (ConnectionError, h11.ProtocolError):
            pass
        finally:
            writer.close()

    async def _next(self, conn: h11.Connection, reader: asyncio.StreamReader) -> object:
        while True:
            event = conn.next_event()
            if event is not h11.NEED_DATA:
                return event
            data = await reader.read(CHUNK)
            self.raw += data
            conn.receive_data(data)

    async def _respond(
        self,
        conn: h11.Connection,
        writer: asyncio.StreamWriter,
        method: str,
        target: str,
        size: int,
        sha: str,
    ) -> None:
        parts = target.strip("/").split("/")
        headers = [("x-served-by", self.name)]
        if parts[0] == "delay":
            await asyncio.sleep(int(parts[1]) / 1000)
        if parts[0] == "chunked":
            total = int(parts[1])
            writer.write(
                conn.send(
                    h11.Response(
                        status_code=200, headers=[*headers, ("transfer-encoding", "chunked")]
                    )
                )
            )
            await self._stream(conn, writer, total)
            return
        if parts[0] == "bytes":
            total = int(parts[1])
            writer.write(
                conn.send(
                    h11.Response(
                        status_code=200, headers=[*headers, ("content-length", str(total))]
                    )
                )
            )
            await self._stream(conn, writer, total)
            return
        body = f"{self.name} {method} {target}".encode()
        if parts[0] == "upload":
            body = f"{self.name} got {size} bytes sha256={sha}".encode()
        if parts[0] == "close":
            headers.append(("connection", "close"))
        headers.append(("content-length", str(len(body))))
        writer.write(conn.send(h11.Response(status_code=200, headers=headers)))
        if method != "HEAD":
            writer.write(conn.send(h11.Data(data=body)))
        writer.write(conn.send(h11.EndOfMessage()))
        await writer.drain()

    async def _stream(self, conn: h11.Connection, writer: asyncio.StreamWriter, total: int) -> None:
        left = total
        while left:
            piece = PATTERN[: min(left, CHUNK)]
            writer.write(conn.send(h11.Data(data=piece)))
            await writer.drain()
            left -= len(piece)
        writer.write(conn.send(h11.EndOfMessage()))
        await writer.drain()


def pattern_sha256(total: int) -> str:
    """The sha256 of what `/bytes/<n>` and `/chunked/<n>` send."""
    digest = hashlib.sha256()
    left = total
    while left:
        piece = PATTERN[: min(left, CHUNK)]
        digest.update(piece)
        left -= len(piece)
    return digest.hexdigest()
