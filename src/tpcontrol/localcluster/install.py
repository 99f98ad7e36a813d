"""The product installed into the local cluster the way users install it: `deploy/` applied.

The one local overlay is the image name: `deploy/` names the published image, which no registry
here serves, so every occurrence of that name in the rendered manifests is replaced by the image
built from the checkout (`images.build_images`) and imported into the node's containerd. Nothing
else differs from what `kubectl apply -k deploy/` does on any cluster. The install is done when
the traffic-manager's Deployment is available and the API server is seen calling the injector
(a dry-run pod comes back with the injector's warning), so no pod created afterwards can slip
past the webhook while the API server still distrusts its new CA.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from tpcontrol.localcluster.cluster import ClusterError, LocalCluster
from tpcontrol.names import INJECT_ANNOTATION, MANAGER_NAMESPACE

PUBLISHED_IMAGE = "docker.io/tpproxy/tpproxy:0.1.0"


@dataclass(frozen=True)
class Installed:
    namespace: str
    image: str
    seconds: float


def manifests(source: Path, image: str) -> str:
    """`kubectl kustomize deploy/` with the published image name replaced by `image`."""
    done = LocalCluster.kubectl_offline("kustomize", str(source / "deploy"))
    if PUBLISHED_IMAGE not in done:
        raise ClusterError(f"deploy/ no longer names {PUBLISHED_IMAGE}: update the local overlay")
    return done.replace(PUBLISHED_IMAGE, image)


def deployments(rendered: str) -> list[tuple[str, str]]:
    """The (namespace, name) of every Deployment in rendered manifests."""
    found = []
    for doc in yaml.safe_load_all(rendered):
        if isinstance(doc, dict) and doc.get("kind") == "Deployment":
            meta: dict[str, Any] = doc["metadata"]
            found.append((meta.get("namespace", "default"), meta["name"]))
    return found


def install(cluster: LocalCluster, source: Path, image: str, within: float = 180) -> Installed:
    """Apply deploy/ and wait until the manager serves and the injector is called."""
    started = time.monotonic()
    rendered = manifests(source, image)
    cluster.kubectl("apply", "-f", "-", stdin=rendered)
    for namespace, name in deployments(rendered):
        done = cluster.kubectl(
            "-n", namespace, "rollout", "status", f"deployment/{name}", f"--timeout={within:.0f}s",
            check=False, timeout=within + 10,
        )  # fmt: skip
        if done.returncode != 0:
            raise ClusterError(
                f"deployment {namespace}/{name} did not become available: "
                f"{done.stderr.strip() or done.stdout.strip()}\n" + cluster.describe_pods(namespace)
            )
    until_injector_called(cluster, deadline=started + within)
    return Installed(MANAGER_NAMESPACE, image, time.monotonic() - started)


PROBE = f"""\
apiVersion: v1
kind: Pod
metadata:
  name: injector-probe
  namespace: default
  annotations: {{"{INJECT_ANNOTATION}": enabled}}
spec:
  containers: [{{name: probe, image: localhost/pause:3.4}}]
"""


def until_injector_called(cluster: LocalCluster, deadline: float) -> None:
    """Dry-run a pod with no workload until the API server relays the injector's warning."""
    last = ""
    while time.monotonic() < deadline:
        done = cluster.kubectl("create", "--dry-run=server", "-f", "-", stdin=PROBE, check=False)
        last = done.stderr.strip() or done.stdout.strip()
        if "traffic-agent not injected" in done.stderr:
            return
        time.sleep(0.25)
    raise ClusterError(f"the API server does not call the agent injector: {last}")
