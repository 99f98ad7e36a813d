"""How the long-running tpcontrol commands wait (until SIGTERM or SIGINT), and how the helper
processes they start end with them."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import signal
import sys
from collections.abc import Callable

PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """In the child, before exec: SIGKILL when the parent dies, however it dies."""
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def child_options() -> dict[str, object]:
    """`subprocess`/`asyncio` options for a helper process (kubectl port-forward, a demo's
    local app) that must not outlive this one and must not get the terminal's Ctrl-C at the
    same moment as this one: its own session, and on Linux a parent-death signal (set by the
    thread that forks: the event loop's, which lives as long as the process)."""
    options: dict[str, object] = {"start_new_session": True}
    if sys.platform == "linux":
        options["preexec_fn"] = _die_with_parent
    return options


def cancel_on_sigterm(task: asyncio.Task[object] | None = None) -> Callable[[], object]:
    """SIGTERM cancels `task` (default: the current one) as Ctrl-C does, so that its clean-up
    runs; returns the function that removes the handler again."""
    loop = asyncio.get_running_loop()
    target = task or asyncio.current_task()
    assert target is not None
    loop.add_signal_handler(signal.SIGTERM, target.cancel)
    return lambda: loop.remove_signal_handler(signal.SIGTERM)


def signalled() -> asyncio.Event:
    """An event that the first SIGTERM or SIGINT sets, from now on (instead of Ctrl-C raising
    KeyboardInterrupt wherever the program happens to be)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    return stop


async def until_signalled() -> None:
    """Return on the first SIGTERM or SIGINT (the caller then shuts down in order)."""
    await signalled().wait()


async def wait_or_kill(proc: asyncio.subprocess.Process, within: float) -> None:
    """Wait for a helper process that was asked to end; SIGKILL it after `within` seconds."""
    try:
        async with asyncio.timeout(within):
            await proc.wait()
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()


def alive(pid: int) -> bool:
    """Whether a process of that pid exists (one of another user's counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
