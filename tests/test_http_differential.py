"""Generated request streams: both backends must decide and forward byte for byte alike, and
agree with a direct connection to the app when nothing is intercepted."""

from __future__ import annotations

import asyncio
import itertools
import os
import re
from dataclasses import dataclass

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tpproxy.engine import Engine
from tpproxy.http.protocol import HttpSettings
from tpproxy.routing import HeaderRule, HttpIntercept, port_routes
from tpproxy.targets import Address

from .helpers import free_port, run
from .http_servers import Upstream

TOKEN = st.text("abcdefghijklmnopqrstuvwxyz0123456789-", min_size=1, max_size=12)
VALUE = st.text(
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 -_./;=", max_size=30
).map(str.strip)


# Bytes a hostile client might put in a target, a header name or a header value.
ODD = st.sampled_from([*"%~!*'()@:;,=&+$\"<>{}|\\^`[] \t", "\x7f", "\x80", "\xff", "\x00", "\x01"])
ODD_TEXT = st.lists(st.one_of(TOKEN, ODD), max_size=4).map("".join)


@st.composite
def request(draw: st.DrawFn, last: bool) -> tuple[bytes, bool]:
    """One request, and whether it has odd bytes or methods (then not compared with direct)."""
    method = draw(
        st.sampled_from(
            ["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "PROPFIND", "FOO", "get"]
        )
    )
    odd = method in ("FOO", "get", "PROPFIND")
    path = "/" + "/".join(draw(st.lists(TOKEN, max_size=3)))
    if draw(st.integers(0, 4)) == 0:
        path += draw(ODD_TEXT)
        odd = True
    if draw(st.booleans()):
        path += "?" + draw(TOKEN) + "=" + draw(TOKEN)
    headers = [("Host", "svc.ns")]
    if draw(st.integers(0, 4)) == 0:
        headers.append((draw(ODD_TEXT) or "x", draw(ODD_TEXT)))
        odd = True
    who = draw(st.sampled_from([None, "alice", "bob", "carol", "Alice"]))
    if who:
        headers.append((draw(st.sampled_from(["x-dev", "X-Dev", "X-DEV"])), who))
    for _ in range(draw(st.integers(0, 3))):
        headers.append(("x-" + draw(TOKEN), draw(VALUE)))
    body_kind = draw(st.sampled_from(["none", "length", "chunked"]))
    body = b""
    if body_kind == "length":
        payload = draw(st.binary(max_size=300))
        headers.append(("Content-Length", str(len(payload))))
        body = payload
    elif body_kind == "chunked":
        headers.append(("Transfer-Encoding", "chunked"))
        for piece in draw(st.lists(st.binary(min_size=1, max_size=100), max_size=4)):
            body += b"%x\r\n" % len(piece) + piece + b"\r\n"
        body += b"0\r\n"
        if draw(st.booleans()):
            body += b"X-Trailer: yes\r\n"
        body += b"\r\n"
    if last and draw(st.booleans()):
        headers.append(("Connection", "close"))
    head = f"{method} {path} HTTP/1.1\r\n" + "".join(f"{n}: {v}\r\n" for n, v in headers) + "\r\n"
    return head.encode("latin-1") + body, odd


MUTATIONS = [
    lambda r: r.replace(
        b"\r\n\r\n", b"\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n", 1
    ),
    lambda r: r.replace(b"\r\n\r\n", b"\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n", 1),
    lambda r: r.replace(b"Host: ", b"Ho st: ", 1),
    lambda r: r.replace(b"Host: svc.ns", b"Host: svc\x00ns", 1),
    lambda r: r.replace(b"\r\n", b"\n"),
    lambda r: r.replace(b"Host: svc.ns\r\n", b"", 1),
    lambda r: r.replace(b"Host: svc.ns\r\n", b"Host: svc.ns\r\n continued\r\n", 1),
    lambda r: r.replace(b" HTTP/1.1\r\n", b" HTTP/1.1 \r\n", 1),
    lambda r: r.replace(b"\r\n\r\n", b"\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", 1),
    lambda r: b"\r\n" + r,
]


@st.composite
def stream(draw: st.DrawFn) -> tuple[list[bytes], bool]:
    """A keep-alive byte stream of 1-5 requests, maybe one mutated, cut at random points."""
    count = draw(st.integers(1, 5))
    drawn = [draw(request(last=i == count - 1)) for i in range(count)]
    requests = [r for r, _ in drawn]
    mutated = False
    if draw(st.integers(0, 3)) == 0:
        index = draw(st.integers(0, count - 1))
        mutation = draw(st.sampled_from(MUTATIONS))
        changed = mutation(requests[index])
        mutated = changed != requests[index]
        requests[index] = changed
    data = b"".join(requests)
    # Streams with odd bytes or methods are compared across backends only, not with direct.
    mutated = mutated or any(odd for _, odd in drawn)
    cuts = sorted(draw(st.lists(st.integers(1, max(1, len(data) - 1)), max_size=4, unique=True)))
    bounds = [0, *[c for c in cuts if c < len(data)], len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)], mutated


