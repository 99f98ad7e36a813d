"""The local cluster is a real one: kubelet with containerd, kube-proxy and the scheduler, so pods
behave as on any cluster (CrashLoopBackOff instead of a stream of failed pods, kubectl exec,
Services through iptables, names through the cluster DNS), and a failing pod is explained in a
line or two."""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
from typing import Any, cast

import pytest
from kubernetes_asyncio import client as k8s

from tpcontrol.localcluster.diagnose import pods_trouble

from .cluster_helpers import ClusterUnderTest, Json, answers, ready, scratch_namespace, wait_for_pod
from .helpers import run
from .k8s_helpers import deployment, service, wait_for_pods
from .test_e2e_k8s import echo_container

# Cluster tests wait on kubelet and rollouts; the first one also pays for the session's
# cluster (images, start, install): a longer bound than the suite's default.
pytestmark = pytest.mark.timeout(600)


async def pod_python(
    cluster: ClusterUnderTest, ns: str, pod: str, code: str
) -> subprocess.CompletedProcess[str]:
    """`code` run by the examples image's python inside the pod (kubelet's exec stream)."""
    return await asyncio.to_thread(
        cluster.cluster.kubectl, "-n", ns, "exec", pod, "--", "/opt/examples/bin/python", "-c", code
    )


def test_the_node_is_kubelet_on_containerd(cluster: ClusterUnderTest) -> None:
    shown = cluster.cluster.kubectl("get", "nodes", "-o", "wide").stdout
    assert "containerd://1.6" in shown, shown
    node = json.loads(cluster.cluster.kubectl("get", "node", "-o", "json").stdout)["items"][0]
    info = node["status"]["nodeInfo"]
    assert info["kubeletVersion"] == "v1.20.2"
    assert info["kubeProxyVersion"] == "v1.20.2"
    images = {n for i in node["status"]["images"] for n in i.get("names") or []}
    assert cluster.images.product.ref in images  # imported with no registry
    assert cluster.images.examples.ref in images


def test_a_pod_runs_from_the_examples_image_with_exec_services_and_dns(
    cluster: ClusterUnderTest,
) -> None:
    async def scenario() -> None:
        async with cluster.cluster.api() as api, scratch_namespace(api, "pods") as ns:
            container = echo_container(
                cluster, "http_echo", 8080, ports=[{"name": "http", "containerPort": 8080}],
                readinessProbe={"httpGet": {"path": "/healthz", "port": "http"},
                                "periodSeconds": 1},
            )  # fmt: skip
            started = time.monotonic()
            await k8s.AppsV1Api(api).create_namespaced_deployment(
                ns, cast(Any, deployment("web", [container]))
            )
            svc = await k8s.CoreV1Api(api).create_namespaced_service(
                ns, cast(Any, service("web", [{"name": "http", "port": 80, "targetPort": "http"}]))
            )
            (pod,) = await wait_for_pods(api, ns, "app=web", 1, lambda ps: all(map(ready, ps)))
            print(f"create -> Ready: {time.monotonic() - started:.2f} s")
            name = pod["metadata"]["name"]
            # kube-proxy: the Service's cluster IP from the node's network.
            body = await answers(cluster.network, svc.spec.cluster_ip, 80, "/x")
            assert body.startswith(f"served by {name}/http on port 8080: GET /x"), body
            # kubelet's exec stream, and the cluster DNS from inside the pod.
            lookup = (
                "import socket; print(socket.gethostbyname('web'),"
                f" socket.gethostbyname('web.{ns}.svc.cluster.local'),"
                " socket.gethostbyname('kubernetes.default'))"
            )
            done = await pod_python(cluster, ns, name, lookup)
            ip = svc.spec.cluster_ip
            assert done.stdout.split() == [ip, ip, "10.96.0.1"], done.stdout + done.stderr
            # Nothing on the host is reachable from a pod, not even on the host's veth end.
            host = await asyncio.start_server(lambda r, w: w.close(), cluster.network.host_ip, 0)
            port = host.sockets[0].getsockname()[1]
            dial = (
                "import socket\ntry:\n"
                f"    socket.create_connection(('{cluster.network.host_ip}', {port}), timeout=5)\n"
                "    print('connected')\nexcept OSError as exc:\n    print(type(exc).__name__)"
            )
            done = await pod_python(cluster, ns, name, dial)
            host.close()
            assert done.stdout.strip() == "ConnectionRefusedError", done.stdout + done.stderr

    run(scenario(), timeout=120)


def test_a_container_that_cannot_start_crash_loops_in_one_pod(cluster: ClusterUnderTest) -> None:
    """Kubelet semantics, not an emulator's: the pod stays Running with its restarts counted and
    a back-off, the ReplicaSet makes no second pod, and the explanation names the cause."""

    async def scenario() -> None:
        async with cluster.cluster.api() as api, scratch_namespace(api, "crash") as ns:
            broken = {
                "name": "broken",
                "image": cluster.images.examples.ref,
                "command": ["/does/not/exist"],
            }
            await k8s.AppsV1Api(api).create_namespaced_deployment(
                ns, cast(Any, deployment("broken", [broken]))
            )
            (pod,) = await wait_for_pods(api, ns, "app=broken", 1)
            name = pod["metadata"]["name"]

            def looping(p: Json) -> bool:
                (status,) = (p.get("status") or {}).get("containerStatuses") or [{}]
                return int(status.get("restartCount", 0)) >= 2

            pod = await wait_for_pod(api, ns, name, looping, within=90)
            assert pod["status"]["phase"] == "Running", pod["status"]  # not Failed
            (status,) = pod["status"]["containerStatuses"]
            state = status["state"]
            reason = (state.get("waiting") or state.get("terminated") or {}).get("reason")
            assert reason in {"CrashLoopBackOff", "RunContainerError", "StartError"}, state
            listed = await k8s.CoreV1Api(api).list_namespaced_pod(ns)
            assert [p.metadata.name for p in listed.items] == [name]  # one pod, restarted
            events = await k8s.CoreV1Api(api).list_namespaced_event(ns)
            said = pods_trouble(
                [cast(Json, api.sanitize_for_serialization(pod))],
                [cast(Json, api.sanitize_for_serialization(e)) for e in events.items],
            )
            assert said.startswith(f"{name}: Running; container broken "), said
            assert "restarts" in said
            assert "/does/not/exist" in said, said
            assert said.count("\n") <= 1
            # The same, from the cluster's own helper, as the demo prints it.
            assert name in cluster.cluster.describe_pods(ns)

    run(scenario(), timeout=150)
