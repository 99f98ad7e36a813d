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
import contextlib
import hashlib
import http.client
import importlib.metadata
import json
import os
import platform
import re
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import IO

REPO = Path(__file__).resolve().parents[1]
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


# --------------------------------------------------------------------------------------------
# CPU accounting from /proc


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


# --------------------------------------------------------------------------------------------
# Processes, ports, temp files


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


# --------------------------------------------------------------------------------------------
# Upstream: nginx for HTTP, iperf3 -s for bulk, an in-process checksum sink for correctness


@dataclass(frozen=True)
class Ports:
    """Where a contender (or the upstream itself) accepts each kind of traffic.

    In http mode bulk and check are 0 (not used); the upstream's alice and bob are the two
    developer servers (0 in tcp mode, and always 0 for a contender: it routes on `http`)."""

    http: int
    bulk: int
    check: int
    alice: int = 0
    bob: int = 0


# Body each upstream server answers, so that a response says where its request went.
APP_BODY, ALICE_BODY, BOB_BODY = b"ok", b"alice", b"bob"
DEV_HEADER = "x-dev"


class HashSink:
    """Reads each connection to EOF, answers the SHA-256 hex digest of what it got, closes."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_server((HOST, port))
        self.sock.settimeout(0.5)
        self.stopping = False
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while not self.stopping:
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    @staticmethod
    def _serve(conn: socket.socket) -> None:
        with conn:
            conn.settimeout(30)
            digest = hashlib.sha256()
            try:
                while chunk := conn.recv(1 << 16):
                    digest.update(chunk)
                conn.sendall(digest.hexdigest().encode())
            except OSError:
                return

    def close(self) -> None:
        self.stopping = True
        self.sock.close()


def nginx_argv(conf: Path, prefix: Path, error_log: Path) -> list[str]:
    return ["nginx", "-c", str(conf), "-p", str(prefix), "-e", str(error_log)]


def nginx_common(bench: Bench, name: str) -> str:
    return (
        f"worker_processes 1;\n"
        f"daemon off;\n"
        f"master_process on;\n"
        f"pid {bench.tmp / name}.pid;\n"
        f"error_log {bench.tmp / name}-error.log warn;\n"
        f"worker_rlimit_nofile 65536;\n"
        f"events {{ worker_connections 16384; }}\n"
    )


def upstream_nginx_conf(bench: Bench, servers: str) -> Path:
    """The upstream nginx's config: keep-alive without limits, no logs, the given servers."""
    t = bench.tmp
    return bench.write(
        "upstream-nginx.conf",
        nginx_common(bench, "upstream")
        + "http {\n"
        + "  access_log off;\n"
        + "  keepalive_requests 100000000;\n"
        + "  keepalive_timeout 120s;\n"
        + f"  client_body_temp_path {t}/u-body; proxy_temp_path {t}/u-proxy;\n"
        + f"  fastcgi_temp_path {t}/u-fcgi; uwsgi_temp_path {t}/u-uwsgi; scgi_temp_path {t}/u-scgi;\n"
        + servers
        + "}\n",
    )


def start_upstream(bench: Bench, env: dict[str, str]) -> tuple[Ports, HashSink]:
    """tcp mode: nginx (HTTP), iperf3 -s (bulk) and the checksum sink."""
    http_port, bulk_port, check_port = bench.port(), bench.port(), bench.port()
    t = bench.tmp
    conf = upstream_nginx_conf(
        bench, f'  server {{ listen {HOST}:{http_port}; return 200 "ok"; }}\n'
    )
    sp = bench.spawn("upstream-nginx", nginx_argv(conf, t, t / "upstream-error.log"), env)
    wait_listening(http_port, sp.proc, "upstream nginx", sp.log)
    ip = bench.spawn("upstream-iperf3", ["iperf3", "-s", "-B", HOST, "-p", str(bulk_port)], env)
    wait_listening(bulk_port, ip.proc, "upstream iperf3 -s", ip.log)
    sink = HashSink(check_port)
    return Ports(http_port, bulk_port, check_port), sink


