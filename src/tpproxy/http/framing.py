"""HTTP/1.x framing decisions over bytes (sans-IO): where messages start and end.

The proxy forwards the bytes it received, unchanged; it only needs to know where each request
and response ends so that consecutive requests on one connection can go to different targets and
responses can be put back in request order. These functions decide that from the header fields,
and they refuse what would let two parties disagree about a message's end (request smuggling):
both Content-Length and Transfer-Encoding, conflicting Content-Lengths, a Transfer-Encoding that
does not end in chunked, malformed chunk sizes.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

Headers = Sequence[tuple[bytes, bytes]]

MAX_CHUNK_LINE = 4096
MAX_TRAILERS = 16 * 1024


class FramingError(ValueError):
    """A message whose length cannot be determined safely; the text says which header or byte.

    `status` is the answer a request with this error gets (400, or 501 for codings not supported).
    """

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True, slots=True)
class Framing:
    """How a message body is delimited: `length` bytes, chunked, until close, or a tunnel."""

    kind: str  # "length" | "chunked" | "close" | "tunnel"
    length: int = 0


NO_BODY = Framing("length", 0)
CHUNKED = Framing("chunked")
UNTIL_CLOSE = Framing("close")
TUNNEL = Framing("tunnel")


def _content_length(values: list[bytes]) -> int:
    if len(values) == 1 and values[0].isdigit() and len(values[0]) <= 18:
        return int(values[0])  # the usual case, decided without splitting
    lengths = set()
    for value in values:
        for part in value.split(b","):
            part = part.strip(b" \t")
            if not part.isdigit() or len(part) > 18:
                shown = part.decode("latin-1")
                raise FramingError(f"Content-Length {shown!r} is not a non-negative integer")
            lengths.add(int(part))
    if len(lengths) > 1:
        raise FramingError(f"conflicting Content-Length values {sorted(lengths)}")
    return lengths.pop()


def _codings(values: list[bytes]) -> list[bytes]:
    codings = [c.strip(b" \t").lower() for v in values for c in v.split(b",") if c.strip(b" \t")]
    if b"chunked" in codings[:-1]:
        raise FramingError("Transfer-Encoding: chunked must be the last coding, and only once")
    return codings


def _framing_fields(headers: Headers) -> tuple[list[bytes], list[bytes]]:
    lengths: list[bytes] = []
    encodings: list[bytes] = []
    for name, value in headers:
        if len(name) == 14 and name.lower() == b"content-length":
            lengths.append(value)
        elif len(name) == 17 and name.lower() == b"transfer-encoding":
            encodings.append(value)
    return lengths, encodings


def request_framing(headers: Headers, http10: bool) -> Framing:
    """The body framing of a request (RFC 9112 section 6.3); FramingError means answer 400."""
    lengths, encodings = _framing_fields(headers)
    return framing_of(lengths, encodings, http10)


def framing_of(lengths: list[bytes], encodings: list[bytes], http10: bool) -> Framing:
    """`request_framing` from the Content-Length and Transfer-Encoding values, already found."""
    if encodings:
        if lengths:
            raise FramingError("both Content-Length and Transfer-Encoding are present")
        if http10:
            raise FramingError("Transfer-Encoding is not allowed in an HTTP/1.0 request")
        codings = _codings(encodings)
        if not codings or codings[-1] != b"chunked":
            raise FramingError("Transfer-Encoding of a request must end in chunked")
        if len(codings) > 1:
            shown = b", ".join(codings).decode("latin-1")
            raise FramingError(f"Transfer-Encoding {shown!r} is not supported, only chunked")
        return CHUNKED
    if lengths:
        n = _content_length(lengths)
        return NO_BODY if n == 0 else Framing("length", n)
    return NO_BODY


def response_framing(status: int, request_method: str, headers: Headers) -> Framing:
    """The body framing of a response to `request_method`; FramingError means answer 502."""
    lengths, encodings = _framing_fields(headers)
    return _response_body(status, request_method, lengths, encodings)


def _response_body(
    status: int, request_method: str, lengths: list[bytes], encodings: list[bytes]
) -> Framing:
    if request_method == "CONNECT" and 200 <= status < 300:
        return TUNNEL
    if status == 101:
        return TUNNEL
    if status < 200 or status in (204, 304) or request_method == "HEAD":
        return NO_BODY
    if encodings:
        if lengths:
            raise FramingError("response has both Content-Length and Transfer-Encoding")
        codings = _codings(encodings)
        return CHUNKED if codings and codings[-1] == b"chunked" else UNTIL_CLOSE
    if lengths:
        return Framing("length", _content_length(lengths))
    return UNTIL_CLOSE


_RESPONSE_FIELDS = re.compile(
    rb"\r\n(content-length|transfer-encoding|connection)[ \t]*:[ \t]*([^\r\n]*?)[ \t]*(?=\r\n)",
    re.IGNORECASE,
)
_STATUS_LINE = re.compile(rb"HTTP/1\.([01]) ([0-9]{3})(?: [^\r\n]*)?\r\n")


@dataclass(frozen=True, slots=True)
class ResponseHead:
    """What the proxy needs from a response head: status, framing fields, keep-alive."""

    status: int
    http10: bool
    headers: list[tuple[bytes, bytes]]  # only the framing and connection fields

    def closes(self) -> bool:
        """Whether the server will close the connection after this response."""
        tokens = {
            t.strip().lower()
            for name, value in self.headers
            if name.lower() == b"connection"
            for t in value.split(b",")
        }
        if b"close" in tokens:
            return True
        return self.http10 and b"keep-alive" not in tokens


_NONE: list[bytes] = []  # shared and never appended to


def _values(low: bytes, marker: bytes) -> list[bytes]:
    """The values of every field whose lower-cased line starts with `marker` (`\r\nname:`)."""
    found = []
    at = low.find(marker)
    while at >= 0:
        stop = low.find(b"\r\n", at + len(marker))
        found.append(low[at + len(marker) : stop].strip(b" \t"))
        at = low.find(marker, stop)
    return found


def read_response_head(
    data: bytes, start: int, end: int, request_method: str
) -> tuple[int, str, int, bool]:
    """Status, body framing (kind and length) and whether the server closes after it, for the
    response head in `data[start:end]` (ending with CRLF CRLF).

    This runs for every response, so it looks for the three fields it needs with `find` on one
    lower-cased copy of the head (a regex pass costs twice as much). A field written with space
    before its colon is not recognised; without a length the body then runs until the server
    closes, which is safe.
    """
    match = _STATUS_LINE.match(data, start, end)
    if match is None:
        line = data[start:end].split(b"\r\n", 1)[0][:80].decode("latin-1")
        raise FramingError(f"malformed status line {line!r}")
    low = data[match.end() - 2 : end].lower()
    # `find`, not `in`: bytes.__contains__ first tries its argument as an int, and formats (then
    # drops) a TypeError for every bytes argument; that was 1% of the proxy's CPU.
    lengths = (
        _values(low, b"\r\ncontent-length:") if low.find(b"\r\ncontent-length:") >= 0 else _NONE
    )
    encodings = (
        _values(low, b"\r\ntransfer-encoding:")
        if low.find(b"\r\ntransfer-encoding:") >= 0
        else _NONE
    )
    close = keep_alive = False
    if low.find(b"\r\nconnection:") >= 0:
        for value in _values(low, b"\r\nconnection:"):
            if value == b"keep-alive":
                keep_alive = True
            elif value == b"close":
                close = True
            else:
                tokens = {t.strip(b" \t") for t in value.split(b",")}
                close = close or b"close" in tokens
                keep_alive = keep_alive or b"keep-alive" in tokens
    status = int(match[2])
    closes = close or (match[1] == b"0" and not keep_alive)
    if (
        lengths
        and not encodings
        and status >= 200
        and status not in (204, 304)
        and (request_method not in ("HEAD", "CONNECT"))
    ):
        return status, "length", _content_length(lengths), closes
    framing = _response_body(status, request_method, lengths, encodings)
    return status, framing.kind, framing.length, closes


def parse_response_head(head: bytes) -> ResponseHead:
    """The status line and framing fields of a response head (which ends with CRLF CRLF)."""
    match = _STATUS_LINE.match(head)
    if match is None:
        line = head.split(b"\r\n", 1)[0][:80].decode("latin-1")
        raise FramingError(f"malformed status line {line!r}")
    fields = [(m[1], m[2]) for m in _RESPONSE_FIELDS.finditer(head, match.end() - 2)]
    return ResponseHead(int(match[2]), match[1] == b"0", fields)


class ChunkedScanner:
    """Finds the end of a chunked body in raw bytes without changing them.

    `scan(data, start)` returns the index just past the body's end (the final CRLF after the
    trailers), or -1 when more bytes are needed; the scanner remembers where it is in between.
    """

    __slots__ = ("_line", "_remaining", "_state", "_trailer_bytes")

    # One name a line: mypyc compiles class-level constants, not tuple unpacking.
    SIZE = 0
    DATA = 1
    DATA_END = 2
    TRAILER = 3
    DONE = 4

    def __init__(self) -> None:
        self._state = self.SIZE
        self._remaining = 0
        self._line = b""  # a partial size or trailer line carried between calls
        self._trailer_bytes = 0

    def scan(self, data: bytes, start: int = 0) -> int:
        """The end index of the body in `data`, or -1 if it continues past `data`."""
        pos = start
        end = len(data)
        while pos < end or self._state == self.DONE:
            state = self._state
            if state == self.DATA:
                take = min(self._remaining, end - pos)
                pos += take
                self._remaining -= take
                if self._remaining == 0:
                    self._state = self.DATA_END
            elif state == self.DONE:
                return pos
            elif state == self.DATA_END:
                # Exactly CRLF after the data; checked byte by byte so garbage fails at once.
                line = self._line + data[pos : pos + 2 - len(self._line)]
                pos += len(line) - len(self._line)
                if not b"\r\n".startswith(line):
                    raise FramingError("chunk data is not followed by CRLF")
                self._line = b"" if line == b"\r\n" else line
                if line == b"\r\n":
                    self._state = self.SIZE
            else:
                nl = data.find(b"\n", pos)
                if nl < 0:
                    self._line += data[pos:]
                    self._check_line_length()
                    return -1
                line = self._line + data[pos : nl + 1]
                self._line = b""
                pos = nl + 1
                self._line_done(line)
        return -1

    def _check_line_length(self) -> None:
        if self._state == self.TRAILER:
            if self._trailer_bytes + len(self._line) > MAX_TRAILERS:
                raise FramingError(f"trailer section longer than {MAX_TRAILERS} bytes")
        elif len(self._line) > MAX_CHUNK_LINE:
            raise FramingError(f"chunk size line longer than {MAX_CHUNK_LINE} bytes")

    def _line_done(self, line: bytes) -> None:
        if not line.endswith(b"\r\n"):
            raise FramingError("chunked body line does not end with CRLF")
        if self._state == self.SIZE:
            size_text = line[:-2].split(b";", 1)[0].strip(b" \t")
            if not size_text or len(size_text) > 16 or not _HEX.fullmatch(size_text):
                shown = line[:-2][:40].decode("latin-1")
                raise FramingError(f"invalid chunk size line {shown!r}")
            size = int(size_text, 16)
            if size == 0:
                self._state = self.TRAILER
            else:
                self._remaining = size
                self._state = self.DATA
        else:  # TRAILER
            self._trailer_bytes += len(line)
            if self._trailer_bytes > MAX_TRAILERS:
                raise FramingError(f"trailer section longer than {MAX_TRAILERS} bytes")
            if line == b"\r\n":
                self._state = self.DONE
            elif line[:1] in (b" ", b"\t") or b":" not in line:
                raise FramingError("malformed trailer field")

    @property
    def done(self) -> bool:
        """Whether the whole body, trailers included, has been seen."""
        return self._state == self.DONE


_HEX = re.compile(rb"[0-9a-fA-F]+")


class BodyCursor:
    """Tracks one message body across reads: `advance(data, start)` -> end index or -1."""

    __slots__ = ("_chunked", "_remaining", "framing")

    def __init__(self, framing: Framing) -> None:
        self.framing = framing
        self._remaining = framing.length
        self._chunked = ChunkedScanner() if framing.kind == "chunked" else None

    def advance(self, data: bytes, start: int) -> int:
        """Consume the body bytes of `data[start:]`; the index where the body ended, or -1."""
        if self._chunked is not None:
            return self._chunked.scan(data, start)
        if self.framing.kind != "length":
            return -1  # until close, or a tunnel: never ends by framing
        available = len(data) - start
        if available >= self._remaining:
            end = start + self._remaining
            self._remaining = 0
            return end
        self._remaining -= available
        return -1


def find_head_end(data: bytes, start: int) -> int:
    """Index just past the CRLF CRLF that ends a head beginning at `start`, or -1."""
    end = data.find(b"\r\n\r\n", start)
    return -1 if end < 0 else end + 4


def skip_empty_lines(data: bytes, start: int) -> int:
    """RFC 9112 section 2.2: a server should ignore empty lines received before a request line."""
    while data.startswith(b"\r\n", start):
        start += 2
    return start


def connection_tokens(headers: Headers) -> set[bytes]:
    """The lower-case tokens of every Connection header."""
    return {
        t.strip(b" \t").lower()
        for name, value in headers
        if len(name) == 10 and name.lower() == b"connection"
        for t in value.split(b",")
    }


def status_response(status: int, reason: str, detail: str, *, close: bool = True) -> bytes:
    """A small plain-text response the proxy answers itself (400, 431, 502, ...)."""
    body = f"{status} {reason}: {detail}\n".encode("utf-8", "replace")
    head = (
        f"HTTP/1.1 {status} {reason}\r\ncontent-type: text/plain; charset=utf-8\r\n"
        f"content-length: {len(body)}\r\nx-tpproxy-error: {status}\r\n"
        + ("connection: close\r\n" if close else "")
        + "\r\n"
    )
    return head.encode("latin-1") + body
