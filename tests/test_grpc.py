"""gRPC through an HTTP-mode port: every call on one channel (one HTTP/2 connection) routed on
its own by its metadata, with real grpcio clients and servers on loopback."""

from __future__ import annotations

import asyncio
import hashlib
import os
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import cast

import grpc
import pytest
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.events import RequestReceived

from tpproxy.routing import HttpIntercept
from tpproxy.targets import Address

from .grpc_helpers import (
    SERVICE,
    GrpcRig,
    call_of,
    dev,
    header_rule,
    running_rig,
    stop_rig,
    unary,
)
from .helpers import free_port


@pytest.fixture
def rig() -> Iterator[GrpcRig]:
    with running_rig() as r:
        yield r


def test_unary_calls_on_one_channel_alternate_by_metadata(rig: GrpcRig) -> None:
    with rig.channel() as channel:
        call = unary(channel)
        got = [
            call(b"%d" % i, metadata=dev("alice" if i % 2 else None), timeout=5) for i in range(20)
        ]
    assert got == [(b"alice:" if i % 2 else b"app:") + b"%d" % i for i in range(20)]
    outcomes = rig.outcomes()
    assert outcomes[("alice", "forwarded")] == 10
    assert outcomes[("app", "forwarded")] == 10
    # One channel, one client connection: the streams shared it (and one per target upstream).
    traffic = rig.engine.run(lambda: rig.engine.engine.stats.entries())
    assert sum(t.connections_total for t in traffic) == 1
    assert rig.alice.metadata[-1]["x-dev"] == "alice"  # metadata reaches the target unchanged


def test_every_kind_of_call_alternates_between_app_and_intercept(rig: GrpcRig) -> None:
    with rig.channel() as channel:
        for who in ("alice", None, "alice", None):
            name = who or "app"
            stream: grpc.UnaryStreamMultiCallable[bytes, bytes] = channel.unary_stream(
                SERVICE + "ServerStream"
            )
            replies = list(stream(b"5", metadata=dev(who), timeout=5))
            assert replies == [f"{name}:{i}:".encode() for i in range(5)]

            upload: grpc.StreamUnaryMultiCallable[bytes, bytes] = channel.stream_unary(
                SERVICE + "ClientStream"
            )
            chunks = [os.urandom(1000) for _ in range(7)]
            digest = hashlib.sha256(b"".join(chunks)).hexdigest()
            assert (
                upload(iter(chunks), metadata=dev(who), timeout=5)
                == f"{name}:7000:{digest}".encode()
            )

            bidi: grpc.StreamStreamMultiCallable[bytes, bytes] = channel.stream_stream(
                SERVICE + "Bidi"
            )
            assert list(bidi(iter([b"a", b"b", b"c"]), metadata=dev(who), timeout=5)) == [
                f"{name}:{x}".encode() for x in "abc"
            ]


def test_200_concurrent_calls_mixed_on_one_channel(rig: GrpcRig) -> None:
    with rig.channel() as channel:
        call = unary(channel)
        futures = [
            call.future(b"%d" % i, metadata=dev("alice" if i % 3 == 0 else None), timeout=20)
            for i in range(200)
        ]
        results = [f.result(30) for f in futures]
    for i, result in enumerate(results):
        assert result == (b"alice:" if i % 3 == 0 else b"app:") + b"%d" % i


def test_64_mib_client_stream_arrives_intact(rig: GrpcRig) -> None:
    chunk_count, size = 1024, 64 << 10
    seed = os.urandom(size)
    digest = hashlib.sha256()
    for i in range(chunk_count):
        digest.update(seed[i:] + seed[:i])

    def chunks() -> Iterator[bytes]:
        for i in range(chunk_count):
            yield seed[i:] + seed[:i]

    with rig.channel() as channel:
        upload: grpc.StreamUnaryMultiCallable[bytes, bytes] = channel.stream_unary(
            SERVICE + "ClientStream"
        )
        answer = upload(chunks(), metadata=dev("alice"), timeout=120)
    assert answer == f"alice:{chunk_count * size}:{digest.hexdigest()}".encode()


def test_large_server_stream_arrives_intact(rig: GrpcRig) -> None:
    with rig.channel() as channel:
        stream: grpc.UnaryStreamMultiCallable[bytes, bytes] = channel.unary_stream(
            SERVICE + "ServerStream"
        )
        replies = list(stream(b"64x1048576", metadata=dev("alice"), timeout=120))
    assert len(replies) == 64
    assert all(r == b"alice:%d:" % i + b"z" * (1 << 20) for i, r in enumerate(replies))


