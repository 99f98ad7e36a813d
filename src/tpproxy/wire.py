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
    "MANAGER_TOKEN_FILE",
    "AgentInfo",
    "ClientInfo",
    "Disposition",
    "ErrorBody",
    "HeaderMatch",
    "Intercept",
    "InterceptRequest",
    "LoginAnswer",
    "ManagerInfo",
    "Mechanism",
    "PathMatch",
    "PrepareRequest",
    "PreparedIntercept",
    "Removed",
    "Review",
    "ReviewDisposition",
    "SessionId",
    "UninstallRequest",
    "Updated",
    "UpgradeRequest",
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
    mount_point: str = ""  # the agent's export directory for the developer's mount; "" = none
    created_at: float


class Review(msgspec.Struct, frozen=True, kw_only=True, rename="camel"):
    """An agent's verdict on an intercept. Empty `podIp`/`environment` mean the agent's own."""

    disposition: ReviewDisposition
    message: Text = ""
    pod_ip: Name = ""
    environment: Environment = {}
    mechanism_desc: Text = ""
    mount_point: Text = ""  # an export directory the agent serves to the owner's mount streams


# -- the manager's API for clients (the agent's part is above) ----------------------------

# Kubernetes' own rules for the names a request carries: checked before any API call, so a bad
# name is a 400 naming the field rather than whatever the API server makes of it.
Namespace = Annotated[str, msgspec.Meta(pattern=r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")]
ObjectName = Annotated[
    str, msgspec.Meta(pattern=r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$", max_length=253)
]


class PrepareRequest(msgspec.Struct, frozen=True, rename="camel"):
    workload: ObjectName
    namespace: Namespace
    kind: Literal["", "Deployment", "ReplicaSet", "StatefulSet"] = ""
    service: str = ""
    port: str = ""
    mechanism: Literal["tcp", "http"] = "tcp"


class PreparedIntercept(msgspec.Struct, frozen=True, rename="camel"):
    namespace: str
    workload: str
    workload_kind: str
    service_name: str
    service_uid: str
    service_port_name: str
    service_port: int
    protocol: str
    container_name: str
    container_port: int
    agent_port: int
    agent_image: str
    agent_running: bool
    entry_changed: bool
    app_protocol: str = ""  # the Service port's appProtocol (e.g. grpc, h2c), if it has one


class UninstallRequest(msgspec.Struct, frozen=True, rename="camel"):
    namespace: Namespace
    workload: ObjectName | Literal[""] = ""  # empty: every (non-manual) entry of the namespace


class UpgradeRequest(msgspec.Struct, frozen=True, rename="camel"):
    agent_image: str = ""  # empty or the configured image: the image never comes from a caller


class LoginAnswer(msgspec.Struct, frozen=True, rename="camel"):
    token: str
    expires_at: float
    username: str
    groups: list[str]


class ErrorBody(msgspec.Struct, frozen=True):
    error: str
    code: str


class SessionId(msgspec.Struct, frozen=True, rename="camel"):
    session_id: str


class ManagerInfo(msgspec.Struct, frozen=True, rename="camel"):
    """Where the tunnel listens (on the API's host)."""

    tunnel_port: int
    version: str


class Removed(msgspec.Struct, frozen=True):
    """What an uninstall removed: the entries' names."""

    removed: list[str]


class Updated(msgspec.Struct, frozen=True):
    """What an upgrade rewrote: `namespace/name` of each entry."""

    updated: list[str]
