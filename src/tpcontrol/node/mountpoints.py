"""Mount points on the host, shared by every runner of this machine.

A container's mount path must exist before anything can be mounted on it, and most (`/etc/
traffic-agent`, `/var/run/secrets/...`) do not exist on a host. The runner creates them, empty,
and removes them when it stops; but removing a directory that is a mount point in another
runner's container would detach that container's volume (Linux detaches mounts on rmdir). So
the paths a runner created are kept in one registry for the machine, with the runners using
each, under a file lock: a path goes when its last live user does.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
from collections.abc import Iterator
from pathlib import Path

from tpcontrol.node.netns import OWNERS_DIR, live_owner

REGISTRY = ".mountpoints.json"
Registry = dict[str, dict[str, list[str]]]  # path -> {"created": [...], "users": [prefix...]}


@contextlib.contextmanager
def _registry() -> Iterator[Registry]:
    OWNERS_DIR.mkdir(parents=True, exist_ok=True)
    with (OWNERS_DIR / ".mountpoints.lock").open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        path = OWNERS_DIR / REGISTRY
        try:
            entries: Registry = json.loads(path.read_text())
        except (OSError, ValueError):
            entries = {}
        yield entries
        temporary = path.with_suffix(".tmp")
        temporary.write_text(json.dumps(entries))
        temporary.replace(path)


def claim(target: str, user: str, *, directory: bool) -> None:
    """Make `target` exist for `user` (a runner's prefix), creating what is missing."""
    with _registry() as entries:
        entry = entries.get(target)
        if entry is not None:
            if user not in entry["users"]:
                entry["users"].append(user)
            return
        path = Path(target)
        if path.exists():
            return  # the host's own: never removed
        missing = [p for p in [path, *path.parents] if not p.exists()]
        created: list[str] = []
        try:
            for item in reversed(missing):
                if item == path and not directory:
                    item.touch()
                else:
                    item.mkdir()
                created.append(str(item))
        finally:
            if created:
                entries[target] = {"created": created, "users": [user]}


def release(user: str) -> list[str]:
    """`user` is done; remove what no live runner uses any more. Returns the paths removed."""
    removed: list[str] = []
    with _registry() as entries:
        for target, entry in list(entries.items()):
            users = [u for u in entry["users"] if u != user and live_owner(u) is not None]
            entry["users"] = users
            if users:
                continue
            for created in reversed(entry["created"]):
                item = Path(created)
                with contextlib.suppress(OSError):
                    item.rmdir() if item.is_dir() else item.unlink()
                    removed.append(created)
            del entries[target]
    return removed
