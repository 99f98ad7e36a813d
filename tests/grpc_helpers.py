"""Real gRPC servers (grpcio, generic handlers: no generated code) and the engine on its own
event loop in a thread, so that grpcio's synchronous clients and servers (its threads) talk to
it over loopback as they would to a sidecar."""

from __future__ import annotations

import asyncio
import hashlib
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar, cast

import grpc
import pytest
import uvloop

from tpproxy.engine import Engine
from tpproxy.http.protocol import HttpSettings
from tpproxy.routing import HeaderRule, HttpIntercept, PortRoutes, port_routes
from tpproxy.targets import Address

from .helpers import free_port

T = TypeVar("T")
SERVICE = "/tp.test.Echo/"


@dataclass
class GrpcServer:
    """A gRPC server whose every answer names it; it records what it saw of the calls."""

    name: str
    port: int = 0
    server: grpc.Server | None = None
    cancelled: threading.Event = field(default_factory=threading.Event)
    hang_started: threading.Event = field(default_factory=threading.Event)
    metadata: list[dict[str, str]] = field(default_factory=list)

    def start(self) -> GrpcServer:
        self.server = grpc.server(
            ThreadPoolExecutor(max_workers=64),
            handlers=[_Handler(self)],
            options=[("grpc.so_reuseport", 0)],
            maximum_concurrent_rpcs=None,
        )
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()
        return self

    def stop(self, grace: float | None = None) -> threading.Event:
        assert self.server is not None
        return self.server.stop(grace)

    def tag(self, data: bytes) -> bytes:
        return self.name.encode() + b":" + data


class _Handler(grpc.GenericRpcHandler):
    def __init__(self, owner: GrpcServer) -> None:
        self.owner = owner

    def service(
        self, details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler[bytes, bytes] | None:
        o = self.owner
        method = details.method.removeprefix(SERVICE)
        o.metadata.append({k: v for k, v in details.invocation_metadata if isinstance(v, str)})

        def unary(request: bytes, context: grpc.ServicerContext) -> bytes:
            return o.tag(request)

        def server_stream(request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
            count, _, size = request.partition(b"x")
            for i in range(int(count)):
                yield o.tag(b"%d:" % i + b"z" * int(size or 0))

        def client_stream(requests: Iterator[bytes], context: grpc.ServicerContext) -> bytes:
            digest = hashlib.sha256()
            total = 0
            for chunk in requests:
                digest.update(chunk)
                total += len(chunk)
            return o.tag(f"{total}:{digest.hexdigest()}".encode())

        def bidi(requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
            for request in requests:
                yield o.tag(request)

        def fail(request: bytes, context: grpc.ServicerContext) -> bytes:
            context.set_trailing_metadata((("x-why", "because"), ("x-raw-bin", b"\x00\xff\x01")))
            context.abort(grpc.StatusCode.PERMISSION_DENIED, f"{o.name} says no: ünïcode 100%")
            raise AssertionError("abort returns no more")

        def hang(request: bytes, context: grpc.ServicerContext) -> bytes:
            context.add_callback(o.cancelled.set)
            o.hang_started.set()
            deadline = time.monotonic() + float(request or b"30")
            while context.is_active() and time.monotonic() < deadline:
                time.sleep(0.01)
            return o.tag(b"late")

        kinds: dict[str, Callable[[], grpc.RpcMethodHandler[bytes, bytes]]] = {
            "Unary": lambda: grpc.unary_unary_rpc_method_handler(unary),
            "ServerStream": lambda: grpc.unary_stream_rpc_method_handler(server_stream),
            "ClientStream": lambda: grpc.stream_unary_rpc_method_handler(client_stream),
            "Bidi": lambda: grpc.stream_stream_rpc_method_handler(bidi),
            "Fail": lambda: grpc.unary_unary_rpc_method_handler(fail),
            "Hang": lambda: grpc.unary_unary_rpc_method_handler(hang),
        }
        make = kinds.get(method)
        return make() if make else None


class EngineThread:
    """An Engine on a uvloop loop of its own thread; `call` runs a coroutine there."""

    def __init__(self, http: HttpSettings | None = None) -> None:
        self.loop = uvloop.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.engine: Engine = self.call(self._make(http))

    async def _make(self, http: HttpSettings | None) -> Engine:
        return Engine(host="127.0.0.1", http=http)

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = 30) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def run(self, fn: Callable[[], T], timeout: float = 10) -> T:
        async def inside() -> T:
            return fn()

        return self.call(inside(), timeout)

    def close(self) -> None:
        self.call(self.engine.close())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


def header_rule(name: str, value: str) -> tuple[HeaderRule, ...]:
    return (HeaderRule.make(name, "exact", value, "test"),)


@dataclass
class GrpcRig:
    engine: EngineThread
    port: int
    app: GrpcServer
    alice: GrpcServer

    def routes(self, *extra: HttpIntercept, alice: bool = True) -> PortRoutes:
        intercepts = [
            HttpIntercept(
                "alice", Address("127.0.0.1", self.alice.port), header_rule("x-dev", "alice")
            )
        ]
        return port_routes(
            Address("127.0.0.1", self.app.port),
            (),
            [*intercepts, *extra] if alice else list(extra),
            http=True,
        )

    def apply(self, routes: PortRoutes) -> None:
        self.engine.call(self.engine.engine.apply({self.port: routes}))

    def channel(self, **options: int) -> grpc.Channel:
        return grpc.insecure_channel(
            f"127.0.0.1:{self.port}",
            options=[("grpc.max_receive_message_length", 128 << 20), *options.items()],
        )

    def outcomes(self) -> dict[tuple[str, str], int]:
        return self.engine.run(lambda: self.engine.engine.stats.http(self.port).outcomes())


def unary(
    channel: grpc.Channel, method: str = "Unary"
) -> grpc.UnaryUnaryMultiCallable[bytes, bytes]:
    return channel.unary_unary(SERVICE + method)


def call_of(caught: pytest.ExceptionInfo[grpc.RpcError]) -> grpc.Call:
    """The failed call behind a caught RpcError (grpcio raises one object that is both)."""
    return cast(grpc.Call, caught.value)


def dev(name: str | None) -> tuple[tuple[str, str], ...]:
    return (("x-dev", name),) if name else ()


def start_rig(http: HttpSettings | None = None) -> GrpcRig:
    app, alice = GrpcServer("app").start(), GrpcServer("alice").start()
    rig = GrpcRig(EngineThread(http), free_port(), app, alice)
    rig.apply(rig.routes())
    return rig


def stop_rig(rig: GrpcRig) -> None:
    rig.engine.close()
    for server in (rig.app, rig.alice):
        server.stop(None)


@contextmanager
def running_rig(http: HttpSettings | None = None) -> Iterator[GrpcRig]:
    """A rig for the length of a `with` (a fixture's), stopped however it ends."""
    rig = start_rig(http)
    try:
        yield rig
    finally:
        stop_rig(rig)
