"""HTTP/1.1 mode: per-request routing on keep-alive connections, with two parser backends."""

from tpproxy.http.protocol import HttpProxy
from tpproxy.http.request import BadRequest, RequestHead
from tpproxy.routing import PortRoutes as PortRouting

BACKENDS = ("httptools", "h11")

__all__ = ["BACKENDS", "BadRequest", "HttpProxy", "RequestHead", "explain", "protocol_class"]


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
