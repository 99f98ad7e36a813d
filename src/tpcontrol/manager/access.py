"""What a caller may do, asked of the API server (SubjectAccessReview) for each request.

The manager acts with its own, wide service account; these checks make it act for a caller only
as far as the caller's own RBAC goes. The verbs, chosen to match what the same user could do
with kubectl (README, "Security model"):

- call the manager at all (open a client session): `create pods/portforward` in the manager's
  namespace, which the CLI's port-forward to it needs anyway;
- intercept a workload (prepare, create an intercept, list the namespace's intercepts): `create`
  on `pods/portforward` in its namespace (what `kubectl port-forward` to its pods needs) and
  `get` on the workload itself;
- receive the app container's environment with an intercept (it holds the app's secrets):
  `create pods/exec` in the namespace (what `kubectl exec ... env` needs); without it the
  intercept works and the environment is left out;
- uninstall the agent from a workload: `patch` on the workload (what `kubectl rollout restart`
  needs); from a whole namespace: `patch` on deployments there;
- upgrade every agent: `patch` on deployments in every namespace (a cluster admin).

The manager's own namespace and the system namespaces are refused before any check: no RBAC
grant makes the manager enrol a workload there.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable

from kubernetes_asyncio import client as k8s

from tpcontrol.manager.auth import AuthMode, Identity
from tpcontrol.manager.state import PermissionDenied

log = logging.getLogger("tpcontrol.manager.access")

SYSTEM_NAMESPACES = frozenset({"kube-system", "kube-public", "kube-node-lease"})
RESOURCES = {
    "Deployment": "deployments",
    "ReplicaSet": "replicasets",
    "StatefulSet": "statefulsets",
}
CACHE_TTL = 10.0
CACHE_SIZE = 4096

Check = tuple[str, str, str, str, str, str]  # verb, group, resource, subresource, namespace, name


def describe(check: Check) -> str:
    verb, group, resource, sub, namespace, name = check
    what = f"{resource}/{sub}" if sub else resource
    if group:
        what = f"{what}.{group}"
    where = f" in namespace {namespace!r}" if namespace else " in every namespace"
    return f"{verb} {what}{f' {name!r}' if name else ''}{where}"


class Access:
    """SubjectAccessReviews for callers, cached a few seconds per (identity, check)."""

    def __init__(
        self,
        api: k8s.ApiClient,
        manager_namespace: str,
        mode: AuthMode = "enforcing",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.reviews = k8s.AuthorizationV1Api(api)
        self.manager_namespace = manager_namespace
        self.mode = mode
        self.clock = clock
        self._cache: OrderedDict[tuple[str, Check], tuple[float, bool, str]] = OrderedDict()
        self.calls = 0

    def forget(self) -> None:
        """Ask the API server afresh from now on (a grant just removed takes effect at once)."""
        self._cache.clear()

    def refused_namespace(self, namespace: str) -> str | None:
        if namespace == self.manager_namespace:
            return (
                f"namespace {namespace!r} is the traffic-manager's own; nothing there is enrolled"
            )
        if namespace in SYSTEM_NAMESPACES:
            return f"namespace {namespace!r} is a system namespace; nothing there is intercepted"
        return None

    async def require(self, identity: Identity, *checks: Check) -> None:
        """PermissionDenied naming the first check the caller fails (permissive: a log line)."""
        for check in checks:
            refused = self.refused_namespace(check[4]) if check[4] else None
            self._refuse(refused or await self._missing(identity, check))

    async def _missing(self, identity: Identity, check: Check, needed_by: str = "") -> str | None:
        """What the caller lacks for `check` (None: nothing), as the refusal says it."""
        allowed, reason = await self._allowed(identity, check)
        if allowed:
            return None
        return f"{identity.username} may not {describe(check)}{needed_by}" + (
            f" ({reason})" if reason else ""
        )

    def _refuse(self, refused: str | None) -> None:
        if refused is None:
            return
        if self.mode == "permissive":
            log.warning("permissive: would refuse: %s", refused)
            return
        raise PermissionDenied(refused)

    async def require_client(self, identity: Identity) -> None:
        """Who may call the manager at all: whoever may port-forward to it (the Role
        `traffic-manager-clients` of deploy/user-role.yaml), the way the CLI reaches it. A pod
        with just its own service-account token may not."""
        needed_by = ", which the traffic-manager's clients need (the Role traffic-manager-clients)"
        self._refuse(await self._missing(identity, port_forward(self.manager_namespace), needed_by))

    async def allowed(self, identity: Identity, check: Check) -> bool:
        if check[4] and self.refused_namespace(check[4]):
            return False
        return (await self._allowed(identity, check))[0]

    async def _allowed(self, identity: Identity, check: Check) -> tuple[bool, str]:
        key = (identity.key + "\0" + "\0".join(identity.groups), check)
        hit = self._cache.get(key)
        if hit is not None and hit[0] >= self.clock():
            return hit[1], hit[2]
        verb, group, resource, sub, namespace, name = check
        spec = k8s.V1SubjectAccessReviewSpec(
            user=identity.username,
            uid=identity.uid or None,
            groups=list(identity.groups) or None,
            extra=identity.extra or None,
            resource_attributes=k8s.V1ResourceAttributes(
                verb=verb,
                group=group,
                resource=resource,
                subresource=sub or None,
                namespace=namespace or None,
                name=name or None,
            ),
        )
        self.calls += 1
        answer = await self.reviews.create_subject_access_review(
            k8s.V1SubjectAccessReview(spec=spec)
        )
        allowed = bool(answer.status and answer.status.allowed)
        reason = (answer.status.reason or "") if answer.status else ""
        self._cache[key] = (self.clock() + CACHE_TTL, allowed, reason)
        self._cache.move_to_end(key)
        while len(self._cache) > CACHE_SIZE:
            self._cache.popitem(last=False)
        return allowed, reason


def port_forward(namespace: str) -> Check:
    return ("create", "", "pods", "portforward", namespace, "")


def exec_pods(namespace: str) -> Check:
    return ("create", "", "pods", "exec", namespace, "")


def get_workload(kind: str, namespace: str, name: str) -> Check:
    return ("get", "apps", RESOURCES.get(kind, "deployments"), "", namespace, name)


def patch_workload(kind: str, namespace: str, name: str) -> Check:
    return ("patch", "apps", RESOURCES.get(kind, "deployments"), "", namespace, name)


UPGRADE: Check = ("patch", "apps", "deployments", "", "", "")
