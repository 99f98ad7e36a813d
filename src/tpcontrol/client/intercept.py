"""`tpcontrol intercept`: prepare and create an intercept, deliver its traffic to a local port
through the manager's tunnel, hand the container's environment to a command, and leave on exit.

Long on purpose: the whole `intercept` command, from prepare to leave, and the intercept it
keeps alive across manager restarts (`LiveIntercept`); its local end (the mount, the command,
the container) is `tpcontrol.client.handover`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import getpass
import os
import re
import signal
import socket
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar
from urllib.parse import urlsplit

import aiohttp
import msgspec

from tpcontrol.client.container import (
    ContainerUnavailable,
    container_engine,
    run_argv,
    run_container,
)
from tpcontrol.client.credentials import (
    CredentialError,
    ManagerCredential,
    load_user,
    plain_http_refusal,
)
from tpcontrol.client.handover import mount_files, run_command, unless_stopped
from tpcontrol.client.localenv import EnvFileError, local_environment, write_env_file
from tpcontrol.client.mount import SshfsMount
from tpcontrol.client.portforward import ForwardError, ManagerForward
from tpcontrol.client.tunnel import TunnelClient
from tpcontrol.lifecycle import signalled
from tpproxy.agent import SessionLost
from tpproxy.agent import watch_line as _watch_line
from tpproxy.http.h2_streams import HTTP2_APP_PROTOCOLS
from tpproxy.routing import HeaderRule, RuleError, ValueRule, check_rule_counts
from tpproxy.specs import HeaderMatch, Op, PathMatch
from tpproxy.tunnel import Hello
from tpproxy.wire import (
    ClientInfo,
    ErrorBody,
    Intercept,
    InterceptRequest,
    ManagerInfo,
    Mechanism,
    PreparedIntercept,
    PrepareRequest,
    SessionId,
)

T = TypeVar("T")

HEARTBEAT = 5.0
CALL_TIMEOUT = aiohttp.ClientTimeout(total=15)
_HEADER = re.compile(r"^([!#$%&'*+\-.^_`|~0-9A-Za-z]+?)(~=|=)(.*)$")  # lazy: `~=` wins over `=`


class UsageError(ValueError):
    """A bad flag; the message names it."""


def parse_header(text: str) -> HeaderMatch:
    """`NAME=VALUE` (exact) or `NAME~=REGEX` (the whole value must match)."""
    match = _HEADER.match(text)
    if match is None:
        raise UsageError(f"--http-header {text!r}: expected NAME=VALUE or NAME~=REGEX")
    name, op, value = match.groups()
    kind: Op = "regex" if op == "~=" else "exact"
    try:  # the agent's own rule constructor: what it would refuse is refused here
        HeaderRule.make(name, kind, value, f"--http-header {text!r}")
    except RuleError as exc:
        raise UsageError(str(exc)) from None
    return HeaderMatch(name=name, value=value, op=kind)


class ManagerRefused(UsageError):
    """A 4xx/5xx answer of the manager; the message is its `error`."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class InterceptSession:
    """One client session at the manager, holding one intercept until closed."""

    manager: str
    http: aiohttp.ClientSession
    credential: ManagerCredential = field(default_factory=lambda: ManagerCredential(None))
    session: str = ""

    async def call(self, method: str, path: str, body: msgspec.Struct | None, answer: type[T]) -> T:
        """One API call with the caller's credential, its answer decoded as `answer` (the
        manager's own wire structs); ManagerRefused says why not. A refused manager token
        (the manager restarted) is bought again once."""
        status, raw = await self._call(method, path, body)
        if status == 401 and self.credential.user is not None and not self.credential.user.token:
            self.credential.invalidate()
            status, raw = await self._call(method, path, body)
        if status >= 300:
            try:
                error = msgspec.json.decode(raw, type=ErrorBody).error
            except msgspec.DecodeError:
                error = f"{status}: {raw[:300].decode(errors='replace')}"
            raise ManagerRefused(status, error)
        return msgspec.json.decode(raw or b"null", type=answer)

    async def _call(self, method: str, path: str, body: msgspec.Struct | None) -> tuple[int, bytes]:
        data = msgspec.json.encode(body) if body is not None else None
        try:
            headers = await self.credential.headers()
        except CredentialError as exc:
            raise UsageError(str(exc)) from None
        async with self.http.request(
            method,
            self.manager + path,
            data=data,
            headers={"content-type": "application/json", **headers},
            timeout=CALL_TIMEOUT,  # a forward that accepts but never answers must not hang us
        ) as r:
            return r.status, await r.read()

    async def arrive(self) -> None:
        name = f"{getpass.getuser()}@{socket.gethostname()}"
        try:
            arrived = await self.call(
                "POST", "/v1/clients", ClientInfo(name=name, version="0.1.0"), SessionId
            )
        except ManagerRefused as exc:
            raise UsageError(f"the manager refused this client: {exc}") from None
        self.session = arrived.session_id

    async def depart(self) -> None:
        with contextlib.suppress(aiohttp.ClientError, OSError, TimeoutError, UsageError):
            await self.call("DELETE", f"/v1/sessions/{self.session}", None, type(None))


