"""Faults on the real node, and how long the intercept takes to come back (printed; the
numbers in the README come from `pytest -s` of this file):

- the agent's process is killed in its container: kubelet restarts the container, the agent
  arrives at the manager again and the intercept is ACTIVE again, with no developer action;
- the manager's pod is deleted: its Deployment makes a new one, the agent and the developer's
  client (whose port-forward is started again on the same local ports) arrive again and the
  intercept is restored, while a steady loop of requests to the app sees no failed request.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import pytest
from kubernetes_asyncio import client as k8s

from tpcontrol.localcluster.network import NodeNetwork

from .cluster_helpers import (
    ClusterUnderTest,
    Json,
    answers,
    http_get,
    ready,
    scratch_namespace,
)
from .helpers import run
from .http_servers import Upstream
from .k8s_helpers import wait_for_pods
from .test_e2e_k8s import Cli, deploy_echo, intercept_alice, leave


async def until_reaches(network: NodeNetwork, ip: str, want: str, within: float) -> float:
    """Seconds until a request with `x-dev: alice` gets an answer starting with `want`."""
    started = time.monotonic()
    async with asyncio.timeout(within):
        while True:
            with contextlib.suppress(OSError, AssertionError, EOFError):
                body = await http_get(network, ip, 80, "/probe", {"x-dev": "alice"})
                if body.startswith(want):
                    return time.monotonic() - started
            await asyncio.sleep(0.1)


@dataclass
class Intercepted:
    api: k8s.ApiClient
    ns: str
    ip: str  # the Service's cluster IP
    pod: Json  # the pod with the agent
    cli: Cli  # the developer's `tpcontrol intercept`


@asynccontextmanager
async def alice_intercepts_echo(cluster: ClusterUnderTest) -> AsyncIterator[Intercepted]:
    """The echo workload, intercepted for `x-dev: alice` to a local server, once her requests
    reach it; left afterwards."""
    dev = await Upstream("dev").start()
    async with cluster.cluster.api() as api, scratch_namespace(api, "faults") as ns:
        ip, _ = await deploy_echo(cluster, api, ns)
        cli, pod = await intercept_alice(cluster, api, ns, dev.port)
        try:
            await until_reaches(cluster.network, ip, "dev GET", within=30)
            yield Intercepted(api, ns, ip, pod, cli)
        finally:
            if cli.returncode is None:
                await leave(cli)
    dev.close()


# Cluster tests wait on kubelet and rollouts; the first one also pays for the session's
# cluster (images, start, install): a longer bound than the suite's default.
pytestmark = pytest.mark.timeout(600)


def test_a_killed_agent_is_restarted_by_kubelet_and_the_intercept_comes_back(
    cluster: ClusterUnderTest,
) -> None:
    async def scenario() -> None:
        async with alice_intercepts_echo(cluster) as it:
            pod = it.pod
            agent = next(
                s for s in pod["status"]["containerStatuses"] if s["name"] == "traffic-agent"
            )
            pid = cluster.cluster.container_pid(agent["containerID"])
            assert pid is not None
            os.kill(pid, signal.SIGKILL)
            killed = time.monotonic()

            def restarted(found: list[Json]) -> bool:
                statuses = {
                    s["name"]: s
                    for p in found if p["metadata"]["name"] == pod["metadata"]["name"]
                    for s in p["status"]["containerStatuses"]
                }  # fmt: skip
                agent = statuses.get("traffic-agent") or {}
                return bool(agent.get("restartCount") == 1 and agent.get("ready"))

            await wait_for_pods(it.api, it.ns, "app=echo", 1, restarted, within=60,
                                count_live=True)  # fmt: skip
            back = await until_reaches(cluster.network, it.ip, "dev GET", within=60)
            print(f"agent killed -> intercept serving again: {time.monotonic() - killed:.1f} s"
                  f" (the last {back:.1f} s after kubelet had it ready)")  # fmt: skip
            plain = await answers(cluster.network, it.ip, 80, "/plain")
            assert plain.startswith(f"served by {pod['metadata']['name']}/http"), plain

    run(scenario(), timeout=300)


def test_a_deleted_manager_pod_is_replaced_and_intercepts_are_restored_without_app_errors(
    cluster: ClusterUnderTest,
) -> None:
    async def scenario() -> None:
        async with alice_intercepts_echo(cluster) as it:
            failures: list[str] = []
            served = 0
            stop = asyncio.Event()

            async def steady() -> None:
                """Requests to the app, one every 20 ms, each on a new connection."""
                nonlocal served
                while not stop.is_set():
                    try:
                        body = await http_get(cluster.network, it.ip, 80, "/steady")
                        if body.startswith("served by"):
                            served += 1
                        else:
                            failures.append(body)
                    except (OSError, AssertionError, EOFError) as exc:
                        failures.append(repr(exc))
                    await asyncio.sleep(0.02)

            # Count only once the rollout is over: the pod without the agent is gone.
            await wait_for_pods(it.api, it.ns, "app=echo", 1, within=90)
            loop = asyncio.create_task(steady())
            try:
                core = k8s.CoreV1Api(it.api)
                ns = cluster.manager_namespace
                (old,) = (
                    await core.list_namespaced_pod(ns, label_selector="app=traffic-manager")
                ).items
                await core.delete_namespaced_pod(old.metadata.name, ns)
                deleted = time.monotonic()

                def replaced(pods: list[Json]) -> bool:  # the old one is gone, a new one ready
                    return pods[0]["metadata"]["name"] != old.metadata.name and ready(pods[0])

                await wait_for_pods(it.api, ns, "app=traffic-manager", 1, replaced, within=120)
                gone = time.monotonic() - deleted
                back = await until_reaches(cluster.network, it.ip, "dev GET", within=120)
                print(f"manager pod deleted -> old pod gone, new one ready: {gone:.1f} s; "
                      f"intercept restored {back:.1f} s later")  # fmt: skip
                # The developer did nothing: the client found the manager again by itself.
                assert "intercepting again" in it.cli.text, it.cli.text
                assert "created again" in it.cli.text, it.cli.text
            finally:
                stop.set()
                await loop
            assert failures == [], failures[:5]
            assert served > 10 * (time.monotonic() - deleted) / 2  # it really ran

    run(scenario(), timeout=300)
