"""The agent's manager loop outlives whatever comes down its watch: a line that is not JSON, a
list of the wrong shape, intercepts whose rules the agent refuses and a line of 17 MiB are each
logged, and the agent goes on (the next good line applies; after the oversized one it arrives
again). The manager here is the hostile one the test plays: a small aiohttp server answering
the agent's four calls, so that it can send what no real manager would."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import msgspec
import pytest
from aiohttp import web

from tpproxy.agent import MAX_WATCH_LINE
from tpproxy.specs import HeaderMatch
from tpproxy.wire import Intercept, InterceptRequest

from .agent_helpers import start_agent
from .helpers import free_port, run
from .test_agent_k8s import CONFIG


def intercept(ident: str, agent_port: int, headers: list[HeaderMatch]) -> Intercept:
    return Intercept(
        id=ident,
        spec=InterceptRequest(
            name=ident,
            workload="echo",
            namespace="ns",
            mechanism="http",
            service_name="echo",
            container_port=8080,
            agent_port=agent_port,
            target_host="127.0.0.1",
            target_port=1,
            headers=headers,
        ),
        client_session="s",
        client="dev",
        disposition="ACTIVE",
        message="",
        created_at=0.0,
    )


def test_bad_watch_lines_are_survived(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    async def scenario() -> None:
        agent_port = free_port()
        caplog.set_level(logging.WARNING, logger="tpproxy.agent")
        arrivals: list[int] = []
        watches: list[asyncio.Queue[bytes]] = []  # one per watch the agent opened

        def send(line: bytes) -> None:
            watches[-1].put_nowait(line)

        async def arrive(request: web.Request) -> web.Response:
            arrivals.append(1)
            return web.json_response({"sessionId": f"s{len(arrivals)}"}, status=201)

        async def info(request: web.Request) -> web.Response:
            return web.json_response({"tunnelPort": 0})

        async def remain(request: web.Request) -> web.Response:
            return web.json_response({})

        async def watch(request: web.Request) -> web.StreamResponse:
            stream = web.StreamResponse()
            await stream.prepare(request)
            lines: asyncio.Queue[bytes] = asyncio.Queue()
            watches.append(lines)
            while line := await lines.get():
                await stream.write(line)
            return stream

        app = web.Application()
        app.router.add_post("/v1/agents", arrive)
        app.router.add_get("/v1/info", info)
        app.router.add_post("/v1/sessions/{sid}/remain", remain)
        app.router.add_get("/v1/sessions/{sid}/intercepts", watch)
        runner = web.AppRunner(app)
        await runner.setup()
        manager_port = free_port()
        await web.TCPSite(runner, "127.0.0.1", manager_port).start()

        config = tmp_path / "config.yaml"
        config.write_text(CONFIG.format(ns="ns", app=free_port(), agent=agent_port))
        agent, proxy = await start_agent(config, f"http://127.0.0.1:{manager_port}")
        task = asyncio.create_task(agent.run())

        async def until(check: object, within: float = 15) -> None:
            async with asyncio.timeout(within):
                while not callable(check) or not check():
                    await asyncio.sleep(0.02)

        good = [intercept("s:alice", agent_port, [HeaderMatch("x-dev", "alice")])]
        try:
            await until(agent.connected.is_set)
            for bad in (b"not json\n", b'{"a": 1}\n', b"[1, 2]\n"):
                send(bad)
            send(msgspec.json.encode(good) + b"\n")
            await until(lambda: agent.applied == ["s:alice"])
            assert arrivals == [1]  # nothing of that ended the session

            refused = [intercept("s:bob", agent_port, [HeaderMatch("x", "(a)\\1", "regex")])]
            send(msgspec.json.encode(refused) + b"\n")
            send(msgspec.json.encode(good) + b"\n")
            await until(lambda: agent.applied == ["s:alice"] and agent.intercepts == good)
            assert not task.done()

            send(b"[" + b" " * (MAX_WATCH_LINE + (1 << 20)))
            await until(lambda: len(arrivals) == 2)  # a fresh session, a fresh snapshot
            said = [r.getMessage() for r in caplog.records]
            assert any(f"a watch line over {MAX_WATCH_LINE} bytes" in m for m in said), said
            assert not any("manager session failed" in m for m in said)  # handled, not a crash
            await until(lambda: len(watches) == 2 and agent.connected.is_set())
            send(msgspec.json.encode(good) + b"\n")
            await until(lambda: agent.applied == ["s:alice"])
            assert not task.done()
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await proxy.engine.close()
            for lines in watches:
                lines.put_nowait(b"")  # each watch handler ends
            await runner.cleanup()

    run(scenario(), timeout=60)
