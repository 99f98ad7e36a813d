"""HTTP/2 decisions as plain functions (sans-IO): what a stream asks for, how it is routed, what
the proxy answers itself, and the limits both sides of a relayed connection use.

The frames themselves are h2's (python-hyper): it parses and validates them, keeps the
flow-control windows and the HPACK tables. What is ours is kept out of the protocol classes so
that it is tested without sockets: reading a request's routing inputs from its header block
(pseudo-headers and gRPC metadata are ordinary headers to the rules), and the responses the
proxy makes when a stream cannot reach its target (`:status 502`, or gRPC's UNAVAILABLE as a
trailers-only response, which is what a gRPC client understands).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from h2.config import H2Configuration
from h2.connection import ConnectionState, H2Connection
from h2.errors import ErrorCodes
from h2.events import Event
from h2.exceptions import ProtocolError
from h2.settings import SettingCodes
from hpack.exceptions import HPACKError, OversizedHeaderListError
from hyperframe.frame import Frame, GoAwayFrame

from tpproxy.routing import split_target

Header = tuple[bytes, bytes]

# What the proxy advertises and holds on each side. A stream's unforwarded data is at most its
# receive window, a connection's at most the connection window: data is acknowledged (the
# window reopened) only once it has been handed on, so a slow reader on one side closes the
# window of the other instead of filling memory.
STREAM_WINDOW = 1 << 20
CONNECTION_WINDOW = 4 << 20
MAX_CONCURRENT_STREAMS = 128
MAX_FRAME_SIZE = 1 << 14  # the protocol's minimum: every peer must take it
MAX_HEADER_LIST_SIZE = 64 << 10  # decoded header bytes of one block: bounds an HPACK bomb
MAX_HEADER_TABLE_SIZE = 4096
# A peer that resets streams as fast as it opens them makes the proxy open (and reset) a stream
# at the target for each, for the price of two frames (CVE-2023-44487). Past this many resets
# by the client within RESET_WINDOW seconds, the connection ends with ENHANCE_YOUR_CALM.
MAX_RESETS = 200
RESET_WINDOW = 1.0

GRPC_UNAVAILABLE = 14
# Service port appProtocols that say the port speaks HTTP/2 in plaintext (gRPC included).
HTTP2_APP_PROTOCOLS = frozenset({"grpc", "h2c", "kubernetes.io/h2c", "http2"})


class StreamRefused(ValueError):
    """A request header block the proxy cannot route; the message names the header."""


@dataclass(frozen=True, slots=True)
class StreamRequest:
    """What the rules read of one stream's request headers."""

    method: str
    path: str  # without the query string
    headers: dict[str, list[str]]  # only the names the port's rules ask for, lower-case
    grpc: bool


def read_request(block: Sequence[Header], names: frozenset[bytes]) -> StreamRequest:
    """The routing inputs of a request header block (h2 has validated its syntax already).

    `names` are the header names the port's rules read; gRPC metadata is a header like any
    other (`x-dev: alice` in a call's metadata is the header `x-dev`).
    """
    method = path = b""
    grpc = False
    headers: dict[str, list[str]] = {}
    for name, value in block:
        if name[:1] == b":":
            if name == b":method":
                method = value
            elif name == b":path":
                path = value
            continue
        if name == b"content-type" and value.startswith(b"application/grpc"):
            grpc = True
        if name in names:
            headers.setdefault(name.decode("latin-1"), []).append(value.decode("latin-1"))
    if not method:
        raise StreamRefused("request without :method")
    if not path and method != b"CONNECT":
        raise StreamRefused("request without :path")
    return StreamRequest(
        method.decode("latin-1"), split_target(path.decode("latin-1"))[0], headers, grpc
    )


def unreachable_response(grpc: bool, detail: str) -> list[Header]:
    """The header block (sent with END_STREAM) that answers a stream its target did not take.

    For gRPC this is a trailers-only response with status UNAVAILABLE, which clients report as
    such (and may retry); for other requests `:status 502`.
    """
    message = _grpc_message(detail)
    if grpc:
        return [
            (b":status", b"200"),
            (b"content-type", b"application/grpc"),
            (b"grpc-status", str(GRPC_UNAVAILABLE).encode()),
            (b"grpc-message", message),
        ]
    return [(b":status", b"502"), (b"x-tpproxy-error", message)]


def _grpc_message(text: str) -> bytes:
    """Percent-encoded as gRPC asks of `grpc-message` (and safe as any header value)."""
    out = bytearray()
    for byte in text.encode("utf-8")[:512]:
        if 0x20 <= byte <= 0x7E and byte != 0x25:
            out.append(byte)
        else:
            out += b"%%%02X" % byte
    return bytes(out)


def goaway_code(error: ProtocolError) -> int:
    """The GOAWAY code for a connection error h2 raised. h2 says PROTOCOL_ERROR for a field
    block it cannot decode; RFC 9113 §4.3 asks for COMPRESSION_ERROR there (a block too large
    once decoded stays h2's ENHANCE_YOUR_CALM)."""
    cause = error.__cause__
    if isinstance(cause, HPACKError) and not isinstance(cause, OversizedHeaderListError):
        return int(ErrorCodes.COMPRESSION_ERROR)
    return int(error.error_code)


def config(client_side: bool) -> H2Configuration:
    """h2's configuration for one side of a relayed connection.

    Headers stay bytes (no decoding per header: they are forwarded as received), inbound ones
    are validated (pseudo-headers, connection-specific headers, case), and flow control is
    acknowledged by the proxy itself once data has been forwarded.
    """
    return H2Configuration(
        client_side=client_side,
        header_encoding=None,
        validate_inbound_headers=True,
        validate_outbound_headers=False,  # forwarded as the peer sent them, after h2 checked
        normalize_inbound_headers=True,
        normalize_outbound_headers=False,
    )


def local_settings() -> dict[SettingCodes, int]:
    """The SETTINGS the proxy sends on both sides."""
    return {
        SettingCodes.MAX_CONCURRENT_STREAMS: MAX_CONCURRENT_STREAMS,
        SettingCodes.INITIAL_WINDOW_SIZE: STREAM_WINDOW,
        SettingCodes.MAX_FRAME_SIZE: MAX_FRAME_SIZE,
        SettingCodes.MAX_HEADER_LIST_SIZE: MAX_HEADER_LIST_SIZE,
        SettingCodes.HEADER_TABLE_SIZE: MAX_HEADER_TABLE_SIZE,
        SettingCodes.ENABLE_PUSH: 0,
    }


class RelayConnection(H2Connection):
    """h2's connection, except that a GOAWAY with NO_ERROR stops only new streams.

    RFC 9113 §6.8 lets the streams up to the GOAWAY's last stream id finish (a gRPC server's
    graceful stop relies on it); h2 ends the whole connection at any GOAWAY, so the open state is
    put back after h2 has read the frame (and fired its ConnectionTerminated event).
    """

    def _receive_goaway_frame(self, frame: GoAwayFrame) -> tuple[list[Frame], list[Event]]:
        state = self.state_machine.state
        frames, events = super()._receive_goaway_frame(frame)
        if frame.error_code == ErrorCodes.NO_ERROR and state in (
            ConnectionState.CLIENT_OPEN,
            ConnectionState.SERVER_OPEN,
        ):
            self.state_machine.state = state
        return frames, events
