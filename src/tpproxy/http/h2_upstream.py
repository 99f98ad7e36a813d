"""HTTP/2 mode's upstream side: one HTTP/2 connection to a target (`H2Upstream`), shared by the
streams of one client connection that are routed there, and the relayed stream (`H2Stream`).

Data moves between the two connections without piling up: a DATA frame's bytes are
acknowledged to their sender (its window reopened) only once they are handed to the other
connection, and nothing is handed to a connection whose transport is above its high-water mark.
A slow reader on either side therefore closes the window of the other.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from typing import TYPE_CHECKING, cast

import h2.events as ev
from h2.errors import ErrorCodes
from h2.exceptions import ProtocolError, StreamClosedError, TooManyStreamsError
from h2.settings import Settings

from tpproxy.http.h2_streams import (
    CONNECTION_WINDOW,
    Header,
    RelayConnection,
    config,
    local_settings,
)
from tpproxy.routing import HttpIntercept
from tpproxy.targets import Target

if TYPE_CHECKING:
    from tpproxy.http.h2_proxy import H2Proxy

log = logging.getLogger("tpproxy.http2")

WRITE_HIGH_WATER = 256 * 1024
WRITE_LOW_WATER = 64 * 1024
DEFAULT_WINDOW = 65535
# A stream's request data is kept until its response starts, up to REPLAY_LIMIT bytes, so that
# a stream the target refuses unprocessed can be sent again (at most MAX_TRIES times).
REPLAY_LIMIT = 64 * 1024
MAX_TRIES = 8


class H2Stream:
    """One client stream and its counterpart at the target."""

    __slots__ = (
        "client_id",
        "grpc",
        "headers",
        "intercept",
        "observed",
        "replay",
        "request_ended",
        "response_started",
        "route",
        "t0",
        "to_client",
        "to_client_end",
        "to_client_trailers",
        "to_target",
        "to_target_end",
        "to_target_trailers",
        "tries",
        "up_id",
        "upstream",
    )

    def __init__(
        self, client_id: int, headers: list[Header], route: str, grpc: bool, t0: float
    ) -> None:
        self.client_id = client_id
        self.headers = headers  # the request block (kept: a refused stream is sent again)
        self.replay: list[bytes] | None = []
        self.tries = 0
        self.route = route
        self.grpc = grpc
        self.t0 = t0
        self.intercept: HttpIntercept | None = None
        self.upstream: H2Upstream | None = None
        self.up_id = 0
        # Data not yet handed on, with the flow-controlled size still to acknowledge (padding
        # included), per direction; the end of each direction, and its trailers.
        self.to_target: deque[tuple[memoryview, int]] = deque()
        self.to_target_end = False
        self.to_target_trailers: list[Header] | None = None
        self.to_client: deque[tuple[memoryview, int]] = deque()
        self.to_client_end = False
        self.to_client_trailers: list[Header] | None = None
        self.request_ended = False
        self.response_started = False
        self.observed = False


def pump(
    sender: RelayConnection,
    stream_id: int,
    queue: deque[tuple[memoryview, int]],
    ack: RelayConnection,
    ack_id: int,
    sent: list[bytes] | None = None,
) -> bool:
    """Move queued data onto `sender`'s stream as far as its windows allow, acknowledging each
    byte to `ack` as it goes (and keeping a copy in `sent`, if given); True when the queue is
    empty."""
    while queue:
        piece, flow = queue[0]
        room = min(
            sender.local_flow_control_window(stream_id),
            sender.max_outbound_frame_size,
            len(piece),
        )
        if room <= 0 and piece:
            return False
        if room:
            chunk = piece[:room].tobytes()
            sender.send_data(stream_id, chunk)
            if sent is not None:
                sent.append(chunk)
        rest = piece[room:]
        if rest:
            acked = min(room, flow)
            queue[0] = (rest, flow - acked)
            if acked:
                ack.acknowledge_received_data(acked, ack_id)
        else:
            queue.popleft()
            if flow:
                ack.acknowledge_received_data(flow, ack_id)
    return True


class FlowControlledSide(asyncio.Protocol):
    """One side of a relayed HTTP/2 connection: nothing more is handed to it while its
    transport is above the high-water mark, and what waited moves on when it drains."""

    paused = False

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        self.writable_again()

    def writable_again(self) -> None:
        raise NotImplementedError


class H2Upstream(FlowControlledSide):
    """The HTTP/2 connection to one target, for the streams one client connection sends there."""

    def __init__(self, client: H2Proxy, target: Target) -> None:
        self.client = client
        self.target = target
        self.conn = RelayConnection(config(client_side=True))
        self.conn.local_settings = Settings(client=True, initial_values=local_settings())
        self.transport: asyncio.Transport | None = None
        self.streams: dict[int, H2Stream] = {}  # by the target's stream id
        self.waiting: deque[H2Stream] = deque()  # not sent yet: connecting, or at its limit
        self.closed = False
        self.failed = False
        self.going_away = False
        # Streams wait for the target's first SETTINGS: until then its limit on concurrent
        # streams is unknown, and a stream past it would be refused.
        self.settled = False
        # What the target really takes at once: its advertised limit, lowered to the streams it
        # had open when it refused one, raised by one again with every stream that ends.
        self.cap = 1 << 31

    # -- connection life --------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)
        self.transport = transport
        transport.set_write_buffer_limits(WRITE_HIGH_WATER, WRITE_LOW_WATER)
        self.conn.initiate_connection()
        self.conn.increment_flow_control_window(CONNECTION_WINDOW - DEFAULT_WINDOW)
        self.start_waiting()
        self.flush()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.client.upstream_lost(self, "connection lost" if exc is None else str(exc))

    def writable_again(self) -> None:
        for stream in list(self.streams.values()):
            self.send_request_data(stream)
        self.client.flush()
        self.flush()

    def flush(self) -> None:
        data = self.conn.data_to_send()
        if data and self.transport is not None and not self.closed:
            self.transport.write(data)

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.conn.close_connection()
            self.flush()
            self.transport.close()

    def abort(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()

    @property
    def usable(self) -> bool:
        """Whether new streams may be sent here."""
        return not (self.closed or self.failed or self.going_away)

    # -- streams ----------------------------------------------------------------------------
    def open(self, stream: H2Stream) -> None:
        """Send `stream`'s request when the connection is up and below the target's limit."""
        stream.upstream = self
        self.waiting.append(stream)
        if self.transport is not None:
            self.start_waiting()

    def start_waiting(self) -> None:
        conn = self.conn
        while self.waiting and self.settled:
            stream = self.waiting[0]
            if conn.open_outbound_streams >= min(
                conn.remote_settings.max_concurrent_streams, self.cap
            ):
                return
            up_id = conn.get_next_available_stream_id()
            try:
                # A request that ended with its HEADERS frame goes on ending with it.
                in_headers = stream.request_ended and not stream.to_target_end
                conn.send_headers(up_id, stream.headers, end_stream=in_headers)
            except TooManyStreamsError:
                return
            self.waiting.popleft()
            stream.up_id = up_id
            self.streams[up_id] = stream
            self.client.request_sent(stream)
            self.send_request_data(stream)

    def send_request_data(self, stream: H2Stream) -> None:
        """The client's data, end and trailers of `stream`, as far as the windows allow."""
        if not stream.up_id or self.paused or self.closed:
            return
        conn = self.conn
        try:
            replay = stream.replay
            done = pump(
                conn, stream.up_id, stream.to_target, self.client.conn, stream.client_id, replay
            )
            if replay is not None and sum(map(len, replay)) > REPLAY_LIMIT:
                stream.replay = None
            if not done:
                return
            if stream.to_target_end:
                stream.to_target_end = False
                if stream.to_target_trailers is not None:
                    conn.send_headers(stream.up_id, stream.to_target_trailers, end_stream=True)
                else:
                    conn.end_stream(stream.up_id)
        except StreamClosedError:
            pass  # the target reset it meanwhile; its reset is on its way to the client

    def _send_again(self, stream: H2Stream) -> bool:
        """A stream the target refused unprocessed (REFUSED_STREAM: a slot it had not freed
        yet, a limit it lowered) goes again, from its copy, if it still has one."""
        replay = stream.replay
        if replay is None or stream.tries >= MAX_TRIES or stream.response_started:
            return False
        stream.tries += 1
        self.cap = max(1, self.conn.open_outbound_streams)
        stream.to_target.extendleft((memoryview(chunk), 0) for chunk in reversed(replay))
        replay.clear()
        stream.to_target_end = stream.request_ended and bool(stream.to_target)
        stream.up_id = 0
        self.waiting.appendleft(stream)
        return True

    def cancel(self, stream: H2Stream, code: int) -> None:
        """The client reset `stream` (or went away): reset it at the target too."""
        if stream in self.waiting:
            self.waiting.remove(stream)
            return
        if self.streams.pop(stream.up_id, None) is not None and not self.closed:
            with contextlib.suppress(StreamClosedError, ProtocolError):
                self.conn.reset_stream(stream.up_id, code)
            self.start_waiting()

    def finished(self, stream: H2Stream) -> None:
        """`stream` is over on the client's side; its id is free for the next waiting one."""
        if self.streams.pop(stream.up_id, None) is not None:
            if self.cap < 1 << 31:
                self.cap += 1
            self.start_waiting()

    # -- target -> client -------------------------------------------------------------------
    def data_received(self, data: bytes) -> None:
        try:
            events = self.conn.receive_data(data)
        except ProtocolError as exc:
            log.warning("target %s broke HTTP/2: %s", self.target.label, exc)
            self.flush()
            self.failed = True
            self.abort()
            return
        client = self.client
        for event in events:
            kind = type(event)
            if kind is ev.DataReceived:
                e = cast(ev.DataReceived, event)
                stream = self.streams.get(e.stream_id or 0)
                if stream is None:
                    self.conn.acknowledge_received_data(e.flow_controlled_length, e.stream_id or 0)
                    continue
                stream.to_client.append((memoryview(e.data or b""), e.flow_controlled_length))
                client.send_response_data(stream)
            elif kind is ev.ResponseReceived or kind is ev.InformationalResponseReceived:
                e2 = cast(ev.ResponseReceived, event)
                stream = self.streams.get(e2.stream_id or 0)
                if stream is not None:
                    client.response_headers(
                        stream,
                        list(e2.headers or ()),
                        final=kind is ev.ResponseReceived,
                        end=e2.stream_ended is not None,  # trailers-only, as gRPC errors are
                    )
            elif kind is ev.TrailersReceived:
                e3 = cast(ev.TrailersReceived, event)
                stream = self.streams.get(e3.stream_id or 0)
                if stream is not None:
                    stream.to_client_trailers = list(e3.headers or ())
            elif kind is ev.StreamEnded:
                stream = self.streams.get(cast(ev.StreamEnded, event).stream_id or 0)
                if stream is not None:
                    stream.to_client_end = True
                    client.send_response_data(stream)
            elif kind is ev.StreamReset:
                e4 = cast(ev.StreamReset, event)
                stream = self.streams.pop(e4.stream_id or 0, None)
                if stream is not None:
                    code = int(e4.error_code or 0)
                    if code == ErrorCodes.REFUSED_STREAM and self._send_again(stream):
                        pass
                    else:
                        client.target_reset(stream, code)
                self.start_waiting()
            elif kind is ev.WindowUpdated:
                sid = cast(ev.WindowUpdated, event).stream_id
                for stream in (
                    [self.streams[sid]] if sid in self.streams else list(self.streams.values())
                ):
                    self.send_request_data(stream)
            elif kind is ev.RemoteSettingsChanged:
                self.settled = True
                self.start_waiting()
            elif kind is ev.ConnectionTerminated:
                self._goaway(cast(ev.ConnectionTerminated, event))
        self.flush()
        client.flush()

    def _goaway(self, event: ev.ConnectionTerminated) -> None:
        """The target is going away: no new streams here. The streams it did not take are
        refused to the client (which may retry them: REFUSED_STREAM says nothing was done);
        after a graceful GOAWAY the others finish, after an error they are answered now."""
        self.going_away = True
        self.client.forget(self)
        last = event.last_stream_id or 0
        graceful = event.error_code == ErrorCodes.NO_ERROR
        for up_id, stream in list(self.streams.items()):
            if up_id > last or not graceful:
                del self.streams[up_id]
                self.client.target_reset(
                    stream, ErrorCodes.REFUSED_STREAM if up_id > last else ErrorCodes.INTERNAL_ERROR
                )
        for stream in self.waiting:
            self.client.reroute(stream)
        self.waiting.clear()
        if not self.streams:
            self.close()
