"""`tpproxy`: run the forwarding engine or the traffic-agent, install its iptables rules
(`agent-init`), or check an agent config file.

Exit codes: 0 stopped cleanly, 1 a port could not be bound (or, for `agent-init`, an iptables
command failed), 2 bad settings or config.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import uvloop

from tpproxy import __version__
from tpproxy.config import ConfigError, listeners, load_sidecar, unserved
from tpproxy.engine import ListenError
from tpproxy.logs import LEVELS, setup_logging
from tpproxy.server import Proxy, load
from tpproxy.settings import READY_FILE, ProxySettings, load_settings

EXIT_LISTEN = 1
EXIT_IPTABLES = 1
EXIT_CONFIG = 2
DEFAULT_CONFIG = "/etc/traffic-agent/config.yaml"

log = logging.getLogger("tpproxy")


def _engine_flags(run: argparse.ArgumentParser) -> None:
    run.add_argument("--config", "-c", help="agent config file (the sidecar's config.yaml)")
    run.add_argument(
        "--forward",
        action="append",
        metavar="PORT=HOST:PORT",
        help="also forward a listen port to an address (repeatable)",
    )
    run.add_argument("--listen-host", help="address to bind agent ports on (default 0.0.0.0)")
    run.add_argument("--app-host", help="where app containers listen (default 127.0.0.1)")
    run.add_argument("--admin", help="HOST:PORT for /livez /readyz /metrics, or 'off'")
    run.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    run.add_argument("--log-format", choices=["plain", "json"])
    run.add_argument("--drain-timeout", type=float, help="seconds to drain after SIGTERM")
    run.add_argument("--connect-timeout", type=float, help="seconds to wait for a target")
    run.add_argument("--backlog", type=int, help="listen backlog per port")
    run.add_argument(
        "--splice-after", type=int, help="bytes before a bulk TCP connection uses splice (0: never)"
    )
    run.add_argument("--mode", choices=["tcp", "http"], help="tcp (default) or http routing")
    run.add_argument("--http-parser", choices=["httptools", "h11"], help="HTTP head parser")
    run.add_argument("--intercepts", metavar="FILE", help="YAML list of intercept specs")
    run.add_argument("--max-head-size", type=int, help="largest request head in bytes")
    run.add_argument("--header-timeout", type=float, help="seconds to send a request head")
    run.add_argument("--idle-timeout", type=float, help="seconds an HTTP connection may idle")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tpproxy", description="Traffic-agent forwarding engine (Telepresence 2.6 compatible)."
    )
    parser.add_argument("--version", action="version", version=f"tpproxy {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    agent = sub.add_parser(
        "agent",
        help="the traffic-agent sidecar: forward to the app, apply the manager's intercepts",
        description="Like `run`, reading the sidecar's config (default "
        "/etc/traffic-agent/config.yaml), plus a session with the traffic-manager.",
    )
    agent.add_argument(
        "--manager-url",
        help="default: $TPPROXY_MANAGER_URL, else http://<managerHost>:<managerPort>",
    )
    run = sub.add_parser(
        "run",
        help="forward every agent port of a config to its app port",
        description="Every flag can also be set as TPPROXY_<FLAG> (e.g. TPPROXY_DRAIN_TIMEOUT); "
        "flags win over the environment.",
    )
    for command in (run, agent):
        _engine_flags(command)
    init = sub.add_parser(
        "agent-init",
        help="the tel-agent-init init container: redirect intercepted ports to the agent "
        "with iptables (needs NET_ADMIN)",
        description="Install the iptables nat rules that send each intercepted container port "
        "to its agent port (Telepresence 2.6 tel-agent-init). Does nothing when no intercept "
        "has a numeric target port or a headless service. Safe to run again.",
    )
    init.add_argument(
        "--config", "-c", help=f"agent config (default: $TPPROXY_CONFIG, else {DEFAULT_CONFIG})"
    )
    init.add_argument("--iptables", default="iptables", help="iptables binary (default: iptables)")
    init.add_argument("--dry-run", action="store_true", help="print the rules, change nothing")
    init.add_argument("--log-level", choices=LEVELS, default="info")
    init.add_argument("--log-format", choices=["plain", "json"], default="plain")
    check = sub.add_parser("check-config", help="validate an agent config file and list its ports")
    check.add_argument("path")

    explain = sub.add_parser(
        "explain",
        help="say which intercept of an intercepts file a request would reach, and why",
    )
    explain.add_argument("--intercepts", required=True, metavar="FILE")
    explain.add_argument("--port", required=True, type=int, help="the agent port")
    explain.add_argument("--method", default="GET")
    explain.add_argument("--path", default="/", help="request target, query string allowed")
    explain.add_argument(
        "--header", "-H", action="append", default=[], metavar="NAME: VALUE", help="repeatable"
    )
    explain.add_argument(
        "--http2",
        action="store_true",
        help="as an HTTP/2 stream (gRPC: --method POST --path /pkg.Service/Method, metadata "
        "as --header)",
    )
    return parser


def _fail(code: int, message: str) -> int:
    print(f"tpproxy: error: {message}", file=sys.stderr)
    return code


def _check_config(path: str) -> int:
    try:
        sidecar = load_sidecar(path)
    except ConfigError as exc:
        return _fail(EXIT_CONFIG, str(exc))
    for listener in listeners(sidecar):
        names = ", ".join(
            f"{i.service_name}:{i.service_port_name or i.service_port}" for i in listener.intercepts
        )
        print(
            f"{listener.agent_port}/{listener.protocol} -> {listener.container_name}:"
            f"{listener.container_port}  ({names})"
        )
    return 0


def _explain(args: argparse.Namespace) -> int:
    from tpproxy.http import explain
    from tpproxy.routing import PortRoutes
    from tpproxy.specs import build_routes, load_specs
    from tpproxy.targets import Address

    try:
        specs = load_specs(args.intercepts)
        base = {args.port: PortRoutes(Address("127.0.0.1", 1), http=True)}
        routes = build_routes(base, [s for s in specs if s.port == args.port], args.intercepts)
    except ConfigError as exc:
        return _fail(EXIT_CONFIG, str(exc))
    for header in args.header:
        if ":" not in header:
            return _fail(EXIT_CONFIG, f"--header {header!r}: expected 'NAME: VALUE'")
    if args.http2:
        from tpproxy.http import explain_stream

        block = [(b":method", args.method.encode()), (b":path", args.path.encode())]
        for header in args.header:
            name, _, value = header.partition(":")
            block.append((name.strip().lower().encode(), value.strip().encode()))
        for line in explain_stream(routes[args.port], block):
            print(line.replace("(127.0.0.1:1)", "(the app)"))
        return 0
    lines = "".join(f"{h}\r\n" for h in args.header)
    if not any(h.lower().startswith("host:") for h in args.header):
        lines = "Host: explain\r\n" + lines
    head = f"{args.method} {args.path} HTTP/1.1\r\n{lines}\r\n".encode("latin-1", "replace")
    for line in explain(routes[args.port], head):
        print(line.replace("(127.0.0.1:1)", "(the app)"))
    return 0


def _agent_init(args: argparse.Namespace) -> int:
    from tpproxy.agentinit import IptablesError, apply_rules, loopback_interface, plan_rules

    setup_logging(args.log_level, args.log_format)
    path = args.config or os.environ.get("TPPROXY_CONFIG") or DEFAULT_CONFIG
    try:
        sidecar = load_sidecar(path)
    except ConfigError as exc:
        return _fail(EXIT_CONFIG, str(exc))
    rules = plan_rules(sidecar, os.getuid(), loopback_interface())
    if not rules:
        log.info(
            "%s: no intercept has a numeric target port or a headless service; "
            "no iptables rules needed",
            path,
        )
        return 0
    for line in unserved(sidecar):
        log.warning("%s", line)
    if args.dry_run:
        for rule in rules:
            print(rule)
        return 0
    try:
        apply_rules(rules, args.iptables)
    except IptablesError as exc:
        return _fail(EXIT_IPTABLES, str(exc))
    log.info("iptables rules in place (%d steps)", len(rules))
    return 0


class _ReadyFile:
    """The file the agent container's exec readiness probe stats: there while serving."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)
        self.written = False

    def write(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text(f"{os.getpid()}\n")
        except OSError as exc:
            log.warning("cannot write the ready file %s (%s); serving anyway", self.path, exc)
        else:
            self.written = True

    def remove(self) -> None:
        if self.written:
            try:
                self.path.unlink(missing_ok=True)
            except OSError as exc:
                log.warning("cannot remove the ready file %s: %s", self.path, exc)
            self.written = False


async def _agent(settings: ProxySettings, manager_url: str | None) -> int:
    from tpproxy.agent import run_agent

    proxy = Proxy(settings)
    ready = _ReadyFile(os.environ.get("TPPROXY_READY_FILE") or READY_FILE)
    try:
        url = manager_url or os.environ.get("TPPROXY_MANAGER_URL") or None
        return await run_agent(proxy, url, os.environ, on_ready=ready.write)
    except ConfigError as exc:
        return _fail(EXIT_CONFIG, str(exc))
    except ListenError as exc:
        return _fail(EXIT_LISTEN, str(exc))
    finally:
        ready.remove()


async def _serve(settings: ProxySettings) -> int:
    try:
        _, routes = load(settings)
    except ConfigError as exc:
        return _fail(EXIT_CONFIG, str(exc))
    proxy = Proxy(settings)
    try:
        await proxy.start(routes)
    except ListenError as exc:
        return _fail(EXIT_LISTEN, str(exc))
    return await proxy.run_until_stopped()


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `tpproxy` and `python -m tpproxy`."""
    args = _parser().parse_args(argv)
    if args.command == "check-config":
        return _check_config(args.path)
    if args.command == "explain":
        return _explain(args)
    if args.command == "agent-init":
        return _agent_init(args)
    flags = vars(args)
    if args.command == "agent" and not flags.get("config") and not os.environ.get("TPPROXY_CONFIG"):
        flags["config"] = DEFAULT_CONFIG
    try:
        settings = load_settings(flags)
    except ConfigError as exc:
        return _fail(EXIT_CONFIG, str(exc))
    if not settings.config and not settings.forward:
        return _fail(EXIT_CONFIG, "give --config PATH (or TPPROXY_CONFIG) or a --forward")
    setup_logging(settings.log_level, settings.log_format)
    if args.command == "agent":
        return uvloop.run(_agent(settings, args.manager_url))
    return uvloop.run(_serve(settings))
