"""Generate a workload's agent config (`Sidecar`) from its pod template and the Services around it.

This is spec section 2 as pure code: no I/O and no asyncio, so the manager, the webhook and the
ConfigMap watcher can all call it with objects they already fetched, and tests need no cluster.

Inputs are Kubernetes objects either as plain dicts in their JSON form (camelCase keys, as
`kubectl get -o json` prints them) or as kubernetes-asyncio model objects. Both are reduced to
plain JSON values first and then decoded into small private msgspec structs, so that a malformed
object fails with one `AgentConfigError` naming the field instead of a `KeyError` deep inside.

The 2.6 quirks are kept on purpose because users' clusters depend on them: agent ports are keyed
by container port number only, services are visited in name order, skipped service ports are
silent, `headless` is never set. Error messages follow the spec's wording but name the workload as
`<Kind> <name>.<namespace>` (2.6 printed the usually empty pod template name) and list what was
considered when nothing matched.

Long on purpose: it is spec section 2 end to end (services to container ports to agent ports),
one pure generator whose error messages name every candidate.
"""

from __future__ import annotations

import datetime
import re
from collections.abc import Iterable, Mapping
from typing import Any, NamedTuple, TypeVar

import msgspec

from tpcontrol.names import (
    AGENT_CONTAINER,
    AGENT_PORT,
    ANNOTATION_DOMAIN,
    MANAGER_NAMESPACE,
    MANAGER_PORT,
)
from tpproxy.config import Container, Intercept, Protocol, Sidecar, WorkloadKind

INJECT_SERVICE_NAME = ANNOTATION_DOMAIN + "inject-service-name"
INJECT_SERVICE_PORT = ANNOTATION_DOMAIN + "inject-service-port"
APP_MOUNTS_PREFIX = "/tel_app_mounts/"
MAX_PORT = 65535

_KINDS: dict[str, WorkloadKind] = {
    "Deployment": "Deployment",
    "ReplicaSet": "ReplicaSet",
    "StatefulSet": "StatefulSet",
}
_PROTOCOLS: dict[str, Protocol] = {"TCP": "TCP", "UDP": "UDP"}
_MODEL_CLASS = re.compile(r"V\d+(?:alpha\d+|beta\d+)?([A-Z]\w*)")
_GO_INT = re.compile(r"[+-]?[0-9]+")  # what Go's strconv.Atoi accepts, as 2.6 used it

_T = TypeVar("_T")


class AgentConfigError(Exception):
    """The workload cannot get an agent config; the message names the workload and the cause."""


class GeneratorSettings(msgspec.Struct, frozen=True, kw_only=True):
    """The manager-wide inputs of generation (spec section 2), fixed for a manager process."""

    agent_port: int = AGENT_PORT
    api_port: int = 0
    agent_image: str
    manager_namespace: str = MANAGER_NAMESPACE
    log_level: str = "info"
    manager_port: int = MANAGER_PORT

    def __post_init__(self) -> None:
        """Fail at start-up rather than write an entry that the agent would refuse to load."""
        if not self.agent_image:
            raise AgentConfigError("GeneratorSettings.agent_image: must not be empty")
        for field, value, low in (
            ("agent_port", self.agent_port, 1),
            ("api_port", self.api_port, 0),
            ("manager_port", self.manager_port, 1),
        ):
            if not low <= value <= MAX_PORT:
                raise AgentConfigError(
                    f"GeneratorSettings.{field}: must be {low}-65535, got {value}"
                )


# -- The subset of the Kubernetes JSON schema that generation reads


class _Meta(msgspec.Struct, frozen=True):
    name: str = ""
    namespace: str = ""
    uid: str = ""
    labels: dict[str, str] = {}
    annotations: dict[str, str] = {}


class _ContainerPort(msgspec.Struct, frozen=True, rename="camel"):
    container_port: int
    name: str = ""
    protocol: str = ""


