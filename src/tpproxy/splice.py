"""Zero-copy forwarding between two TCP sockets with splice(2), for connections moving bulk data.

The Protocol path (`tpproxy.forward`) copies every byte twice through user space: the kernel
hands a read to Python, Python hands it back to be written. For a connection moving megabytes
that copying, not Python, is the cost. splice(2) moves the bytes socket -> pipe -> socket inside
the kernel (page references, not copies), so once a connection has shown it moves bulk data,
`tpproxy.forward` flushes both transports, stops them reading, and hands duplicates of their
sockets to a `SpliceJoin` here. Small exchanges never get here: for them a pipe and two extra
system calls per read would cost more than they save.

Semantics are those of the Protocol path: EOF one way is passed on as a half-close while the
other way keeps flowing; an error on either side ends both at once (the caller aborts them);
and flow control is the pipe's: a direction whose destination cannot take more stops reading
its source until the pipe has drained.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import logging
import os
import socket
from collections.abc import Callable

log = logging.getLogger("tpproxy.splice")

AVAILABLE = hasattr(os, "splice")
# Each direction's pipe holds this much in flight (1 MiB is Linux's default pipe-max-size for
# unprivileged processes; when the per-user pipe budget is spent the kernel keeps its default).
PIPE_SIZE = 1 << 20
_F_SETPIPE_SZ = 1031
_FLAGS = getattr(os, "SPLICE_F_MOVE", 1) | getattr(os, "SPLICE_F_NONBLOCK", 2)
_STREAM_FAMILIES = (socket.AF_INET, socket.AF_INET6, socket.AF_UNIX)


def socket_fileno(transport: asyncio.BaseTransport) -> int | None:
    """The fd of a transport that is a plain stream socket (not TLS, not a tunnel), else None."""
    sock = transport.get_extra_info("socket")
    if sock is None or transport.get_extra_info("sslcontext") is not None:
        return None
    try:
        if sock.type != socket.SOCK_STREAM or sock.family not in _STREAM_FAMILIES:
            return None
        fd = sock.fileno()
    except (AttributeError, OSError):
        return None
    return fd if isinstance(fd, int) and fd >= 0 else None


class _Direction:
    """One way of a joined pair: source socket -> pipe -> destination socket."""

    __slots__ = (
        "count",
        "dst",
        "eof",
        "finished",
        "in_pipe",
        "pipe_r",
        "pipe_w",
        "reading",
        "src",
        "writing",
    )

    def __init__(
        self, src: socket.socket, dst: socket.socket, count: Callable[[int], None]
    ) -> None:
        self.src = src
        self.dst = dst
        self.count = count
        self.pipe_r, self.pipe_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        with contextlib.suppress(OSError):  # the kernel's default (64 KiB) works, in more calls
            fcntl.fcntl(self.pipe_w, _F_SETPIPE_SZ, PIPE_SIZE)
        self.in_pipe = 0
        self.eof = False
        self.finished = False
        self.reading = False
        self.writing = False

    def close_pipe(self) -> None:
        os.close(self.pipe_r)
        os.close(self.pipe_w)


class SpliceJoin:
    """Two stream sockets forwarded to each other by the kernel until both ways are finished.

    It owns duplicates of the sockets (`a_fd`, `b_fd` are dup'd here), so the transports that
    held them can stay open and idle meanwhile; `on_end(None)` once both directions have ended
    cleanly, `on_end(exc)` at the first error. Either way the duplicates and pipes are closed
    first, so the caller closing (or aborting) the transports really ends the connection.
    """

    __slots__ = ("_a", "_ab", "_b", "_ba", "_loop", "_on_end", "ended")

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        a_fd: int,
        b_fd: int,
        count_ab: Callable[[int], None],
        count_ba: Callable[[int], None],
        on_end: Callable[[OSError | None], None],
    ) -> None:
        self._loop = loop
        self._on_end = on_end
        self.ended = False
        with contextlib.ExitStack() as undo:  # what was made so far, if a later step fails
            self._a = socket.socket(fileno=os.dup(a_fd))
            undo.callback(self._a.close)
            self._b = socket.socket(fileno=os.dup(b_fd))
            undo.callback(self._b.close)
            self._ab = _Direction(self._a, self._b, count_ab)
            undo.callback(self._ab.close_pipe)
            self._ba = _Direction(self._b, self._a, count_ba)
            undo.pop_all()

    def start(self) -> None:
        for way in (self._ab, self._ba):
            self._read_from(way)

    def stop(self) -> None:
        """Forget both sockets without a verdict (the caller is already closing the transports)."""
        if not self.ended:
            self.ended = True
            self._release()

    def _read_from(self, way: _Direction) -> None:
        if not way.reading:
            way.reading = True
            self._loop.add_reader(way.src.fileno(), self._readable, way)

    def _stop_reading(self, way: _Direction) -> None:
        if way.reading:
            way.reading = False
            self._loop.remove_reader(way.src.fileno())

    def _readable(self, way: _Direction) -> None:
        if self.ended:
            return
        try:
            moved = os.splice(way.src.fileno(), way.pipe_w, PIPE_SIZE, flags=_FLAGS)
        except BlockingIOError:
            return  # woken without data (or the pipe is full; draining below frees it)
        except OSError as exc:
            self._fail(exc)
            return
        if moved == 0:
            way.eof = True
            self._stop_reading(way)
        else:
            way.in_pipe += moved
            way.count(moved)
        self._drain(way)

    def _writable(self, way: _Direction) -> None:
        if not self.ended:
            self._drain(way)

    def _drain(self, way: _Direction) -> None:
        dst = way.dst.fileno()
        while way.in_pipe:
            try:
                moved = os.splice(way.pipe_r, dst, way.in_pipe, flags=_FLAGS)
            except BlockingIOError:
                # The destination is full: hold the source until it takes the pipe's contents.
                self._stop_reading(way)
                if not way.writing:
                    way.writing = True
                    self._loop.add_writer(dst, self._writable, way)
                return
            except OSError as exc:
                self._fail(exc)
                return
            way.in_pipe -= moved
        if way.writing:
            way.writing = False
            self._loop.remove_writer(dst)
        if way.eof:
            self._finish(way)
        elif not self.ended:
            self._read_from(way)

    def _finish(self, way: _Direction) -> None:
        if way.finished:
            return
        way.finished = True
        try:
            way.dst.shutdown(socket.SHUT_WR)  # the half-close passes on
        except OSError as exc:
            if exc.errno != errno.ENOTCONN:
                self._fail(exc)
                return
        other = self._ba if way is self._ab else self._ab
        if other.finished:
            self.ended = True
            self._release()
            self._on_end(None)

    def _fail(self, exc: OSError) -> None:
        if not self.ended:
            self.ended = True
            self._release()
            self._on_end(exc)

    def _release(self) -> None:
        loop = self._loop
        for sock in (self._a, self._b):
            loop.remove_reader(sock.fileno())
            loop.remove_writer(sock.fileno())
        for way in (self._ab, self._ba):
            way.close_pipe()
        self._a.close()
        self._b.close()
