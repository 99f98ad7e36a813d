"""Identities for the authentication tests: service accounts as users, pod-bound agent tokens,
and the documented user role from deploy/ (client certificates come from the local cluster's
CA: `LocalControlPlane.authority`, `write_certificate_kubeconfig`)."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, cast

import yaml
from kubernetes_asyncio import client as k8s

ROOT = Path(__file__).resolve().parent.parent
USER_ROLE = ROOT / "deploy" / "user-role.yaml"


async def ensure_user_role(api: k8s.ApiClient, manager_namespace: str = "ambassador") -> None:
    """deploy/user-role.yaml as the install creates it: the ClusterRole `traffic-interceptor`,
    and the Role `traffic-manager-clients` in the manager's namespace (made if missing)."""
    rbac, core = k8s.RbacAuthorizationV1Api(api), k8s.CoreV1Api(api)
    with contextlib.suppress(k8s.ApiException):  # 409: there already
        await core.create_namespace(cast(Any, {"metadata": {"name": manager_namespace}}))
    for doc in yaml.safe_load_all(USER_ROLE.read_text()):
        with contextlib.suppress(k8s.ApiException):  # 409: an earlier test made it
            if doc and doc["kind"] == "ClusterRole":
                await rbac.create_cluster_role(cast(Any, doc))
            elif doc and doc["kind"] == "Role":
                await rbac.create_namespaced_role(manager_namespace, cast(Any, doc))


async def bind_client(
    api: k8s.ApiClient, subject: dict[str, str], manager_namespace: str = "ambassador"
) -> None:
    """`traffic-manager-clients` for `subject`: it may reach the manager (port-forward)."""
    name = f"clients-{subject['name']}-{subject.get('namespace', 'user')}"
    binding = {
        "metadata": {"name": name},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                    "name": "traffic-manager-clients"},
        "subjects": [subject],
    }  # fmt: skip
    with contextlib.suppress(k8s.ApiException):  # 409: bound by an earlier test
        await k8s.RbacAuthorizationV1Api(api).create_namespaced_role_binding(
            manager_namespace, cast(Any, binding)
        )


async def bind_interceptor(api: k8s.ApiClient, namespace: str, subject: dict[str, str]) -> None:
    """What a namespace admin does: `traffic-interceptor` for `subject` in `namespace` only."""
    binding = {
        "metadata": {"name": f"intercepts-{subject['name']}"},
        "roleRef": {
            "apiGroup": "rbac.authorization.k8s.io",
            "kind": "ClusterRole",
            "name": "traffic-interceptor",
        },
        "subjects": [subject],
    }
    await k8s.RbacAuthorizationV1Api(api).create_namespaced_role_binding(
        namespace, cast(Any, binding)
    )


def service_account_subject(namespace: str, name: str) -> dict[str, str]:
    return {"kind": "ServiceAccount", "name": name, "namespace": namespace}


def user_subject(name: str) -> dict[str, str]:
    return {"kind": "User", "name": name, "apiGroup": "rbac.authorization.k8s.io"}


async def account_token(
    api: k8s.ApiClient,
    namespace: str,
    name: str,
    *,
    audience: str | None = None,
    pod: dict[str, Any] | None = None,
) -> str:
    """A fresh token of a service account (made if missing), through the TokenRequest API:
    for the API server's own audiences (a user's kubeconfig token), or for `audience` bound to
    `pod` (what the kubelet projects into an agent)."""
    core = k8s.CoreV1Api(api)
    with contextlib.suppress(k8s.ApiException):  # 409: it exists
        await core.create_namespaced_service_account(
            namespace, cast(Any, {"metadata": {"name": name}})
        )
    spec: dict[str, Any] = {"expirationSeconds": 3600}
    if audience:
        spec["audiences"] = [audience]
    if pod is not None:
        meta = pod["metadata"]
        spec["boundObjectRef"] = {
            "kind": "Pod", "apiVersion": "v1", "name": meta["name"], "uid": meta["uid"]
        }  # fmt: skip
    answer = await core.create_namespaced_service_account_token(
        name, namespace, cast(Any, {"spec": spec})
    )
    return str(answer.status.token)