class _VolumeMount(msgspec.Struct, frozen=True, rename="camel"):
    mount_path: str


class _Container(msgspec.Struct, frozen=True, rename="camel"):
    name: str
    ports: tuple[_ContainerPort, ...] = ()
    volume_mounts: tuple[_VolumeMount, ...] = ()


class _PodSpec(msgspec.Struct, frozen=True):
    containers: tuple[_Container, ...] = ()


class _PodTemplate(msgspec.Struct, frozen=True):
    metadata: _Meta = msgspec.field(default_factory=_Meta)
    spec: _PodSpec = msgspec.field(default_factory=_PodSpec)


class _WorkloadSpec(msgspec.Struct, frozen=True):
    template: _PodTemplate


class _Workload(msgspec.Struct, frozen=True):
    metadata: _Meta
    spec: _WorkloadSpec
    kind: str = ""


class _ServicePort(msgspec.Struct, frozen=True, rename="camel"):
    port: int
    name: str = ""
    protocol: str = ""
    target_port: int | str = 0
    app_protocol: str = ""


class _ServiceSpec(msgspec.Struct, frozen=True):
    selector: dict[str, str] = {}
    ports: tuple[_ServicePort, ...] = ()


class _Service(msgspec.Struct, frozen=True):
    metadata: _Meta
    spec: _ServiceSpec = msgspec.field(default_factory=_ServiceSpec)


# -- Reading inputs


def _plain(obj: object) -> Any:
    """JSON values of a dict or kubernetes-asyncio model, nulls dropped.

    This is what `ApiClient.sanitize_for_serialization` does, but constructing an `ApiClient`
    opens an aiohttp session, which needs a running event loop; models only need their
    `openapi_types` / `attribute_map` class tables to be walked.
    """
    if isinstance(obj, Mapping):
        return {str(k): _plain(v) for k, v in obj.items() if v is not None}
    if isinstance(obj, list | tuple):
        return [_plain(v) for v in obj]
    if isinstance(obj, datetime.date):
        return obj.isoformat()
    types = getattr(obj, "openapi_types", None)
    keys = getattr(obj, "attribute_map", None)
    if isinstance(types, dict) and isinstance(keys, dict):
        values = ((keys[attr], getattr(obj, attr)) for attr in types)
        return {key: _plain(value) for key, value in values if value is not None}
    return obj


def _model_kind(obj: object) -> str:
    """`Deployment` for a `V1Deployment`: list APIs return items without `kind`."""
    found = _MODEL_CLASS.fullmatch(type(obj).__name__)
    return found.group(1) if found and not isinstance(obj, Mapping) else ""


def _decode(raw: Any, into: type[_T], what: str) -> _T:
    """Decode JSON values into a private struct; a bad field becomes an error naming `what`."""
    try:
        return msgspec.convert(raw, into)
    except msgspec.ValidationError as exc:
        raise AgentConfigError(f"{what}: not a usable Kubernetes object: {exc}") from None


def _raw_label(raw: Any, kind: str) -> str:
    """`<Kind> <name>.<ns>` from an undecoded object, for errors raised while decoding it."""
    meta = raw.get("metadata") if isinstance(raw, dict) else None
    meta = meta if isinstance(meta, dict) else {}
    return f"{kind or 'workload'} {meta.get('name', '?')}.{meta.get('namespace', '?')}"


def _resolve_kind(found: str, explicit: str | None, label: str) -> WorkloadKind:
    """The workload kind from the object or `kind=`; they must agree and be a supported kind."""
    if explicit and found and explicit != found:
        raise AgentConfigError(
            f"{label}: kind={explicit!r} contradicts the object's kind {found!r}"
        )
    kind = explicit or found
    if not kind:
        raise AgentConfigError(
            f"{label}: the object has no kind; pass kind='Deployment' or similar"
        )
    if kind not in _KINDS:
        raise AgentConfigError(
            f"{label}: unsupported workload kind {kind!r}; "
            "only Deployment, ReplicaSet and StatefulSet can have a traffic-agent"
        )
    return _KINDS[kind]


