"""The local cluster's DNS: a stand-in for CoreDNS and its `kubernetes` plugin.

CoreDNS is not packaged in Debian and the local cluster has no registry to pull it from, yet pods
must resolve Service names (the injected agent dials `traffic-manager.ambassador`). This module
answers, from a table that follows the API server (Services and Endpoints in all namespaces):

- `<svc>.<ns>.svc.<domain>` A/AAAA: the Service's cluster IPs; for a headless Service
  (clusterIP None) the ready endpoint addresses; for an ExternalName Service a CNAME;
- `<endpoint>.<svc>.<ns>.svc.<domain>` A/AAAA: a ready endpoint by its hostname (or its address
  with dashes, `10-1-0-5`), as CoreDNS names them;
- `_<port>._<proto>.<svc>.<ns>.svc.<domain>` SRV: the Service's named port (one record per ready
  endpoint for a headless Service), with the targets' addresses as additional records;
- other names in the cluster domain: NXDOMAIN (or NOERROR with no answers when the name exists
  but has no record of the asked type), with the domain's SOA in the authority section;
- anything outside the cluster domain: REFUSED. There is no recursion and no forwarding: the
  local cluster's pods have no way out anyway.

Answers have a TTL of 5 s. Names match case-insensitively. A UDP reply larger than 512 bytes (or
the query's EDNS size) is sent with the TC bit and no records, so that the client retries over
TCP. Malformed packets are dropped (UDP) or end the connection (TCP); the server keeps serving.
Until the table has been listed once, names it does not know get SERVFAIL rather than NXDOMAIN.

This is for the local cluster of the demo and the tests only (`tpcontrol.localcluster`), not a
part of the product. The wire format is dnslib's; the core (`NameTable`, `answer`) does no I/O.

    python -m tpcontrol.localcluster.dns --kubeconfig PATH --listen HOST:PORT [--domain D]

prints `listening on HOST:PORT` once its UDP and TCP sockets are bound, and exits on SIGTERM or
SIGINT.

Long on purpose: a small DNS server (sans-IO answers, the watch of Services and Endpoints, the
UDP/TCP protocols) kept in one module as CoreDNS's stand-in.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import logging
import signal
import struct
import sys
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, cast

import dnslib
from kubernetes_asyncio import client as k8s
from kubernetes_asyncio import watch

from tpcontrol.kube.client import api_client

log = logging.getLogger("tpcontrol.localcluster.dns")

Json = dict[str, Any]
TTL = 5
UDP_LIMIT = 512  # a reply without EDNS, RFC 1035
EDNS_SIZE = 1232  # what this server offers in its own OPT record
TCP_LIMIT = 65535
SOA_TIMES = (7200, 1800, 86400, TTL)  # refresh, retry, expire, minimum (the negative TTL)

# dnslib's constants (it has no type hints: these are its values, named once, typed).
QUERY = 0
NOERROR, FORMERR, SERVFAIL, NXDOMAIN, NOTIMP, REFUSED = 0, 1, 2, 3, 4, 5
CLASS_IN, CLASS_ANY = 1, 255
T_A, T_CNAME, T_SOA, T_AAAA, T_SRV, T_OPT, T_ANY = 1, 5, 6, 28, 33, 41, 255


class MalformedQuery(ValueError):
    """The bytes are not a DNS query: a UDP server drops them, a TCP server closes."""


# --- the name table ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Port:
    name: str
    protocol: str  # lower case: tcp, udp, sctp
    port: int


@dataclass(frozen=True)
class Service:
    namespace: str
    name: str
    cluster_ips: tuple[str, ...] = ()  # empty for a headless or ExternalName Service
    headless: bool = False
    external_name: str | None = None
    ports: tuple[Port, ...] = ()


@dataclass(frozen=True)
class Address:
    ip: str
    hostname: str | None = None

    @property
    def label(self) -> str:
        """Its name under the Service: the hostname, else the address with dashes."""
        return self.hostname or self.ip.replace(".", "-").replace(":", "-")


@dataclass(frozen=True)
class Subset:
    addresses: tuple[Address, ...]  # the ready ones only
    ports: tuple[Port, ...] = ()


@dataclass(frozen=True)
class Endpoints:
    namespace: str
    name: str
    subsets: tuple[Subset, ...] = ()

    def addresses(self) -> list[Address]:
        """Every ready address once, in the API's order."""
        seen: dict[str, Address] = {}
        for subset in self.subsets:
            for address in subset.addresses:
                seen.setdefault(address.ip, address)
        return list(seen.values())


