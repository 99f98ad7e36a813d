"""`tpcontrol`: the control side's commands. `demo` is the README's first command.

Every option can also come from the environment as TPCONTROL_<OPTION> (e.g.
TPCONTROL_AGENT_IMAGE); an option given on the command line wins.

Long on purpose: the argument parser of every command and the few lines that start each; the
commands' logic lives in the service packages.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import msgspec
import uvloop

from tpcontrol import __version__
from tpcontrol.lifecycle import until_signalled
from tpcontrol.names import (
    AGENT_PORT,
    LOGIN_PORT,
    MANAGER_NAMESPACE,
    MANAGER_SERVICE,
    TUNNEL_PORT,
)
from tpproxy.logs import setup_logging

if TYPE_CHECKING:
    from tpcontrol.client.credentials import ManagerCredential
    from tpcontrol.kube.agentconfig import GeneratorSettings
    from tpproxy.wire import Intercept

EXIT_USAGE = 2


def _env(name: str, default: str | None = None) -> str | None:
    return os.environ.get("TPCONTROL_" + name.upper().replace("-", "_"), default)


def _manager_options(parser: argparse.ArgumentParser) -> None:
    """How a developer's command reaches the traffic-manager: by default through the cluster's
    API (a kubectl port-forward to the manager's Service, with the user's kubeconfig)."""
    parser.add_argument(
        "--port-forward",
        default=_env("port-forward", f"{MANAGER_NAMESPACE}/{MANAGER_SERVICE}"),
        metavar="NAMESPACE/SERVICE",
        help="the manager's Service, reached through a kubectl port-forward started here "
        "(default %(default)s)",
    )
    parser.add_argument(
        "--manager",
        default=_env("manager"),
        metavar="URL",
        help="reach the manager's API at URL directly instead (no port-forward)",
    )
    parser.add_argument(
        "--login-url",
        default=_env("login-url"),
        metavar="URL",
        help="with --manager: the manager's TLS login port, for a kubeconfig with a client "
        "certificate",
    )
    parser.add_argument(
        "--kubeconfig",
        default=_env("kubeconfig"),
        help="whose user the manager sees (also what kubectl port-forward uses)",
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tpcontrol", description="Control traffic intercepts.")
    parser.add_argument("--version", action="version", version=f"tpcontrol {__version__}")
    parser.add_argument(
        "--log-level",
        default=_env("log-level", "info"),
        choices=["debug", "info", "warning", "error"],
    )
    parser.add_argument(
        "--log-format", default=_env("log-format", "plain"), choices=["plain", "json"]
    )
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser(
        "demo",
        help="the whole intercept flow on a Kubernetes cluster of this machine (needs root): "
        "the product installed from deploy/, a workload, two developers sharing a port by "
        "header, a TCP intercept, leave, uninstall",
    )
    demo.add_argument(
        "--source",
        type=Path,
        default=Path(_env("source", ".") or "."),
        help="the project's checkout: its Containerfiles, deploy/ and examples/ (default .)",
    )
    demo.add_argument(
        "--cluster-name",
        default=_env("cluster-name", "tpcontrol"),
        help="the local cluster's name: its network namespace, address, paths and cgroups "
        "are named after it, so the tests' cluster can run beside it (default tpcontrol)",
    )
    demo.add_argument(
        "--engine-only",
        action="store_true",
        help="only the forwarding engine on loopback: an app, an intercept on and off (no root)",
    )
    demo.add_argument("--requests", type=int, default=3, help="requests sent per step (1-100)")

    hook = sub.add_parser(
        "webhook",
        help="run the agent-injector admission webhook (HTTPS)",
        description="Certificates: tls.crt and tls.key in --tls-dir win when both exist (yours: "
        "served and reloaded when they change; no Secret and no caBundle is touched). Otherwise, "
        "with --self-signed, a CA and certificate are made there. Otherwise (the default, as "
        "deploy/ runs it) the injector keeps a CA and certificate in the Secret --tls-secret of "
        "--manager-namespace, writes the CA into the caBundle of --webhook-configuration, and "
        "renews both before they expire.",
    )
    hook.add_argument("--listen", default=_env("listen", "0.0.0.0:8443"), metavar="HOST:PORT")
    hook.add_argument(
        "--tls-dir",
        default=_env("tls-dir", "/var/run/secrets/tls"),
        help="your own tls.crt and tls.key here win over the Secret (reloaded when they change)",
    )
    hook.add_argument(
        "--self-signed",
        action="store_true",
        help="make a CA and certificate in --tls-dir if tls.crt is missing (no Secret)",
    )
    # Defaults of these three are tpcontrol.injector.tls's constants (imported only when the
    # webhook runs, to keep the other commands quick); the help names them for people.
    hook.add_argument(
        "--tls-secret",
        default=_env("tls-secret"),
        metavar="NAME",
        help="the Secret that holds the CA and certificate (default mutator-webhook-tls; '' to "
        "require --tls-dir)",
    )
    hook.add_argument(
        "--webhook-configuration",
        default=_env("webhook-configuration"),
        metavar="NAME",
        help="the MutatingWebhookConfiguration whose caBundle gets the CA (default "
        "agent-injector-webhook; '' to write none)",
    )
    hook.add_argument(
        "--service",
        default=_env("service"),
        metavar="NAME",
        help="the injector's Service: the certificate is for NAME.NAMESPACE.svc (default "
        "agent-injector)",
    )
    hook.add_argument(
        "--tls-check-interval",
        type=float,
        default=float(_env("tls-check-interval", "60") or 60),
        metavar="SECONDS",
        help="how often the Secret and the caBundle are checked and renewals decided (60)",
    )
    hook.add_argument(
        "--tls-name",
        action="append",
        default=[],
        help="another DNS name or IP address for the certificate (repeatable)",
    )
    hook.add_argument("--kubeconfig", default=_env("kubeconfig"))
    _generator_options(hook)
    hook.add_argument(
        "--inject-policy",
        default=_env("inject-policy", "OnDemand"),
        choices=["OnDemand", "WhenEnabled"],
    )

    icept = sub.add_parser("intercept", help="intercept a workload's traffic to a local port")
    icept.add_argument("workload")
    icept.add_argument("--namespace", "-n", default=_env("namespace", "default"))
    icept.add_argument("--service", default="", help="when the workload has several services")
    icept.add_argument("--port", default="", help="service port name or number (/TCP, /UDP)")
    icept.add_argument("--to", type=int, default=8080, help="local port to deliver to (8080)")
    icept.add_argument("--mechanism", choices=["tcp", "http"], default="tcp")
    icept.add_argument(
        "--http-header",
        action="append",
        default=[],
        metavar="NAME=VALUE|NAME~=REGEX",
        help="implies --mechanism http",
    )
    icept.add_argument("--http-path-prefix", default="", help="implies --mechanism http")
    icept.add_argument("--name", default="", help="intercept name (default WORKLOAD-PORT)")
    icept.add_argument(
        "--env-file",
        help="write the container's environment here (NAME='value' lines for sh's `.`, 0600)",
    )
    icept.add_argument(
        "--env-allow",
        action="append",
        default=[],
        metavar="NAME",
        help="pass this variable on even though it changes how programs load (LD_*, PATH, "
        "PYTHON*, proxies...: withheld by default); repeatable",
    )
    icept.add_argument("--wait", type=float, default=120, help="seconds to wait for ACTIVE")
    icept.add_argument(
        "--docker-run",
        action="store_true",
        help="run the local version as a container (docker or podman): the COMMAND after `--` "
        "is the image and its arguments; it gets the environment, the mounts at their original "
        "paths and the intercepted port",
    )
    icept.add_argument(
        "--mount",
        default="",
        metavar="DIR",
        help="mount the container's files (its volumes, its service-account token) at DIR with "
        "sshfs, named by TELEPRESENCE_ROOT (default: a fresh temporary directory; "
        "--mount=false: no mount)",
    )
    _manager_options(icept)
    icept.epilog = (
        "After `--`, a COMMAND to run with the container's environment; the "
        "intercept ends when it does."
    )

    explain = sub.add_parser(
        "explain", help="which intercept of a workload a request would reach, and why"
    )
    explain.add_argument("workload")
    explain.add_argument("--namespace", "-n", default=_env("namespace", "default"))
    explain.add_argument("--method", default="GET")
    explain.add_argument("--path", default="/")
    explain.add_argument("--header", "-H", action="append", default=[], metavar="NAME: VALUE")
    _manager_options(explain)

    leave = sub.add_parser("leave", help="end a running `tpcontrol intercept` by its name")
    leave.add_argument("name")

    listing = sub.add_parser("list", help="list the intercepts the manager knows")
    _manager_options(listing)

    uninstall = sub.add_parser("uninstall", help="remove the agent from a workload (or all)")
    uninstall.add_argument("workload", nargs="?", default="")
    uninstall.add_argument("--all", action="store_true", help="every workload of the namespace")
    uninstall.add_argument("--namespace", "-n", default=_env("namespace", "default"))
    _manager_options(uninstall)

    manager = sub.add_parser("manager", help="run the traffic-manager (HTTP API on --listen)")
    manager.add_argument("--listen", default=_env("listen", "0.0.0.0:8081"), metavar="HOST:PORT")
    manager.add_argument("--kubeconfig", default=_env("kubeconfig"))
    manager.add_argument(
        "--image-resolver-url",
        default=_env("image-resolver-url"),
        help='asked once for {"image": ...}: the preferred agent image',
    )
    manager.add_argument("--tunnel-port", type=int, default=int(_env("tunnel-port") or TUNNEL_PORT))
    manager.add_argument(
        "--login-port",
        type=int,
        default=int(_env("login-port") or LOGIN_PORT),
        help="TLS port where a client certificate buys a manager token; -1: none",
    )
    manager.add_argument(
        "--auth-mode",
        choices=("enforcing", "permissive"),
        default=_env("auth-mode", "enforcing"),
        help="enforcing (the default) refuses unauthenticated and unauthorized calls; "
        "permissive logs what it would refuse and lets it through",
    )
    _generator_options(manager)

    config = sub.add_parser(
        "webhook-config",
        help="print a MutatingWebhookConfiguration to apply (JSON); deploy/ has its own, whose "
        "caBundle the injector fills",
    )
    target = config.add_mutually_exclusive_group(required=True)
    target.add_argument("--url", help="https URL of the webhook (…/traffic-agent)")
    target.add_argument(
        "--service",
        metavar="NAMESPACE/NAME[:PORT]",
        help="the webhook's Service (port defaults to 443)",
    )
    config.add_argument(
        "--ca-file",
        type=Path,
        help="the CA that signed the certificate; without it there is no caBundle (an injector "
        "that keeps its TLS in a Secret writes it)",
    )
    return parser


def _generator_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--agent-image", default=_env("agent-image", "docker.io/tpproxy/agent:0.1.0")
    )
    parser.add_argument("--manager-namespace", default=_env("manager-namespace", MANAGER_NAMESPACE))
    parser.add_argument("--agent-port", type=int, default=int(_env("agent-port") or AGENT_PORT))
    parser.add_argument("--api-port", type=int, default=int(_env("api-port", "0") or 0))
    parser.add_argument("--agent-log-level", default=_env("agent-log-level", "info"))


def _generator_settings(args: argparse.Namespace) -> GeneratorSettings:
    """What the manager and the injector generate entries with: the same flags for both."""
    from tpcontrol.kube.agentconfig import GeneratorSettings

    return GeneratorSettings(
        agent_image=args.agent_image,
        manager_namespace=args.manager_namespace,
        agent_port=args.agent_port,
        api_port=args.api_port,
        log_level=args.agent_log_level,
    )


def _fail(message: str) -> int:
    print(f"tpcontrol: error: {message}", file=sys.stderr)
    return EXIT_USAGE


async def _run_webhook(args: argparse.Namespace) -> int:
    import asyncio
    import contextlib

    import aiohttp

    from tpcontrol.injector.tls import InjectorTls, TlsBootstrapError, TlsSettings
    from tpcontrol.injector.webhook import (
        Injector,
        ReloadingTls,
        SwitchingTls,
        WebhookServer,
        WebhookSettings,
        self_signed,
        start,
    )
    from tpcontrol.kube.client import api_client
    from tpproxy.targets import Address

    listen = Address.parse(args.listen)
    tls_dir = Path(args.tls_dir)
    cert, key = tls_dir / "tls.crt", tls_dir / "tls.key"
    files: SwitchingTls | None = None
    tls_settings: TlsSettings | None = None
    if cert.exists() and key.exists():  # brought by the user: they win, nothing is written
        files = ReloadingTls(cert, key)
    elif args.self_signed:
        self_signed(tls_dir, listen.host, args.tls_name or ["agent-injector"])
        files = ReloadingTls(cert, key)
    elif args.tls_secret == "":
        return _fail(f"{cert} or {key} is missing and --tls-secret is empty (nothing to serve)")
    else:
        given = {
            "secret": args.tls_secret,
            "webhook_configuration": args.webhook_configuration,
            "service": args.service,
        }
        try:
            tls_settings = TlsSettings(
                namespace=args.manager_namespace,
                extra_names=tuple(args.tls_name),
                check_interval=args.tls_check_interval,
                overlap=datetime.timedelta(seconds=max(600.0, 3 * args.tls_check_interval)),
                **{k: v for k, v in given.items() if v is not None},
            )
        except ValueError as exc:  # name the flag as well as the field
            flags = {
                "namespace": "--manager-namespace",
                "secret": "--tls-secret",
                "webhook_configuration": "--webhook-configuration",
                "service": "--service",
                "extra_names": "--tls-name",
                "check_interval": "--tls-check-interval",
                "overlap": "--tls-check-interval",
            }
            field = str(exc).partition(":")[0].removeprefix("TlsSettings.")
            return _fail(f"{flags[field]}: {exc}" if field in flags else str(exc))
    settings = WebhookSettings(_generator_settings(args), inject_policy=args.inject_policy)
    async with api_client(args.kubeconfig) as api:
        server = WebhookServer(Injector(api, settings))
        checks: asyncio.Task[None] | None = None
        if tls_settings is None:
            assert files is not None
            tls = files
        else:
            bootstrap = InjectorTls(api, tls_settings)
            try:
                await bootstrap.reconcile()
            except TlsBootstrapError as exc:
                print(f"tpcontrol: error: {exc}", file=sys.stderr)
                return 1
            except (OSError, aiohttp.ClientError, TimeoutError) as exc:
                print(f"tpcontrol: error: cannot reach the API server: {exc}", file=sys.stderr)
                return 1
            bootstrap.register_metrics(server.registry)
            tls = bootstrap.tls
            checks = asyncio.create_task(bootstrap.run())
        runner, port = await start(server, listen.host, listen.port, tls)
        print(f"agent injector listening on https://{listen.host}:{port}/traffic-agent", flush=True)
        await until_signalled()
        if checks is not None:
            checks.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await checks
        await runner.cleanup()
    return 0


async def _run_manager(args: argparse.Namespace) -> int:
    from tpcontrol.kube.client import api_client
    from tpcontrol.manager.api import Manager, ManagerSettings
    from tpproxy.targets import Address

    listen = Address.parse(args.listen)
    settings = ManagerSettings(
        generator=_generator_settings(args),
        image_resolver_url=args.image_resolver_url,
        tunnel_port=args.tunnel_port,
        login_port=None if args.login_port < 0 else args.login_port,
        auth_mode=args.auth_mode,
    )
    async with api_client(args.kubeconfig) as api:
        manager = Manager(api, settings)
        runner, port = await manager.start(listen.host, listen.port)
        print(f"traffic-manager listening on http://{listen.host}:{port}", flush=True)
        await until_signalled()
        await manager.stop()
        await runner.cleanup()
    return 0


async def _admin(args: argparse.Namespace) -> int:
    from tpcontrol.client.credentials import (
        CredentialError,
        ManagerCredential,
        load_user,
        plain_http_refusal,
    )
    from tpcontrol.client.portforward import ForwardError, ManagerForward

    try:
        user = load_user(args.kubeconfig)
    except CredentialError as exc:
        return _fail(str(exc))
    if args.manager:
        if refusal := plain_http_refusal(args.manager, user):
            return _fail(refusal)
        credential = ManagerCredential(user, args.login_url)
        return await _admin_at(args, args.manager.rstrip("/"), credential)
    try:
        async with ManagerForward(args.port_forward, args.kubeconfig) as forward:
            credential = ManagerCredential(user, forward.login_url)
            return await _admin_at(args, forward.url, credential)
    except ForwardError as exc:
        return _fail(str(exc))


async def _admin_at(args: argparse.Namespace, base: str, credential: ManagerCredential) -> int:
    import aiohttp

    from tpcontrol.client.intercept import InterceptSession, UsageError, printable
    from tpproxy.wire import Intercept, Removed, UninstallRequest

    try:
        async with aiohttp.ClientSession() as http:
            session = InterceptSession(base, http, credential)
            if args.command in ("list", "explain"):
                listed = await session.call("GET", "/v1/intercepts", None, list[Intercept])
                if args.command == "explain":
                    return _explain(args, listed)
                for i in listed:
                    where = f"{i.spec.workload}.{i.spec.namespace}"
                    files = "files" if i.mount_point else "-"  # the agent serves its mount
                    print(printable(
                        f"{i.id:<40} {where:<24} {i.spec.mechanism:<5} {i.disposition:<12} "
                        f"{files:<5} {i.client}"
                    ))  # fmt: skip
                return 0
            if not args.workload and not args.all:
                return _fail("uninstall: name a WORKLOAD or give --all")
            body = UninstallRequest(
                namespace=args.namespace, workload="" if args.all else args.workload
            )
            removed = await session.call("POST", "/v1/uninstall", body, Removed)
            print("removed: " + (", ".join(removed.removed) or "nothing"))
            return 0
    except UsageError as exc:
        return _fail(printable(str(exc)))
    except (aiohttp.ClientError, OSError) as exc:
        return _fail(f"cannot reach the traffic-manager at {base}: {exc}")
    except (msgspec.DecodeError, msgspec.ValidationError):
        return _fail(f"{base} does not answer as a traffic-manager does")


def _explain(args: argparse.Namespace, listed: list[Intercept]) -> int:
    from tpproxy.agent import intercept_specs
    from tpproxy.http import explain
    from tpproxy.routing import PortRoutes
    from tpproxy.specs import build_routes
    from tpproxy.targets import Address

    mine = [
        i for i in listed if i.spec.workload == args.workload and i.spec.namespace == args.namespace
    ]
    if not mine:
        print(f"no intercepts of {args.workload}.{args.namespace}: every request reaches the app")
        return 0
    for header in args.header:
        if ":" not in header:
            return _fail(f"--header {header!r}: expected 'NAME: VALUE'")
    lines = "".join(f"{h}\r\n" for h in args.header)
    head = f"{args.method} {args.path} HTTP/1.1\r\nHost: explain\r\n{lines}\r\n".encode("latin-1")
    ports = sorted({i.spec.agent_port for i in mine})
    base = {p: PortRoutes(Address("127.0.0.1", 1), http=True) for p in ports}
    routes = build_routes(base, intercept_specs(mine), "manager")
    for port in ports:
        print(f"agent port {port}:")
        for line in explain(routes[port], head):
            print("  " + line.replace("(127.0.0.1:1)", "(the app)"))
    return 0


def _webhook_config(args: argparse.Namespace) -> int:
    from tpcontrol.injector.webhook import webhook_configuration

    ca: bytes | None = None
    if args.ca_file is not None:
        try:
            ca = args.ca_file.read_bytes()
        except OSError as exc:
            return _fail(f"--ca-file {args.ca_file}: {exc.strerror or exc}")
        if b"BEGIN CERTIFICATE" not in ca:
            return _fail(f"--ca-file {args.ca_file}: not a PEM certificate")
    if args.url:
        if not args.url.startswith("https://"):
            return _fail(f"--url {args.url!r}: must be an https:// URL")
        doc = webhook_configuration(url=args.url, ca_bundle=ca)
    else:
        ns, _, rest = args.service.partition("/")
        name, _, port = rest.partition(":")
        if not ns or not name or (port and not port.isdigit()):
            return _fail(f"--service {args.service!r}: expected NAMESPACE/NAME[:PORT]")
        service = {
            "namespace": ns,
            "name": name,
            "path": "/traffic-agent",
            "port": int(port or 443),
        }
        doc = webhook_configuration(service=service, ca_bundle=ca, namespaces_excluded=(ns,))
    print(msgspec.json.format(msgspec.json.encode(doc)).decode())
    return 0


# What `pip install tpproxy[control]` adds: without it the engine works and tpcontrol cannot.
CONTROL_PACKAGES = frozenset({"kubernetes_asyncio", "cryptography", "jsonpatch", "dnslib"})


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `tpcontrol` and `python -m tpcontrol`."""
    try:
        return _main(argv)
    except ModuleNotFoundError as exc:
        if (exc.name or "").split(".")[0] not in CONTROL_PACKAGES:
            raise
        return _fail(
            f"tpcontrol needs the control extra ({exc.name} is missing): "
            "pip install 'tpproxy[control]'"
        )


