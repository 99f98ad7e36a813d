"""The fast backend: llhttp (through httptools) parses each request head."""

from __future__ import annotations

import httptools

from tpproxy.http.protocol import HttpProxy, PortContext
from tpproxy.http.request import BadRequest, Headers, RequestHead, request_head


class _HeadCollector:
    """httptools' callbacks for one head: the header fields, and whether the message ended."""

    __slots__ = ("complete", "finished", "headers")

    def __init__(self) -> None:
        self.headers: Headers = []
        self.complete = False
        self.finished = False

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        self.complete = True

    def on_message_complete(self) -> None:
        self.finished = True


class HeadParser:
    """An llhttp parser kept across the bodiless keep-alive requests of one connection.

    A head whose message does not end with it (a body follows, an upgrade, a last request) leaves
    the parser mid-message, so the next head gets a fresh one; creating one per request would
    cost more than parsing the head.
    """

    __slots__ = ("_collector", "_parser", "max_headers")

    def __init__(self, max_headers: int) -> None:
        self.max_headers = max_headers
        self._parser: httptools.HttpRequestParser | None = None
        self._collector = _HeadCollector()

    def __call__(self, head: bytes) -> Headers:
        collector = self._collector
        parser = self._parser
        if parser is None:
            parser = httptools.HttpRequestParser(collector)
        collector.headers = []
        collector.complete = collector.finished = False
        self._parser = None
        try:
            parser.feed_data(head)
        except httptools.HttpParserUpgrade:
            pass  # the head itself parsed; what follows is the upgraded protocol's business
        except httptools.HttpParserError as exc:
            raise BadRequest(400, f"malformed request: {exc}") from None
        if not collector.complete:
            raise BadRequest(400, "malformed request: incomplete head")
        headers = collector.headers
        if len(headers) > self.max_headers:
            raise BadRequest(431, f"more than {self.max_headers} header fields")
        if collector.finished and parser.should_keep_alive() and not parser.should_upgrade():
            self._parser = parser
        return headers


def parse_request_head(head: bytes, max_headers: int) -> RequestHead:
    """Parse one head with the shared checks and llhttp; BadRequest on anything malformed."""
    return request_head(head, HeadParser(max_headers))


class HttptoolsProxy(HttpProxy):
    """HTTP mode with the httptools (llhttp) head parser: the default."""

    __slots__ = ("_headers",)

    backend = "httptools"

    def __init__(self, ctx: PortContext) -> None:
        super().__init__(ctx)
        self._headers = HeadParser(ctx.settings.max_headers)

    def parse_head(self, head: bytes) -> RequestHead:
        return request_head(head, self._headers)
