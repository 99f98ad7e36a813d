"""What the node's kubelet works out from a pod spec (tpcontrol.node.podspec), without any I/O.

Pods, ConfigMaps and Secrets are written as the API server returns them (camelCase JSON). The
expected values follow the Kubernetes documentation and the kubelet's code: the dependent
environment variable example of kubernetes.io, the downward API volume example's label file,
Go's `%q` for label and annotation files, and `expansion.Expand` for `$(VAR)`, which a
property test compares against a line-by-line port.
"""

from __future__ import annotations

import base64
import copy
import sys
from collections.abc import Mapping
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tpcontrol.node.podspec import (
    AGENT_REPOSITORY,
    EXAMPLES,
    ImageMap,
    PodSpecError,
    argv,
    container_env,
    container_port,
    expand,
    field_value,
    repository,
    secret_values,
    volume_files,
)

Json = dict[str, Any]

UID = "6d1a2f3e-8c4b-4f0a-9e7d-2b5c1a0f9e31"

POD: Json = {
    "apiVersion": "v1",
    "kind": "Pod",
    "metadata": {
        "name": "web-7d4b9c6f5-x2x8k",
        "generateName": "web-7d4b9c6f5-",
        "namespace": "shop",
        "uid": UID,
        "resourceVersion": "48213",
        "creationTimestamp": "2024-05-02T09:14:07Z",
        "labels": {"app": "web", "pod-template-hash": "7d4b9c6f5", "tier": "frontend"},
        "annotations": {
            "prometheus.io/port": "9090",
            "prometheus.io/scrape": "true",
        },
        "ownerReferences": [
            {
                "apiVersion": "apps/v1",
                "kind": "ReplicaSet",
                "name": "web-7d4b9c6f5",
                "uid": "0b8f5a52-1f5e-4a8e-8d0c-6f7e0b1c2d3e",
                "controller": True,
                "blockOwnerDeletion": True,
            }
        ],
    },
    "spec": {
        "nodeName": "node-1",
        "serviceAccountName": "web",
        "restartPolicy": "Always",
        "containers": [
            {
                "name": "app",
                "image": "tpcontrol.example/http-echo:1.0",
                "imagePullPolicy": "IfNotPresent",
                "ports": [
                    {"name": "http", "containerPort": 8080, "protocol": "TCP"},
                    {"containerPort": 8443, "protocol": "TCP"},
                ],
                "readinessProbe": {"httpGet": {"path": "/healthz", "port": "http"}},
                "terminationMessagePath": "/dev/termination-log",
                "terminationMessagePolicy": "File",
            },
            {
                "name": "metrics",
                "image": "docker.io/prom/statsd-exporter:v0.26.0",
                "ports": [{"name": "metrics", "containerPort": 9102, "protocol": "TCP"}],
            },
        ],
    },
    "status": {
        "phase": "Running",
        "hostIP": "10.0.0.5",
        "podIP": "10.244.1.7",
        "podIPs": [{"ip": "10.244.1.7"}, {"ip": "fd00:10:244:1::7"}],
        "qosClass": "BestEffort",
    },
}


def pod(**changes: Any) -> Json:
    """A fresh copy of POD; `metadata`, `spec`, `status` given here replace those parts."""
    result = copy.deepcopy(POD)
    for part, value in changes.items():
        result[part] = value
    return result


def with_metadata(**fields: Any) -> Json:
    result = pod()
    result["metadata"].update(fields)
    return result


# -- repository --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("image", "expected"),
    [
        ("busybox", "busybox"),
        ("busybox:1.36", "busybox"),
        ("docker.io/tpproxy/agent:0.1.0", "docker.io/tpproxy/agent"),
        ("tpcontrol.example/http-echo", "tpcontrol.example/http-echo"),
        ("localhost:5000/app", "localhost:5000/app"),
        ("localhost:5000/app:v1", "localhost:5000/app"),
        ("registry.example.com:443/team/app:2.1-rc.1", "registry.example.com:443/team/app"),
        ("app@sha256:" + "a" * 64, "app"),
        ("ghcr.io/org/app:1.0@sha256:" + "0123456789abcdef" * 4, "ghcr.io/org/app"),
        ("localhost:5000/team/app@sha256:" + "f" * 64, "localhost:5000/team/app"),
    ],
)
def test_repository_drops_tag_and_digest_but_keeps_registry_port(image: str, expected: str) -> None:
    assert repository(image) == expected


# -- ImageMap ----------------------------------------------------------------------------------


def test_default_image_map_runs_the_agent_and_the_examples_with_this_python() -> None:
    images = ImageMap.default()
    assert images.entrypoint(f"{AGENT_REPOSITORY}:0.1.0") == (sys.executable, "-m", "tpproxy")
    http = images.entrypoint("tpcontrol.example/http-echo:1.0")
    tcp = images.entrypoint("tpcontrol.example/tcp-echo")
    assert http == (sys.executable, str(EXAMPLES / "http_echo.py"))
    assert tcp == (sys.executable, str(EXAMPLES / "tcp_echo.py"))
    assert (EXAMPLES / "http_echo.py").is_file()
    assert (EXAMPLES / "tcp_echo.py").is_file()