@pytest.mark.parametrize("who", ["alice", None])
def test_error_status_and_trailing_metadata_arrive_unchanged(rig: GrpcRig, who: str | None) -> None:
    name = who or "app"
    with rig.channel() as channel, pytest.raises(grpc.RpcError) as caught:
        unary(channel, "Fail")(b"", metadata=dev(who), timeout=5)
    error = call_of(caught)
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    assert error.details() == f"{name} says no: ünïcode 100%"
    trailers = dict(error.trailing_metadata() or ())
    assert trailers["x-why"] == "because"
    assert trailers["x-raw-bin"] == b"\x00\xff\x01"


def test_deadline_and_cancel_end_the_call_at_its_target_and_spare_the_channel(
    rig: GrpcRig,
) -> None:
    with rig.channel() as channel:
        hang, call = unary(channel, "Hang"), unary(channel)
        with pytest.raises(grpc.RpcError) as caught:
            hang(b"30", metadata=dev("alice"), timeout=0.5)
        assert call_of(caught).code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert rig.alice.cancelled.wait(5), "the deadline did not reach the intercept's server"
        assert call(b"after", metadata=dev("alice"), timeout=5) == b"alice:after"

        future = hang.future(b"30", timeout=30)
        assert rig.app.hang_started.wait(5)
        assert future.cancel()
        assert rig.app.cancelled.wait(5), "the cancel did not reach the app"
        assert call(b"still", timeout=5) == b"app:still"
    assert rig.outcomes().get(("app", "reset"), 0) >= 1


def test_50_channels_at_once(rig: GrpcRig) -> None:
    channels = [rig.channel() for _ in range(50)]
    try:
        futures = [
            unary(ch).future(b"%d" % i, metadata=dev("alice" if i % 2 else None), timeout=20)
            for i, ch in enumerate(channels)
        ]
        results = [f.result(30) for f in futures]
    finally:
        for ch in channels:
            ch.close()
    assert results == [(b"alice:" if i % 2 else b"app:") + b"%d" % i for i in range(50)]


def test_unreachable_intercept_answers_unavailable_or_falls_back(rig: GrpcRig) -> None:
    dead = Address("127.0.0.1", free_port())
    rig.apply(
        rig.routes(
            HttpIntercept("gone", dead, header_rule("x-dev", "gone")),
            HttpIntercept("soft", dead, header_rule("x-dev", "soft"), fallback_to_app=True),
        )
    )
    with rig.channel() as channel:
        call = unary(channel)
        with pytest.raises(grpc.RpcError) as caught:
            call(b"x", metadata=dev("gone"), timeout=5)
        assert call_of(caught).code() == grpc.StatusCode.UNAVAILABLE
        assert dead.label in call_of(caught).details()
        assert call(b"y", metadata=dev("soft"), timeout=5) == b"app:y"
        assert call(b"z", timeout=5) == b"app:z"  # the channel is still good
    outcomes = rig.outcomes()
    assert outcomes[("gone", "unreachable")] == 1
    assert outcomes[("soft", "fallback")] == 1


def test_new_table_applies_to_new_calls_on_the_same_connection(rig: GrpcRig) -> None:
    with rig.channel() as channel:
        call = unary(channel)
        assert call(b"1", metadata=dev("alice"), timeout=5) == b"alice:1"
        bob = HttpIntercept("bob", Address("127.0.0.1", rig.app.port), header_rule("x-dev", "bob"))
        rig.apply(rig.routes(bob, alice=False))  # alice has left; another intercept remains
        assert call(b"2", metadata=dev("alice"), timeout=5) == b"app:2"
        rig.apply(rig.routes())
        assert call(b"3", metadata=dev("alice"), timeout=5) == b"alice:3"
    traffic = rig.engine.run(lambda: rig.engine.engine.stats.entries())
    assert sum(t.connections_total for t in traffic) == 1  # never reconnected


def test_port_without_rules_passes_http2_through_as_tcp(rig: GrpcRig) -> None:
    rig.apply(rig.routes(alice=False))
    with rig.channel() as channel:
        assert unary(channel)(b"x", metadata=dev("alice"), timeout=5) == b"app:x"
    assert rig.outcomes() == {}  # no stream was looked at: the connection went to the app as TCP
    entries = rig.engine.run(lambda: rig.engine.engine.stats.entries())
    assert any(e.route == "app" and e.connections_total == 1 for e in entries)


