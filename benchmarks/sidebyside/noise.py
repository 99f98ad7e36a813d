"""Noise discipline: CPU accounting from /proc, and waiting for a quiet machine before a run."""

from __future__ import annotations

import os
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.sidebyside.common import (
    CLK_TCK,
    JITTER_TICKS,
    QUIET_CORES,
    QUIET_TIMEOUT,
    QUIET_WINDOW,
)


def _stat_fields(pid: int | str) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name (index 0 is the state)."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_bytes().decode(errors="replace")
    except OSError:
        return None
    return raw[raw.rindex(")") + 2 :].split()


def busy_ticks() -> int:
    """CPU ticks spent not idle, all CPUs (/proc/stat: user nice system irq softirq).

    steal (time the hypervisor gave to other machines) and iowait are not counted; guest time is
    already part of user.
    """
    with open("/proc/stat") as f:
        parts = f.readline().split()
    user, nice, system, _idle, _iowait, irq, softirq = (int(x) for x in parts[1:8])
    return user + nice + system + irq + softirq


def scan_procs() -> dict[int, tuple[int, int]]:
    """pid -> (ppid, utime+stime ticks) for every live process."""
    out: dict[int, tuple[int, int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        fields = _stat_fields(name)
        if fields is None or len(fields) < 13:
            continue
        out[int(name)] = (int(fields[1]), int(fields[11]) + int(fields[12]))
    return out


def family(procs: dict[int, tuple[int, int]], root: int) -> set[int]:
    """`root` and all its live descendants."""
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in procs.items():
        children.setdefault(ppid, []).append(pid)
    found: set[int] = set()
    todo = [root]
    while todo:
        pid = todo.pop()
        if pid in found:
            continue
        found.add(pid)
        todo.extend(children.get(pid, []))
    return found & (set(procs) | {root})


@dataclass(frozen=True)
class Snapshot:
    """CPU counters at one moment. `own` = this script (with the children it reaped, such as
    finished wrk and iperf3 clients) plus every live descendant (upstream, proxies, servers)."""

    t: float
    busy: int
    own: int
    procs: dict[int, tuple[int, int]]

    def ticks_of(self, root: int) -> int:
        return sum(self.procs[p][1] for p in family(self.procs, root) if p in self.procs)


def snapshot() -> Snapshot:
    t = time.monotonic()
    busy = busy_ticks()
    procs = scan_procs()
    me = os.getpid()
    fields = _stat_fields("self")
    assert fields is not None
    own = sum(int(x) for x in fields[11:15])  # utime stime cutime cstime
    own += sum(procs[p][1] for p in family(procs, me) if p != me and p in procs)
    return Snapshot(t, busy, own, procs)


def foreign_cores(a: Snapshot, b: Snapshot) -> float:
    """Cores used between a and b by processes that are not part of the benchmark.

    /proc/stat is sampled per tick while a process's utime+stime is its exact run time split by
    ticks, so the two disagree by a tick or two per CPU; JITTER_TICKS of the difference are not
    counted (it matters only for short windows such as a 256M bulk run of ~0.2 s).
    """
    wall = max(b.t - a.t, 1e-3)
    ticks = (b.busy - a.busy) - (b.own - a.own) - JITTER_TICKS
    return max(0, ticks) / CLK_TCK / wall


@dataclass
class NoiseLog:
    runs: int = 0
    discarded: int = 0
    kept_dirty: int = 0
    quiet_timeouts: int = 0
    foreign: list[float] = field(default_factory=list)


def wait_quiet(noise: NoiseLog) -> None:
    """Wait (at most QUIET_TIMEOUT) until foreign CPU over the last QUIET_WINDOW is low."""
    step = 0.25
    samples: deque[Snapshot] = deque([snapshot()])
    deadline = time.monotonic() + QUIET_TIMEOUT
    load = float("nan")
    while True:
        time.sleep(step)
        samples.append(snapshot())
        while len(samples) > 2 and samples[-1].t - samples[1].t >= QUIET_WINDOW:
            samples.popleft()
        if samples[-1].t - samples[0].t >= QUIET_WINDOW:
            load = foreign_cores(samples[0], samples[-1])
            if load < QUIET_CORES:
                return
        if time.monotonic() > deadline:
            noise.quiet_timeouts += 1
            print(
                f"    (foreign CPU still {load:.2f} cores after {QUIET_TIMEOUT:.0f}s; running anyway)"
            )
            return
