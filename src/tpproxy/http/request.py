"""A parsed request head, as both parser backends produce it, and the checks they share."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field

from tpproxy.http.framing import Framing, FramingError, framing_of
from tpproxy.routing import split_target

_INTERESTING_SIZES = frozenset(
    len(n) for n in (b"host", b"content-length", b"transfer-encoding", b"connection", b"upgrade")
)
_NO_TOKENS: frozenset[bytes] = frozenset()

# The methods llhttp knows. The h11 backend accepts any token; limiting both to this set keeps
# the backends' decisions identical (a differential test checks it). Others get 501.
KNOWN_METHODS = frozenset(
    (
        "DELETE",
        "GET",
        "HEAD",
        "POST",
        "PUT",
        "CONNECT",
        "OPTIONS",
        "TRACE",
        "COPY",
        "LOCK",
        "MKCOL",
        "MOVE",
        "PROPFIND",
        "PROPPATCH",
        "SEARCH",
        "UNLOCK",
        "BIND",
        "REBIND",
        "UNBIND",
        "ACL",
        "REPORT",
        "MKACTIVITY",
        "CHECKOUT",
        "MERGE",
        "M-SEARCH",
        "NOTIFY",
        "SUBSCRIBE",
        "UNSUBSCRIBE",
        "PATCH",
        "PURGE",
        "MKCALENDAR",
        "LINK",
        "UNLINK",
        "SOURCE",
        "QUERY",
    )
)


class BadRequest(Exception):
    """A request the proxy refuses; `status` is what the client is answered (400, 431, ...)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


_REQUEST_LINE = re.compile(
    rb"([!#$%&'*+\-.^_`|~0-9A-Za-z]+) ([\x21-\x7e]+) HTTP/([0-9])\.([0-9])\r\n"
)
_CONTROL = re.compile(rb"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


def precheck_head(head: bytes) -> tuple[str, str, bool]:
    """The checks both backends share, made before either parses: the stricter rule of the two
    wherever they differ, so that they accept, refuse and route the same requests.

    Refused: a request line not of the form `METHOD SP TARGET SP HTTP/x.y` (target in visible
    ASCII), a method llhttp does not know (501), a version other than 1.0 or 1.1 (505), a bare
    CR or LF (parsers would disagree on where the head ends), obsolete line folding, and control
    characters in header fields. Returns the method, target and whether it is HTTP/1.0, so that
    both backends take the request line from the same place.
    """
    line = _REQUEST_LINE.match(head)
    if line is None:
        shown = head.split(b"\r\n", 1)[0][:60].decode("latin-1")
        raise BadRequest(400, f"malformed request line {shown!r}")
    if line[1].decode("ascii") not in KNOWN_METHODS:
        raise BadRequest(501, f"method {line[1].decode('ascii')!r} is not supported")
    if line[3] != b"1" or line[4] not in (b"0", b"1"):
        raise BadRequest(505, f"HTTP/{line[3].decode()}.{line[4].decode()} is not supported")
    crlf = head.count(b"\r\n")
    if head.count(b"\n") != crlf or head.count(b"\r") != crlf:
        raise BadRequest(400, "malformed request: a bare CR or LF in the head")
    if (
        head.find(b"\r\n ") >= 0 or head.find(b"\r\n\t") >= 0
    ):  # `in` costs a TypeError (see framing)
        raise BadRequest(400, "malformed request: obsolete line folding in a header")
    control = _CONTROL.search(head, line.end())
    if control is not None:
        raise BadRequest(400, f"malformed request: control character {control[0]!r} in a header")
    return line[1].decode("ascii"), line[2].decode("ascii"), line[4] == b"0"


Headers = list[tuple[bytes, bytes]]


def request_head(head: bytes, parse_headers: Callable[[bytes], Headers]) -> RequestHead:
    """The shared checks, then a backend's header parsing: what both backends' protocols do."""
    method, target, http10 = precheck_head(head)
    return RequestHead(method, target, http10, parse_headers(head))


@dataclass(slots=True)
class RequestHead:
    """The request line and header fields of one request, with the framing it implies."""

    method: str
    target: str
    http10: bool
    headers: list[tuple[bytes, bytes]]
    framing: Framing = field(init=False)
    keep_alive: bool = field(init=False)
    upgrade: bool = field(init=False)
    _by_name: dict[str, list[str]] | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        # One pass over the fields for everything the proxy itself needs from them.
        hosts = 0
        lengths: list[bytes] = []
        encodings: list[bytes] = []
        connection: list[bytes] = []
        upgrade = False
        for name, value in self.headers:
            size = len(name)
            if size not in _INTERESTING_SIZES:
                continue
            lower = name.lower()
            if lower == b"host":
                hosts += 1
            elif lower == b"content-length":
                lengths.append(value)
            elif lower == b"transfer-encoding":
                encodings.append(value)
            elif lower == b"connection":
                connection.append(value)
            elif lower == b"upgrade":
                upgrade = True
        if hosts > 1:
            raise BadRequest(400, "more than one Host header")
        if hosts == 0 and not self.http10:
            raise BadRequest(400, "HTTP/1.1 request without a Host header")
        try:
            self.framing = framing_of(lengths, encodings, self.http10)
        except FramingError as exc:
            raise BadRequest(exc.status, str(exc)) from None
        tokens = (
            {t.strip(b" \t").lower() for v in connection for t in v.split(b",")}
            if connection
            else _NO_TOKENS
        )
        if self.http10:
            self.keep_alive = b"keep-alive" in tokens and b"close" not in tokens
        else:
            self.keep_alive = b"close" not in tokens
        self.upgrade = self.method == "CONNECT" or (upgrade and b"upgrade" in tokens)

    @property
    def path(self) -> str:
        """The path without the query string, as path rules see it."""
        return split_target(self.target)[0]

    def headers_named(self, names: frozenset[bytes]) -> dict[str, list[str]]:
        """Like `by_name`, but only the (lower-case) names that some rule looks at."""
        grouped: dict[str, list[str]] = {}
        for name, value in self.headers:
            lower = name.lower()
            if lower in names:
                grouped.setdefault(lower.decode("latin-1"), []).append(
                    value.strip(b" \t").decode("latin-1")
                )
        return grouped

    def by_name(self) -> dict[str, list[str]]:
        """Lower-case header names to all their values, as header rules see them (built once)."""
        if self._by_name is None:
            grouped: dict[str, list[str]] = {}
            for name, value in self.headers:
                grouped.setdefault(name.decode("latin-1").lower(), []).append(
                    value.strip(b" \t").decode("latin-1")
                )
            self._by_name = grouped
        return self._by_name
