"""The Service path (kube-proxy's part), built on tpproxy's relays.

Every TCP port of a Service with a cluster IP gets a listener on that IP inside the node
namespace; each new connection goes to the next ready endpoint (round robin) at the port the
Endpoints object gives for that Service port, which is where a named targetPort has already been
resolved, to the agent after injection. An endpoint at the node's own address, or on loopback
(the API server's `kubernetes` Service), is a process on the host, dialled on the host's
127.0.0.1 the way a hostNetwork pod would be. Changing endpoints affects new connections only.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import socket
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from tpcontrol.node.netns import NetworkError, NodeNetwork, listen_in, socket_in
from tpproxy.forward import ClientRelay
from tpproxy.stats import StatsBook, TrafficStats
from tpproxy.targets import ConnectorTarget, ProtocolFactory

from .watching import Json, Key

log = logging.getLogger("tpcontrol.node")

Frontend = tuple[str, int]  # cluster IP, service port
Backend = tuple[str, int]  # endpoint IP, port


def service_backends(
    services: Iterable[Json],
    endpoints: dict[Key, Json],
    reachable: Callable[[Json], bool] = lambda address: True,
) -> dict[Frontend, list[Backend]]:
    """Which endpoints each (cluster IP, port) of every TCP Service port leads to now; only
    endpoint addresses for which `reachable(address)` holds are kept."""
    table: dict[Frontend, list[Backend]] = {}
    for svc in services:
        spec = svc.get("spec", {})
        cluster_ip = spec.get("clusterIP") or ""
        if not cluster_ip or cluster_ip == "None":
            continue
        meta = svc["metadata"]
        subsets = endpoints.get((meta["namespace"], meta["name"]), {}).get("subsets") or []
        for port in spec.get("ports") or []:
            if port.get("protocol", "TCP") != "TCP":
                continue
            name = port.get("name", "")
            backends: list[Backend] = []
            for subset in subsets:
                numbers = [
                    p["port"]
                    for p in subset.get("ports") or []
                    if p.get("name", "") == name and p.get("protocol", "TCP") == "TCP"
                ]
                for address in subset.get("addresses") or []:
                    if reachable(address):
                        backends.extend((address["ip"], n) for n in numbers)
            table[(cluster_ip, int(port["port"]))] = sorted(backends)
    return table


@dataclass
class _Frontend:
    server: asyncio.Server
    backends: list[Backend]
    turn: itertools.count[int]


class ServiceProxy:
    """Listeners on cluster IPs in the node namespace, relaying to endpoints."""

    def __init__(self, network: NodeNetwork, connect_timeout: float = 5.0) -> None:
        self.network = network
        self.connect_timeout = connect_timeout
        self.stats = StatsBook()
        self._frontends: dict[Frontend, _Frontend] = {}
        self._open: set[ClientRelay] = set()
        self._addresses: set[str] = set()

    @property
    def frontends(self) -> dict[Frontend, list[Backend]]:
        return {k: list(v.backends) for k, v in self._frontends.items()}

    def is_host(self, address: str) -> bool:
        """An address of the host: the node's own, or loopback (hostNetwork endpoints)."""
        return address == self.network.node_ip or address.startswith("127.")

    async def sync(self, table: dict[Frontend, list[Backend]]) -> None:
        """Listen on every frontend of `table` that has endpoints, stop on the others.

        Every cluster IP of `table` is an address of the node while its Service exists, so a
        port with no ready endpoint (or no listener) refuses at once, as kube-proxy's REJECT
        rule does, rather than being accepted and then reset or left to time out.
        """
        addresses = {frontend[0] for frontend in table}
        for address in sorted(addresses - self._addresses):
            try:
                await asyncio.to_thread(self.network.add_cluster_ip, address)
                self._addresses.add(address)
            except (OSError, NetworkError) as exc:
                log.error("cluster IP %s: %s", address, exc)
        live = {frontend: backends for frontend, backends in table.items() if backends}
        for frontend in [f for f in self._frontends if f not in live]:
            self._frontends.pop(frontend).server.close()
        for address in sorted(self._addresses - addresses):
            await asyncio.to_thread(self.network.remove_cluster_ip, address)
            self._addresses.discard(address)
        for frontend, backends in live.items():
            current = self._frontends.get(frontend)
            if current is not None:
                current.backends = backends
                continue
            if frontend[0] not in self._addresses:
                continue
            try:
                sock = await asyncio.to_thread(listen_in, self.network.node_ns, *frontend)
                loop = asyncio.get_running_loop()
                server = await loop.create_server(self._factory(frontend), sock=sock)
            except OSError as exc:
                log.error("service %s:%d: cannot listen: %s", *frontend, exc)
                continue
            self._frontends[frontend] = _Frontend(server, backends, itertools.count())
            log.info("service %s:%d -> %s", *frontend, backends)

    def _node_socket(self) -> socket.socket:
        """A socket in the node's namespace, bound to the node's address: the bind proves it is
        there (elsewhere that address does not exist), and a socket that is not is made again."""
        for _attempt in range(3):
            sock = socket_in(self.network.node_ns)
            try:
                sock.bind((self.network.node_ip, 0))
                return sock
            except OSError as exc:
                sock.close()
                log.error(
                    "a socket for %s was not in its namespace (%s); again",
                    self.network.node_ns,
                    exc,
                )
        raise OSError(f"cannot open a socket in network namespace {self.network.node_ns}")

    def _factory(self, frontend: Frontend) -> ProtocolFactory:
        label = f"{frontend[0]}:{frontend[1]}"

        async def connector(
            protocol_factory: ProtocolFactory,
        ) -> tuple[asyncio.BaseTransport, asyncio.BaseProtocol]:
            entry = self._frontends.get(frontend)
            if entry is None or not entry.backends:
                raise ConnectionRefusedError(f"service {label} has no ready endpoints")
            host, port = entry.backends[next(entry.turn) % len(entry.backends)]
            loop = asyncio.get_running_loop()
            if self.is_host(host):
                return await loop.create_connection(protocol_factory, "127.0.0.1", port)
            sock = self._node_socket()
            try:
                # Inside the relay's own timeout, so that what failed names the endpoint.
                async with asyncio.timeout(self.connect_timeout * 0.9):
                    await loop.sock_connect(sock, (host, port))
            except TimeoutError:
                sock.close()
                raise TimeoutError(f"endpoint {host}:{port} did not answer") from None
            except OSError as exc:
                sock.close()
                raise OSError(exc.errno, f"endpoint {host}:{port}: {exc.strerror}") from None
            except BaseException:
                sock.close()
                raise
            return await loop.create_connection(protocol_factory, sock=sock)

        target = ConnectorTarget(label, connector)

        def choose() -> tuple[ConnectorTarget, TrafficStats]:
            return target, self.stats.entry(frontend[1], "service", label)

        def relay() -> ClientRelay:
            return ClientRelay(choose, self._open.add, self._open.discard, self.connect_timeout)

        return relay

    def close(self) -> None:
        for entry in self._frontends.values():
            entry.server.close()
        self._frontends.clear()
        for relay in list(self._open):
            relay.abort()
