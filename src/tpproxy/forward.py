"""Bidirectional byte forwarding between two transports, with flow control and half-close.

Each forwarded connection is a pair of `asyncio.Protocol`s that write straight into each other's
transport: no streams, no queues, no copies beyond the kernel's. Flow control is the transports'
own: when one side's write buffer passes its high-water mark, the other side stops reading until
it drains. EOF one way is passed on with `write_eof` while the other way keeps flowing; a reset
on one side resets the other at once.

A connection that turns out to move bulk data (`splice_after` bytes in large reads) between two
plain sockets is joined in the kernel (`tpproxy.splice`): both transports are flushed and stop
reading, and splice(2) moves the rest without copying it through Python.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import cast

from tpproxy.settings import SPLICE_AFTER
from tpproxy.splice import AVAILABLE as SPLICE_AVAILABLE
from tpproxy.splice import SpliceJoin, socket_fileno
from tpproxy.stats import TrafficStats
from tpproxy.targets import Address, ProtocolFactory, Target

log = logging.getLogger("tpproxy.forward")

WRITE_HIGH_WATER = 256 * 1024
WRITE_LOW_WATER = 64 * 1024
# Only reads at least this large count toward joining a connection with splice: request/response
# traffic of small messages never pays for a pipe, and pays one comparison per read for the check.
BIG_READ = 16 * 1024
_NEVER = 1 << 62


class _Relay(asyncio.Protocol):
    """One side of a forwarded connection; `peer` is the other side once both are connected."""

    __slots__ = (
        "_until_splice",
        "closed",
        "eof",
        "join",
        "joining",
        "lead",
        "peer",
        "stats",
        "transport",
    )

    transport: asyncio.Transport
    peer: _Relay | None
    stats: TrafficStats
    lead: _Relay
    """The side that holds the pair's splice state; its inbound bytes count as to_target."""

    def __init__(self, splice_after: int = 0) -> None:
        self.peer = None
        self.eof = False
        self.closed = False
        self.join: SpliceJoin | None = None
        self.joining = False
        self._until_splice = splice_after if splice_after > 0 and SPLICE_AVAILABLE else _NEVER

    def pause_writing(self) -> None:
        # Our write buffer is full of the peer's bytes: stop reading the peer until it drains.
        peer = self.peer
        if peer is not None and not peer.closed:
            peer.transport.pause_reading()

    def resume_writing(self) -> None:
        lead = self.lead
        if lead.joining:
            lead.join_when_flushed()
            return
        peer = self.peer
        if peer is not None and not peer.closed and lead.join is None:
            peer.transport.resume_reading()

    def eof_received(self) -> bool:
        self.eof = True
        peer = self.peer
        if peer is None or peer.closed:
            return False
        if peer.eof:
            # Both directions are finished: close both, flushing what is buffered.
            peer.transport.close()
            return False
        if peer.transport.can_write_eof():
            peer.transport.write_eof()
            return True  # keep our side open: the other direction may still be sending to us
        peer.transport.close()
        return False

    def _lost(self, exc: Exception | None) -> None:
        self.closed = True
        join = self.lead.join
        if join is not None:
            join.stop()
        peer = self.peer
        if peer is None or peer.closed:
            return
        if exc is not None:
            # A reset (or any error) on one side resets the other: the client sees what happened.
            self.stats.resets += 1
            peer.transport.abort()
        else:
            peer.transport.close()

    # -- joining the sockets with splice ----------------------------------------------------
    def moved_bulk(self, size: int) -> None:
        """`size` bytes moved in one large read (either way; called on the lead side); join
        the pair once enough have."""
        self._until_splice -= size
        if self._until_splice <= 0:
            self._until_splice = _NEVER  # one attempt per connection
            self._start_joining()

    def _start_joining(self) -> None:
        peer = self.peer
        if peer is None or self.eof or peer.eof or self.closed or peer.closed:
            return
        if socket_fileno(self.transport) is None or socket_fileno(peer.transport) is None:
            return  # a tunnel or TLS target: the Protocol path stays
        # Nothing may be left in user space: stop reading, and wait until both write buffers
        # are empty (with a low-water mark of 0, resume_writing says exactly that).
        self.joining = True
        for side in (self, peer):
            side.transport.pause_reading()
            side.transport.set_write_buffer_limits(0, 0)
        self.join_when_flushed()

    def join_when_flushed(self) -> None:
        peer = self.peer
        if not self.joining or peer is None or self.closed or peer.closed:
            return
        if self.transport.get_write_buffer_size() or peer.transport.get_write_buffer_size():
            return  # the side still flushing calls again from resume_writing
        self.joining = False
        a_fd, b_fd = socket_fileno(self.transport), socket_fileno(peer.transport)
        assert a_fd is not None
        assert b_fd is not None
        try:
            join = SpliceJoin(
                asyncio.get_running_loop(),
                a_fd,
                b_fd,
                self._count_to_target,
                self._count_to_client,
                self._joined_end,
            )
        except OSError as exc:  # out of descriptors or pipes: the Protocol path goes on
            log.info("port %d: not joining a connection with splice: %s", self.stats.port, exc)
            for side in (self, peer):
                side.transport.set_write_buffer_limits(WRITE_HIGH_WATER, WRITE_LOW_WATER)
                side.transport.resume_reading()
            return
        self.join = join
        self.stats.joined += 1
        join.start()

    def _count_to_target(self, size: int) -> None:
        self.stats.bytes_to_target += size

    def _count_to_client(self, size: int) -> None:
        self.stats.bytes_to_client += size

    def _joined_end(self, exc: OSError | None) -> None:
        """Both ways of a joined connection have ended (or one failed): close both transports."""
        peer = self.peer
        assert peer is not None
        if exc is None:
            self.transport.close()
            peer.transport.close()
            return
        self.stats.resets += 1
        log.debug("port %d: joined connection ended: %s", self.stats.port, exc)
        self.transport.abort()
        peer.transport.abort()


