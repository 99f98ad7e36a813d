"""The deployment manifests: accepted by the API server, their RBAC is the least needed, and the
names that must agree (RBAC resourceNames, the injector's settings, the image) do."""

from __future__ import annotations

import base64
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes_asyncio import client as k8s

from tpcontrol.injector.tls import (
    SECRET_NAME,
    SERVICE_NAME,
    WEBHOOK_CONFIGURATION_NAME,
    InjectorTls,
    TlsSettings,
)
from tpcontrol.localcluster import LocalControlPlane

from .helpers import run

DEPLOY = Path(__file__).parent.parent / "deploy"
SA = "system:serviceaccount:ambassador:traffic-manager"
IMAGE = "docker.io/tpproxy/tpproxy:0.1.0"
MWC = "mutatingwebhookconfigurations.admissionregistration.k8s.io"
VWC = "validatingwebhookconfigurations.admissionregistration.k8s.io"


def kubectl_binary() -> str:
    """$KUBECTL (e.g. Debian's kubectl 1.20, kustomize v2), else kubectl on the PATH."""
    binary = os.environ.get("KUBECTL") or shutil.which("kubectl")
    if binary is None:
        pytest.fail("kubectl is missing (scripts/install-k8s-testbin.sh installs it)")
    return binary


def kubectl(plane: LocalControlPlane | None, *args: str) -> subprocess.CompletedProcess[str]:
    config = ["--kubeconfig", str(plane.kubeconfig)] if plane is not None else []
    return subprocess.run(
        [kubectl_binary(), *config, *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def rendered() -> list[dict[str, Any]]:
    result = kubectl(None, "kustomize", str(DEPLOY))
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def one(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    (doc,) = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    return doc


def test_manifests_pass_a_server_side_dry_run(control_plane: LocalControlPlane) -> None:
    kubectl(control_plane, "create", "namespace", "ambassador")  # may exist already: fine
    result = kubectl(control_plane, "apply", "--dry-run=server", "-k", str(DEPLOY))
    assert result.returncode == 0, result.stderr
    for kind in (
        "serviceaccount/traffic-manager",
        "clusterrole.rbac.authorization.k8s.io/traffic-manager",
        "clusterrole.rbac.authorization.k8s.io/agent-injector",
        "clusterrolebinding.rbac.authorization.k8s.io/agent-injector",
        "role.rbac.authorization.k8s.io/agent-injector",
        "rolebinding.rbac.authorization.k8s.io/agent-injector",
        "deployment.apps/traffic-manager",
        "service/agent-injector",
        "mutatingwebhookconfiguration.admissionregistration.k8s.io/agent-injector-webhook",
    ):
        assert (
            f"{kind} created (server dry run)" in result.stdout
            or f"{kind} configured" in result.stdout
        ), result.stdout


def test_the_names_that_must_agree_do() -> None:
    """deploy/ is the whole install: no caBundle, no Secret volume, one image string, and the
    injector's Secret and configuration are the ones its RBAC names (and its defaults)."""
    docs = rendered()
    hooks = one(docs, "MutatingWebhookConfiguration", WEBHOOK_CONFIGURATION_NAME)["webhooks"]
    assert all("caBundle" not in h["clientConfig"] for h in hooks)
    assert {h["clientConfig"]["service"]["name"] for h in hooks} == {SERVICE_NAME}
    assert one(docs, "Service", SERVICE_NAME)["spec"]["ports"][0]["targetPort"] == "https"

    pod = one(docs, "Deployment", "traffic-manager")["spec"]["template"]["spec"]
    assert "volumes" not in pod
    containers = {c["name"]: c for c in pod["containers"]}
    assert containers["traffic-manager"]["command"] == ["tpcontrol", "manager"]
    assert containers["agent-injector"]["command"] == ["tpcontrol", "webhook"]
    for container in containers.values():
        assert container["image"] == IMAGE
        assert "volumeMounts" not in container
        env = {e["name"]: e.get("value") for e in container["env"]}
        assert env["TPCONTROL_AGENT_IMAGE"] == IMAGE
    env = {e["name"]: e.get("value") for e in containers["agent-injector"]["env"]}
    assert "TPCONTROL_TLS_DIR" not in env
    assert env["TPCONTROL_TLS_SECRET"] == SECRET_NAME
    assert env["TPCONTROL_WEBHOOK_CONFIGURATION"] == WEBHOOK_CONFIGURATION_NAME
    assert env["TPCONTROL_SERVICE"] == SERVICE_NAME

    role = one(docs, "Role", "agent-injector")
    assert role["metadata"]["namespace"] == "ambassador"
    secrets = {"apiGroups": [""], "resources": ["secrets"]}
    assert role["rules"] == [
        {**secrets, "resourceNames": [SECRET_NAME], "verbs": ["get", "update"]},
        {**secrets, "verbs": ["create"]},
    ]
    cluster_role = one(docs, "ClusterRole", "agent-injector")
    hooks_rule = {"apiGroups": ["admissionregistration.k8s.io"]}
    hooks_rule["resources"] = ["mutatingwebhookconfigurations"]
    assert cluster_role["rules"] == [
        {**hooks_rule, "resourceNames": [WEBHOOK_CONFIGURATION_NAME], "verbs": ["get", "patch"]}
    ]
    for kind in ("RoleBinding", "ClusterRoleBinding"):
        binding = one(docs, kind, "agent-injector")
        assert binding["subjects"] == [
            {"kind": "ServiceAccount", "name": "traffic-manager", "namespace": "ambassador"}
        ]


@pytest.mark.parametrize(
    ("verb", "resource", "namespace", "allowed"),
    [
        ("watch", "configmaps", "default", True),
        ("update", "configmaps", "default", True),
        ("create", "configmaps", "default", True),
        ("list", "services", "default", True),
        ("get", "deployments.apps", "default", True),
        ("patch", "deployments.apps", "default", True),
        ("patch", "replicasets.apps", "default", True),
        ("patch", "statefulsets.apps", "default", True),
        # Nothing more: no deleting or creating workloads, no pods, no secrets.
        ("delete", "configmaps", "default", False),
        ("delete", "deployments.apps", "default", False),
        ("create", "deployments.apps", "default", False),
        ("update", "deployments.apps", "default", False),
        ("create", "pods", "default", False),
        ("get", "secrets", "default", False),
        ("patch", "services", "default", False),
        # The injector's TLS: its one Secret in its own namespace ...
        ("get", f"secrets/{SECRET_NAME}", "ambassador", True),
        ("update", f"secrets/{SECRET_NAME}", "ambassador", True),
        ("create", "secrets", "ambassador", True),  # create cannot be limited by name
        ("patch", f"secrets/{SECRET_NAME}", "ambassador", False),
        ("delete", f"secrets/{SECRET_NAME}", "ambassador", False),
        ("get", "secrets/other", "ambassador", False),
        ("update", "secrets/other", "ambassador", False),
        ("list", "secrets", "ambassador", False),
        ("watch", "secrets", "ambassador", False),
        ("get", f"secrets/{SECRET_NAME}", "default", False),
        ("create", "secrets", "default", False),
        # ... and its one MutatingWebhookConfiguration.
        ("get", f"{MWC}/{WEBHOOK_CONFIGURATION_NAME}", "", True),
        ("patch", f"{MWC}/{WEBHOOK_CONFIGURATION_NAME}", "", True),
        ("update", f"{MWC}/{WEBHOOK_CONFIGURATION_NAME}", "", False),
        ("delete", f"{MWC}/{WEBHOOK_CONFIGURATION_NAME}", "", False),
        ("patch", f"{MWC}/other", "", False),
        ("get", f"{MWC}/other", "", False),
        ("list", MWC, "", False),
        ("create", MWC, "", False),
        ("patch", f"{VWC}/{WEBHOOK_CONFIGURATION_NAME}", "", False),
    ],
)
def test_rbac_is_what_the_manager_and_injector_need_and_no_more(
    control_plane: LocalControlPlane, verb: str, resource: str, namespace: str, allowed: bool
) -> None:
    for path in ("namespace.yaml", "rbac.yaml"):
        applied = kubectl(control_plane, "apply", "-f", str(DEPLOY / path))
        assert applied.returncode == 0, applied.stderr
    where = ["-n", namespace] if namespace else []
    answer = kubectl(control_plane, "auth", "can-i", verb, resource, "--as", SA, *where)
    assert answer.stdout.strip() == ("yes" if allowed else "no"), answer.stdout + answer.stderr


def test_apply_is_the_whole_install_and_a_reapply_keeps_the_ca_bundle(
    control_plane: LocalControlPlane,
) -> None:
    """Applied for real, then the injector's first start as its own ServiceAccount (so the RBAC
    above is enough, not just plausible), then applied again: the caBundle it wrote stays."""
    applied = kubectl(control_plane, "apply", "-k", str(DEPLOY))
    assert applied.returncode == 0, applied.stderr

    async def start_injector() -> bytes:
        async with control_plane.api() as api:
            api.set_default_header("Impersonate-User", SA)
            boot = InjectorTls(api, TlsSettings(namespace="ambassador"))
            stored = await boot.reconcile()
            assert boot.published
            assert boot.writes == 1
            return stored.ca_cert

    async def bundles() -> list[str]:
        async with control_plane.api() as api:
            admission = k8s.AdmissionregistrationV1Api(api)
            config = await admission.read_mutating_webhook_configuration(WEBHOOK_CONFIGURATION_NAME)
            return [h.client_config.ca_bundle for h in config.webhooks]

    async def clean_up() -> None:
        async with control_plane.api() as api:
            await k8s.AppsV1Api(api).delete_namespaced_deployment("traffic-manager", "ambassador")
            await k8s.CoreV1Api(api).delete_namespaced_secret(SECRET_NAME, "ambassador")
            await k8s.AdmissionregistrationV1Api(api).delete_mutating_webhook_configuration(
                WEBHOOK_CONFIGURATION_NAME
            )

    try:
        ca = run(start_injector(), timeout=30)
        written = run(bundles(), timeout=30)
        assert [base64.b64decode(b) for b in written] == [ca]
        again = kubectl(control_plane, "apply", "-k", str(DEPLOY))
        assert again.returncode == 0, again.stderr
        assert run(bundles(), timeout=30) == written
    finally:
        run(clean_up(), timeout=30)
