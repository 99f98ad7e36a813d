"""The strict backend: h11 parses each request head (pure Python, RFC-faithful)."""

from __future__ import annotations

import h11

from tpproxy.http.protocol import HttpProxy
from tpproxy.http.request import BadRequest, Headers, RequestHead, request_head


def parse_headers(head: bytes, max_headers: int) -> Headers:
    """The header fields of one head (ending with CRLF CRLF), validated by h11."""
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=len(head) + 1)
    conn.receive_data(head)
    try:
        event = conn.next_event()
    except h11.RemoteProtocolError as exc:
        # 431 and 505 as h11 suggests; everything else is 400, as the httptools backend answers
        # (h11 says 501 for transfer codings it does not know; both backends refuse those as 400).
        status = exc.error_status_hint if exc.error_status_hint in (431, 505) else 400
        raise BadRequest(status, f"malformed request: {exc}") from None
    if not isinstance(event, h11.Request):
        raise BadRequest(400, "malformed request: incomplete head")
    raw = event.headers.raw_items()
    if len(raw) > max_headers:
        raise BadRequest(431, f"more than {max_headers} header fields")
    return list(raw)


def parse_request_head(head: bytes, max_headers: int) -> RequestHead:
    """Parse one head with the shared checks and h11; BadRequest on anything malformed."""
    return request_head(head, lambda h: parse_headers(h, max_headers))


class H11Proxy(HttpProxy):
    """HTTP mode with the h11 head parser: stricter, slower."""

    __slots__ = ()

    backend = "h11"

    def parse_head(self, head: bytes) -> RequestHead:
        return request_head(head, self._headers)

    def _headers(self, head: bytes) -> Headers:
        return parse_headers(head, self.settings.max_headers)
