"""An example app: a gRPC server (plaintext HTTP/2) that says who answered any unary call.

`python examples/grpc_echo.py --port 50051 [--name NAME]`. Every method is served: the reply to
a call of `/pkg.Service/Method` with message `m` is the message
`served by NAME: /pkg.Service/Method m (x-dev: alice)` (the metadata shown when present), so a
gRPC client can tell whether the app or a developer's process answered. Written with h2 alone
(no grpcio, no generated code): gRPC's unary framing is a 5-byte prefix per message and
`grpc-status` in the trailers. The name defaults to `$POD_NAME/$CONTAINER_NAME`.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import struct

import h2.config
import h2.connection
import h2.events
import h2.exceptions

RESPONSE_HEADERS = [(b":status", b"200"), (b"content-type", b"application/grpc")]


def reply(name: str, headers: dict[bytes, bytes], body: bytes) -> bytes:
    message = body[5:] if len(body) >= 5 else b""
    dev = headers.get(b"x-dev")
    who = f" (x-dev: {dev.decode(errors='replace')})" if dev else ""
    path = headers.get(b":path", b"").decode(errors="replace")
    text = f"served by {name}: {path} {message.decode(errors='replace')}{who}".encode()
    return b"\x00" + struct.pack(">I", len(text)) + text


async def serve(name: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    config = h2.config.H2Configuration(client_side=False, header_encoding=None)
    conn = h2.connection.H2Connection(config)
    conn.initiate_connection()
    writer.write(conn.data_to_send())
    calls: dict[int, tuple[dict[bytes, bytes], bytearray]] = {}
    try:
        while data := await reader.read(65536):
            for event in conn.receive_data(data):
                if isinstance(event, h2.events.RequestReceived):
                    calls[event.stream_id] = (dict(event.headers or ()), bytearray())
                elif isinstance(event, h2.events.DataReceived):
                    calls[event.stream_id][1].extend(event.data or b"")
                    conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                elif isinstance(event, h2.events.StreamEnded):
                    headers, body = calls.pop(event.stream_id)
                    sid = event.stream_id
                    conn.send_headers(sid, RESPONSE_HEADERS)
                    conn.send_data(sid, reply(name, headers, bytes(body)))
                    conn.send_headers(sid, [(b"grpc-status", b"0")], end_stream=True)
                elif isinstance(event, h2.events.StreamReset):
                    calls.pop(event.stream_id, None)
            writer.write(conn.data_to_send())
            await writer.drain()
    except (h2.exceptions.ProtocolError, ConnectionError):
        pass
    finally:
        writer.close()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--host", default="0.0.0.0")
    parser.add_argument("--name", default="")
    args = parser.parse_args()
    name = (
        args.name
        or "/".join(
            filter(None, [os.environ.get("POD_NAME", ""), os.environ.get("CONTAINER_NAME", "")])
        )
        or "grpc-echo"
    )
    server = await asyncio.start_server(lambda r, w: serve(name, r, w), args.host, args.port)
    print(f"{name}: gRPC on {args.host}:{args.port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    server.close()


if __name__ == "__main__":
    asyncio.run(main())
