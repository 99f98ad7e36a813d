"""A parsed request head, as both parser backends produce it, and the checks they share."""

from __future__ import annotations

from dataclasses import dataclass, field

from tpproxy.http.framing import Framing, FramingError, connection_tokens, request_framing
from tpproxy.routing import split_target


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
        hosts = sum(1 for name, _ in self.headers if len(name) == 4 and name.lower() == b"host")
        if hosts > 1:
            raise BadRequest(400, "more than one Host header")
        if hosts == 0 and not self.http10:
            raise BadRequest(400, "HTTP/1.1 request without a Host header")
        try:
            self.framing = request_framing(self.headers, self.http10)
        except FramingError as exc:
            raise BadRequest(exc.status, str(exc)) from None
        tokens = connection_tokens(self.headers)
        if self.http10:
            self.keep_alive = b"keep-alive" in tokens and b"close" not in tokens
        else:
            self.keep_alive = b"close" not in tokens
        self.upgrade = self.method == "CONNECT" or (
            b"upgrade" in tokens
            and any(len(n) == 7 and n.lower() == b"upgrade" for n, _ in self.headers)
        )

    @property
    def path(self) -> str:
        """The path without the query string, as path rules see it."""
        return split_target(self.target)[0]

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