class _Target(NamedTuple):
    """A decoded workload with its resolved kind, and how errors name it."""

    workload: _Workload
    kind: WorkloadKind
    label: str

    @property
    def template(self) -> _PodTemplate:
        return self.workload.spec.template

    @property
    def name(self) -> str:
        return self.workload.metadata.name

    @property
    def namespace(self) -> str:
        return self.workload.metadata.namespace


def _load_workload(obj: object, explicit_kind: str | None) -> _Target:
    """Decode the workload and check what every later step relies on: kind, name, namespace."""
    raw = _plain(obj)
    found = (raw.get("kind") if isinstance(raw, dict) else None) or _model_kind(obj)
    label = _raw_label(raw, explicit_kind or str(found))
    kind = _resolve_kind(str(found), explicit_kind, label)
    workload = _decode(raw, _Workload, label)
    meta = workload.metadata
    if not meta.name or not meta.namespace:
        raise AgentConfigError(f"{label}: metadata.name and metadata.namespace must both be set")
    return _Target(workload, kind, f"{kind} {meta.name}.{meta.namespace}")


def _load_services(objs: Iterable[object], target: _Target) -> list[_Service]:
    """The given services of the workload's namespace, in name order (the API's list order)."""
    services = []
    for obj in objs:
        raw = _plain(obj)
        svc = _decode(raw, _Service, f"{target.label}: {_raw_label(raw, 'Service')}")
        if svc.metadata.namespace in ("", target.namespace):
            services.append(svc)
    return sorted(services, key=lambda svc: svc.metadata.name)


# -- Finding services and their ports (spec 2.1, 2.2)


def _format_labels(labels: Mapping[str, str]) -> str:
    """Labels the way a label selector is written: `app=echo,tier=web`."""
    return ",".join(f"{k}={v}" for k, v in sorted(labels.items())) or "<none>"


def _selects(svc: _Service, labels: Mapping[str, str]) -> bool:
    """A non-empty selector whose every key/value is among the labels; empty selects nothing."""
    selector = svc.spec.selector
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def _find_service_by_name(target: _Target, services: list[_Service], name: str) -> list[_Service]:
    """The one service named by `inject-service-name` (its selector is not checked, as in 2.6)."""
    for svc in services:
        if svc.metadata.name == name:
            return [svc]
    known = ", ".join(svc.metadata.name for svc in services) or "none"
    raise AgentConfigError(
        f"unable to find service {name} specified by annotation {INJECT_SERVICE_NAME} declared "
        f"in the pod template of {target.label} (services given: {known})"
    )


def _find_services(target: _Target, services: list[_Service]) -> list[_Service]:
    """Spec 2.1: the annotated service, else every service selecting the template's labels."""
    meta = target.template.metadata
    name = meta.annotations.get(INJECT_SERVICE_NAME, "")
    if name:
        return _find_service_by_name(target, services, name)
    if not meta.labels:
        raise AgentConfigError(
            f"unable to resolve a service using the pod template of {target.label} "
            "because it has no labels"
        )
    found = [svc for svc in services if _selects(svc, meta.labels)]
    if not found:
        considered = "; ".join(
            f"{svc.metadata.name} selects {_format_labels(svc.spec.selector)}" for svc in services
        )
        raise AgentConfigError(
            f"unable to find services that selects the pod template of {target.label} using "
            f"labels {_format_labels(meta.labels)} (services considered: {considered or 'none'})"
        )
    return found


def port_name_errors(name: str) -> list[str]:
    """Kubernetes' IANA_SVC_NAME rules (what `IsValidPortName` reports); empty when valid."""
    errors = []
    if len(name) > 15:
        errors.append("must be no more than 15 characters")
    if not re.fullmatch(r"[-a-z0-9]+", name):
        errors.append("must contain only alpha-numeric characters (a-z, 0-9), and hyphens (-)")
    if not re.search(r"[a-z]", name):
        errors.append("must contain at least one letter (a-z)")
    if "--" in name:
        errors.append("must not contain consecutive hyphens")
    if name.startswith("-") or name.endswith("-"):
        errors.append("must not begin or end with a hyphen")
    return errors


