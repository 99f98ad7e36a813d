"""The developer's mount of the intercepted container's files: sshfs (FUSE) over the intercept's
tunnel, at a local directory that `TELEPRESENCE_ROOT` names.

sshfs connects to a loopback port of this process; each connection becomes a mount stream
through the manager (`tpproxy.tunnel`, purpose `mount`), which the manager pairs with a stream
the agent parked for this intercept and joins to the agent's SSH server (`tpproxy.mounts`). The
mount ends with the intercept: on leave, Ctrl-C, the command's end or the intercept's loss. A
client that was killed leaves a dead FUSE mount behind; the next run finds it in its registry
(one file per mount, with the pid that made it) and unmounts it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

from tpcontrol.lifecycle import alive, child_options, wait_or_kill
from tpproxy.forward import ClientRelay
from tpproxy.stats import TrafficStats
from tpproxy.targets import ConnectorTarget
from tpproxy.tunnel import Hello, tunnel_connector

log = logging.getLogger("tpcontrol.client.mount")

MOUNT_WAIT = 20.0  # seconds for sshfs to have the directory mounted
REGISTRY = (
    Path(os.environ.get("XDG_RUNTIME_DIR") or Path.home() / ".cache") / "tpcontrol" / "mounts"
)


class MountUnavailable(RuntimeError):
    """No mount on this machine (sshfs or FUSE missing, or it failed); the message says what to
    do. The intercept goes on without the mount."""


def mounted(path: Path) -> bool:
    """Whether `path` is a mount point now (read from /proc/mounts, which a dead FUSE mount
    stays in until it is unmounted)."""
    try:
        want = str(path.resolve())
    except OSError:  # a dead FUSE mount answers ENOTCONN to everything
        want = str(path)
    try:
        lines = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return False
    return any(line.split(" ")[1].replace("\\040", " ") == want for line in lines if " " in line)


def unmount(path: Path) -> None:
    """Unmount a FUSE mount, lazily if it is busy or its sshfs is gone."""
    for argv in (["fusermount3", "-u", str(path)], ["fusermount3", "-uz", str(path)],
                 ["umount", "-l", str(path)]):  # fmt: skip
        if not mounted(path):
            return
        if shutil.which(argv[0]):
            subprocess.run(argv, capture_output=True, timeout=10, check=False)


def clean_stale(registry: Path = REGISTRY) -> list[Path]:
    """Unmount what killed clients left mounted (their pid is gone); returns those paths."""
    cleaned = []
    for record in registry.glob("*.json") if registry.is_dir() else []:
        try:
            data = json.loads(record.read_text())
            pid, path, made = int(data["pid"]), Path(data["path"]), bool(data.get("made"))
        except (OSError, ValueError, KeyError, TypeError):
            record.unlink(missing_ok=True)
            continue
        if alive(pid):
            continue
        unmount(path)
        if made:
            with contextlib.suppress(OSError):
                path.rmdir()
        record.unlink(missing_ok=True)
        cleaned.append(path)
    return cleaned


class SshfsMount:
    """One intercept's mount: a loopback port for sshfs, the sshfs process, the directory."""

    def __init__(
        self,
        manager: tuple[str, int],
        hello: Callable[[], Hello],
        where: str = "",
        registry: Path = REGISTRY,
    ) -> None:
        self.manager = manager
        self.hello = hello
        self.where = where
        self.registry = registry
        self.path: Path | None = None
        self.made = False
        self.proc: asyncio.subprocess.Process | None = None
        self.server: asyncio.Server | None = None
        self.record: Path | None = None
        self.stats = TrafficStats(0, "mount", "tunnel")
        self.watcher: asyncio.Task[None] | None = None
        self.stopping = False

    async def start(self) -> Path:
        """Mount, and return the directory; MountUnavailable says why not. Cancelled, it
        leaves nothing behind."""
        try:
            return await self._start()
        except asyncio.CancelledError:
            await asyncio.shield(self.stop())
            raise

    async def _start(self) -> Path:
        path = await asyncio.to_thread(self._prepare)
        target = ConnectorTarget(
            "mount", tunnel_connector(self.manager[0], self.manager[1], self.hello)
        )
        opened: set[ClientRelay] = set()

        def relay() -> ClientRelay:
            return ClientRelay(lambda: (target, self.stats), opened.add, opened.discard, 10.0)

        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(relay, "127.0.0.1", 0)
        port = self.server.sockets[0].getsockname()[1]
        argv = [
            "sshfs", "-f", "-p", str(port),
            "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
            "-o", "BatchMode=yes", "-o", "LogLevel=ERROR", "-o", "ServerAliveInterval=15",
            "-o", "follow_symlinks", "-o", "noauto_cache",
            "developer@127.0.0.1:/", str(path),
        ]  # fmt: skip
        self.proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
            **child_options(),  # type: ignore[arg-type]
        )
        try:
            async with asyncio.timeout(MOUNT_WAIT):
                while not await asyncio.to_thread(mounted, path):
                    if self.proc.returncode is not None:
                        break
                    await asyncio.sleep(0.05)
        except TimeoutError:
            pass
        if not await asyncio.to_thread(mounted, path):
            said = b""
            if self.proc.returncode is not None and self.proc.stderr is not None:
                said = await self.proc.stderr.read()
            await self.stop()
            reason = (
                said.decode(errors="replace").strip()[-300:] or f"not mounted in {MOUNT_WAIT:.0f} s"
            )
            raise MountUnavailable(f"sshfs could not mount the container's files: {reason}")
        self.watcher = asyncio.create_task(self._watch(self.proc, path))
        return path

    async def _watch(self, proc: asyncio.subprocess.Process, path: Path) -> None:
        """sshfs ends by itself when its stream breaks (the pod was deleted, the agent
        restarted): its dead mount is removed at once rather than left for the next run."""
        said = await proc.stderr.read() if proc.stderr is not None else b""
        await proc.wait()
        if not self.stopping:
            await asyncio.to_thread(unmount, path)
            reason = said.decode(errors="replace").strip()[-200:] or f"exit {proc.returncode}"
            print(f"tpcontrol: the mount at {path} ended ({reason}); unmounted", flush=True)

    def _prepare(self) -> Path:
        """What start needs before sshfs: sshfs and FUSE present, stale mounts gone, the
        directory made and registered (so that a killed client's mount is found again)."""
        if shutil.which("sshfs") is None:
            raise MountUnavailable(
                "sshfs is not installed (Debian and Ubuntu: apt-get install sshfs)"
            )
        if not Path("/dev/fuse").exists():
            raise MountUnavailable("no /dev/fuse: FUSE is not available on this machine")
        clean_stale(self.registry)
        if self.where:
            self.path = Path(self.where).absolute()
            self.path.mkdir(parents=True, exist_ok=True)
            if mounted(self.path):
                raise MountUnavailable(f"{self.path} is a mount point already")
        else:
            self.path, self.made = Path(tempfile.mkdtemp(prefix="tpcontrol-mount-")), True
        self._register()
        return self.path

    def _register(self) -> None:
        assert self.path is not None
        self.registry.mkdir(parents=True, exist_ok=True)
        self.record = self.registry / f"{os.getpid()}-{self.path.name}.json"
        self.record.write_text(
            json.dumps({"pid": os.getpid(), "path": str(self.path), "made": self.made})
        )

    async def stop(self) -> None:
        """Unmount, end sshfs, remove the directory this made; safe to call twice."""
        self.stopping = True
        if self.path is not None:
            await asyncio.to_thread(unmount, self.path)
        proc, self.proc = self.proc, None
        if proc is not None and proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.terminate()
            await wait_or_kill(proc, within=5)
        if self.watcher is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self.watcher
            self.watcher = None
        if self.server is not None:
            self.server.close()
            self.server = None
        if self.path is not None and self.made:
            with contextlib.suppress(OSError):
                self.path.rmdir()
        if self.record is not None:
            self.record.unlink(missing_ok=True)
            self.record = None
