"""gRPC-shaped unary calls over HTTP/2, routed per stream by an `x-dev` header: tpproxy against
haproxy (`proto h2` on both sides, a header ACL) and against the target directly, in one run.

Load: h2load (Debian's nghttp2-client), one connection at c=1 (latency) and 50 connections at
c=50 (throughput), one stream at a time per connection; each request is what a gRPC unary call
puts on the wire (POST, `content-type: application/grpc`, `te: trailers`, a 5-byte-framed
message). Targets: nghttpd (nghttp2-server), a C HTTP/2 server, so that the proxies are what
is measured; one for the app, one for alice (answers differ, which the check reads). Each
contender's CPU per call is read from /proc for its own process (and is what matters on the
2-core machine: the proxy's core is the limit). Rounds are round-robin; medians are reported.

    .venv/bin/python benchmarks/grpc.py [--requests 20000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import h2.config
import h2.connection
import h2.events

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `benchmarks.sidebyside`

from benchmarks.sidebyside.common import HOST
from benchmarks.sidebyside.procs import free_port, wait_listening

PATH = "/tp.test.Echo/Unary"
TOOLS = {"h2load": "nghttp2-client", "nghttpd": "nghttp2-server", "haproxy": "haproxy"}
TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def frame(message: bytes) -> bytes:
    return b"\x00" + len(message).to_bytes(4, "big") + message


@dataclass
class Contender:
    name: str
    port: int
    pid: int | None  # the process whose CPU is counted (None: direct)


@contextmanager
def processes() -> Iterator[Callable[..., subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []

    def spawn(argv: list[str], log: Path) -> subprocess.Popen[bytes]:
        out = log.open("wb")
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
        started.append(proc)
        return proc

    try:
        yield spawn
    finally:
        for proc in started:
            proc.terminate()
        for proc in started:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def h2_get(port: int, dev: str | None) -> bytes:
    """One request with a real HTTP/2 client (h2): the body the target answered."""
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    with socket.create_connection((HOST, port), timeout=5) as sock:
        conn.initiate_connection()
        headers = [(":method", "POST"), (":scheme", "http"), (":authority", "bench"),
                   (":path", PATH), ("content-type", "application/grpc"), ("te", "trailers")]  # fmt: skip
        if dev:
            headers.append(("x-dev", dev))
        conn.send_headers(1, headers)
        conn.send_data(1, frame(b"hi"), end_stream=True)
        sock.sendall(conn.data_to_send())
        body = b""
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            data = sock.recv(65536)
            if not data:
                break
            for event in conn.receive_data(data):
                if isinstance(event, h2.events.DataReceived):
                    body += event.data or b""
                    conn.acknowledge_received_data(event.flow_controlled_length, 1)
                elif isinstance(event, h2.events.StreamEnded):
                    return body
            sock.sendall(conn.data_to_send())
    raise RuntimeError(f"no complete answer on port {port}")


def h2load(
    port: int, clients: int, requests: int, body: Path, dev: str | None, log: Path
) -> tuple[float, float]:
    """req/s and p50 latency (us) from h2load's per-request log."""
    argv = ["h2load", "-n", str(requests), "-c", str(clients), "-m", "1", "-d", str(body),
            "-H", "content-type: application/grpc", "-H", "te: trailers",
            f"--log-file={log}", f"http://{HOST}:{port}{PATH}"]  # fmt: skip
    if dev:
        argv[1:1] = ["-H", f"x-dev: {dev}"]
    log.unlink(missing_ok=True)  # h2load appends to it
    out = subprocess.run(argv, capture_output=True, text=True, timeout=600, check=True).stdout
    done = next(line for line in out.splitlines() if line.startswith("requests:"))
    if f"{requests} succeeded" not in done or " 2xx" not in out:
        raise RuntimeError(f"h2load saw failures:\n{out}")
    rps = float(
        next(line for line in out.splitlines() if line.startswith("finished"))
        .split(", ")[1]
        .split()[0]
    )
    elapsed = [int(line.split("\t")[2]) for line in log.read_text().splitlines() if line]
    return rps, statistics.median(elapsed)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=20000, help="per h2load run")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    missing = [pkg for tool, pkg in TOOLS.items() if shutil.which(tool) is None]
    if missing:
        subprocess.run(["apt-get", "install", "-y", "-q", *missing], check=True, timeout=600)
    tpproxy = Path(sys.executable).with_name("tpproxy")
    tmp = Path(tempfile.mkdtemp(prefix="bench-grpc-"))
    taken: set[int] = set()
    try:
        with processes() as spawn:
            targets = {}
            for name in ("app", "alice"):
                root = tmp / name / PATH.strip("/").split("/")[0]
                root.mkdir(parents=True)
                (root / PATH.rsplit("/", 1)[1]).write_bytes(frame(name.encode()))
                port = free_port(taken)
                proc = spawn(["nghttpd", "--no-tls", "-d", str(tmp / name), "-a", HOST, str(port)],
                             tmp / f"nghttpd-{name}.log")  # fmt: skip
                wait_listening(port, proc, f"nghttpd {name}", tmp / f"nghttpd-{name}.log")
                targets[name] = port
            contenders = [Contender("direct", targets["app"], None)]

            port = free_port(taken)
            intercepts = tmp / "intercepts.yaml"
            intercepts.write_text(
                f"- {{id: alice, port: {port}, mechanism: http, target: '{HOST}:{targets['alice']}', "
                "headers: [{name: x-dev, op: exact, value: alice}]}\n"
            )
            proc = spawn([str(tpproxy), "run", "--forward", f"{port}={HOST}:{targets['app']}",
                          "--mode", "http", "--intercepts", str(intercepts), "--listen-host", HOST,
                          "--admin", "off", "--log-level", "warning"], tmp / "tpproxy.log")  # fmt: skip
            wait_listening(port, proc, "tpproxy", tmp / "tpproxy.log")
            contenders.append(Contender("tpproxy", port, proc.pid))

            port = free_port(taken)
            conf = tmp / "haproxy.cfg"
            conf.write_text(
                "global\n  nbthread 1\n  maxconn 4096\n\n"
                "defaults\n  mode http\n  timeout connect 5s\n  timeout client 60s\n"
                "  timeout server 60s\n  http-reuse always\n\n"
                f"frontend f\n  bind {HOST}:{port} proto h2\n"
                "  acl alice req.hdr(x-dev) -m str alice\n"
                "  use_backend b_alice if alice\n  default_backend b_app\n\n"
                f"backend b_app\n  server app {HOST}:{targets['app']} proto h2\n"
                f"backend b_alice\n  server alice {HOST}:{targets['alice']} proto h2\n"
            )
            proc = spawn(["haproxy", "-db", "-f", str(conf)], tmp / "haproxy.log")
            wait_listening(port, proc, "haproxy", tmp / "haproxy.log")
            contenders.append(Contender("haproxy", port, proc.pid))

            for c in contenders:  # correctness first: each routes as asked
                want_alice = b"alice" if c.name != "direct" else b"app"
                assert h2_get(c.port, "alice") == frame(want_alice), c.name
                assert h2_get(c.port, None) == frame(b"app"), c.name
            body = tmp / "request.bin"
            body.write_bytes(frame(b"hello"))

            cells: dict[tuple[str, str], list[tuple[float, float, float]]] = {}
            loads = [("c=1", 1, None), ("c=1 alice", 1, "alice"), ("c=50", 50, None),
                     ("c=50 alice", 50, "alice")]  # fmt: skip
            for _ in range(args.rounds):
                for label, clients, dev in loads:
                    for c in contenders:
                        if dev and c.name == "direct":
                            continue
                        before = cpu_seconds(c.pid) if c.pid else 0.0
                        rps, p50 = h2load(
                            c.port, clients, args.requests, body, dev, tmp / "h2load.log"
                        )
                        cpu = (cpu_seconds(c.pid) - before) if c.pid else 0.0
                        cells.setdefault((label, c.name), []).append(
                            (rps, p50, cpu / args.requests * 100_000)
                        )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    print(f"gRPC-shaped unary over h2c, {args.requests} requests per run, medians of {args.rounds}")
    print()
    print("| load | contender | req/s | p50 µs | added p50 µs | CPU s / 100k calls |")
    print("|---|---|---|---|---|---|")
    for label, _, _ in loads:
        direct = cells.get((label.split()[0], "direct"))
        base = statistics.median(p for _, p, _ in direct) if direct else 0.0
        for c in contenders:
            got = cells.get((label, c.name))
            if not got:
                continue
            rps = statistics.median(r for r, _, _ in got)
            p50 = statistics.median(p for _, p, _ in got)
            cpu = statistics.median(x for _, _, x in got)
            cpu_text = f"{cpu:.2f}" if c.pid else "—"
            print(
                f"| {label} | {c.name} | {rps:,.0f} | {p50:.0f} | {p50 - base:+.0f} | {cpu_text} |"
            )
    for label in ("c=1", "c=50"):
        tp = cells[(label, "tpproxy")]
        ha = cells[(label, "haproxy")]
        ratio = statistics.median(x for *_, x in tp) / statistics.median(x for *_, x in ha)
        print(f"\n{label}: tpproxy uses {ratio:.2f}x haproxy's CPU per call")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
