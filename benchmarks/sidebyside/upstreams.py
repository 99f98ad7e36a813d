"""The upstreams: nginx for HTTP, iperf3 -s for bulk, an in-process checksum sink for correctness."""

from __future__ import annotations

import hashlib
import socket
import threading
from dataclasses import dataclass
from pathlib import Path

from benchmarks.sidebyside.common import HOST
from benchmarks.sidebyside.procs import Bench, wait_listening


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
