"""Hostile HTTP/2 clients against an HTTP-mode port: hand-made frames (hyperframe, hpack) on a
raw socket. Each attack is answered as RFC 9113 says (GOAWAY or RST_STREAM with the right
code), memory stays bounded, and a real gRPC client on another connection is served
throughout."""

from __future__ import annotations

import socket
import struct
import threading
import time
from collections.abc import Iterator

import grpc
import hpack
import pytest
from h2.errors import ErrorCodes
from hyperframe.frame import (
    ContinuationFrame,
    DataFrame,
    Frame,
    GoAwayFrame,
    HeadersFrame,
    PingFrame,
    PriorityFrame,
    RstStreamFrame,
    SettingsFrame,
    WindowUpdateFrame,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tpproxy.http.h2_proxy import H2Proxy
from tpproxy.http.h2_streams import MAX_CONCURRENT_STREAMS, MAX_RESETS, STREAM_WINDOW
from tpproxy.http.protocol import HttpSettings

from .grpc_helpers import SERVICE, GrpcRig, dev, running_rig, unary

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE = range(9)
CONTINUATION = 9
END_STREAM, END_HEADERS, PADDED, PRIORITY_FLAG, ACK = 0x1, 0x4, 0x8, 0x20, 0x1


def raw(kind: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    """A frame as bytes, whatever its fields: what hyperframe would refuse to build."""
    return (
        struct.pack(">I", len(payload))[1:]
        + bytes([kind, flags])
        + struct.pack(">I", stream_id)
        + payload
    )


@pytest.fixture(scope="module")
def rig() -> Iterator[GrpcRig]:
    with running_rig() as r:
        yield r


class RawClient:
    """A blocking socket that speaks frames; every read is bounded by a deadline."""

    def __init__(self, port: int, *, settings: dict[int, int] | None = None) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        self.encoder = hpack.Encoder()
        self.buffer = b""
        self.closed = False
        hello = SettingsFrame(0, settings=settings or {})
        self.sock.sendall(PREFACE + hello.serialize())

    def send(self, *frames: Frame | bytes) -> None:
        data = b"".join(f if isinstance(f, bytes) else f.serialize() for f in frames)
        try:
            self.sock.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            self.closed = True

    def request(self, stream_id: int, method: str = "Unary", *, end: bool = False) -> HeadersFrame:
        block = self.encoder.encode(
            [
                (":method", "POST"),
                (":scheme", "http"),
                (":path", SERVICE + method),
                (":authority", "test"),
                ("content-type", "application/grpc"),
                ("te", "trailers"),
            ]
        )
        flags = ["END_HEADERS", "END_STREAM"] if end else ["END_HEADERS"]
        return HeadersFrame(stream_id, block, flags=flags)

    def frames(self, within: float = 5.0) -> Iterator[Frame]:
        """Frames as they arrive, until the peer closes or `within` seconds pass."""
        deadline = time.monotonic() + within
        while not self.closed:
            while len(self.buffer) >= 9:
                frame, length = Frame.parse_frame_header(memoryview(self.buffer[:9]))
                if len(self.buffer) < 9 + length:
                    break
                frame.parse_body(memoryview(self.buffer[9 : 9 + length]))
                self.buffer = self.buffer[9 + length :]
                yield frame
            left = deadline - time.monotonic()
            if left <= 0:
                return
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                return
            except ConnectionResetError:
                data = b""
            if not data:
                self.closed = True
                return
            self.buffer += data

    def goaway(self, within: float = 5.0) -> GoAwayFrame:
        """The GOAWAY the proxy sends, after which it closes the connection."""
        found = [f for f in self.frames(within) if isinstance(f, GoAwayFrame)]
        assert found, "no GOAWAY"
        assert self.closed, "the connection stayed open after GOAWAY"
        return found[0]

    def close(self) -> None:
        self.sock.close()


def served(rig: GrpcRig) -> None:
    """Another connection, a real gRPC client: still served by app and intercept."""
    with rig.channel() as channel:
        assert unary(channel)(b"ok", metadata=dev("alice"), timeout=5) == b"alice:ok"
        assert unary(channel)(b"ok", timeout=5) == b"app:ok"


def proxies(rig: GrpcRig) -> list[H2Proxy]:
    return rig.engine.run(lambda: [c for c in rig.engine.engine._open if isinstance(c, H2Proxy)])


def no_leak(rig: GrpcRig) -> None:
    """Once the hostile connection is gone, nothing of it is left in the engine: no HTTP/2
    connection, and so none of its streams or upstream connections."""
    deadline = time.monotonic() + 5
    while proxies(rig) and time.monotonic() < deadline:
        time.sleep(0.01)
    left = proxies(rig)
    assert left == [], [(len(p.streams), len(p.all_upstreams)) for p in left]


def test_malformed_frames_end_the_connection_with_the_right_code(rig: GrpcRig) -> None:
    cases = [
        (raw(PING, 0, 0, b"1234567"), ErrorCodes.FRAME_SIZE_ERROR),  # PING is 8 bytes
        (raw(DATA, 0, 0, b"x"), ErrorCodes.PROTOCOL_ERROR),  # DATA on stream 0
        (raw(WINDOW_UPDATE, 0, 0, struct.pack(">I", 0)), ErrorCodes.PROTOCOL_ERROR),
        (raw(HEADERS, END_HEADERS, 2, b""), ErrorCodes.PROTOCOL_ERROR),  # even id from a client
        (raw(CONTINUATION, END_HEADERS, 1, b"x"), ErrorCodes.PROTOCOL_ERROR),  # no HEADERS first
        (raw(SETTINGS, 0, 0, b"\x00\x02\x00\x00\x00\x05"), ErrorCodes.PROTOCOL_ERROR),  # push=5
        (raw(PUSH_PROMISE, END_HEADERS, 1, b"\x00\x00\x00\x02"), ErrorCodes.PROTOCOL_ERROR),
        (raw(DATA, 0, 1, b"x"), ErrorCodes.PROTOCOL_ERROR),  # DATA on an idle stream
    ]
    for frame, code in cases:
        client = RawClient(rig.port)
        try:
            client.send(frame)
            assert client.goaway().error_code == code, frame
        finally:
            client.close()
    client = RawClient(rig.port)
    client.send(HeadersFrame(1, b"\xff\xff\xff\xff", flags=["END_HEADERS"]))  # bad HPACK
    assert client.goaway().error_code == ErrorCodes.COMPRESSION_ERROR
    client.close()
    served(rig)
    no_leak(rig)


def test_streams_past_the_advertised_limit_are_refused(rig: GrpcRig) -> None:
    client = RawClient(rig.port)
    try:
        settings = next(f for f in client.frames() if isinstance(f, SettingsFrame))
        assert settings.settings[SettingsFrame.MAX_CONCURRENT_STREAMS] == MAX_CONCURRENT_STREAMS
        client.send(SettingsFrame(0, flags=["ACK"]))
        client.send(
            *[client.request(1 + 2 * i, "Hang") for i in range(MAX_CONCURRENT_STREAMS + 20)]
        )
        assert client.goaway().error_code == ErrorCodes.PROTOCOL_ERROR
    finally:
        client.close()
    served(rig)
    no_leak(rig)


def test_hpack_bomb_is_cut_off(rig: GrpcRig) -> None:
    client = RawClient(rig.port)
    try:
        # One 4 KiB header put in the dynamic table, then referenced by index (one byte each)
        # until the decoded block would be 1 MiB: far past the 64 KiB the proxy allows.
        block = client.encoder.encode(
            [
                (":method", "POST"),
                (":path", SERVICE + "Unary"),
                (":scheme", "http"),
                ("x-big", "b" * 4000),
            ]
        )
        block += bytes([0x80 | 62]) * 256
        client.send(HeadersFrame(1, block, flags=["END_HEADERS"]))
        assert client.goaway().error_code in (
            ErrorCodes.ENHANCE_YOUR_CALM,
            ErrorCodes.COMPRESSION_ERROR,
            ErrorCodes.PROTOCOL_ERROR,
        )
    finally:
        client.close()
    served(rig)
    no_leak(rig)


def test_window_update_overflow_is_a_flow_control_error(rig: GrpcRig) -> None:
    client = RawClient(rig.port)
    try:
        client.send(WindowUpdateFrame(0, 2**31 - 1), WindowUpdateFrame(0, 2**31 - 1))
        assert client.goaway().error_code == ErrorCodes.FLOW_CONTROL_ERROR
    finally:
        client.close()
    # On a stream: the stream is reset, the connection goes on.
    client = RawClient(rig.port)
    try:
        client.send(client.request(1, "Hang"))
        client.send(WindowUpdateFrame(1, 2**31 - 1), WindowUpdateFrame(1, 2**31 - 1))
        resets = [f for f in client.frames(3) if isinstance(f, RstStreamFrame | GoAwayFrame)]
        assert resets
        assert resets[0].error_code == ErrorCodes.FLOW_CONTROL_ERROR
    finally:
        client.close()
    served(rig)
    no_leak(rig)


def test_continuation_flood_is_cut_off(rig: GrpcRig) -> None:
    client = RawClient(rig.port)
    try:
        client.send(HeadersFrame(1, client.encoder.encode([(":method", "POST")])))
        for _ in range(200):
            client.send(ContinuationFrame(1, b"\x00\x01a\x01b"))
            if client.closed:
                break
        assert client.goaway().error_code in (
            ErrorCodes.PROTOCOL_ERROR,
            ErrorCodes.ENHANCE_YOUR_CALM,
        )
    finally:
        client.close()
    served(rig)
    no_leak(rig)


def test_rapid_reset_is_cut_off(rig: GrpcRig) -> None:
    client = RawClient(rig.port)
    try:
        for i in range(MAX_RESETS + 50):
            stream_id = 1 + 2 * i
            client.send(client.request(stream_id), RstStreamFrame(stream_id, ErrorCodes.CANCEL))
            if client.closed:
                break
        assert client.goaway(within=10).error_code == ErrorCodes.ENHANCE_YOUR_CALM
    finally:
        client.close()
    served(rig)
    no_leak(rig)


def _grpc_message(payload: bytes) -> bytes:
    return b"\x00" + struct.pack(">I", len(payload)) + payload


def test_slow_reader_holds_bounded_memory(rig: GrpcRig) -> None:
    """A client that opens every window and then reads nothing: the proxy holds at most about
    one stream window plus one write buffer, whatever the target would send."""
    client = RawClient(rig.port, settings={SettingsFrame.INITIAL_WINDOW_SIZE: 2**31 - 1})
    try:
        client.send(WindowUpdateFrame(0, 2**31 - 1 - 65535))
        client.send(client.request(1, "ServerStream"))
        client.send(DataFrame(1, _grpc_message(b"256x1048576"), flags=["END_STREAM"]))
        peak = 0
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:  # sampled for 3 s while the target is held back
            peak = max(peak, rig.engine.run(lambda: _held(rig)))
            time.sleep(0.05)
        assert 0 < peak <= STREAM_WINDOW + 2 * (256 << 10) + (64 << 10), peak
        served(rig)
    finally:
        client.close()
    no_leak(rig)


def _held(rig: GrpcRig) -> int:
    total = 0
    for proxy in [c for c in rig.engine.engine._open if isinstance(c, H2Proxy)]:
        if proxy.transport is not None:
            total += proxy.transport.get_write_buffer_size()
        for stream in proxy.streams.values():
            total += sum(len(piece) for piece, _ in stream.to_client)
    return total


FRAMES = st.one_of(
    st.builds(raw, st.integers(0, 12), st.integers(0, 255), st.integers(0, 9),
              st.binary(max_size=48)),
    st.builds(lambda s, d, e: DataFrame(s, d, flags=["END_STREAM"] if e else []),
              st.integers(1, 7), st.binary(max_size=64), st.booleans()),
    st.builds(lambda s, d, e: HeadersFrame(s, d, flags=["END_HEADERS", *(["END_STREAM"] if e else [])]),
              st.integers(1, 7), st.binary(max_size=32), st.booleans()),
    st.builds(lambda s: PriorityFrame(s, depends_on=s), st.integers(1, 7)),
    st.builds(lambda s, c: RstStreamFrame(s, c), st.integers(1, 7), st.integers(0, 20)),
    st.builds(lambda a: SettingsFrame(0, settings={1: a, 4: a}), st.integers(0, 2**31 - 1)),
    st.builds(lambda d: PingFrame(0, d), st.binary(min_size=8, max_size=8)),
    st.builds(lambda s, i: WindowUpdateFrame(s, i), st.integers(0, 7), st.integers(1, 2**31 - 1)),
    st.builds(lambda s, d: ContinuationFrame(s, d), st.integers(1, 7), st.binary(max_size=32)),
    st.builds(lambda c: GoAwayFrame(0, 0, c), st.integers(0, 13)),
    st.binary(min_size=1, max_size=40),
)  # fmt: skip


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(st.lists(FRAMES, max_size=12), st.booleans())
def test_random_frame_sequences_never_crash_or_leak(
    rig: GrpcRig, frames: list[Frame | bytes], valid_start: bool
) -> None:
    client = RawClient(rig.port)
    try:
        if valid_start:
            client.send(client.request(1, "Unary"))
        client.send(*frames)
        client.sock.shutdown(socket.SHUT_WR)
        for _ in client.frames(2):
            pass
    finally:
        client.close()
    no_leak(rig)


def test_still_served_after_the_fuzzing(rig: GrpcRig) -> None:
    served(rig)
    with rig.channel() as channel:
        stream: grpc.UnaryStreamMultiCallable[bytes, bytes]
        stream = channel.unary_stream(SERVICE + "ServerStream")
        assert len(list(stream(b"3", metadata=dev("alice"), timeout=5))) == 3


def test_idle_connection_and_drain_end_with_goaway() -> None:
    with running_rig(HttpSettings(idle_timeout=1.0)) as rig:
        idle = RawClient(rig.port)
        try:
            t0 = time.monotonic()
            goaway = idle.goaway(within=5)
            assert goaway.error_code == ErrorCodes.NO_ERROR
            assert 0.9 < time.monotonic() - t0 < 4
        finally:
            idle.close()
        busy = RawClient(rig.port)
        try:
            busy.send(SettingsFrame(0, flags=["ACK"]), busy.request(1, "Hang"))
            busy.send(DataFrame(1, _grpc_message(b"1.0"), flags=["END_STREAM"]))
            assert rig.app.hang_started.wait(5)
            drained: list[int] = []
            threading.Thread(
                target=lambda: drained.append(rig.engine.call(rig.engine.engine.drain(10))),
                daemon=True,
            ).start()
            frames = list(busy.frames(8))
            kinds = [type(f).__name__ for f in frames]
            first_goaway = kinds.index("GoAwayFrame")
            last = frames[first_goaway]
            assert isinstance(last, GoAwayFrame)
            assert last.last_stream_id == 1
            assert "HeadersFrame" in kinds[first_goaway:], kinds  # the open call was answered
            assert busy.closed
        finally:
            busy.close()


def test_ping_and_settings_are_answered_per_hop(rig: GrpcRig) -> None:
    client = RawClient(rig.port, settings={SettingsFrame.MAX_FRAME_SIZE: 1 << 20})
    try:
        client.send(PingFrame(0, b"12345678"))
        seen = list(client.frames(1))
        acks = [f for f in seen if isinstance(f, PingFrame) and "ACK" in f.flags]
        assert [a.opaque_data for a in acks] == [b"12345678"]
        assert any(isinstance(f, SettingsFrame) and "ACK" in f.flags for f in seen)
        assert not client.closed
    finally:
        client.close()
