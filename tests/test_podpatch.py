"""The agent-injection JSON Patch (spec §3.6): exact operations, and convergence on re-processing.

Every produced patch is applied with `jsonpatch` (which, unlike Go's library, rejects `replace` of
a missing key), and the patched pod is processed again, which must yield `[]`.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import jsonpatch
import pytest

from tpcontrol.injector.podpatch import (
    INJECT_ANNOTATION,
    PatchError,
    agent_container,
    hidden_port_name,
    init_container,
    pod_patch,
)
from tpproxy.config import Container, Intercept, Sidecar, load_sidecar

Json = dict[str, Any]

DATA = Path(__file__).parent / "data"
IMAGE = "docker.io/datawire/tel2:2.6.8"
TOKEN_PATH = "/var/run/secrets/kubernetes.io/serviceaccount"

POD_IP_ENV = {
    "name": "_TEL_AGENT_POD_IP",
    "valueFrom": {"fieldRef": {"apiVersion": "v1", "fieldPath": "status.podIP"}},
}
AGENT_NAME_ENV = {
    "name": "_TEL_AGENT_NAME",
    "valueFrom": {"fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.name"}},
}
AGENT_OWN_MOUNTS = [
    {"name": "traffic-annotations", "mountPath": "/tel_pod_info"},
    {"name": "traffic-config", "mountPath": "/etc/traffic-agent"},
    {"name": "export-volume", "mountPath": "/tel_app_exports"},
    {
        "name": "traffic-manager-token",
        "mountPath": "/var/run/secrets/tpproxy/manager",
        "readOnly": True,
    },
]
READINESS = {"exec": {"command": ["/bin/stat", "/tmp/agent/ready"]}}
# The agent's liveness probe (its event loop answers), its confinement and its resources.
AGENT_EXTRAS = {
    "livenessProbe": {
        "httpGet": {"path": "/livez", "port": 9180},
        "periodSeconds": 10,
        "timeoutSeconds": 3,
        "failureThreshold": 3,
    },
    "securityContext": {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}},
    "resources": {"requests": {"cpu": "10m", "memory": "48Mi"}, "limits": {"memory": "256Mi"}},
}
INIT = {
    "name": "tel-agent-init",
    "image": IMAGE,
    "args": ["agent-init"],
    "volumeMounts": [{"name": "traffic-config", "mountPath": "/etc/traffic-agent"}],
    "securityContext": {"capabilities": {"add": ["NET_ADMIN"]}},
}


def agent_volumes(agent_name: str = "echo") -> list[Json]:
    return [
        {
            "name": "traffic-annotations",
            "downwardAPI": {
                "items": [
                    {
                        "path": "annotations",
                        "fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.annotations"},
                    }
                ]
            },
        },
        {
            "name": "traffic-config",
            "configMap": {
                "name": "telepresence-agents",
                "items": [{"key": agent_name, "path": "config.yaml"}],
            },
        },
        {"name": "export-volume", "emptyDir": {}},
        {
            "name": "traffic-manager-token",
            "projected": {
                "sources": [
                    {
                        "serviceAccountToken": {
                            "audience": "traffic-manager",
                            "expirationSeconds": 3600,
                            "path": "token",
                        }
                    }
                ]
            },
        },
    ]


# --- builders -----------------------------------------------------------------------------------


def icept(
    port_name: str = "http",
    *,
    port: int = 8080,
    agent: int = 9900,
    numeric: bool = False,
    headless: bool = False,
    protocol: str = "TCP",
) -> Intercept:
    return Intercept(
        container_port_name=port_name,
        service_name="echo",
        service_uid="aaa-111",
        service_port_name=port_name,
        target_port_numeric=numeric,
        headless=headless,
        protocol="UDP" if protocol == "UDP" else "TCP",
        container_port=port,
        service_port=80,
        agent_port=agent,
    )


def config(name: str, *intercepts: Intercept, prefix: str = "A_") -> Container:
    return Container(
        name=name,
        intercepts=intercepts,
        env_prefix=prefix,
        mount_point=f"/tel_app_mounts/{name}",
    )


def sidecar(*containers: Container, api_port: int = 0, image: str = IMAGE) -> Sidecar:
    return Sidecar(
        agent_image=image,
        agent_name="echo",
        namespace="default",
        log_level="info",
        workload_name="echo",
        workload_kind="Deployment",
        manager_host="traffic-manager.ambassador",
        manager_port=8081,
        api_port=api_port,
        containers=containers,
    )


def port(number: int, name: str = "", protocol: str = "TCP") -> Json:
    found: Json = {"name": name} if name else {}
    return found | {"containerPort": number, "protocol": protocol}


def app(name: str, *ports: Json, **fields: Any) -> Json:
    container: Json = {"name": name, "image": f"example/{name}:1"}
    if ports:
        container["ports"] = list(ports)
    return container | fields


def make_pod(
    *containers: Json,
    annotations: dict[str, str] | None = None,
    volumes: list[Json] | None = None,
    init: list[Json] | None = None,
    name: str = "echo-7d9f-abcde",
) -> Json:
    metadata: Json = {"name": name, "namespace": "default"}
    if annotations is not None:
        metadata["annotations"] = annotations
    spec: Json = {"containers": list(containers)}
    if init is not None:
        spec["initContainers"] = init
    if volumes is not None:
        spec["volumes"] = volumes
    return {"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": spec}


def token_volume(name: str) -> Json:
    if name.startswith("kube-api-access-"):
        return {
            "name": name,
            "projected": {"sources": [{"serviceAccountToken": {"path": "token"}}]},
        }
    return {"name": name, "secret": {"secretName": name}}


def token_mount(name: str) -> Json:
    return {"name": name, "readOnly": True, "mountPath": TOKEN_PATH}


def apply(pod: Json, ops: list[Json]) -> Json:
    patched: Json = jsonpatch.apply_patch(pod, ops)
    return patched


def inject(pod: Json, sc: Sidecar, command: list[str] | None = None) -> tuple[list[Json], Json]:
    """The patch for `pod`, and the patched pod, which must need no further patch."""
    original = copy.deepcopy(pod)
    ops = pod_patch(pod, sc, agent_command=command)
    assert pod == original, "pod_patch must not modify its input"
    patched = apply(pod, ops)
    assert pod_patch(patched, sc, agent_command=command) == []
    return ops, patched


def containers_of(pod: Json) -> dict[str, Json]:
    return {c["name"]: c for c in pod["spec"]["containers"]}


def op_paths(ops: list[Json]) -> list[tuple[str, str]]:
    return [(op["op"], op["path"]) for op in ops]


def with_api_server_defaults(container: Json) -> Json:
    """What the API server adds to a container it stores (defaulting, LimitRanger)."""
    defaulted = copy.deepcopy(container)
    defaulted |= {
        "imagePullPolicy": "IfNotPresent",
        "resources": {"limits": {"cpu": "100m"}},
        "terminationMessagePath": "/dev/termination-log",
        "terminationMessagePolicy": "File",
    }
    for probe in ("readinessProbe", "livenessProbe"):
        if probe in defaulted:
            defaulted[probe] |= {"timeoutSeconds": 1, "periodSeconds": 10, "failureThreshold": 3}
    return defaulted


# --- the spec's worked examples -----------------------------------------------------------------


def test_worked_example_named_port_gives_the_exact_operations() -> None:
    pod = make_pod(
        app(
            "some-container", port(8888, "http"), env=[{"name": "SOME_NAME", "value": "some-value"}]
        ),
        name="named-port",
        annotations={INJECT_ANNOTATION: "enabled"},
    )
    sc = sidecar(config("some-container", icept("http", port=8888, agent=9900)))

    ops, patched = inject(pod, sc)

    assert ops == [
        {
            "op": "add",
            "path": "/spec/containers/-",
            "value": {
                "name": "traffic-agent",
                "image": IMAGE,
                "args": ["agent"],
                "ports": [{"name": "http", "containerPort": 9900, "protocol": "TCP"}],
                "env": [
                    {"name": "_TEL_APP_A_SOME_NAME", "value": "some-value"},
                    POD_IP_ENV,
                    AGENT_NAME_ENV,
                ],
                "volumeMounts": AGENT_OWN_MOUNTS,
                "readinessProbe": READINESS,
                **AGENT_EXTRAS,
            },
        },
        {"op": "add", "path": "/spec/volumes", "value": agent_volumes()},
        {"op": "replace", "path": "/spec/containers/0/ports/0/name", "value": "tm-http"},
    ]
    assert containers_of(patched)["some-container"]["ports"] == [port(8888, "tm-http")]


def test_worked_example_numeric_port_gives_the_exact_operations() -> None:
    pod = make_pod(
        app("some-container", port(8888), env=[{"name": "SOME_NAME", "value": "some-value"}]),
        name="numeric-port",
        annotations={INJECT_ANNOTATION: "enabled"},
    )
    sc = sidecar(config("some-container", icept("", port=8888, agent=9900, numeric=True)))

    ops, patched = inject(pod, sc)

    assert ops == [
        {"op": "add", "path": "/spec/initContainers", "value": [INIT]},
        {
            "op": "add",
            "path": "/spec/containers/-",
            "value": {
                "name": "traffic-agent",
                "image": IMAGE,
                "args": ["agent"],
                "ports": [{"containerPort": 9900, "protocol": "TCP"}],
                "env": [
                    {"name": "_TEL_APP_A_SOME_NAME", "value": "some-value"},
                    POD_IP_ENV,
                    AGENT_NAME_ENV,
                ],
                "volumeMounts": AGENT_OWN_MOUNTS,
                "readinessProbe": READINESS,
                **AGENT_EXTRAS,
            },
        },
        {"op": "add", "path": "/spec/volumes", "value": agent_volumes()},
    ]
    assert containers_of(patched)["some-container"]["ports"] == [port(8888)]


def echo_pod() -> Json:
    """The pod of the §1.5 example, as the API server sends it (token volume included)."""
    return make_pod(
        app(
            "echo",
            port(8080, "http"),
            port(8081),
            volumeMounts=[
                {"name": "config", "mountPath": "/config"},
                token_mount("kube-api-access-x7k2p"),
            ],
        ),
        volumes=[
            {"name": "config", "configMap": {"name": "echo"}},
            token_volume("kube-api-access-x7k2p"),
        ],
    )


def test_section_1_5_example_injects_init_container_two_agent_ports_and_one_rename() -> None:
    sc = load_sidecar(DATA / "echo-agent.yaml")

    ops, patched = inject(echo_pod(), sc)

    assert op_paths(ops) == [
        ("add", "/spec/initContainers"),
        ("add", "/spec/containers/-"),
        ("add", "/spec/volumes/-"),
        ("add", "/spec/volumes/-"),
        ("add", "/spec/volumes/-"),
        ("add", "/spec/volumes/-"),
        ("replace", "/spec/containers/0/ports/0/name"),
        ("add", "/metadata/annotations"),
    ]
    agent = containers_of(patched)["traffic-agent"]
    assert agent["ports"] == [
        {"name": "http", "containerPort": 9900, "protocol": "TCP"},
        {"containerPort": 9901, "protocol": "TCP"},
    ]
    assert agent["volumeMounts"] == [
        {"name": "config", "mountPath": "/tel_app_mounts/echo/config"},
        token_mount("kube-api-access-x7k2p"),
        *AGENT_OWN_MOUNTS,
    ]
    assert containers_of(patched)["echo"]["ports"] == [port(8080, "tm-http"), port(8081)]
    assert patched["spec"]["initContainers"] == [INIT]
    assert [v["name"] for v in patched["spec"]["volumes"]] == [
        "config",
        "kube-api-access-x7k2p",
        "traffic-annotations",
        "traffic-config",
        "export-volume",
        "traffic-manager-token",
    ]
    assert patched["metadata"]["annotations"] == {INJECT_ANNOTATION: "enabled"}


# --- d: hidden ports and probes -----------------------------------------------------------------


def test_probes_naming_the_port_follow_the_rename_and_numeric_probes_do_not() -> None:
    pod = make_pod(
        app(
            "echo",
            port(8080, "http"),
            port(8090, "admin"),
            livenessProbe={"httpGet": {"path": "/healthz", "port": "http"}},
            readinessProbe={"tcpSocket": {"port": "http"}},
            startupProbe={"httpGet": {"path": "/started", "port": 8080}},
        ),
        annotations={INJECT_ANNOTATION: "enabled"},
    )
    sc = sidecar(config("echo", icept("http", port=8080)))

    ops, patched = inject(pod, sc)

    assert [op for op in ops if op["op"] == "replace"] == [
        {"op": "replace", "path": "/spec/containers/0/ports/0/name", "value": "tm-http"},
        {
            "op": "replace",
            "path": "/spec/containers/0/livenessProbe/httpGet/port",
            "value": "tm-http",
        },
        {
            "op": "replace",
            "path": "/spec/containers/0/readinessProbe/tcpSocket/port",
            "value": "tm-http",
        },
    ]
    echo = containers_of(patched)["echo"]
    assert echo["ports"] == [port(8080, "tm-http"), port(8090, "admin")]
    assert echo["startupProbe"] == {"httpGet": {"path": "/started", "port": 8080}}


def test_probe_on_a_numeric_intercept_keeps_its_name() -> None:
    pod = make_pod(
        app("echo", port(8080, "http"), livenessProbe={"httpGet": {"path": "/", "port": "http"}}),
        annotations={INJECT_ANNOTATION: "enabled"},
    )
    sc = sidecar(config("echo", icept("http", port=8080, numeric=True)))

    ops, patched = inject(pod, sc)

    assert not [op for op in ops if op["op"] == "replace"]
    assert containers_of(patched)["echo"]["livenessProbe"]["httpGet"]["port"] == "http"


def test_hidden_names_are_truncated_to_fifteen_characters() -> None:
    assert hidden_port_name("http") == "tm-http"
    assert hidden_port_name("very-long-name1") == "tm-very-long-na"
    pod = make_pod(app("echo", port(8080, "very-long-name1")), annotations={INJECT_ANNOTATION: "x"})
    sc = sidecar(config("echo", icept("very-long-name1", port=8080)))

    _, patched = inject(pod, sc)

    assert containers_of(patched)["echo"]["ports"] == [port(8080, "tm-very-long-na")]
    assert containers_of(patched)["traffic-agent"]["ports"][0]["name"] == "very-long-name1"


def test_first_of_several_intercepts_on_one_agent_port_decides_the_rename() -> None:
    # §1.6: port-unique intercepts keep the first; a later numeric one on the same agent port
    # still makes the init container necessary (§3.6a looks at every intercept).
    pod = make_pod(app("echo", port(8080, "http")), annotations={INJECT_ANNOTATION: "enabled"})
    sc = sidecar(config("echo", icept("http", port=8080), icept("http", port=8080, numeric=True)))

    ops, patched = inject(pod, sc)

    assert ("add", "/spec/initContainers") in op_paths(ops)
    assert ("replace", "/spec/containers/0/ports/0/name") in op_paths(ops)
    assert containers_of(patched)["traffic-agent"]["ports"] == [
        {"name": "http", "containerPort": 9900, "protocol": "TCP"}
    ]


def test_headless_intercept_uses_iptables_and_keeps_the_port_name() -> None:
    pod = make_pod(app("echo", port(8080, "http")), annotations={INJECT_ANNOTATION: "enabled"})
    sc = sidecar(config("echo", icept("http", port=8080, headless=True)))

    ops, patched = inject(pod, sc)

    assert op_paths(ops) == [
        ("add", "/spec/initContainers"),
        ("add", "/spec/containers/-"),
        ("add", "/spec/volumes"),
    ]
    assert containers_of(patched)["echo"]["ports"] == [port(8080, "http")]


def test_tcp_and_udp_on_one_port_get_two_agent_ports() -> None:
    pod = make_pod(
        app("dns", port(53, "dns-tcp"), port(53, "dns-udp", "UDP")),
        annotations={INJECT_ANNOTATION: "enabled"},
    )
    sc = sidecar(
        config("dns", icept("dns-tcp", port=53), icept("dns-udp", port=53, protocol="UDP"))
    )

    _, patched = inject(pod, sc)

    assert containers_of(patched)["traffic-agent"]["ports"] == [
        {"name": "dns-tcp", "containerPort": 9900, "protocol": "TCP"},
        {"name": "dns-udp", "containerPort": 9900, "protocol": "UDP"},
    ]
    assert containers_of(patched)["dns"]["ports"] == [
        port(53, "tm-dns-tcp"),
        port(53, "tm-dns-udp", "UDP"),
    ]


# --- b: env, envFrom and mounts of the agent ----------------------------------------------------


def two_container_pod() -> Json:
    secret_ref = {"secretKeyRef": {"name": "creds", "key": "password"}}
    return make_pod(
        app(
            "a",
            port(8080, "http"),
            env=[
                {"name": "GREETING", "value": "hello"},
                {"name": "PASSWORD", "valueFrom": secret_ref},
            ],
            envFrom=[
                {"configMapRef": {"name": "settings"}, "prefix": "CM_"},
                {"secretRef": {"name": "keys"}},
            ],
            volumeMounts=[
                {"name": "config", "mountPath": "/config", "readOnly": True},
                {"name": "data", "mountPath": "/var/lib/data", "subPath": "a"},
                token_mount("kube-api-access-x7k2p"),
            ],
        ),
        app(
            "b",
            port(9090, "grpc"),
            env=[{"name": "GREETING", "value": "hi"}],
            envFrom=[{"configMapRef": {"name": "b-settings"}}],
            volumeMounts=[
                {"name": "config", "mountPath": "/config"},
                token_mount("kube-api-access-x7k2p"),
                {
                    "name": "aws-iam-token",
                    "mountPath": "/var/run/secrets/eks.amazonaws.com/serviceaccount",
                },
            ],
        ),
        volumes=[
            {"name": "config", "configMap": {"name": "cfg"}},
            {"name": "data", "emptyDir": {}},
            {"name": "aws-iam-token", "projected": {"sources": []}},
            token_volume("kube-api-access-x7k2p"),
        ],
        annotations={INJECT_ANNOTATION: "enabled"},
    )


def two_container_sidecar(api_port: int = 0) -> Sidecar:
    return sidecar(
        config("a", icept("http", port=8080, agent=9900), prefix="A_"),
        config("b", icept("grpc", port=9090, agent=9901), prefix="B_"),
        api_port=api_port,
    )


def test_env_and_env_from_are_copied_with_each_containers_prefix() -> None:
    _, patched = inject(two_container_pod(), two_container_sidecar())

    agent = containers_of(patched)["traffic-agent"]
    assert agent["env"] == [
        {"name": "_TEL_APP_A_GREETING", "value": "hello"},
        {
            "name": "_TEL_APP_A_PASSWORD",
            "valueFrom": {"secretKeyRef": {"name": "creds", "key": "password"}},
        },
        {"name": "_TEL_APP_B_GREETING", "value": "hi"},
        POD_IP_ENV,
        AGENT_NAME_ENV,
    ]
    assert agent["envFrom"] == [
        {"configMapRef": {"name": "settings"}, "prefix": "_TEL_APP_A_CM_"},
        {"secretRef": {"name": "keys"}, "prefix": "_TEL_APP_A_"},
        {"configMapRef": {"name": "b-settings"}, "prefix": "_TEL_APP_B_"},
    ]
    assert agent["ports"] == [
        {"name": "http", "containerPort": 9900, "protocol": "TCP"},
        {"name": "grpc", "containerPort": 9901, "protocol": "TCP"},
    ]


def test_mounts_move_under_the_mount_point_and_secrets_stay_once() -> None:
    ops, patched = inject(two_container_pod(), two_container_sidecar())

    assert containers_of(patched)["traffic-agent"]["volumeMounts"] == [
        {"name": "config", "mountPath": "/tel_app_mounts/a/config", "readOnly": True},
        {"name": "data", "mountPath": "/tel_app_mounts/a/var/lib/data", "subPath": "a"},
        token_mount("kube-api-access-x7k2p"),
        {"name": "config", "mountPath": "/tel_app_mounts/b/config"},
        {"name": "aws-iam-token", "mountPath": "/var/run/secrets/eks.amazonaws.com/serviceaccount"},
        *AGENT_OWN_MOUNTS,
    ]
    assert op_paths(ops)[-2:] == [
        ("replace", "/spec/containers/0/ports/0/name"),
        ("replace", "/spec/containers/1/ports/0/name"),
    ]


def test_container_without_env_or_mounts_gives_no_env_from_and_only_agent_mounts() -> None:
    pod = make_pod(app("echo", port(8080, "http")), annotations={INJECT_ANNOTATION: "enabled"})
    sc = sidecar(config("echo", icept("http")))

    agent = agent_container(pod, sc)

    assert agent is not None
    assert "envFrom" not in agent
    assert "command" not in agent
    assert agent["env"] == [POD_IP_ENV, AGENT_NAME_ENV]
    assert agent["volumeMounts"] == AGENT_OWN_MOUNTS


# --- f: API port --------------------------------------------------------------------------------


def test_api_port_goes_into_the_agent_and_every_app_container_once() -> None:
    wanted = {"name": "TELEPRESENCE_API_PORT", "value": "9980"}
    pod = make_pod(
        app("a", port(8080, "a-http")),
        app("b", port(8081, "b-http"), env=[{"name": "X", "value": "1"}]),
        app("c", port(8082, "c-http"), env=[wanted]),
        app("d", port(8083, "d-http"), env=[{"name": "TELEPRESENCE_API_PORT", "value": "1234"}]),
        annotations={INJECT_ANNOTATION: "enabled"},
    )
    sc = sidecar(
        config("a", icept("a-http", port=8080, agent=9900), prefix="A_"),
        config("b", icept("b-http", port=8081, agent=9901), prefix="B_"),
        config("c", icept("c-http", port=8082, agent=9902), prefix="C_"),
        config("d", icept("d-http", port=8083, agent=9903), prefix="D_"),
        api_port=9980,
    )

    ops, patched = inject(pod, sc)

    assert ops[-4:] == [
        {"op": "add", "path": "/spec/containers/0/env", "value": []},
        {"op": "add", "path": "/spec/containers/0/env/-", "value": wanted},
        {"op": "add", "path": "/spec/containers/1/env/-", "value": wanted},
        {"op": "replace", "path": "/spec/containers/3/env/0", "value": wanted},
    ]
    apps = containers_of(patched)
    assert [apps[name]["env"] for name in "abcd"] == [
        [wanted],
        [{"name": "X", "value": "1"}, wanted],
        [wanted],
        [wanted],
    ]
    assert apps["traffic-agent"]["env"] == [
        {"name": "_TEL_APP_B_X", "value": "1"},
        wanted,
        POD_IP_ENV,
        AGENT_NAME_ENV,
    ]


def test_without_api_port_an_apps_own_telepresence_api_port_is_copied() -> None:
    own = {"name": "TELEPRESENCE_API_PORT", "value": "1234"}
    pod = make_pod(app("echo", port(8080, "http"), env=[own]), annotations={INJECT_ANNOTATION: "x"})

    ops, patched = inject(pod, sidecar(config("echo", icept("http"))))

    assert containers_of(patched)["traffic-agent"]["env"][0] == {
        "name": "_TEL_APP_A_TELEPRESENCE_API_PORT",
        "value": "1234",
    }
    assert not [op for op in ops if "/env" in op["path"]]


# --- pods with and without volumes, annotations and init containers -----------------------------


def test_bare_pod_gets_added_init_containers_volumes_and_annotations() -> None:
    pod = make_pod(app("echo", port(8080)))
    sc = sidecar(config("echo", icept("", port=8080, numeric=True)))

    ops, patched = inject(pod, sc)

    assert op_paths(ops) == [
        ("add", "/spec/initContainers"),
        ("add", "/spec/containers/-"),
        ("add", "/spec/volumes"),
        ("add", "/metadata/annotations"),
    ]
    assert patched["spec"]["volumes"] == agent_volumes()
    assert patched["metadata"]["annotations"] == {INJECT_ANNOTATION: "enabled"}


def test_existing_annotations_are_kept_when_the_map_is_replaced() -> None:
    annotations = {"example.com/owner": "team~a", "prometheus.io/scrape": "true"}
    pod = make_pod(app("echo", port(8080, "http")), annotations=annotations)

    ops, patched = inject(pod, sidecar(config("echo", icept("http"))))

    assert ops[-1] == {
        "op": "replace",
        "path": "/metadata/annotations",
        "value": {**annotations, INJECT_ANNOTATION: "enabled"},
    }
    assert patched["metadata"]["annotations"] == {**annotations, INJECT_ANNOTATION: "enabled"}


@pytest.mark.parametrize("annotations", [{}, {INJECT_ANNOTATION: ""}])
def test_empty_annotations_or_an_empty_inject_value_get_enabled(
    annotations: dict[str, str],
) -> None:
    pod = make_pod(app("echo", port(8080, "http")), annotations=annotations)

    ops, patched = inject(pod, sidecar(config("echo", icept("http"))))

    assert ops[-1] == {
        "op": "replace",
        "path": "/metadata/annotations",
        "value": {INJECT_ANNOTATION: "enabled"},
    }
    assert patched["metadata"]["annotations"] == {INJECT_ANNOTATION: "enabled"}


def test_init_container_runs_after_existing_init_containers() -> None:
    istio = {"name": "istio-init", "image": "istio/proxyv2:1.14"}
    pod = make_pod(app("echo", port(8080)), init=[istio], annotations={INJECT_ANNOTATION: "x"})
    sc = sidecar(config("echo", icept("", port=8080, numeric=True)))

    ops, patched = inject(pod, sc)

    assert ops[0] == {"op": "add", "path": "/spec/initContainers/-", "value": INIT}
    assert patched["spec"]["initContainers"] == [istio, INIT]


def test_init_container_is_removed_when_no_intercept_needs_it() -> None:
    istio = {"name": "istio-init", "image": "istio/proxyv2:1.14"}
    pod = make_pod(
        app("echo", port(8080, "http")),
        init=[istio, copy.deepcopy(INIT)],
        annotations={INJECT_ANNOTATION: "enabled"},
    )

    ops, patched = inject(pod, sidecar(config("echo", icept("http"))))

    assert ops[0] == {"op": "remove", "path": "/spec/initContainers/1"}
    assert patched["spec"]["initContainers"] == [istio]


def test_identical_init_container_is_kept_despite_defaults_and_token_mount() -> None:
    existing = with_api_server_defaults(INIT)
    existing["volumeMounts"].append(token_mount("kube-api-access-q8w2e"))
    pod = make_pod(app("echo", port(8080)), init=[existing], annotations={INJECT_ANNOTATION: "x"})
    sc = sidecar(config("echo", icept("", port=8080, numeric=True)))

    ops, _ = inject(pod, sc)

    assert op_paths(ops) == [("add", "/spec/containers/-"), ("add", "/spec/volumes")]


def test_different_init_container_is_replaced_in_place() -> None:
    old = {**INIT, "image": "docker.io/datawire/tel2:2.5.0"}
    istio = {"name": "istio-init", "image": "istio/proxyv2:1.14"}
    pod = make_pod(app("echo", port(8080)), init=[istio, old], annotations={INJECT_ANNOTATION: "x"})
    sc = sidecar(config("echo", icept("", port=8080, numeric=True)))

    ops, patched = inject(pod, sc)

    assert ops[0] == {"op": "replace", "path": "/spec/initContainers/1", "value": INIT}
    assert patched["spec"]["initContainers"] == [istio, INIT]


def test_only_missing_agent_volumes_are_added() -> None:
    volumes = [{"name": "export-volume", "emptyDir": {}}]
    pod = make_pod(
        app("echo", port(8080, "http")), volumes=volumes, annotations={INJECT_ANNOTATION: "x"}
    )

    ops, patched = inject(pod, sidecar(config("echo", icept("http"))))

    assert [op["value"]["name"] for op in ops if op["path"] == "/spec/volumes/-"] == [
        "traffic-annotations",
        "traffic-config",
        "traffic-manager-token",
    ]
    assert [v["name"] for v in patched["spec"]["volumes"]] == [
        "export-volume",
        "traffic-annotations",
        "traffic-config",
        "traffic-manager-token",
    ]


# --- token volumes and existing agent containers ------------------------------------------------


@pytest.mark.parametrize(
    ("token", "other_token"),
    [
        ("kube-api-access-x7k2p", "kube-api-access-m4n8z"),
        ("default-token-4x9zq", "default-token-b7c2k"),
    ],
)
def test_token_volume_styles_are_kept_and_ignored_when_comparing(
    token: str, other_token: str
) -> None:
    pod = make_pod(
        app("echo", port(8080, "http"), volumeMounts=[token_mount(token)]),
        volumes=[token_volume(token)],
        annotations={INJECT_ANNOTATION: "enabled"},
    )
    sc = sidecar(config("echo", icept("http")))

    ops, patched = inject(pod, sc)

    assert op_paths(ops)[1] == ("add", "/spec/volumes/-")
    agent = containers_of(patched)["traffic-agent"]
    assert agent["volumeMounts"] == [token_mount(token), *AGENT_OWN_MOUNTS]

    # The same injected pod re-created: its token volume has a new random name.
    recreated = copy.deepcopy(patched)
    for container in recreated["spec"]["containers"]:
        container["volumeMounts"] = [
            token_mount(other_token) if m["name"] == token else m for m in container["volumeMounts"]
        ]
    recreated["spec"]["volumes"][0] = token_volume(other_token)
    assert pod_patch(recreated, sc) == []


def test_existing_agent_with_api_server_defaults_needs_no_patch() -> None:
    _, patched = inject(two_container_pod(), two_container_sidecar())
    containers = patched["spec"]["containers"]
    containers[-1] = with_api_server_defaults(containers[-1])

    assert pod_patch(patched, two_container_sidecar()) == []


def test_existing_agent_that_differs_is_replaced_in_place() -> None:
    _, patched = inject(two_container_pod(), two_container_sidecar())
    upgraded = two_container_sidecar()
    upgraded = sidecar(*upgraded.containers, image="docker.io/datawire/tel2:2.6.9")

    ops = pod_patch(patched, upgraded)

    assert op_paths(ops) == [("replace", "/spec/containers/2")]
    assert ops[0]["value"]["image"] == "docker.io/datawire/tel2:2.6.9"
    assert pod_patch(apply(patched, ops), upgraded) == []


def test_agent_with_an_extra_liveness_probe_is_replaced() -> None:
    _, patched = inject(two_container_pod(), two_container_sidecar())
    patched["spec"]["containers"][-1]["livenessProbe"] = {"tcpSocket": {"port": 9900}}

    ops = pod_patch(patched, two_container_sidecar())

    assert op_paths(ops) == [("replace", "/spec/containers/2")]
    assert ops[0]["value"]["livenessProbe"] == AGENT_EXTRAS["livenessProbe"]


def test_agent_command_is_set_on_agent_and_init_container() -> None:
    pod = make_pod(app("echo", port(8080)), annotations={INJECT_ANNOTATION: "enabled"})
    sc = sidecar(config("echo", icept("", port=8080, numeric=True)))

    ops, patched = inject(pod, sc, command=["tpproxy"])

    assert ops[0]["value"] == [{**INIT, "command": ["tpproxy"]}]
    agent = containers_of(patched)["traffic-agent"]
    assert (agent["command"], agent["args"]) == (["tpproxy"], ["agent"])
    assert init_container(sc, agent_command=["tpproxy"])["args"] == ["agent-init"]
    # The same pod processed without a command: both containers are replaced (2.6 shape).
    assert op_paths(pod_patch(patched, sc)) == [
        ("replace", "/spec/initContainers/0"),
        ("replace", "/spec/containers/1"),
    ]


# --- what cannot be patched, and what is skipped ------------------------------------------------


def test_config_for_other_containers_is_an_error_naming_pod_and_container() -> None:
    pod = make_pod(app("web", port(8080, "http")))

    with pytest.raises(PatchError, match=r"pod echo-7d9f-abcde\.default: .*'echo'.*'web'"):
        pod_patch(pod, sidecar(config("echo", icept("http"))))


def test_config_container_missing_from_the_pod_is_skipped() -> None:
    pod = make_pod(app("echo", port(8080, "http")), annotations={INJECT_ANNOTATION: "enabled"})
    sc = sidecar(
        config("gone", icept("grpc", port=9090, agent=9900), prefix="A_"),
        config("echo", icept("http", port=8080, agent=9901), prefix="B_"),
    )

    ops, patched = inject(pod, sc)

    assert containers_of(patched)["traffic-agent"]["ports"] == [
        {"name": "http", "containerPort": 9901, "protocol": "TCP"}
    ]
    assert ops[-1] == {
        "op": "replace",
        "path": "/spec/containers/0/ports/0/name",
        "value": "tm-http",
    }


def test_app_exposing_an_agent_port_is_an_error() -> None:
    pod = make_pod(app("echo", port(8080, "http")), app("metrics", port(9900, "metrics")))

    with pytest.raises(
        PatchError, match=r"echo-7d9f-abcde\.default: container 'metrics' .*9900/TCP"
    ):
        pod_patch(pod, sidecar(config("echo", icept("http"))))


def test_hidden_name_already_taken_is_an_error() -> None:
    pod = make_pod(app("echo", port(8080, "http"), port(8081, "tm-http")))

    with pytest.raises(
        PatchError, match=r"container 'echo' has ports named both 'http' and 'tm-http'"
    ):
        pod_patch(pod, sidecar(config("echo", icept("http"))))


def test_pod_without_containers_is_an_error() -> None:
    with pytest.raises(PatchError, match=r"pod broken\.default: spec\.containers"):
        pod_patch({"metadata": {"name": "broken", "namespace": "default"}}, sidecar())


def test_config_without_ports_adds_no_agent_container() -> None:
    pod = make_pod(app("echo", port(8080)), annotations={INJECT_ANNOTATION: "enabled"})

    ops, _ = inject(pod, sidecar(config("echo")))

    assert op_paths(ops) == [("add", "/spec/volumes")]


def test_patch_values_share_nothing_with_the_pod() -> None:
    pod = two_container_pod()
    ops = pod_patch(pod, two_container_sidecar())

    agent = ops[0]["value"]
    agent["env"][1]["valueFrom"]["secretKeyRef"]["key"] = "changed"
    agent["envFrom"][0]["configMapRef"]["name"] = "changed"

    assert pod == two_container_pod()
