"""Agent config generation (spec section 2): Kubernetes objects in, the documented Sidecar out."""

from __future__ import annotations

from typing import Any

import pytest
from kubernetes_asyncio.client import (
    V1Container,
    V1ContainerPort,
    V1Deployment,
    V1DeploymentSpec,
    V1LabelSelector,
    V1ObjectMeta,
    V1PodSpec,
    V1PodTemplateSpec,
    V1Service,
    V1ServicePort,
    V1ServiceSpec,
    V1VolumeMount,
)

from tpcontrol.kube.agentconfig import (
    INJECT_SERVICE_NAME,
    INJECT_SERVICE_PORT,
    AgentConfigError,
    GeneratorSettings,
    PortCandidate,
    env_prefix,
    generate,
    service_port_candidates,
)
from tpproxy.config import Container, Intercept, Sidecar, decode_sidecar, encode_sidecar

IMAGE = "docker.io/datawire/tel2:2.6.8"
SETTINGS = GeneratorSettings(agent_image=IMAGE)
LABELS = {"app": "echo"}


def workload(
    *containers: dict[str, Any],
    kind: str = "Deployment",
    name: str = "echo",
    labels: dict[str, str] | None = None,
    annotations: dict[str, str] | None = None,
) -> dict[str, Any]:
    """A workload in `kubectl get -o json` form."""
    tpl_meta: dict[str, Any] = {"labels": LABELS if labels is None else labels}
    if annotations:
        tpl_meta["annotations"] = annotations
    return {
        "apiVersion": "apps/v1",
        "kind": kind,
        "metadata": {"name": name, "namespace": "default", "uid": "wl-uid"},
        "spec": {
            "selector": {"matchLabels": LABELS},
            "template": {"metadata": tpl_meta, "spec": {"containers": list(containers)}},
        },
    }


def container(name: str, *ports: dict[str, Any], mounts: tuple[str, ...] = ()) -> dict[str, Any]:
    """A container; `ports` as Kubernetes writes them (`containerPort`, `name`, `protocol`)."""
    out: dict[str, Any] = {"name": name, "image": "ghcr.io/example/" + name}
    if ports:
        out["ports"] = list(ports)
    if mounts:
        out["volumeMounts"] = [{"name": f"v{i}", "mountPath": m} for i, m in enumerate(mounts)]
    return out


def service(
    name: str,
    *ports: dict[str, Any],
    uid: str = "",
    selector: dict[str, str] | None = None,
) -> dict[str, Any]:
    """A Service selecting `app=echo` unless told otherwise."""
    spec: dict[str, Any] = {"ports": list(ports), "type": "ClusterIP", "clusterIP": "10.0.0.1"}
    if selector != {}:
        spec["selector"] = LABELS if selector is None else selector
    return {
        "kind": "Service",
        "metadata": {"name": name, "namespace": "default", "uid": uid or name + "-uid"},
        "spec": spec,
    }


def sidecar(*containers: Container, kind: str = "Deployment", name: str = "echo") -> Sidecar:
    """The Sidecar the default settings produce around `containers`."""
    return Sidecar(
        agent_image=IMAGE,
        agent_name=name,
        namespace="default",
        log_level="info",
        workload_name=name,
        workload_kind="StatefulSet" if kind == "StatefulSet" else "Deployment",
        manager_host="traffic-manager.ambassador",
        manager_port=8081,
        containers=containers,
    )


