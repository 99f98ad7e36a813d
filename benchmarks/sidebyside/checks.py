"""Correctness checks that every contender passes before any timing."""

from __future__ import annotations

import hashlib
import http.client
import os
import socket
from dataclasses import dataclass

from benchmarks.sidebyside.common import CHECK_BYTES, HOST, BenchError
from benchmarks.sidebyside.contenders import Running
from benchmarks.sidebyside.upstreams import ALICE_BODY, APP_BODY, BOB_BODY, DEV_HEADER, Ports


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
