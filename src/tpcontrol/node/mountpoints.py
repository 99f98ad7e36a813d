"""Mount points on the host, shared by every runner of this machine.

A container's mount path must exist before anything can be mounted on it, and most (`/etc/
traffic-agent`, `/var/run/secrets/...`) do not exist on a host. The runner creates them as empty
directories and removes them when no runner needs them any more; removing one that is a mount
point in another runner's container would detach that container's volume (Linux detaches mounts
on rmdir), so every directory a runner created is kept, with the runners using it, in one
registry for the machine, under a file lock. Only directories are ever created, never files,
and never in the places a pod must not reach (the runners' own state, /proc, /sys, /dev, ...).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
from collections.abc import Iterator
from pathlib import Path

from tpcontrol.node.netns import NETNS_DIR, OWNERS_DIR, live_owner

REGISTRY = ".mountpoints.json"
Registry = dict[str, list[str]]  # a directory a runner created -> the runners using it
FORBIDDEN = (Path("/proc"), Path("/sys"), Path("/dev"), Path("/boot"), NETNS_DIR, OWNERS_DIR)


class MountPointError(ValueError):
    """The mount path may not be used (or made) on this node; the message says why."""


@contextlib.contextmanager
def _registry() -> Iterator[Registry]:
    OWNERS_DIR.mkdir(parents=True, exist_ok=True)
    with (OWNERS_DIR / ".mountpoints.lock").open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        path = OWNERS_DIR / REGISTRY
        try:
            loaded = json.loads(path.read_text())
        except (OSError, ValueError):
            loaded = {}
        entries: Registry = {
            str(k): [str(u) for u in v]
            for k, v in (loaded.items() if isinstance(loaded, dict) else [])
            if isinstance(v, list)
        }
        yield entries
        temporary = path.with_suffix(".tmp")
        temporary.write_text(json.dumps(entries))
        temporary.replace(path)


def check(target: str) -> None:
    """Refuse mount paths that would reach the host's or the runners' own machinery."""
    path = Path(target)
    if path == Path("/") or any(path == f or path.is_relative_to(f) for f in FORBIDDEN):
        raise MountPointError(f"mountPath {target!r} is not allowed on this node")


def claim(target: str, user: str, *, directory: bool) -> None:
    """Make `target` exist for `user` (a runner's prefix): missing directories are created
    and registered; directories another runner created get `user` as one more user."""
    check(target)
    path = Path(target)
    with _registry() as entries:
        missing: list[Path] = []
        for item in [path, *path.parents]:  # deepest first
            key = str(item)
            if key in entries:
                if user not in entries[key]:
                    entries[key].append(user)
            elif not item.exists():
                missing.append(item)
            else:
                break  # the host's own from here up: never registered, never removed
        if missing and missing[0] == path and not directory:
            raise MountPointError(
                f"mountPath {target!r}: a file mount needs an existing file on this node"
            )
        for item in reversed(missing):  # shallowest first
            item.mkdir()
            entries[str(item)] = [user]


def release(user: str) -> list[str]:
    """`user` is done; remove the directories no live runner uses any more, deepest first.
    Returns the paths removed."""
    removed: list[str] = []
    with _registry() as entries:
        for key in sorted(entries, key=lambda k: k.count("/"), reverse=True):
            users = [u for u in entries[key] if u != user and live_owner(u) is not None]
            if users:
                entries[key] = users
                continue
            with contextlib.suppress(OSError):
                Path(key).rmdir()
                removed.append(key)
            del entries[key]
    return removed