_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def printable(text: str) -> str:
    """Text from the manager or an agent, with control characters (terminal escapes that could
    retitle the window, write the clipboard or fake a link) shown as `\\xNN`."""
    return _CONTROL.sub(lambda m: f"\\x{ord(m[0]):02x}", text)


def _fail(message: str) -> int:
    print(f"tpcontrol: error: {printable(message)}", file=sys.stderr)
    return 2


async def run_intercept(args: argparse.Namespace) -> int:
    """The whole command; returns the exit code (the command's, when one was run)."""
    try:
        headers = [parse_header(h) for h in args.http_header]
    except UsageError as exc:
        return _fail(str(exc))
    # argparse's choices are exactly the Mechanism literals
    mechanism: Mechanism = "http" if (headers or args.http_path_prefix) else args.mechanism
    if args.http_path_prefix and not args.http_path_prefix.startswith("/"):
        return _fail(f"--http-path-prefix {args.http_path_prefix!r}: must start with /")
    try:  # all the manager would refuse at create, refused before prepare rolls anything out
        check_rule_counts(len(headers), 0, "--http-")
        if args.http_path_prefix:
            ValueRule.make("prefix", args.http_path_prefix, "--http-path-prefix")
    except RuleError as exc:
        return _fail(str(exc).replace("--http-headers:", "--http-header:"))
    if args.docker_run:  # checked before anything is prepared or rolled out
        if not args.run:
            return _fail("--docker-run: give the image (and its arguments) after --")
        try:
            container_engine()
        except ContainerUnavailable as exc:
            return _fail(str(exc))
    forward: ManagerForward | None = None
    args.tunnel_port = None
    try:
        user = load_user(args.kubeconfig)
    except CredentialError as exc:
        return _fail(str(exc))
    login_url = getattr(args, "login_url", None)
    if args.manager and (refusal := plain_http_refusal(args.manager, user)):
        return _fail(refusal)
    if not args.manager:  # the in-cluster manager, through the API with the user's kubeconfig
        try:
            forward = ManagerForward(args.port_forward, args.kubeconfig)
            await forward.start()
        except ForwardError as exc:
            return _fail(str(exc))
        args.manager, args.tunnel_port = forward.url, forward.tunnel_port
        login_url = forward.login_url
    try:
        credential = ManagerCredential(user, login_url)
        return await _with_manager(args, mechanism, headers, forward, credential)
    finally:
        if forward is not None:
            await forward.stop()


async def _with_manager(
    args: argparse.Namespace,
    mechanism: Mechanism,
    headers: list[HeaderMatch],
    forward: ManagerForward | None,
    credential: ManagerCredential,
) -> int:
    timeout = aiohttp.ClientTimeout(total=None, connect=5)
    async with aiohttp.ClientSession(timeout=timeout) as http:
        client = InterceptSession(args.manager.rstrip("/"), http, credential)
        try:
            await client.arrive()
        except (aiohttp.ClientError, OSError) as exc:
            return _fail(f"cannot reach the traffic-manager at {args.manager}: {exc}")
        except UsageError as exc:
            return _fail(str(exc))
        except (msgspec.DecodeError, msgspec.ValidationError):
            return _fail(f"{args.manager} does not answer as a traffic-manager does")
        try:
            return await _intercept(client, args, mechanism, headers, forward)
        except UsageError as exc:
            return _fail(str(exc))
        except (aiohttp.ClientError, OSError) as exc:
            return _fail(f"the traffic-manager at {args.manager}: {exc or type(exc).__name__}")
        except (msgspec.DecodeError, msgspec.ValidationError, SessionLost) as exc:
            return _fail(f"unexpected answer from the traffic-manager: {exc!r}"[:300])
        finally:
            await client.depart()


def http2_hint(port_id: str, app_protocol: str, mechanism: Mechanism) -> str:
    """What an intercept of an HTTP/2 (gRPC) port takes: single calls, or the whole port."""
    said = f"port {port_id} speaks HTTP/2 (appProtocol {app_protocol})"
    if mechanism == "http":
        return f"{said}: each call on a connection is routed on its own by the header rules"
    return (
        f"{said}: this intercept takes every call of the port; --http-header NAME=VALUE would "
        "take only the calls whose metadata match"
    )


