"""The local cluster's DNS (tpcontrol.localcluster.dns): the sans-IO core, its UDP and TCP
server on loopback, and the table following a real API server."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import socket
import struct
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any, cast

import dnslib
import pytest
from kubernetes_asyncio import client as k8s

from tpcontrol.localcluster import LocalControlPlane
from tpcontrol.localcluster.dns import (
    ClusterWatcher,
    DnsServer,
    MalformedQuery,
    NameTable,
    Service,
    answer,
    apply_event,
    endpoints_from_json,
    parse_listen,
    service_from_json,
)

from .helpers import run
from .k8s_helpers import make_namespace, service, unique

Json = dict[str, Any]
NOERROR, FORMERR, SERVFAIL, NXDOMAIN, NOTIMP, REFUSED = 0, 1, 2, 3, 4, 5
A, SOA, AAAA, SRV, CNAME = 1, 6, 28, 33, 5
ZONE = "svc.cluster.local"


def svc_json(
    ns: str, name: str, cluster_ip: str, ports: list[Json] | None = None, **spec: Any
) -> Json:
    return {
        "metadata": {"namespace": ns, "name": name},
        "spec": {"clusterIP": cluster_ip, "ports": ports or [], **spec},
    }


def eps_json(ns: str, name: str, subsets: list[Json]) -> Json:
    return {"metadata": {"namespace": ns, "name": name}, "subsets": subsets}


def make_table(synced: bool = True) -> NameTable:
    table = NameTable("cluster.local", synced=synced)
    table.put_service(
        service_from_json(
            svc_json(
                "ambassador",
                "traffic-manager",
                "10.0.0.10",
                [{"name": "api", "port": 8081, "protocol": "TCP"}, {"port": 8443}],
            )
        )
    )
    table.put_service(
        service_from_json(svc_json("default", "db", "None", [{"name": "pg", "port": 5432}]))
    )
    table.put_endpoints(
        endpoints_from_json(
            eps_json(
                "default",
                "db",
                [
                    {
                        "addresses": [
                            {"ip": "10.1.0.1", "hostname": "db-0"},
                            {"ip": "10.1.0.2", "hostname": "db-1"},
                        ],
                        "notReadyAddresses": [{"ip": "10.1.0.3", "hostname": "db-2"}],
                        "ports": [{"name": "pg", "port": 5432, "protocol": "TCP"}],
                    }
                ],
            )
        )
    )
    table.put_service(
        service_from_json(
            {
                "metadata": {"namespace": "default", "name": "outside"},
                "spec": {"type": "ExternalName", "externalName": "example.com"},
            }
        )
    )
    return table


def ask(
    table: NameTable,
    name: str,
    qtype: str = "A",
    *,
    transport: str = "udp",
    edns: int | None = None,
) -> Any:
    query = dnslib.DNSRecord.question(name, qtype)
    if edns is not None:
        query.add_ar(dnslib.EDNS0(udp_len=edns))
    reply = dnslib.DNSRecord.parse(answer(query.pack(), table, transport=cast(Any, transport)))
    assert reply.header.id == query.header.id
    assert reply.header.qr == 1
    assert reply.header.ra == 0
    return reply


def addresses(reply: Any) -> list[str]:
    return [str(rr.rdata) for rr in reply.rr if rr.rtype in (A, AAAA)]


# --- the sans-IO core ----------------------------------------------------------------------------


def test_a_record_of_a_service_is_its_cluster_ip() -> None:
    reply = ask(make_table(), f"traffic-manager.ambassador.{ZONE}")
    assert reply.header.rcode == NOERROR
    assert reply.header.aa == 1
    assert reply.header.rd == 1  # echoed from the query
    assert addresses(reply) == ["10.0.0.10"]
    assert [rr.ttl for rr in reply.rr] == [5]
    assert str(reply.rr[0].rname) == f"traffic-manager.ambassador.{ZONE}."


def test_headless_service_answers_its_ready_endpoints() -> None:
    reply = ask(make_table(), f"db.default.{ZONE}")
    assert reply.header.rcode == NOERROR
    assert sorted(addresses(reply)) == ["10.1.0.1", "10.1.0.2"]  # not the not-ready 10.1.0.3


def test_endpoint_hostname_and_dashed_address() -> None:
    table = make_table()
    assert addresses(ask(table, f"db-1.db.default.{ZONE}")) == ["10.1.0.2"]
    assert ask(table, f"db-2.db.default.{ZONE}").header.rcode == NXDOMAIN  # not ready
    assert ask(table, f"10-1-0-1.db.default.{ZONE}").header.rcode == NXDOMAIN  # has a hostname
    nameless = eps_json("default", "db", [{"addresses": [{"ip": "10.1.0.1"}]}])
    table.put_endpoints(endpoints_from_json(nameless))
    assert addresses(ask(table, f"10-1-0-1.db.default.{ZONE}")) == ["10.1.0.1"]


def test_srv_records_with_targets_in_additional() -> None:
    table = make_table()
    reply = ask(table, f"_api._tcp.traffic-manager.ambassador.{ZONE}", "SRV")
    assert reply.header.rcode == NOERROR
    ((port, target),) = [(rr.rdata.port, str(rr.rdata.target)) for rr in reply.rr]
    assert (port, target) == (8081, f"traffic-manager.ambassador.{ZONE}.")
    assert [(str(rr.rname), str(rr.rdata)) for rr in reply.ar] == [(target, "10.0.0.10")]

    headless = ask(table, f"_pg._tcp.db.default.{ZONE}", "SRV")
    targets = sorted(str(rr.rdata.target) for rr in headless.rr)
    assert targets == [f"db-0.db.default.{ZONE}.", f"db-1.db.default.{ZONE}."]
    assert sorted(str(rr.rdata) for rr in headless.ar) == ["10.1.0.1", "10.1.0.2"]
    assert ask(table, f"_api._udp.traffic-manager.ambassador.{ZONE}", "SRV").header.rcode == (
        NXDOMAIN
    )


def test_external_name_is_a_cname_without_chasing() -> None:
    reply = ask(make_table(), f"outside.default.{ZONE}")
    assert reply.header.rcode == NOERROR
    assert [(rr.rtype, str(rr.rdata)) for rr in reply.rr] == [(CNAME, "example.com.")]


@pytest.mark.parametrize(
    "name",
    [
        f"nosuch.ambassador.{ZONE}",
        f"traffic-manager.nosuch.{ZONE}",
        "nosuch.cluster.local",
        f"a.b.traffic-manager.ambassador.{ZONE}",
        "traffic-manager.ambassador.pod.cluster.local",
    ],
)
def test_unknown_name_in_the_domain_is_nxdomain_with_soa(name: str) -> None:
    reply = ask(make_table(), name)
    assert reply.header.rcode == NXDOMAIN
    assert reply.header.aa == 1
    assert reply.rr == []
    ((soa,),) = [reply.auth]
    assert soa.rtype == SOA
    assert str(soa.rname) == "cluster.local."
    assert soa.ttl == 5
    assert soa.rdata.times[-1] == 5  # the negative TTL


@pytest.mark.parametrize(
    "name", ["cluster.local", ZONE, f"ambassador.{ZONE}", f"_tcp.traffic-manager.ambassador.{ZONE}"]
)
def test_names_above_records_exist_without_data(name: str) -> None:
    reply = ask(make_table(), name)
    assert (reply.header.rcode, reply.rr, [rr.rtype for rr in reply.auth]) == (NOERROR, [], [SOA])


def test_soa_at_the_apex() -> None:
    reply = ask(make_table(), "cluster.local", "SOA")
    assert [rr.rtype for rr in reply.rr] == [SOA]


@pytest.mark.parametrize(
    "name",
    ["example.com", "traffic-manager.ambassador", "10.0.0.10.in-addr.arpa", "local", "."],
)
def test_outside_the_domain_is_refused(name: str) -> None:
    reply = ask(make_table(), name)
    assert (reply.header.rcode, reply.rr, reply.auth) == (REFUSED, [], [])
    assert reply.header.aa == 0


def test_other_class_is_refused() -> None:
    query = dnslib.DNSRecord(
        q=dnslib.DNSQuestion(f"traffic-manager.ambassador.{ZONE}", A, 3)  # class CH
    )
    reply = dnslib.DNSRecord.parse(answer(query.pack(), make_table()))
    assert reply.header.rcode == REFUSED


def test_aaaa_for_a_known_name_is_noerror_without_answers() -> None:
    reply = ask(make_table(), f"traffic-manager.ambassador.{ZONE}", "AAAA")
    assert (reply.header.rcode, reply.rr) == (NOERROR, [])
    assert [rr.rtype for rr in reply.auth] == [SOA]


def test_ipv6_cluster_ip_is_answered_as_aaaa() -> None:
    table = NameTable()
    table.put_service(service_from_json(svc_json("v6", "web", "fd00::10")))
    assert addresses(ask(table, f"web.v6.{ZONE}", "AAAA")) == ["fd00::10"]
    assert ask(table, f"web.v6.{ZONE}", "A").rr == []


def test_names_are_case_insensitive_and_the_question_is_echoed() -> None:
    name = "Traffic-MANAGER.Ambassador.SVC.Cluster.Local"
    reply = ask(make_table(), name)
    assert addresses(reply) == ["10.0.0.10"]
    assert str(reply.q.qname) == name + "."
    assert str(reply.rr[0].rname) == name + "."


def many_endpoints(count: int) -> NameTable:
    table = NameTable()
    table.put_service(service_from_json(svc_json("big", "many", "None")))
    ips = [{"ip": f"10.2.{i // 250}.{i % 250 + 1}"} for i in range(count)]
    table.put_endpoints(endpoints_from_json(eps_json("big", "many", [{"addresses": ips}])))
    return table


def test_udp_reply_over_512_bytes_is_truncated() -> None:
    table = many_endpoints(50)  # 50 A records: about 850 bytes
    name = f"many.big.{ZONE}"
    reply = ask(table, name)
    assert reply.header.tc == 1
    assert (reply.rr, reply.auth, reply.ar) == ([], [], [])
    assert str(reply.q.qname) == name + "."
    assert len(ask(table, name, transport="tcp").rr) == 50
    with_edns = ask(table, name, edns=4096)
    assert with_edns.header.tc == 0
    assert len(with_edns.rr) == 50
    small = many_endpoints(20)  # fits in 512
    assert ask(small, f"many.big.{ZONE}").header.tc == 0


def test_edns_size_above_what_the_server_offers_is_capped() -> None:
    table = many_endpoints(100)  # about 1,700 bytes: over the 1,232 the server offers
    reply = ask(table, f"many.big.{ZONE}", edns=4096)
    assert reply.header.tc == 1
    assert [rr.rtype for rr in reply.ar] == [41]  # the OPT record stays


@pytest.mark.parametrize(
    "garbage",
    [
        b"",
        b"\x00",
        b"\x12\x34\x01\x00\x00\x01",  # a header cut short
        dnslib.DNSRecord.question("a.cluster.local").pack()[:-3],  # a question cut short
        b"\xff" * 40,
    ],
)
def test_garbage_is_malformed(garbage: bytes) -> None:
    with pytest.raises(MalformedQuery):
        answer(garbage, make_table())


def test_a_response_is_not_answered() -> None:
    query = dnslib.DNSRecord.question(f"traffic-manager.ambassador.{ZONE}")
    with pytest.raises(MalformedQuery):
        answer(query.reply().pack(), make_table())


def test_zero_or_two_questions_is_formerr() -> None:
    table = make_table()
    none = dnslib.DNSRecord()
    assert dnslib.DNSRecord.parse(answer(none.pack(), table)).header.rcode == FORMERR
    two = dnslib.DNSRecord.question(f"traffic-manager.ambassador.{ZONE}")
    two.add_question(dnslib.DNSQuestion(f"db.default.{ZONE}"))
    reply = dnslib.DNSRecord.parse(answer(two.pack(), table))
    assert (reply.header.rcode, reply.rr) == (FORMERR, [])


def test_other_opcode_is_notimp() -> None:
    query = dnslib.DNSRecord.question(f"traffic-manager.ambassador.{ZONE}")
    query.header.opcode = 4  # NOTIFY
    assert dnslib.DNSRecord.parse(answer(query.pack(), make_table())).header.rcode == NOTIMP


def test_unknown_names_are_servfail_until_the_table_is_synced() -> None:
    table = make_table(synced=False)
    assert addresses(ask(table, f"traffic-manager.ambassador.{ZONE}")) == ["10.0.0.10"]
    assert ask(table, f"nosuch.ambassador.{ZONE}").header.rcode == SERVFAIL
    table.synced = True
    assert ask(table, f"nosuch.ambassador.{ZONE}").header.rcode == NXDOMAIN


def test_table_changes_and_relist() -> None:
    table = make_table()
    table.remove_service("ambassador", "traffic-manager")
    assert ask(table, f"traffic-manager.ambassador.{ZONE}").header.rcode == NXDOMAIN
    table.replace_services([service_from_json(svc_json("other", "new", "10.0.0.99"))])
    assert ask(table, f"db.default.{ZONE}").header.rcode == NXDOMAIN  # gone after the relist
    assert addresses(ask(table, f"new.other.{ZONE}")) == ["10.0.0.99"]


def test_watch_events_apply_to_the_table() -> None:
    table = NameTable()
    apply_event(table, "services", "ADDED", svc_json("ns", "db", "None"))
    apply_event(
        table, "endpoints", "ADDED", eps_json("ns", "db", [{"addresses": [{"ip": "10.3.0.1"}]}])
    )
    assert addresses(ask(table, f"db.ns.{ZONE}")) == ["10.3.0.1"]
    apply_event(table, "services", "MODIFIED", svc_json("ns", "db", "10.0.0.8"))
    assert addresses(ask(table, f"db.ns.{ZONE}")) == ["10.0.0.8"]
    apply_event(table, "services", "BOOKMARK", {"metadata": {"resourceVersion": "9"}})
    apply_event(table, "endpoints", "DELETED", eps_json("ns", "db", []))
    assert table.endpoints == {}
    apply_event(table, "services", "DELETED", svc_json("ns", "db", "10.0.0.8"))
    assert ask(table, f"db.ns.{ZONE}").header.rcode == NXDOMAIN


@pytest.mark.parametrize(
    ("steady", "expected"),
    [
        (1e9, [0.5, 1.0, 2.0, 3.0, 3.0, 3.0]),  # every cycle short: back off, up to the bound
        (0.0, []),  # every cycle long enough: list again at once
    ],
)
def test_watcher_relists_with_bounded_backoff(steady: float, expected: list[float]) -> None:
    async def scenario() -> None:
        table = NameTable(synced=False)
        watcher = ClusterWatcher(
            cast(Any, object()), table, min_backoff=0.5, max_backoff=3.0, steady=steady
        )
        failures: list[BaseException] = [
            OSError("connection refused"),
            k8s.ApiException(status=500, reason="boom"),
            k8s.ApiException(status=410, reason="Gone"),
            ValueError("bad JSON"),
            TimeoutError(),
        ]
        calls: list[str] = []
        slept: list[float] = []
        done = asyncio.Event()

        async def cycle(kind: str) -> None:
            await asyncio.sleep(0)
            calls.append(kind)
            if failures:
                raise failures.pop(0)
            if len(calls) == 7:
                done.set()
                await asyncio.Event().wait()  # the 7th: a watch that goes on
            # the 6th: a watch that just ends

        async def sleep(delay: float) -> None:
            slept.append(delay)

        watcher.sleep = sleep
        cast(Any, watcher)._list_and_watch = cycle
        task = asyncio.create_task(cast(Any, watcher)._follow("services"))
        async with asyncio.timeout(5):
            await done.wait()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        assert slept == expected

    run(scenario(), timeout=10)


def test_parse_listen() -> None:
    assert parse_listen("10.250.0.2:53") == ("10.250.0.2", 53)
    assert parse_listen("[::1]:5353") == ("::1", 5353)
    for bad in ("53", "host:", ":53", "h:99999"):
        with pytest.raises(argparse.ArgumentTypeError, match="HOST:PORT"):
            parse_listen(bad)


# --- UDP and TCP on loopback ---------------------------------------------------------------------


async def udp_exchange(port: int, payload: bytes, timeout: float = 2.0) -> bytes | None:
    """Send one datagram to 127.0.0.1:port; the reply, or None when none comes in `timeout`."""
    loop = asyncio.get_running_loop()
    got: asyncio.Future[bytes] = loop.create_future()

    class Client(asyncio.DatagramProtocol):
        def datagram_received(self, data: bytes, addr: Any) -> None:
            if not got.done():
                got.set_result(data)

    transport, _ = await loop.create_datagram_endpoint(Client, remote_addr=("127.0.0.1", port))
    try:
        transport.sendto(payload)
        try:
            async with asyncio.timeout(timeout):
                return await got
        except TimeoutError:
            return None
    finally:
        transport.close()


async def tcp_exchange(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, payload: bytes
) -> bytes:
    writer.write(struct.pack("!H", len(payload)) + payload)
    await writer.drain()
    async with asyncio.timeout(5):
        (length,) = struct.unpack("!H", await reader.readexactly(2))
        return await reader.readexactly(length)


def test_udp_and_tcp_on_loopback() -> None:
    async def scenario() -> None:
        table = many_endpoints(50)
        table.put_service(service_from_json(svc_json("ambassador", "traffic-manager", "10.0.0.10")))
        async with DnsServer(table, "127.0.0.1", 0) as server:
            port = server.port
            assert port != 0
            name = f"traffic-manager.ambassador.{ZONE}"
            query = dnslib.DNSRecord.question(name)

            raw = await udp_exchange(port, query.pack())
            assert raw is not None
            assert addresses(dnslib.DNSRecord.parse(raw)) == ["10.0.0.10"]

            # dnslib's own (blocking) client, over UDP and TCP
            for tcp in (False, True):
                sent = await asyncio.to_thread(query.send, "127.0.0.1", port, tcp, 2)
                assert addresses(dnslib.DNSRecord.parse(sent)) == ["10.0.0.10"]

            # garbage over UDP: dropped, and the server keeps serving
            assert await udp_exchange(port, b"\xff\x00garbage", timeout=0.3) is None
            assert await udp_exchange(port, query.pack()) is not None

            # truncated over UDP, whole over TCP (two queries on one connection)
            big = dnslib.DNSRecord.question(f"many.big.{ZONE}")
            raw = await udp_exchange(port, big.pack())
            assert raw is not None
            assert dnslib.DNSRecord.parse(raw).header.tc == 1
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            try:
                whole = dnslib.DNSRecord.parse(await tcp_exchange(reader, writer, big.pack()))
                assert (whole.header.tc, len(whole.rr)) == (0, 50)
                again = dnslib.DNSRecord.parse(await tcp_exchange(reader, writer, query.pack()))
                assert addresses(again) == ["10.0.0.10"]
                # a malformed message: the server closes the connection
                writer.write(struct.pack("!H", 3) + b"bad")
                await writer.drain()
                async with asyncio.timeout(5):
                    assert await reader.read() == b""
            finally:
                writer.close()
            # and still serves new connections
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            try:
                again = dnslib.DNSRecord.parse(await tcp_exchange(reader, writer, query.pack()))
                assert addresses(again) == ["10.0.0.10"]
            finally:
                writer.close()

    run(scenario(), timeout=30)


def test_close_ends_open_tcp_connections() -> None:
    async def scenario() -> None:
        server = DnsServer(NameTable(), "127.0.0.1", 0, idle_timeout=60)
        await server.start()
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        try:
            await asyncio.sleep(0.05)  # let the server accept it
            async with asyncio.timeout(5):
                await server.close()
                assert await reader.read() == b""
        finally:
            writer.close()
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.bind(("127.0.0.1", server.port))  # the UDP port is free again

    run(scenario(), timeout=30)


# --- against a real API server -------------------------------------------------------------------


async def resolve(port: int, name: str, qtype: str = "A") -> Any:
    raw = await udp_exchange(port, dnslib.DNSRecord.question(name, qtype).pack(), timeout=1)
    return dnslib.DNSRecord.parse(raw) if raw is not None else None


async def until(port: int, name: str, done: Any, within: float = 30, tries: int = 300) -> Any:
    """Ask `name` every 0.1 s until `done(reply)`, at most `tries` times and `within` seconds."""
    reply = None
    async with asyncio.timeout(within):
        for _ in range(tries):
            reply = await resolve(port, name)
            if reply is not None and done(reply):
                return reply
            await asyncio.sleep(0.1)
    raise AssertionError(f"{name}: last reply {reply}")


def test_names_follow_the_api_server(control_plane: LocalControlPlane, tmp_path: Path) -> None:
    async def scenario() -> None:
        errors = (tmp_path / "dns.log").open("wb")
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "tpcontrol.localcluster.dns",
            "--kubeconfig",
            str(control_plane.kubeconfig),
            "--listen",
            "127.0.0.1:0",
            stdout=asyncio.subprocess.PIPE,
            stderr=errors,
        )
        try:
            assert proc.stdout is not None
            async with asyncio.timeout(30):
                line = (await proc.stdout.readline()).decode()
            assert line.startswith("listening on 127.0.0.1:"), (line, proc.returncode)
            port = int(line.rsplit(":", 1)[1])

            async with control_plane.api() as api:
                core = k8s.CoreV1Api(api)
                ns = await make_namespace(api, unique("dns"))
                body = service("web", [{"name": "http", "port": 80, "targetPort": 8080}])
                created = await core.create_namespaced_service(ns, cast(Any, body))
                cluster_ip = created.spec.cluster_ip
                name = f"web.{ns}.{ZONE}"
                found = await until(port, name, lambda r: addresses(r) == [cluster_ip])
                assert found.header.rcode == NOERROR

                # a headless Service without a selector, and its Endpoints written by hand
                headless = {
                    "metadata": {"name": "db"},
                    "spec": {"clusterIP": "None", "ports": [{"name": "pg", "port": 5432}]},
                }
                await core.create_namespaced_service(ns, cast(Any, headless))
                endpoints = {
                    "metadata": {"name": "db"},
                    "subsets": [
                        {
                            "addresses": [{"ip": "10.9.0.1", "hostname": "db-0"}],
                            "ports": [{"name": "pg", "port": 5432}],
                        }
                    ],
                }
                await core.create_namespaced_endpoints(ns, cast(Any, endpoints))
                await until(port, f"db.{ns}.{ZONE}", lambda r: addresses(r) == ["10.9.0.1"])
                await until(port, f"db-0.db.{ns}.{ZONE}", lambda r: addresses(r) == ["10.9.0.1"])

                await core.delete_namespaced_service("web", ns)
                await until(port, name, lambda r: r.header.rcode == NXDOMAIN)
                await core.delete_namespace(ns)

            assert proc.returncode is None  # still serving
            proc.send_signal(signal.SIGTERM)
            async with asyncio.timeout(15):
                assert await proc.wait() == 0
        finally:
            if proc.returncode is None:
                proc.kill()
                with contextlib.suppress(ProcessLookupError):
                    await proc.wait()
            errors.close()

    try:
        run(scenario(), timeout=90)
    except BaseException:
        print((tmp_path / "dns.log").read_text(errors="replace")[-4000:])
        raise


class CountingTable(NameTable):
    """Counts the relists of Services."""

    relists = 0

    def replace_services(self, services: Iterable[Service]) -> None:
        self.relists += 1
        super().replace_services(services)


def test_watcher_lists_again_when_its_watch_ends(control_plane: LocalControlPlane) -> None:
    async def scenario() -> None:
        async with control_plane.api() as api:
            core = k8s.CoreV1Api(api)
            ns = await make_namespace(api, unique("relist"))
            table = CountingTable(synced=False)
            watcher = asyncio.create_task(ClusterWatcher(api, table, watch_timeout=1).run())
            try:
                async with asyncio.timeout(20):
                    for _ in range(200):  # the 1 s watch ends, and the watcher lists again
                        if table.synced and table.relists >= 2:
                            break
                        await asyncio.sleep(0.1)
                    assert table.relists >= 2
                body = service("late", [{"port": 80, "targetPort": 8080}])
                created = await core.create_namespaced_service(ns, cast(Any, body))
                name = f"late.{ns}.{ZONE}"
                async with asyncio.timeout(20):
                    for _ in range(200):
                        if addresses(ask(table, name)) == [created.spec.cluster_ip]:
                            break
                        await asyncio.sleep(0.1)
                    assert addresses(ask(table, name)) == [created.spec.cluster_ip]
                await core.delete_namespace(ns)
            finally:
                watcher.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await watcher

    run(scenario(), timeout=60)
