"""The HTTP/2 decisions without sockets: a stream's routing inputs, the proxy's own answers,
the GOAWAY codes."""

from __future__ import annotations

import pytest
from h2.errors import ErrorCodes
from h2.exceptions import DenialOfServiceError, ProtocolError
from hpack.exceptions import HPACKDecodingError, OversizedHeaderListError

from tpproxy.http.h2_streams import (
    GRPC_UNAVAILABLE,
    StreamRefused,
    goaway_code,
    read_request,
    unreachable_response,
)
from tpproxy.routing import HeaderRule, HttpIntercept, ValueRule, port_routes
from tpproxy.targets import Address

BLOCK = [
    (b":method", b"POST"),
    (b":scheme", b"http"),
    (b":path", b"/shop.Cart/Add?trace=1"),
    (b":authority", b"cart:9000"),
    (b"content-type", b"application/grpc+proto"),
    (b"x-dev", b"alice"),
    (b"x-dev", b"bob"),
    (b"x-other", b"ignored"),
]


def test_request_reads_method_path_and_only_the_rules_headers() -> None:
    request = read_request(BLOCK, frozenset({b"x-dev", b"x-missing"}))
    assert request.method == "POST"
    assert request.path == "/shop.Cart/Add"  # the query is not part of the path rules
    assert request.headers == {"x-dev": ["alice", "bob"]}
    assert request.grpc


def test_request_without_method_or_path_is_refused_by_name() -> None:
    with pytest.raises(StreamRefused, match=":method"):
        read_request([(b":path", b"/")], frozenset())
    with pytest.raises(StreamRefused, match=":path"):
        read_request([(b":method", b"GET")], frozenset())
    assert not read_request([(b":method", b"GET"), (b":path", b"/")], frozenset()).grpc


def test_the_same_rules_route_a_stream_as_a_request() -> None:
    bob = HttpIntercept(
        "bob", Address("127.0.0.1", 2), (HeaderRule.make("x-dev", "exact", "bob", "t"),)
    )
    cart = HttpIntercept(
        "cart", Address("127.0.0.1", 3), path=ValueRule.make("prefix", "/shop.Cart/", "t")
    )
    routes = port_routes(Address("127.0.0.1", 1), (), [bob])
    request = read_request(BLOCK, routes.header_names)
    assert routes.decide(request.method, request.path, request.headers).route == "bob"
    by_path = port_routes(Address("127.0.0.1", 1), (), [cart])
    request = read_request(BLOCK, by_path.header_names)
    assert by_path.decide(request.method, request.path, request.headers).route == "cart"
    other = read_request([(b":method", b"POST"), (b":path", b"/shop.Pay/Go")], frozenset())
    assert by_path.decide(other.method, other.path, other.headers).route == "app"


def test_unreachable_answers() -> None:
    grpc = dict(unreachable_response(True, "app 127.0.0.1:1 unreachable: 100% refused ü"))
    assert grpc[b":status"] == b"200"  # a trailers-only gRPC response
    assert grpc[b"content-type"] == b"application/grpc"
    assert grpc[b"grpc-status"] == str(GRPC_UNAVAILABLE).encode()
    assert grpc[b"grpc-message"] == b"app 127.0.0.1:1 unreachable: 100%25 refused %C3%BC"
    plain = dict(unreachable_response(False, "gone\r\nx: y"))
    assert plain[b":status"] == b"502"
    assert plain[b"x-tpproxy-error"] == b"gone%0D%0Ax: y"  # no header injection


def test_goaway_codes() -> None:
    def raised(error: ProtocolError, cause: Exception) -> ProtocolError:
        error.__cause__ = cause
        return error

    assert (
        goaway_code(raised(ProtocolError("x"), HPACKDecodingError()))
        == ErrorCodes.COMPRESSION_ERROR
    )
    bomb = raised(DenialOfServiceError("x"), OversizedHeaderListError())
    assert goaway_code(bomb) == ErrorCodes.ENHANCE_YOUR_CALM
    assert goaway_code(ProtocolError("x")) == ErrorCodes.PROTOCOL_ERROR


def test_the_intercept_command_says_what_an_http2_port_intercept_takes() -> None:
    from tpcontrol.client.intercept import http2_hint

    assert "routed on its own" in http2_hint("grpc", "grpc", "http")
    whole = http2_hint("9000", "kubernetes.io/h2c", "tcp")
    assert whole.startswith("port 9000 speaks HTTP/2 (appProtocol kubernetes.io/h2c)")
    assert "--http-header" in whole