def _target_number(sp: _ServicePort) -> int:
    """The numeric target: an int `targetPort`, or `port` when it is unset or zero."""
    return sp.target_port if isinstance(sp.target_port, int) and sp.target_port else sp.port


def _is_named(sp: _ServicePort) -> bool:
    """Whether `targetPort` names a container port (a JSON string, as Kubernetes reads it)."""
    return isinstance(sp.target_port, str) and sp.target_port != ""


def _port_filter(target: _Target) -> tuple[str, int | None]:
    """The `inject-service-port` value and its number when numeric; an invalid name is an error."""
    value = target.template.metadata.annotations.get(INJECT_SERVICE_PORT, "")
    if not value or _GO_INT.fullmatch(value):
        return value, int(value) if value else None
    errors = port_name_errors(value)
    if errors:
        raise AgentConfigError(
            f"{target.label}: annotation {INJECT_SERVICE_PORT}={value!r} on the pod template is "
            f"neither a port number nor a valid port name: {'; '.join(errors)}"
        )
    return value, None


def _filter_ports(svc: _Service, value: str, number: int | None) -> tuple[_ServicePort, ...]:
    """Spec 2.2: a number compares with the target number, a name with the port's name."""
    if not value:
        return svc.spec.ports
    if number is not None:
        return tuple(sp for sp in svc.spec.ports if _target_number(sp) == number)
    return tuple(sp for sp in svc.spec.ports if sp.name == value)


# -- Matching service ports to container ports (spec 2.3)


def _protocol(value: str) -> str:
    """Kubernetes' default protocol for an unset field."""
    return value or "TCP"


class _AppPort(NamedTuple):
    """The app's side of one connection: which container, and its port's name and number."""

    container: _Container
    name: str
    number: int


def _match_named(sp: _ServicePort, containers: Iterable[_Container]) -> _AppPort | None:
    """The first container port with the targetPort's name and the same protocol."""
    for cn in containers:
        for cp in cn.ports:
            if cp.name == sp.target_port and _protocol(cp.protocol) == _protocol(sp.protocol):
                return _AppPort(cn, cp.name, cp.container_port)
    return None


def _match_numeric(sp: _ServicePort, containers: Iterable[_Container]) -> _AppPort | None:
    """The first container port with the target number, else the first container without ports.

    The fallback is what makes `kubectl create deploy` + `kubectl expose --target-port` work:
    such containers declare no ports at all.
    """
    number = _target_number(sp)
    portless = None
    for cn in containers:
        if not cn.ports and portless is None:
            portless = cn
        for cp in cn.ports:
            if cp.container_port == number and _protocol(cp.protocol) == _protocol(sp.protocol):
                return _AppPort(cn, cp.name, number)
    return _AppPort(portless, "", number) if portless else None


def _match(sp: _ServicePort, containers: Iterable[_Container]) -> _AppPort | None:
    """Spec 2.3 for either kind of targetPort."""
    return _match_named(sp, containers) if _is_named(sp) else _match_numeric(sp, containers)


def _describe_port(sp: _ServicePort) -> str:
    """`http (80/TCP, targetPort web)` or `81/TCP (targetPort 8081)` for error messages."""
    number = f"{sp.port}/{_protocol(sp.protocol)}"
    target = sp.target_port if _is_named(sp) else _target_number(sp)
    if sp.name:
        return f"{sp.name} ({number}, targetPort {target})"
    return f"{number} (targetPort {target})"


