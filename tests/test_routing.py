"""Route decisions without sockets: matchers, precedence, conflicts and explanations."""

from __future__ import annotations

import pytest

from tpproxy.config import ConfigError
from tpproxy.routing import (
    HeaderRule,
    HttpIntercept,
    PortRoutes,
    RouteConflict,
    RuleError,
    TcpIntercept,
    ValueRule,
    default_http_intercept,
    port_routes,
    split_target,
)
from tpproxy.specs import HeaderMatch, InterceptSpec, PathMatch, build_routes
from tpproxy.targets import Address

APP = Address("127.0.0.1", 8080)
ALICE = Address("127.0.0.1", 7001)
BOB = Address("127.0.0.1", 7002)


def hdr(name: str, op: str, value: str) -> HeaderRule:
    return HeaderRule.make(name, op, value, "test")


def decide(
    routes: PortRoutes, headers: dict[str, list[str]], path: str = "/", method: str = "GET"
) -> str:
    return routes.decide(method, path, headers).route


@pytest.mark.parametrize(
    ("op", "value", "candidate", "expected"),
    [
        ("exact", "alice", "alice", True),
        ("exact", "alice", "Alice", False),
        ("exact", "alice", "alice2", False),
        ("prefix", "ali", "alice", True),
        ("prefix", "ali", "xalice", False),
        ("regex", "al.ce", "alice", True),
        ("regex", "al.ce", "alice-x", False),  # the whole value must match, not a part
        ("regex", "al.ce", "x-alice", False),
        ("regex", "a|b", "b", True),
        ("regex", "a|b", "ab", False),
    ],
)
def test_value_rules(op: str, value: str, candidate: str, expected: bool) -> None:
    assert ValueRule.make(op, value, "test").matches(candidate) is expected


def test_header_names_are_case_insensitive_and_any_repeated_value_matches() -> None:
    rule = hdr("X-Dev", "exact", "alice")
    assert rule.name == "x-dev"
    assert rule.matches({"x-dev": ["bob", "alice"]})
    assert not rule.matches({"x-dev": ["bob"]})
    assert not rule.matches({})


def test_bad_rules_name_the_rule() -> None:
    with pytest.raises(RuleError, match=r"headers\[0\]: invalid regex '\('"):
        ValueRule.make("regex", "(", "headers[0]")
    with pytest.raises(RuleError, match="operator must be exact, prefix or regex, not 'glob'"):
        ValueRule.make("glob", "*", "rule")
    with pytest.raises(RuleError, match="'bad name' is not a valid header name"):
        HeaderRule.make("bad name", "exact", "x", "rule")


def test_regexes_are_re2_linear_in_the_input() -> None:
    """`(a+)+b` backtracks exponentially in Python's `re` (40 a's take hours); in RE2 a 100 kB
    value is one linear scan (benchmarks/redos.py measures both)."""
    rule = HeaderRule.make("x-dev", "regex", "(a+)+b", "headers[0]")
    assert not rule.matches({"x-dev": ["a" * 100_000]})
    assert rule.matches({"x-dev": ["a" * 100_000 + "b"]})
    assert ValueRule.make("regex", "ali(ce|x)", "r").matches("alice")
    assert not ValueRule.make("regex", "ali(ce|x)", "r").matches("alice2")  # the whole value
    with pytest.raises(RuleError, match=r"r: invalid regex.*RE2 syntax: no backreferences"):
        ValueRule.make("regex", r"(a)\1", "r")
    with pytest.raises(RuleError, match=r"r: invalid regex.*pattern too large"):
        ValueRule.make("regex", r"\pL{1000}", "r")  # compiled in bounded memory, or refused
    with pytest.raises(RuleError, match=r"r: invalid regex.*invalid repetition size"):
        ValueRule.make("regex", "((a{100}){100}){100}", "r")
    # A program that would make each byte costly once RE2's DFA cache overflows.
    with pytest.raises(RuleError, match="compiles to 6942 RE2 instructions; at most 1024"):
        ValueRule.make("regex", "(?s)(?:.*a.{990})", "r")
    assert ValueRule.make("regex", r"[\w.-]{0,200}@example\.com", "r").matches("a@example.com")
    with pytest.raises(RuleError, match="header name of 300 characters; at most 256"):
        HeaderRule.make("x" * 300, "exact", "v", "r")