def start_http_upstreams(bench: Bench, env: dict[str, str]) -> Ports:
    """http mode: one nginx (1 worker) with three servers, the app and the developers alice and
    bob, each answering 200 with its own body. No iperf3 and no checksum sink."""
    app, alice, bob = bench.port(), bench.port(), bench.port()
    t = bench.tmp
    servers = "".join(
        f'  server {{ listen {HOST}:{port}; return 200 "{body.decode()}"; }}\n'
        for port, body in ((app, APP_BODY), (alice, ALICE_BODY), (bob, BOB_BODY))
    )
    conf = upstream_nginx_conf(bench, servers)
    sp = bench.spawn("upstream-nginx", nginx_argv(conf, t, t / "upstream-error.log"), env)
    for port in (app, alice, bob):
        wait_listening(port, sp.proc, "upstream nginx", sp.log)
    return Ports(app, 0, 0, alice, bob)


# --------------------------------------------------------------------------------------------
# Contenders


@dataclass
class Running:
    """A started contender: where to send traffic, and whose CPU is the proxy's (None: direct).

    `routes`: in http mode, whether it routes by header on ports.http (False for direct, whose
    "alice" load goes straight to the alice upstream instead)."""

    ports: Ports
    pid: int | None
    routes: bool = False


@dataclass(frozen=True)
class Contender:
    name: str
    role: str  # "baseline" (direct), "subject" (tpproxy) or "peer" (the proxies we compare with)
    start: Callable[[Bench, Ports, dict[str, str]], Running]


def start_direct(bench: Bench, up: Ports, env: dict[str, str]) -> Running:
    return Running(up, None)


def tpproxy_bin() -> Path:
    for cand in (Path(sys.executable).parent / "tpproxy", REPO / ".venv" / "bin" / "tpproxy"):
        if cand.exists():
            return cand
    found = shutil.which("tpproxy")
    if found is None:
        raise BenchError("tpproxy not found: run ./dev setup (or use the .venv's python)")
    return Path(found)


def start_tpproxy(bench: Bench, up: Ports, env: dict[str, str]) -> Running:
    front = Ports(bench.port(), bench.port(), bench.port())
    argv = [str(tpproxy_bin()), "run"]
    for mine, theirs in zip(
        (front.http, front.bulk, front.check), (up.http, up.bulk, up.check), strict=True
    ):
        argv += ["--forward", f"{mine}={HOST}:{theirs}"]
    argv += ["--listen-host", HOST, "--admin", "off", "--log-level", "warning"]
    # TPPROXY_* settings from the caller's environment must not change what is measured.
    clean = {k: v for k, v in env.items() if not k.startswith("TPPROXY_")}
    sp = bench.spawn("tpproxy", argv, clean)
    for port in (front.http, front.bulk, front.check):
        wait_listening(port, sp.proc, "tpproxy", sp.log)
    return Running(front, sp.proc.pid)


def start_haproxy(bench: Bench, up: Ports, env: dict[str, str]) -> Running:
    front = Ports(bench.port(), bench.port(), bench.port())
    sections = []
    for name, mine, theirs in (
        ("http", front.http, up.http),
        ("bulk", front.bulk, up.bulk),
        ("check", front.check, up.check),
    ):
        sections.append(
            f"frontend f_{name}\n  bind {HOST}:{mine}\n  default_backend b_{name}\n"
            f"backend b_{name}\n  server s_{name} {HOST}:{theirs}\n"
        )
    conf = bench.write(
        "haproxy.cfg",
        "global\n  nbthread 1\n  maxconn 4096\n\n"
        "defaults\n  mode tcp\n  maxconn 4096\n  timeout connect 5s\n"
        "  timeout client 60s\n  timeout server 60s\n\n" + "\n".join(sections),
    )
    check = subprocess.run(
        ["haproxy", "-c", "-f", str(conf)], capture_output=True, text=True, timeout=30, env=env
    )
    if check.returncode != 0:
        raise BenchError(f"haproxy rejects its config: {check.stdout}{check.stderr}")
    sp = bench.spawn("haproxy", ["haproxy", "-db", "-f", str(conf)], env)
    for port in (front.http, front.bulk, front.check):
        wait_listening(port, sp.proc, "haproxy", sp.log)
    return Running(front, sp.proc.pid)


