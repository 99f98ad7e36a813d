"""The app's files for the developer: each intercepted container's export directory (2.6's
`/tel_app_exports/<container>`) and an SSH server per container that serves it over SFTP,
confined to it.

The export directory holds a link to every entry of the container's mount point (where the
injector mounted the app's volumes in the agent container) and one per directory under
`/var/run/secrets/` that the app does not mount itself (its service-account token), as 2.6
does; the agent's own credential for the manager is never exported. The SSH servers listen on
loopback only: the only way in is a mount stream of the tunnel, which the manager pairs only for
the client that owns the intercept, so SSH itself asks for no password. Unlike 2.6's SFTP server
(the whole filesystem), a session sees only the export directory: every path it names is
resolved (links included) and refused unless it lands in the export directory or in one of the
mounts it links to. asyncssh (the `mounts` extra) is imported only when a server starts.
"""

from __future__ import annotations

import asyncio
import logging
import os
import posixpath
import shutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tpproxy.config import Container
from tpproxy.tunnel import Hello, StreamPool
from tpproxy.wire import MANAGER_TOKEN_FILE

log = logging.getLogger("tpproxy.mounts")

EXPORTS_DIR = "/tel_app_exports"
APP_MOUNTS_ROOT = "/tel_app_mounts"
SECRETS_DIR = "/var/run/secrets"
# The agent's projected token for the manager: an agent's credential, never the developer's.
PRIVATE_SECRETS = frozenset({MANAGER_TOKEN_FILE.removeprefix(SECRETS_DIR + "/").split("/")[0]})


class MountsUnavailable(RuntimeError):
    """The agent cannot serve mounts (asyncssh missing); the message says what to install."""


def mount_point(container: Container) -> str:
    """Where the injector mounted the container's volumes in the agent container."""
    return container.mount_point or f"{APP_MOUNTS_ROOT}/{container.name}"


def export_container(
    container: Container, exports: str = EXPORTS_DIR, secrets: str = SECRETS_DIR
) -> tuple[Path, tuple[str, ...]]:
    """Make `exports/<container>` afresh (a restarted container finds it again) and return it
    with the container's mounts, the exported secrets directories appended (what
    TELEPRESENCE_MOUNTS lists)."""
    root = Path(exports) / container.name
    if root.is_symlink() or root.is_file():
        root.unlink()
    elif root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    source = Path(mount_point(container))
    if source.is_dir():
        for entry in sorted(source.iterdir()):
            (root / entry.name).symlink_to(entry)
    mounts = list(container.mounts or ())
    secrets_dir = Path(secrets)
    if secrets_dir.is_dir():
        for entry in sorted(secrets_dir.iterdir()):
            path = f"{SECRETS_DIR}/{entry.name}"
            if entry.name in PRIVATE_SECRETS or not entry.is_dir() or path in mounts:
                continue
            link = root / path.lstrip("/")
            if link.exists() or link.is_symlink():
                continue  # the app's own mount of it is exported already
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(entry)
            mounts.append(path)
    return root, tuple(mounts)


@dataclass(frozen=True)
class Confinement:
    """What one export directory lets a session reach (sans-IO but for `os.path.realpath`).
    The links are read once, when the session starts: the export directory is made at the
    agent's start and not changed after."""

    root: str  # the export directory, resolved
    links: tuple[tuple[str, str], ...]  # (its path in the session, the resolved target)

    @classmethod
    def of(cls, root: Path) -> Confinement:
        real = os.path.realpath(root)
        links = tuple(
            ("/" + str(link.relative_to(real)), os.path.realpath(link))
            for link in _links(Path(real))
        )
        return cls(real, links)

    def local(self, virtual: bytes) -> bytes:
        """The local path of a session's path, or PermissionError when it would reach outside
        (a `..`, an absolute path and a link are all resolved first)."""
        text = virtual.decode("utf-8", "surrogateescape")
        normal = posixpath.normpath(posixpath.join("/", text))
        local = posixpath.join(self.root, normal.lstrip("/"))
        resolved = os.path.realpath(local)
        if not _within(resolved, self.root) and not any(
            _within(resolved, target) for _, target in self.links
        ):
            raise PermissionError(f"{normal}: outside the exported files")
        return local.encode("utf-8", "surrogateescape")

    def virtual(self, local: bytes) -> bytes:
        """The session's name for a local path (realpath and readlink answers)."""
        text = local.decode("utf-8", "surrogateescape")
        if _within(text, self.root):
            return (text[len(self.root) :] or "/").encode("utf-8", "surrogateescape")
        for inside, target in self.links:
            if _within(text, target):
                return (inside + text[len(target) :]).encode("utf-8", "surrogateescape")
        raise PermissionError("outside the exported files")


def _within(path: str, top: str) -> bool:
    return path == top or path.startswith(top + "/")


