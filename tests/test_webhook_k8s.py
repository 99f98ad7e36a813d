"""The agent injector on a real API server: pods created by the controller-manager get the agent."""

from __future__ import annotations

import asyncio
import json
from typing import Any, cast

import pytest
from kubernetes_asyncio import client as k8s

from tpcontrol.kube.agentconfig import GeneratorSettings, generate
from tpcontrol.kube.configmap import CONFIGMAP_NAME, AgentConfigStore
from tpcontrol.kube.workloads import Workloads
from tpcontrol.localcluster import LocalControlPlane

from .helpers import run
from .k8s_helpers import (
    IMAGE,
    deployment,
    make_namespace,
    running_webhook,
    service,
    unique,
    wait_for_pods,
)

Json = dict[str, Any]
ANNOTATION = "telepresence.getambassador.io/inject-traffic-agent"

ECHO_CONTAINER: Json = {
    "name": "echo",
    "image": "example/echo",
    "ports": [{"name": "http", "containerPort": 8080}, {"containerPort": 8081}],
    "env": [{"name": "GREETING", "value": "hi"}],
    "readinessProbe": {"httpGet": {"path": "/ready", "port": "http"}},
    "livenessProbe": {"tcpSocket": {"port": 8081}},
}
ECHO_PORTS: list[Json] = [
    {"name": "http", "port": 80, "targetPort": "http"},
    {"name": "grpc", "port": 81, "targetPort": 8081},
]


def containers_by_name(pod: Json) -> dict[str, Json]:
    return {c["name"]: c for c in pod["spec"]["containers"]}


def injected(pod: Json) -> bool:
    return "traffic-agent" in containers_by_name(pod)


async def store_entry(api: k8s.ApiClient, namespace: str, workload: Json) -> None:
    """What the manager does on PrepareIntercept: generate the entry and store it."""
    workload = {**workload, "metadata": {**workload["metadata"], "namespace": namespace}}
    services = await Workloads(api).services(namespace)
    sidecar = generate(workload, services, GeneratorSettings(agent_image=IMAGE))
    assert await AgentConfigStore(api).put(sidecar)


async def create(api: k8s.ApiClient, namespace: str, *objects: Json) -> None:
    apps, core = k8s.AppsV1Api(api), k8s.CoreV1Api(api)
    for obj in objects:
        if obj["kind"] == "Service":
            await core.create_namespaced_service(namespace, cast(Any, obj))
        elif obj["kind"] == "Deployment":
            await apps.create_namespaced_deployment(namespace, cast(Any, obj))
        elif obj["kind"] == "StatefulSet":
            await apps.create_namespaced_stateful_set(namespace, cast(Any, obj))


