"""An example app: a line-echo TCP server that greets with its name.

`python examples/tcp_echo.py --port 7070 [--name NAME]`. On connect it sends `hello from NAME`,
then answers each line with `NAME: <line>`, so a client sees which pod (or which developer's
process) holds the connection. The name defaults to `$POD_NAME/$CONTAINER_NAME`.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal


async def serve(name: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        writer.write(f"hello from {name}\n".encode())
        while line := await reader.readline():
            writer.write(f"{name}: ".encode() + line)
            await writer.drain()
    except ConnectionError:
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
        or "tcp-echo"
    )
    server = await asyncio.start_server(lambda r, w: serve(name, r, w), args.host, args.port)
    print(f"{name}: listening on {args.host}:{args.port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    server.close()


if __name__ == "__main__":
    asyncio.run(main())
