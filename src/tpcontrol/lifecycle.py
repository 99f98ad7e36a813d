"""How the long-running tpcontrol commands wait: until SIGTERM or SIGINT."""

from __future__ import annotations

import asyncio
import signal


async def until_signalled() -> None:
    """Return on the first SIGTERM or SIGINT (the caller then shuts down in order)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
