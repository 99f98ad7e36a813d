"""Route tables and request matching (sans-IO: plain values and functions, no asyncio here).

A port always has an app target (the container port). A TCP intercept takes the whole port: every
new connection, and on HTTP ports every next request, goes to its target. HTTP intercepts share a
port by their matchers: all header rules must match (names case-insensitive; a repeated header
matches when any of its values does; regex rules match the whole value), plus an optional path
rule and method set. They are tried in table order and the first match wins; a request that no
intercept matches goes to the app.

Tables are immutable; the engine swaps a whole table at once, which makes reconfiguration atomic.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import re2

from tpproxy.config import Sidecar, listeners
from tpproxy.targets import Address, Target

APP_ROUTE = "app"
MatchOp = Literal["exact", "prefix", "regex"]
DEFAULT_INTERCEPT_HEADER = "x-telepresence-intercept-id"


class RouteConflict(ValueError):
    """Two intercepts that cannot share a port; the message names both."""


class RuleError(ValueError):
    """A rule that cannot be used (bad regex, empty header name); the message names the rule."""


# Rules come from developers' clients and run on every request of a production pod: regexes
# are RE2 (linear time in the input, bounded memory; no backreferences or lookaround), and
# the size of what one intercept may ask for is bounded.
MAX_RULE_VALUE = 1024  # characters in a header or path rule's value
MAX_HEADER_RULES = 16  # header rules of one intercept
MAX_METHODS = 16
MAX_HEADER_NAME = 256
MAX_REGEX_PROGRAM = 1024  # RE2 instructions of one compiled rule
_RE2_OPTIONS = re2.Options()
_RE2_OPTIONS.max_mem = 4 << 20
_RE2_OPTIONS.log_errors = False  # the error goes back to the caller, not to stderr


def compile_rule_regex(value: str, where: str) -> Any:
    """An RE2 regex for a rule, or RuleError naming `where` and what RE2 refused."""
    try:
        regex = re2.compile(value, _RE2_OPTIONS)
    except re2.error as exc:
        reason = exc.args[0].decode(errors="replace") if exc.args and isinstance(
            exc.args[0], bytes) else str(exc)  # fmt: skip
        raise RuleError(
            f"{where}: invalid regex {value!r}: {reason} (RE2 syntax: no backreferences or "
            "lookaround)"
        ) from None
    # Linear in the input, but with a cost per byte that grows with the compiled program once
    # RE2's DFA cache overflows: `(?s).*a.{990}` is 6,942 instructions and 135 ms on a 32 KiB
    # header. Bounding the program bounds the worst request.
    size = max(regex.programsize, regex.reverseprogramsize)
    if size > MAX_REGEX_PROGRAM:
        raise RuleError(
            f"{where}: regex {value[:60]!r} compiles to {size} RE2 instructions; at most "
            f"{MAX_REGEX_PROGRAM} (fewer counted repetitions)"
        )
    return regex


def check_rule_counts(headers: int, methods: int, where: str) -> None:
    """At most MAX_HEADER_RULES header rules and MAX_METHODS methods in one intercept."""
    if headers > MAX_HEADER_RULES:
        raise RuleError(f"{where}headers: {headers} rules; at most {MAX_HEADER_RULES}")
    if methods > MAX_METHODS:
        raise RuleError(f"{where}methods: {methods} methods; at most {MAX_METHODS}")


@dataclass(frozen=True, slots=True)
class ValueRule:
    """`op` applied to a value: exact equality, prefix, or a regex matching the whole value."""

    op: MatchOp
    value: str
    _regex: Any = field(default=None, compare=False, repr=False)  # an RE2 regex

    @classmethod
    def make(cls, op: str, value: str, where: str) -> ValueRule:
        """Validate and compile once; errors name `where` (the rule's position or flag)."""
        if op not in ("exact", "prefix", "regex"):
            raise RuleError(f"{where}: operator must be exact, prefix or regex, not {op!r}")
        if len(value) > MAX_RULE_VALUE:
            raise RuleError(f"{where}: value of {len(value)} characters; at most {MAX_RULE_VALUE}")
        regex = None
        if op == "regex":
            regex = compile_rule_regex(value, where)
        return cls(op, value, regex)  # type: ignore[arg-type]

    def matches(self, candidate: str) -> bool:
        """Whether `candidate` satisfies the rule."""
        if self.op == "exact":
            return candidate == self.value
        if self.op == "prefix":
            return candidate.startswith(self.value)
        assert self._regex is not None
        return self._regex.fullmatch(candidate) is not None

    def __str__(self) -> str:
        symbol = {"exact": "==", "prefix": "^=", "regex": "~="}[self.op]
        return f"{symbol} {self.value!r}"


@dataclass(frozen=True, slots=True)
class HeaderRule:
    """A header that must be present with a value satisfying `rule`."""

    name: str  # lower-case
    rule: ValueRule

    @classmethod
    def make(cls, name: str, op: str, value: str, where: str) -> HeaderRule:
        """Lower-case the name and compile the rule; errors name `where`."""
        name = name.strip().lower()
        if len(name) > MAX_HEADER_NAME:
            raise RuleError(f"{where}: header name of {len(name)} characters; at most 256")
        if not name or not _TOKEN.fullmatch(name):
            raise RuleError(f"{where}: {name!r} is not a valid header name")
        return cls(name, ValueRule.make(op, value, where))

    def matches(self, headers: Mapping[str, Sequence[str]]) -> bool:
        """True when any value of the header satisfies the rule."""
        return any(self.rule.matches(v) for v in headers.get(self.name, ()))

    def __str__(self) -> str:
        return f"header({self.name}) {self.rule}"


_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9a-z]+")


