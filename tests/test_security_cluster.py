"""The installed product in enforcing mode on the real node: a developer with the documented
role in one namespace intercepts there (by token, and by client certificate), and is refused in
another; a pod with no credential, or with its own service-account token, gets nothing from the
manager, and cannot reach its login port at all."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, cast

import pytest
from kubernetes_asyncio import client as k8s

from tpcontrol.kube.configmap import AgentConfigStore

from .auth_helpers import (
    account_token,
    bind_interceptor,
    service_account_subject,
    user_subject,
)
from .cluster_helpers import ClusterUnderTest, answers, scratch_namespace, settled
from .helpers import run
from .http_servers import Upstream
from .k8s_helpers import wait_for_pods
from .test_cluster_k8s import pod_python
from .test_e2e_k8s import deploy_echo, intercept, leave, stop

pytestmark = pytest.mark.timeout(600)

PROBE = """
import json, sys, urllib.request, urllib.error, socket
manager, pod_ip = sys.argv[1], sys.argv[2]
token = open("/var/run/secrets/kubernetes.io/serviceaccount/token").read().strip()
seen = {}
for name, headers in [("anonymous", {}), ("own-token", {"authorization": "Bearer " + token})]:
    for path, body in [("/v1/prepare", {"workload": "echo", "namespace": "NS"}),
                       ("/v1/agents", {"name": "echo", "namespace": "NS", "podName": "x",
                                       "podIp": "", "version": "1", "mechanisms": ["tcp"]}),
                       ("/v1/upgrade", {"agentImage": "evil/agent:1"})]:
        request = urllib.request.Request(manager + path, data=json.dumps(body).encode(),
                                         headers={"content-type": "application/json", **headers})
        try:
            urllib.request.urlopen(request, timeout=10)
            seen[name + path] = [200, ""]
        except urllib.error.HTTPError as exc:
            seen[name + path] = [exc.code, json.loads(exc.read()).get("error", "")]
try:
    socket.create_connection((pod_ip, 8083), timeout=5).close()
    seen["login"] = "open"
except OSError as exc:
    seen["login"] = type(exc).__name__
print(json.dumps(seen))
"""


async def _grant(api: k8s.ApiClient, ns: str, manager_ns: str, subject: dict[str, str]) -> None:
    """The documented grants: traffic-interceptor in `ns`, the manager's clients role there."""
    await bind_interceptor(api, ns, subject)
    binding = {
        "metadata": {"name": f"clients-{subject['name']}-{ns}"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                    "name": "traffic-manager-clients"},
        "subjects": [subject],
    }  # fmt: skip
    await k8s.RbacAuthorizationV1Api(api).create_namespaced_role_binding(
        manager_ns, cast(Any, binding)
    )


def test_a_namespace_user_intercepts_there_by_token_and_certificate_and_nowhere_else(
    cluster: ClusterUnderTest, tmp_path: Path
) -> None:
    async def scenario() -> None:
        dev = await Upstream("dev").start()
        plane = cluster.cluster.plane
        async with (
            cluster.cluster.api() as api,
            scratch_namespace(api, "mine") as ns,
            scratch_namespace(api, "theirs") as other,
        ):
            await _grant(api, ns, cluster.manager_namespace, service_account_subject(ns, "alice"))
            token = await account_token(api, ns, "alice")
            alice = plane.write_kubeconfig("alice", "alice", token, where=tmp_path)
            await _grant(api, ns, cluster.manager_namespace, user_subject("carol"))
            carol = plane.write_certificate_kubeconfig("carol", "carol", "devs", where=tmp_path)
            ip, _ = await deploy_echo(cluster, api, ns)
            await deploy_echo(cluster, api, other)

            for who, kubeconfig in [("alice", alice), ("carol", carol)]:
                cli = await intercept(
                    cluster, ns, "echo", "--port", "http", "--to", str(dev.port),
                    "--http-header", f"x-dev={who}", "--kubeconfig", str(kubeconfig),
                )  # fmt: skip
                try:
                    await wait_for_pods(
                        api, ns, "app=echo", 1, settled(agent=True), within=90, count_live=True
                    )
                    got = await answers(cluster.network, ip, 80, f"/{who}", **{"x-dev": who})
                    assert got.startswith(f"dev GET /{who}"), got
                finally:
                    if cli.returncode is None:
                        await leave(cli)
                    await stop(cli)

            # In the other namespace: refused before anything is looked up or written.
            proc = await cluster.tpcontrol(
                "intercept", "echo", "-n", other, "--port", "http", "--to", str(dev.port),
                "--kubeconfig", str(alice),
            )  # fmt: skip
            out, err = await proc.communicate()
            assert proc.returncode == 2, (out, err)
            wanted = f"may not create pods/portforward in namespace {other!r}"
            assert wanted in err.decode(), err
            assert await AgentConfigStore(api).entries(other) == {}
            workload = await k8s.AppsV1Api(api).read_namespaced_deployment("echo", other)
            assert workload.metadata.generation == 1
        dev.close()

    run(scenario(), timeout=400)


def test_pods_without_a_users_identity_get_nothing_from_the_manager(
    cluster: ClusterUnderTest,
) -> None:
    async def scenario() -> None:
        async with cluster.cluster.api() as api, scratch_namespace(api, "anon") as ns:
            _, pod = await deploy_echo(cluster, api, ns)
            manager_pods = await k8s.CoreV1Api(api).list_namespaced_pod(
                cluster.manager_namespace, label_selector="app=traffic-manager"
            )
            manager_ip = next(p.status.pod_ip for p in manager_pods.items if p.status.pod_ip)
            url = f"http://traffic-manager.{cluster.manager_namespace}:8081"
            code = PROBE.replace("NS", ns)
            done = await pod_python(
                cluster, ns, pod["metadata"]["name"],
                f"import sys; sys.argv = ['x', {url!r}, {manager_ip!r}]\n" + code,
            )  # fmt: skip
            assert done.returncode == 0, done.stderr
            seen = json.loads(done.stdout.strip().splitlines()[-1])
            for path in ("/v1/prepare", "/v1/agents", "/v1/upgrade"):
                status, error = seen["anonymous" + path]
                assert status == 401
                assert "no credentials" in error
                status, error = seen["own-token" + path]
                assert status in (401, 403), (path, status, error)
            # The pod's own token is a user's for TokenReview: it may not intercept anything,
            # and it is no agent token (audience).
            assert "may not create pods/portforward" in seen["own-token/v1/prepare"][1]
            assert "audience 'traffic-manager'" in seen["own-token/v1/agents"][1]
            assert "in every namespace" in seen["own-token/v1/upgrade"][1]
            assert seen["login"] == "ConnectionRefusedError"  # loopback only in its pod
            assert await AgentConfigStore(api).entries(ns) == {}

    run(scenario(), timeout=300)