def test_default_image_map_adds_other_names_for_the_agent() -> None:
    images = ImageMap.default(
        "registry.local:5000/tel/agent:dev", "ghcr.io/acme/agent@sha256:" + "b" * 64
    )
    agent = (sys.executable, "-m", "tpproxy")
    assert images.entrypoint("registry.local:5000/tel/agent:other-tag") == agent
    assert images.entrypoint("ghcr.io/acme/agent:1.2") == agent
    assert images.entrypoint(AGENT_REPOSITORY) == agent
    with pytest.raises(PodSpecError):
        ImageMap.default().entrypoint("registry.local:5000/tel/agent:dev")


def test_unknown_image_is_err_image_pull_naming_the_image_and_the_known_ones() -> None:
    images = ImageMap({"tpcontrol.example/tcp-echo": ("echo",), "busybox": ("sh",)})
    with pytest.raises(PodSpecError) as caught:
        images.entrypoint("nginx:1.25")
    assert caught.value.reason == "ErrImagePull"
    message = str(caught.value)
    assert "'nginx:1.25'" in message
    assert "busybox, tpcontrol.example/tcp-echo" in message


def test_an_empty_image_map_knows_none() -> None:
    with pytest.raises(PodSpecError, match=r"known: none") as caught:
        ImageMap().entrypoint("busybox")
    assert caught.value.reason == "ErrImagePull"


@pytest.mark.parametrize(
    ("known", "image"),
    [
        ("busybox", "busybox:1.36"),
        ("busybox", "library/busybox"),
        ("busybox", "docker.io/library/busybox:1.36"),
        ("busybox", "index.docker.io/library/busybox"),
        ("docker.io/library/busybox", "busybox@sha256:" + "c" * 64),
        (AGENT_REPOSITORY, "tpproxy/agent:0.1.0"),
        (AGENT_REPOSITORY, "index.docker.io/tpproxy/agent"),
        ("tpproxy/agent", f"{AGENT_REPOSITORY}:0.1.0"),
    ],
)
def test_short_docker_hub_names_are_the_same_image(known: str, image: str) -> None:
    """A container runtime pulls `busybox` as docker.io/library/busybox: so must the map match."""
    assert ImageMap({known: ("/bin/sh",)}).entrypoint(image) == ("/bin/sh",)


@pytest.mark.parametrize(
    ("known", "image"),
    [
        ("busybox", "localhost/busybox"),  # localhost is a registry
        ("busybox", "quay.io/busybox"),
        ("busybox", "other/busybox"),  # docker.io/other/busybox, not library/
        (AGENT_REPOSITORY, "quay.io/tpproxy/agent"),
        (AGENT_REPOSITORY, "localhost:5000/tpproxy/agent"),
        ("tpproxy/agent", "Tpproxy/agent"),  # an uppercase first component is a registry host
    ],
)
def test_different_registries_are_different_images(known: str, image: str) -> None:
    with pytest.raises(PodSpecError) as caught:
        ImageMap({known: ("/bin/sh",)}).entrypoint(image)
    assert caught.value.reason == "ErrImagePull"


# -- expand ------------------------------------------------------------------------------------

ENV = {
    "A": "x",
    "HOST": "db.shop.svc",
    "PORT": "5432",
    "REF": "$(A)",
    "my.dotted-name": "dotted",
    "1ST": "first",  # relaxed env var names: any printable ASCII but '='
    "A B": "spaced",
}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("$(A)", "x"),
        ("postgres://$(HOST):$(PORT)/app", "postgres://db.shop.svc:5432/app"),
        ("$(A)$(A)", "xx"),
        ("$(MISSING)", "$(MISSING)"),
        ("--url=$(HOST):$(NOPE)", "--url=db.shop.svc:$(NOPE)"),
        ("$$(A)", "$(A)"),
        ("$$(MISSING)", "$(MISSING)"),
        ("$$$(A)", "$x"),
        ("$$$$(A)", "$$(A)"),
        ("$$", "$"),
        ("$$$", "$$"),
        ("price: $$5", "price: $5"),
        ("$", "$"),
        ("a$", "a$"),
        ("$A", "$A"),
        ("${A}", "${A}"),
        ("$HOME/$(A)", "$HOME/x"),
        ("$(A", "$(A"),
        ("$($(A)", "$($(A)"),  # the name "$(A" is unknown
        ("$()", "$()"),
        ("$(A$(A))", "$(A$(A))"),  # the name is everything up to the first ')'
        ("$(REF)", "$(A)"),  # a value is not expanded again
        ("$(my.dotted-name)", "dotted"),
        ("$(1ST)", "first"),
        ("$(A B)", "spaced"),
        ("café $(A) ☕", "café x ☕"),
        ("no references", "no references"),
        ("", ""),
    ],
)
def test_expand_follows_kubernetes(text: str, expected: str) -> None:
    assert expand(text, ENV) == expected


def test_expand_with_no_env_leaves_references_and_unescapes_dollars() -> None:
    assert expand("echo $(POD_NAME) costs $$(PRICE)", {}) == "echo $(POD_NAME) costs $(PRICE)"


