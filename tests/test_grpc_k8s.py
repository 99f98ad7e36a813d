"""A gRPC intercept by metadata on the real node: one gRPC channel from inside the cluster's
network to a Service whose app speaks gRPC (examples/grpc_echo.py); `tpcontrol intercept
--http-header x-dev=alice` sends the calls that carry `x-dev: alice` through the tunnel to a
developer's local grpcio server, and every other call on the same channel to the app."""

from __future__ import annotations

import asyncio
import sys
from typing import Any, cast

import pytest
from kubernetes_asyncio import client as k8s

from .cluster_helpers import ClusterUnderTest, has_agent, scratch_namespace, settled
from .grpc_helpers import SERVICE, GrpcServer
from .helpers import run
from .k8s_helpers import deployment, service, wait_for_pods
from .test_e2e_k8s import echo_container, intercept, leave, stop

pytestmark = pytest.mark.timeout(600)

# Run in the cluster's network namespace with this interpreter (grpcio is a test dependency):
# one channel, calls alternating between plain and x-dev: alice. A call is retried (bounded)
# while the rollout swaps the endpoints or the intercept settles; each line says who answered.
PROBE = """
import sys, time, grpc
channel = grpc.insecure_channel("{host}:{port}")
call = channel.unary_unary("{method}")
for i in range(8):
    metadata = (("x-dev", "alice"),) if i % 2 else ()
    for attempt in range(150):
        try:
            answer = call(b"m%d" % i, metadata=metadata, timeout=10).decode()
        except grpc.RpcError as exc:
            answer = "error " + str(exc.code())
        if not answer.startswith("error") and (answer.startswith("dev:") == bool(i % 2)):
            break
        time.sleep(0.2)
    print(i, answer, flush=True)
"""


def test_grpc_calls_on_one_channel_split_by_metadata_through_the_tunnel(
    cluster: ClusterUnderTest,
) -> None:
    async def scenario() -> None:
        dev = GrpcServer("dev").start()
        try:
            async with cluster.cluster.api() as api, scratch_namespace(api, "grpc") as ns:
                container = echo_container(
                    cluster, "grpc_echo", 50051,
                    ports=[{"name": "grpc", "containerPort": 50051}],
                    readinessProbe={"tcpSocket": {"port": "grpc"}, "periodSeconds": 1},
                )  # fmt: skip
                ports = [
                    {"name": "grpc", "port": 9000, "targetPort": "grpc", "appProtocol": "grpc"}
                ]
                svc = await k8s.CoreV1Api(api).create_namespaced_service(
                    ns, cast(Any, service("cart", ports))
                )
                await k8s.AppsV1Api(api).create_namespaced_deployment(
                    ns, cast(Any, deployment("cart", [container]))
                )
                await wait_for_pods(api, ns, "app=cart", 1, settled(agent=False))
                cli = await intercept(
                    cluster, ns, "cart", "--port", "grpc", "--to", str(dev.port),
                    "--http-header", "x-dev=alice",
                )  # fmt: skip
                try:
                    pods = await wait_for_pods(
                        api, ns, "app=cart", 1, settled(agent=True), within=90, count_live=True
                    )
                    (pod,) = [p for p in pods if has_agent(p)]
                    probe = PROBE.format(
                        host=svc.spec.cluster_ip, port=9000, method=SERVICE + "Unary"
                    )
                    proc = await asyncio.create_subprocess_exec(
                        "nsenter", f"--net={cluster.network.path}", sys.executable, "-c", probe,
                        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
                    )  # fmt: skip
                    async with asyncio.timeout(200):
                        out, err = await proc.communicate()
                    lines = out.decode().splitlines()
                    assert proc.returncode == 0, err.decode()[-2000:]
                    assert len(lines) == 8, out.decode() + err.decode()[-2000:]
                    name = pod["metadata"]["name"]
                    for i, line in enumerate(lines):
                        if i % 2:
                            assert line == f"{i} dev:m{i}", lines
                        else:
                            assert line == f"{i} served by {name}/grpc: {SERVICE}Unary m{i}", lines
                    assert "port grpc speaks HTTP/2 (appProtocol grpc): each call" in cli.text
                    assert dev.metadata
                    assert dev.metadata[-1]["x-dev"] == "alice"
                except BaseException:
                    await stop(cli)
                    raise
                await leave(cli)
        finally:
            dev.stop(None)

    run(scenario(), timeout=400)
