"""Measuring cells, with the foreign-CPU discipline."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field

from benchmarks.sidebyside.checks import load_target
from benchmarks.sidebyside.common import CLK_TCK, DIRTY_CORES, RETRIES, BenchError
from benchmarks.sidebyside.contenders import Running
from benchmarks.sidebyside.load import run_iperf3, run_wrk
from benchmarks.sidebyside.noise import NoiseLog, foreign_cores, snapshot, wait_quiet


@dataclass
class Cell:
    """One measurement kind for one contender in one round."""

    values: dict[str, float] = field(default_factory=dict)
    foreign: float = 0.0
    dirty: bool = False  # every attempt exceeded DIRTY_CORES; kept the least noisy one
    error: str | None = None


def measure(
    kind: str,
    name: str,
    run: Running,
    args: argparse.Namespace,
    noise: NoiseLog,
) -> Cell:
    best: Cell | None = None
    for attempt in range(RETRIES + 1):
        wait_quiet(noise)
        a = snapshot()
        cell = Cell()
        requests = 0
        base, _, variant = kind.partition("-")  # "c50-alice" -> "c50", "alice"
        sfx = f"_{variant}" if variant else ""
        try:
            if kind == "bulk":
                cell.values["bulk"] = run_iperf3(run.ports.bulk, args.bulk_bytes)
            else:
                conns = 1 if base == "c1" else 50
                port, headers = (
                    load_target(run, variant == "alice")
                    if args.mode == "http"
                    else (run.ports.http, [])
                )
                w = run_wrk(port, conns, args.duration, headers, varied=variant == "varied")
                requests = w.requests
                if conns == 1:
                    cell.values.update(
                        {f"rps_c1{sfx}": w.rps, f"p50_c1{sfx}": w.p50_us, f"p99_c1{sfx}": w.p99_us}
                    )
                else:
                    cell.values.update({f"rps_c50{sfx}": w.rps, f"p99_c50{sfx}": w.p99_us})
        except BenchError as e:
            cell.error = str(e)
            return cell  # a correctness failure is not noise: no retry
        b = snapshot()
        if base == "c50" and run.pid is not None:
            proxy_s = (b.ticks_of(run.pid) - a.ticks_of(run.pid)) / CLK_TCK
            cell.values[f"cpu_100k{sfx}"] = proxy_s / requests * 1e5
        cell.foreign = foreign_cores(a, b)
        noise.runs += 1
        noise.foreign.append(cell.foreign)
        if cell.foreign <= DIRTY_CORES:
            return cell
        noise.discarded += 1
        print(
            f"    discarded {name} {kind}: foreign CPU {cell.foreign:.2f} cores (attempt {attempt + 1})"
        )
        if best is None or cell.foreign < best.foreign:
            best = cell
    assert best is not None
    best.dirty = True
    noise.discarded -= 1  # the one we keep is reported as dirty instead
    noise.kept_dirty += 1
    return best


def fmt_cell(kind: str, cell: Cell) -> str:
    if cell.error:
        return f"INVALID ({cell.error})"
    v = cell.values
    base, _, variant = kind.partition("-")
    x = f"_{variant}" if variant else ""
    if kind == "bulk":
        s = f"{v['bulk']:.2f} Gbit/s"
    elif base == "c1":
        s = f"{v['rps_c1' + x]:.0f} req/s p50 {v['p50_c1' + x]:.0f}us p99 {v['p99_c1' + x]:.0f}us"
    else:
        s = f"{v['rps_c50' + x]:.0f} req/s p99 {v['p99_c50' + x]:.0f}us"
        if "cpu_100k" + x in v:
            s += f" cpu {v['cpu_100k' + x]:.2f}s/100k"
    return s + f" (foreign {cell.foreign:.2f} cores{', DIRTY' if cell.dirty else ''})"
