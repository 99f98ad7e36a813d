"""The traffic-agent with a real manager: it arrives, applies intercepts as routes, reviews them,
keeps serving the app while the manager is away, and arrives again when it is back."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tpcontrol.client.tunnel import TunnelClient
from tpcontrol.kube.agentconfig import GeneratorSettings
from tpcontrol.localcluster import LocalControlPlane
from tpcontrol.manager.api import Manager, ManagerSettings
from tpproxy.agent import Agent, app_environment
from tpproxy.config import load_sidecar

from .agent_helpers import start_agent
from .helpers import free_port, run
from .http_servers import Upstream
from .k8s_helpers import IMAGE, make_namespace, unique
from .test_http import get, read_responses, send_raw

Json = dict[str, Any]

CONFIG = """\
agentName: echo
namespace: {ns}
workloadName: echo
workloadKind: Deployment
containers:
- name: echo
  envPrefix: A_
  intercepts:
  - {{serviceName: echo, servicePortName: http, containerPort: {app}, servicePort: 80, agentPort: {agent}}}
"""


async def arrive(http: aiohttp.ClientSession, base: str, name: str) -> str:
    """A client session at the manager at `base`."""
    async with http.post(f"{base}/v1/clients", json={"name": name, "version": "1"}) as r:
        assert r.status == 201
        sid: str = (await r.json())["sessionId"]
        return sid


def web_intercept(name: str, ns: str, app_port: int, agent_port: int, target_port: int) -> Json:
    """An HTTP intercept of the echo service port `http`, for requests with `x-dev: alice`."""
    return {
        "name": name,
        "workload": "echo",
        "namespace": ns,
        "mechanism": "http",
        "serviceName": "echo",
        "servicePortIdentifier": "http",
        "containerPort": app_port,
        "agentPort": agent_port,
        "targetPort": target_port,
        "headers": [{"name": "x-dev", "value": "alice"}],
    }


async def wait_for(predicate: Any, within: float = 10) -> None:
    async with asyncio.timeout(within):
        while not await predicate():
            await asyncio.sleep(0.05)


def test_agent_applies_intercepts_and_survives_a_manager_restart(
    control_plane: LocalControlPlane, tmp_path: Path
) -> None:
    async def scenario() -> None:
        app, alice = await Upstream("app").start(), await Upstream("alice").start()
        agent_port, manager_port = free_port(), free_port()
        async with control_plane.api() as api:
            ns = await make_namespace(api, unique("agent"))
            config = tmp_path / "config.yaml"
            config.write_text(CONFIG.format(ns=ns, app=app.port, agent=agent_port))
            manager = Manager(
                api,
                ManagerSettings(
                    auth_mode="permissive", generator=GeneratorSettings(agent_image=IMAGE)
                ),
            )
            runner, _ = await manager.start("127.0.0.1", manager_port)

            environ = {"_TEL_APP_A_GREETING": "hi", "_TEL_APP_B_OTHER": "x", "PATH": "/bin"}
            agent, proxy = await start_agent(
                config, f"http://127.0.0.1:{manager_port}", "echo-1", "10.1.0.5", environ
            )
            task = asyncio.create_task(agent.run())
            tunnel: TunnelClient | None = None
            try:
                async with asyncio.timeout(10):
                    await agent.connected.wait()
                async with aiohttp.ClientSession() as http:
                    base = f"http://127.0.0.1:{manager_port}"
                    client = await arrive(http, base, "dev")
                    spec = web_intercept("echo-http", ns, app.port, agent_port, alice.port)
                    async with http.post(f"{base}/v1/sessions/{client}/intercepts", json=spec) as r:
                        assert r.status == 201, await r.text()
                        icept = (await r.json())["id"]
                    # The developer's side: idle tunnel streams that deliver to alice's server.
                    tunnel = TunnelClient(
                        "127.0.0.1", manager.tunnel_port, client, icept, "127.0.0.1", alice.port
                    )
                    tunnel.start()

                    async def active() -> bool:
                        async with http.get(f"{base}/v1/sessions/{client}/intercepts") as r:
                            items = await r.json()
                        return bool(items) and items[0]["disposition"] == "ACTIVE"

                    await wait_for(active)
                    async with http.get(f"{base}/v1/sessions/{client}/intercepts") as r:
                        (seen,) = await r.json()
                    assert seen["podIp"] == "10.1.0.5"
                    assert seen["environment"] == {"GREETING": "hi"}
                    assert seen["mechanismDesc"] == "header(x-dev) == 'alice'"

                    # One keep-alive connection: the header picks the developer, the rest the app.
                    reader, writer = await send_raw(
                        agent_port, get("/a") + get("/b", "x-dev: alice") + get("/c")
                    )
                    bodies = [r.body for r in await read_responses(reader, 3)]
                    assert bodies == [b"app GET /a", b"alice GET /b", b"app GET /c"]
                    writer.close()

                    # The manager goes away: app traffic keeps flowing, intercept routes are dropped.
                    await manager.stop()
                    await runner.cleanup()
                    await wait_for(lambda: _false_if(agent.connected.is_set()))
                    reader, writer = await send_raw(
                        agent_port, get("/d") + get("/e", "x-dev: alice")
                    )
                    bodies = [r.body for r in await read_responses(reader, 2)]
                    assert bodies == [b"app GET /d", b"app GET /e"]
                    writer.close()

                    # It comes back on the same address: the agent arrives again by itself.
                    manager = Manager(
                        api,
                        ManagerSettings(
                            auth_mode="permissive", generator=GeneratorSettings(agent_image=IMAGE)
                        ),
                    )
                    runner, _ = await manager.start("127.0.0.1", manager_port)
                    async with asyncio.timeout(15):
                        await agent.connected.wait()
                    assert manager.state.agents_of(ns, "echo")
            finally:
                if tunnel is not None:
                    await tunnel.close()
                task.cancel()
                await manager.stop()
                await runner.cleanup()
                await proxy.engine.close()
                app.close()
                alice.close()

    run(scenario(), timeout=90)


async def _false_if(flag: bool) -> bool:
    return not flag


def test_app_environment_strips_each_containers_prefix(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(CONFIG.format(ns="default", app=8080, agent=9900))
    sidecar = load_sidecar(config)
    env = app_environment(
        sidecar, {"_TEL_APP_A_X": "1", "_TEL_APP_B_Y": "2", "_TEL_AGENT_NAME": "p"}
    )
    assert env == {"X": "1"}


def test_intercepts_reach_the_client_through_the_manager_tunnel(
    control_plane: LocalControlPlane, tmp_path: Path
) -> None:
    """A TCP intercept delivers a 1 GB echo intact through agent -> manager -> client -> local
    process; an HTTP intercept shares the port by header; a stream for someone else's intercept
    is refused."""
    from tpcontrol.client.tunnel import TunnelClient
    from tpproxy.tunnel import Hello, tunnel_connector

    from .helpers import EchoProtocol, start_server, stream_through

    async def scenario() -> None:
        app = await Upstream("app").start()
        alice = await Upstream("alice").start()
        bob = await Upstream("bob").start()
        _, local_echo = await start_server(EchoProtocol)
        _, raw_app = await start_server(EchoProtocol)
        agent_port, tcp_port = free_port(), free_port()
        async with control_plane.api() as api:
            ns = await make_namespace(api, unique("tunnel"))
            config = tmp_path / "config.yaml"
            config.write_text(
                CONFIG.format(ns=ns, app=app.port, agent=agent_port)
                + f"  - {{serviceName: echo, servicePortName: raw, containerPort: {raw_app}, "
                f"servicePort: 81, agentPort: {tcp_port}}}\n"
            )
            manager = Manager(
                api,
                ManagerSettings(
                    auth_mode="permissive", generator=GeneratorSettings(agent_image=IMAGE)
                ),
            )
            runner, manager_port = await manager.start("127.0.0.1", 0)
            agent, proxy = await start_agent(
                config, f"http://127.0.0.1:{manager_port}", "p", "10.0.0.9", {}
            )
            task = asyncio.create_task(agent.run())
            clients: list[TunnelClient] = []
            try:
                async with asyncio.timeout(10):
                    await agent.connected.wait()
                assert agent.tunnel_port == manager.tunnel_port
                base = f"http://127.0.0.1:{manager_port}"
                async with aiohttp.ClientSession() as http:
                    sid = await arrive(http, base, "dev")
                    common = {
                        "workload": "echo",
                        "namespace": ns,
                        "serviceName": "echo",
                        "containerPort": app.port,
                    }
                    specs = [
                        {
                            **common,
                            "name": "web",
                            "mechanism": "http",
                            "servicePortIdentifier": "http",
                            "agentPort": agent_port,
                            "targetPort": alice.port,
                            "headers": [{"name": "x-dev", "value": "alice"}],
                        },
                        {
                            **common,
                            "name": "raw",
                            "mechanism": "tcp",
                            "servicePortIdentifier": "raw",
                            "containerPort": raw_app,
                            "agentPort": tcp_port,
                            "targetPort": local_echo,
                        },
                    ]
                    ids = []
                    for spec in specs:
                        async with http.post(
                            f"{base}/v1/sessions/{sid}/intercepts", json=spec
                        ) as r:
                            assert r.status == 201, await r.text()
                            ids.append((await r.json())["id"])

                    async def all_active() -> bool:
                        async with http.get(f"{base}/v1/sessions/{sid}/intercepts") as r:
                            return all(i["disposition"] == "ACTIVE" for i in await r.json())

                    await wait_for(all_active)
                    # A second developer shares the HTTP port with other rules.
                    bob_sid = await arrive(http, base, "bob")
                    bob_spec = {
                        **specs[0],
                        "name": "web",
                        "headers": [{"name": "x-dev", "value": "bob"}],
                        "targetPort": bob.port,
                    }
                    async with http.post(
                        f"{base}/v1/sessions/{bob_sid}/intercepts", json=bob_spec
                    ) as r:
                        assert r.status == 201, await r.text()
                        bob_id = (await r.json())["id"]

                    async def bob_active() -> bool:
                        async with http.get(f"{base}/v1/sessions/{bob_sid}/intercepts") as r:
                            return all(i["disposition"] == "ACTIVE" for i in await r.json())

                    await wait_for(bob_active)
                owners = [
                    (sid, ids[0], alice.port),
                    (sid, ids[1], local_echo),
                    (bob_sid, bob_id, bob.port),
                ]
                for owner, icept, local in owners:
                    client = TunnelClient(
                        "127.0.0.1", manager.tunnel_port, owner, icept, "127.0.0.1", local
                    )
                    client.start()
                    clients.append(client)

                reader, writer = await send_raw(
                    agent_port,
                    get("/a") + get("/b", "x-dev: alice") + get("/c") + get("/d", "x-dev: bob"),
                )
                bodies = [r.body for r in await read_responses(reader, 4)]
                assert bodies == [b"app GET /a", b"alice GET /b", b"app GET /c", b"bob GET /d"]
                writer.close()
                assert alice.seen[0].target == "/b"

                sent, received = await stream_through(tcp_port, 1024 * 1024 * 1024)
                assert sent == received
                assert clients[1].served == 1
                assert manager.tunnel.paired == 3

                # An agent stream must belong to the agent, a client stream to the client.
                connect = tunnel_connector(
                    "127.0.0.1",
                    manager.tunnel_port,
                    lambda: Hello(role="client", session="forged", intercept=ids[0]),
                )
                with pytest.raises(ConnectionError, match="not found"):
                    await connect(asyncio.Protocol)
            finally:
                for client in clients:
                    await client.close()
                task.cancel()
                await manager.stop()
                await runner.cleanup()
                await proxy.engine.close()
                app.close()
                alice.close()

    run(scenario(), timeout=120)


def test_a_vanished_client_loses_its_intercepts_and_traffic_returns_to_the_app(
    control_plane: LocalControlPlane, tmp_path: Path
) -> None:
    async def scenario() -> None:
        app, alice = await Upstream("app").start(), await Upstream("alice").start()
        agent_port = free_port()
        async with control_plane.api() as api:
            ns = await make_namespace(api, unique("vanish"))
            config = tmp_path / "config.yaml"
            config.write_text(CONFIG.format(ns=ns, app=app.port, agent=agent_port))
            manager = Manager(
                api,
                ManagerSettings(
                    auth_mode="permissive",
                    generator=GeneratorSettings(agent_image=IMAGE),
                    client_ttl=1.0,
                ),
            )
            runner, manager_port = await manager.start()
            agent, proxy = await start_agent(
                config, f"http://127.0.0.1:{manager_port}", "p", "10.0.0.2", {}
            )
            task = asyncio.create_task(agent.run())
            try:
                async with asyncio.timeout(10):
                    await agent.connected.wait()
                base = f"http://127.0.0.1:{manager_port}"
                async with aiohttp.ClientSession() as http:
                    sid = await arrive(http, base, "gone")
                    spec = web_intercept("web", ns, app.port, agent_port, alice.port)
                    async with http.post(f"{base}/v1/sessions/{sid}/intercepts", json=spec) as r:
                        assert r.status == 201
                await wait_for(lambda: _routed(agent, 1))
                # The client sends no heartbeat: after its TTL it and its intercept are gone, and
                # the agent is told to route to the app again.
                await wait_for(lambda: _routed(agent, 0), within=15)
                assert manager.state.all_intercepts() == []
                reader, writer = await send_raw(agent_port, get("/x", "x-dev: alice"))
                (response,) = await read_responses(reader, 1)
                assert response.body == b"app GET /x"
                writer.close()
            finally:
                task.cancel()
                await manager.stop()
                await runner.cleanup()
                await proxy.engine.close()
                app.close()
                alice.close()

    run(scenario(), timeout=60)


async def _routed(agent: Agent, count: int) -> bool:
    return len(agent.applied) == count


def test_agent_reloads_its_config_when_the_file_changes(tmp_path: Path) -> None:
    async def scenario() -> None:
        app = await Upstream("app").start()
        first, second = free_port(), free_port()
        config = tmp_path / "config.yaml"
        config.write_text(CONFIG.format(ns="default", app=app.port, agent=first))
        agent, proxy = await start_agent(config, "http://127.0.0.1:1", "p", "10.0.0.1", {})
        task = asyncio.create_task(agent.watch_config(str(config), every=0.05))
        await asyncio.sleep(0)  # let the watcher take the file's first stamp
        try:
            broken = tmp_path / "broken.yaml"
            broken.write_text("containers: [oops")
            broken.replace(config)  # an atomic swap, as kubelet does
            async with asyncio.timeout(5):
                while agent.reload_errors == 0:
                    await asyncio.sleep(0.05)
            assert proxy.engine.ports == [first]
            fresh = tmp_path / "fresh.yaml"
            fresh.write_text(CONFIG.format(ns="default", app=app.port, agent=second))
            fresh.replace(config)
            async with asyncio.timeout(5):
                while proxy.engine.ports != [second]:
                    await asyncio.sleep(0.05)
            assert agent.reloads == 1
            reader, writer = await send_raw(second, get("/new"))
            (response,) = await read_responses(reader, 1)
            assert response.body == b"app GET /new"
            writer.close()
        finally:
            task.cancel()
            await proxy.engine.close()
            app.close()

    run(scenario())