def start_nginx_stream(bench: Bench, up: Ports, env: dict[str, str]) -> Running:
    if not NGINX_STREAM_MODULE.exists():
        raise BenchError(f"{NGINX_STREAM_MODULE} missing ({STREAM_PACKAGE} not installed)")
    front = Ports(bench.port(), bench.port(), bench.port())
    servers = "".join(
        f"  server {{ listen {HOST}:{mine}; proxy_pass {HOST}:{theirs}; }}\n"
        for mine, theirs in zip(
            (front.http, front.bulk, front.check), (up.http, up.bulk, up.check), strict=True
        )
    )
    conf = bench.write(
        "nginx-stream.conf",
        f"load_module {NGINX_STREAM_MODULE};\n"
        + nginx_common(bench, "nginx-stream")
        + "stream {\n  proxy_connect_timeout 5s;\n  proxy_timeout 60s;\n  proxy_half_close on;\n"
        + servers
        + "}\n",
    )
    t = bench.tmp
    sp = bench.spawn("nginx-stream", nginx_argv(conf, t, t / "nginx-stream-error.log"), env)
    for port in (front.http, front.bulk, front.check):
        wait_listening(port, sp.proc, "nginx-stream", sp.log)
    return Running(front, sp.proc.pid)


TCP_CONTENDERS = [
    Contender("direct", "baseline", start_direct),
    Contender("tpproxy", "subject", start_tpproxy),
    Contender("haproxy", "peer", start_haproxy),
    Contender("nginx-stream", "peer", start_nginx_stream),
]


# ---- http mode: route per request by the x-dev header; no header (or another value) -> app


def start_direct_http(bench: Bench, up: Ports, env: dict[str, str]) -> Running:
    return Running(up, None, routes=False)


def start_tpproxy_http(parser: str) -> Callable[[Bench, Ports, dict[str, str]], Running]:
    def start(bench: Bench, up: Ports, env: dict[str, str]) -> Running:
        name = "tpproxy" if parser == "httptools" else f"tpproxy-{parser}"
        port = bench.port()
        intercepts = bench.write(
            f"{name}-intercepts.yaml",
            "".join(
                f"- {{id: {dev}, port: {port}, mechanism: http, "
                f'target: "{HOST}:{target}", '
                f"headers: [{{name: {DEV_HEADER}, op: exact, value: {dev}}}]}}\n"
                for dev, target in (("alice", up.alice), ("bob", up.bob))
            ),
        )
        argv = [
            str(tpproxy_bin()),
            "run",
            "--forward",
            f"{port}={HOST}:{up.http}",
            "--mode",
            "http",
            "--intercepts",
            str(intercepts),
            "--http-parser",
            parser,
            "--listen-host",
            HOST,
            "--admin",
            "off",
            "--log-level",
            "warning",
        ]
        clean = {k: v for k, v in env.items() if not k.startswith("TPPROXY_")}
        sp = bench.spawn(name, argv, clean)
        wait_listening(port, sp.proc, name, sp.log)
        return Running(Ports(port, 0, 0), sp.proc.pid, routes=True)

    return start