class UpstreamRelay(_Relay):
    """The target side: bytes received here go to the client."""

    __slots__ = ()

    def __init__(self, client: ClientRelay) -> None:
        super().__init__()
        self.peer = self.lead = client
        self.stats = client.stats

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)  # uvloop's transports do not subclass it
        self.transport = transport
        transport.set_write_buffer_limits(WRITE_HIGH_WATER, WRITE_LOW_WATER)

    def data_received(self, data: bytes) -> None:
        size = len(data)
        self.stats.bytes_to_client += size
        self.peer.transport.write(data)  # type: ignore[union-attr]
        if size >= BIG_READ:
            self.lead.moved_bulk(size)

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost(exc)


class ClientRelay(_Relay):
    """The accepted side: it picks its target when accepted and keeps it until it closes.

    `choose` is called once, at accept time, and returns the target and the counters to use;
    this is what makes a route change affect only new connections.
    """

    __slots__ = (
        "_connect_timeout",
        "_connecting",
        "_on_close",
        "_on_open",
        "_pending",
        "_target",
    )

    def __init__(
        self,
        choose: Callable[[], tuple[Target, TrafficStats]],
        on_open: Callable[[ClientRelay], None],
        on_close: Callable[[ClientRelay], None],
        connect_timeout: float,
        splice_after: int = SPLICE_AFTER,
    ) -> None:
        super().__init__(splice_after)
        self.lead = self
        target, self.stats = choose()
        self._on_close = on_close
        self._connect_timeout = connect_timeout
        self._connecting: asyncio.Task[None] | None = None
        self._target = target
        self._on_open = on_open
        self._pending = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)  # uvloop's transports do not subclass it
        self.transport = transport
        transport.set_write_buffer_limits(WRITE_HIGH_WATER, WRITE_LOW_WATER)
        transport.pause_reading()  # nothing to forward to until the target answers
        self._on_open(self)
        stats = self.stats
        stats.connections_total += 1
        stats.connections_open += 1
        self._connecting = asyncio.get_running_loop().create_task(self._connect())

    async def _connect(self) -> None:
        target = self._target
        try:
            async with asyncio.timeout(self._connect_timeout):
                transport, upstream = await connect(target, lambda: UpstreamRelay(self))
        except (TimeoutError, OSError) as exc:
            self.stats.connect_errors += 1
            log.warning("port %d: cannot reach %s: %s", self.stats.port, target.label, _reason(exc))
            self.transport.abort()
            return
        except asyncio.CancelledError:
            self.transport.abort()
            raise
        except Exception:
            self.stats.connect_errors += 1
            log.exception("port %d: connector %s failed", self.stats.port, target.label)
            self.transport.abort()
            return
        finally:
            self._connecting = None
        if self.closed:
            transport.close()  # the client left while we were connecting
            return
        assert isinstance(upstream, UpstreamRelay)
        self.peer = upstream
        pending, self._pending = self._pending, b""
        if pending:
            upstream.transport.write(pending)
        if self.eof:
            # The client finished sending before the target answered: pass the EOF on now.
            self.eof = False
            if self.eof_received():
                return
            self.transport.close()
            return
        self.transport.resume_reading()

    def data_received(self, data: bytes) -> None:
        self.stats.bytes_to_target += len(data)
        peer = self.peer
        if peer is None:
            # Bytes that arrive before the target answers are held (reading is paused meanwhile).
            self._pending += data
            self.transport.pause_reading()
            return
        peer.transport.write(data)
        if len(data) >= BIG_READ:
            self.moved_bulk(len(data))

    def eof_received(self) -> bool:
        if self.peer is None:
            self.eof = True  # remembered, and passed on once connected
            return True
        return super().eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self.stats.connections_open -= 1
        self._lost(exc)
        self._on_close(self)

    def shutdown(self) -> None:
        """Draining: a TCP connection has no boundary to stop at, so it is left to finish."""

    def abort(self) -> None:
        """Drop the connection at once (both sides), as when a drain times out."""
        if self._connecting is not None:
            self._connecting.cancel()
        if self.peer is not None and not self.peer.closed:
            self.peer.transport.abort()
        if not self.closed:
            self.transport.abort()

    @property
    def target(self) -> Target:
        """Where this connection was sent when it was accepted."""
        return self._target