def kubernetes_expand(text: str, env: Mapping[str, str]) -> str:
    """A line-by-line port of Kubernetes' third_party/forked/golang/expansion Expand with
    MappingFuncFor(env): the reference the implementation is compared with."""
    out: list[str] = []
    checkpoint = 0
    cursor = 0
    while cursor < len(text):
        if text[cursor] == "$" and cursor + 1 < len(text):
            out.append(text[checkpoint:cursor])
            rest = text[cursor + 1 :]
            if rest[0] == "$":  # escaped operator
                read, is_var, advance = "$", False, 1
            elif rest[0] == "(":
                close = rest.find(")", 1)
                if close == -1:  # incomplete reference
                    read, is_var, advance = "$(", False, 1
                else:
                    read, is_var, advance = rest[1:close], True, close + 1
            else:  # an operator that begins no expression
                read, is_var, advance = "$" + rest[0], False, 1
            out.append(env.get(read, f"$({read})") if is_var else read)
            cursor += advance
            checkpoint = cursor + 1
        cursor += 1
    return "".join(out) + text[checkpoint:]


# Texts of pieces that matter to the syntax; names include ones only relaxed validation allows.
NAMES = ["A", "B", "A_1", "my.var", "1X", "A B", "", "A$(B"]
PIECES = st.sampled_from(["$", "$$", "(", ")", " ", "é", *NAMES, *(f"$({n})" for n in NAMES)])


@given(
    text=st.lists(PIECES, max_size=12).map("".join),
    env=st.dictionaries(
        st.sampled_from(NAMES), st.lists(PIECES, max_size=3).map("".join), max_size=len(NAMES)
    ),
)
def test_expand_matches_the_kubernetes_algorithm(text: str, env: dict[str, str]) -> None:
    assert expand(text, env) == kubernetes_expand(text, env)


# -- argv --------------------------------------------------------------------------------------

IMAGES = ImageMap(
    {
        "tpcontrol.example/http-echo": ("/usr/bin/python3", "/srv/http_echo.py"),
        "tpcontrol.example/literal": ("/opt/$(A)/bin/run", "--name=$(POD_NAME)", "$$HOME"),
    }
)
CONTAINER_ENV = {"POD_NAME": "web-7d4b9c6f5-x2x8k", "PORT": "8080", "A": "x"}


def container(**fields: Any) -> Json:
    return {"name": "app", "image": "tpcontrol.example/http-echo:1.0", **fields}


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({}, ["/usr/bin/python3", "/srv/http_echo.py"]),
        (
            {"args": ["--port", "$(PORT)"]},
            ["/usr/bin/python3", "/srv/http_echo.py", "--port", "8080"],
        ),
        (
            {"command": ["/bin/sh", "-c", "echo $(POD_NAME)"]},
            ["/bin/sh", "-c", "echo web-7d4b9c6f5-x2x8k"],
        ),
        (
            {"command": ["/bin/sh", "-c"], "args": ["exec serve --port=$(PORT)"]},
            ["/bin/sh", "-c", "exec serve --port=8080"],
        ),
        ({"command": [], "args": ["-v"]}, ["/usr/bin/python3", "/srv/http_echo.py", "-v"]),
        ({"command": ["serve"], "args": []}, ["serve"]),
        (
            {"command": ["sh", "-c", "echo $$(POD_NAME) $$HOME $(UNSET)"]},
            ["sh", "-c", "echo $(POD_NAME) $HOME $(UNSET)"],
        ),
    ],
)
def test_argv_command_replaces_the_entrypoint_and_args_follow(
    fields: Json, expected: list[str]
) -> None:
    assert argv(container(**fields), IMAGES, CONTAINER_ENV) == expected


def test_argv_never_expands_the_image_entrypoint() -> None:
    spec = container(image="tpcontrol.example/literal", args=["$(A)", "$$(A)"])
    assert argv(spec, IMAGES, CONTAINER_ENV) == [
        "/opt/$(A)/bin/run",
        "--name=$(POD_NAME)",
        "$$HOME",
        "x",
        "$(A)",
    ]


def test_argv_with_a_command_needs_no_local_entrypoint_for_the_image() -> None:
    spec = container(image="busybox:1.36", command=["sleep", "3600"])
    assert argv(spec, IMAGES, {}) == ["sleep", "3600"]


@pytest.mark.parametrize("fields", [{}, {"args": ["-v"]}, {"command": []}])
def test_argv_without_a_command_needs_the_image(fields: Json) -> None:
    with pytest.raises(PodSpecError, match=r"'nginx:1.25'") as caught:
        argv(container(image="nginx:1.25", **fields), IMAGES, {})
    assert caught.value.reason == "ErrImagePull"


def test_argv_does_not_change_the_container_spec() -> None:
    spec = container(command=["echo", "$(A)"], args=["$(PORT)"])
    before = copy.deepcopy(spec)
    argv(spec, IMAGES, CONTAINER_ENV)
    assert spec == before


# -- field_value -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("metadata.name", "web-7d4b9c6f5-x2x8k"),
        ("metadata.namespace", "shop"),
        ("metadata.uid", UID),
        ("metadata.labels['app']", "web"),
        ("metadata.labels['pod-template-hash']", "7d4b9c6f5"),
        ("metadata.labels['absent']", ""),
        ("metadata.annotations['prometheus.io/port']", "9090"),
        ("metadata.annotations['absent']", ""),
        ("spec.nodeName", "node-1"),
        ("spec.serviceAccountName", "web"),
        ("status.hostIP", "10.0.0.5"),
        ("status.hostIPs", "10.0.0.5"),  # the status has no hostIPs yet: the one hostIP
        ("status.podIP", "10.244.1.7"),
        ("status.podIPs", "10.244.1.7,fd00:10:244:1::7"),
        ("metadata.labels", 'app="web"\npod-template-hash="7d4b9c6f5"\ntier="frontend"'),
        ("metadata.annotations", 'prometheus.io/port="9090"\nprometheus.io/scrape="true"'),
    ],
)
def test_field_value(path: str, expected: str) -> None:
    assert field_value(pod(), path) == expected