def _links(root: Path) -> Iterable[Path]:
    """The export directory's links: its top-level entries and the secrets under var/run."""
    for base in (root, root / SECRETS_DIR.lstrip("/")):
        if base.is_dir() and not (base != root and base.is_symlink()):
            for entry in base.iterdir():
                if entry.is_symlink():
                    yield entry


async def start_server(root: Path, host: str = "127.0.0.1") -> tuple[Any, int]:
    """An SSH server on `host` (any free port) whose only service is SFTP over `root`,
    confined to it; returns the server (`close()` it) and its port."""
    try:
        import asyncssh
    except ImportError:
        raise MountsUnavailable(
            "mounts need asyncssh: pip install 'tpproxy[mounts]' (the product image has it)"
        ) from None
    confinement = Confinement.of(root)

    class NoLogin(asyncssh.SSHServer):
        """No SSH authentication: the tunnel has authenticated the developer already."""

        def begin_auth(self, username: str) -> bool:
            return False

    class ConfinedSFTP(asyncssh.SFTPServer):
        """asyncssh's SFTP server on local files, every path checked by `confinement`."""

        def map_path(self, path: bytes) -> bytes:
            try:
                return confinement.local(path)
            except PermissionError as exc:
                raise asyncssh.SFTPPermissionDenied(str(exc)) from None

        def reverse_map_path(self, path: bytes) -> bytes:
            try:
                return confinement.virtual(path)
            except PermissionError as exc:
                raise asyncssh.SFTPNoSuchFile(str(exc)) from None

        def symlink(self, oldpath: bytes, newpath: bytes) -> None:
            raise asyncssh.SFTPOpUnsupported("links are not made in the exported files")

        def link(self, oldpath: bytes, newpath: bytes) -> None:
            raise asyncssh.SFTPOpUnsupported("links are not made in the exported files")

    server = await asyncssh.create_server(
        NoLogin,
        host,
        0,
        server_host_keys=[asyncssh.generate_private_key("ssh-ed25519")],
        sftp_factory=ConfinedSFTP,
        allow_scp=False,
        agent_forwarding=False,
        x11_forwarding=False,
    )
    port: int = server.sockets[0].getsockname()[1]
    return server, port


@dataclass
class Export:
    """One container's export directory, its mounts and the SSH server that serves it."""

    container: str
    root: Path
    mounts: tuple[str, ...]
    server: Any
    port: int

    def environment(self) -> dict[str, str]:
        """What 2.6 adds to an intercept's environment for its container (§5.9)."""
        env = {"TELEPRESENCE_CONTAINER": self.container}
        if self.mounts:
            env["TELEPRESENCE_MOUNTS"] = ":".join(self.mounts)
        return env


class AgentMounts:
    """The agent's exports, and the mount streams it keeps parked at the manager: a few per
    ACTIVE intercept whose container is exported, each joined to that container's SSH server
    when the owner's client opens its end."""

    def __init__(self, sidecar_containers: Iterable[Container]) -> None:
        self.containers = list(sidecar_containers)
        self.served: list[Export] = []  # one per exported container
        self.exports: dict[int, Export] = {}  # the same, by agent port
        self.pools: dict[str, StreamPool] = {}  # by intercept id

    async def start(self, exports: str = EXPORTS_DIR, secrets: str = SECRETS_DIR) -> None:
        """Export every container and serve it; nothing (and one log line) when the pod has no
        export volume, or asyncssh is missing."""
        if not os.path.isdir(exports):  # noqa: ASYNC240 (one stat, at start-up)
            log.info("no %s: the developer's mounts are not served", exports)
            return
        for container in self.containers:
            try:
                root, mounts = export_container(container, exports, secrets)
                server, port = await start_server(root)
            except MountsUnavailable as exc:
                log.warning("%s", exc)
                return
            except OSError as exc:
                log.warning("container %s: its files are not exported: %s", container.name, exc)
                continue
            export = Export(container.name, root, mounts, server, port)
            self.served.append(export)
            for icept in container.intercepts:
                self.exports[icept.agent_port] = export
            log.info("container %s: files exported at %s (%s)", container.name, root,
                     ", ".join(mounts) or "no mounts")  # fmt: skip

    def serve(
        self, wanted: dict[str, int], manager: tuple[str, int], hello: Callable[[str], Hello],
        token: Callable[[], str],
    ) -> None:  # fmt: skip
        """Keep mount streams parked for exactly the intercepts in `wanted` (id -> agent port)."""
        for intercept_id in [i for i in self.pools if i not in wanted]:
            pool = self.pools.pop(intercept_id)
            asyncio.get_running_loop().create_task(pool.close())
        for intercept_id, agent_port in wanted.items():
            export = self.exports.get(agent_port)
            if export is None or intercept_id in self.pools:
                continue
            pool = StreamPool(manager, hello(intercept_id), ("127.0.0.1", export.port), 2, token)
            pool.start()
            self.pools[intercept_id] = pool

    async def close(self) -> None:
        for pool in self.pools.values():
            await pool.close()
        self.pools.clear()
        for export in self.served:
            export.server.close()
