"""The fast backend: llhttp (through httptools) parses each request head."""

from __future__ import annotations

import httptools

from tpproxy.http.protocol import HttpProxy
from tpproxy.http.request import BadRequest, RequestHead


class _HeadCollector:
    __slots__ = ("complete", "headers", "url")

    def __init__(self) -> None:
        self.headers: list[tuple[bytes, bytes]] = []
        self.url = b""
        self.complete = False

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        self.complete = True


def parse_request_head(head: bytes, max_headers: int) -> RequestHead:
    """Parse one head (ending with CRLF CRLF) with llhttp; BadRequest on anything malformed."""
    collector = _HeadCollector()
    parser = httptools.HttpRequestParser(collector)
    try:
        parser.feed_data(head)
    except httptools.HttpParserUpgrade:
        pass  # the head itself parsed; what follows is the upgraded protocol's business
    except httptools.HttpParserInvalidMethodError:
        method = head.split(b" ", 1)[0][:32].decode("latin-1")
        raise BadRequest(501, f"method {method!r} is not supported") from None
    except httptools.HttpParserError as exc:
        raise BadRequest(400, f"malformed request: {exc}") from None
    if not collector.complete:
        raise BadRequest(400, "malformed request: incomplete head")
    if len(collector.headers) > max_headers:
        raise BadRequest(431, f"more than {max_headers} header fields")
    version = parser.get_http_version()
    if version not in ("1.1", "1.0"):
        raise BadRequest(505, f"HTTP/{version} is not supported")
    return RequestHead(
        parser.get_method().decode("ascii"),
        collector.url.decode("latin-1"),
        version == "1.0",
        collector.headers,
    )


class HttptoolsProxy(HttpProxy):
    """HTTP mode with the httptools (llhttp) head parser: the default."""

    __slots__ = ()

    backend = "httptools"

    def parse_head(self, head: bytes) -> RequestHead:
        return parse_request_head(head, self.settings.max_headers)
