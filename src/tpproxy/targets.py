"""Where a connection can be sent: a TCP address, or a connector such as a tunnel.

The engine treats both the same way, through `tpproxy.forward.connect(target,
protocol_factory)`, so a tunnel to a developer's machine plugs in as a connector without the
engine knowing about the manager. Plain data, so that the routing rules that name targets stay
free of the event loop (asyncio is named for the type checker only).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import asyncio

ProtocolFactory = Callable[[], "asyncio.Protocol"]


Connector = Callable[
    [ProtocolFactory], Awaitable["tuple[asyncio.BaseTransport, asyncio.BaseProtocol]"]
]
"""An async callable that opens a byte stream, with `loop.create_connection`'s contract.

It must create exactly one protocol with the factory it is given, call its `connection_made` with
a transport that supports `write`, `write_eof`, `can_write_eof`, `pause_reading`,
`resume_reading`, `set_write_buffer_limits`, `close` and `abort`, and return that pair. A
connector that does a handshake first can use `transport.set_protocol()` to hand over once the
stream is ready.
"""


@dataclass(frozen=True, slots=True)
class Address:
    """A host and port, dialled with a plain TCP connection."""

    host: str
    port: int
    label: str = field(init=False, compare=False, repr=False)
    """The name used in logs, metric labels and as a key (made once: it is used per request)."""

    def __post_init__(self) -> None:
        host, port = self.host, self.port
        object.__setattr__(self, "label", f"[{host}]:{port}" if ":" in host else f"{host}:{port}")

    @classmethod
    def parse(cls, text: str) -> Address:
        """`HOST:PORT`, `[V6]:PORT` or a bare `PORT` (meaning 127.0.0.1)."""
        host, sep, port_text = text.rpartition(":")
        if not sep:
            host, port_text = "127.0.0.1", text
        host = host.strip("[]") or "127.0.0.1"
        if not port_text.isdigit() or not 0 < int(port_text) < 65536:
            raise ValueError(f"{text!r}: port must be a number from 1 to 65535")
        return cls(host, int(port_text))


@dataclass(frozen=True, slots=True)
class ConnectorTarget:
    """A named connector; the name is what logs and metrics show."""

    name: str
    connector: Connector = field(compare=False)

    @property
    def label(self) -> str:
        """The name used in logs and metric labels."""
        return self.name


Target = Address | ConnectorTarget