@dataclass(frozen=True, slots=True)
class HttpIntercept:
    """An intercept that takes the requests its matchers select.

    `fallback_to_app`: when the target cannot be reached, send the request to the app instead of
    answering 502.
    """

    id: str
    target: Target
    headers: tuple[HeaderRule, ...] = ()
    path: ValueRule | None = None
    methods: frozenset[str] | None = None
    fallback_to_app: bool = False

    def rule_key(self) -> tuple[object, ...]:
        """What identifies the selection; two intercepts with the same key conflict."""
        return (
            tuple(sorted((h.name, h.rule.op, h.rule.value) for h in self.headers)),
            (self.path.op, self.path.value) if self.path else None,
            tuple(sorted(self.methods)) if self.methods else None,
        )

    def describe(self) -> str:
        """The rules in words, as `explain` and the agent's review show them."""
        parts = [str(h) for h in self.headers]
        if self.path is not None:
            parts.append(f"path {self.path}")
        if self.methods:
            parts.append(f"method in {sorted(self.methods)}")
        return " and ".join(parts) if parts else "every request"

    def check(self, method: str, path: str, headers: Mapping[str, Sequence[str]]) -> str | None:
        """None when the request matches, else the first rule that failed."""
        if self.methods is not None and method not in self.methods:
            return f"method {method} not in {sorted(self.methods)}"
        if self.path is not None and not self.path.matches(path):
            return f"path {path!r} does not satisfy {self.path}"
        for rule in self.headers:
            if not rule.matches(headers):
                values = headers.get(rule.name)
                got = f"values {list(values)!r}" if values else "absent"
                return f"{rule} not satisfied ({got})"
        return None


def default_http_intercept(intercept_id: str, target: Target) -> HttpIntercept:
    """Telepresence's default rule: `x-telepresence-intercept-id` equal to the intercept id."""
    return HttpIntercept(
        intercept_id,
        target,
        (HeaderRule(DEFAULT_INTERCEPT_HEADER, ValueRule("exact", intercept_id)),),
    )


@dataclass(frozen=True, slots=True)
class TcpIntercept:
    """An intercept that takes every connection (and every request) of a port."""

    id: str
    target: Target


@dataclass(frozen=True, slots=True)
class Decision:
    """Where one request goes; `reason` says why (worded only when asked for)."""

    route: str
    target: Target
    intercept: HttpIntercept | None = None
    tcp: bool = False

    @property
    def reason(self) -> str:
        if self.tcp:
            return f"TCP intercept {self.route!r} owns the port"
        if self.intercept is not None:
            return f"matched {self.intercept.describe()}"
        return "no intercept matched"