def test_field_value_host_ips_joins_every_host_ip() -> None:
    dual = pod()
    dual["status"]["hostIPs"] = [{"ip": "10.0.0.5"}, {"ip": "fd00::5"}]
    assert field_value(dual, "status.hostIPs") == "10.0.0.5,fd00::5"


def test_the_downward_api_documentation_labels_and_annotations_files() -> None:
    """kubernetes.io's downward API volume example (kubernetes-downwardapi-volume-example)."""
    example = with_metadata(
        labels={"zone": "us-est-coast", "cluster": "test-cluster1", "rack": "rack-22"},
        annotations={"build": "two", "builder": "john-doe"},
    )
    assert field_value(example, "metadata.labels") == (
        'cluster="test-cluster1"\nrack="rack-22"\nzone="us-est-coast"'
    )
    assert field_value(example, "metadata.annotations") == 'build="two"\nbuilder="john-doe"'


def test_whole_annotations_are_quoted_as_go_quotes_them() -> None:
    """The kubelet writes `key=%q` lines: printable non-ASCII stays as it is (where JSON would
    write \\u00e9), quotes, backslashes and control characters are escaped the Go way."""
    annotated = with_metadata(
        annotations={
            "kubectl.kubernetes.io/last-applied-configuration": '{"apiVersion":"v1","kind":"Pod"}\n',
            "description": 'Café "menu" ☕\nline2',
            "odd": "tab\there\\back\x00\x7f\u00a0\u200b🙂\a\x1b",
        }
    )
    assert field_value(annotated, "metadata.annotations") == "\n".join(
        [
            'description="Café \\"menu\\" ☕\\nline2"',
            'kubectl.kubernetes.io/last-applied-configuration="{\\"apiVersion\\":\\"v1\\",\\"kind\\":\\"Pod\\"}\\n"',
            'odd="tab\\there\\\\back\\x00\\x7f\\u00a0\\u200b🙂\\a\\x1b"',
        ]
    )


@pytest.mark.parametrize("path", ["metadata.labels", "metadata.annotations"])
def test_no_labels_or_annotations_is_an_empty_file(path: str) -> None:
    bare = pod()
    del bare["metadata"]["labels"], bare["metadata"]["annotations"]
    assert field_value(bare, path) == ""
    assert field_value(bare, f"{path}['app']") == ""


def test_field_value_of_a_pod_not_yet_running_is_empty() -> None:
    pending = pod(status={"phase": "Pending", "qosClass": "BestEffort"})
    del pending["spec"]["nodeName"]
    for path in ("status.podIP", "status.podIPs", "status.hostIP", "spec.nodeName"):
        assert field_value(pending, path) == ""


@pytest.mark.parametrize(
    "path",
    [
        "spec.containers[0].image",
        "status.phase",
        "metadata.generateName",
        "metadata.labels[app]",
        "metadata.labels['app",
        "metadata.ownerReferences['ReplicaSet']",
        "metadata.Name",
        "",
    ],
)
def test_unsupported_field_path_is_a_config_error_naming_it(path: str) -> None:
    with pytest.raises(PodSpecError) as caught:
        field_value(pod(), path)
    assert caught.value.reason == "CreateContainerConfigError"
    assert repr(path) in str(caught.value)


# -- container_env -----------------------------------------------------------------------------

BASE = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOSTNAME": "web-7d4b9c6f5-x2x8k", "HOME": "/root"}

CONFIG_MAPS: dict[str, dict[str, str]] = {
    "web-config": {"LOG_LEVEL": "info", "CACHE_SIZE": "128", "GREETING": "hello $(LOG_LEVEL)"},
    "feature-flags": {"NEW_CHECKOUT": "true", "LOG_LEVEL": "debug"},
    "kube-root-ca.crt": {
        "ca.crt": "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"
    },
    "nginx-conf": {
        "nginx.conf": "events {}\nhttp { include conf.d/*.conf; }\n",
        "default.conf": "server { listen 8080; }\n",
        "mime.types": "types { text/html html; }\n",
    },
}


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


DB_SECRET: Json = {
    "apiVersion": "v1",
    "kind": "Secret",
    "metadata": {
        "name": "db-credentials",
        "namespace": "shop",
        "uid": "a1b2",
        "resourceVersion": "7",
    },
    "type": "Opaque",
    "data": {"username": b64("shop_app"), "password": b64("s3cr3t!$(A) ✓")},
}
TLS_SECRET: Json = {
    "apiVersion": "v1",
    "kind": "Secret",
    "metadata": {"name": "web-tls", "namespace": "shop"},
    "type": "kubernetes.io/tls",
    "data": {"tls.crt": b64("CERT\n"), "tls.key": b64("KEY\n")},
}
SECRETS = {"db-credentials": secret_values(DB_SECRET), "web-tls": secret_values(TLS_SECRET)}


def env_of(spec: Json, the_pod: Json | None = None) -> dict[str, str]:
    return container_env(the_pod or pod(), spec, CONFIG_MAPS, SECRETS, BASE)


def test_container_env_without_env_is_the_base() -> None:
    assert env_of(container()) == BASE


