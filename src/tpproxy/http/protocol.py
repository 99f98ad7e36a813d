"""HTTP mode: each request on a client connection is routed on its own, bytes forwarded unchanged.

A client connection (`HttpProxy`) keeps one upstream connection (`Upstream`) per target it has
used. Each request becomes an `Exchange` queued in request order; its head and body go to the
chosen upstream as received, and responses are written back strictly in queue order. A response
that arrives while an earlier one is still outstanding is held (one read's worth) and its upstream
stops reading until its turn: memory stays bounded, and so it does for bodies of any size, which
stream through the transports' flow control.

Framing decisions live in `tpproxy.http.framing` (sans-IO), the upstream side in
`tpproxy.http.upstream`; only the request-head parser differs between the two backends
(`httptools_impl`, `h11_impl`), which subclass `HttpProxy`.

Long on purpose: `HttpProxy` is the client side of one connection, a single hot-path class (its
state is slots, its methods are called per request); the upstream side is
`tpproxy.http.upstream`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar, cast

from tpproxy.forward import connect_within
from tpproxy.http.framing import (
    BodyCursor,
    FramingError,
    find_head_end,
    skip_empty_lines,
    status_response,
)
from tpproxy.http.request import BadRequest, RequestHead
from tpproxy.http.upstream import (
    _NOTHING,
    CLIENT_FULL,
    LAST_REQUEST,
    ORDER,
    PIPELINE_FULL,
    WAIT_SWITCH,
    WRITE_HIGH_WATER,
    WRITE_LOW_WATER,
    Exchange,
    Upstream,
)
from tpproxy.routing import APP_ROUTE, PortRoutes
from tpproxy.stats import HttpStats, TrafficStats
from tpproxy.targets import Target

log = logging.getLogger("tpproxy.http")

H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
# Added latency on a warm connection is sampled (1 request in 16): reading the clock and filling
# the histogram for every request would cost more than the rest of routing it.
SAMPLE_MASK = 15

REASONS = {
    400: "Bad Request",
    408: "Request Timeout",
    431: "Request Header Fields Too Large",
    501: "Not Implemented",
    502: "Bad Gateway",
    505: "HTTP Version Not Supported",
}
OUTCOMES = {
    400: "bad_request",
    408: "timeout",
    431: "too_large",
    501: "bad_request",
    505: "bad_request",
}


@dataclass(frozen=True, slots=True)
class HttpSettings:
    """Limits and timeouts of HTTP mode."""

    backend: str = "httptools"
    max_head_size: int = 32 * 1024
    max_headers: int = 100
    header_timeout: float = 10.0
    idle_timeout: float = 60.0
    max_pipeline: int = 32


@dataclass(slots=True)
class PortContext:
    """What the HTTP connections of one port share with the engine."""

    port: int
    routes: Callable[[], PortRoutes]
    settings: HttpSettings
    connect_timeout: float
    traffic: TrafficStats
    stats: HttpStats
    clock: list[float]  # [now], a coarse monotonic clock the engine ticks for timeouts
    on_open: Callable[[object], None]
    on_close: Callable[[object], None]
    handover_tcp: Callable[[asyncio.Transport, bytes], None]
    handover_h2: Callable[[asyncio.Transport, bytes], None]


class HttpProxy(asyncio.Protocol):
    """One client connection in HTTP mode. Subclasses supply `parse_head` (the backend)."""

    backend: ClassVar[str] = ""

    __slots__ = (
        "body",
        "body_ex",
        "clock",
        "closing",
        "ctx",
        "full_upstreams",
        "head_started",
        "last_active",
        "loop",
        "queue",
        "reading",
        "requests_seen",
        "rest",
        "settings",
        "stats",
        "stop",
        "transport",
        "tunnel",
        "upstreams",
    )

    def __init__(self, ctx: PortContext) -> None:
        self.ctx = ctx
        self.settings = ctx.settings
        self.stats = ctx.stats
        self.queue: deque[Exchange] = deque()
        self.upstreams: dict[str, Upstream] = {}  # by target label (a str hashes once)
        self.rest = b""
        self.body: BodyCursor | None = None
        self.body_ex: Exchange | None = None
        self.stop: str | None = None
        self.tunnel: Upstream | None = None
        self.full_upstreams = 0
        self.reading = True
        self.closing = False
        self.requests_seen = 0
        self.head_started = 0.0
        self.last_active = 0.0

    def parse_head(self, head: bytes) -> RequestHead:
        """Parse one request head (ending in CRLF CRLF); BadRequest when it is refused."""
        raise NotImplementedError

    # -- connection life --------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)
        self.transport = transport
        self.loop = asyncio.get_running_loop()
        transport.set_write_buffer_limits(WRITE_HIGH_WATER, WRITE_LOW_WATER)
        self.clock = self.ctx.clock
        self.last_active = self.clock[0]
        traffic = self.ctx.traffic
        traffic.connections_total += 1
        traffic.connections_open += 1
        self.ctx.on_open(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closing = True
        self.ctx.traffic.connections_open -= 1
        for upstream in list(self.upstreams.values()):
            upstream.abort() if exc is not None else upstream.close()
        if self.tunnel is not None and not self.tunnel.closed:
            self.tunnel.abort() if exc is not None else self.tunnel.close()
        self.upstreams.clear()
        self.ctx.on_close(self)

    def eof_received(self) -> bool:
        if self.tunnel is not None and self.tunnel.transport is not None:
            if self.tunnel.transport.can_write_eof():
                self.tunnel.transport.write_eof()
                return True
            return False
        if not self.queue or self.body is not None:
            return False  # nothing outstanding, or a request that can never be completed: close
        # The client finished sending; answer what it asked for, then close.
        self.stop = LAST_REQUEST
        self.queue[-1].close_after = True
        return True

    def abort(self) -> None:
        """Drop the connection and its upstreams at once."""
        self.transport.abort()

    def shutdown(self) -> None:
        """Draining: close when idle; busy connections close after their outstanding responses."""
        if not self.queue and self.body is None and self.tunnel is None:
            self.transport.close()
        elif self.queue:
            self.stop = LAST_REQUEST
            self.queue[-1].close_after = True
            self._update_reading()

    def check_timeouts(self, now: float) -> None:
        """Called about twice a second by the engine: header and idle timeouts."""
        if self.tunnel is not None or self.closing:
            return
        settings = self.settings
        if self.body is not None:
            if now - self.last_active > settings.idle_timeout:
                log.info(
                    "port %d: request body stalled for %.0f s; closing",
                    self.ctx.port,
                    settings.idle_timeout,
                )
                self.stats.count(self.body_ex.route if self.body_ex else "-", "timeout")
                self.abort()
        elif self.rest and self.stop is None:
            if now - self.head_started > settings.header_timeout:
                self._refuse(408, f"request head not complete after {settings.header_timeout:g} s")
        elif not self.queue and now - self.last_active > settings.idle_timeout:
            self.transport.close()

    # -- client -> upstream -----------------------------------------------------------------
    def data_received(self, data: bytes) -> None:
        self.ctx.traffic.bytes_to_target += len(data)
        self.last_active = self.clock[0]
        tunnel = self.tunnel
        if tunnel is not None:
            tunnel.send(data)
            return
        if self.rest:
            data = self.rest + data
            self.rest = b""
        if self.requests_seen == 0 and data.startswith(b"PRI") and self._h2_preface(data):
            return
        self._consume(data)

    def _h2_preface(self, data: bytes) -> bool:
        if len(data) < len(H2_PREFACE) and H2_PREFACE.startswith(data):
            self.rest = data  # wait for the rest of the preface
            self.head_started = self.last_active
            return True
        if data.startswith(H2_PREFACE):
            # HTTP/2 with prior knowledge: its streams are routed one by one when the port has
            # rules to route them by; without any, the port's TCP route takes it (no cost).
            traffic = self.ctx.traffic
            traffic.connections_open -= 1
            self.ctx.on_close(self)
            self.closing = True
            if self.ctx.routes().http_intercepts:
                traffic.connections_total -= 1  # counted again as the HTTP/2 connection
                self.ctx.handover_h2(self.transport, data)
            else:
                self.ctx.handover_tcp(self.transport, data)
            return True
        return False

    def _consume(self, data: bytes) -> None:
        pos = 0
        end = len(data)
        while pos < end:
            body = self.body
            if body is not None:
                ex = self.body_ex
                assert ex is not None
                try:
                    body_end = body.advance(data, pos)
                except FramingError as bad_body:
                    self._refuse(400, str(bad_body), ex)
                    return
                upstream = ex.upstream
                if body_end < 0:
                    if upstream is not None:
                        upstream.send(data[pos:] if pos else data, ex)
                    pos = end
                    break
                if upstream is not None:
                    upstream.send(data[pos:body_end], ex)
                pos = body_end
                self.body = self.body_ex = None
                ex.request_done = True
                continue
            if self.stop is not None:
                break
            start = skip_empty_lines(data, pos) if data.startswith(b"\r", pos) else pos
            head_end = find_head_end(data, start)
            if head_end < 0:
                pos = start
                if end - start > self.settings.max_head_size:
                    self._refuse(
                        431, f"request head longer than {self.settings.max_head_size} bytes"
                    )
                    return
                if data.find(b"\n\n", start) >= 0:
                    self._refuse(400, "malformed request: header lines must end with CRLF")
                    return
                break
            if head_end - start > self.settings.max_head_size:
                self._refuse(431, f"request head longer than {self.settings.max_head_size} bytes")
                return
            # The added latency is measured for 1 request in 16 (and every new connection):
            # reading the clock and filling the histogram for each would cost more than routing.
            stats = self.stats
            stats.ticks += 1
            t0 = time.perf_counter() if not stats.ticks & SAMPLE_MASK else 0.0
            head = data[start:head_end] if start or head_end != end else data
            try:
                request = self.parse_head(head)
            except BadRequest as refused:
                self._refuse(refused.status, str(refused))
                return
            self._dispatch(request, head, t0)
            pos = head_end
        if pos < end:
            if not self.rest and self.body is None:
                self.head_started = self.last_active
            self.rest = data[pos:] if pos else data
        if not self.reading or self.stop is not None or self.full_upstreams:
            self._update_reading()

    def _dispatch(self, request: RequestHead, head: bytes, t0: float) -> None:
        self.requests_seen += 1
        routes = self.ctx.routes()
        if routes.http_intercepts or routes.tcp_intercept is not None:
            headers = request.headers_named(routes.header_names)
            decision = routes.decide(request.method, request.path, headers)
            route, target, intercept = decision.route, decision.target, decision.intercept
        else:
            route, target, intercept = APP_ROUTE, routes.app, None
        ex = Exchange(request.method, route, t0)
        ex.intercept = intercept
        self.queue.append(ex)
        upstream = self._upstream(target)
        ex.upstream = upstream
        upstream.exchanges.append(ex)
        upstream.send(head, ex)
        if upstream.transport is not None:
            ex.observed = True
            if t0:
                self.stats.observe(time.perf_counter() - t0)
        if request.framing.length or request.framing.kind == "chunked":
            self.body = BodyCursor(request.framing)
            self.body_ex = ex
        else:
            ex.request_done = True
        if request.upgrade:
            self.stop = WAIT_SWITCH
        if not request.keep_alive:
            self.stop = LAST_REQUEST
            ex.close_after = True
        elif self.stop is None and len(self.queue) >= self.settings.max_pipeline:
            self.stop = PIPELINE_FULL

    def _upstream(self, target: Target, *, fresh: bool = False) -> Upstream:
        upstream = None if fresh else self.upstreams.get(target.label)
        if upstream is None or upstream.closed or upstream.will_close or upstream.failed:
            upstream = Upstream(self, target)
            if not fresh:
                self.upstreams[target.label] = upstream
            upstream.started = time.perf_counter()
            self.loop.create_task(self._connect(upstream))
        return upstream

    async def _connect(self, upstream: Upstream) -> None:
        why = await connect_within(
            upstream.target, lambda: upstream, self.ctx.connect_timeout, self.ctx.port
        )
        if why:
            self._upstream_failed(upstream, why)
        elif self.closing or upstream.closed:
            upstream.close()

    def _forget(self, upstream: Upstream) -> None:
        """An upstream that takes no more requests: out of the pool, and no longer holding the
        client's reading back."""
        if self.upstreams.get(upstream.target.label) is upstream:
            del self.upstreams[upstream.target.label]
        if upstream.full:
            upstream.full = False
            self.upstream_full(False)

    def _upstream_failed(self, upstream: Upstream, reason: str) -> None:
        upstream.failed = upstream.closed = True
        self._forget(upstream)
        if self.closing:
            return
        log.warning("port %d: cannot reach %s: %s", self.ctx.port, upstream.target.label, reason)
        exchanges = list(upstream.exchanges)
        upstream.exchanges.clear()
        pending, upstream.pending = upstream.pending, []
        fallback = [ex for ex in exchanges if ex.intercept and ex.intercept.fallback_to_app]
        if fallback:
            # These intercepts asked for their requests to go to the app when unreachable; a
            # connection of their own keeps them in order behind nobody else's requests.
            app = self._upstream(self.ctx.routes().app, fresh=True)
            for ex in fallback:
                ex.upstream = app
                app.exchanges.append(ex)
                self.stats.count(ex.route, "fallback")
            for owner, data in pending:
                if owner in fallback:
                    app.send(data, owner)
        for ex in exchanges:
            if ex in fallback:
                continue
            self.stats.count(ex.route, "unreachable")
            what = "app" if ex.route == APP_ROUTE else f"intercept {ex.route!r} target"
            self._local_response(ex, 502, f"{what} {upstream.target.label} unreachable: {reason}")

    # -- upstream -> client -----------------------------------------------------------------
    def deliver(self, ex: Exchange, piece: bytes) -> None:
        ex.response_started = True
        if self.queue and self.queue[0] is ex:
            self.ctx.traffic.bytes_to_client += len(piece)
            self.transport.write(piece)
        else:
            if ex.buffered is _NOTHING:
                ex.buffered = [piece]
            else:
                ex.buffered.append(piece)
            if ex.upstream is not None:
                ex.upstream.pause(ORDER)

    def response_complete(self, ex: Exchange) -> None:
        ex.response_done = True
        if ex.response_started:
            forwarded = self.stats.forwarded
            forwarded[ex.route] = forwarded.get(ex.route, 0) + 1
        queue = self.queue
        if queue and queue[0] is ex:
            if len(queue) == 1 and not ex.close_after and self.stop is None:
                queue.popleft()  # the usual case: nothing else outstanding, nothing to resume
                self.last_active = self.clock[0]
            else:
                self._advance()

    def switch_ready(self, ex: Exchange) -> None:
        if self.queue and self.queue[0] is ex:
            self._enter_tunnel(ex)

    def _advance(self) -> None:
        queue = self.queue
        while queue:
            head = queue[0]
            if head.buffered:
                data = b"".join(head.buffered)
                head.buffered = _NOTHING
                self.ctx.traffic.bytes_to_client += len(data)
                self.transport.write(data)
            if not head.response_done:
                if head.upstream is not None:
                    head.upstream.resume(ORDER)
                if head.switched:
                    self._enter_tunnel(head)
                return
            queue.popleft()
            if head.close_after:
                self._finish()
                return
        self.last_active = self.clock[0]
        if self.stop in (PIPELINE_FULL, WAIT_SWITCH) and self.body is None:
            self.stop = None
            if self.rest:
                data, self.rest = self.rest, b""
                self._consume(data)
                return
        self._update_reading()

    def _enter_tunnel(self, ex: Exchange) -> None:
        upstream = ex.upstream
        assert upstream is not None
        self.tunnel = upstream
        self.stop = None
        for other in list(self.upstreams.values()):
            if other is not upstream:
                other.close()
        self.upstreams.clear()
        upstream.resume(ORDER)
        if self.rest:
            data, self.rest = self.rest, b""
            upstream.send(data)
        self._update_reading()

    def _finish(self) -> None:
        """The last response is written: close once it is flushed."""
        self.closing = True
        self.transport.close()

    def _local_response(self, ex: Exchange, status: int, detail: str) -> None:
        """Answer `ex` ourselves (502); close afterwards if its request body is still coming."""
        ex.upstream = None
        close = not ex.request_done
        if close:
            ex.close_after = True
            self.stop = LAST_REQUEST
            self.body = None
            self.body_ex = None
        ex.buffered = [status_response(status, REASONS[status], detail, close=close)]
        ex.response_started = ex.response_done = True
        if self.queue and self.queue[0] is ex:
            self._advance()

    def _refuse(self, status: int, detail: str, ex: Exchange | None = None) -> None:
        """Answer a request we will not forward (400, 408, 431, ...) and close after it."""
        log.info("port %d: %d %s: %s", self.ctx.port, status, REASONS[status], detail)
        route = ex.route if ex is not None else "-"
        self.stats.count(route, OUTCOMES.get(status, "bad_request"))
        self.rest = b""
        self.stop = LAST_REQUEST
        if ex is not None:
            if ex.response_started:
                # Part of its response went out already: no clean answer is possible any more.
                self.transport.abort()
                return
            # A body that turned out malformed: half of it went to the upstream, whose request
            # stream is now broken. It answers what came before, takes nothing new, then closes.
            upstream, ex.upstream = ex.upstream, None
            if upstream is not None:
                if ex in upstream.exchanges:
                    upstream.exchanges.remove(ex)
                upstream.retire()
            if ex in self.queue:
                self.queue.remove(ex)
        self.body = self.body_ex = None
        local = Exchange("-", "-", 0.0)
        local.buffered = [status_response(status, REASONS[status], detail)]
        local.response_started = local.response_done = local.close_after = True
        self.queue.append(local)
        if self.queue[0] is local:
            self._advance()
        self._update_reading()

    def upstream_lost(self, upstream: Upstream, exc: Exception | None) -> None:
        self._forget(upstream)
        if self.closing:
            return
        if upstream is self.tunnel:
            self.transport.abort() if exc is not None else self.transport.close()
            return
        for ex in list(upstream.exchanges):
            if ex.response_started:
                # Part of the response already went to the client: it cannot be made whole.
                self.stats.count(ex.route, "upstream_error")
                self.transport.abort()
                return
            self.stats.count(ex.route, "upstream_error")
            self._local_response(
                ex, 502, f"{upstream.target.label} closed the connection before answering"
            )
        upstream.exchanges.clear()

    # -- flow control -----------------------------------------------------------------------
    def pause_writing(self) -> None:
        for upstream in self.upstreams.values():
            upstream.pause(CLIENT_FULL)
        if self.tunnel is not None:
            self.tunnel.pause(CLIENT_FULL)

    def resume_writing(self) -> None:
        for upstream in self.upstreams.values():
            upstream.resume(CLIENT_FULL)
        if self.tunnel is not None:
            self.tunnel.resume(CLIENT_FULL)

    def upstream_full(self, full: bool) -> None:
        self.full_upstreams += 1 if full else -1
        self._update_reading()

    def _update_reading(self) -> None:
        want = self.full_upstreams == 0 and (self.stop is None or self.body is not None)
        if want != self.reading and not self.closing:
            self.reading = want
            if want:
                self.transport.resume_reading()
            else:
                self.transport.pause_reading()