def assert_echo_pod_injected(pod: Json, agent_name: str) -> None:
    containers = containers_by_name(pod)
    agent, app = containers["traffic-agent"], containers["echo"]
    assert agent["image"] == IMAGE
    assert agent["args"] == ["agent"]
    assert [(p.get("name"), p["containerPort"], p["protocol"]) for p in agent["ports"]] == [
        ("http", 9900, "TCP"),
        (None, 9901, "TCP"),
    ]
    env = {e["name"]: e for e in agent["env"]}
    assert env["_TEL_APP_A_GREETING"]["value"] == "hi"
    assert env["_TEL_AGENT_POD_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
    mounts = {m["name"]: m["mountPath"] for m in agent["volumeMounts"]}
    assert mounts["traffic-annotations"] == "/tel_pod_info"
    assert mounts["traffic-config"] == "/etc/traffic-agent"
    assert mounts["export-volume"] == "/tel_app_exports"
    # The app's named port is taken over by the agent; its probe follows the rename.
    assert [p.get("name") for p in app["ports"]] == ["tm-http", None]
    assert app["readinessProbe"]["httpGet"]["port"] == "tm-http"
    assert app["livenessProbe"]["tcpSocket"]["port"] == 8081  # numeric probes keep the app port
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    assert volumes["traffic-config"]["configMap"]["name"] == CONFIGMAP_NAME
    assert volumes["traffic-config"]["configMap"]["items"] == [
        {"key": agent_name, "path": "config.yaml"}
    ]
    assert volumes["traffic-annotations"]["downwardAPI"]["items"][0]["fieldRef"]["fieldPath"] == (
        "metadata.annotations"
    )
    assert "emptyDir" in volumes["export-volume"]
    # A numeric targetPort (grpc 81 -> 8081) needs the iptables init container.
    (init,) = pod["spec"]["initContainers"]
    assert init["name"] == "tel-agent-init"
    assert init["args"] == ["agent-init"]
    assert init["securityContext"]["capabilities"]["add"] == ["NET_ADMIN"]
    assert pod["metadata"]["annotations"][ANNOTATION] == "enabled"


def test_deployment_and_statefulset_pods_get_the_agent(control_plane: LocalControlPlane) -> None:
    async def scenario() -> None:
        async with control_plane.api() as api:
            ns = await make_namespace(api, unique("inject"))
            async with running_webhook(api, ns):
                echo = deployment("echo", [ECHO_CONTAINER], replicas=2)
                await create(api, ns, service("echo", ECHO_PORTS))
                await store_entry(api, ns, echo)
                await create(api, ns, echo)
                pods = await wait_for_pods(api, ns, "app=echo", 2)
                for pod in pods:
                    assert_echo_pod_injected(pod, "echo")

                # A StatefulSet's pods are found through their direct controller.
                db = deployment("db", [{**ECHO_CONTAINER}], kind="StatefulSet")
                await create(api, ns, service("db", ECHO_PORTS))
                await store_entry(api, ns, db)
                await create(api, ns, db)
                (pod,) = await wait_for_pods(api, ns, "app=db", 1)
                assert_echo_pod_injected(pod, "db")

                # No entry: untouched.
                plain = deployment("plain", [{**ECHO_CONTAINER}])
                await create(api, ns, service("plain", ECHO_PORTS), plain)
                (pod,) = await wait_for_pods(api, ns, "app=plain", 1)
                assert not injected(pod)
                assert "initContainers" not in pod["spec"]
                assert [p.get("name") for p in containers_by_name(pod)["echo"]["ports"]] == [
                    "http",
                    None,
                ]

    run(scenario(), timeout=120)


def test_pod_whose_config_cannot_be_generated_is_admitted_with_a_warning(
    control_plane: LocalControlPlane,
) -> None:
    async def scenario() -> None:
        async with control_plane.api() as api:
            ns = await make_namespace(api, unique("warn"))
            async with running_webhook(api, ns):
                lonely = deployment("lonely", [ECHO_CONTAINER], annotations={ANNOTATION: "enabled"})
                await create(api, ns, lonely)  # no Service selects it
                (pod,) = await wait_for_pods(api, ns, "app=lonely", 1)
                assert not injected(pod)
                owner = await k8s.AppsV1Api(api).read_namespaced_deployment("lonely", ns)

                # Created directly, the warning reaches the client that created the pod.
                core = k8s.CoreV1Api(api)
                raw: Json = {
                    "metadata": {
                        "name": "direct",
                        "labels": {"app": "direct"},
                        "annotations": {ANNOTATION: "enabled"},
                        "ownerReferences": [
                            {
                                "apiVersion": "apps/v1",
                                "kind": "Deployment",
                                "name": "lonely",
                                "uid": owner.metadata.uid,
                                "controller": True,
                            }
                        ],
                    },
                    "spec": {"containers": [ECHO_CONTAINER]},
                }
                response: Any = await core.create_namespaced_pod(
                    ns, cast(Any, raw), _preload_content=False
                )
                warning = response.headers.get("Warning", "")
                created = json.loads(await response.read())
                assert response.status == 201
                assert "traffic-agent not injected" in warning
                assert "lonely" in warning
                assert [c["name"] for c in created["spec"]["containers"]] == ["echo"]

                bad = {
                    **raw,
                    "metadata": {
                        **raw["metadata"],
                        "name": "bad-annotation",
                        "annotations": {ANNOTATION: "yes-please"},
                    },
                }
                response = await core.create_namespaced_pod(
                    ns, cast(Any, bad), _preload_content=False
                )
                assert response.status == 201
                assert "invalid value 'yes-please'" in response.headers.get("Warning", "")

    run(scenario(), timeout=120)


@pytest.mark.slow
def test_fifty_pods_at_once_are_all_injected(control_plane: LocalControlPlane) -> None:
    async def scenario() -> None:
        async with control_plane.api() as api:
            ns = await make_namespace(api, unique("many"))
            async with running_webhook(api, ns):
                many = deployment("many", [ECHO_CONTAINER], replicas=50)
                await create(api, ns, service("many", ECHO_PORTS))
                await store_entry(api, ns, many)
                await create(api, ns, many)
                pods = await wait_for_pods(api, ns, "app=many", 50, within=120)
                for pod in pods:
                    assert_echo_pod_injected(pod, "many")

    run(scenario(), timeout=180)


def test_entries_are_written_with_optimistic_concurrency(control_plane: LocalControlPlane) -> None:
    """Twenty writers on one ConfigMap at once: every entry lands, none is lost."""

    async def scenario() -> None:
        async with control_plane.api() as api:
            ns = await make_namespace(api, unique("store"))
            store = AgentConfigStore(api)
            from tpproxy.config import Sidecar

            sidecars = [
                Sidecar(
                    agent_name=f"wl{i}",
                    namespace=ns,
                    workload_name=f"wl{i}",
                    workload_kind="Deployment",
                )
                for i in range(20)
            ]
            assert all(await asyncio.gather(*(store.put(s) for s in sidecars)))
            entries = await store.entries(ns)
            assert sorted(entries) == sorted(f"wl{i}" for i in range(20))
            assert entries["wl3"] == sidecars[3]
            assert not await store.put(sidecars[3])  # identical: no write
            assert await store.delete(ns, "wl3")
            assert not await store.delete(ns, "wl3")
            assert "wl3" not in await store.entries(ns)

    run(scenario(), timeout=60)


def test_inject_policies_and_opt_out_annotations(control_plane: LocalControlPlane) -> None:
    """OnDemand: an entry (or `enabled`) injects, `disabled`/`false` never do. WhenEnabled: only
    pods annotated `enabled` are injected, and their entry is generated and stored on the way."""

    async def scenario() -> None:
        from tpcontrol.injector.webhook import WebhookSettings

        async with control_plane.api() as api:
            ns = await make_namespace(api, unique("policy"))
            optout = deployment("optout", [ECHO_CONTAINER], annotations={ANNOTATION: "disabled"})
            await create(api, ns, service("optout", ECHO_PORTS))
            await store_entry(api, ns, optout)
            async with running_webhook(api, ns):
                await create(api, ns, optout)
                (pod,) = await wait_for_pods(api, ns, "app=optout", 1)
                assert not injected(pod)  # an entry exists, but the template opts out

            when_enabled = WebhookSettings(
                GeneratorSettings(agent_image=IMAGE), inject_policy="WhenEnabled"
            )
            async with running_webhook(api, ns, when_enabled):
                has_entry = deployment("has-entry", [ECHO_CONTAINER])
                await create(api, ns, service("has-entry", ECHO_PORTS))
                await store_entry(api, ns, has_entry)
                await create(api, ns, has_entry)
                (pod,) = await wait_for_pods(api, ns, "app=has-entry", 1)
                assert not injected(pod)  # WhenEnabled: an entry alone is not enough

                asked = deployment("asked", [ECHO_CONTAINER], annotations={ANNOTATION: "enabled"})
                await create(api, ns, service("asked", ECHO_PORTS), asked)
                (pod,) = await wait_for_pods(api, ns, "app=asked", 1)
                assert_echo_pod_injected(pod, "asked")
                entry = await AgentConfigStore(api).get(ns, "asked")
                assert entry is not None
                assert entry.workload_kind == "Deployment"

    run(scenario(), timeout=120)