def _describe_containers(containers: Iterable[_Container]) -> str:
    """`echo [http 8080/TCP, 8081/TCP], side [no ports]` for error messages."""
    parts = []
    for cn in containers:
        ports = ", ".join(
            f"{cp.name + ' ' if cp.name else ''}{cp.container_port}/{_protocol(cp.protocol)}"
            for cp in cn.ports
        )
        parts.append(f"{cn.name} [{ports or 'no ports'}]")
    return ", ".join(parts) or "none"


# -- Building the Sidecar


def env_prefix(index: int) -> str:
    """`A_` for container 0: base-26 capital letters of the index (25 `Z_`, 26 `BA_`), then `_`."""
    digits = ""
    while True:
        index, digit = divmod(index, 26)
        digits = chr(ord("A") + digit) + digits
        if index == 0:
            return digits + "_"


class _Builder:
    """Collects intercepts per container and allocates agent ports across the whole workload."""

    def __init__(self, target: _Target, first_agent_port: int) -> None:
        self.target = target
        self.first_agent_port = first_agent_port
        self.agent_ports: dict[int, int] = {}  # container port number -> agent port (spec 1.6)
        self.containers: dict[str, tuple[_Container, list[Intercept]]] = {}
        self.notes: list[str] = []  # why services/ports gave nothing, for the no-match error

    def agent_port(self, container_port: int) -> int:
        """The container port's agent port: reused by number, else the next one in sequence."""
        port = self.agent_ports.setdefault(
            container_port, self.first_agent_port + len(self.agent_ports)
        )
        if port > MAX_PORT:
            raise AgentConfigError(
                f"{self.target.label}: agent ports starting at {self.first_agent_port} run past "
                f"65535 at container port {container_port}"
            )
        return port

    def add(self, svc: _Service, sp: _ServicePort, app: _AppPort, protocol: Protocol) -> None:
        """One service port -> container port connection."""
        icept = Intercept(
            container_port_name=app.name,
            service_name=svc.metadata.name,
            service_uid=svc.metadata.uid,
            service_port_name=sp.name,
            target_port_numeric=not _is_named(sp),
            protocol=protocol,
            app_protocol=sp.app_protocol,
            container_port=app.number,
            service_port=sp.port,
            agent_port=self.agent_port(app.number),
        )
        self.containers.setdefault(app.container.name, (app.container, []))[1].append(icept)

    def consider(self, svc: _Service, sp: _ServicePort) -> None:
        """Add the connection for a service port, or note why it has none (skipping is silent)."""
        where = f"service {svc.metadata.name} port {_describe_port(sp)}"
        protocol = _PROTOCOLS.get(_protocol(sp.protocol))
        if protocol is None:
            self.notes.append(f"{where}: protocol {sp.protocol} is not supported by the agent")
            return
        app = _match(sp, self.target.template.spec.containers)
        if app is None:
            self.notes.append(f"{where}: no container port matches")
        elif app.container.name == AGENT_CONTAINER:
            self.notes.append(f"{where}: matches the {AGENT_CONTAINER} container")
        else:
            self.add(svc, sp, app, protocol)

    def build(self) -> tuple[Container, ...]:
        """The containers in the order they were first matched, each with its env prefix."""
        return tuple(
            Container(
                name=name,
                intercepts=tuple(icepts),
                env_prefix=env_prefix(index),
                mount_point=APP_MOUNTS_PREFIX + name,
                mounts=tuple(m.mount_path for m in cn.volume_mounts) or None,
            )
            for index, (name, (cn, icepts)) in enumerate(self.containers.items())
        )


def _app_containers(target: _Target) -> list[_Container]:
    """The template's containers except a (manually added) traffic-agent."""
    containers = target.template.spec.containers
    return [cn for cn in containers if cn.name != AGENT_CONTAINER]


def _check_first_agent_port_free(target: _Target, agent_port: int) -> None:
    """Spec 1.6: no app container may already expose the first agent port."""
    for cn in _app_containers(target):
        if any(cp.container_port == agent_port for cp in cn.ports):
            raise AgentConfigError(
                f"the {target.label} pod container {cn.name} is exposing the same port "
                f"({agent_port}) as the {AGENT_CONTAINER} sidecar; choose another first "
                "agent port (TELEPRESENCE_AGENT_PORT)"
            )