def test_all_header_rules_must_match_then_path_and_methods() -> None:
    icept = HttpIntercept(
        "alice",
        ALICE,
        (hdr("x-dev", "exact", "alice"), hdr("x-tenant", "prefix", "acme")),
        ValueRule.make("prefix", "/api/", "path"),
        frozenset({"GET", "POST"}),
    )
    routes = port_routes(APP, http_intercepts=[icept])
    both = {"x-dev": ["alice"], "x-tenant": ["acme-eu"]}
    assert decide(routes, both, "/api/items") == "alice"
    assert decide(routes, {"x-dev": ["alice"]}, "/api/items") == "app"
    assert decide(routes, both, "/web") == "app"
    assert decide(routes, both, "/api/items", "DELETE") == "app"


def test_first_matching_intercept_wins_in_table_order() -> None:
    broad = HttpIntercept("broad", ALICE, (hdr("x-dev", "prefix", "a"),))
    narrow = HttpIntercept("narrow", BOB, (hdr("x-dev", "exact", "alice"),))
    routes = port_routes(APP, http_intercepts=[broad, narrow])
    assert decide(routes, {"x-dev": ["alice"]}) == "broad"
    routes = port_routes(APP, http_intercepts=[narrow, broad])
    assert decide(routes, {"x-dev": ["alice"]}) == "narrow"
    assert decide(routes, {"x-dev": ["anna"]}) == "broad"


def test_default_rule_is_the_intercept_id_header() -> None:
    routes = port_routes(APP, http_intercepts=[default_http_intercept("s1:echo", ALICE)])
    assert decide(routes, {"x-telepresence-intercept-id": ["s1:echo"]}) == "s1:echo"
    assert decide(routes, {"x-telepresence-intercept-id": ["s2:echo"]}) == "app"


def test_tcp_intercept_owns_the_port_even_over_http_matches() -> None:
    routes = port_routes(
        APP,
        [TcpIntercept("global", BOB)],
        [HttpIntercept("alice", ALICE, (hdr("x", "exact", "1"),))],
    )
    assert decide(routes, {"x": ["1"]}) == "global"
    assert not routes.routes_requests
    assert routes.connection_route() == ("global", BOB)


def test_conflicts_name_both_intercepts() -> None:
    with pytest.raises(RouteConflict, match="TCP intercept 'b' conflicts with TCP intercept 'a'"):
        port_routes(APP, [TcpIntercept("a", ALICE), TcpIntercept("b", BOB)])
    same = (hdr("X-Dev", "exact", "alice"),)
    with pytest.raises(RouteConflict, match="HTTP intercept 'b' conflicts with HTTP intercept 'a'"):
        port_routes(
            APP, http_intercepts=[HttpIntercept("a", ALICE, same), HttpIntercept("b", BOB, same)]
        )
    with pytest.raises(RouteConflict, match="'a' is used twice"):
        port_routes(
            APP,
            http_intercepts=[
                HttpIntercept("a", ALICE, same),
                HttpIntercept("a", BOB, (hdr("x-dev", "exact", "bob"),)),
            ],
        )
    # Different rules coexist, and rule order inside an intercept does not make them different.
    one = HttpIntercept("a", ALICE, (hdr("x", "exact", "1"), hdr("y", "exact", "2")))
    two = HttpIntercept("b", BOB, (hdr("y", "exact", "2"), hdr("x", "exact", "1")))
    with pytest.raises(RouteConflict):
        port_routes(APP, http_intercepts=[one, two])
    three = HttpIntercept("c", BOB, (hdr("x", "exact", "1"),))
    assert len(port_routes(APP, http_intercepts=[one, three]).http_intercepts) == 2