def start_haproxy_http(bench: Bench, up: Ports, env: dict[str, str]) -> Running:
    port = bench.port()
    conf = bench.write(
        "haproxy-http.cfg",
        "global\n  nbthread 1\n  maxconn 4096\n\n"
        "defaults\n  mode http\n  maxconn 4096\n  timeout connect 5s\n"
        "  timeout client 60s\n  timeout server 60s\n  timeout http-keep-alive 60s\n"
        "  option http-keep-alive\n  http-reuse always\n\n"
        f"frontend f_http\n  bind {HOST}:{port}\n"
        f"  acl alice req.hdr({DEV_HEADER}) -m str alice\n"
        f"  acl bob req.hdr({DEV_HEADER}) -m str bob\n"
        "  use_backend b_alice if alice\n  use_backend b_bob if bob\n"
        "  default_backend b_app\n\n"
        f"backend b_app\n  server app {HOST}:{up.http}\n"
        f"backend b_alice\n  server alice {HOST}:{up.alice}\n"
        f"backend b_bob\n  server bob {HOST}:{up.bob}\n",
    )
    check = subprocess.run(
        ["haproxy", "-c", "-f", str(conf)], capture_output=True, text=True, timeout=30, env=env
    )
    if check.returncode != 0:
        raise BenchError(f"haproxy rejects its config: {check.stdout}{check.stderr}")
    sp = bench.spawn("haproxy-http", ["haproxy", "-db", "-f", str(conf)], env)
    wait_listening(port, sp.proc, "haproxy", sp.log)
    return Running(Ports(port, 0, 0), sp.proc.pid, routes=True)


def start_nginx_http(bench: Bench, up: Ports, env: dict[str, str]) -> Running:
    """nginx `http`: `map $http_x_dev` to an upstream name, upstream keepalive. Note: `map`
    compares strings case-insensitively (`x-dev: Alice` would go to alice too); the check
    only uses lower-case values, on which all contenders agree."""
    port = bench.port()
    t = bench.tmp
    upstreams = "".join(
        f"  upstream {name} {{ server {HOST}:{target}; keepalive 64; "
        "keepalive_requests 100000000; keepalive_timeout 120s; }\n"
        for name, target in (("app", up.http), ("alice", up.alice), ("bob", up.bob))
    )
    conf = bench.write(
        "nginx-http.conf",
        nginx_common(bench, "nginx-http")
        + "http {\n"
        + "  access_log off;\n"
        + "  keepalive_requests 100000000;\n"
        + "  keepalive_timeout 120s;\n"
        + f"  client_body_temp_path {t}/h-body; proxy_temp_path {t}/h-proxy;\n"
        + f"  fastcgi_temp_path {t}/h-fcgi; uwsgi_temp_path {t}/h-uwsgi; scgi_temp_path {t}/h-scgi;\n"
        # Request bodies in memory: the worker (user nobody when run as root) cannot write temp
        # files in the 0700 temp dir, and the check sends a 64 KiB body.
        + "  client_body_buffer_size 1m;\n"
        + upstreams
        + "  map $http_x_dev $dev_upstream { default app; alice alice; bob bob; }\n"
        + f"  server {{\n    listen {HOST}:{port};\n    location / {{\n"
        + "      proxy_pass http://$dev_upstream;\n"
        + "      proxy_http_version 1.1;\n"
        + '      proxy_set_header Connection "";\n'
        + "      proxy_set_header Host $host;\n"
        + "    }\n  }\n"
        + "}\n",
    )
    sp = bench.spawn("nginx-http", nginx_argv(conf, t, t / "nginx-http-error.log"), env)
    wait_listening(port, sp.proc, "nginx-http", sp.log)
    return Running(Ports(port, 0, 0), sp.proc.pid, routes=True)


HTTP_CONTENDERS = [
    Contender("direct", "baseline", start_direct_http),
    Contender("tpproxy", "subject", start_tpproxy_http("httptools")),
    Contender("tpproxy-h11", "subject", start_tpproxy_http("h11")),
    Contender("haproxy", "peer", start_haproxy_http),
    Contender("nginx-http", "peer", start_nginx_http),
]

MODES: dict[str, list[Contender]] = {"tcp": TCP_CONTENDERS, "http": HTTP_CONTENDERS}


# --------------------------------------------------------------------------------------------
# Correctness checks (before any timing)


