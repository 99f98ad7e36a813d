"""The load generators (wrk, iperf3) and the parsing of what they print."""

from __future__ import annotations

import json
import re
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from benchmarks.sidebyside.common import HOST, BenchError

_UNITS_US = {"us": 1.0, "ms": 1e3, "s": 1e6, "m": 60e6, "h": 3600e6}


def _latency_us(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m|h)", text)
    if m is None:
        raise BenchError(f"cannot parse wrk latency {text!r}")
    return float(m.group(1)) * _UNITS_US[m.group(2)]


@dataclass
class WrkResult:
    rps: float
    requests: int
    p50_us: float
    p99_us: float


def parse_wrk(out: str) -> WrkResult:
    """wrk's text output -> numbers; raises BenchError on errors or non-2xx/3xx answers."""
    errs = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if errs and any(int(x) for x in errs.groups()):
        raise BenchError(f"wrk socket errors: {errs.group(0)}")
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if bad and int(bad.group(1)):
        raise BenchError(f"wrk: {bad.group(0)}")
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    reqs = re.search(r"(\d+) requests in ", out)
    p50 = re.search(r"^\s+50%\s+(\S+)", out, re.M)
    p99 = re.search(r"^\s+99%\s+(\S+)", out, re.M)
    if not (rps and reqs and p50 and p99):
        raise BenchError(f"cannot parse wrk output: {out[-400:]!r}")
    if int(reqs.group(1)) == 0:
        raise BenchError("wrk completed 0 requests")
    return WrkResult(
        float(rps.group(1)),
        int(reqs.group(1)),
        _latency_us(p50.group(1)),
        _latency_us(p99.group(1)),
    )


VARIED_SCRIPT = Path(__file__).with_name("varied.lua")


def run_wrk(
    port: int, conns: int, duration: int, headers: Sequence[str] = (), varied: bool = False
) -> WrkResult:
    """`varied`: every request different (benchmarks/sidebyside/varied.lua)."""
    argv = ["wrk", "-t1", f"-c{conns}", f"-d{duration}s", "--latency"]
    for h in headers:
        argv += ["-H", h]
    if varied:
        argv += ["-s", str(VARIED_SCRIPT)]
    argv.append(f"http://{HOST}:{port}/")
    try:
        res = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 30)
    except subprocess.TimeoutExpired as e:
        raise BenchError(f"wrk did not finish within {duration + 30:.0f}s") from e
    if res.returncode != 0:
        raise BenchError(f"wrk exited {res.returncode}: {res.stderr.strip()[-300:]}")
    return parse_wrk(res.stdout)


def run_iperf3(port: int, nbytes: int) -> float:
    """Bulk transfer of nbytes through `port`; returns the receiver's Gbit/s."""
    timeout = 30 + nbytes / 20e6  # generous: even 160 Mbit/s finishes
    argv = [
        "iperf3",
        "-c",
        HOST,
        "-p",
        str(port),
        "-n",
        str(nbytes),
        "-J",
        "--connect-timeout",
        "5000",
    ]
    for attempt in range(4):
        try:
            res = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired as e:
            raise BenchError(f"iperf3 did not finish within {timeout:.0f}s") from e
        try:
            data = json.loads(res.stdout)
        except json.JSONDecodeError as e:
            raise BenchError(
                f"iperf3 output is not JSON: {res.stdout[-300:]!r} {res.stderr[-300:]!r}"
            ) from e
        err = data.get("error")
        if err and "busy" in str(err) and attempt < 3:
            time.sleep(1.0)  # the server is still finishing the previous test
            continue
        if err:
            raise BenchError(f"iperf3: {err}")
        end = data["end"]
        sent = int(end["sum_sent"]["bytes"])
        got = int(end["sum_received"]["bytes"])
        # Through a proxy the receiver's count stops when the test ends on the control connection,
        # while the last socket-buffers' worth (a few MB) is still in the proxy: allow 5%.
        # Byte integrity is checked separately (check_bytes) before timing.
        if sent < nbytes or got < 0.95 * sent:
            raise BenchError(
                f"iperf3 moved too little: asked {nbytes}, sent {sent}, received {got}"
            )
        return float(end["sum_received"]["bits_per_second"]) / 1e9
    raise BenchError("iperf3 server stayed busy")
