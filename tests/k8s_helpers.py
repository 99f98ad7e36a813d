"""Helpers for tests on the real API server: namespaces, a registered webhook, waiting on pods."""

from __future__ import annotations

import asyncio
import itertools
import tempfile
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, cast

from kubernetes_asyncio import client as k8s

from tpcontrol.injector.webhook import (
    Injector,
    ReloadingTls,
    WebhookServer,
    WebhookSettings,
    self_signed,
    start,
    webhook_configuration,
)
from tpcontrol.kube.agentconfig import GeneratorSettings
from tpcontrol.localcluster import wait_for_service_account

Json = dict[str, Any]
_names = itertools.count(1)
LABEL = "tpcontrol-test"
IMAGE = "docker.io/tpproxy/agent:test"


def unique(prefix: str) -> str:
    return f"{prefix}-{next(_names)}"


async def make_namespace(api: k8s.ApiClient, name: str) -> str:
    """A namespace labelled for the test's webhook, ready to accept pods."""
    core = k8s.CoreV1Api(api)
    await core.create_namespace(cast(Any, {"metadata": {"name": name, "labels": {LABEL: name}}}))
    await wait_for_service_account(api, name)
    return name


def admissions(server: WebhookServer) -> float:
    """How many admission requests the webhook has answered."""
    return sum(
        sample.value
        for metric in server.registry.collect()
        if metric.name == "tpcontrol_admission_requests"
        for sample in metric.samples
        if sample.name.endswith("_total")
    )


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
async def running_webhook(
    api: k8s.ApiClient, namespace: str, settings: WebhookSettings | None = None
) -> AsyncIterator[WebhookServer]:
    """The webhook serving on loopback, registered for `namespace` only, active when yielded.

    Active means the API server has called it: a dry-run pod is created until it is seen, so
    no test races the API server's pick-up of a new MutatingWebhookConfiguration.
    """
    settings = settings or WebhookSettings(GeneratorSettings(agent_image=IMAGE))
    server = WebhookServer(Injector(api, settings))
    with tempfile.TemporaryDirectory() as tmp:
        cert, key, ca = self_signed(Path(tmp), "127.0.0.1", ["localhost"])
        runner, port = await start(server, "127.0.0.1", 0, ReloadingTls(cert, key))
        config = webhook_configuration(
            url=f"https://127.0.0.1:{port}/traffic-agent",
            ca_bundle=ca,
            name=f"injector-{namespace}",
        )
        config["webhooks"][0]["namespaceSelector"] = {"matchLabels": {LABEL: namespace}}
        registration = k8s.AdmissionregistrationV1Api(api)
        await registration.create_mutating_webhook_configuration(cast(Any, config))
        try:
            await until_webhook_called(api, server, namespace)
            yield server
        finally:
            await registration.delete_mutating_webhook_configuration(f"injector-{namespace}")
            await runner.cleanup()


async def wait_for_pods(
    api: k8s.ApiClient,
    namespace: str,
    selector: str,
    count: int,
    ready: Callable[[list[Json]], bool] = lambda pods: True,
    within: float = 60,
    count_live: bool = False,
) -> list[Json]:
    """The namespace's pods matching `selector` once there are `count` and `ready(pods)` holds.
    With `count_live`, only pods not being deleted are counted (kubelet confirms a deletion
    seconds after the pod's containers have stopped), but all are returned."""
    core = k8s.CoreV1Api(api)
    async with asyncio.timeout(within):
        while True:
            listed = await core.list_namespaced_pod(namespace, label_selector=selector)
            pods: list[Json] = [api.sanitize_for_serialization(p) for p in listed.items]
            counted = [
                p for p in pods if not (count_live and p["metadata"].get("deletionTimestamp"))
            ]
            if len(counted) == count and ready(pods):
                return pods
            await asyncio.sleep(0.1)


def deployment(
    name: str,
    containers: list[Json],
    *,
    replicas: int = 1,
    annotations: dict[str, str] | None = None,
    kind: str = "Deployment",
) -> Json:
    """A Deployment (or StatefulSet) whose pods are labelled app=<name>."""
    template: Json = {"metadata": {"labels": {"app": name}}, "spec": {"containers": containers}}
    if annotations:
        template["metadata"]["annotations"] = annotations
    spec: Json = {
        "replicas": replicas,
        "selector": {"matchLabels": {"app": name}},
        "template": template,
    }
    if kind == "StatefulSet":
        spec["serviceName"] = name
    return {"apiVersion": "apps/v1", "kind": kind, "metadata": {"name": name}, "spec": spec}


def service(name: str, ports: list[Json], selector: str | None = None) -> Json:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name},
        "spec": {"selector": {"app": selector or name}, "ports": ports},
    }
