"""`tpcontrol intercept` end to end on a real API server, manager and agent: prepare, create, the
tunnel to a local process, the container's environment handed to a command, and leaving."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Awaitable
from pathlib import Path

from tpcontrol.kube.agentconfig import GeneratorSettings
from tpcontrol.kube.configmap import AgentConfigStore
from tpcontrol.localcluster import LocalControlPlane
from tpcontrol.manager.api import Manager, ManagerSettings
from tpproxy.config import encode_sidecar
from tpproxy.server import Proxy

from .agent_helpers import start_agent
from .helpers import free_port, run
from .http_servers import Upstream
from .k8s_helpers import IMAGE, deployment, make_namespace, service, unique
from .test_http import get, read_responses, send_raw
from .test_webhook_k8s import create


def tpcontrol(*args: str) -> Awaitable[asyncio.subprocess.Process]:
    """`python -m tpcontrol ARGS` with its output captured."""
    return asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tpcontrol",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )


async def _reaches(port: int, header: str | None, want: bytes, within: float) -> None:
    """Send requests (bounded, 0.2 s apart) until one's answer is `want`."""
    async with asyncio.timeout(within):
        while True:
            headers = (header,) if header else ()
            try:
                reader, writer = await send_raw(port, get("/probe", *headers))
            except OSError:  # not listening yet (the agent is starting)
                await asyncio.sleep(0.2)
                continue
            try:
                (response,) = await read_responses(reader, 1, timeout=5)
                if response.body.startswith(want):
                    return
            except (OSError, AssertionError):
                pass  # closed mid-way (a route change, say): try again
            finally:
                writer.close()
            await asyncio.sleep(0.2)


def test_intercept_survives_a_manager_restart_explain_and_leave(
    control_plane: LocalControlPlane, tmp_path: Path
) -> None:

    async def scenario() -> None:
        app, dev = await Upstream("app").start(), await Upstream("dev").start()
        agent_port, manager_port = free_port(), free_port()
        async with control_plane.api() as api:
            ns = await make_namespace(api, unique("restart"))
            container = {
                "name": "echo",
                "image": "example/echo",
                "ports": [{"name": "http", "containerPort": app.port}],
            }
            await create(
                api,
                ns,
                service("echo", [{"name": "http", "port": 80, "targetPort": "http"}]),
                deployment("echo", [container]),
            )
            settings = ManagerSettings(
                auth_mode="permissive",
                generator=GeneratorSettings(agent_image=IMAGE, agent_port=agent_port),
            )
            manager = Manager(api, settings)
            runner, _ = await manager.start("127.0.0.1", manager_port)
            proxy: Proxy | None = None
            agent_task: asyncio.Task[None] | None = None
            cli = await tpcontrol(
                "intercept",
                "echo",
                "-n",
                ns,
                "--port",
                "http",
                "--to",
                str(dev.port),
                "--http-header",
                "x-dev=alice",
                "--manager",
                f"http://127.0.0.1:{manager_port}",
            )
            try:
                store = AgentConfigStore(api)
                async with asyncio.timeout(30):
                    while (entry := await store.get(ns, "echo")) is None:
                        await asyncio.sleep(0.05)
                config = tmp_path / "config.yaml"
                config.write_bytes(encode_sidecar(entry))
                agent, proxy = await start_agent(
                    config, f"http://127.0.0.1:{manager_port}", "p", "10.0.0.3", {}
                )
                agent_task = asyncio.create_task(agent.run())
                await _reaches(agent_port, "x-dev: alice", b"dev GET", within=30)

                await manager.stop()
                await runner.cleanup()
                await _reaches(agent_port, None, b"app GET", within=10)  # the app keeps serving

                manager = Manager(api, settings)
                runner, _ = await manager.start("127.0.0.1", manager_port)
                # The client arrives and intercepts again, the agent arrives again: back to dev.
                await _reaches(agent_port, "x-dev: alice", b"dev GET", within=45)

                explained = await tpcontrol(
                    "explain",
                    "echo",
                    "-n",
                    ns,
                    "-H",
                    "x-dev: alice",
                    "--manager",
                    f"http://127.0.0.1:{manager_port}",
                )
                out, _ = await explained.communicate()
                assert explained.returncode == 0
                assert (
                    f":echo-http (127.0.0.1:{dev.port})" in out.decode()
                )  # the client's local port
                assert "matches" in out.decode()

                # `leave` ends the running intercept as Ctrl-C would.
                left = await tpcontrol("leave", "echo-http")
                out, _ = await left.communicate()
                assert left.returncode == 0
                async with asyncio.timeout(20):
                    out, err = await cli.communicate()
                text = out.decode()
                assert cli.returncode == 0, err.decode() + text
                assert "intercepting again" in text
                assert "left intercept" in text
                assert manager.state.all_intercepts() == []
            finally:
                if cli.returncode is None:
                    cli.kill()
                    await cli.wait()
                if agent_task is not None:
                    agent_task.cancel()
                if proxy is not None:
                    await proxy.engine.close()
                await manager.stop()
                await runner.cleanup()
                app.close()
                dev.close()

    run(scenario(), timeout=150)


def test_port_forward_option(control_plane: LocalControlPlane) -> None:
    """The manager can be reached through a `kubectl port-forward` the client starts; its output
    is parsed for the local ports, and a forward that cannot start is one clear line, exit 2."""
    import subprocess

    from tpcontrol.client.portforward import forwarded_port

    assert forwarded_port("Forwarding from 127.0.0.1:41234 -> 8081\n") == 41234
    assert forwarded_port("Forwarding from [::1]:41234 -> 8081\n") is None
    assert forwarded_port("Handling connection for 41234\n") is None

    def intercept(*flags: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "tpcontrol", "intercept", "echo", *flags],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    bad = intercept("--port-forward", "nonsense")
    assert bad.returncode == 2
    assert "--port-forward 'nonsense': expected NAMESPACE/SERVICE" in bad.stderr
    nowhere = unique("nowhere")
    missing = intercept(
        "--port-forward",
        f"{nowhere}/no-such-manager",
        "--kubeconfig",
        str(control_plane.kubeconfig),
    )
    assert missing.returncode == 2
    assert f"kubectl port-forward to {nowhere}/no-such-manager: " in missing.stderr
    assert f'(NotFound): namespaces "{nowhere}" not found' in missing.stderr  # kubectl's reason
    assert missing.stderr.count("\n") == 1
