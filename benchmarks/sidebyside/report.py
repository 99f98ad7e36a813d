"""The report: medians, ratios, the markdown table and the results file."""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import platform
import statistics
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.sidebyside.common import NGINX_STREAM_MODULE
from benchmarks.sidebyside.measure import Cell, fmt_cell


def med(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


@dataclass
class Results:
    names: list[str]
    roles: dict[str, str]
    rounds: list[dict[str, dict[str, Cell]]] = field(default_factory=list)  # round -> name -> kind

    def value(self, rnd: int, name: str, metric: str) -> float | None:
        for cell in self.rounds[rnd].get(name, {}).values():
            if cell.error is None and metric in cell.values:
                return cell.values[metric]
        return None

    def invalid(self, name: str, metric: str) -> bool:
        return any(
            c.error is not None and kind == KIND_OF[metric]
            for r in self.rounds
            for kind, c in r.get(name, {}).items()
        )

    def dirty(self, name: str, metric: str) -> bool:
        return any(
            c.dirty and kind == KIND_OF[metric]
            for r in self.rounds
            for kind, c in r.get(name, {}).items()
        )

    def series(self, name: str, metric: str) -> list[float]:
        return [
            v for i in range(len(self.rounds)) if (v := self.value(i, name, metric)) is not None
        ]

    def paired(
        self, name: str, metric: str, ref: Callable[[int], float | None], op: str
    ) -> list[float]:
        out = []
        for i in range(len(self.rounds)):
            v, r = self.value(i, name, metric), ref(i)
            if v is None or r is None or (op == "/" and r == 0):
                continue
            out.append(v / r if op == "/" else v - r)
        return out

    def direct(self, metric: str) -> Callable[[int], float | None]:
        return self.of("direct", metric)

    def of(self, name: str, metric: str) -> Callable[[int], float | None]:
        return lambda i: self.value(i, name, metric)

    def best_peer(
        self, metric: str, higher_is_better: bool = True
    ) -> Callable[[int], float | None]:
        peers = [n for n in self.names if self.roles[n] == "peer"]

        def ref(i: int) -> float | None:
            vals = [v for n in peers if (v := self.value(i, n, metric)) is not None]
            if not vals:
                return None
            return max(vals) if higher_is_better else min(vals)

        return ref


KIND_OF = {
    "rps_c1": "c1",
    "p50_c1": "c1",
    "p99_c1": "c1",
    "rps_c50": "c50",
    "p99_c50": "c50",
    "cpu_100k": "c50",
    "bulk": "bulk",
}
KIND_OF.update({f"{m}_alice": f"{k}-alice" for m, k in list(KIND_OF.items()) if k != "bulk"})

COLUMNS = [
    "contender",
    "req/s c=50",
    "x direct",
    "x best peer",
    "CPU s/100k req",
    "p50 c=1 (us)",
    "added p50 vs direct (us)",
    "p99 c=1 (us)",
    "p99 c=50 (us)",
    "bulk Gbit/s",
    "x direct",
]


def fmt_num(res: Results, x: float | None, fmt: str, metric: str, name: str) -> str:
    """A table value: `invalid` if every round's cell was invalid, `*` if a noisy run was kept."""
    if res.invalid(name, metric) and x is None:
        return "invalid"
    if x is None:
        return "-"
    s = format(x, fmt)
    if res.invalid(name, metric):
        s += " (some invalid)"
    if res.dirty(name, metric):
        s += "*"
    return s


def fmt_rps(res: Results, name: str, metric: str) -> str:
    rps = med(res.series(name, metric))
    s = "-" if rps is None else f"{rps / 1000:.1f}k"
    if res.dirty(name, metric) and rps is not None:
        s += "*"
    if res.invalid(name, metric):
        s = "invalid" if rps is None else s + " (some invalid)"
    return s


def fmt_ratio(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}x"


def table_head(columns: Sequence[str]) -> list[str]:
    """A markdown table's header lines: the names, then the name column left, the rest right."""
    return ["| " + " | ".join(columns) + " |", "|---|" + "---:|" * (len(columns) - 1)]


def failed_row(name: str, columns: Sequence[str], failed: dict[str, str], skipped: set[str]) -> str:
    """The row of a contender that did not run (skipped) or failed its check, with the reason."""
    what = "skipped" if name in skipped else "failed"
    return f"| {name} | {what}: {failed[name]} |" + " |" * (len(columns) - 2)


def render_table(res: Results, skip_bulk: bool, failed: dict[str, str], skipped: set[str]) -> str:
    def num(x: float | None, fmt: str, metric: str, name: str) -> str:
        return fmt_num(res, x, fmt, metric, name)

    lines = table_head(COLUMNS)
    for name in res.names:
        if name in failed:
            lines.append(failed_row(name, COLUMNS, failed, skipped))
            continue
        is_direct = name == "direct"
        rps = med(res.series(name, "rps_c50"))
        rps_s = "-" if rps is None else f"{rps / 1000:.1f}k"
        if res.dirty(name, "rps_c50") and rps is not None:
            rps_s += "*"
        if res.invalid(name, "rps_c50"):
            rps_s = "invalid" if rps is None else rps_s + " (some invalid)"
        x_direct = med(res.paired(name, "rps_c50", res.direct("rps_c50"), "/"))
        x_peer = med(res.paired(name, "rps_c50", res.best_peer("rps_c50"), "/"))
        cpu = None if is_direct else med(res.series(name, "cpu_100k"))
        p50 = med(res.series(name, "p50_c1"))
        added = None if is_direct else med(res.paired(name, "p50_c1", res.direct("p50_c1"), "-"))
        p99_1 = med(res.series(name, "p99_c1"))
        p99_50 = med(res.series(name, "p99_c50"))
        bulk = None if skip_bulk else med(res.series(name, "bulk"))
        bulk_x = None if skip_bulk else med(res.paired(name, "bulk", res.direct("bulk"), "/"))
        row = [
            name,
            rps_s,
            "-" if x_direct is None else f"{x_direct:.2f}x",
            "-" if x_peer is None else f"{x_peer:.2f}x",
            num(cpu, ".2f", "cpu_100k", name) if not is_direct else "-",
            num(p50, ".0f", "p50_c1", name),
            "-" if added is None else f"{added:+.0f}",
            num(p99_1, ".0f", "p99_c1", name),
            num(p99_50, ".0f", "p99_c50", name),
            "-" if skip_bulk else num(bulk, ".1f", "bulk", name),
            "-" if bulk_x is None else f"{bulk_x:.2f}x",
        ]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


HTTP_COLUMNS = [
    "contender",
    "req/s c=50 (no header)",
    "x direct",
    "x haproxy",
    "req/s c=50 (alice)",
    "x haproxy",
    "CPU s/100k req (c=50, no header)",
    "p50 c=1 (us)",
    "added p50 vs direct (us)",
    "p99 c=50 (us)",
]


def render_http_table(res: Results, failed: dict[str, str], skipped: set[str]) -> str:
    cols = HTTP_COLUMNS
    lines = table_head(cols)

    for name in res.names:
        if name in failed:
            lines.append(failed_row(name, cols, failed, skipped))
            continue
        is_direct = name == "direct"
        x_direct = med(res.paired(name, "rps_c50", res.direct("rps_c50"), "/"))
        x_hap = med(res.paired(name, "rps_c50", res.of("haproxy", "rps_c50"), "/"))
        x_hap_a = med(res.paired(name, "rps_c50_alice", res.of("haproxy", "rps_c50_alice"), "/"))
        cpu = None if is_direct else med(res.series(name, "cpu_100k"))
        p50 = med(res.series(name, "p50_c1"))
        added = None if is_direct else med(res.paired(name, "p50_c1", res.direct("p50_c1"), "-"))
        p99_50 = med(res.series(name, "p99_c50"))
        row = [
            name,
            fmt_rps(res, name, "rps_c50"),
            fmt_ratio(x_direct),
            fmt_ratio(x_hap),
            fmt_rps(res, name, "rps_c50_alice"),
            fmt_ratio(x_hap_a),
            "-" if is_direct else fmt_num(res, cpu, ".2f", "cpu_100k", name),
            fmt_num(res, p50, ".0f", "p50_c1", name),
            "-" if added is None else f"{added:+.0f}",
            fmt_num(res, p99_50, ".0f", "p99_c50", name),
        ]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def http_summary(res: Results) -> list[str]:
    """Extra summary lines for http mode: the h11/httptools CPU ratio and the alice figures
    that have no column."""
    out = []
    for sfx, what in (("", "no header"), ("_alice", "x-dev: alice")):
        m = f"cpu_100k{sfx}"
        ratio = med(res.paired("tpproxy-h11", m, res.of("tpproxy", m), "/"))
        if ratio is not None:
            out.append(f"tpproxy CPU per request, h11 / httptools ({what}, c=50): {ratio:.2f}x")
        ratio = med(res.paired("tpproxy", m, res.of("tpproxy-pure", m), "/"))
        if ratio is not None:
            out.append(
                f"tpproxy CPU per request, compiled / pure hot path ({what}, c=50): {ratio:.2f}x"
            )
        ratio = med(res.paired("tpproxy", m, res.of("haproxy", m), "/"))
        if ratio is not None:
            out.append(f"tpproxy CPU per request / haproxy's ({what}, c=50): {ratio:.2f}x")
    cpus = []
    for name in res.names:
        c = med(res.series(name, "cpu_100k_alice"))
        a = med(res.paired(name, "p50_c1_alice", res.direct("p50_c1_alice"), "-"))
        if c is not None:
            cpus.append(f"{name} {c:.2f}" + ("" if a is None else f" (added p50 c=1 {a:+.0f} us)"))
    if cpus:
        out.append("with x-dev: alice, CPU s/100k req at c=50: " + ", ".join(cpus))
    varied = []
    for name in res.names:
        rps = med(res.series(name, "rps_c50_varied"))
        cpu = med(res.series(name, "cpu_100k_varied"))
        if rps is not None:
            varied.append(
                f"{name} {rps / 1e3:.1f}k req/s" + ("" if cpu is None else f", CPU {cpu:.2f}")
            )
    if varied:
        out.append(
            "varied load (wrk -s varied.lua: every request a different path, x-dev value, "
            "extra headers; 1 in 8 a POST with a body), c=50, CPU s/100k req: " + "; ".join(varied)
        )
    return out


def render_rounds(res: Results) -> str:
    lines = []
    for i, rnd in enumerate(res.rounds):
        for name, cells in rnd.items():
            for kind, cell in cells.items():
                lines.append(f"- round {i + 1} {name} {kind}: {fmt_cell(kind, cell)}")
    return "\n".join(lines)


def first_line(argv: list[str]) -> str:
    try:
        res = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"unavailable ({e})"
    text = (res.stdout.strip() or res.stderr.strip()).splitlines()
    return text[0].strip() if text else "unknown"


def pkg_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def hot_path_build() -> str:
    """What `tpproxy` runs with the benchmark's environment (no TPPROXY_* variables)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TPPROXY_")}
    code = "import tpproxy.hotpath as h; print(h.BUILD)"
    try:
        done = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unknown ({exc})"
    return done.stdout.strip() or f"unknown ({done.stderr.strip()[-200:]})"


def machine_info() -> str:
    model = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    stream = "yes" if NGINX_STREAM_MODULE.exists() else "no"
    return "\n".join(
        [
            f"- nproc: {len(os.sched_getaffinity(0))} (cpu_count {os.cpu_count()}), {model}",
            f"- kernel: {platform.release()}",
            f"- haproxy: {first_line(['haproxy', '-v'])}",
            f"- nginx: {first_line(['nginx', '-v'])} (stream module: {stream})",
            f"- wrk: {first_line(['wrk', '-v'])}",
            f"- iperf3: {first_line(['iperf3', '--version'])}",
            f"- python: {sys.version.split()[0]} ({sys.executable})",
            f"- uvloop: {pkg_version('uvloop')}, httptools: {pkg_version('httptools')}, "
            f"h11: {pkg_version('h11')}, tpproxy: {pkg_version('tpproxy')}",
            f"- tpproxy hot path: {hot_path_build()} (contenders `*-pure`: TPPROXY_PURE=1)",
        ]
    )