PROXY_ERROR = re.compile(
    rb"HTTP/1\.1 (\d{3}) [^\r]*\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: \d+\r\n"
    rb"x-tpproxy-error: \d+\r\n(?:connection: close\r\n)?\r\n[^\n]*\n"
)


def decisions(client: bytes) -> bytes:
    """The client's bytes with the proxy's own error texts reduced to their status codes.

    The texts name what each parser found wrong, in its own words; the status, the place in
    the stream and everything forwarded must still be identical.
    """
    return PROXY_ERROR.sub(rb"<tpproxy answered \1>", client)


@dataclass
class Outcome:
    client: bytes
    upstreams: dict[str, bytes]
    seen: dict[str, list[tuple[str, str, int]]]


async def send(port: int, segments: list[bytes]) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    for segment in segments:
        writer.write(segment)
        await writer.drain()
    writer.write_eof()
    received = b""
    async with asyncio.timeout(10):
        try:
            while chunk := await reader.read(65536):
                received += chunk
        except ConnectionResetError:
            received += b"<reset>"
    writer.close()
    return received


async def through(backend: str | None, segments: list[bytes]) -> Outcome:
    """The stream through an engine with `backend`, or straight to the app when None."""
    upstreams = {n: await Upstream(n).start() for n in ("app", "alice", "bob")}
    engine = None
    port = upstreams["app"].port
    if backend is not None:
        engine = Engine(host="127.0.0.1", http=HttpSettings(backend=backend))
        port = free_port()
        await engine.apply(
            {
                port: port_routes(
                    Address("127.0.0.1", upstreams["app"].port),
                    http_intercepts=[
                        HttpIntercept(
                            n,
                            Address("127.0.0.1", upstreams[n].port),
                            (HeaderRule.make("x-dev", "exact", n, "t"),),
                        )
                        for n in ("alice", "bob")
                    ],
                )
            }
        )
    client = await send(port, segments)
    if engine is not None:
        await engine.drain(2)
    for u in upstreams.values():
        u.close()
    return Outcome(
        client,
        {n: bytes(u.raw) for n, u in upstreams.items()},
        {n: [(s.method, s.target, s.body_size) for s in u.seen] for n, u in upstreams.items()},
    )


# TPPROXY_FUZZ_EXAMPLES raises the count for a longer hunt than the default run affords.
@settings(
    max_examples=int(os.environ.get("TPPROXY_FUZZ_EXAMPLES", "60")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(stream())
def test_backends_agree_with_each_other_and_with_a_direct_connection(
    generated: tuple[list[bytes], bool],
) -> None:
    segments, mutated = generated
    fast = run(through("httptools", segments))
    strict = run(through("h11", segments))
    assert fast.seen == strict.seen, "the backends routed differently"
    assert fast.upstreams == strict.upstreams, "the backends forwarded different bytes"
    assert decisions(fast.client) == decisions(strict.client), "the clients got different bytes"
    sent = b"".join(segments)
    if not mutated and b"x-dev: alice" not in sent.lower() and b"x-dev: bob" not in sent.lower():
        direct = run(through(None, segments))
        assert fast.upstreams["app"] == direct.upstreams["app"] == sent  # forwarded unchanged
        assert fast.client == direct.client