async def _intercept(
    client: InterceptSession,
    args: argparse.Namespace,
    mechanism: Mechanism,
    headers: list[HeaderMatch],
    forward: ManagerForward | None,
) -> int:
    request = PrepareRequest(
        workload=args.workload,
        namespace=args.namespace,
        service=args.service,
        port=args.port,
        mechanism=mechanism,
    )
    try:
        prepared = await client.call("POST", "/v1/prepare", request, PreparedIntercept)
    except ManagerRefused as exc:
        raise UsageError(str(exc).split("\n")[0]) from None
    port_id = prepared.service_port_name or str(prepared.service_port)
    print(
        f"intercepting {prepared.workload_kind} {args.workload}.{args.namespace}: service "
        f"{prepared.service_name} port {port_id} (container {prepared.container_name}:"
        f"{prepared.container_port}) -> localhost:{args.to}",
        flush=True,
    )
    if prepared.app_protocol.lower() in HTTP2_APP_PROTOCOLS:
        print(http2_hint(port_id, prepared.app_protocol, mechanism), flush=True)
    path = PathMatch(value=args.http_path_prefix, op="prefix") if args.http_path_prefix else None
    spec = InterceptRequest(
        name=args.name or f"{args.workload}-{port_id}",
        workload=args.workload,
        namespace=args.namespace,
        mechanism=mechanism,
        service_name=prepared.service_name,
        service_port_identifier=port_id,
        container_port=prepared.container_port,
        agent_port=prepared.agent_port,
        target_port=args.to,
        headers=headers,
        path=path,
    )
    live = LiveIntercept(client, spec, args.to, args.tunnel_port, forward)
    mount: SshfsMount | None = None
    await live.create()
    pidfile = _pidfile(spec.name)
    await asyncio.to_thread(_write_pid, pidfile)
    heartbeat = asyncio.create_task(live.keep())
    try:
        intercept = await _until_active(client, live.id, args.wait)
        local = local_environment(intercept.environment, args.env_allow)
        if local.notice():
            print(f"tpcontrol: {local.notice()}", file=sys.stderr, flush=True)
        env = {**local.given, "TELEPRESENCE_INTERCEPT_ID": live.id}
        stop = signalled()  # from here on Ctrl-C and SIGTERM mean: leave, in order
        mounting = asyncio.create_task(
            mount_files(live.tunnel_address, _mount_hello(client, live), args.mount,
                        served=bool(intercept.mount_point))
        )  # fmt: skip
        if not await unless_stopped(mounting, stop):
            return 0  # left while mounting: an ordinary leave
        mount = mounting.result()
        if mount is not None and mount.path is not None:
            env["TELEPRESENCE_ROOT"] = str(mount.path)
        if args.env_file:
            try:
                await asyncio.to_thread(write_env_file, Path(args.env_file), env)
            except EnvFileError as exc:
                raise UsageError(f"--env-file {exc}") from None
        if args.docker_run:
            mounts = env.get("TELEPRESENCE_MOUNTS", "").split(":")
            name = f"tpcontrol-{spec.name}-{os.getpid()}"
            argv = run_argv(
                container_engine(), name, args.run, env, mount.path if mount else None,
                [m for m in mounts if m], args.to, prepared.container_port,
            )  # fmt: skip
            print(f"  running the local version as container {name}", flush=True)
            return await run_container(argv, name, env, stop)
        if args.run:
            return await run_command(args.run, env, stop)
        await stop.wait()
        return 0
    finally:
        heartbeat.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await heartbeat
        if mount is not None:
            await mount.stop()
        await live.leave()
        pidfile.unlink(missing_ok=True)


def _mount_hello(client: InterceptSession, live: LiveIntercept) -> Callable[[], Hello]:
    """The first line of each mount stream: this session's, for the intercept as it is now
    (its id changes when the client intercepts again after a manager restart)."""

    def hello() -> Hello:
        return Hello(
            role="client", session=client.session, intercept=live.id,
            token=client.credential.current(), purpose="mount",
        )  # fmt: skip

    return hello


def _pidfile(name: str) -> Path:
    """Where a running `intercept` says who it is, so that `tpcontrol leave NAME` can end it."""
    base = Path(os.environ.get("XDG_RUNTIME_DIR") or Path.home() / ".cache") / "tpcontrol"
    return base / f"{name}.pid"


