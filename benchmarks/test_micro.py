"""Micro-benchmarks (pytest-benchmark): routing decisions and request-head parsing per backend.

Run: `./dev test benchmarks/test_micro.py --benchmark-enable` (the default test run does not
collect this folder; with `--benchmark-disable` each case runs once as a plain test).
"""

from __future__ import annotations

import pytest
from pytest_benchmark.fixture import BenchmarkFixture

from tpproxy.http import h11_impl, httptools_impl
from tpproxy.routing import HeaderRule, HttpIntercept, PortRoutes, ValueRule, port_routes
from tpproxy.targets import Address

HEAD = (
    b"GET /api/v1/items?page=2 HTTP/1.1\r\nHost: echo.default.svc.cluster.local\r\n"
    b"User-Agent: Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36\r\n"
    b"Accept: application/json\r\nAccept-Encoding: gzip, deflate, br\r\n"
    b"Accept-Language: en-US,en;q=0.9\r\nCookie: session=abc123; theme=dark\r\n"
    b"X-Request-Id: 6f1c2a3b-8d4e-4f5a-9b6c-7d8e9f0a1b2c\r\n"
    b"x-telepresence-intercept-id: 4d2c:echo-http\r\n\r\n"
)
PARSERS = {"httptools": httptools_impl.parse_request_head, "h11": h11_impl.parse_request_head}


def table(n: int) -> PortRoutes:
    """A port with n header intercepts (ids like Telepresence's) and one path intercept."""
    intercepts = [
        HttpIntercept(
            f"{i:04x}:echo-http",
            Address("127.0.0.1", 7000 + i),
            (HeaderRule.make("x-telepresence-intercept-id", "exact", f"{i:04x}:echo-http", "b"),),
        )
        for i in range(n)
    ]
    intercepts.append(
        HttpIntercept(
            "api-v2", Address("127.0.0.1", 6999), path=ValueRule.make("regex", "/api/v2/.*", "b")
        )
    )
    return port_routes(Address("127.0.0.1", 8080), http_intercepts=intercepts)


@pytest.mark.parametrize("backend", list(PARSERS))
def test_parse_head(benchmark: BenchmarkFixture, backend: str) -> None:
    parse = PARSERS[backend]
    head = benchmark(parse, HEAD, 100)
    assert head.method == "GET"
    assert head.by_name()["x-telepresence-intercept-id"] == ["4d2c:echo-http"]


@pytest.mark.parametrize("intercepts", [2, 20])
def test_route_decision(benchmark: BenchmarkFixture, intercepts: int) -> None:
    routes = table(intercepts)
    request = httptools_impl.parse_request_head(HEAD, 100)

    def decide() -> str:
        headers = request.headers_named(routes.header_names)  # as each request does
        return routes.decide(request.method, request.path, headers).route

    assert benchmark(decide) == "app"  # ids 0000.. do not include the request's 4d2c


@pytest.mark.parametrize("backend", list(PARSERS))
def test_parse_and_route(benchmark: BenchmarkFixture, backend: str) -> None:
    parse = PARSERS[backend]
    routes = table(2)

    def both() -> str:
        request = parse(HEAD, 100)
        headers = request.headers_named(routes.header_names)
        return routes.decide(request.method, request.path, headers).route

    assert benchmark(both) == "app"