def test_container_env_does_not_change_its_base() -> None:
    base = dict(BASE)
    env = container_env(pod(), container(env=[{"name": "HOME", "value": "/app"}]), {}, {}, base)
    assert env["HOME"] == "/app"
    assert base == BASE


def test_the_dependent_environment_variables_documentation_example() -> None:
    """kubernetes.io, "Define Dependent Environment Variables": a reference to a variable
    declared later stays as written, `$$` escapes one."""
    spec = container(
        env=[
            {"name": "SERVICE_PORT", "value": "80"},
            {"name": "SERVICE_IP", "value": "172.17.0.1"},
            {"name": "UNCHANGED_REFERENCE", "value": "$(PROTOCOL)://$(SERVICE_IP):$(SERVICE_PORT)"},
            {"name": "PROTOCOL", "value": "https"},
            {"name": "SERVICE_ADDRESS", "value": "$(PROTOCOL)://$(SERVICE_IP):$(SERVICE_PORT)"},
            {"name": "ESCAPED_REFERENCE", "value": "$$(PROTOCOL)://$(SERVICE_IP):$(SERVICE_PORT)"},
        ]
    )
    env = env_of(spec)
    assert env["UNCHANGED_REFERENCE"] == "$(PROTOCOL)://172.17.0.1:80"
    assert env["SERVICE_ADDRESS"] == "https://172.17.0.1:80"
    assert env["ESCAPED_REFERENCE"] == "$(PROTOCOL)://172.17.0.1:80"


def test_env_from_then_env_and_env_wins() -> None:
    spec = container(
        envFrom=[
            {"configMapRef": {"name": "web-config"}},
            {"configMapRef": {"name": "feature-flags"}, "prefix": "FLAG_"},
            {"secretRef": {"name": "db-credentials"}, "prefix": "DB_"},
            {"configMapRef": {"name": "feature-flags"}},  # later sources win: LOG_LEVEL=debug
        ],
        env=[
            {"name": "CACHE_SIZE", "value": "256"},  # env overrides envFrom
            {"name": "PATH", "value": "/app/bin:$(PATH)"},
        ],
    )
    assert env_of(spec) == {
        "PATH": "/app/bin:/usr/local/bin:/usr/bin:/bin",
        "HOSTNAME": "web-7d4b9c6f5-x2x8k",
        "HOME": "/root",
        "LOG_LEVEL": "debug",
        "CACHE_SIZE": "256",
        "GREETING": "hello $(LOG_LEVEL)",  # envFrom values are never expanded
        "FLAG_NEW_CHECKOUT": "true",
        "FLAG_LOG_LEVEL": "debug",
        "DB_username": "shop_app",
        "DB_password": "s3cr3t!$(A) ✓",
        "NEW_CHECKOUT": "true",
    }


def test_env_from_overrides_the_base() -> None:
    config_maps = {"paths": {"HOME": "/home/app"}}
    env = container_env(
        pod(), container(envFrom=[{"configMapRef": {"name": "paths"}}]), config_maps, {}, BASE
    )
    assert env["HOME"] == "/home/app"


def test_env_values_expand_from_env_from_and_earlier_env() -> None:
    spec = container(
        envFrom=[{"secretRef": {"name": "db-credentials"}, "prefix": "DB_"}],
        env=[
            {"name": "DB_HOST", "value": "postgres.shop.svc.cluster.local"},
            {
                "name": "DATABASE_URL",
                "value": "postgres://$(DB_username):$(DB_PASSWORD)@$(DB_HOST):$(DB_PORT)/shop",
            },
            {"name": "DB_PORT", "value": "5432"},
        ],
    )
    assert env_of(spec)["DATABASE_URL"] == (
        "postgres://shop_app:$(DB_PASSWORD)@postgres.shop.svc.cluster.local:$(DB_PORT)/shop"
    )


def test_env_redefining_a_variable_sees_its_earlier_value() -> None:
    spec = container(
        envFrom=[{"configMapRef": {"name": "web-config"}}],
        env=[{"name": "LOG_LEVEL", "value": "$(LOG_LEVEL),verbose"}],
    )
    assert env_of(spec)["LOG_LEVEL"] == "info,verbose"


def test_env_field_refs_and_references_to_them() -> None:
    def ref(path: str) -> Json:
        return {"fieldRef": {"apiVersion": "v1", "fieldPath": path}}

    spec = container(
        env=[
            {"name": "MY_NODE_NAME", "valueFrom": ref("spec.nodeName")},
            {"name": "MY_POD_NAME", "valueFrom": ref("metadata.name")},
            {"name": "MY_POD_NAMESPACE", "valueFrom": ref("metadata.namespace")},
            {"name": "MY_POD_IP", "valueFrom": ref("status.podIP")},
            {"name": "MY_POD_SERVICE_ACCOUNT", "valueFrom": ref("spec.serviceAccountName")},
            {"name": "APP", "valueFrom": ref("metadata.labels['app']")},
            {"name": "FQDN", "value": "$(MY_POD_NAME).$(MY_POD_NAMESPACE).pod"},
        ]
    )
    env = env_of(spec)
    assert {k: v for k, v in env.items() if k not in BASE} == {
        "MY_NODE_NAME": "node-1",
        "MY_POD_NAME": "web-7d4b9c6f5-x2x8k",
        "MY_POD_NAMESPACE": "shop",
        "MY_POD_IP": "10.244.1.7",
        "MY_POD_SERVICE_ACCOUNT": "web",
        "APP": "web",
        "FQDN": "web-7d4b9c6f5-x2x8k.shop.pod",
    }