@dataclass(frozen=True, slots=True)
class PortRoutes:
    """Where the connections (TCP mode) or requests (HTTP mode) of one port go."""

    app: Target
    tcp_intercept: TcpIntercept | None = None
    http_intercepts: tuple[HttpIntercept, ...] = ()
    http: bool = False
    # Derived once per table, for per-request speed (see `decide`).
    header_names: frozenset[bytes] = field(init=False, compare=False, repr=False)
    _exact: dict[tuple[str, str], int] = field(init=False, compare=False, repr=False)
    _exact_names: tuple[str, ...] = field(init=False, compare=False, repr=False)
    _others: tuple[tuple[int, HttpIntercept], ...] = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        # Intercepts with a single exact header rule and nothing else (Telepresence's own kind)
        # are found by a dict look-up of the request's values; the rest are checked in order.
        exact: dict[tuple[str, str], int] = {}
        others = []
        for pos, icept in enumerate(self.http_intercepts):
            rules = icept.headers
            if (
                len(rules) == 1
                and rules[0].rule.op == "exact"
                and icept.path is None
                and icept.methods is None
            ):
                exact.setdefault((rules[0].name, rules[0].rule.value), pos)
            else:
                others.append((pos, icept))
        names = {h.name for icept in self.http_intercepts for h in icept.headers}
        object.__setattr__(self, "header_names", frozenset(n.encode("latin-1") for n in names))
        object.__setattr__(self, "_exact", exact)
        object.__setattr__(self, "_exact_names", tuple(sorted({name for name, _ in exact})))
        object.__setattr__(self, "_others", tuple(others))

    def connection_route(self) -> tuple[str, Target]:
        """The route name (`app` or the intercept id) and target for a new TCP connection."""
        icept = self.tcp_intercept
        if icept is None:
            return APP_ROUTE, self.app
        return icept.id, icept.target

    @property
    def routes_requests(self) -> bool:
        """Whether connections on this port are parsed as HTTP and routed per request."""
        return self.http and self.tcp_intercept is None

    def decide(self, method: str, path: str, headers: Mapping[str, Sequence[str]]) -> Decision:
        """The route of one request: the TCP intercept, else the first HTTP match, else the app.

        `path` excludes the query string; `headers` maps lower-case names to all their values.
        """
        if self.tcp_intercept is not None:
            icept = self.tcp_intercept
            return Decision(icept.id, icept.target, tcp=True)
        first = len(self.http_intercepts)
        exact = self._exact
        for name in self._exact_names:
            for value in headers.get(name, ()):
                pos = exact.get((name, value))
                if pos is not None and pos < first:
                    first = pos
        for pos, other in self._others:
            if pos >= first:
                break
            if other.check(method, path, headers) is None:
                first = pos
                break
        if first < len(self.http_intercepts):
            http = self.http_intercepts[first]
            return Decision(http.id, http.target, http)
        return Decision(APP_ROUTE, self.app)

    def explain(self, method: str, path: str, headers: Mapping[str, Sequence[str]]) -> list[str]:
        """Every intercept's verdict on a request, in the order they are tried, then the result."""
        lines = []
        if self.tcp_intercept is not None:
            lines.append(f"TCP intercept {self.tcp_intercept.id!r}: owns the whole port")
        for http in self.http_intercepts:
            failed = http.check(method, path, headers)
            verdict = "matches" if failed is None else f"no: {failed}"
            lines.append(f"intercept {http.id!r} ({http.describe()}): {verdict}")
        decision = self.decide(method, path, headers)
        lines.append(f"=> {decision.route} ({decision.target.label})")
        return lines


RouteTable = Mapping[int, PortRoutes]


def port_routes(
    app: Target,
    tcp_intercepts: Iterable[TcpIntercept] = (),
    http_intercepts: Iterable[HttpIntercept] = (),
    *,
    http: bool = False,
) -> PortRoutes:
    """The routes of one port, with conflicts detected: errors name both intercepts.

    A second TCP intercept conflicts with the first; two HTTP intercepts with identical rules
    conflict; a duplicate id conflicts. HTTP intercepts on a port with a TCP intercept are kept
    (they take over again when the TCP intercept leaves) but are not consulted meanwhile.
    """
    chosen: TcpIntercept | None = None
    for icept in tcp_intercepts:
        if chosen is not None:
            raise RouteConflict(
                f"TCP intercept {icept.id!r} conflicts with TCP intercept {chosen.id!r}: "
                "a TCP intercept takes the whole port"
            )
        chosen = icept
    by_rules: dict[tuple[object, ...], HttpIntercept] = {}
    ids: set[str] = {chosen.id} if chosen else set()
    kept = []
    for http_icept in http_intercepts:
        if http_icept.id in ids:
            raise RouteConflict(f"intercept id {http_icept.id!r} is used twice on one port")
        ids.add(http_icept.id)
        other = by_rules.setdefault(http_icept.rule_key(), http_icept)
        if other is not http_icept:
            raise RouteConflict(
                f"HTTP intercept {http_icept.id!r} conflicts with HTTP intercept {other.id!r}: "
                f"identical rules ({http_icept.describe()})"
            )
        kept.append(http_icept)
    return PortRoutes(app, chosen, tuple(kept), http or bool(kept))


def app_routes(
    sidecar: Sidecar, app_host: str = "127.0.0.1", *, http: bool = False
) -> dict[int, PortRoutes]:
    """The table of an agent with no intercepts: every TCP agent port forwards to its app port."""
    return {
        listener.agent_port: PortRoutes(Address(app_host, listener.container_port), http=http)
        for listener in listeners(sidecar)
        if listener.protocol == "TCP"
    }


def split_target(target: str) -> tuple[str, str]:
    """(path, query) of a request target; absolute-form targets are reduced to their path."""
    if target.startswith(("http://", "https://")):
        rest = target.split("://", 1)[1]
        slash = rest.find("/")
        target = rest[slash:] if slash >= 0 else "/"
    path, _, query = target.partition("?")
    return path, query
