"""Shared constants and the error type of the side-by-side benchmark (`benchmarks/compare.py`)."""

from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
RESULTS_DIR = REPO / "benchmarks" / "results"
CLK_TCK = os.sysconf("SC_CLK_TCK")
HOST = "127.0.0.1"
NGINX_STREAM_MODULE = Path("/usr/lib/nginx/modules/ngx_stream_module.so")
SBIN_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/local/sbin", "/usr/sbin", "/sbin"])

QUIET_CORES = 0.05  # wait until foreign CPU stays under this before a run
QUIET_WINDOW = 1.0  # ... measured over this many seconds
QUIET_TIMEOUT = 30.0  # ... but never wait longer than this
DIRTY_CORES = 0.10  # a run during which foreign CPU exceeded this is discarded and repeated
RETRIES = 2  # repeats per cell after a discarded run
JITTER_TICKS = 2  # accounting jitter between /proc/stat and /proc/PID/stat, see foreign_cores
START_TIMEOUT = 15.0  # for a server to start listening
CHECK_BYTES = 8 * 1024 * 1024  # checksummed transfer per contender before timing

# Tool binary -> Debian package that provides it.
TOOLS = {"haproxy": "haproxy", "nginx": "nginx", "wrk": "wrk", "iperf3": "iperf3"}
STREAM_PACKAGE = "libnginx-mod-stream"


class BenchError(RuntimeError):
    """Something the benchmark needs did not work; the message says what."""
