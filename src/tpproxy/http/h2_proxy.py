"""HTTP/2 mode: a client connection that began with the HTTP/2 preface (prior knowledge, as
gRPC clients send in plaintext), each of its streams routed on its own by the port's rules.

The connection is terminated with h2: `H2Proxy` is the server side towards the client, and for
each target it uses an `H2Upstream` (`tpproxy.http.h2_upstream`), a client-side connection kept
open and shared by the streams sent there. A stream's headers are read once for routing
(`tpproxy.http.h2_streams.read_request`: `:method`, `:path`, the rules' header names, gRPC
metadata included), then the stream is relayed frame by frame: headers, data under both sides'
flow control, trailers, resets. PING and SETTINGS are per hop (h2 answers them). A new table
applies to new streams; open streams keep the target they were given.

Long on purpose: one protocol class, the client side of a relayed HTTP/2 connection, with the
callbacks its upstreams make (the upstream side is `tpproxy.http.h2_upstream`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import TYPE_CHECKING, cast

import h2.events as ev
from h2.errors import ErrorCodes
from h2.exceptions import ProtocolError, StreamClosedError
from h2.settings import Settings
from hyperframe.frame import GoAwayFrame

from tpproxy.forward import connect_within
from tpproxy.http.h2_streams import (
    CONNECTION_WINDOW,
    MAX_RESETS,
    RESET_WINDOW,
    Header,
    RelayConnection,
    StreamRefused,
    config,
    goaway_code,
    local_settings,
    read_request,
    unreachable_response,
)
from tpproxy.http.h2_upstream import (
    DEFAULT_WINDOW,
    WRITE_HIGH_WATER,
    WRITE_LOW_WATER,
    FlowControlledSide,
    H2Stream,
    H2Upstream,
    pump,
)
from tpproxy.routing import APP_ROUTE
from tpproxy.targets import Target

if TYPE_CHECKING:
    from tpproxy.http.protocol import PortContext

log = logging.getLogger("tpproxy.http2")


class H2Proxy(FlowControlledSide):
    """One HTTP/2 client connection in HTTP mode."""

    def __init__(self, ctx: PortContext) -> None:
        self.ctx = ctx
        self.stats = ctx.stats
        self.conn = RelayConnection(config(client_side=False))
        self.conn.local_settings = Settings(client=False, initial_values=local_settings())
        self.streams: dict[int, H2Stream] = {}  # by the client's stream id
        self.upstreams: dict[str, H2Upstream] = {}  # by target label: the usable ones
        self.all_upstreams: set[H2Upstream] = set()
        self.transport: asyncio.Transport | None = None
        self.closing = False
        self.draining = False
        self.last_active = 0.0
        self.resets: list[float] = []  # times of the client's recent resets

    # -- connection life --------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)
        self.transport = transport
        transport.set_write_buffer_limits(WRITE_HIGH_WATER, WRITE_LOW_WATER)
        self.last_active = self.ctx.clock[0]
        self.ctx.traffic.connections_total += 1
        self.ctx.traffic.connections_open += 1
        self.ctx.on_open(self)
        self.conn.initiate_connection()
        self.conn.increment_flow_control_window(CONNECTION_WINDOW - DEFAULT_WINDOW)
        self.flush()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closing = True
        self.ctx.traffic.connections_open -= 1
        for stream in list(self.streams.values()):
            if stream.upstream is not None:
                stream.upstream.cancel(stream, ErrorCodes.CANCEL)
        self.streams.clear()
        for upstream in list(self.all_upstreams):
            upstream.close() if exc is None else upstream.abort()
        self.all_upstreams.clear()
        self.upstreams.clear()
        self.ctx.on_close(self)

    def flush(self) -> None:
        data = self.conn.data_to_send()
        if data and self.transport is not None and not self.closing:
            self.ctx.traffic.bytes_to_client += len(data)
            self.transport.write(data)

    def writable_again(self) -> None:
        for stream in list(self.streams.values()):
            self.send_response_data(stream)
        self.flush()
        for upstream in list(self.all_upstreams):
            upstream.flush()

    def abort(self) -> None:
        """Drop the connection and its upstreams at once."""
        if self.transport is not None:
            self.transport.abort()

    def shutdown(self) -> None:
        """Draining: GOAWAY now (streams already open finish), close once none is left."""
        if self.draining or self.closing:
            return
        self.draining = True
        self._goaway(ErrorCodes.NO_ERROR, keep_streams=True)
        self._close_if_drained()

    def check_timeouts(self, now: float) -> None:
        """Called about twice a second by the engine: the idle timeout of a stream-less
        connection."""
        idle = now - self.last_active > self.ctx.settings.idle_timeout
        if idle and not self.streams and not self.closing:
            self._goaway(ErrorCodes.NO_ERROR, keep_streams=False)
            self._close()

    def _goaway(self, code: int, *, keep_streams: bool) -> None:
        """Send GOAWAY with the last stream id seen. With `keep_streams`, the streams already
        open go on (RFC 9113 §6.8); h2 ends the connection at any GOAWAY, so the frame is
        written here and h2's state is left open for them."""
        if not keep_streams:
            self.conn.close_connection(error_code=code)
            self.flush()
            return
        frame = GoAwayFrame(stream_id=0)
        frame.last_stream_id = self.conn.highest_inbound_stream_id
        frame.error_code = code
        self.flush()
        if self.transport is not None and not self.closing:
            self.transport.write(frame.serialize())

    def _close_if_drained(self) -> None:
        """Draining (our GOAWAY or the client's) and no stream left: the connection is done."""
        if self.draining and not self.streams:
            self.flush()
            self._close()

    def _close(self) -> None:
        self.closing = True
        if self.transport is not None:
            self.transport.close()

    # -- client -> target -------------------------------------------------------------------
    def data_received(self, data: bytes) -> None:
        self.ctx.traffic.bytes_to_target += len(data)
        self.last_active = self.ctx.clock[0]
        try:
            events = self.conn.receive_data(data)
        except ProtocolError as exc:
            # h2 has queued the GOAWAY with the error's code (PROTOCOL_ERROR, FLOW_CONTROL_ERROR,
            # COMPRESSION_ERROR, ENHANCE_YOUR_CALM ...): send it and end the connection.
            log.info("port %d: HTTP/2 client broke the protocol: %s", self.ctx.port, exc)
            self.stats.count("-", "bad_request")
            code = goaway_code(exc)
            if code != exc.error_code:
                self.conn.clear_outbound_data_buffer()  # h2's own GOAWAY, with its code
                self._goaway(code, keep_streams=True)  # written as a frame of our own
            self.flush()
            self._close()
            return
        for event in events:
            kind = type(event)
            if kind is ev.DataReceived:
                e = cast(ev.DataReceived, event)
                stream = self.streams.get(e.stream_id or 0)
                if stream is None or stream.upstream is None:
                    self.conn.acknowledge_received_data(e.flow_controlled_length, e.stream_id or 0)
                    continue
                stream.to_target.append((memoryview(e.data or b""), e.flow_controlled_length))
                stream.upstream.send_request_data(stream)
            elif kind is ev.RequestReceived:
                e2 = cast(ev.RequestReceived, event)
                self._request(
                    e2.stream_id or 0, list(e2.headers or ()), e2.stream_ended is not None
                )
            elif kind is ev.StreamEnded:
                stream = self.streams.get(cast(ev.StreamEnded, event).stream_id or 0)
                if stream is not None and stream.upstream is not None and not stream.request_ended:
                    stream.request_ended = stream.to_target_end = True
                    stream.upstream.send_request_data(stream)
            elif kind is ev.TrailersReceived:
                e3 = cast(ev.TrailersReceived, event)
                stream = self.streams.get(e3.stream_id or 0)
                if stream is not None:
                    stream.to_target_trailers = list(e3.headers or ())
            elif kind is ev.StreamReset:
                self._client_reset(cast(ev.StreamReset, event))
                if self.closing:
                    return
            elif kind is ev.WindowUpdated:
                sid = cast(ev.WindowUpdated, event).stream_id
                targets = (
                    [self.streams[sid]] if sid in self.streams else list(self.streams.values())
                )
                for stream in targets:
                    self.send_response_data(stream)
            elif kind is ev.ConnectionTerminated:
                # The client opens no more streams; after a graceful GOAWAY the open ones
                # finish first.
                graceful = cast(ev.ConnectionTerminated, event).error_code == ErrorCodes.NO_ERROR
                if not graceful or not self.streams:
                    self.flush()
                    self._close()
                    return
                self.draining = True
        self.flush()
        for upstream in list(self.all_upstreams):
            upstream.flush()

    def _request(self, stream_id: int, headers: list[Header], ended: bool) -> None:
        if self.draining and stream_id > 0:
            self.conn.reset_stream(stream_id, ErrorCodes.REFUSED_STREAM)
            return
        t0 = time.perf_counter()
        routes = self.ctx.routes()
        try:
            request = read_request(headers, routes.header_names)
        except StreamRefused as exc:
            log.info("port %d: HTTP/2 stream %d refused: %s", self.ctx.port, stream_id, exc)
            self.stats.count("-", "bad_request")
            self.conn.reset_stream(stream_id, ErrorCodes.PROTOCOL_ERROR)
            return
        self.stats.ticks += 1
        decision = routes.decide(request.method, request.path, request.headers)
        stream = H2Stream(stream_id, headers, decision.route, request.grpc, t0)
        stream.intercept = decision.intercept
        stream.request_ended = ended  # HEADERS with END_STREAM: sent on the same way
        self.streams[stream_id] = stream
        self._upstream(decision.target).open(stream)

    def _upstream(self, target: Target, *, fresh: bool = False) -> H2Upstream:
        upstream = None if fresh else self.upstreams.get(target.label)
        if upstream is None or not upstream.usable:
            upstream = H2Upstream(self, target)
            self.all_upstreams.add(upstream)
            if not fresh:
                self.upstreams[target.label] = upstream
            asyncio.get_running_loop().create_task(self._connect(upstream))
        return upstream

    async def _connect(self, upstream: H2Upstream) -> None:
        why = await connect_within(
            upstream.target, lambda: upstream, self.ctx.connect_timeout, self.ctx.port
        )
        if why:
            self._unreachable(upstream, why)
        elif self.closing:
            upstream.close()

    def _client_reset(self, event: ev.StreamReset) -> None:
        stream = self.streams.pop(event.stream_id or 0, None)
        if stream is not None:
            self._ack_unsent(stream)
            if stream.upstream is not None:
                stream.upstream.cancel(stream, int(event.error_code or ErrorCodes.CANCEL))
            self.stats.count(stream.route, "reset")
        now = time.monotonic()
        self.resets.append(now)
        if len(self.resets) > MAX_RESETS:
            if now - self.resets[0] < RESET_WINDOW:
                log.warning(
                    "port %d: HTTP/2 client reset %d streams in under %.0f s; closing",
                    self.ctx.port,
                    len(self.resets),
                    RESET_WINDOW,
                )
                self._goaway(ErrorCodes.ENHANCE_YOUR_CALM, keep_streams=False)
                self.abort()
                self.closing = True
                return
            del self.resets[: len(self.resets) - MAX_RESETS]

    def _ack_unsent(self, stream: H2Stream) -> None:
        """Data of a stream that ends before it was handed on still counts against the
        connection's window: give it back."""
        for _, flow in stream.to_target:
            if flow:
                self.conn.acknowledge_received_data(flow, stream.client_id)
        stream.to_target.clear()

    # -- called by the upstreams ------------------------------------------------------------
    def request_sent(self, stream: H2Stream) -> None:
        """The stream's headers went to its target: the added latency ends here."""
        if not stream.observed:
            stream.observed = True
            if not self.stats.ticks & 15:
                self.stats.observe(time.perf_counter() - stream.t0)

    def response_headers(
        self, stream: H2Stream, headers: list[Header], *, final: bool, end: bool
    ) -> None:
        if stream.client_id not in self.streams:
            return
        try:
            self.conn.send_headers(stream.client_id, headers, end_stream=end)
        except (StreamClosedError, ProtocolError) as exc:
            log.info("port %d: response headers not forwarded: %s", self.ctx.port, exc)
            self._end_at_target(stream, ErrorCodes.PROTOCOL_ERROR)
            return
        if final:
            stream.response_started = True
            stream.replay = None
        if end:
            self._response_done(stream)

    def send_response_data(self, stream: H2Stream) -> None:
        """The target's data, trailers and end of `stream`, as far as the windows allow."""
        if self.paused or self.closing or stream.client_id not in self.streams:
            return
        upstream = stream.upstream
        assert upstream is not None
        try:
            if not pump(self.conn, stream.client_id, stream.to_client, upstream.conn, stream.up_id):
                return
            if not stream.to_client_end:
                return
            if stream.to_client_trailers is not None:
                self.conn.send_headers(stream.client_id, stream.to_client_trailers, end_stream=True)
            else:
                self.conn.end_stream(stream.client_id)
        except StreamClosedError:
            self._end_at_target(stream, ErrorCodes.CANCEL)
            return
        self._response_done(stream)

    def _response_done(self, stream: H2Stream) -> None:
        forwarded = self.stats.forwarded
        forwarded[stream.route] = forwarded.get(stream.route, 0) + 1
        self._finished(stream)

    def _finished(self, stream: H2Stream) -> None:
        del self.streams[stream.client_id]
        if stream.upstream is not None:
            stream.upstream.finished(stream)
        self._ack_unsent(stream)
        if not stream.request_ended:
            # The response is complete before the request: the rest of it is not wanted
            # (RFC 9113 §8.1), which the client learns from a reset with NO_ERROR.
            self.conn.reset_stream(stream.client_id, ErrorCodes.NO_ERROR)
        self._close_if_drained()

    def _end_at_target(self, stream: H2Stream, code: int) -> None:
        self.streams.pop(stream.client_id, None)
        if stream.upstream is not None:
            stream.upstream.cancel(stream, code)

    def target_reset(self, stream: H2Stream, code: int) -> None:
        """The target reset the stream (or will never answer it): reset it to the client."""
        if self.streams.pop(stream.client_id, None) is None:
            return
        self._ack_unsent(stream)
        self.stats.count(stream.route, "upstream_error" if code else "forwarded")
        with contextlib.suppress(StreamClosedError, ProtocolError):
            self.conn.reset_stream(stream.client_id, code)
        self._close_if_drained()

    def forget(self, upstream: H2Upstream) -> None:
        """`upstream` takes no new streams (it is going away, or it failed)."""
        if self.upstreams.get(upstream.target.label) is upstream:
            del self.upstreams[upstream.target.label]

    def reroute(self, stream: H2Stream) -> None:
        """A stream that its upstream never sent: to a new connection to the same target."""
        if stream.client_id in self.streams:
            self._upstream(
                stream.upstream.target if stream.upstream else self.ctx.routes().app
            ).open(stream)

    def upstream_lost(self, upstream: H2Upstream, reason: str) -> None:
        self.forget(upstream)
        self.all_upstreams.discard(upstream)
        if self.closing:
            return
        for stream in [*upstream.waiting, *upstream.streams.values()]:
            if stream.client_id not in self.streams:
                continue
            if stream.response_started:
                self.target_reset(stream, ErrorCodes.INTERNAL_ERROR)
            else:
                self.stats.count(stream.route, "upstream_error")
                self._answer(stream, f"{upstream.target.label} closed the connection ({reason})")
        upstream.waiting.clear()
        upstream.streams.clear()
        self.flush()

    def _unreachable(self, upstream: H2Upstream, reason: str) -> None:
        upstream.failed = upstream.closed = True
        self.forget(upstream)
        self.all_upstreams.discard(upstream)
        if self.closing:
            return
        log.warning("port %d: cannot reach %s: %s", self.ctx.port, upstream.target.label, reason)
        waiting = list(upstream.waiting)
        upstream.waiting.clear()
        app: H2Upstream | None = None
        for stream in waiting:
            if stream.client_id not in self.streams:
                continue
            if stream.intercept is not None and stream.intercept.fallback_to_app:
                # The intercept asked for the app when its target is unreachable; nothing of the
                # stream has been sent yet, so it is simply sent there.
                if app is None:
                    app = self._upstream(self.ctx.routes().app, fresh=True)
                self.stats.count(stream.route, "fallback")
                app.open(stream)
                continue
            self.stats.count(stream.route, "unreachable")
            what = "app" if stream.route == APP_ROUTE else f"intercept {stream.route!r} target"
            self._answer(stream, f"{what} {upstream.target.label} unreachable: {reason}")
        self.flush()

    def _answer(self, stream: H2Stream, detail: str) -> None:
        """Answer `stream` here (502, or gRPC UNAVAILABLE); the rest of its request is not
        wanted (RST_STREAM NO_ERROR, RFC 9113 §8.1)."""
        self.streams.pop(stream.client_id, None)
        self._ack_unsent(stream)
        conn = self.conn
        try:
            conn.send_headers(
                stream.client_id, unreachable_response(stream.grpc, detail), end_stream=True
            )
            if not stream.request_ended:
                conn.reset_stream(stream.client_id, ErrorCodes.NO_ERROR)
        except (StreamClosedError, ProtocolError):
            pass
        self._close_if_drained()
