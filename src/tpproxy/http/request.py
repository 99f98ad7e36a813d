"""A parsed request head, as both parser backends produce it, and the checks they share."""

from __future__ import annotations

from dataclasses import dataclass, field

from tpproxy.http.framing import Framing, FramingError, framing_of
from tpproxy.routing import split_target

_INTERESTING_SIZES = frozenset(
    len(n) for n in (b"host", b"content-length", b"transfer-encoding", b"connection", b"upgrade")
)
_NO_TOKENS: frozenset[bytes] = frozenset()


class BadRequest(Exception):
    """A request the proxy refuses; `status` is what the client is answered (400, 431, ...)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


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