def _ports(items: Iterable[Json] | None) -> tuple[Port, ...]:
    return tuple(
        Port(str(p.get("name") or ""), str(p.get("protocol") or "TCP").lower(), int(p["port"]))
        for p in items or ()
        if p.get("port")
    )


def service_from_json(obj: Json) -> Service:
    """A Service as the API serves it (camelCase JSON) to the table's form."""
    meta, spec = obj.get("metadata") or {}, obj.get("spec") or {}
    cluster_ip = spec.get("clusterIP") or ""
    ips = spec.get("clusterIPs") or ([cluster_ip] if cluster_ip else [])
    external = spec.get("externalName") if spec.get("type") == "ExternalName" else None
    return Service(
        namespace=str(meta["namespace"]).lower(),
        name=str(meta["name"]).lower(),
        cluster_ips=tuple(str(ip) for ip in ips if ip and ip != "None"),
        headless=cluster_ip == "None",
        external_name=str(external).lower().rstrip(".") if external else None,
        ports=_ports(spec.get("ports")),
    )


def endpoints_from_json(obj: Json) -> Endpoints:
    """An Endpoints object (camelCase JSON) to the table's form, without not-ready addresses."""
    meta = obj.get("metadata") or {}
    subsets = tuple(
        Subset(
            tuple(
                Address(str(a["ip"]), str(a["hostname"]).lower() if a.get("hostname") else None)
                for a in s.get("addresses") or ()
                if a.get("ip")
            ),
            _ports(s.get("ports")),
        )
        for s in obj.get("subsets") or ()
    )
    return Endpoints(str(meta["namespace"]).lower(), str(meta["name"]).lower(), subsets)


@dataclass(frozen=True)
class Record:
    """One answer, before it is put on the wire: A/AAAA `value` is an address, CNAME/SRV `value`
    is a name (absolute, without the final dot)."""

    rtype: Literal["A", "AAAA", "CNAME", "SRV"]
    value: str
    port: int = 0
    weight: int = 0


def _address_record(ip: str) -> Record:
    return Record("AAAA" if ipaddress.ip_address(ip).version == 6 else "A", ip)


