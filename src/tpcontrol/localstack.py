"""The traffic-manager, the agent-injector webhook and a node, on one machine's control plane.

This is what the Helm chart sets up on a real cluster, arranged for a local API server with no
container runtime: the manager and the webhook run on the host (127.0.0.1), the node runner runs
the pods, and the manager is reachable from pods the way the chart makes it reachable, as the
Service `traffic-manager.<namespace>`, here a Service without selector whose Endpoints are the
node's address (a host process, as with hostNetwork). The webhook is registered by URL, limited
to namespaces with a label when asked, and is only handed out once the API server calls it.
"""

from __future__ import annotations

import asyncio
import contextlib
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from kubernetes_asyncio import client as k8s

from tpcontrol.agentconfig import GeneratorSettings
from tpcontrol.manager import Manager, ManagerSettings
from tpcontrol.node.runner import NodeRunner, NodeSettings
from tpcontrol.webhook import (
    Injector,
    ReloadingTls,
    WebhookServer,
    WebhookSettings,
    self_signed,
    start,
    webhook_configuration,
)

AGENT_IMAGE = "docker.io/tpproxy/agent:0.1.0"


@dataclass
class Stack:
    manager: Manager
    manager_url: str
    webhook: WebhookServer
    node: NodeRunner
    manager_namespace: str


def admissions(server: WebhookServer) -> float:
    """How many admission requests the webhook has answered."""
    return sum(
        sample.value
        for metric in server.registry.collect()
        if metric.name == "tpcontrol_admission_requests"
        for sample in metric.samples
        if sample.name.endswith("_total")
    )


async def ensure_namespace(
    api: k8s.ApiClient, name: str, labels: dict[str, str] | None = None
) -> None:
    core = k8s.CoreV1Api(api)
    body = {"metadata": {"name": name, "labels": labels or {}}}
    try:
        await core.create_namespace(cast(Any, body))
    except k8s.ApiException as exc:
        if exc.status != 409:
            raise


async def publish_manager(
    api: k8s.ApiClient, namespace: str, node_ip: str, api_port: int, tunnel_port: int
) -> None:
    """`traffic-manager.<namespace>`: port 8081 is the API, the tunnel keeps its own number
    (the manager tells agents that number), both at the node's address."""
    core = k8s.CoreV1Api(api)
    ports = [
        {"name": "api", "port": 8081, "targetPort": api_port},
        {"name": "tunnel", "port": tunnel_port, "targetPort": tunnel_port},
    ]
    service = {"metadata": {"name": "traffic-manager"}, "spec": {"ports": ports}}
    endpoints = {
        "metadata": {"name": "traffic-manager"},
        "subsets": [
            {
                "addresses": [{"ip": node_ip}],
                "ports": [
                    {"name": "api", "port": api_port},
                    {"name": "tunnel", "port": tunnel_port},
                ],
            }
        ],
    }
    for delete in (core.delete_namespaced_service, core.delete_namespaced_endpoints):
        with contextlib.suppress(k8s.ApiException):
            await delete("traffic-manager", namespace)
    await core.create_namespaced_service(namespace, cast(Any, service))
    await core.create_namespaced_endpoints(namespace, cast(Any, endpoints))


async def until_webhook_called(
    api: k8s.ApiClient, server: WebhookServer, namespace: str, within: float = 30
) -> None:
    """Dry-run pods until the API server has called the webhook: it picks a new
    MutatingWebhookConfiguration up a moment after it is created."""
    core = k8s.CoreV1Api(api)
    probe = {
        "metadata": {"name": "webhook-probe"},
        "spec": {"containers": [{"name": "c", "image": "probe"}]},
    }
    async with asyncio.timeout(within):
        while admissions(server) == 0:
            await core.create_namespaced_pod(namespace, cast(Any, probe), dry_run="All")
            if admissions(server) == 0:
                await asyncio.sleep(0.1)


@asynccontextmanager
async def running_stack(
    api: k8s.ApiClient,
    *,
    probe_namespace: str,
    manager_namespace: str = "ambassador",
    agent_image: str = AGENT_IMAGE,
    agent_port: int = 9900,
    namespace_labels: dict[str, str] | None = None,
    node_name: str = "tpcontrol-node",
) -> AsyncIterator[Stack]:
    """Manager, node and webhook, running; `probe_namespace` must exist (the webhook is proved
    active there). With `namespace_labels`, the webhook and the node only act in namespaces that
    carry them, so that several stacks (tests) can share one API server."""
    labels = namespace_labels or {}
    await ensure_namespace(api, manager_namespace)
    manager = Manager(
        api,
        ManagerSettings(
            namespace=manager_namespace, agent_image=agent_image, agent_port=agent_port
        ),
    )
    manager_runner, manager_port = await manager.start("127.0.0.1", 0)
    registration = k8s.AdmissionregistrationV1Api(api)
    hook_name = f"agent-injector-{manager_namespace}"
    try:
        async with NodeRunner(
            api,
            NodeSettings(node_name=node_name, namespace_labels=labels, agent_images=(agent_image,)),
        ) as node:
            await publish_manager(
                api, manager_namespace, node.network.node_ip, manager_port, manager.tunnel_port
            )
            settings = WebhookSettings(
                GeneratorSettings(
                    agent_image=agent_image,
                    manager_namespace=manager_namespace,
                    agent_port=agent_port,
                )
            )
            server = WebhookServer(Injector(api, settings))
            with tempfile.TemporaryDirectory() as tmp:
                cert, key, ca = self_signed(Path(tmp), "127.0.0.1", ["localhost"])
                hook_runner, hook_port = await start(
                    server, "127.0.0.1", 0, ReloadingTls(cert, key)
                )
                config = webhook_configuration(
                    url=f"https://127.0.0.1:{hook_port}/traffic-agent",
                    ca_bundle=ca,
                    name=hook_name,
                    namespaces_excluded=(manager_namespace,),
                )
                if labels:
                    config["webhooks"][0]["namespaceSelector"] = {"matchLabels": labels}
                with contextlib.suppress(k8s.ApiException):
                    await registration.delete_mutating_webhook_configuration(hook_name)
                await registration.create_mutating_webhook_configuration(cast(Any, config))
                try:
                    await until_webhook_called(api, server, probe_namespace)
                    yield Stack(
                        manager=manager,
                        manager_url=f"http://127.0.0.1:{manager_port}",
                        webhook=server,
                        node=node,
                        manager_namespace=manager_namespace,
                    )
                finally:
                    with contextlib.suppress(k8s.ApiException):
                        await registration.delete_mutating_webhook_configuration(hook_name)
                    await hook_runner.cleanup()
    finally:
        await manager.stop()
        await manager_runner.cleanup()
