"""Helpers for tests on the local cluster (a real kubelet, containerd and kube-proxy): the
session's cluster with the product installed from deploy/, requests from inside the cluster's
network, `tpcontrol` as a developer runs it, and waiting on pods."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, cast

import pytest
from kubernetes_asyncio import client as k8s

from tpcontrol.localcluster.cluster import LocalCluster
from tpcontrol.localcluster.images import Images
from tpcontrol.localcluster.network import NodeNetwork, open_connection_in

from .k8s_helpers import make_namespace, unique

Json = dict[str, Any]


@dataclass
class ClusterUnderTest:
    """The session's cluster, the images it runs, and the product installed in it."""

    cluster: LocalCluster
    images: Images
    manager_namespace: str = "ambassador"

    @property
    def network(self) -> NodeNetwork:
        return self.cluster.network

    @property
    def env(self) -> dict[str, str]:
        """A developer's environment: the cluster's kubeconfig, nothing else special."""
        return {**os.environ, "KUBECONFIG": str(self.cluster.kubeconfig)}

    def tpcontrol(self, *args: str) -> Awaitable[asyncio.subprocess.Process]:
        """`python -m tpcontrol ARGS` as a developer runs it (the manager reached through a
        port-forward with the kubeconfig), its output captured."""
        return asyncio.create_subprocess_exec(
            sys.executable, "-m", "tpcontrol", *args, env=self.env,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip


@asynccontextmanager
async def scratch_namespace(api: k8s.ApiClient, prefix: str) -> AsyncIterator[str]:
    """A namespace of the session's cluster for one test, deleted after it (its pods then
    stop, so the node does not carry every earlier test's workloads)."""
    ns = await make_namespace(api, unique(prefix))
    try:
        yield ns
    finally:
        with contextlib.suppress(k8s.ApiException):
            await k8s.CoreV1Api(api).delete_namespace(ns)


def require_root() -> None:
    """Cluster tests create a network namespace and cgroups: root only. CI runs as root, so
    there they fail instead of skipping."""
    if os.geteuid() != 0:
        if os.environ.get("CI"):
            pytest.fail("the cluster tests need root (CI runs as root)")
        pytest.skip("the cluster tests need root (network namespace, cgroups)")


async def http_get(
    network: NodeNetwork, host: str, port: int, path: str = "/",
    headers: dict[str, str] | None = None,
) -> str:  # fmt: skip
    """One GET (Connection: close) from inside the cluster's network; returns the body."""
    reader, writer = await open_connection_in(network, host, port)
    extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
    writer.write(f"GET {path} HTTP/1.1\r\nHost: t\r\n{extra}Connection: close\r\n\r\n".encode())
    try:
        async with asyncio.timeout(10):
            response = await reader.read()
    finally:
        writer.close()
    head, _, body = response.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    return body.decode()


async def answers(
    network: NodeNetwork, host: str, port: int, path: str = "/", **headers: str
) -> str:
    """`http_get`, retried (bounded) while the far side is not there yet (kube-proxy programs
    a new endpoint a moment after its pod is ready)."""
    async with asyncio.timeout(30):
        while True:
            try:
                return await http_get(network, host, port, path, headers)
            except (OSError, AssertionError, EOFError):
                await asyncio.sleep(0.2)


def alive(pid: int) -> bool:
    """Whether a process still runs (a zombie, dead but not yet reaped, does not)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


async def wait_for_pod(
    api: k8s.ApiClient,
    namespace: str,
    name: str,
    until: Callable[[Json], bool],
    within: float = 60,
) -> Json:
    """The pod as the API server holds it, once `until(pod)` holds."""
    core = k8s.CoreV1Api(api)
    last: Json = {}
    try:
        async with asyncio.timeout(within):
            while True:
                try:
                    pod = await core.read_namespaced_pod(name, namespace)
                    last = cast(Json, api.sanitize_for_serialization(pod))
                    if until(last):
                        return last
                except k8s.ApiException as exc:
                    if exc.status != 404:
                        raise
                await asyncio.sleep(0.1)
    except TimeoutError:
        raise AssertionError(f"pod {namespace}/{name}: still {last.get('status')}") from None


def ready(pod: Json) -> bool:
    conditions = (pod.get("status") or {}).get("conditions") or []
    return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)


def has_agent(pod: Json) -> bool:
    return any(c["name"] == "traffic-agent" for c in pod["spec"]["containers"])


def settled(agent: bool) -> Callable[[list[Json]], bool]:
    """One pod serving, ready, with (or without) the agent; others only terminating."""

    def check(pods: list[Json]) -> bool:
        live = [p for p in pods if not p["metadata"].get("deletionTimestamp")]
        return len(live) == 1 and ready(live[0]) and has_agent(live[0]) == agent

    return check