class NameTable:
    """The Services and Endpoints the server answers from, keyed by (namespace, name).

    `synced` is False until the watcher has listed both kinds once; until then a name that is
    not known gets SERVFAIL (not a cached NXDOMAIN). A table made by hand (tests) is synced.
    """

    def __init__(self, domain: str = "cluster.local", *, synced: bool = True) -> None:
        self.domain = domain.lower().strip(".")
        self.domain_labels = tuple(self.domain.split(".")) if self.domain else ()
        self.services: dict[tuple[str, str], Service] = {}
        self.endpoints: dict[tuple[str, str], Endpoints] = {}
        self.synced = synced
        self.serial = 1  # the SOA serial: grows with every change

    # changes

    def put_service(self, service: Service) -> None:
        self.services[service.namespace, service.name] = service
        self.serial += 1

    def remove_service(self, namespace: str, name: str) -> None:
        self.services.pop((namespace.lower(), name.lower()), None)
        self.serial += 1

    def replace_services(self, services: Iterable[Service]) -> None:
        """After a (re)list: exactly these, whatever was there before."""
        self.services = {(s.namespace, s.name): s for s in services}
        self.serial += 1

    def put_endpoints(self, endpoints: Endpoints) -> None:
        self.endpoints[endpoints.namespace, endpoints.name] = endpoints
        self.serial += 1

    def remove_endpoints(self, namespace: str, name: str) -> None:
        self.endpoints.pop((namespace.lower(), name.lower()), None)
        self.serial += 1

    def replace_endpoints(self, endpoints: Iterable[Endpoints]) -> None:
        self.endpoints = {(e.namespace, e.name): e for e in endpoints}
        self.serial += 1

    # lookups

    def relative(self, labels: Sequence[str]) -> list[str] | None:
        """The labels before the cluster domain (lower case), or None outside the domain."""
        n = len(self.domain_labels)
        if len(labels) < n or tuple(labels[len(labels) - n :]) != self.domain_labels:
            return None
        return list(labels[: len(labels) - n])

    def lookup(self, labels: Sequence[str]) -> list[Record] | None:
        """The records of a name given by its lower-case labels relative to the domain: None
        when the name does not exist, [] when it exists without records (an empty non-terminal
        such as `<ns>.svc`, or a headless Service with no ready endpoint)."""
        n = len(labels)
        if n == 0:
            return []  # the apex; its SOA is the caller's
        if labels[-1] != "svc":
            return None
        if n == 1:
            return []
        namespace = labels[-2]
        if n == 2:
            return [] if any(ns == namespace for ns, _ in self.services) else None
        service = self.services.get((namespace, labels[-3]))
        if service is None:
            return None
        if n == 3:
            return self._service_records(service)
        first = labels[0]
        if n == 4 and first.startswith("_"):  # `_<proto>.<svc>...`: above SRV records
            protocol = first[1:]
            return [] if any(p.name and p.protocol == protocol for p in service.ports) else None
        if n == 4:
            records = [_address_record(a.ip) for a in self._ready(service) if a.label == first]
            return records or None
        if n == 5 and first.startswith("_") and labels[1].startswith("_"):
            return self._srv_records(service, first[1:], labels[1][1:]) or None
        return None

    def service_name(self, service: Service) -> str:
        return ".".join(filter(None, (service.name, service.namespace, "svc", self.domain)))

    def _ready(self, service: Service) -> list[Address]:
        endpoints = self.endpoints.get((service.namespace, service.name))
        return endpoints.addresses() if endpoints else []

    def _service_records(self, service: Service) -> list[Record]:
        if service.external_name:
            return [Record("CNAME", service.external_name)]
        if service.headless:
            return [_address_record(a.ip) for a in self._ready(service)]
        return [_address_record(ip) for ip in service.cluster_ips]

    def _srv_records(self, service: Service, port_name: str, protocol: str) -> list[Record]:
        base = self.service_name(service)
        if not service.headless:
            return [
                Record("SRV", base, p.port, 100)
                for p in service.ports
                if p.name == port_name and p.protocol == protocol
            ]
        endpoints = self.endpoints.get((service.namespace, service.name))
        targets = [
            (f"{a.label}.{base}", p.port)
            for subset in (endpoints.subsets if endpoints else ())
            for p in subset.ports
            if p.name == port_name and p.protocol == protocol
            for a in subset.addresses
        ]
        weight = max(1, 100 // len(targets)) if targets else 0
        return [Record("SRV", name, port, weight) for name, port in targets]


# --- the sans-IO core: query bytes in, reply bytes out ----------------------------------------


def _labels(qname: Any) -> list[str]:
    """A dnslib name's labels, lower case (ASCII only, as DNS compares them)."""
    raw = cast(tuple[bytes, ...], qname.label)
    return [label.lower().decode("latin-1") for label in raw]


def _rr(name: Any, record: Record) -> Any:
    rdata: Any
    if record.rtype == "A":
        rdata, rtype = dnslib.A(record.value), T_A
    elif record.rtype == "AAAA":
        rdata, rtype = dnslib.AAAA(record.value), T_AAAA
    elif record.rtype == "CNAME":
        rdata, rtype = dnslib.CNAME(record.value + "."), T_CNAME
    else:
        rdata = dnslib.SRV(
            priority=0, weight=record.weight, port=record.port, target=record.value + "."
        )
        rtype = T_SRV
    return dnslib.RR(rname=name, rtype=rtype, rclass=CLASS_IN, ttl=TTL, rdata=rdata)


def _soa(table: NameTable) -> Any:
    domain = table.domain + "."
    times = (table.serial, *SOA_TIMES)
    rdata = dnslib.SOA(mname="ns.dns." + domain, rname="hostmaster." + domain, times=times)
    return dnslib.RR(rname=domain, rtype=T_SOA, rclass=CLASS_IN, ttl=TTL, rdata=rdata)


def answer(query: bytes, table: NameTable, *, transport: Literal["udp", "tcp"] = "udp") -> bytes:
    """The reply to one DNS message, as bytes; raises MalformedQuery for what is not a query.

    `transport` sets the size limit: 512 bytes over UDP (more when the query's EDNS allows it),
    64 KiB over TCP. A reply over the limit goes out truncated: TC set, no records.
    """
    try:
        request = dnslib.DNSRecord.parse(query)
    except Exception as exc:  # dnslib raises DNSError, and sometimes others, on bad input
        raise MalformedQuery(f"cannot parse {len(query)} bytes: {exc}") from None
    header = request.header
    if cast(int, header.qr):
        raise MalformedQuery("a response, not a query")
    questions = cast(list[Any], request.questions)
    opts = [rr for rr in cast(list[Any], request.ar) if cast(int, rr.rtype) == T_OPT]
    reply = dnslib.DNSRecord(
        dnslib.DNSHeader(
            id=header.id, qr=1, opcode=header.opcode, aa=0, rd=header.rd, ra=0, rcode=NOERROR
        ),
        questions=list(questions),
    )
    limit = TCP_LIMIT
    if transport == "udp":  # the client's EDNS size, within what this server offers
        offered = cast(int, opts[0].rclass) if opts else UDP_LIMIT
        limit = max(UDP_LIMIT, min(offered, EDNS_SIZE))
    if opts:
        reply.add_ar(dnslib.EDNS0(udp_len=EDNS_SIZE))
    _fill(reply, cast(int, header.opcode), questions, table)
    packed = cast(bytes, reply.pack())
    if len(packed) <= limit:
        return packed
    reply.header.tc = 1
    reply.rr, reply.auth = [], []
    reply.ar = [dnslib.EDNS0(udp_len=EDNS_SIZE)] if opts else []
    return cast(bytes, reply.pack())


def _fill(reply: Any, opcode: int, questions: list[Any], table: NameTable) -> None:
    """Set the reply's rcode and records for the (single) question."""
    header = reply.header
    if opcode != QUERY:
        header.rcode = NOTIMP
        return
    if len(questions) != 1:
        header.rcode = FORMERR
        return
    question = questions[0]
    qtype, qclass = cast(int, question.qtype), cast(int, question.qclass)
    relative = table.relative(_labels(question.qname))
    if relative is None or qclass not in (CLASS_IN, CLASS_ANY):
        header.rcode = REFUSED  # not ours, and there is no recursion
        return
    records = table.lookup(relative)
    if records is None:
        if not table.synced:
            header.rcode = SERVFAIL  # not listed yet: do not let a negative answer be cached
            return
        header.aa, header.rcode = 1, NXDOMAIN
        reply.add_auth(_soa(table))
        return
    header.aa = 1
    if not relative and qtype in (T_SOA, T_ANY):
        reply.add_answer(_soa(table))
        return
    wanted = {T_A: "A", T_AAAA: "AAAA", T_SRV: "SRV", T_CNAME: "CNAME"}.get(qtype)
    if any(r.rtype == "CNAME" for r in records):
        chosen = [r for r in records if r.rtype == "CNAME"]  # whatever was asked; no chasing
    else:
        chosen = [r for r in records if qtype == T_ANY or r.rtype == wanted]
    if not chosen:
        reply.add_auth(_soa(table))  # the name exists: NOERROR, no data
        return
    reply.add_answer(*(_rr(question.qname, r) for r in chosen))
    for target in sorted({r.value for r in chosen if r.rtype == "SRV"}):
        below = table.relative(target.split("."))
        extras = (table.lookup(below) if below is not None else None) or []
        reply.add_ar(*(_rr(target + ".", r) for r in extras if r.rtype in ("A", "AAAA")))


# --- I/O: UDP and TCP on one address ----------------------------------------------------------


class _UdpProtocol(asyncio.DatagramProtocol):
    def __init__(self, table: NameTable) -> None:
        self.table = table
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        try:
            reply = answer(data, self.table, transport="udp")
        except MalformedQuery as exc:
            log.warning("dropped a malformed datagram from %s: %s", addr, exc)
            return
        except Exception:
            log.exception("failed to answer a datagram from %s", addr)
            return
        if self.transport is not None:
            self.transport.sendto(reply, addr)

    def error_received(self, exc: Exception) -> None:
        log.debug("UDP error: %s", exc)


class DnsServer:
    """Serves `table` over UDP and TCP (2-byte length prefix) on one host and port.

    `await start()` binds both (port 0: one free port for both) and returns the address;
    `await close()` stops serving and ends open TCP connections. Also an async context manager.
    """

    def __init__(
        self, table: NameTable, host: str = "127.0.0.1", port: int = 53, idle_timeout: float = 10
    ) -> None:
        self.table = table
        self.host, self.port = host, port
        self.idle_timeout = idle_timeout
        self._udp: asyncio.DatagramTransport | None = None
        self._tcp: asyncio.Server | None = None
        self._connections: set[asyncio.StreamWriter] = set()

    async def __aenter__(self) -> DnsServer:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def start(self) -> tuple[str, int]:
        loop = asyncio.get_running_loop()
        attempts = 20 if self.port == 0 else 1
        for attempt in range(attempts):
            udp, _ = await loop.create_datagram_endpoint(
                lambda: _UdpProtocol(self.table), local_addr=(self.host, self.port)
            )
            port = cast(int, udp.get_extra_info("sockname")[1])
            try:
                self._tcp = await asyncio.start_server(self._serve_tcp, self.host, port)
            except OSError:
                udp.close()
                if attempt == attempts - 1:
                    raise
                continue  # that UDP port's TCP twin is taken: try another
            self._udp, self.port = udp, port
            break
        return self.host, self.port

    async def close(self) -> None:
        if self._udp is not None:
            self._udp.close()
            self._udp = None
        if self._tcp is not None:
            self._tcp.close()
            for writer in list(self._connections):
                writer.close()
            await self._tcp.wait_closed()
            self._tcp = None

    async def _serve_tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        self._connections.add(writer)
        try:
            while True:
                try:
                    async with asyncio.timeout(self.idle_timeout):
                        (length,) = struct.unpack("!H", await reader.readexactly(2))
                        query = await reader.readexactly(length)
                except (asyncio.IncompleteReadError, TimeoutError):
                    return  # the client is done, or idle
                try:
                    reply = answer(query, self.table, transport="tcp")
                except MalformedQuery as exc:
                    log.warning("closing TCP from %s after a malformed message: %s", peer, exc)
                    return
                except Exception:
                    log.exception("failed to answer over TCP from %s; closing", peer)
                    return
                writer.write(struct.pack("!H", len(reply)) + reply)
                await writer.drain()
        except (ConnectionError, OSError) as exc:
            log.debug("TCP from %s: %s", peer, exc)
        finally:
            self._connections.discard(writer)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()


# --- the table follows the API ----------------------------------------------------------------


def apply_event(
    table: NameTable, kind: Literal["services", "endpoints"], event: str, obj: Json
) -> None:
    """One watch event (ADDED, MODIFIED, DELETED; others are ignored) on the table."""
    if event not in ("ADDED", "MODIFIED", "DELETED"):
        return
    meta = obj.get("metadata") or {}
    namespace, name = str(meta.get("namespace", "")), str(meta.get("name", ""))
    if kind == "services":
        if event == "DELETED":
            table.remove_service(namespace, name)
        else:
            table.put_service(service_from_json(obj))
    elif event == "DELETED":
        table.remove_endpoints(namespace, name)
    else:
        table.put_endpoints(endpoints_from_json(obj))
    log.debug("%s %s %s/%s", event.lower(), kind, namespace, name)


class ClusterWatcher:
    """Keeps a NameTable in step with the Services and Endpoints of all namespaces.

    For each kind: list, apply the whole list, watch from its resourceVersion; when the watch
    ends, is dropped or gets 410 Gone, list again. A cycle that fails or ends within `steady`
    seconds waits first, from `min_backoff` doubling up to `max_backoff`.
    """

    def __init__(
        self,
        api: k8s.ApiClient,
        table: NameTable,
        *,
        min_backoff: float = 0.5,
        max_backoff: float = 10.0,
        steady: float = 2.0,
        watch_timeout: int = 300,
    ) -> None:
        self.api = api
        self.core = k8s.CoreV1Api(api)
        self.table = table
        self.min_backoff, self.max_backoff, self.steady = min_backoff, max_backoff, steady
        self.watch_timeout = watch_timeout
        self.sleep: Callable[[float], Awaitable[None]] = asyncio.sleep  # tests replace it
        self._listed: set[str] = set()

    async def run(self) -> None:
        async with asyncio.TaskGroup() as group:
            group.create_task(self._follow("services"))
            group.create_task(self._follow("endpoints"))

    async def _follow(self, kind: Literal["services", "endpoints"]) -> None:
        loop = asyncio.get_running_loop()
        delay = self.min_backoff
        while True:
            started = loop.time()
            try:
                await self._list_and_watch(kind)
                log.debug("%s watch ended; listing again", kind)
            except asyncio.CancelledError:
                raise
            except k8s.ApiException as exc:
                if exc.status == 410:
                    log.info("%s watch: history gone (410); listing again", kind)
                else:
                    log.warning("%s watch failed: %s %s", kind, exc.status, exc.reason)
            except Exception as exc:
                log.warning("%s watch failed: %r", kind, exc)
            if loop.time() - started >= self.steady:
                delay = self.min_backoff
                continue
            await self.sleep(delay)
            delay = min(delay * 2, self.max_backoff)

    async def _list_and_watch(self, kind: Literal["services", "endpoints"]) -> None:
        lister: Callable[..., Any]
        if kind == "services":
            lister = self.core.list_service_for_all_namespaces
        else:
            lister = self.core.list_endpoints_for_all_namespaces
        listed = cast(Json, self.api.sanitize_for_serialization(await lister()))
        items = cast(list[Json], listed.get("items") or [])
        if kind == "services":
            self.table.replace_services(service_from_json(i) for i in items)
        else:
            self.table.replace_endpoints(endpoints_from_json(i) for i in items)
        self._listed.add(kind)
        if len(self._listed) == 2 and not self.table.synced:
            self.table.synced = True
            log.info("table synced: %d services", len(self.table.services))
        version = (listed.get("metadata") or {}).get("resourceVersion")
        stream = watch.Watch()
        async with stream:
            async for event in stream.stream(
                lister, resource_version=version, timeout_seconds=self.watch_timeout
            ):
                apply_event(self.table, kind, str(event["type"]), cast(Json, event["raw_object"]))


# --- the entry point ----------------------------------------------------------------------------


def parse_listen(text: str) -> tuple[str, int]:
    """`HOST:PORT` (`[v6]:PORT` for IPv6) to (host, port)."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return host.strip("[]"), int(port)


async def serve(kubeconfig: str | None, host: str, port: int, domain: str) -> None:
    """Serve until SIGTERM or SIGINT."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    table = NameTable(domain, synced=False)
    async with api_client(kubeconfig) as api, DnsServer(table, host, port) as server:
        shown = f"[{server.host}]" if ":" in server.host else server.host
        print(f"listening on {shown}:{server.port}", flush=True)
        watcher = asyncio.create_task(ClusterWatcher(api, table).run())
        stopping = asyncio.create_task(stop.wait())
        await asyncio.wait({watcher, stopping}, return_when=asyncio.FIRST_COMPLETED)
        for task in (watcher, stopping):
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher  # re-raises if the watcher failed on its own
    log.info("stopped")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tpcontrol.localcluster.dns",
        description="The local cluster's DNS (a stand-in for CoreDNS's kubernetes plugin).",
    )
    parser.add_argument("--kubeconfig", default=None, help="kubeconfig file (default: in-cluster)")
    parser.add_argument("--listen", type=parse_listen, required=True, metavar="HOST:PORT")
    parser.add_argument("--domain", default="cluster.local")
    parser.add_argument("--verbose", "-v", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    host, port = args.listen
    try:
        asyncio.run(serve(args.kubeconfig, host, port, args.domain))
    except OSError as exc:
        log.error("cannot serve on %s:%d: %s", host, port, exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