def test_drain_lets_open_calls_finish_and_refuses_new_ones(rig: GrpcRig) -> None:
    with rig.channel() as channel:
        hang = unary(channel, "Hang")
        slow = hang.future(b"1.0", metadata=dev("alice"), timeout=20)
        assert rig.alice.hang_started.wait(5)
        drained: list[int] = []
        done = threading.Event()

        def drain() -> None:
            drained.append(rig.engine.call(rig.engine.engine.drain(10), timeout=20))
            done.set()

        threading.Thread(target=drain, daemon=True).start()
        assert slow.result(20) == b"alice:late"
        assert done.wait(20)
    assert drained == [0]  # nothing had to be aborted


def test_graceful_stop_of_the_target_finishes_its_calls(rig: GrpcRig) -> None:
    with rig.channel() as channel:
        assert unary(channel)(b"warm", metadata=dev("alice"), timeout=5) == b"alice:warm"
        slow = unary(channel, "Hang").future(b"1.0", metadata=dev("alice"), timeout=20)
        assert rig.alice.hang_started.wait(5)
        stopped = rig.alice.stop(grace=10)  # GOAWAY to the proxy, then waits for the call
        assert slow.result(20) == b"alice:late"
        assert stopped.wait(15)
        with pytest.raises(grpc.RpcError) as caught:
            unary(channel)(b"after", metadata=dev("alice"), timeout=5)
        assert call_of(caught).code() == grpc.StatusCode.UNAVAILABLE
        assert unary(channel)(b"app", timeout=5) == b"app:app"


def test_concurrent_streams_beyond_the_targets_limit_wait_their_turn() -> None:
    from .grpc_helpers import EngineThread, GrpcServer

    app = GrpcServer("app")
    app.server = grpc.server(
        ThreadPoolExecutor(max_workers=8),
        handlers=[__import__("tests.grpc_helpers", fromlist=["_Handler"])._Handler(app)],
        options=[("grpc.max_concurrent_streams", 4)],
    )
    app.port = app.server.add_insecure_port("127.0.0.1:0")
    app.server.start()
    alice = GrpcServer("alice").start()
    rig = GrpcRig(EngineThread(), free_port(), app, alice)
    try:
        rig.apply(rig.routes())
        with rig.channel() as channel:
            futures = [unary(channel).future(b"%d" % i, timeout=20) for i in range(40)]
            assert [f.result(30) for f in futures] == [b"app:%d" % i for i in range(40)]
    finally:
        stop_rig(rig)


class _Resetter(asyncio.Protocol):
    """A target that resets every stream it is sent (RST_STREAM CANCEL), as a server that gave
    up on a call does."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.conn = H2Connection(H2Configuration(client_side=False))
        self.conn.initiate_connection()
        self.transport.write(self.conn.data_to_send())

    def data_received(self, data: bytes) -> None:
        for event in self.conn.receive_data(data):
            if isinstance(event, RequestReceived) and event.stream_id:
                self.conn.reset_stream(event.stream_id, ErrorCodes.CANCEL)
        self.transport.write(self.conn.data_to_send())


def test_a_reset_at_the_target_reaches_the_client_and_spares_the_channel(rig: GrpcRig) -> None:
    async def listen() -> int:
        server = await asyncio.get_running_loop().create_server(_Resetter, "127.0.0.1", 0)
        port: int = server.sockets[0].getsockname()[1]
        return port

    port = rig.engine.call(listen())
    rig.apply(
        rig.routes(
            HttpIntercept("gives-up", Address("127.0.0.1", port), header_rule("x-dev", "gives-up"))
        )
    )
    with rig.channel() as channel:
        with pytest.raises(grpc.RpcError) as caught:
            unary(channel)(b"x", metadata=dev("gives-up"), timeout=5)
        assert call_of(caught).code() == grpc.StatusCode.CANCELLED
        assert unary(channel)(b"y", metadata=dev("alice"), timeout=5) == b"alice:y"
    assert rig.outcomes()[("gives-up", "upstream_error")] == 1


def test_a_target_lost_mid_call_answers_the_call_and_spares_the_channel(rig: GrpcRig) -> None:
    with rig.channel() as channel:
        slow = unary(channel, "Hang").future(b"30", metadata=dev("alice"), timeout=20)
        assert rig.alice.hang_started.wait(5)
        rig.alice.stop(None)  # at once: the call in flight is dropped with the connection
        with pytest.raises(grpc.RpcError) as caught:
            slow.result(20)
        assert call_of(caught).code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED,
                                          grpc.StatusCode.INTERNAL)  # fmt: skip
        assert unary(channel)(b"still", timeout=5) == b"app:still"
        with pytest.raises(grpc.RpcError) as gone:
            unary(channel)(b"x", metadata=dev("alice"), timeout=5)
        assert call_of(gone).code() == grpc.StatusCode.UNAVAILABLE
