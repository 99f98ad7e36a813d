"""HTTP/1.1 mode: per-request routing on keep-alive connections, with two parser backends."""

from tpproxy.http.protocol import HttpProxy
from tpproxy.http.request import BadRequest, RequestHead

BACKENDS = ("httptools", "h11")

__all__ = ["BACKENDS", "BadRequest", "HttpProxy", "RequestHead", "protocol_class"]


def protocol_class(backend: str) -> type[HttpProxy]:
    """The protocol class of a parser backend: `httptools` (fast, default) or `h11` (strict)."""
    if backend == "httptools":
        from tpproxy.http.httptools_impl import HttptoolsProxy

        return HttptoolsProxy
    if backend == "h11":
        from tpproxy.http.h11_impl import H11Proxy

        return H11Proxy
    raise ValueError(f"unknown HTTP parser backend {backend!r} (choose httptools or h11)")
