"""An example app: an HTTP/1.1 server that says who answered, on every port it is given.

`python examples/http_echo.py --port 8080 --port 8081 [--name NAME]`. The name defaults to
`$POD_NAME/$CONTAINER_NAME` (set from the downward API in examples/workloads.yaml), so a reply
tells which pod and container, or which developer's process, served the request:
`served by shop-5d8f-x2/web on port 8080: GET /cart (x-dev: alice)`. `/healthz` answers `ok`
for readiness probes. Keep-alive, Content-Length and chunked bodies come from h11.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
from collections.abc import Awaitable, Callable

import h11


def describe(name: str, port: int, request: h11.Request) -> bytes:
    dev = dict(request.headers).get(b"x-dev")
    who = f" (x-dev: {dev.decode(errors='replace')})" if dev else ""
    target = request.target.decode(errors="replace")
    return f"served by {name} on port {port}: {request.method.decode()} {target}{who}\n".encode()


async def next_event(conn: h11.Connection, reader: asyncio.StreamReader) -> object:
    while True:
        event = conn.next_event()
        if event is not h11.NEED_DATA:
            return event
        conn.receive_data(await reader.read(65536))


async def serve_connection(
    name: str, port: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    conn = h11.Connection(h11.SERVER)
    try:
        while isinstance(request := await next_event(conn, reader), h11.Request):
            while not isinstance(await next_event(conn, reader), h11.EndOfMessage):
                pass  # the body is not echoed
            body = b"ok\n" if request.target == b"/healthz" else describe(name, port, request)
            headers = [("content-type", "text/plain"), ("content-length", str(len(body)))]
            writer.write(conn.send(h11.Response(status_code=200, headers=headers)) or b"")
            writer.write(conn.send(h11.Data(data=body)) or b"")
            writer.write(conn.send(h11.EndOfMessage()) or b"")
            await writer.drain()
            if conn.our_state is h11.MUST_CLOSE:
                break
            conn.start_next_cycle()
    except (h11.RemoteProtocolError, ConnectionError):
        pass
    finally:
        writer.close()


def handler(
    name: str, port: int
) -> Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]:
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await serve_connection(name, port, reader, writer)

    return serve


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, action="append", required=True)
    parser.add_argument("--host", default="0.0.0.0")
    parser.add_argument("--name", default="")
    args = parser.parse_args()
    name = (
        args.name
        or "/".join(
            filter(None, [os.environ.get("POD_NAME", ""), os.environ.get("CONTAINER_NAME", "")])
        )
        or "http-echo"
    )
    servers = []
    for port in args.port:
        servers.append(await asyncio.start_server(handler(name, port), args.host, port))
        print(f"{name}: listening on {args.host}:{port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    for server in servers:
        server.close()


if __name__ == "__main__":
    asyncio.run(main())
