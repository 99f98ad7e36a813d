"""HTTP mode's upstream side: the connection to one target (`Upstream`) and the requests it
carries (`Exchange`), in request order. The client side, `tpproxy.http.protocol.HttpProxy`,
makes them and writes their responses back in queue order; an Upstream stops reading when its
response must wait its turn or the client cannot take more, so memory stays bounded.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from typing import TYPE_CHECKING, cast

from tpproxy.http.framing import BodyCursor, Framing, FramingError, read_response_head
from tpproxy.routing import HttpIntercept
from tpproxy.targets import Target

if TYPE_CHECKING:
    from tpproxy.http.protocol import HttpProxy

log = logging.getLogger("tpproxy.http")

WRITE_HIGH_WATER = 256 * 1024
WRITE_LOW_WATER = 64 * 1024
MAX_RESPONSE_HEAD = 64 * 1024

_NOTHING: list[bytes] = []  # shared, never appended to: see Exchange.buffered


class Exchange:
    """One request and its response."""

    __slots__ = (
        "buffered",
        "close_after",
        "intercept",
        "method",
        "observed",
        "request_done",
        "response_done",
        "response_started",
        "route",
        "switched",
        "t0",
        "upstream",
    )

    def __init__(self, method: str, route: str, t0: float) -> None:
        self.method = method
        self.route = route
        self.t0 = t0
        self.upstream: Upstream | None = None
        self.intercept: HttpIntercept | None = None
        self.buffered: list[bytes] = _NOTHING  # a list of its own only once something waits
        self.request_done = False
        self.response_started = False
        self.response_done = False
        self.close_after = False
        self.switched = False
        self.observed = False


# Reasons an upstream stops reading.
ORDER, CLIENT_FULL = 1, 2
# Reasons the client connection stops being parsed.
WAIT_SWITCH, LAST_REQUEST, PIPELINE_FULL = "switch", "last", "pipeline"


class Upstream(asyncio.Protocol):
    """The connection to one target, carrying the requests routed there in order."""

    __slots__ = (
        "client",
        "closed",
        "cursor",
        "exchanges",
        "failed",
        "full",
        "paused",
        "pending",
        "rest",
        "retired",
        "started",
        "target",
        "transport",
        "tunnel",
        "will_close",
    )

    def __init__(self, client: HttpProxy, target: Target) -> None:
        self.client = client
        self.target = target
        self.transport: asyncio.Transport | None = None
        self.pending: list[tuple[Exchange | None, bytes]] = []
        self.exchanges: deque[Exchange] = deque()
        self.rest = b""
        self.cursor: BodyCursor | None = None
        self.paused = 0
        self.full = False
        self.closed = False
        self.failed = False
        self.tunnel = False
        self.will_close = False
        self.retired = False
        self.started = 0.0

    # -- writing requests -------------------------------------------------------------------
    def send(self, data: bytes, ex: Exchange | None = None) -> None:
        """Write request bytes (of `ex`), or hold them until connected."""
        transport = self.transport
        if transport is not None:
            transport.write(data)
        elif not self.closed:
            self.pending.append((ex, data))
            if not self.full and sum(len(d) for _, d in self.pending) > WRITE_HIGH_WATER:
                self.full = True
                self.client.upstream_full(True)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)
        self.transport = transport
        transport.set_write_buffer_limits(WRITE_HIGH_WATER, WRITE_LOW_WATER)
        if self.pending:
            transport.write(b"".join(data for _, data in self.pending))
            self.pending.clear()
        # Requests that waited for this connection: their added latency includes connecting.
        now = time.perf_counter()
        for ex in self.exchanges:
            if not ex.observed:
                ex.observed = True
                self.client.stats.observe(now - (ex.t0 or self.started))
        if self.full and not transport.get_write_buffer_size() > WRITE_HIGH_WATER:
            self.full = False
            self.client.upstream_full(False)
        if self.paused:
            transport.pause_reading()

    def pause_writing(self) -> None:
        if not self.full:
            self.full = True
            self.client.upstream_full(True)

    def resume_writing(self) -> None:
        if self.full:
            self.full = False
            self.client.upstream_full(False)

    def pause(self, reason: int) -> None:
        if not self.paused and self.transport is not None and not self.closed:
            self.transport.pause_reading()
        self.paused |= reason

    def resume(self, reason: int) -> None:
        if not self.paused & reason:
            return
        self.paused &= ~reason
        if not self.paused and self.transport is not None and not self.closed:
            self.transport.resume_reading()

    # -- reading responses ------------------------------------------------------------------
    def data_received(self, data: bytes) -> None:
        client = self.client
        if self.tunnel:
            client.deliver(self.exchanges[0], data)
            return
        if self.rest:
            data = self.rest + data
            self.rest = b""
        pos = 0
        end = len(data)
        while pos < end:
            if not self.exchanges:
                log.warning(
                    "port %d: %s sent bytes nobody asked for; closing it",
                    client.ctx.port,
                    self.target.label,
                )
                self.abort()
                return
            ex = self.exchanges[0]
            start = pos
            if self.cursor is None:
                head_end = data.find(b"\r\n\r\n", pos) + 4
                if head_end < 4:
                    if end - pos > MAX_RESPONSE_HEAD:
                        self._bad_response(
                            ex, f"response head longer than {MAX_RESPONSE_HEAD} bytes"
                        )
                        return
                    self.rest = data[pos:]
                    return
                try:
                    status, kind, length, closes = read_response_head(
                        data, pos, head_end, ex.method
                    )
                except FramingError as exc:
                    self._bad_response(ex, str(exc))
                    return
                if status < 200 and status != 101:
                    client.deliver(ex, data[pos:head_end])  # interim (100 Continue): pass on
                    pos = head_end
                    continue
                if kind == "tunnel":
                    self.tunnel = True
                    ex.switched = True
                    client.deliver(ex, data[pos:] if pos else data)
                    client.switch_ready(ex)
                    return
                if closes or kind == "close":
                    self.will_close = True
                    ex.close_after = True
                elif kind == "length" and head_end + length <= end:
                    # The whole response is in this read (the common case): no body cursor.
                    pos = head_end + length
                    client.deliver(ex, data if start == 0 and pos == end else data[start:pos])
                    self.exchanges.popleft()
                    client.response_complete(ex)
                    if self.retired and not self.exchanges:
                        self.close()
                        return
                    continue
                self.cursor = BodyCursor(Framing(kind, length))
                pos = head_end
            try:
                body_end = self.cursor.advance(data, pos)
            except FramingError as exc:
                self._bad_response(ex, str(exc))
                return
            if body_end < 0:
                client.deliver(ex, data[start:] if start else data)
                return
            client.deliver(ex, data[start:body_end])
            pos = body_end
            self.cursor = None
            self.exchanges.popleft()
            client.response_complete(ex)
            if self.will_close:
                break
            if self.retired and not self.exchanges:
                self.close()
                return

    def _bad_response(self, ex: Exchange, why: str) -> None:
        log.warning(
            "port %d: bad response from %s: %s", self.client.ctx.port, self.target.label, why
        )
        self.client.stats.count(ex.route, "upstream_error")
        self.abort()

    def eof_received(self) -> bool:
        client = self.client
        if self.tunnel and client.transport.can_write_eof() and not client.closing:
            client.transport.write_eof()  # half-close passes through an upgraded connection
            return True
        return False  # close; connection_lost settles the outstanding exchanges

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        cursor = self.cursor
        if exc is None and cursor is not None and cursor.framing.kind == "close" and self.exchanges:
            ex = self.exchanges.popleft()
            self.cursor = None
            self.client.response_complete(ex)
        self.client.upstream_lost(self, exc)

    def retire(self) -> None:
        """Take no new requests; close once the outstanding ones are answered."""
        self.retired = True
        client = self.client
        if client.upstreams.get(self.target.label) is self:
            del client.upstreams[self.target.label]
        if not self.exchanges:
            self.abort()

    def abort(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()
        else:
            self.client.upstream_lost(self, ConnectionAbortedError("aborted"))

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()
