"""The deployment manifests: accepted by the API server, and their RBAC is the least needed."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from tpcontrol.localcluster import LocalControlPlane

DEPLOY = Path(__file__).parent.parent / "deploy"
SA = "system:serviceaccount:ambassador:traffic-manager"


def kubectl(plane: LocalControlPlane, *args: str) -> subprocess.CompletedProcess[str]:
    binary = shutil.which("kubectl")
    if binary is None:
        pytest.fail("kubectl is missing (scripts/install-k8s-testbin.sh installs it)")
    return subprocess.run(
        [binary, "--kubeconfig", str(plane.kubeconfig), *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_manifests_pass_a_server_side_dry_run(control_plane: LocalControlPlane) -> None:
    kubectl(control_plane, "create", "namespace", "ambassador")  # may exist already: fine
    result = kubectl(control_plane, "apply", "--dry-run=server", "-k", str(DEPLOY))
    assert result.returncode == 0, result.stderr
    for kind in (
        "serviceaccount/traffic-manager",
        "clusterrole.rbac.authorization.k8s.io/traffic-manager",
        "deployment.apps/traffic-manager",
        "service/agent-injector",
        "mutatingwebhookconfiguration.admissionregistration.k8s.io/agent-injector-webhook",
    ):
        assert (
            f"{kind} created (server dry run)" in result.stdout
            or f"{kind} configured" in result.stdout
        )


@pytest.mark.parametrize(
    ("verb", "resource", "allowed"),
    [
        ("watch", "configmaps", True),
        ("update", "configmaps", True),
        ("create", "configmaps", True),
        ("list", "services", True),
        ("get", "deployments.apps", True),
        ("patch", "deployments.apps", True),
        ("patch", "replicasets.apps", True),
        ("patch", "statefulsets.apps", True),
        # Nothing more: no deleting or creating workloads, no pods, no secrets.
        ("delete", "configmaps", False),
        ("delete", "deployments.apps", False),
        ("create", "deployments.apps", False),
        ("update", "deployments.apps", False),
        ("create", "pods", False),
        ("get", "secrets", False),
        ("patch", "services", False),
    ],
)
def test_rbac_is_what_the_manager_needs_and_no_more(
    control_plane: LocalControlPlane, verb: str, resource: str, allowed: bool
) -> None:
    applied = kubectl(control_plane, "apply", "-f", str(DEPLOY / "rbac.yaml"))
    assert applied.returncode == 0, applied.stderr
    answer = kubectl(control_plane, "auth", "can-i", verb, resource, "--as", SA, "-n", "default")
    assert answer.stdout.strip() == ("yes" if allowed else "no"), answer.stdout + answer.stderr