def _write_pid(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(str(os.getpid()))


def leave(name: str, within: float = 20.0) -> int:
    """Ask the `intercept` process holding `name` to leave (as Ctrl-C would) and wait for it."""
    import time

    path = _pidfile(name)
    try:
        pid = int(path.read_text())
    except (OSError, ValueError):
        print(f"tpcontrol: error: no running intercept named {name!r}", file=sys.stderr)
        return 2
    try:
        os.kill(pid, signal.SIGINT)
    except ProcessLookupError:
        path.unlink(missing_ok=True)
        print(f"tpcontrol: error: the intercept {name!r} is no longer running", file=sys.stderr)
        return 2
    deadline = time.monotonic() + within
    while time.monotonic() < deadline and path.exists():
        time.sleep(0.1)
    if path.exists():
        print(f"tpcontrol: error: {name!r} did not leave within {within:.0f} s", file=sys.stderr)
        return 1
    print(f"left {name}")
    return 0


class LiveIntercept:
    """The intercept and its tunnel, kept alive: after a manager restart (the session is
    unknown there) the client arrives again and creates the intercept again."""

    def __init__(
        self,
        client: InterceptSession,
        spec: InterceptRequest,
        local_port: int,
        tunnel_port: int | None = None,
        forward: ManagerForward | None = None,
    ) -> None:
        self.tunnel_port = tunnel_port  # the local end of a port-forward, else the manager's
        self.forward = forward
        self.client = client
        self.spec = spec
        self.local_port = local_port
        self.id = ""
        self.tunnel: TunnelClient | None = None
        self.tunnel_address = ("127.0.0.1", 0)

    async def create(self) -> None:
        client = self.client
        path = f"/v1/sessions/{client.session}/intercepts"
        self.id = (await client.call("POST", path, self.spec, Intercept)).id
        info = await client.call("GET", "/v1/info", None, ManagerInfo)
        host = urlsplit(client.manager).hostname or "127.0.0.1"
        port = self.tunnel_port or info.tunnel_port
        self.tunnel_address = (host, port)
        self.tunnel = TunnelClient(
            host,
            port,
            client.session,
            self.id,
            "127.0.0.1",
            self.local_port,
            token=client.credential.current,
        )
        self.tunnel.start()

    async def keep(self) -> None:
        """Heartbeat; when the manager no longer knows us, arrive and intercept again."""
        client = self.client
        while True:
            await asyncio.sleep(HEARTBEAT)
            try:
                try:
                    remain = f"/v1/sessions/{client.session}/remain"
                    await client.call("POST", remain, None, type(None))
                    continue
                except ManagerRefused as exc:
                    if exc.status != 404:
                        print(f"  the traffic-manager refused a heartbeat: {exc}", flush=True)
                        continue
                print("the traffic-manager restarted: intercepting again", flush=True)
                if self.tunnel is not None:
                    await self.tunnel.close()
                await client.arrive()
                await self.create()
                print(f"  intercept {self.id} created again", flush=True)
            except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                print(f"  traffic-manager unreachable ({exc or type(exc).__name__}); retrying",
                      flush=True)  # fmt: skip
                await self._reforward()
            except UsageError as exc:
                print(f"  cannot intercept again: {exc}", flush=True)

    async def _reforward(self) -> None:
        """The pod behind a port-forward may have been replaced: forward again, same ports."""
        if self.forward is None:
            return
        try:
            await self.forward.restart()
        except ForwardError as exc:
            print(f"  {exc}", flush=True)

    async def leave(self) -> None:
        if self.tunnel is not None:
            await self.tunnel.close()
        path = f"/v1/sessions/{self.client.session}/intercepts/{self.spec.name}"
        try:
            await self.client.call("DELETE", path, None, type(None))
        except (aiohttp.ClientError, OSError, TimeoutError, UsageError) as exc:
            print(
                f"could not tell the traffic-manager to end intercept {self.id} ({exc}): it "
                "ends it when this client's session expires",
                file=sys.stderr,
                flush=True,
            )
        print(f"left intercept {self.id}", flush=True)


async def _until_active(client: InterceptSession, icept: str, wait: float) -> Intercept:
    """Show each change of the intercept's state until it is ACTIVE (or fails)."""
    url = f"{client.manager}/v1/sessions/{client.session}/intercepts?watch=1"
    shown = ""
    try:
        headers = await client.credential.headers()
    except CredentialError as exc:
        raise UsageError(str(exc)) from None
    try:
        async with asyncio.timeout(wait), client.http.get(url, headers=headers) as stream:
            if stream.status != 200:
                raw = await stream.read()
                raise UsageError(f"watching intercept {icept}: {stream.status} {raw[:300]!r}")
            while line := await _watch_line(stream.content):
                for intercept in msgspec.json.decode(line, type=list[Intercept]):
                    if intercept.id != icept:
                        continue
                    state = intercept.disposition
                    if state != shown:
                        shown = state
                        note = (
                            " (pods are rolling out with the agent)" if state == "WAITING" else ""
                        )
                        message = printable(intercept.message)
                        print(f"  {state}: {message}{note}", flush=True)
                    if state == "ACTIVE":
                        return intercept
                    if state in ("AGENT_ERROR", "BAD_ARGS", "NO_AGENT", "NO_MECHANISM"):
                        why = printable(intercept.message)
                        raise UsageError(f"intercept {icept}: {state}: {why}")
    except TimeoutError:
        raise UsageError(f"intercept {icept} not active after {wait:.0f} s") from None
    raise UsageError("the manager ended the watch")