def spec_example() -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The workload and services of spec section 1.5 (services deliberately out of name order)."""
    wl = workload(
        container(
            "echo",
            {"name": "http", "containerPort": 8080},
            {"containerPort": 8081},
            mounts=("/config",),
        )
    )
    echo = service(
        "echo",
        {"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP"},
        {"name": "grpc", "port": 81, "targetPort": 8081, "protocol": "TCP"},
        uid="aaa-111",
    )
    alt = service("echo-alt", {"port": 8080, "targetPort": 8080, "protocol": "TCP"}, uid="bbb-222")
    return wl, [alt, echo]


SPEC_EXAMPLE = sidecar(
    Container(
        name="echo",
        env_prefix="A_",
        mount_point="/tel_app_mounts/echo",
        mounts=("/config",),
        intercepts=(
            Intercept(
                container_port_name="http",
                service_name="echo",
                service_uid="aaa-111",
                service_port_name="http",
                protocol="TCP",
                container_port=8080,
                service_port=80,
                agent_port=9900,
            ),
            Intercept(
                service_name="echo",
                service_uid="aaa-111",
                service_port_name="grpc",
                target_port_numeric=True,
                protocol="TCP",
                container_port=8081,
                service_port=81,
                agent_port=9901,
            ),
            Intercept(
                container_port_name="http",
                service_name="echo-alt",
                service_uid="bbb-222",
                target_port_numeric=True,
                protocol="TCP",
                container_port=8080,
                service_port=8080,
                agent_port=9900,
            ),
        ),
    )
)


def error_of(wl: Any, services: list[Any], **kwargs: Any) -> str:
    """The message of the AgentConfigError that generation raises."""
    with pytest.raises(AgentConfigError) as info:
        generate(wl, services, SETTINGS, **kwargs)
    return str(info.value)


# -- The documented example and its encoding


def test_spec_example_produces_the_documented_entry() -> None:
    wl, services = spec_example()
    assert generate(wl, services, SETTINGS) == SPEC_EXAMPLE


def test_spec_example_yaml_round_trips_through_the_agent_decoder() -> None:
    wl, services = spec_example()
    text = encode_sidecar(generate(wl, services, SETTINGS))
    assert decode_sidecar(text, "generated") == SPEC_EXAMPLE
    assert b"headless" not in text  # never set by the generator, omitted as a zero value
    assert b"apiPort" not in text


def test_settings_reach_the_sidecar() -> None:
    wl, services = spec_example()
    settings = GeneratorSettings(
        agent_port=7000,
        api_port=9980,
        agent_image="registry.local/tel2:x",
        manager_namespace="tel",
        log_level="debug",
        manager_port=18081,
    )
    got = generate(wl, services, settings)
    assert (got.agent_image, got.log_level, got.api_port) == (
        "registry.local/tel2:x",
        "debug",
        9980,
    )
    assert (got.manager_host, got.manager_port) == ("traffic-manager.tel", 18081)
    assert [i.agent_port for i in got.containers[0].intercepts] == [7000, 7001, 7000]


@pytest.mark.parametrize(
    ("settings", "field"),
    [
        ({"agent_image": ""}, "agent_image"),
        ({"agent_image": IMAGE, "agent_port": 0}, "agent_port"),
        ({"agent_image": IMAGE, "api_port": 70000}, "api_port"),
    ],
)
def test_bad_settings_are_refused_at_construction(settings: dict[str, Any], field: str) -> None:
    with pytest.raises(AgentConfigError, match=f"GeneratorSettings.{field}"):
        GeneratorSettings(**settings)


# -- Port matching (spec 2.3)


def test_named_target_port_takes_the_container_port_name_and_is_not_numeric() -> None:
    wl = workload(container("echo", {"name": "web", "containerPort": 8080}))
    svc = service("echo", {"port": 80, "targetPort": "web"})
    (icept,) = generate(wl, [svc], SETTINGS).containers[0].intercepts
    assert icept == Intercept(
        container_port_name="web",
        service_name="echo",
        service_uid="echo-uid",
        container_port=8080,
        service_port=80,
        agent_port=9900,
    )


def test_numeric_target_port_matching_a_named_container_port_keeps_the_name() -> None:
    wl = workload(container("echo", {"name": "web", "containerPort": 8080}))
    svc = service("echo", {"port": 80, "targetPort": 8080})
    (icept,) = generate(wl, [svc], SETTINGS).containers[0].intercepts
    assert (icept.container_port_name, icept.target_port_numeric) == ("web", True)


def test_unset_target_port_means_the_service_port() -> None:
    wl = workload(container("echo", {"containerPort": 8080}))
    svc = service("echo", {"port": 8080})
    (icept,) = generate(wl, [svc], SETTINGS).containers[0].intercepts
    assert (icept.container_port, icept.service_port, icept.target_port_numeric) == (
        8080,
        8080,
        True,
    )


def test_a_string_of_digits_is_a_port_name_as_kubernetes_reads_it() -> None:
    wl = workload(container("echo", {"containerPort": 8080}))
    message = error_of(wl, [service("echo", {"port": 80, "targetPort": "8080"})])
    assert "targetPort 8080): no container port matches" in message


def test_named_target_port_picks_the_first_container_with_that_name() -> None:
    wl = workload(
        container("first", {"name": "metrics", "containerPort": 9090}),
        container("second", {"name": "http", "containerPort": 8080}),
        container("third", {"name": "http", "containerPort": 8000}),
    )
    got = generate(wl, [service("echo", {"port": 80, "targetPort": "http"})], SETTINGS)
    assert [(c.name, c.intercepts[0].container_port) for c in got.containers] == [("second", 8080)]


def test_portless_container_is_the_fallback_for_kubectl_expose() -> None:
    # kubectl create deploy echo --image ...; kubectl expose deploy echo --port 80 --target-port 8080
    wl = workload(container("echo"))
    svc = service("echo", {"port": 80, "targetPort": 8080, "protocol": "TCP"})
    assert generate(wl, [svc], SETTINGS) == sidecar(
        Container(
            name="echo",
            env_prefix="A_",
            mount_point="/tel_app_mounts/echo",
            intercepts=(
                Intercept(
                    service_name="echo",
                    service_uid="echo-uid",
                    target_port_numeric=True,
                    container_port=8080,
                    service_port=80,
                    agent_port=9900,
                ),
            ),
        )
    )


def test_a_declared_port_anywhere_wins_over_the_portless_fallback() -> None:
    wl = workload(container("sidecar"), container("echo", {"containerPort": 8080}))
    got = generate(wl, [service("echo", {"port": 80, "targetPort": 8080})], SETTINGS)
    assert [c.name for c in got.containers] == ["echo"]


def test_named_target_port_has_no_portless_fallback() -> None:
    wl = workload(container("echo"))
    message = error_of(wl, [service("echo", {"port": 80, "targetPort": "http"})])
    assert "service echo port 80/TCP (targetPort http): no container port matches" in message


def test_udp_ports_and_app_protocol() -> None:
    wl = workload(
        container(
            "dns",
            {"name": "dns", "containerPort": 53, "protocol": "UDP"},
            {"name": "dns-tcp", "containerPort": 53, "protocol": "TCP"},
        )
    )
    svc = service(
        "dns",
        {"name": "dns", "port": 53, "targetPort": "dns", "protocol": "UDP"},
        {"name": "dns-tcp", "port": 53, "targetPort": 53, "appProtocol": "dns"},
    )
    udp, tcp = generate(wl, [svc], SETTINGS).containers[0].intercepts
    assert (udp.protocol, udp.container_port_name, udp.agent_port) == ("UDP", "dns", 9900)
    # keyed by number only: TCP 53 shares UDP 53's agent port number
    assert (tcp.protocol, tcp.container_port_name, tcp.agent_port) == ("TCP", "dns-tcp", 9900)
    assert (udp.app_protocol, tcp.app_protocol) == ("", "dns")


def test_a_service_port_whose_protocol_does_not_match_is_skipped_silently() -> None:
    wl = workload(container("echo", {"name": "http", "containerPort": 8080}))
    svc = service(
        "echo",
        {"name": "udp", "port": 8080, "targetPort": 8080, "protocol": "UDP"},
        {"name": "http", "port": 80, "targetPort": "http"},
        {"name": "udp-named", "port": 81, "targetPort": "http", "protocol": "UDP"},
    )
    got = generate(wl, [svc], SETTINGS)
    assert [i.service_port_name for i in got.containers[0].intercepts] == ["http"]


def test_sctp_ports_are_skipped_as_the_agent_cannot_forward_them() -> None:
    wl = workload(
        container("echo", {"containerPort": 9000, "protocol": "SCTP"}, {"containerPort": 80})
    )
    svc = service("echo", {"port": 9000, "protocol": "SCTP"}, {"port": 80})
    (icept,) = generate(wl, [svc], SETTINGS).containers[0].intercepts
    assert icept.service_port == 80
    message = error_of(wl, [service("echo", {"port": 9000, "protocol": "SCTP"})])
    assert "protocol SCTP is not supported" in message


def test_the_traffic_agent_container_is_never_an_app_container() -> None:
    wl = workload(
        container("traffic-agent", {"name": "http", "containerPort": 9900}),
        container("echo", {"name": "http", "containerPort": 8080}),
    )
    # the named port matches traffic-agent first: skipped, as in 2.6 (no second search)
    message = error_of(wl, [service("echo", {"port": 80, "targetPort": "http"})])
    assert "matches the traffic-agent container" in message
    got = generate(wl, [service("echo", {"port": 80, "targetPort": 8080})], SETTINGS)
    assert [c.name for c in got.containers] == ["echo"]


# -- Services (spec 2.1) and several of them


def test_services_are_used_in_name_order_and_share_agent_ports_by_container_port() -> None:
    wl = workload(container("echo", {"containerPort": 8080}, {"containerPort": 9090}))
    services = [
        service("zeta", {"port": 9090}),
        service("alpha", {"port": 80, "targetPort": 8080}),
        service("mid", {"port": 8080}),
    ]
    got = generate(wl, services, SETTINGS)
    assert [
        (c.service_name, c.container_port, c.agent_port) for c in service_port_candidates(got)
    ] == [
        ("alpha", 8080, 9900),
        ("mid", 8080, 9900),
        ("zeta", 9090, 9901),
    ]


def test_services_that_do_not_select_the_pod_are_ignored() -> None:
    wl = workload(container("echo", {"containerPort": 8080}), labels={"app": "echo", "tier": "web"})
    services = [
        service("no-selector", {"port": 8080}, selector={}),
        service("other-app", {"port": 8080}, selector={"app": "other"}),
        service("wider", {"port": 8080}, selector={"app": "echo", "tier": "web", "x": "y"}),
        service("subset", {"port": 8080}, selector={"tier": "web"}),
    ]
    got = generate(wl, services, SETTINGS)
    assert [c.service_name for c in service_port_candidates(got)] == ["subset"]


def test_services_of_another_namespace_are_ignored() -> None:
    wl = workload(container("echo", {"containerPort": 8080}))
    elsewhere = service("aaa", {"port": 8080})
    elsewhere["metadata"]["namespace"] = "other"
    got = generate(wl, [elsewhere, service("echo", {"port": 8080})], SETTINGS)
    assert [c.service_name for c in service_port_candidates(got)] == ["echo"]


def test_no_matching_service_names_the_workload_and_lists_what_was_considered() -> None:
    wl = workload(container("echo", {"name": "http", "containerPort": 8080}))
    message = error_of(
        wl,
        [
            service(
                "echo",
                {"name": "web", "port": 80, "targetPort": "web"},
                {"port": 81, "targetPort": 8081},
            ),
            service("echo-udp", {"port": 8080, "protocol": "UDP"}),
        ],
    )
    assert message.startswith(
        "found no service with a port that matches a container in the pod template of Deployment echo.default."
    )
    assert "service echo port web (80/TCP, targetPort web): no container port matches" in message
    assert "service echo port 81/TCP (targetPort 8081): no container port matches" in message
    assert "service echo-udp port 8080/UDP (targetPort 8080): no container port matches" in message
    assert message.endswith("Containers: echo [http 8080/TCP]")


def test_no_selecting_service_lists_labels_and_selectors() -> None:
    wl = workload(container("echo", {"containerPort": 8080}))
    message = error_of(wl, [service("web", {"port": 80}, selector={"app": "web"})])
    assert message == (
        "unable to find services that selects the pod template of Deployment echo.default "
        "using labels app=echo (services considered: web selects app=web)"
    )


def test_template_without_labels_is_an_error() -> None:
    wl = workload(container("echo", {"containerPort": 8080}), labels={})
    message = error_of(wl, [service("echo", {"port": 8080})])
    assert message == (
        "unable to resolve a service using the pod template of Deployment echo.default "
        "because it has no labels"
    )


# -- The annotations (spec 2.1, 2.2)


def test_inject_service_name_restricts_to_that_service() -> None:
    wl = workload(
        container("echo", {"containerPort": 8080}), annotations={INJECT_SERVICE_NAME: "b"}
    )
    services = [service(n, {"port": 8080}) for n in ("a", "b", "c")]
    got = generate(wl, services, SETTINGS)
    assert [c.service_name for c in service_port_candidates(got)] == ["b"]


def test_inject_service_name_that_does_not_exist_is_an_error() -> None:
    wl = workload(
        container("echo", {"containerPort": 8080}), annotations={INJECT_SERVICE_NAME: "nope"}
    )
    message = error_of(wl, [service("echo", {"port": 8080})])
    assert message == (
        "unable to find service nope specified by annotation "
        "telepresence.getambassador.io/inject-service-name declared in the pod template of "
        "Deployment echo.default (services given: echo)"
    )


def test_inject_service_port_by_name() -> None:
    wl = workload(
        container("echo", {"name": "http", "containerPort": 8080}, {"containerPort": 8081}),
        annotations={INJECT_SERVICE_PORT: "grpc"},
    )
    _, services = spec_example()
    got = generate(wl, services, SETTINGS)
    assert [(c.service_name, c.port, c.agent_port) for c in service_port_candidates(got)] == [
        ("echo", "grpc", 9900)
    ]


def test_numeric_inject_service_port_compares_named_target_ports_by_service_port() -> None:
    wl, services = spec_example()
    by_port = workload(
        *wl["spec"]["template"]["spec"]["containers"], annotations={INJECT_SERVICE_PORT: "80"}
    )
    got = generate(by_port, services, SETTINGS)
    assert [(c.service_name, c.port) for c in service_port_candidates(got)] == [("echo", "http")]
    # numeric targetPorts compare by the target: 8081 is grpc's target, 81 is nobody's
    by_target = workload(
        *wl["spec"]["template"]["spec"]["containers"], annotations={INJECT_SERVICE_PORT: "8081"}
    )
    got = generate(by_target, services, SETTINGS)
    assert [(c.service_name, c.port) for c in service_port_candidates(got)] == [("echo", "grpc")]
    by_service_port = workload(
        *wl["spec"]["template"]["spec"]["containers"], annotations={INJECT_SERVICE_PORT: "81"}
    )
    message = error_of(by_service_port, services)
    assert (
        "Considered: service echo: no port matches telepresence.getambassador.io/inject-service-port=81; "
        "service echo-alt: no port matches telepresence.getambassador.io/inject-service-port=81."
    ) in message


def test_invalid_inject_service_port_name_is_an_error_listing_the_rules() -> None:
    wl = workload(
        container("echo", {"containerPort": 8080}), annotations={INJECT_SERVICE_PORT: "Bad--Name-"}
    )
    message = error_of(wl, [service("echo", {"port": 8080})])
    assert message.startswith(
        "Deployment echo.default: annotation telepresence.getambassador.io/inject-service-port='Bad--Name-'"
    )
    assert "must contain only alpha-numeric characters (a-z, 0-9), and hyphens (-)" in message
    assert "must not contain consecutive hyphens" in message
    assert "must not begin or end with a hyphen" in message


# -- Agent ports (spec 1.6)


def test_a_container_already_exposing_the_agent_port_is_an_error() -> None:
    wl = workload(
        container("echo", {"containerPort": 8080}), container("metrics", {"containerPort": 9900})
    )
    message = error_of(wl, [service("echo", {"port": 8080})])
    assert message.startswith(
        "the Deployment echo.default pod container metrics is exposing the same port (9900) "
        "as the traffic-agent sidecar"
    )


def test_a_container_exposing_a_later_agent_port_is_an_error_too() -> None:
    wl = workload(
        container("echo", {"containerPort": 8080}, {"containerPort": 8081}, {"containerPort": 9901})
    )
    # only 9900 is allocated: the declared 9901 is in nobody's way
    assert (
        generate(wl, [service("echo", {"port": 8080})], SETTINGS)
        .containers[0]
        .intercepts[0]
        .agent_port
        == 9900
    )
    message = error_of(
        wl, [service("echo", {"name": "a", "port": 8080}, {"name": "b", "port": 8081})]
    )
    assert message.startswith(
        "the Deployment echo.default pod container echo is exposing port 9901, which the "
        "traffic-agent sidecar needs as the agent port for container port 8081"
    )


def test_agent_ports_count_distinct_container_ports_not_containers() -> None:
    wl = workload(
        container("echo", {"containerPort": 1000}, {"containerPort": 2000}, {"containerPort": 3000})
    )
    services = [
        service("a", {"port": 3000}, {"port": 1000}),
        service("b", {"port": 80, "targetPort": 3000}, {"port": 2000}),
    ]
    got = generate(wl, services, SETTINGS)
    assert [
        (c.service_name, c.container_port, c.agent_port) for c in service_port_candidates(got)
    ] == [
        ("a", 3000, 9900),
        ("a", 1000, 9901),
        ("b", 3000, 9900),
        ("b", 2000, 9902),
    ]


# -- Containers: env prefix, mounts, order


@pytest.mark.parametrize(
    ("index", "prefix"),
    [(0, "A_"), (1, "B_"), (25, "Z_"), (26, "BA_"), (51, "BZ_"), (52, "CA_"), (676, "BAA_")],
)
def test_env_prefix_is_base_26(index: int, prefix: str) -> None:
    assert env_prefix(index) == prefix


def test_three_containers_in_first_match_order_with_prefixes_and_mounts() -> None:
    wl = workload(
        container("a", {"containerPort": 1000}, mounts=("/data", "/cache")),
        container("b", {"containerPort": 2000}),
        container("c", {"containerPort": 3000}, mounts=("/etc/c",)),
        container("unmatched", {"containerPort": 4000}),
    )
    services = [service("svc1", {"port": 3000}), service("svc2", {"port": 1000}, {"port": 2000})]
    got = generate(wl, services, SETTINGS)
    assert [(c.name, c.env_prefix, c.mount_point, c.mounts) for c in got.containers] == [
        ("c", "A_", "/tel_app_mounts/c", ("/etc/c",)),
        ("a", "B_", "/tel_app_mounts/a", ("/data", "/cache")),
        ("b", "C_", "/tel_app_mounts/b", None),
    ]
    assert [c.intercepts[0].agent_port for c in got.containers] == [9900, 9901, 9902]


# -- Workload kinds and input forms


def test_statefulset() -> None:
    wl = workload(
        container("db", {"name": "pg", "containerPort": 5432}), kind="StatefulSet", name="db"
    )
    got = generate(wl, [service("db", {"port": 5432, "targetPort": "pg"})], SETTINGS)
    assert got == sidecar(
        Container(
            name="db",
            env_prefix="A_",
            mount_point="/tel_app_mounts/db",
            intercepts=(
                Intercept(
                    container_port_name="pg",
                    service_name="db",
                    service_uid="db-uid",
                    container_port=5432,
                    service_port=5432,
                    agent_port=9900,
                ),
            ),
        ),
        kind="StatefulSet",
        name="db",
    )


def test_replicaset_kind_is_kept() -> None:
    wl = workload(container("echo", {"containerPort": 8080}), kind="ReplicaSet")
    assert generate(wl, [service("echo", {"port": 8080})], SETTINGS).workload_kind == "ReplicaSet"


def test_unsupported_kind_is_an_error_naming_it() -> None:
    wl = workload(container("echo", {"containerPort": 8080}), kind="DaemonSet")
    message = error_of(wl, [service("echo", {"port": 8080})])
    assert message == (
        "DaemonSet echo.default: unsupported workload kind 'DaemonSet'; "
        "only Deployment, ReplicaSet and StatefulSet can have a traffic-agent"
    )


def test_missing_kind_needs_the_keyword_and_a_contradicting_keyword_is_an_error() -> None:
    wl = workload(container("echo", {"containerPort": 8080}))
    del wl["kind"]
    assert "has no kind" in error_of(wl, [service("echo", {"port": 8080})])
    got = generate(wl, [service("echo", {"port": 8080})], SETTINGS, kind="StatefulSet")
    assert got.workload_kind == "StatefulSet"
    wl["kind"] = "Deployment"
    assert "contradicts" in error_of(wl, [service("echo", {"port": 8080})], kind="StatefulSet")


def test_malformed_objects_are_errors_naming_the_field() -> None:
    wl = workload(container("echo", {"containerPort": "8080"}))
    message = error_of(wl, [service("echo", {"port": 8080})])
    assert message.startswith("Deployment echo.default: not a usable Kubernetes object")
    assert "$.spec.template.spec.containers[0].ports[0].containerPort" in message
    message = error_of(
        workload(container("echo")), [{"metadata": {"name": "bad"}, "spec": {"ports": [{}]}}]
    )
    assert "Service bad.?" in message
    assert "$.spec.ports[0]" in message


def spec_example_models() -> tuple[V1Deployment, list[V1Service]]:
    """Spec section 1.5 as kubernetes-asyncio models, as a list API returns them (no kind)."""
    deployment = V1Deployment(
        metadata=V1ObjectMeta(name="echo", namespace="default", uid="wl-uid"),
        spec=V1DeploymentSpec(
            selector=V1LabelSelector(match_labels=LABELS),
            template=V1PodTemplateSpec(
                metadata=V1ObjectMeta(labels=LABELS),
                spec=V1PodSpec(
                    containers=[
                        V1Container(
                            name="echo",
                            image="ghcr.io/example/echo",
                            ports=[
                                V1ContainerPort(name="http", container_port=8080),
                                V1ContainerPort(container_port=8081),
                            ],
                            volume_mounts=[V1VolumeMount(name="v0", mount_path="/config")],
                        )
                    ]
                ),
            ),
        ),
    )

    def svc(name: str, uid: str, *ports: V1ServicePort) -> V1Service:
        return V1Service(
            metadata=V1ObjectMeta(name=name, namespace="default", uid=uid),
            spec=V1ServiceSpec(selector=LABELS, ports=list(ports)),
        )

    services = [
        svc("echo-alt", "bbb-222", V1ServicePort(port=8080, target_port=8080, protocol="TCP")),
        svc(
            "echo",
            "aaa-111",
            V1ServicePort(name="http", port=80, target_port="http", protocol="TCP"),
            V1ServicePort(name="grpc", port=81, target_port=8081, protocol="TCP"),
        ),
    ]
    return deployment, services


def test_kubernetes_asyncio_models_give_the_same_result_as_dicts() -> None:
    deployment, services = spec_example_models()
    assert deployment.kind is None
    assert generate(deployment, services, SETTINGS) == SPEC_EXAMPLE
    assert generate(deployment, services, SETTINGS, kind="Deployment") == SPEC_EXAMPLE


# -- Describing the result


def test_service_port_candidates_name_ports_as_users_address_them() -> None:
    wl, services = spec_example()
    candidates = service_port_candidates(generate(wl, services, SETTINGS))
    assert candidates == [
        PortCandidate("echo", "http", "TCP", "echo", 8080, 9900),
        PortCandidate("echo", "grpc", "TCP", "echo", 8081, 9901),
        PortCandidate("echo-alt", "8080", "TCP", "echo", 8080, 9900),
    ]
    assert (
        str(candidates[2])
        == "service echo-alt port 8080/TCP -> container echo port 8080 (agent port 9900)"
    )