def test_env_key_refs_are_taken_as_they_are() -> None:
    spec = container(
        env=[
            {
                "name": "GREETING",
                "valueFrom": {"configMapKeyRef": {"name": "web-config", "key": "GREETING"}},
            },
            {
                "name": "DB_PASSWORD",
                "valueFrom": {"secretKeyRef": {"name": "db-credentials", "key": "password"}},
            },
            {"name": "LOG_LEVEL", "value": "warn"},
        ]
    )
    env = env_of(spec)
    assert env["GREETING"] == "hello $(LOG_LEVEL)"  # only `value` is expanded
    assert env["DB_PASSWORD"] == "s3cr3t!$(A) ✓"


@pytest.mark.parametrize(
    "source",
    [
        {"configMapKeyRef": {"name": "web-config", "key": "NOT_THERE", "optional": True}},
        {"configMapKeyRef": {"name": "no-such-config", "key": "LOG_LEVEL", "optional": True}},
        {"secretKeyRef": {"name": "db-credentials", "key": "token", "optional": True}},
        {"secretKeyRef": {"name": "no-such-secret", "key": "token", "optional": True}},
    ],
)
def test_optional_missing_key_ref_leaves_the_variable_out(source: Json) -> None:
    env = env_of(container(env=[{"name": "OPTIONAL", "valueFrom": source}]))
    assert "OPTIONAL" not in env
    assert env == BASE


def test_optional_missing_key_ref_keeps_a_value_from_env_from() -> None:
    spec = container(
        envFrom=[{"configMapRef": {"name": "web-config"}}],
        env=[
            {
                "name": "LOG_LEVEL",
                "valueFrom": {
                    "configMapKeyRef": {"name": "web-config", "key": "level", "optional": True}
                },
            }
        ],
    )
    assert env_of(spec)["LOG_LEVEL"] == "info"


@pytest.mark.parametrize(
    ("source", "named"),
    [
        (
            {"configMapKeyRef": {"name": "web-config", "key": "NOT_THERE"}},
            ["'NOT_THERE'", "configMap 'web-config'"],
        ),
        (
            {"configMapKeyRef": {"name": "web-config", "key": "NOT_THERE", "optional": False}},
            ["'NOT_THERE'", "configMap 'web-config'"],
        ),
        (
            {"secretKeyRef": {"name": "db-credentials", "key": "token"}},
            ["'token'", "secret 'db-credentials'"],
        ),
        (
            {"configMapKeyRef": {"name": "no-such-config", "key": "X"}},
            ["configMap 'no-such-config'"],
        ),
        ({"secretKeyRef": {"name": "no-such-secret", "key": "X"}}, ["secret 'no-such-secret'"]),
    ],
)
def test_required_missing_key_ref_is_a_config_error(source: Json, named: list[str]) -> None:
    with pytest.raises(PodSpecError) as caught:
        env_of(container(env=[{"name": "REQUIRED", "valueFrom": source}]))
    assert caught.value.reason == "CreateContainerConfigError"
    for part in named:
        assert part in str(caught.value)


@pytest.mark.parametrize(
    ("source", "named"),
    [
        ({"configMapRef": {"name": "no-such-config"}}, "configMap 'no-such-config'"),
        ({"secretRef": {"name": "no-such-secret"}, "prefix": "S_"}, "secret 'no-such-secret'"),
    ],
)
def test_env_from_a_missing_source(source: Json, named: str) -> None:
    with pytest.raises(PodSpecError, match=named) as caught:
        env_of(container(envFrom=[source]))
    assert caught.value.reason == "CreateContainerConfigError"
    kind = "configMapRef" if "configMapRef" in source else "secretRef"
    optional = {**source, kind: {**source[kind], "optional": True}}
    assert env_of(container(envFrom=[optional])) == BASE


def test_env_empty_or_absent_value_is_empty() -> None:
    env = env_of(container(env=[{"name": "EMPTY", "value": ""}, {"name": "UNSET"}]))
    assert env["EMPTY"] == ""
    assert env["UNSET"] == ""


def test_env_resource_field_ref_is_empty_on_this_node() -> None:
    source = {
        "resourceFieldRef": {"containerName": "app", "resource": "limits.cpu", "divisor": "1"}
    }
    assert env_of(container(env=[{"name": "CPU_LIMIT", "valueFrom": source}]))["CPU_LIMIT"] == ""


def test_env_unsupported_field_ref_is_a_config_error() -> None:
    source = {"fieldRef": {"apiVersion": "v1", "fieldPath": "spec.containers[0].image"}}
    with pytest.raises(PodSpecError, match=r"spec\.containers\[0\]\.image") as caught:
        env_of(container(env=[{"name": "IMAGE", "valueFrom": source}]))
    assert caught.value.reason == "CreateContainerConfigError"


# -- secret_values -----------------------------------------------------------------------------


def test_secret_values_decodes_data() -> None:
    assert secret_values(DB_SECRET) == {"username": "shop_app", "password": "s3cr3t!$(A) ✓"}
    assert secret_values(TLS_SECRET) == {"tls.crt": "CERT\n", "tls.key": "KEY\n"}


