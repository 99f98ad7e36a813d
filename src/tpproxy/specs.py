"""Intercept specs on the wire: what the agent receives (from a file now, from the manager later).

A spec names an agent port, a mechanism (`tcp` takes the whole port, `http` takes the requests
its rules select) and a target address; `build_routes` turns a list of them into a route table,
with every error naming the spec (by index and id) and the field.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Literal

import msgspec

from tpproxy.config import ConfigError
from tpproxy.routing import (
    DEFAULT_INTERCEPT_HEADER,
    HeaderRule,
    HttpIntercept,
    PortRoutes,
    RouteConflict,
    RuleError,
    TcpIntercept,
    ValueRule,
    check_rule_counts,
    port_routes,
)
from tpproxy.targets import Address, Target

Op = Literal["exact", "prefix", "regex"]


class HeaderMatch(msgspec.Struct, frozen=True, rename="camel"):
    """A header rule: `name` (case-insensitive) with a value that satisfies `op` `value`."""

    name: str
    value: str
    op: Op = "exact"


class PathMatch(msgspec.Struct, frozen=True, rename="camel"):
    """A path rule, applied to the path without its query string."""

    value: str
    op: Op = "prefix"


class InterceptSpec(msgspec.Struct, frozen=True, rename="camel", omit_defaults=True):
    """One intercept as the agent applies it.

    With mechanism `http` and no rule at all (no headers, path or methods), Telepresence's default
    rule applies: `x-telepresence-intercept-id` equal to `id`. To take every request of the port,
    use `path: {op: prefix, value: /}` (or a `tcp` intercept).
    """

    id: str
    port: Annotated[int, msgspec.Meta(ge=1, le=65535)]
    target: str
    mechanism: Literal["tcp", "http"] = "tcp"
    headers: tuple[HeaderMatch, ...] = ()
    path: PathMatch | None = None
    methods: tuple[str, ...] = ()
    fallback_to_app: bool = False


def _intercept(spec: InterceptSpec, where: str, target: Target) -> HttpIntercept:
    check_rule_counts(len(spec.headers), len(spec.methods), f"{where}.")
    headers = tuple(
        HeaderRule.make(h.name, h.op, h.value, f"{where}.headers[{i}]")
        for i, h in enumerate(spec.headers)
    )
    path = ValueRule.make(spec.path.op, spec.path.value, f"{where}.path") if spec.path else None
    if not headers and path is None and not spec.methods:
        headers = (HeaderRule(DEFAULT_INTERCEPT_HEADER, ValueRule("exact", spec.id)),)
    methods = frozenset(m.upper() for m in spec.methods) or None
    return HttpIntercept(spec.id, target, headers, path, methods, spec.fallback_to_app)


def build_routes(
    base: Mapping[int, PortRoutes],
    specs: Sequence[InterceptSpec],
    source: str = "intercepts",
    connectors: Mapping[str, Target] | None = None,
) -> dict[int, PortRoutes]:
    """The table with `specs` applied to `base` (the app routes); ConfigError names the spec.

    `target` is `HOST:PORT`, or the name of a connector in `connectors` (a tunnel).
    """
    tcp: dict[int, list[TcpIntercept]] = {}
    http: dict[int, list[HttpIntercept]] = {}
    for i, spec in enumerate(specs):
        where = f"{source}: [{i}] (id {spec.id!r})"
        if spec.port not in base:
            known = ", ".join(map(str, sorted(base))) or "none"
            raise ConfigError(f"{where}.port: {spec.port} is not an agent port (ports: {known})")
        target: Target
        if connectors and spec.target in connectors:
            target = connectors[spec.target]
        else:
            try:
                target = Address.parse(spec.target)
            except ValueError as exc:
                raise ConfigError(f"{where}.target: {exc}") from None
        if spec.mechanism == "tcp":
            tcp.setdefault(spec.port, []).append(TcpIntercept(spec.id, target))
        else:
            try:
                http.setdefault(spec.port, []).append(_intercept(spec, where, target))
            except RuleError as exc:
                raise ConfigError(str(exc)) from None
    table = {}
    for port, routes in base.items():
        try:
            table[port] = port_routes(
                routes.app, tcp.get(port, ()), http.get(port, ()), http=routes.http
            )
        except RouteConflict as exc:
            raise ConfigError(f"{source}: port {port}: {exc}") from None
    return table


def load_specs(path: str | Path) -> list[InterceptSpec]:
    """Read a YAML (or JSON) list of intercept specs; errors name the file and field."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from None
    try:
        raw = msgspec.yaml.decode(data)
    except msgspec.DecodeError as exc:
        detail = str(exc).replace('"<byte string>"', repr(str(path))).replace("\n", " ")
        raise ConfigError(f"{path}: not valid YAML: {detail}") from None
    if raw is None:
        return []
    try:
        return msgspec.convert(raw, list[InterceptSpec])
    except msgspec.ValidationError as exc:
        raise ConfigError(f"{path}: {exc}") from None
