"""The manager's wire format: what clients and agents send and receive, as msgspec structs.

It lives in tpproxy because the agent (`tpproxy agent`) speaks it too, and tpproxy never imports
tpcontrol; the manager's state (`tpcontrol.manager.state`) re-exports it. camelCase on the wire.
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec

from tpproxy.config import WorkloadKind
from tpproxy.specs import HeaderMatch, PathMatch

__all__ = [
    "AgentInfo",
    "ClientInfo",
    "Disposition",
    "HeaderMatch",
    "Intercept",
    "InterceptRequest",
    "Mechanism",
    "PathMatch",
    "Review",
    "ReviewDisposition",
]

# Bounds on what a caller can make the manager hold (each string is kept per session or per
# intercept): a name is a Kubernetes name, a text a message; environments are bounded in total
# by the manager (tpcontrol.manager.state.MAX_ENVIRONMENT).
Name = Annotated[str, msgspec.Meta(max_length=253)]
Text = Annotated[str, msgspec.Meta(max_length=4096)]
Environment = Annotated[
    dict[Annotated[str, msgspec.Meta(max_length=1024)], str], msgspec.Meta(max_length=4096)
]

# Where an agent reads its credential for the manager: the projected service-account token
# (audience traffic-manager) that the injector mounts, rotated by the kubelet.
MANAGER_TOKEN_FILE = "/var/run/secrets/tpproxy/manager/token"

Mechanism = Literal["tcp", "http"]
Disposition = Literal[
    "WAITING", "ACTIVE", "AGENT_ERROR", "BAD_ARGS", "NO_AGENT", "NO_MECHANISM", "REMOVED"
]
ReviewDisposition = Literal["ACTIVE", "AGENT_ERROR", "BAD_ARGS"]


class ClientInfo(msgspec.Struct, frozen=True, kw_only=True, rename="camel"):
    """What a client says about itself when it arrives."""

    name: Name
    install_id: Name = ""
    product: Name = "tpcontrol"
    version: Name


class AgentInfo(msgspec.Struct, frozen=True, kw_only=True, rename="camel"):
    """What an agent says about itself: the workload it serves (`name`), its pod, mechanisms.

    `environment` is the app container's environment as the agent exposes it to clients.
    """

    name: Name
    namespace: Name
    pod_name: Name
    pod_ip: Name
    product: Name = "tpproxy"
    version: Name
    mechanisms: Annotated[list[Name], msgspec.Meta(max_length=8)]
    environment: Environment = {}


class InterceptRequest(msgspec.Struct, frozen=True, kw_only=True, rename="camel"):
    """What CreateIntercept carries: where to intercept, how, and where traffic goes.

    `workload` is the agent name (the workload's name); `containerPort`/`agentPort` come from
    PrepareIntercept; `targetHost:targetPort` is the client's local address. `headers`, `path`,
    `methods` and `fallbackToApp` apply to the `http` mechanism only.
    """

    name: Name
    workload: Name
    namespace: Name
    workload_kind: WorkloadKind = ""
    mechanism: Mechanism
    service_name: Name
    service_port_identifier: Name = ""
    container_port: int
    agent_port: int
    headers: list[HeaderMatch] = []
    path: PathMatch | None = None
    methods: list[str] = []
    fallback_to_app: bool = False
    target_host: Name = "127.0.0.1"
    target_port: int


class Intercept(msgspec.Struct, frozen=True, kw_only=True, rename="camel"):
    """An intercept as watchers see it. `id` is `<clientSession>:<spec.name>`."""

    id: str
    spec: InterceptRequest
    client_session: str
    client: str
    disposition: Disposition
    message: str
    pod_ip: str = ""
    environment: dict[str, str] = {}
    mechanism_desc: str = ""
    created_at: float


class Review(msgspec.Struct, frozen=True, kw_only=True, rename="camel"):
    """An agent's verdict on an intercept. Empty `podIp`/`environment` mean the agent's own."""

    disposition: ReviewDisposition
    message: Text = ""
    pod_ip: Name = ""
    environment: Environment = {}
    mechanism_desc: Text = ""