@pytest.mark.parametrize("data", [None, {}])
def test_secret_values_of_a_secret_without_data(data: Json | None) -> None:
    secret: Json = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": "empty"},
        "type": "Opaque",
    }
    if data is not None:
        secret["data"] = data
    assert secret_values(secret) == {}


# -- volume_files ------------------------------------------------------------------------------


def files(volume: Json, the_pod: Json | None = None) -> dict[str, bytes]:
    return volume_files(the_pod or pod(), volume, CONFIG_MAPS, SECRETS)


def test_config_map_volume_has_every_key() -> None:
    volume = {"name": "conf", "configMap": {"name": "nginx-conf", "defaultMode": 420}}
    assert files(volume) == {k: v.encode() for k, v in CONFIG_MAPS["nginx-conf"].items()}


def test_config_map_volume_items_choose_keys_and_paths() -> None:
    volume = {
        "name": "conf",
        "configMap": {
            "name": "nginx-conf",
            "items": [
                {"key": "nginx.conf", "path": "nginx.conf"},
                {"key": "default.conf", "path": "conf.d/default.conf", "mode": 292},
            ],
        },
    }
    assert files(volume) == {
        "nginx.conf": b"events {}\nhttp { include conf.d/*.conf; }\n",
        "conf.d/default.conf": b"server { listen 8080; }\n",
    }


def test_config_map_volume_of_non_ascii_text_is_utf8() -> None:
    config_maps = {"i18n": {"greeting.txt": "grüß dich ☕\n"}}
    volume = {"name": "i18n", "configMap": {"name": "i18n"}}
    assert volume_files(pod(), volume, config_maps, {}) == {
        "greeting.txt": "grüß dich ☕\n".encode()
    }


@pytest.mark.parametrize(
    ("volume", "named"),
    [
        ({"name": "conf", "configMap": {"name": "no-such-config"}}, ["configMap 'no-such-config'"]),
        (
            {
                "name": "conf",
                "configMap": {
                    "name": "nginx-conf",
                    "items": [{"key": "ssl.conf", "path": "ssl.conf"}],
                },
            },
            ["'ssl.conf'", "configMap 'nginx-conf'"],
        ),
        ({"name": "tls", "secret": {"secretName": "no-such-secret"}}, ["secret 'no-such-secret'"]),
        (
            {
                "name": "tls",
                "secret": {"secretName": "web-tls", "items": [{"key": "ca.crt", "path": "ca.crt"}]},
            },
            ["'ca.crt'", "secret 'web-tls'"],
        ),
    ],
)
def test_volume_of_a_missing_source_or_key_is_a_config_error(
    volume: Json, named: list[str]
) -> None:
    with pytest.raises(PodSpecError) as caught:
        files(volume)
    assert caught.value.reason == "CreateContainerConfigError"
    for part in named:
        assert part in str(caught.value)


@pytest.mark.parametrize(
    ("volume", "expected"),
    [
        ({"name": "conf", "configMap": {"name": "no-such-config", "optional": True}}, {}),
        ({"name": "tls", "secret": {"secretName": "no-such-secret", "optional": True}}, {}),
        (
            {
                "name": "conf",
                "configMap": {
                    "name": "nginx-conf",
                    "optional": True,
                    "items": [
                        {"key": "ssl.conf", "path": "ssl.conf"},
                        {"key": "mime.types", "path": "mime.types"},
                    ],
                },
            },
            {"mime.types": b"types { text/html html; }\n"},
        ),
    ],
)
def test_optional_volume_sources_and_keys_may_be_missing(
    volume: Json, expected: dict[str, bytes]
) -> None:
    assert files(volume) == expected


def test_secret_volume_holds_the_decoded_data() -> None:
    volume = {"name": "creds", "secret": {"secretName": "db-credentials", "defaultMode": 256}}
    assert files(volume) == {"username": b"shop_app", "password": "s3cr3t!$(A) ✓".encode()}


def test_secret_volume_items() -> None:
    volume = {
        "name": "tls",
        "secret": {
            "secretName": "web-tls",
            "items": [{"key": "tls.key", "path": "private/key.pem"}],
        },
    }
    assert files(volume) == {"private/key.pem": b"KEY\n"}


def test_downward_api_volume() -> None:
    """kubernetes.io's downward API volume example, with the pod's own name besides."""
    example = with_metadata(
        labels={"zone": "us-est-coast", "cluster": "test-cluster1", "rack": "rack-22"},
        annotations={"build": "two", "builder": "john-doe"},
    )
    volume = {
        "name": "podinfo",
        "downwardAPI": {
            "items": [
                {"path": "labels", "fieldRef": {"fieldPath": "metadata.labels"}},
                {"path": "annotations", "fieldRef": {"fieldPath": "metadata.annotations"}},
                {
                    "path": "meta/name",
                    "fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.name"},
                },
                {"path": "zone", "fieldRef": {"fieldPath": "metadata.labels['zone']"}},
            ]
        },
    }
    assert files(volume, example) == {
        "labels": b'cluster="test-cluster1"\nrack="rack-22"\nzone="us-est-coast"',
        "annotations": b'build="two"\nbuilder="john-doe"',
        "meta/name": b"web-7d4b9c6f5-x2x8k",
        "zone": b"us-est-coast",
    }


