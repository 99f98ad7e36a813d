"""The contenders: direct, tpproxy, haproxy and nginx, in tcp and in http mode."""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from benchmarks.sidebyside.common import HOST, NGINX_STREAM_MODULE, REPO, STREAM_PACKAGE, BenchError
from benchmarks.sidebyside.procs import Bench, wait_listening
from benchmarks.sidebyside.upstreams import DEV_HEADER, Ports, nginx_argv, nginx_common


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


def tpproxy_env(env: dict[str, str], pure: bool) -> dict[str, str]:
    """TPPROXY_* settings from the caller's environment must not change what is measured;
    `pure` runs the pure-Python hot path even where the compiled one is built."""
    clean = {k: v for k, v in env.items() if not k.startswith("TPPROXY_")}
    return {**clean, "TPPROXY_PURE": "1"} if pure else clean


def start_tpproxy(bench: Bench, up: Ports, env: dict[str, str], pure: bool = False) -> Running:
    front = Ports(bench.port(), bench.port(), bench.port())
    argv = [str(tpproxy_bin()), "run"]
    for mine, theirs in zip(
        (front.http, front.bulk, front.check), (up.http, up.bulk, up.check), strict=True
    ):
        argv += ["--forward", f"{mine}={HOST}:{theirs}"]
    argv += ["--listen-host", HOST, "--admin", "off", "--log-level", "warning"]
    name = "tpproxy-pure" if pure else "tpproxy"
    sp = bench.spawn(name, argv, tpproxy_env(env, pure))
    for port in (front.http, front.bulk, front.check):
        wait_listening(port, sp.proc, name, sp.log)
    return Running(front, sp.proc.pid)


def start_tpproxy_pure(bench: Bench, up: Ports, env: dict[str, str]) -> Running:
    return start_tpproxy(bench, up, env, pure=True)


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
    Contender("tpproxy-pure", "subject", start_tpproxy_pure),
    Contender("haproxy", "peer", start_haproxy),
    Contender("nginx-stream", "peer", start_nginx_stream),
]


# ---- http mode: route per request by the x-dev header; no header (or another value) -> app


def start_direct_http(bench: Bench, up: Ports, env: dict[str, str]) -> Running:
    return Running(up, None, routes=False)


def start_tpproxy_http(
    parser: str, pure: bool = False
) -> Callable[[Bench, Ports, dict[str, str]], Running]:
    def start(bench: Bench, up: Ports, env: dict[str, str]) -> Running:
        name = "tpproxy" if parser == "httptools" else f"tpproxy-{parser}"
        name += "-pure" if pure else ""
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
        sp = bench.spawn(name, argv, tpproxy_env(env, pure))
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
    Contender("tpproxy-pure", "subject", start_tpproxy_http("httptools", pure=True)),
    Contender("tpproxy-h11", "subject", start_tpproxy_http("h11")),
    Contender("haproxy", "peer", start_haproxy_http),
    Contender("nginx-http", "peer", start_nginx_http),
]

MODES: dict[str, list[Contender]] = {"tcp": TCP_CONTENDERS, "http": HTTP_CONTENDERS}
