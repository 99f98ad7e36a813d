"""The whole 2.6 flow on a real API server: `tpcontrol intercept` prepares, the manager stores the
entry and rolls the workload out, the webhook injects the agent into the new pod, and that pod's
traffic-agent container (exactly as injected) runs as a local process and routes by header."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

from tpcontrol.localcluster import LocalControlPlane
from tpcontrol.manager import Manager, ManagerSettings

from .helpers import free_port, run
from .http_servers import Upstream
from .k8s_helpers import (
    IMAGE,
    deployment,
    make_namespace,
    running_webhook,
    service,
    unique,
    wait_for_pods,
)
from .pod_runner import run_agent_container
from .test_intercept_cli_k8s import _reaches, tpcontrol
from .test_manager_k8s import recreate
from .test_webhook_k8s import create, injected


def test_intercept_through_the_injected_agent(
    control_plane: LocalControlPlane, tmp_path: Path
) -> None:
    async def scenario() -> None:
        app, dev = await Upstream("app").start(), await Upstream("dev").start()
        agent_port = free_port()
        async with control_plane.api() as api:
            ns = await make_namespace(api, unique("e2e"))
            async with running_webhook(api, ns):
                manager = Manager(api, ManagerSettings(agent_image=IMAGE, agent_port=agent_port))
                runner, manager_port = await manager.start()
                container = {
                    "name": "echo",
                    "image": "example/echo",
                    "env": [{"name": "MODE", "value": "x"}],
                    "ports": [{"name": "http", "containerPort": app.port}],
                }
                await create(
                    api,
                    ns,
                    service("echo", [{"name": "http", "port": 80, "targetPort": "http"}]),
                    recreate(deployment("echo", [container])),
                )
                cli = await tpcontrol(
                    "intercept",
                    "echo",
                    "-n",
                    ns,
                    "--to",
                    str(dev.port),
                    "--http-header",
                    "x-dev=alice",
                    "--manager",
                    f"http://127.0.0.1:{manager_port}",
                )
                agent: asyncio.subprocess.Process | None = None
                try:
                    # The rollout brings a pod with the agent, injected by the webhook.
                    (pod,) = await wait_for_pods(
                        api, ns, "app=echo", 1, lambda ps: all(injected(p) for p in ps)
                    )
                    agent = await run_agent_container(
                        api, pod, tmp_path, f"http://127.0.0.1:{manager_port}"
                    )
                    await _reaches(agent_port, "x-dev: alice", b"dev GET", within=40)
                    await _reaches(agent_port, None, b"app GET", within=5)

                    cli.send_signal(signal.SIGINT)
                    async with asyncio.timeout(20):
                        out, err = await cli.communicate()
                    assert cli.returncode == 0, err.decode() + out.decode()
                    assert "left intercept" in out.decode()
                    await _reaches(agent_port, "x-dev: alice", b"app GET", within=10)  # restored
                finally:
                    if cli.returncode is None:
                        cli.kill()
                        await cli.wait()
                    if agent is not None and agent.returncode is None:
                        agent.send_signal(signal.SIGTERM)
                        async with asyncio.timeout(30):
                            _, agent_err = await agent.communicate()
                        assert agent.returncode == 0, agent_err.decode()
                    await manager.stop()
                    await runner.cleanup()
                    app.close()
                    dev.close()

    run(scenario(), timeout=150)