def check_http(port: int, n: int = 20, want: bytes = APP_BODY) -> None:
    conn = http.client.HTTPConnection(HOST, port, timeout=5)
    try:
        for i in range(n):
            conn.request("GET", f"/check/{i}")
            resp = conn.getresponse()
            body = resp.read()
            if resp.status != 200 or body != want:
                raise BenchError(f"GET #{i} on keep-alive got {resp.status} {body[:60]!r}")
    finally:
        conn.close()


@dataclass(frozen=True)
class Probe:
    """One request of the routing check and the body of the upstream it must reach."""

    label: str
    headers: dict[str, str]
    want: bytes
    method: str = "GET"
    body: bytes | None = None
    chunked: bool = False


ROUTING_PROBES = [
    Probe("no header", {}, APP_BODY),
    Probe("x-dev: alice", {DEV_HEADER: "alice"}, ALICE_BODY),
    Probe("x-dev: bob", {DEV_HEADER: "bob"}, BOB_BODY),
    Probe("no header", {}, APP_BODY),
    Probe("X-Dev: bob (name case)", {"X-Dev": "bob"}, BOB_BODY),
    Probe("x-dev: carol (no intercept)", {DEV_HEADER: "carol"}, APP_BODY),
    Probe("POST 64 KiB Content-Length, no header", {}, APP_BODY, "POST", os.urandom(64 << 10)),
    Probe("x-dev: alice after a body", {DEV_HEADER: "alice"}, ALICE_BODY),
    Probe("POST chunked, x-dev: bob", {DEV_HEADER: "bob"}, BOB_BODY, "POST", b"z" * 9000, True),
    Probe("no header after a chunked body", {}, APP_BODY),
]
ROUTING_REPEATS = 3  # the whole sequence, on the same connection


def check_routing(run: Running, up: Ports) -> None:
    """http mode, before timing: one keep-alive connection carrying ROUTING_PROBES (mixed: no
    header, alice, bob, other values, bodies) ROUTING_REPEATS times; every response must be 200
    with the body of the upstream the request belongs to, and the connection must stay open.
    For direct (no routing) each upstream is checked on its own port instead."""
    if not run.routes:
        for port, want in ((up.http, APP_BODY), (up.alice, ALICE_BODY), (up.bob, BOB_BODY)):
            check_http(port, 5, want)
        return
    conn = http.client.HTTPConnection(HOST, run.ports.http, timeout=5)
    first_sock: socket.socket | None = None
    try:
        for rep in range(ROUTING_REPEATS):
            for i, pr in enumerate(ROUTING_PROBES):
                what = f"request {rep * len(ROUTING_PROBES) + i + 1} ({pr.label})"
                body: bytes | list[bytes] | None = pr.body
                if pr.chunked and pr.body is not None:
                    body = [pr.body[j : j + 4000] for j in range(0, len(pr.body), 4000)]
                try:
                    conn.request(
                        pr.method,
                        f"/route/{rep}/{i}",
                        body=body,
                        headers=pr.headers,
                        encode_chunked=pr.chunked,
                    )
                    resp = conn.getresponse()
                    got = resp.read()
                except (OSError, http.client.HTTPException) as e:
                    raise BenchError(f"{what} on one keep-alive connection: {e!r}") from e
                if resp.status != 200 or got != pr.want:
                    raise BenchError(f"{what} got {resp.status} {got[:60]!r}, want 200 {pr.want!r}")
                if resp.will_close:
                    raise BenchError(f"{what}: the response closes the connection")
                if first_sock is None:
                    first_sock = conn.sock
                elif conn.sock is not first_sock:
                    raise BenchError(f"{what}: the keep-alive connection was not kept")
    finally:
        conn.close()


def load_target(run: Running, alice: bool) -> tuple[int, list[str]]:
    """http mode: (port, wrk headers) for load without the header (-> app) or with `x-dev:
    alice` (-> alice). direct sends the alice load straight to the alice upstream."""
    if not alice:
        return run.ports.http, []
    port = run.ports.http if run.routes else run.ports.alice
    return port, [f"{DEV_HEADER}: alice"]


