"""What the developer's machine gets once an intercept is ACTIVE: the container's files
mounted, then the COMMAND (or, with --docker-run, the container) run with the environment, and
a signal to the client passed on to it. The intercept command's own flow is
`tpcontrol.client.intercept`; this is its local end, kept apart so that each reads in one go.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import Callable, Sequence
from typing import TypeVar

from tpcontrol.client.mount import MountUnavailable, SshfsMount
from tpcontrol.lifecycle import wait_or_kill
from tpproxy.tunnel import Hello

T = TypeVar("T")


async def unless_stopped(task: asyncio.Task[T], stop: asyncio.Event) -> bool:
    """Wait for `task` unless `stop` comes first: then cancel it (it cleans up after itself)
    and return False."""
    stopping = asyncio.create_task(stop.wait())
    try:
        await asyncio.wait({task, stopping}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopping.cancel()
    if task.done():
        return True
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    return False


async def run_command(command: Sequence[str], env: dict[str, str], stop: asyncio.Event) -> int:
    """The command's exit code; a signal to this process is passed on to it (as SIGINT), and
    it gets 10 s to end before it is killed."""
    proc = await asyncio.create_subprocess_exec(*command, env={**os.environ, **env})
    waiting = asyncio.create_task(proc.wait())
    if await unless_stopped(waiting, stop):
        return waiting.result()
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(signal.SIGINT)
    await wait_or_kill(proc, within=10)
    return 130


async def mount_files(
    tunnel: tuple[str, int], hello: Callable[[], Hello], where: str, *, served: bool
) -> SshfsMount | None:
    """The container's files at `where` (a fresh directory when empty), unless `--mount=false`
    or the agent serves none; a mount that cannot be made is one line, and the intercept goes
    on without it."""
    if where.lower() == "false":
        return None
    if not served:
        print("  the agent exports no files for this container: no mount", flush=True)
        return None
    mount = SshfsMount(tunnel, hello, where)
    try:
        path = await mount.start()
    except MountUnavailable as exc:
        print(f"tpcontrol: mounts: {exc}; the intercept goes on without them", file=sys.stderr,
              flush=True)  # fmt: skip
        return None
    print(f"  the container's files are mounted at {path} (TELEPRESENCE_ROOT)", flush=True)
    return mount
