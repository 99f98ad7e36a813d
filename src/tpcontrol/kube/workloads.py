"""Looking up workloads and services in the API, as plain JSON-form dicts.

The generator and the patcher are pure functions over the Kubernetes JSON form; this module is
the one place that fetches those objects (and follows a pod's controller chain to its workload).
"""

from __future__ import annotations

from typing import Any

from kubernetes_asyncio import client as k8s

from tpproxy.config import Sidecar

WORKLOAD_KINDS = ("Deployment", "ReplicaSet", "StatefulSet")
Json = dict[str, Any]


class Workloads:
    """Reads workloads, services and pods through one API client."""

    def __init__(self, api: k8s.ApiClient) -> None:
        self.api = api
        self.apps = k8s.AppsV1Api(api)
        self.core = k8s.CoreV1Api(api)

    def _json(self, obj: object, kind: str) -> Json:
        data: Json = self.api.sanitize_for_serialization(obj)
        data.setdefault("kind", kind)
        data.setdefault("apiVersion", "apps/v1" if kind in WORKLOAD_KINDS else "v1")
        return data

    async def get(self, kind: str, name: str, namespace: str) -> Json | None:
        """A workload by kind and name, or None when it does not exist."""
        read = {
            "Deployment": self.apps.read_namespaced_deployment,
            "ReplicaSet": self.apps.read_namespaced_replica_set,
            "StatefulSet": self.apps.read_namespaced_stateful_set,
        }.get(kind)
        if read is None:
            return None
        try:
            return self._json(await read(name, namespace), kind)
        except k8s.ApiException as exc:
            if exc.status == 404:
                return None
            raise

    async def find(self, name: str, namespace: str, kind: str = "") -> Json | None:
        """A workload by name; with no kind, Deployment, ReplicaSet then StatefulSet are tried."""
        for candidate in (kind,) if kind else WORKLOAD_KINDS:
            found = await self.get(candidate, name, namespace)
            if found is not None:
                return found
        return None

    async def services(self, namespace: str) -> list[Json]:
        """All services of the namespace, in name order (the API's list order)."""
        listed = await self.core.list_namespaced_service(namespace)
        services = [self._json(s, "Service") for s in listed.items]
        return sorted(services, key=lambda s: s["metadata"]["name"])

    async def owner_workload(self, obj: Json, namespace: str) -> Json | None:
        """Follow controller owner references up to the top supported workload (spec 2.5).

        A controller of an unsupported kind (an Argo Rollout, say) stops the walk: the object
        below it is the workload. None when the pod has no supported controller at all.
        """
        current: Json | None = None
        node = obj
        while True:
            ref = controller_ref(node)
            if ref is None or ref.get("kind") not in WORKLOAD_KINDS:
                return current
            owner = await self.owner(ref, namespace)
            if owner is None:
                return current
            current = node = owner

    async def owner(self, ref: Json, namespace: str) -> Json | None:
        """The object an owner reference names, if it is that very object (same UID): a
        workload deleted and re-created under the same name owns nothing of the old one's."""
        owner = await self.get(ref.get("kind", ""), ref.get("name", ""), namespace)
        if owner is None or ref.get("uid") != owner.get("metadata", {}).get("uid"):
            return None
        return owner

    async def entry_for(
        self, pod: Json, namespace: str, entries: dict[str, Sidecar]
    ) -> Sidecar | None:
        """The ConfigMap entry that applies to a pod (spec 3.5): by controller name, upwards."""
        node = pod
        for _ in range(4):  # pod -> ReplicaSet -> Deployment: a bounded walk
            ref = controller_ref(node)
            if ref is None:
                return None
            entry = entries.get(ref.get("name", ""))
            if entry is not None and entry.workload_kind in ("", ref.get("kind")):
                return entry
            owner = await self.owner(ref, namespace)
            if owner is None:
                return None
            node = owner
        return None


def controller_ref(obj: Json) -> Json | None:
    """The owner reference marked `controller: true`, if any."""
    for ref in obj.get("metadata", {}).get("ownerReferences") or ():
        if isinstance(ref, dict) and ref.get("controller"):
            return ref
    return None