def check_bytes(port: int) -> None:
    """CHECK_BYTES random bytes through the contender to the hash sink, half-closed; the digest
    that comes back must match."""
    data = os.urandom(CHECK_BYTES)
    want = hashlib.sha256(data).hexdigest().encode()
    with socket.create_connection((HOST, port), timeout=15) as s:
        s.settimeout(15)
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        got = b""
        while chunk := s.recv(256):
            got += chunk
    if got != want:
        raise BenchError(f"checksum mismatch after {CHECK_BYTES} bytes: got {got[:70]!r}")


# --------------------------------------------------------------------------------------------
# Load generators


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


def run_wrk(port: int, conns: int, duration: int, headers: Sequence[str] = ()) -> WrkResult:
    argv = ["wrk", "-t1", f"-c{conns}", f"-d{duration}s", "--latency"]
    for h in headers:
        argv += ["-H", h]
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


# --------------------------------------------------------------------------------------------
# Measuring cells, with the foreign-CPU discipline


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
                w = run_wrk(port, conns, args.duration, headers)
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


# --------------------------------------------------------------------------------------------
# Report


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


def render_table(res: Results, skip_bulk: bool, failed: dict[str, str], skipped: set[str]) -> str:
    def num(x: float | None, fmt: str, metric: str, name: str) -> str:
        return fmt_num(res, x, fmt, metric, name)

    lines = ["| " + " | ".join(COLUMNS) + " |", "|---|" + "---:|" * (len(COLUMNS) - 1)]
    for name in res.names:
        if name in failed:
            what = "skipped" if name in skipped else "failed"
            lines.append(f"| {name} | {what}: {failed[name]} |" + " |" * (len(COLUMNS) - 2))
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
    lines = ["| " + " | ".join(cols) + " |", "|---|" + "---:|" * (len(cols) - 1)]

    for name in res.names:
        if name in failed:
            what = "skipped" if name in skipped else "failed"
            lines.append(f"| {name} | {what}: {failed[name]} |" + " |" * (len(cols) - 2))
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
    cpus = []
    for name in res.names:
        c = med(res.series(name, "cpu_100k_alice"))
        a = med(res.paired(name, "p50_c1_alice", res.direct("p50_c1_alice"), "-"))
        if c is not None:
            cpus.append(f"{name} {c:.2f}" + ("" if a is None else f" (added p50 c=1 {a:+.0f} us)"))
    if cpus:
        out.append("with x-dev: alice, CPU s/100k req at c=50: " + ", ".join(cpus))
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
        ]
    )


# --------------------------------------------------------------------------------------------
# Set-up: tools


def apt_install(packages: list[str], updated: list[bool]) -> bool:
    print(f"installing with apt-get: {' '.join(packages)}", flush=True)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    try:
        if not updated[0]:
            subprocess.run(
                ["apt-get", "update"], check=True, timeout=600, env=env, stdout=subprocess.DEVNULL
            )
            updated[0] = True
        subprocess.run(
            ["apt-get", "install", "-y", *packages],
            check=True,
            timeout=900,
            env=env,
            stdout=subprocess.DEVNULL,
        )
    except (OSError, subprocess.CalledProcessError, subprocess.TimeoutExpired) as e:
        print(f"  apt-get failed: {e}")
        return False
    return True


def ensure_tools(want_stream: bool) -> None:
    updated = [False]
    missing = [pkg for tool, pkg in TOOLS.items() if shutil.which(tool, path=SBIN_PATH) is None]
    if missing and not apt_install(missing, updated):
        raise BenchError(f"could not install {missing}")
    still = [tool for tool in TOOLS if shutil.which(tool, path=SBIN_PATH) is None]
    if still:
        raise BenchError(f"still missing after apt-get install: {still}")
    if want_stream and not NGINX_STREAM_MODULE.exists():
        apt_install([STREAM_PACKAGE], updated)


# --------------------------------------------------------------------------------------------
# Main


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
                kinds = ["c1", "c50", "c1-alice", "c50-alice"]
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
