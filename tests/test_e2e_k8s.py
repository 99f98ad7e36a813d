"""The whole 2.6 flow on the local node: `tpcontrol intercept` prepares, the manager stores the
entry and rolls the workload out, the webhook patches the new pod, and the node runs that pod as
patched: the injected traffic-agent container (and, for numeric target ports, the tel-agent-init
container whose iptables rules send the app port to the agent) in the pod's own network
namespace, reached through the Service like any other pod."""

from __future__ import annotations

import asyncio
import signal
from typing import Any, cast

from kubernetes_asyncio import client as k8s

from tpcontrol.localcluster import LocalControlPlane
from tpcontrol.localstack import Stack
from tpcontrol.node.netns import namespaces, open_connection_in

from .helpers import run
from .http_servers import Upstream
from .k8s_helpers import deployment, make_namespace, service, stack_for, unique, wait_for_pods
from .node_helpers import Json, alive, answers, cmdline, nat_rules, ready, require_root
from .test_intercept_cli_k8s import tpcontrol

APP = "tpcontrol.example/http-echo:1"
TCP_APP = "tpcontrol.example/tcp-echo:1"
POD_NAME = {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}


def has_agent(pod: Json) -> bool:
    return any(c["name"] == "traffic-agent" for c in pod["spec"]["containers"])


def settled(agent: bool) -> Any:
    """One pod, ready, with (or without) the agent, and no other pod left."""
    return lambda pods: all(
        ready(p) and has_agent(p) == agent and not p["metadata"].get("deletionTimestamp")
        for p in pods
    )


async def intercept(stack: Stack, ns: str, *args: str) -> asyncio.subprocess.Process:
    """`tpcontrol intercept`, once it says ACTIVE."""
    cli = await tpcontrol("intercept", "-n", ns, "--manager", stack.manager_url, *args)
    assert cli.stdout is not None
    async with asyncio.timeout(90):
        while line := await cli.stdout.readline():
            if line.strip().startswith(b"ACTIVE"):
                return cli
    assert cli.stderr is not None
    raise AssertionError((await cli.stderr.read()).decode())


async def leave(cli: asyncio.subprocess.Process) -> None:
    cli.send_signal(signal.SIGINT)
    async with asyncio.timeout(20):
        out, err = await cli.communicate()
    assert cli.returncode == 0, err.decode()
    assert b"left intercept" in out


def test_http_intercept_through_the_agent_the_webhook_injected(
    control_plane: LocalControlPlane,
) -> None:
    require_root()

    async def scenario() -> None:
        dev = await Upstream("dev").start()
        async with control_plane.api() as api:
            ns = await make_namespace(api, unique("e2e"))
            async with stack_for(api, ns) as stack:
                node = stack.node
                container = {
                    "name": "echo",
                    "image": APP,
                    "args": ["--port", "8080"],
                    "env": [POD_NAME, {"name": "CONTAINER_NAME", "value": "echo"}],
                    "ports": [{"name": "http", "containerPort": 8080}],
                    "readinessProbe": {"httpGet": {"path": "/healthz", "port": "http"}},
                }
                await k8s.AppsV1Api(api).create_namespaced_deployment(
                    ns, cast(Any, deployment("echo", [container]))
                )
                svc = await k8s.CoreV1Api(api).create_namespaced_service(
                    ns,
                    cast(
                        Any, service("echo", [{"name": "http", "port": 80, "targetPort": "http"}])
                    ),
                )
                (old,) = await wait_for_pods(api, ns, "app=echo", 1, settled(agent=False))
                old_worker = node.workers[(ns, old["metadata"]["name"])]
                assert old_worker.containers[0].process is not None
                old_pid, old_netns = old_worker.containers[0].process.pid, old_worker.netns
                ip = svc.spec.cluster_ip
                assert (await answers(node.network.node_ns, ip, 80)).startswith(
                    f"served by {old['metadata']['name']}/echo"
                )

                cli = await intercept(
                    stack, ns, "echo", "--to", str(dev.port), "--http-header", "x-dev=alice"
                )
                try:
                    # The rollout: the old pod stops for real, the new one runs the agent.
                    (new,) = await wait_for_pods(api, ns, "app=echo", 1, settled(agent=True))
                    assert not alive(old_pid)
                    assert old_netns not in namespaces()
                    agent_spec = next(
                        c for c in new["spec"]["containers"] if c["name"] == "traffic-agent"
                    )
                    assert agent_spec["args"] == ["agent"]
                    worker = node.workers[(ns, new["metadata"]["name"])]
                    agent = next(c for c in worker.containers if c.name == "traffic-agent")
                    assert agent.process is not None
                    assert cmdline(agent.process.pid)[1:4] == ["-m", "tpproxy", "agent"]
                    statuses = {s["name"]: s for s in new["status"]["containerStatuses"]}
                    assert statuses["traffic-agent"]["ready"]  # its exec probe found the file

                    by_alice = await answers(
                        node.network.node_ns, ip, 80, "/a", **{"x-dev": "alice"}
                    )
                    assert by_alice.startswith("dev GET /a"), by_alice
                    plain = await answers(node.network.node_ns, ip, 80, "/b")
                    assert plain.startswith(f"served by {new['metadata']['name']}/echo"), plain
                finally:
                    if cli.returncode is None:
                        await leave(cli)
                again = await answers(node.network.node_ns, ip, 80, "/c", **{"x-dev": "alice"})
                assert again.startswith("served by"), again
        dev.close()

    run(scenario(), timeout=180)