def test_downward_api_volume_with_an_unsupported_field_is_a_config_error() -> None:
    volume = {
        "name": "podinfo",
        "downwardAPI": {"items": [{"path": "phase", "fieldRef": {"fieldPath": "status.phase"}}]},
    }
    with pytest.raises(PodSpecError, match=r"status\.phase") as caught:
        files(volume)
    assert caught.value.reason == "CreateContainerConfigError"


def test_projected_service_account_volume_as_the_api_server_injects_it() -> None:
    """The kube-api-access volume: the CA and the namespace (this node issues no token)."""
    volume = {
        "name": "kube-api-access-7xk2p",
        "projected": {
            "defaultMode": 420,
            "sources": [
                {"serviceAccountToken": {"expirationSeconds": 3607, "path": "token"}},
                {
                    "configMap": {
                        "name": "kube-root-ca.crt",
                        "items": [{"key": "ca.crt", "path": "ca.crt"}],
                    }
                },
                {
                    "downwardAPI": {
                        "items": [
                            {
                                "path": "namespace",
                                "fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.namespace"},
                            }
                        ]
                    }
                },
            ],
        },
    }
    assert files(volume) == {
        "ca.crt": CONFIG_MAPS["kube-root-ca.crt"]["ca.crt"].encode(),
        "namespace": b"shop",
    }


def test_projected_volume_merges_config_map_secret_and_downward_api() -> None:
    volume = {
        "name": "all-in-one",
        "projected": {
            "sources": [
                {
                    "configMap": {
                        "name": "web-config",
                        "items": [{"key": "LOG_LEVEL", "path": "config/level"}],
                    }
                },
                {
                    "secret": {
                        "name": "db-credentials",
                        "items": [{"key": "username", "path": "db/user"}],
                    }
                },
                {"secret": {"name": "web-tls"}},
                {"secret": {"name": "no-such-secret", "optional": True}},
                {
                    "downwardAPI": {
                        "items": [{"path": "labels", "fieldRef": {"fieldPath": "metadata.labels"}}]
                    }
                },
            ]
        },
    }
    assert files(volume) == {
        "config/level": b"info",
        "db/user": b"shop_app",
        "tls.crt": b"CERT\n",
        "tls.key": b"KEY\n",
        "labels": b'app="web"\npod-template-hash="7d4b9c6f5"\ntier="frontend"',
    }


@pytest.mark.parametrize(
    ("source", "named"),
    [
        ({"secret": {"name": "no-such-secret"}}, "secret 'no-such-secret'"),
        ({"configMap": {"name": "no-such-config"}}, "configMap 'no-such-config'"),
    ],
)
def test_projected_volume_with_a_missing_required_source(source: Json, named: str) -> None:
    with pytest.raises(PodSpecError, match=named) as caught:
        files({"name": "p", "projected": {"sources": [source]}})
    assert caught.value.reason == "CreateContainerConfigError"


@pytest.mark.parametrize("empty_dir", [{}, {"medium": "Memory", "sizeLimit": "64Mi"}])
def test_empty_dir_volume_has_no_files(empty_dir: Json) -> None:
    assert files({"name": "scratch", "emptyDir": empty_dir}) == {}


@pytest.mark.parametrize(
    ("volume", "kind"),
    [
        ({"name": "host-logs", "hostPath": {"path": "/var/log", "type": "Directory"}}, "hostPath"),
        (
            {"name": "data", "persistentVolumeClaim": {"claimName": "data-web-0"}},
            "persistentVolumeClaim",
        ),
        ({"name": "shared", "nfs": {"server": "nfs.example.com", "path": "/exports"}}, "nfs"),
    ],
)
def test_unsupported_volume_kind_is_a_config_error_naming_the_volume(
    volume: Json, kind: str
) -> None:
    with pytest.raises(PodSpecError) as caught:
        files(volume)
    assert caught.value.reason == "CreateContainerConfigError"
    assert repr(volume["name"]) in str(caught.value)
    assert kind in str(caught.value)


# -- container_port ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("port", "in_container", "expected"),
    [
        (8080, None, 8080),
        (9999, 0, 9999),  # a number needs no declared port
        ("8080", None, 8080),
        ("8443", 0, 8443),
        ("http", 0, 8080),
        ("http", None, 8080),
        ("metrics", 1, 9102),
        ("metrics", None, 9102),  # any container of the pod
    ],
)
def test_container_port(port: int | str, in_container: int | None, expected: int) -> None:
    the_pod = pod()
    spec = None if in_container is None else the_pod["spec"]["containers"][in_container]
    assert container_port(the_pod, port, spec) == expected


@pytest.mark.parametrize(
    ("port", "in_container"),
    [
        ("metrics", 0),  # declared by the other container only
        ("grpc", None),
        ("grpc", 1),
        ("HTTP", 0),  # names are case-sensitive
    ],
)
def test_unknown_port_name_is_an_error_naming_it(port: str, in_container: int | None) -> None:
    the_pod = pod()
    spec = None if in_container is None else the_pod["spec"]["containers"][in_container]
    with pytest.raises(PodSpecError) as caught:
        container_port(the_pod, port, spec)
    assert caught.value.reason == "InvalidPort"
    assert repr(port) in str(caught.value)


def test_named_port_of_a_container_without_ports() -> None:
    bare = pod()
    for spec in bare["spec"]["containers"]:
        del spec["ports"]
    with pytest.raises(PodSpecError, match="'http'"):
        container_port(bare, "http")
