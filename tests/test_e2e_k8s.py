"""The whole 2.6 flow on the real node, with the product installed from deploy/: `tpcontrol
intercept` reaches the in-cluster manager through a port-forward (the user's kubeconfig, no
--manager), the manager stores the entry and rolls the workload out, the webhook patches the new
pod from the stored entry, and kubelet runs what it patched: the traffic-agent container (its
readiness probe passing) and, for numeric target ports, the tel-agent-init container whose
iptables rules send the app's port to the agent, in the pod's own network namespace."""

from __future__ import annotations

import asyncio
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import pytest
from kubernetes_asyncio import client as k8s

from .cluster_helpers import ClusterUnderTest, Json, answers, has_agent, scratch_namespace, settled
from .helpers import run
from .http_servers import Upstream
from .k8s_helpers import deployment, service, wait_for_pods

# Cluster tests wait on kubelet and rollouts; the first one also pays for the session's
# cluster (images, start, install): a longer bound than the suite's default.
pytestmark = pytest.mark.timeout(600)


def echo_container(cluster: ClusterUnderTest, app: str, port: int, **extra: Any) -> Json:
    """A container of the examples image running `app` (http_echo or tcp_echo) on `port`."""
    return {
        "name": app.split("_")[0],
        "image": cluster.images.examples.ref,
        "command": ["/opt/examples/bin/python", f"/examples/{app}.py"],
        "args": ["--port", str(port)],
        "env": [
            {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
            {"name": "CONTAINER_NAME", "value": app.split("_")[0]},
        ],
        **extra,
    }


@dataclass
class Cli:
    """A running `tpcontrol intercept`, and everything it has said (both pipes are read all
    along, so that they never fill up)."""

    proc: asyncio.subprocess.Process
    said: list[str] = field(default_factory=list)
    readers: list[asyncio.Task[None]] = field(default_factory=list)

    @property
    def returncode(self) -> int | None:
        return self.proc.returncode

    @property
    def text(self) -> str:
        return "".join(self.said)


async def intercept(cluster: ClusterUnderTest, ns: str, *args: str) -> Cli:
    """`tpcontrol intercept` (port-forward to the manager), once it says ACTIVE."""
    cli = Cli(await cluster.tpcontrol("intercept", "-n", ns, *args))

    async def read(stream: asyncio.StreamReader | None) -> None:
        assert stream is not None
        while line := await stream.readline():
            cli.said.append(line.decode())

    cli.readers = [asyncio.create_task(read(cli.proc.stdout)),
                   asyncio.create_task(read(cli.proc.stderr))]  # fmt: skip
    try:
        async with asyncio.timeout(120):
            while not any(line.strip().startswith("ACTIVE") for line in cli.said):
                if cli.proc.returncode is not None:
                    raise AssertionError(f"intercept ended ({cli.proc.returncode}): {cli.text}")
                await asyncio.sleep(0.05)
    except BaseException:
        await stop(cli)
        raise
    return cli


async def stop(cli: Cli) -> None:
    """Kill a client that is not to leave politely (a failed test), readers included."""
    if cli.proc.returncode is None:
        cli.proc.kill()
        await cli.proc.wait()
    for reader in cli.readers:
        reader.cancel()


async def leave(cli: Cli) -> str:
    """Ctrl-C, as a developer leaves; returns everything the client said."""
    cli.proc.send_signal(signal.SIGINT)
    try:
        async with asyncio.timeout(30):
            await cli.proc.wait()
            await asyncio.gather(*cli.readers)
    finally:
        await stop(cli)
    assert cli.proc.returncode == 0, cli.text
    assert "left intercept" in cli.text
    assert "could not tell the traffic-manager" not in cli.text
    return cli.text


async def deploy_echo(cluster: ClusterUnderTest, api: k8s.ApiClient, ns: str) -> tuple[str, Json]:
    """The echo workload (http_echo on a named port, probed) and its Service, once its pod is
    ready; returns the Service's cluster IP and the pod."""
    container = echo_container(
        cluster, "http_echo", 8080, ports=[{"name": "http", "containerPort": 8080}],
        readinessProbe={"httpGet": {"path": "/healthz", "port": "http"}, "periodSeconds": 1},
    )  # fmt: skip
    await k8s.AppsV1Api(api).create_namespaced_deployment(
        ns, cast(Any, deployment("echo", [container]))
    )
    svc = await k8s.CoreV1Api(api).create_namespaced_service(
        ns, cast(Any, service("echo", [{"name": "http", "port": 80, "targetPort": "http"}]))
    )
    (pod,) = await wait_for_pods(api, ns, "app=echo", 1, settled(agent=False))
    return str(svc.spec.cluster_ip), pod


async def intercept_alice(
    cluster: ClusterUnderTest, api: k8s.ApiClient, ns: str, dev_port: int
) -> tuple[Cli, Json]:
    """`tpcontrol intercept echo --http-header x-dev=alice` to `dev_port`, once ACTIVE and the
    rollout has a ready pod with the agent; returns the client and that pod."""
    cli = await intercept(
        cluster, ns, "echo", "--port", "http", "--to", str(dev_port),
        "--http-header", "x-dev=alice",
    )  # fmt: skip
    try:
        pods = await wait_for_pods(
            api, ns, "app=echo", 1, settled(agent=True), within=90, count_live=True
        )
    except BaseException:
        await stop(cli)
        raise
    (pod,) = [p for p in pods if has_agent(p)]
    return cli, pod


def test_http_intercept_through_a_port_forward_to_the_in_cluster_manager(
    cluster: ClusterUnderTest,
) -> None:
    async def scenario() -> None:
        dev = await Upstream("dev").start()
        async with cluster.cluster.api() as api, scratch_namespace(api, "e2e") as ns:
            ip, old = await deploy_echo(cluster, api, ns)
            plain = await answers(cluster.network, ip, 80)
            assert plain.startswith(f"served by {old['metadata']['name']}/http"), plain

            cli, new = await intercept_alice(cluster, api, ns, dev.port)
            try:
                assert new["metadata"]["name"] != old["metadata"]["name"]  # a rollout
                agent = next(c for c in new["spec"]["containers"] if c["name"] == "traffic-agent")
                assert agent["image"] == cluster.images.product.ref  # from the injector's settings
                assert agent["args"] == ["agent"]
                probe = agent["readinessProbe"]["exec"]["command"]
                assert probe[0] == "/bin/stat"  # the agent's ready file
                statuses = {s["name"]: s for s in new["status"]["containerStatuses"]}
                assert statuses["traffic-agent"]["ready"]  # kubelet ran that exec probe
                assert statuses["traffic-agent"]["restartCount"] == 0

                by_alice = await answers(cluster.network, ip, 80, "/a", **{"x-dev": "alice"})
                assert by_alice.startswith("dev GET /a"), by_alice
                # The old pod may answer a little longer: it leaves the Service's endpoints
                # only once it is gone, which the count of live pods above does not wait for.
                async with asyncio.timeout(60):
                    while not (plain := await answers(cluster.network, ip, 80, "/b")).startswith(
                        f"served by {new['metadata']['name']}/http"
                    ):
                        assert plain.startswith(f"served by {old['metadata']['name']}/"), plain
                        await asyncio.sleep(0.2)
            finally:
                if cli.returncode is None:
                    await leave(cli)
            again = await answers(cluster.network, ip, 80, "/c", **{"x-dev": "alice"})
            assert again.startswith("served by"), again
        dev.close()

    run(scenario(), timeout=240)


def test_numeric_target_port_reaches_the_agent_through_the_init_containers_iptables(
    cluster: ClusterUnderTest,
) -> None:
    async def scenario() -> None:
        async def greet(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.write(b"hello from the developer\n")
            await writer.drain()
            writer.close()

        dev = await asyncio.start_server(greet, "127.0.0.1", 0)
        dev_port = dev.sockets[0].getsockname()[1]
        async with cluster.cluster.api() as api, scratch_namespace(api, "e2e") as ns:
            container = echo_container(
                cluster, "tcp_echo", 7070, ports=[{"containerPort": 7070}],
                readinessProbe={"tcpSocket": {"port": 7070}, "periodSeconds": 1},
            )  # fmt: skip
            await k8s.AppsV1Api(api).create_namespaced_deployment(
                ns, cast(Any, deployment("stock", [container]))
            )
            await k8s.CoreV1Api(api).create_namespaced_service(
                ns, cast(Any, service("stock", [{"port": 7070, "targetPort": 7070}]))
            )
            await wait_for_pods(api, ns, "app=stock", 1, settled(agent=False))

            cli = await intercept(cluster, ns, "stock", "--to", str(dev_port), "--mechanism", "tcp")
            try:
                pods = await wait_for_pods(
                    api, ns, "app=stock", 1, settled(agent=True), within=90, count_live=True
                )
                (pod,) = [p for p in pods if has_agent(p)]
                (init,) = pod["spec"]["initContainers"]
                assert init["name"] == "tel-agent-init"
                assert init["args"] == ["agent-init"]
                assert init["securityContext"]["capabilities"]["add"] == ["NET_ADMIN"]
                (init_status,) = pod["status"]["initContainerStatuses"]
                assert init_status["state"]["terminated"]["exitCode"] == 0
                rules = cluster.cluster.pod_iptables(pod, "-t", "nat", "-S")
                assert (
                    "-A TEL_INBOUND_TCP -p tcp -m tcp --dport 7070 -j REDIRECT --to-ports 9900"
                    in rules
                ), rules
                # The app's own port, dialled on the pod's address, is the agent's.
                pod_ip = pod["status"]["podIP"]
                assert await first_line(cluster, pod_ip, 7070) == "hello from the developer"
            finally:
                if cli.returncode is None:
                    await leave(cli)
            greeting = await first_line(cluster, pod_ip, 7070)
            assert greeting == f"hello from {pod['metadata']['name']}/tcp"
        dev.close()

    run(scenario(), timeout=240)


PROBE = """
import os, sys, time, urllib.request
request = urllib.request.Request("http://{host}:{port}/through", headers={{"x-dev": "alice"}})
body = ""
for attempt in range(100):  # ACTIVE can come while the old pod (no agent) still serves
    try:
        body = urllib.request.urlopen(request, timeout=10).read().decode()
    except OSError as exc:  # refused or reset while the rollout swaps the endpoints
        body = repr(exc)
    if body.startswith("dev"):
        break
    time.sleep(0.2)
print(body)
print("GREETING=" + os.environ.get("GREETING", "?"))
print("ID=" + os.environ.get("TELEPRESENCE_INTERCEPT_ID", "?"))
"""


def test_intercept_command_gets_the_environment_and_reaches_the_developer(
    cluster: ClusterUnderTest, tmp_path: Path
) -> None:
    """The command after `--` runs with the container's environment; from inside the cluster's
    network it reaches the Service and gets the local process's answer; the intercept ends
    with it; a bad flag is one clear line and exit 2."""

    async def scenario() -> None:
        dev = await Upstream("dev").start()
        async with cluster.cluster.api() as api, scratch_namespace(api, "cli") as ns:
            container = echo_container(
                cluster, "http_echo", 8080, ports=[{"name": "http", "containerPort": 8080}]
            )
            container["env"].append({"name": "GREETING", "value": "hi"})
            await k8s.CoreV1Api(api).create_namespaced_service(
                ns, cast(Any, service("echo", [{"name": "http", "port": 80, "targetPort": "http"}]))
            )
            await k8s.AppsV1Api(api).create_namespaced_deployment(
                ns, cast(Any, deployment("echo", [container]))
            )
            svc = await k8s.CoreV1Api(api).read_namespaced_service("echo", ns)
            env_file = tmp_path / "echo.env"
            probe = PROBE.format(host=svc.spec.cluster_ip, port=80)
            cli = await cluster.tpcontrol(
                "intercept", "echo", "-n", ns, "--port", "http", "--to", str(dev.port),
                "--http-header", "x-dev=alice", "--env-file", str(env_file), "--wait", "90",
                "--", "nsenter", f"--net={cluster.network.path}", sys.executable, "-c", probe,
            )  # fmt: skip
            async with asyncio.timeout(150):
                out, err = await cli.communicate()
            text = out.decode()
            assert cli.returncode == 0, err.decode() + text
            assert "dev GET /through" in text  # reached the local process through the tunnel
            assert "GREETING=hi" in text  # the container's environment, prefix stripped
            assert "ID=?" not in text
            assert "ACTIVE" in text
            assert "left intercept" in text
            assert "GREETING='hi'\n" in env_file.read_text()  # quoted for sh
            assert env_file.stat().st_mode & 0o777 == 0o600

            body = await answers(
                cluster.network, svc.spec.cluster_ip, 80, "/after", **{"x-dev": "alice"}
            )
            assert body.startswith("served by"), body  # back to the app for everyone

            listed = await cluster.tpcontrol("list")
            out, err = await listed.communicate()
            assert listed.returncode == 0, err.decode()
            assert ns not in out.decode()  # left on exit: the manager has no intercept of it

            bad = await cluster.tpcontrol("intercept", "echo", "-n", ns, "--port", "nope")
            _, err = await bad.communicate()
            assert bad.returncode == 2
            assert err.decode().count("\n") == 1, err.decode()
            assert "has no interceptable port matching port nope" in err.decode()
        dev.close()

    run(scenario(), timeout=240)


async def first_line(cluster: ClusterUnderTest, host: str, port: int) -> str:
    """The first line a TCP server sends, retried (bounded) while routes settle."""
    from tpcontrol.localcluster.network import open_connection_in

    last = ""
    async with asyncio.timeout(30):
        while True:
            try:
                reader, writer = await open_connection_in(cluster.network, host, port)
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