def _check_agent_ports_free(target: _Target, agent_ports: Mapping[int, int]) -> None:
    """Beyond 2.6: later agent ports (9901, ...) must not collide with app ports either.

    2.6 only checked the first one; a collision makes the agent fail to bind, or makes iptables
    redirect a port onto itself, which is much harder to diagnose than this error.
    """
    owner = {agent: app for app, agent in agent_ports.items()}
    for cn in _app_containers(target):
        for cp in cn.ports:
            app = owner.get(cp.container_port)
            if app is not None:
                raise AgentConfigError(
                    f"the {target.label} pod container {cn.name} is exposing port "
                    f"{cp.container_port}, which the {AGENT_CONTAINER} sidecar needs as the "
                    f"agent port for container port {app}; choose another first agent port "
                    "(TELEPRESENCE_AGENT_PORT)"
                )


def _no_match_error(target: _Target, builder: _Builder) -> AgentConfigError:
    """Spec 2's "found no service" error, listing every service port considered and why not."""
    considered = "; ".join(builder.notes) or "no service ports"
    return AgentConfigError(
        f"found no service with a port that matches a container in the pod template of "
        f"{target.label}. Considered: {considered}. Containers: "
        f"{_describe_containers(target.template.spec.containers)}"
    )


def generate(
    workload: object,
    services: Iterable[object],
    settings: GeneratorSettings,
    *,
    kind: str | None = None,
) -> Sidecar:
    """The agent config of `workload` (spec section 2), given the services of its namespace.

    `workload` and `services` are dicts in Kubernetes JSON form or kubernetes-asyncio models;
    `kind` is needed only when the object carries none (list results do not). Services of other
    namespaces are ignored. Raises `AgentConfigError` when no service port reaches a container.
    """
    target = _load_workload(workload, kind)
    _check_first_agent_port_free(target, settings.agent_port)
    svcs = _find_services(target, _load_services(services, target))
    value, number = _port_filter(target)
    builder = _Builder(target, settings.agent_port)
    for svc in svcs:
        ports = _filter_ports(svc, value, number)
        if not ports:
            builder.notes.append(
                f"service {svc.metadata.name}: no port matches {INJECT_SERVICE_PORT}={value}"
            )
        for sp in ports:
            builder.consider(svc, sp)
    if not builder.containers:
        raise _no_match_error(target, builder)
    _check_agent_ports_free(target, builder.agent_ports)
    return Sidecar(
        agent_image=settings.agent_image,
        agent_name=target.name,
        namespace=target.namespace,
        log_level=settings.log_level,
        workload_name=target.name,
        workload_kind=target.kind,
        manager_host=f"traffic-manager.{settings.manager_namespace}",
        manager_port=settings.manager_port,
        api_port=settings.api_port,
        containers=builder.build(),
    )


# -- Describing a generated config


class PortCandidate(NamedTuple):
    """One interceptable service port of a Sidecar, as a user names it with --service/--port."""

    service_name: str
    port: str  # the service port's name, or its number when unnamed
    protocol: Protocol
    container_name: str
    container_port: int
    agent_port: int

    def __str__(self) -> str:
        return (
            f"service {self.service_name} port {self.port}/{self.protocol} -> container "
            f"{self.container_name} port {self.container_port} (agent port {self.agent_port})"
        )


def service_port_candidates(sidecar: Sidecar) -> list[PortCandidate]:
    """Every intercept of a sidecar as a candidate, in config order, for listing in errors."""
    return [
        PortCandidate(
            icept.service_name,
            icept.service_port_name or str(icept.service_port),
            icept.protocol,
            cn.name,
            icept.container_port,
            icept.agent_port,
        )
        for cn in sidecar.containers
        for icept in cn.intercepts
    ]
