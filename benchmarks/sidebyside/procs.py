"""Processes, free ports and temporary files of one benchmark run."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from benchmarks.sidebyside.common import HOST, START_TIMEOUT, BenchError


def free_port(taken: set[int]) -> int:
    """A TCP port on 127.0.0.1 nothing listens on now (and that this run has not handed out)."""
    for _ in range(100):
        with socket.socket() as s:
            s.bind((HOST, 0))
            port: int = s.getsockname()[1]
        if port not in taken:
            taken.add(port)
            return port
    raise BenchError("no free port found")


def wait_listening(
    port: int, proc: subprocess.Popen[bytes] | None, what: str, log: Path | None
) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise BenchError(f"{what} exited with {proc.returncode}: {tail(log)}")
        with socket.socket() as s:
            s.settimeout(1.0)
            if s.connect_ex((HOST, port)) == 0:
                return
        time.sleep(0.05)
    raise BenchError(
        f"{what} did not listen on {HOST}:{port} within {START_TIMEOUT:.0f}s: {tail(log)}"
    )


def one_line(text: str, n: int = 100) -> str:
    """The most telling line of an error (its last non-empty one), for a table cell."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    last = lines[-1] if lines else text
    return (last[: n - 3] + "...") if len(last) > n else last.replace("|", "/")


def tail(log: Path | None, n: int = 600) -> str:
    if log is None or not log.exists():
        return "(no log)"
    text = log.read_text(errors="replace").strip()
    return text[-n:] if text else "(empty log)"


@dataclass
class Spawned:
    name: str
    proc: subprocess.Popen[bytes]
    log: Path
    log_file: IO[bytes]


class Bench:
    """Owns the temp dir, the ports and every long-running process of one run."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.ports: set[int] = set()
        self.spawned: list[Spawned] = []

    def port(self) -> int:
        return free_port(self.ports)

    def write(self, name: str, text: str) -> Path:
        path = self.tmp / name
        path.write_text(text)
        return path

    def spawn(self, name: str, argv: Sequence[str], env: dict[str, str] | None = None) -> Spawned:
        log = self.tmp / f"{name}.log"
        log_file = open(log, "wb")  # noqa: SIM115 - closed in stop_all
        proc = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,  # its own process group: stop_all ends it with its workers
        )
        sp = Spawned(name, proc, log, log_file)
        self.spawned.append(sp)
        return sp

    def stop_all(self) -> None:
        for sp in reversed(self.spawned):
            if sp.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(sp.proc.pid, signal.SIGTERM)
        for sp in reversed(self.spawned):
            try:
                sp.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(sp.proc.pid, signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    sp.proc.wait(timeout=5)
            # Workers left behind by a master that died (same process group).
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(sp.proc.pid, signal.SIGKILL)
            sp.log_file.close()
