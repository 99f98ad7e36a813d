"""Starts one container: `python -m tpcontrol.node.launch SPEC.json` then becomes its process.

What a container runtime would do, reduced to what this node needs: a private mount namespace
(so mounts and a fresh /tmp are the container's own), the pod's network namespace, /sys showing
that namespace's interfaces, the pod's volumes bound at their mount paths, the pod's /etc/hosts,
then `execve`. When the command cannot be started, the reason is written to the spec's
`errorFile` and the exit code is 127 (not found) or 126 (not executable), which the runner turns
into a `StartError` status.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import socket
import sys
from pathlib import Path

import msgspec

CLONE_NEWNS, CLONE_NEWUTS = 0x00020000, 0x04000000
PR_SET_PDEATHSIG = 1
MS_RDONLY, MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 1, 32, 4096, 16384, 1 << 18
MNT_DETACH = 2


class Mount(msgspec.Struct, frozen=True):
    source: str
    target: str
    read_only: bool = False


class LaunchSpec(msgspec.Struct, frozen=True, rename="camel"):
    """Everything the launcher needs, written by the runner next to the pod's volumes."""

    netns: str
    argv: list[str]
    env: dict[str, str]
    error_file: str
    hosts_file: str = ""
    workdir: str = ""
    mounts: list[Mount] = []
    run_as_user: int | None = None
    run_as_group: int | None = None
    hostname: str = ""


_libc = ctypes.CDLL(None, use_errno=True)


def _check(result: int, what: str) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _mount(source: str | None, target: str, fstype: str | None, flags: int, data: str = "") -> None:
    _check(
        _libc.mount(
            source.encode() if source else None,
            target.encode(),
            fstype.encode() if fstype else None,
            ctypes.c_ulong(flags),
            data.encode() if data else None,
        ),
        f"mount {source or fstype} on {target}",
    )


def enter(spec: LaunchSpec) -> None:
    """Join the pod's network namespace in a private mount namespace and lay out the mounts."""
    # A container never outlives its runner, even one killed with SIGKILL.
    _check(_libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "prctl(PR_SET_PDEATHSIG)")
    netns = os.open(f"/run/netns/{spec.netns}", os.O_RDONLY)
    _check(_libc.unshare(CLONE_NEWNS | CLONE_NEWUTS), "unshare(CLONE_NEWNS|CLONE_NEWUTS)")
    if spec.hostname:
        socket.sethostname(spec.hostname)
    _mount(None, "/", None, MS_REC | MS_PRIVATE)
    _check(_libc.setns(netns, 0x40000000), f"setns {spec.netns}")
    os.close(netns)
    if _libc.umount2(b"/sys", MNT_DETACH) == 0:  # /sys as seen from the pod's namespace
        with contextlib.suppress(OSError):
            _mount("sysfs", "/sys", "sysfs", 0)
    _mount("tmpfs", "/tmp", "tmpfs", 0, "mode=1777")
    for mount in spec.mounts:
        if not os.path.exists(mount.target):
            if os.path.isdir(mount.source):
                os.makedirs(mount.target, exist_ok=True)  # only under the private /tmp
            else:
                Path(mount.target).parent.mkdir(parents=True, exist_ok=True)
                Path(mount.target).touch()
        _mount(mount.source, mount.target, None, MS_BIND | MS_REC)
        if mount.read_only:
            _mount(None, mount.target, None, MS_BIND | MS_REMOUNT | MS_RDONLY)
    if spec.hosts_file:
        _mount(spec.hosts_file, "/etc/hosts", None, MS_BIND)


def _fail(spec: LaunchSpec, code: int, message: str) -> int:
    Path(spec.error_file).write_text(message)
    print(f"launch: {message}", file=sys.stderr)
    return code


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    spec = msgspec.json.decode(Path(args[0]).read_bytes(), type=LaunchSpec)
    try:
        enter(spec)
    except OSError as exc:
        return _fail(spec, 128, f"cannot set up the container: {exc}")
    command = spec.argv[0] if spec.argv else ""
    if not command:
        return _fail(spec, 127, "no command: the pod gives none and the image has no entrypoint")
    path = command if "/" in command else shutil.which(command, path=spec.env.get("PATH", ""))
    if path is None or not os.path.exists(path):
        return _fail(spec, 127, f'exec: "{command}": executable file not found in $PATH')
    try:
        if spec.run_as_group is not None or spec.run_as_user is not None:
            os.setgroups([])
        if spec.run_as_group is not None:
            os.setgid(spec.run_as_group)
        if spec.run_as_user is not None:
            os.setuid(spec.run_as_user)
    except OSError as exc:
        return _fail(spec, 128, f"cannot run as the securityContext says: {exc}")
    if spec.workdir and not os.path.isdir(spec.workdir):
        return _fail(spec, 128, f"workingDir {spec.workdir!r} is not a directory in the container")
    try:
        os.chdir(spec.workdir or "/")
        _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)  # a new uid cleared it
        os.execve(path, spec.argv, spec.env)
    except OSError as exc:
        return _fail(spec, 126, f'exec: "{command}": {exc.strerror}')
    except ValueError as exc:  # e.g. a NUL byte in an argument or an env value
        return _fail(spec, 128, f'exec: "{command}": {exc}')
    return 0  # not reached: execve replaced this process


if __name__ == "__main__":
    raise SystemExit(main())
