"""What kubelet 1.20 and containerd 1.6 write outside the cluster's own places, and undoing it.

Some paths and settings are hard-coded in them and shared by every kubelet on a machine:
kubelet sets six kernel tunables at start (`setupKernelTunables`: a kernel oops would then
reboot the host after 10 s), keeps `/var/lib/kubelet/device-plugins`, writes pod logs under
`/var/log/pods` (with symlinks in `/var/log/containers`); containerd puts its shims' sockets in
`/run/containerd/s` and libcni caches results in `/var/lib/cni/results`. This module saves the
tunables before the first cluster starts and puts them back when the last one stops, and removes
exactly the files of one cluster's pods and sandboxes, found from the cluster's own state.
Cross-cluster decisions ("am I the last one?") are taken under one machine-wide lock.

Two clusters of different names can run at once, but each kubelet's log clean-up treats the
other's pods as deleted and removes their `/var/log/pods` directories (`kubectl logs` then fails
for them): a limit of running more than one kubelet per machine.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path

LOCKS = Path("/run/tpcontrol-cluster")
MACHINE_LOCK = LOCKS / "machine.lock"
SAVED_STATE = LOCKS / "machine-before.json"
SHIM_SOCKETS = Path("/run/containerd/s")
CNI_RESULTS = Path("/var/lib/cni/results")
POD_LOGS = Path("/var/log/pods")
CONTAINER_LOGS = Path("/var/log/containers")
SHARED_FOLDERS = (  # made by kubelet or containerd when missing, whatever their settings say
    Path("/var/lib/kubelet"),
    Path("/run/containerd"),
    Path("/var/lib/cni"),
    POD_LOGS,
    CONTAINER_LOGS,
)
PROC_SYS = Path("/proc/sys")
TUNABLES = (  # what kubelet 1.20 writes (pkg/kubelet/cm/container_manager_linux.go)
    "vm/overcommit_memory",
    "vm/panic_on_oom",
    "kernel/panic",
    "kernel/panic_on_oops",
    "kernel/keys/root_maxkeys",
    "kernel/keys/root_maxbytes",
)


@contextlib.contextmanager
def flocked(
    path: Path, within: float, poll: float = 0.05, waiting: Callable[[], None] | None = None
) -> Iterator[None]:
    """`path` locked exclusively (flock) for the block; `waiting` is told once if another
    process holds it; TimeoutError if it is still held after `within` seconds."""
    deadline = time.monotonic() + within
    with path.open("a+") as lock:
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if waiting is not None:
                    waiting()
                    waiting = None
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{path} held for over {within:.0f} s") from None
                time.sleep(poll)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


@contextlib.contextmanager
def machine_locked(within: float = 60) -> Iterator[None]:
    """The machine-wide lock, for decisions that depend on which clusters run."""
    LOCKS.mkdir(parents=True, exist_ok=True)
    with flocked(MACHINE_LOCK, within):
        yield


def lock_held(path: Path) -> bool:
    """Whether some process holds `path` locked (a cluster of that name runs). Only asked under
    the machine lock, where no starter is taking a name lock meanwhile."""
    try:
        probe = open(path)  # noqa: SIM115 (closed below, whatever happens)
    except OSError:
        return False
    with probe:
        try:
            fcntl.flock(probe, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(probe, fcntl.LOCK_UN)
        return False


def clusters_running(except_name: str) -> list[str]:
    """The names of the other clusters that run now."""
    return sorted(
        lock.stem for lock in LOCKS.glob("*.lock")
        if lock != MACHINE_LOCK and lock.stem != except_name and lock_held(lock)
    )  # fmt: skip


def save_machine() -> None:
    """Before the first kubelet of the machine starts: the tunables it is about to change, and
    which of the shared folders do not exist yet (so the last cluster removes them again)."""
    if SAVED_STATE.exists():
        return  # another cluster's kubelet runs, or a killed one's values are still saved
    tunables = {}
    for name in TUNABLES:
        with contextlib.suppress(OSError):
            tunables[name] = (PROC_SYS / name).read_text().strip()
    made = [str(p) for p in SHARED_FOLDERS if not p.exists()]
    tmp = SAVED_STATE.with_suffix(".tmp")
    tmp.write_text(json.dumps({"tunables": tunables, "made": made}))
    tmp.replace(SAVED_STATE)


def restore_machine() -> list[str]:
    """After the last cluster of the machine stopped: the tunables as they were, and the shared
    folders that a cluster made removed again if nothing but empty folders is left in them."""
    if not SAVED_STATE.exists():
        return []
    try:
        saved = json.loads(SAVED_STATE.read_text())
    except ValueError:
        saved = {}
    done = []
    for name, value in (saved.get("tunables") or {}).items():
        path = PROC_SYS / name
        with contextlib.suppress(OSError):
            if path.read_text().strip() != value:
                path.write_text(value)
                done.append(f"restored {name.replace('/', '.')}={value}")
    for folder in map(Path, saved.get("made") or []):
        plugins = folder / "device-plugins"  # what kubelet itself leaves in /var/lib/kubelet
        for name in ("kubelet.sock", "DEPRECATION", "kubelet_internal_checkpoint"):
            with contextlib.suppress(OSError):
                (plugins / name).unlink()
        if _remove_empty(folder):
            done.append(f"removed {folder}")
    SAVED_STATE.unlink(missing_ok=True)
    return done


def _remove_empty(top: Path) -> bool:
    """rmdir `top` and the folders under it, deepest first; never a file. True if it is gone."""
    if not top.is_dir() or top.is_symlink():
        return False
    for folder in sorted((p for p in top.rglob("*") if p.is_dir() and not p.is_symlink()),
                         key=lambda p: -len(p.parts)):  # fmt: skip
        with contextlib.suppress(OSError):
            folder.rmdir()
    with contextlib.suppress(OSError):
        top.rmdir()
    return not top.exists()


def remove_pod_traces(containerd_socket: Path, task_state: Path, kubelet_root: Path) -> int:
    """The shims' sockets, CNI results and pod logs of one cluster's containers and pods, found
    from its containerd's task state and its kubelet's pod directories; returns how many."""
    removed = 0
    ids = [p.name for p in task_state.glob("*") if p.is_dir()] if task_state.is_dir() else []
    for ident in ids:
        digest = hashlib.sha256(os.path.join(containerd_socket, "k8s.io", ident).encode())
        socket = SHIM_SOCKETS / digest.hexdigest()
        if socket.exists() or socket.is_symlink():
            socket.unlink(missing_ok=True)
            removed += 1
        for result in CNI_RESULTS.glob(f"*-{ident}-*") if CNI_RESULTS.is_dir() else []:
            result.unlink(missing_ok=True)
            removed += 1
    uids = {p.name for p in (kubelet_root / "pods").glob("*")} if kubelet_root.is_dir() else set()
    for uid in uids:
        for folder in POD_LOGS.glob(f"*_{uid}") if POD_LOGS.is_dir() else []:
            shutil.rmtree(folder, ignore_errors=True)
            removed += 1
    if uids and CONTAINER_LOGS.is_dir():
        for link in CONTAINER_LOGS.iterdir():
            with contextlib.suppress(OSError):
                if link.is_symlink() and any(f"_{u}/" in os.readlink(link) for u in uids):
                    link.unlink()
                    removed += 1
    return removed
