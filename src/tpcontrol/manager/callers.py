"""Who calls the manager, and whether they may: the checks every handler and every tunnel
stream goes through, apart from what the handlers then do.

Identities come from `auth` (TokenReview, manager tokens), permissions from `access`
(SubjectAccessReview); a session answers only to the identity that opened it; an agent is the
pod its token is bound to. In `permissive` mode each refusal is a log line instead.
"""

from __future__ import annotations

import logging
import ssl

import msgspec
from aiohttp import web
from kubernetes_asyncio import client as k8s

from tpcontrol.certs import Authority, context_from_pem
from tpcontrol.kube.workloads import Workloads
from tpcontrol.manager import access
from tpcontrol.manager import state as st
from tpcontrol.manager.auth import (
    ANONYMOUS,
    Authenticator,
    AuthMode,
    Identity,
    Unauthenticated,
    bearer,
)
from tpcontrol.names import AGENT_CONTAINER
from tpproxy.tunnel import Hello

log = logging.getLogger("tpcontrol.manager")

CLIENT_CA = ("kube-system", "extension-apiserver-authentication", "client-ca-file")


class Callers:
    """The manager's gate: authentication, session ownership and authorization."""

    def __init__(
        self,
        api: k8s.ApiClient,
        state: st.ManagerState,
        workloads: Workloads,
        namespace: str,
        mode: AuthMode,
    ) -> None:
        self.state = state
        self.workloads = workloads
        self.namespace = namespace
        self.mode = mode
        self.auth = Authenticator(api)
        self.access = access.Access(api, namespace, mode)
        self.core = k8s.CoreV1Api(api)

    def permissive(self, what: str, why: str) -> bool:
        if self.mode != "permissive":
            return False
        log.warning("permissive: would refuse %s: %s", what, why)
        return True

    async def identify(self, header: str | None, *, agent: bool, what: str) -> Identity:
        """The caller behind a bearer token: a client's, or (agent=True) an agent pod's."""
        try:
            token = bearer(header)
            return await (self.auth.agent if agent else self.auth.client)(token)
        except Unauthenticated as exc:
            if self.permissive(what, str(exc)):
                return ANONYMOUS
            raise

    async def client_identity(self, request: web.Request) -> Identity:
        header = request.headers.get("authorization")
        return await self.identify(header, agent=False, what=f"{request.method} {request.path}")

    def check_owner(self, owner: str, identity: Identity, what: str) -> None:
        if owner == identity.key:
            return
        why = f"{what} belongs to another identity than {identity.username}"
        if not self.permissive(what, why):
            raise st.PermissionDenied(why + "; a session answers only to who opened it")

    async def session_identity(self, request: web.Request) -> tuple[str, Identity]:
        """The session of the path, and its caller, who must be the identity that opened it."""
        sid = request.match_info["sid"]
        if self.mode == "enforcing":
            bearer(request.headers.get("authorization"))  # no credential: 401, not 404
        owner, is_agent = self.state.owner(sid)
        identity = await self.identify(
            request.headers.get("authorization"),
            agent=is_agent,
            what=f"{request.method} {request.path}",
        )
        self.check_owner(owner, identity, "this session")
        return sid, identity

    async def tunnel_check(self, hello: Hello) -> None:
        """A tunnel stream's first line must carry the credential of its session's owner."""
        owner, is_agent = self.state.owner(hello.session)
        if is_agent != (hello.role == "agent"):
            raise st.PermissionDenied(f"role {hello.role!r} does not match the session")
        header = f"Bearer {hello.token}" if hello.token else None
        identity = await self.identify(header, agent=is_agent, what="a tunnel stream")
        self.check_owner(owner, identity, "this session")

    async def require(self, identity: Identity, *checks: access.Check) -> None:
        for check in checks:
            refused = self.access.refused_namespace(check[4]) if check[4] else None
            if refused:  # whatever the mode: nothing of these namespaces is ever enrolled
                raise st.PermissionDenied(refused)
        if identity is not ANONYMOUS:
            await self.access.require(identity, *checks)
        elif not self.permissive("an anonymous caller", "no identity to authorize"):
            raise st.PermissionDenied("no identity to authorize")  # pragma: no cover

    async def verified_agent(self, identity: Identity, info: st.AgentInfo) -> st.AgentInfo:
        """What an agent claims, checked against its token's pod: same namespace and pod, a
        pod with the agent container whose workload (owners followed by UID) is `name`. The
        pod's IP is the pod's own, whatever the body says."""
        namespace = identity.service_account_namespace
        pod_name, pod_uid = identity.pod or ("", "")
        if info.namespace != namespace:
            raise st.PermissionDenied(
                f"namespace: {info.namespace!r} is not the namespace of this agent's pod "
                f"({namespace!r})"
            )
        if info.pod_name and info.pod_name != pod_name:
            raise st.PermissionDenied(f"podName: {info.pod_name!r} is not this token's pod")
        try:
            pod = await self.core.read_namespaced_pod(pod_name, namespace)
        except k8s.ApiException as exc:
            if exc.status == 404:
                raise st.PermissionDenied(f"the token's pod {pod_name!r} does not exist") from None
            raise
        if pod.metadata.uid != pod_uid:
            raise st.PermissionDenied(f"the token's pod {pod_name!r} was replaced (uid differs)")
        if not any(c.name == AGENT_CONTAINER for c in pod.spec.containers or ()):
            raise st.PermissionDenied(f"pod {pod_name!r} has no {AGENT_CONTAINER} container")
        workload = await self.workloads.owner_workload(
            self.workloads.api.sanitize_for_serialization(pod), namespace
        )
        owner = (workload or {}).get("metadata", {}).get("name")
        if owner != info.name:
            raise st.PermissionDenied(
                f"name: pod {pod_name!r} belongs to workload {owner!r}, not {info.name!r}"
            )
        return msgspec.structs.replace(info, pod_name=pod_name, pod_ip=pod.status.pod_ip or "")

    async def login_tls(self) -> ssl.SSLContext | None:
        """A TLS context that asks for a client certificate signed by the cluster's client CA
        (the API server publishes it in kube-system); None when the cluster has none."""
        namespace, name, key = CLIENT_CA
        try:
            found = await self.core.read_namespaced_config_map(name, namespace)
        except k8s.ApiException as exc:
            log.warning("no client-certificate login: cannot read %s/%s: %s", namespace, name,
                        exc.reason)  # fmt: skip
            return None
        bundle = (found.data or {}).get(key)
        if not bundle:
            log.warning("no client-certificate login: %s/%s has no %s", namespace, name, key)
            return None
        # Its own serving certificate: clients reach this port through the API server's
        # port-forward, and what a client proves (a signature over this handshake) is worthless
        # to anyone else, so they need not verify it.
        cert, private = Authority.create("traffic-manager-login").issue(
            "traffic-manager", dns=["localhost", f"traffic-manager.{self.namespace}"]
        )
        context = context_from_pem(cert, private)
        context.load_verify_locations(cadata=bundle)
        context.verify_mode = ssl.CERT_OPTIONAL
        return context
