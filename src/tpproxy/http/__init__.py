"""HTTP mode: per-request routing on HTTP/1.1 keep-alive connections (two parser backends) and
per-stream routing on HTTP/2 connections (h2), by the same rules."""

from tpproxy.http.protocol import HttpProxy
from tpproxy.http.request import BadRequest, RequestHead
from tpproxy.routing import PortRoutes as PortRouting

BACKENDS = ("httptools", "h11")

__all__ = [
    "BACKENDS",
    "BadRequest",
    "HttpProxy",
    "RequestHead",
    "explain",
    "explain_stream",
    "protocol_class",
]


def protocol_class(backend: str) -> type[HttpProxy]:
    """The protocol class of a parser backend: `httptools` (fast, default) or `h11` (strict)."""
    if backend == "httptools":
        from tpproxy.http.httptools_impl import HttptoolsProxy

        return HttptoolsProxy
    if backend == "h11":
        from tpproxy.http.h11_impl import H11Proxy

        return H11Proxy
    raise ValueError(f"unknown HTTP parser backend {backend!r} (choose httptools or h11)")


def explain(routes: PortRouting, request_head: bytes, backend: str = "h11") -> list[str]:
    """Which intercept a request head would reach, and why: every verdict in order, then `=>`.

    A head that would be refused yields a single line saying so, with the status.
    """
    from tpproxy.http import h11_impl, httptools_impl

    parse = h11_impl.parse_request_head if backend == "h11" else httptools_impl.parse_request_head
    try:
        head = parse(request_head, 1000)
    except BadRequest as exc:
        return [f"refused with {exc.status}: {exc}"]
    return routes.explain(head.method, head.path, head.by_name())


def explain_stream(routes: PortRouting, block: list[tuple[bytes, bytes]]) -> list[str]:
    """`explain` for an HTTP/2 stream's request header block (pseudo-headers and metadata)."""
    from tpproxy.http.h2_streams import StreamRefused, read_request

    names = frozenset(name for name, _ in block if not name.startswith(b":"))
    try:
        request = read_request(block, names)
    except StreamRefused as exc:
        return [f"refused with RST_STREAM PROTOCOL_ERROR: {exc}"]
    return routes.explain(request.method, request.path, request.headers)