def test_numeric_target_port_reaches_the_agent_through_the_init_containers_iptables(
    control_plane: LocalControlPlane,
) -> None:
    require_root()

    async def scenario() -> None:
        async def greet(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.write(b"hello from the developer\n")
            await writer.drain()
            writer.close()

        dev = await asyncio.start_server(greet, "127.0.0.1", 0)
        dev_port = dev.sockets[0].getsockname()[1]
        async with control_plane.api() as api:
            ns = await make_namespace(api, unique("e2e"))
            async with stack_for(api, ns, agent_port=9950) as stack:
                node = stack.node
                container = {
                    "name": "stock",
                    "image": TCP_APP,
                    "args": ["--port", "7070"],
                    "env": [POD_NAME, {"name": "CONTAINER_NAME", "value": "stock"}],
                    "ports": [{"containerPort": 7070}],
                    "readinessProbe": {"tcpSocket": {"port": 7070}},
                }
                await k8s.AppsV1Api(api).create_namespaced_deployment(
                    ns, cast(Any, deployment("stock", [container]))
                )
                await k8s.CoreV1Api(api).create_namespaced_service(
                    ns, cast(Any, service("stock", [{"port": 7070, "targetPort": 7070}]))
                )
                await wait_for_pods(api, ns, "app=stock", 1, settled(agent=False))

                cli = await intercept(
                    stack, ns, "stock", "--to", str(dev_port), "--mechanism", "tcp"
                )
                try:
                    (pod,) = await wait_for_pods(api, ns, "app=stock", 1, settled(agent=True))
                    (init,) = pod["spec"]["initContainers"]
                    assert init["name"] == "tel-agent-init"
                    assert init["args"] == ["agent-init"]
                    (init_status,) = pod["status"]["initContainerStatuses"]
                    assert init_status["state"]["terminated"]["exitCode"] == 0
                    worker = node.workers[(ns, pod["metadata"]["name"])]
                    rules = nat_rules(worker.netns)
                    assert (
                        "-A TEL_INBOUND_TCP -p tcp -m tcp --dport 7070 -j REDIRECT --to-ports 9950"
                        in rules
                    )
                    # The app's own port, dialled directly on the pod's address, is the agent's.
                    assert await first_line(node.network.node_ns, pod["status"]["podIP"], 7070) == (
                        "hello from the developer"
                    )
                finally:
                    if cli.returncode is None:
                        await leave(cli)
                greeting = await first_line(node.network.node_ns, pod["status"]["podIP"], 7070)
                assert greeting == f"hello from {pod['metadata']['name']}/stock"
        dev.close()

    run(scenario(), timeout=180)


async def first_line(netns: str, host: str, port: int) -> str:
    """The first line a TCP server sends, retried (bounded) while routes settle."""
    last = ""
    async with asyncio.timeout(30):
        while True:
            try:
                reader, writer = await open_connection_in(netns, host, port)
                try:
                    async with asyncio.timeout(5):
                        last = (await reader.readline()).decode().strip()
                finally:
                    writer.close()
                if last:
                    return last
            except OSError:
                pass
            await asyncio.sleep(0.2)