def test_explain_lists_every_verdict_and_the_result() -> None:
    routes = port_routes(
        APP,
        http_intercepts=[
            HttpIntercept("alice", ALICE, (hdr("x-dev", "exact", "alice"),)),
            HttpIntercept("api", BOB, path=ValueRule.make("regex", "/api/v[0-9]+/.*", "p")),
        ],
    )
    lines = routes.explain("GET", "/api/v2/items", {"x-dev": ["bob"]})
    assert lines == [
        "intercept 'alice' (header(x-dev) == 'alice'): no: header(x-dev) == 'alice' not satisfied "
        "(values ['bob'])",
        "intercept 'api' (path ~= '/api/v[0-9]+/.*'): matches",
        "=> api (127.0.0.1:7002)",
    ]


@pytest.mark.parametrize(
    ("target", "path"),
    [("/a/b?x=1", "/a/b"), ("/", "/"), ("http://h:80/p?q", "/p"), ("http://h", "/"), ("*", "*")],
)
def test_path_excludes_query(target: str, path: str) -> None:
    assert split_target(target)[0] == path


def test_specs_build_a_table_and_name_bad_fields() -> None:
    base = {9900: PortRoutes(APP, http=True), 9901: PortRoutes(BOB)}
    specs = [
        InterceptSpec("alice", 9900, "127.0.0.1:7001", "http", (HeaderMatch("x-dev", "alice"),)),
        InterceptSpec("api", 9900, "127.0.0.1:7002", "http", path=PathMatch("/api")),
        InterceptSpec("whole", 9901, "127.0.0.1:7003"),
        InterceptSpec("s1:echo", 9900, "127.0.0.1:7004", "http"),
    ]
    table = build_routes(base, specs)
    assert [i.id for i in table[9900].http_intercepts] == ["alice", "api", "s1:echo"]
    assert (
        table[9900].http_intercepts[2].describe()
        == "header(x-telepresence-intercept-id) == 's1:echo'"
    )
    assert table[9901].tcp_intercept == TcpIntercept("whole", Address("127.0.0.1", 7003))
    with pytest.raises(ConfigError, match=r"\[0\] \(id 'x'\)\.port: 1234 is not an agent port"):
        build_routes(base, [InterceptSpec("x", 1234, "127.0.0.1:1")])
    with pytest.raises(ConfigError, match=r"\[0\] \(id 'x'\)\.target: 'nowhere:http'"):
        build_routes(base, [InterceptSpec("x", 9900, "nowhere:http")])
    with pytest.raises(ConfigError, match=r"\[0\] \(id 'x'\)\.headers\[0\]: invalid regex"):
        build_routes(
            base, [InterceptSpec("x", 9900, "1", "http", (HeaderMatch("a", "(", "regex"),))]
        )
    with pytest.raises(
        ConfigError, match="port 9901: TCP intercept 'b' conflicts with TCP intercept 'a'"
    ):
        build_routes(base, [InterceptSpec("a", 9901, "1"), InterceptSpec("b", 9901, "2")])


def test_explain_a_raw_request_head() -> None:
    from tpproxy.http import explain

    routes = port_routes(
        APP, http_intercepts=[HttpIntercept("alice", ALICE, (hdr("x-dev", "exact", "alice"),))]
    )
    for backend in ("h11", "httptools"):
        lines = explain(routes, b"GET /x?y HTTP/1.1\r\nHost: h\r\nX-Dev: alice\r\n\r\n", backend)
        assert lines[-1] == "=> alice (127.0.0.1:7001)"
        (refused,) = explain(routes, b"GET /x HTTP/1.1\r\n\r\n", backend)
        assert refused.startswith("refused with 400: ")
        assert "Host" in refused
