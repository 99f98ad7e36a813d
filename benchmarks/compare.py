"""Side-by-side comparison of tpproxy with haproxy and nginx in front of the same upstreams.

`--mode tcp` (default): blind TCP forwarding; tpproxy vs haproxy `mode tcp` and nginx `stream`.
`--mode http`: per-request routing by the `x-dev` header; tpproxy `--mode http` (httptools, and h11
as `tpproxy-h11`) vs haproxy `mode http` with a header ACL and nginx `http` with a `map` on
`$http_x_dev`, each in front of an "app" upstream and two "developer" upstreams (alice, bob).

One run starts everything on 127.0.0.1 (free ports), checks that every contender forwards
(and, in http mode, routes) correctly, then measures round-robin, `--rounds` times:

- wrk -t1 -c1 and -t1 -c50 (`--latency`) against nginx answering `return 200 "ok"`: req/s, p50,
  p99; a run with socket errors or non-2xx/3xx responses is invalid;
- the proxy's CPU (utime+stime from /proc/PID/stat, all its processes) per 100k requests at c=50;
- iperf3 bulk transfer through the contender (receiver Gbit/s; tcp mode only);
- in http mode, the wrk runs are done twice: without the header (-> app) and with
  `x-dev: alice` (-> alice).

Before each measurement it waits (bounded) until CPU used by processes that are not part of the
benchmark stays under QUIET_CORES, measures that foreign CPU during the run, and discards and
repeats a run where it exceeded DIRTY_CORES (at most RETRIES times per cell). Medians across
rounds are printed as a markdown table and written to benchmarks/results/<mode>-<timestamp>.md.

See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import signal
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `benchmarks.sidebyside`

from benchmarks.sidebyside.checks import (
    ROUTING_PROBES,
    ROUTING_REPEATS,
    check_bytes,
    check_http,
    check_routing,
    load_target,
)
from benchmarks.sidebyside.common import (
    CHECK_BYTES,
    DIRTY_CORES,
    NGINX_STREAM_MODULE,
    RESULTS_DIR,
    RETRIES,
    SBIN_PATH,
    BenchError,
)
from benchmarks.sidebyside.contenders import MODES, Running
from benchmarks.sidebyside.load import run_wrk
from benchmarks.sidebyside.measure import fmt_cell, measure
from benchmarks.sidebyside.noise import NoiseLog
from benchmarks.sidebyside.procs import Bench, one_line
from benchmarks.sidebyside.report import (
    Results,
    http_summary,
    machine_info,
    render_http_table,
    render_rounds,
    render_table,
)
from benchmarks.sidebyside.tools import ensure_tools
from benchmarks.sidebyside.upstreams import HashSink, start_http_upstreams, start_upstream


def parse_size(text: str) -> int:
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([KMG]?)i?B?", text.strip(), re.I)
    if m is None:
        raise argparse.ArgumentTypeError(f"bad size {text!r} (e.g. 1G, 256M)")
    mult = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}[m.group(2).upper()]
    return int(float(m.group(1)) * mult)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument(
        "--mode",
        choices=sorted(MODES),
        default="tcp",
        help="tcp: blind forwarding (default); http: per-request routing by the x-dev header",
    )
    p.add_argument(
        "--duration", type=int, default=10, help="whole seconds per wrk run (default 10)"
    )
    p.add_argument(
        "--rounds", type=int, default=3, help="round-robin rounds; medians are reported (default 3)"
    )
    p.add_argument(
        "--bulk",
        default="1G",
        help="bytes per iperf3 transfer, e.g. 1G or 256M (default 1G; tcp mode only)",
    )
    p.add_argument(
        "--skip-bulk", action="store_true", help="no iperf3 bulk transfers (http mode has none)"
    )
    p.add_argument(
        "--only", default="", help="comma-separated contenders (default: all of the mode)"
    )
    args = p.parse_args(argv)
    args.bulk_bytes = parse_size(args.bulk)
    if args.mode == "http":
        args.skip_bulk = True
    known = [c.name for c in MODES[args.mode]]
    only = [x.strip() for x in args.only.split(",") if x.strip()]
    unknown = [x for x in only if x not in known]
    if unknown:
        p.error(f"unknown contender(s) {unknown}; {args.mode} mode has {known}")
    args.contenders = [c for c in MODES[args.mode] if not only or c.name in only]
    if args.rounds < 1 or args.duration <= 0:
        p.error("--rounds must be >= 1 and --duration > 0")
    return args


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)
    command = (
        shlex.join([sys.executable, *sys.argv])
        if argv is None
        else shlex.join(["compare.py", *argv])
    )
    names = [c.name for c in args.contenders]
    ensure_tools("nginx-stream" in names)
    env = {**os.environ, "PATH": SBIN_PATH}
    info = machine_info()
    print(f"# tpproxy comparison, mode {args.mode}\n\ncommand: `{command}`\n\n{info}\n", flush=True)

    failed: dict[str, str] = {}
    skipped: set[str] = set()
    notes: list[str] = []
    res = Results(names, {c.name: c.role for c in args.contenders})
    noise = NoiseLog()
    after_failed: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="tpproxy-bench-") as tmp_name:
        bench = Bench(Path(tmp_name))
        sink: HashSink | None = None
        http_mode = args.mode == "http"
        try:
            if http_mode:
                up = start_http_upstreams(bench, env)
            else:
                up, sink = start_upstream(bench, env)
            running: dict[str, Running] = {}
            for c in args.contenders:
                try:
                    run = c.start(bench, up, env)
                    if http_mode:
                        check_routing(run, up)
                        for alice in (False, True):  # warm-ups, must also be error-free
                            port, headers = load_target(run, alice)
                            run_wrk(port, 50, 1, headers)
                        run_wrk(run.ports.http, 50, 1, varied=True)
                    else:
                        check_http(run.ports.http)
                        check_bytes(run.ports.check)
                        run_wrk(run.ports.http, 50, 1)  # warm-up, must also be error-free
                except BenchError as e:
                    if c.name == "nginx-stream" and not NGINX_STREAM_MODULE.exists():
                        notes.append(f"nginx-stream skipped: {one_line(str(e), 300)}")
                        skipped.add(c.name)
                    else:
                        notes.append(
                            f"{c.name} failed to start or its correctness check: {one_line(str(e), 300)}"
                        )
                    failed[c.name] = one_line(str(e))
                    print(f"!! {notes[-1]}", flush=True)
                    continue
                running[c.name] = run
                if http_mode:
                    print(
                        f"ok: {c.name} routes correctly ({ROUTING_REPEATS * len(ROUTING_PROBES)} "
                        "mixed requests on one keep-alive connection, warm-ups)"
                        if run.routes
                        else f"ok: {c.name} answers app/alice/bob on their own ports, warm-ups",
                        flush=True,
                    )
                else:
                    print(
                        f"ok: {c.name} forwards correctly (HTTP keep-alive, {CHECK_BYTES >> 20} MiB checksum, warm-up)",
                        flush=True,
                    )

            if http_mode:
                kinds = ["c1", "c50", "c1-alice", "c50-alice", "c50-varied"]
            else:
                kinds = ["c1", "c50"] + ([] if args.skip_bulk else ["bulk"])
            order = [n for n in names if n in running]
            width = max(len(k) for k in kinds)
            for rnd in range(args.rounds):
                rot = rnd % max(len(order), 1)
                this_order = order[rot:] + order[:rot]
                res.rounds.append({n: {} for n in order})
                print(f"round {rnd + 1}/{args.rounds}: {', '.join(this_order)}", flush=True)
                for kind in kinds:
                    for name in this_order:
                        cell = measure(kind, name, running[name], args, noise)
                        res.rounds[-1][name][kind] = cell
                        print(f"  {name:<13} {kind:<{width}} {fmt_cell(kind, cell)}", flush=True)
            if http_mode:  # still routing correctly after all that load?
                for name, run in running.items():
                    try:
                        check_routing(run, up)
                    except BenchError as e:
                        after_failed[name] = one_line(str(e), 300)
                        notes.append(
                            f"{name} failed the routing check AFTER the timed runs: "
                            f"{after_failed[name]}"
                        )
                        print(f"!! {notes[-1]}", flush=True)
                if running and not after_failed:
                    notes.append(
                        f"routing re-checked after the timed runs: {', '.join(running)} all correct"
                    )
        finally:
            if sink is not None:
                sink.close()
            bench.stop_all()

    if args.mode == "http":
        table = render_http_table(res, failed, skipped)
    else:
        table = render_table(res, args.skip_bulk, failed, skipped)
    any_invalid = any(c.error for r in res.rounds for cells in r.values() for c in cells.values())
    fmax = max(noise.foreign, default=0.0)
    if args.mode == "http":
        load = "no bulk in http mode; each wrk run done without the header (-> app) and with x-dev: alice"
    else:
        load = "bulk " + (
            "skipped" if args.skip_bulk else f"{args.bulk} ({args.bulk_bytes} bytes) per iperf3 run"
        )
    summary = [
        f"rounds {args.rounds}, wrk {args.duration:g}s per run, {load}"
        + "; medians across rounds, ratios are per-round ratios then median.",
        f"foreign CPU: {noise.runs} timed runs, {noise.discarded} discarded (> {DIRTY_CORES} cores) and repeated, "
        f"{noise.kept_dirty} kept after {RETRIES} retries still noisy (marked *), "
        f"{noise.quiet_timeouts} quiet-waits timed out; max foreign {fmax:.2f} cores.",
        *(http_summary(res) if args.mode == "http" else []),
        *notes,
    ]
    if any_invalid:
        summary.append(
            "INVALID cells (wrk errors / non-2xx / iperf3 failure) are listed below; exit status 1."
        )
    report = (
        f"# tpproxy comparison, mode {args.mode}\n\n"
        f"command: `{command}`\n\n{info}\n\n{table}\n\n"
        + "\n".join(f"- {s}" for s in summary)
        + f"\n\n## Per-round measurements\n\n{render_rounds(res)}\n"
    )
    print("\n" + table + "\n\n" + "\n".join(f"- {s}" for s in summary))
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    out = RESULTS_DIR / f"{args.mode}-{time.strftime('%Y%m%d-%H%M%S')}.md"
    out.write_text(report)
    print(f"\nwritten to {out}")
    return 1 if any_invalid or after_failed or failed.keys() - skipped else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BenchError as e:
        print(f"compare.py: {e}", file=sys.stderr)
        sys.exit(2)
