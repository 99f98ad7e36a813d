"""`tpcontrol intercept --docker-run -- IMAGE [ARGS]`: the local version runs as a container
(docker or podman, whichever is installed; `TPCONTROL_CONTAINER_ENGINE` chooses), with the
intercepted container's environment, its mounted files bind-mounted at their original paths,
and the intercept's local port published to the container's port. The container is stopped
and removed when the intercept ends; one that a killed client left is removed by the next run.

The environment goes to the engine as `-e NAME` with the values in the engine's own
environment, never on its command line (where `ps` would show the container's secrets).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import subprocess
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from tpcontrol.client.handover import unless_stopped
from tpcontrol.lifecycle import alive, wait_or_kill

ENGINES = ("docker", "podman")


class ContainerUnavailable(RuntimeError):
    """No container engine to run `--docker-run` with; the message says what to install."""


def container_engine() -> str:
    """The engine's executable: TPCONTROL_CONTAINER_ENGINE, else docker, else podman."""
    wanted = os.environ.get("TPCONTROL_CONTAINER_ENGINE", "")
    for name in (wanted,) if wanted else ENGINES:
        path = shutil.which(name)
        if path:
            return path
    raise ContainerUnavailable(
        f"--docker-run: {wanted or 'neither docker nor podman'} is not installed "
        "(Debian: apt-get install podman)"
    )


def stale(names: Iterable[str], alive: Callable[[int], bool]) -> list[str]:
    """The containers a killed client left: named `tpcontrol-<intercept>-<pid>` by a process
    that is gone (sans-IO: `alive` answers for a pid)."""
    found = []
    for name in names:
        prefix, _, pid = name.rpartition("-")
        ours = name.startswith("tpcontrol-") and prefix != "tpcontrol" and pid.isdigit()
        if ours and not alive(int(pid)):
            found.append(name)
    return found


def remove_stale(engine: str) -> list[str]:
    """Remove what `stale` finds among the engine's containers; returns their names."""
    listed = subprocess.run(
        [engine, "ps", "-a", "--filter", "name=^tpcontrol-", "--format", "{{.Names}}"],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    gone = stale(listed.stdout.split(), alive)
    for name in gone:
        subprocess.run([engine, "rm", "-f", name], capture_output=True, timeout=30, check=False)
    return gone


def run_argv(
    engine: str,
    name: str,
    image_and_args: Sequence[str],
    env: dict[str, str],
    root: Path | None,
    mounts: Sequence[str],
    local_port: int,
    container_port: int,
) -> list[str]:
    """The engine's command line (sans-IO: tested on its own)."""
    argv = [engine, "run", "--rm", "--name", name, "-p", f"127.0.0.1:{local_port}:{container_port}"]
    for key in sorted(env):
        argv += ["-e", key]
    if root is not None:
        for path in mounts:
            if path.startswith("/") and ":" not in path:
                argv += ["-v", f"{root}{path}:{path}"]
    return [*argv, *image_and_args]


async def run_container(
    argv: list[str], name: str, env: dict[str, str], stop: asyncio.Event
) -> int:
    """Run the container until it exits (its exit code) or `stop` is set (then it is stopped,
    130); either way it is removed."""
    engine = argv[0]
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        for old in await asyncio.to_thread(remove_stale, engine):
            print(f"  removed container {old}, left by a client that was killed", flush=True)
    proc = await asyncio.create_subprocess_exec(*argv, env={**os.environ, **env})
    waiting = asyncio.create_task(proc.wait())
    try:
        if await unless_stopped(waiting, stop):
            return waiting.result()
        await asyncio.to_thread(
            subprocess.run, [engine, "stop", "-t", "5", name], capture_output=True, timeout=30,
            check=False,
        )  # fmt: skip
        await wait_or_kill(proc, within=15)
        return 130
    finally:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            await asyncio.to_thread(
                subprocess.run, [engine, "rm", "-f", name], capture_output=True, timeout=30,
                check=False,
            )  # fmt: skip