class JoinedRelay(_Relay):
    """One side of two streams joined after their handshake (`tpproxy.tunnel.join`: the manager
    pairing an agent's and a client's stream, a client pairing a stream with its local port).

    Here, not in `tunnel`, because the compiled hot path allows no interpreted subclass.
    `splice_after` (on the inbound side, which leads the pair) as for `ClientRelay`."""

    __slots__ = ("_inbound",)

    def __init__(self, stats: TrafficStats, inbound: bool, splice_after: int = 0) -> None:
        super().__init__(splice_after)
        self.stats = stats
        self._inbound = inbound

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.transport.set_write_buffer_limits(WRITE_HIGH_WATER, WRITE_LOW_WATER)

    def data_received(self, data: bytes) -> None:
        size = len(data)
        if self._inbound:
            self.stats.bytes_to_target += size
        else:
            self.stats.bytes_to_client += size
        self.peer.transport.write(data)  # type: ignore[union-attr]
        if size >= BIG_READ:
            self.lead.moved_bulk(size)

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost(exc)


def _reason(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return str(exc) or "timed out"  # a connector's own timeout may name what it waited on
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


async def connect(
    target: Target, protocol_factory: ProtocolFactory
) -> tuple[asyncio.BaseTransport, asyncio.BaseProtocol]:
    """Open a stream to `target` whose bytes are delivered to a protocol made by the factory."""
    if isinstance(target, Address):
        loop = asyncio.get_running_loop()
        return await loop.create_connection(protocol_factory, target.host, target.port)
    return await target.connector(protocol_factory)


async def connect_within(
    target: Target, protocol_factory: ProtocolFactory, within: float, port: int
) -> str:
    """`connect`, bounded by `within` seconds: "" once connected, else why not (a connector's own
    failure is logged with its traceback, as a bug of the connector)."""
    try:
        async with asyncio.timeout(within):
            await connect(target, protocol_factory)
    except (TimeoutError, OSError) as failed:
        return "timed out" if isinstance(failed, TimeoutError) else (failed.strerror or str(failed))
    except Exception as broken:
        log.exception("port %d: connector %s failed", port, target.label)
        return str(broken) or type(broken).__name__
    return ""