def _main(argv: Sequence[str] | None) -> int:
    parser = _parser()
    words = list(sys.argv[1:] if argv is None else argv)
    command: list[str] = []
    if "--" in words:  # tpcontrol intercept ... -- COMMAND ARGS
        cut = words.index("--")
        words, command = words[:cut], words[cut + 1 :]
    args = parser.parse_args(words)
    if args.command == "demo":
        if not 1 <= args.requests <= 100:
            parser.error("--requests: must be from 1 to 100")
        if args.engine_only:
            from tpcontrol.localcluster.engine_demo import run_demo

            return uvloop.run(run_demo(args.requests))
        from tpcontrol.localcluster.demo import run_cluster_demo

        # The demo tells its own story; component logs show from warnings up unless asked.
        explicit = "--log-level" in words or os.environ.get("TPCONTROL_LOG_LEVEL")
        setup_logging(args.log_level if explicit else "warning", args.log_format)
        try:
            return uvloop.run(
                run_cluster_demo(args.source.resolve(), args.requests, args.cluster_name)
            )
        except KeyboardInterrupt:  # the demo has torn down what it started
            return 130
    setup_logging(args.log_level, args.log_format)
    if args.command == "webhook":
        return uvloop.run(_run_webhook(args))
    if args.command == "manager":
        return uvloop.run(_run_manager(args))
    if args.command == "intercept":
        from tpcontrol.client.intercept import run_intercept

        args.run = command
        return uvloop.run(run_intercept(args))
    if args.command in ("list", "uninstall", "explain"):
        return uvloop.run(_admin(args))
    if args.command == "leave":
        from tpcontrol.client.intercept import leave

        return leave(args.name)
    if args.command == "webhook-config":
        return _webhook_config(args)
    parser.error(f"unknown command {args.command!r}")
    return EXIT_USAGE
