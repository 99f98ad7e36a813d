"""The agent configuration: one `Sidecar` per workload, as stored in `telepresence-agents`.

These structs are the single schema shared by the agent (which reads the mounted `config.yaml`)
and tpcontrol (which generates and writes the ConfigMap entries). Keys are camelCase on the wire,
zero values are omitted when encoding (as the Go encoder's `omitempty` does), and unknown keys are
ignored so that entries written by newer managers still load.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec

Port = Annotated[int, msgspec.Meta(ge=0, le=65535)]
Protocol = Literal["TCP", "UDP"]
WorkloadKind = Literal["Deployment", "ReplicaSet", "StatefulSet", ""]


class ConfigError(Exception):
    """A configuration that cannot be used; the message names the source and the field."""


class Intercept(msgspec.Struct, frozen=True, rename="camel", omit_defaults=True):
    """One service-port -> container-port connection that the agent can take over."""

    container_port_name: str = ""
    service_name: str = ""
    service_uid: str = msgspec.field(default="", name="serviceUID")
    service_port_name: str = ""
    target_port_numeric: bool = False
    protocol: Protocol = "TCP"
    app_protocol: str = ""
    headless: bool = False
    container_port: Port = 0
    service_port: Port = 0
    agent_port: Port = 0

    def matches_port_identifier(self, identifier: str) -> bool:
        """Whether `name`, `number`, `name/PROTO` or `number/PROTO` addresses this intercept."""
        ident, _, proto = identifier.partition("/")
        if proto and proto.upper() != self.protocol:
            return False
        if ident.isdigit():
            return int(ident) == self.service_port
        return ident == self.service_port_name


class Container(msgspec.Struct, frozen=True, rename="camel", omit_defaults=True):
    """An app container with at least one interceptable port."""

    name: str
    intercepts: tuple[Intercept, ...] = ()
    env_prefix: str = ""
    mount_point: str = ""
    mounts: tuple[str, ...] | None = None


class Sidecar(msgspec.Struct, frozen=True, rename="camel", omit_defaults=True):
    """The whole agent configuration of one workload (the value of one ConfigMap key)."""

    create: bool = False
    manual: bool = False
    agent_image: str = ""
    agent_name: str = ""
    namespace: str = ""
    log_level: str = ""
    workload_name: str = ""
    workload_kind: WorkloadKind = ""
    manager_host: str = ""
    manager_port: Port = 0
    api_port: Port = 0
    containers: tuple[Container, ...] = ()


class Listener(msgspec.Struct, frozen=True):
    """One agent port the engine listens on, and the app port it forwards to by default.

    Several intercepts that share (agentPort, protocol) share one listener; the first one decides
    the app's container port, as the 2.6 agent does.
    """

    agent_port: int
    protocol: Protocol
    container_name: str
    container_port: int
    intercepts: tuple[Intercept, ...]


def listeners(sidecar: Sidecar) -> list[Listener]:
    """The port-unique listeners of a sidecar, in config order."""
    found: dict[tuple[int, str], Listener] = {}
    for container in sidecar.containers:
        for icept in container.intercepts:
            key = (icept.agent_port, icept.protocol)
            seen = found.get(key)
            if seen is None:
                found[key] = Listener(
                    icept.agent_port, icept.protocol, container.name, icept.container_port, (icept,)
                )
            else:
                found[key] = msgspec.structs.replace(seen, intercepts=(*seen.intercepts, icept))
    return list(found.values())


def unserved(sidecar: Sidecar) -> list[str]:
    """Why some of the config's ports will not reach the app through tpproxy (UDP, which it
    does not forward yet): the agent-init and the sidecar both warn with these lines."""
    return [
        f"agent port {lst.agent_port}/UDP (container {lst.container_name} port "
        f"{lst.container_port}) is redirected but not forwarded: UDP is not supported yet, "
        "so that traffic will not reach the app"
        for lst in listeners(sidecar)
        if lst.protocol == "UDP"
    ]


def _normalise_keys(raw: Any) -> Any:
    """Accept `Mounts` (written by `telepresence genyaml`) as well as `mounts`."""
    if not isinstance(raw, dict):
        return raw
    containers = raw.get("containers")
    if isinstance(containers, list):
        for container in containers:
            if isinstance(container, dict) and "Mounts" in container:
                mounts = container.pop("Mounts")
                container.setdefault("mounts", mounts)
    return raw


def _check(sidecar: Sidecar, source: str) -> None:
    """Semantic checks msgspec cannot express: the ones that would make the agent misbehave."""
    by_agent_port: dict[tuple[int, str], tuple[str, int]] = {}
    for ci, container in enumerate(sidecar.containers):
        if not container.name:
            raise ConfigError(f"{source}: $.containers[{ci}].name: must not be empty")
        for ii, icept in enumerate(container.intercepts):
            where = f"$.containers[{ci}].intercepts[{ii}]"
            if icept.agent_port == 0:
                raise ConfigError(f"{source}: {where}.agentPort: must be set (1-65535)")
            if icept.container_port == 0:
                raise ConfigError(f"{source}: {where}.containerPort: must be set (1-65535)")
            key = (icept.agent_port, icept.protocol)
            first = by_agent_port.setdefault(key, (container.name, icept.container_port))
            if first != (container.name, icept.container_port):
                raise ConfigError(
                    f"{source}: {where}.agentPort: {icept.agent_port}/{icept.protocol} already "
                    f"forwards to container {first[0]!r} port {first[1]}, cannot also forward to "
                    f"container {container.name!r} port {icept.container_port}"
                )


def decode_sidecar(data: bytes | str, source: str = "<config>") -> Sidecar:
    """Decode and check one Sidecar YAML document; errors name `source` and the field path."""
    try:
        raw = msgspec.yaml.decode(data)
    except msgspec.DecodeError as exc:
        detail = str(exc).replace('"<byte string>"', repr(source)).replace("\n", " ")
        raise ConfigError(f"{source}: not valid YAML: {detail}") from None
    if raw is None:
        raise ConfigError(f"{source}: empty document, expected a Sidecar mapping")
    if not isinstance(raw, dict):
        kind = type(raw).__name__
        raise ConfigError(f"{source}: expected a mapping at the top level, got {kind}")
    try:
        sidecar = msgspec.convert(_normalise_keys(raw), Sidecar)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    _check(sidecar, source)
    return sidecar


def load_sidecar(path: str | Path) -> Sidecar:
    """Read the agent's `config.yaml`; a missing or unreadable file is a ConfigError too."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from None
    return decode_sidecar(data, str(path))


def encode_sidecar(sidecar: Sidecar) -> bytes:
    """YAML for a ConfigMap value; zero values are omitted and `mounts` is written lower-case."""
    return msgspec.yaml.encode(sidecar)


def intercepts(sidecar: Sidecar) -> Iterable[tuple[Container, Intercept]]:
    """Every (container, intercept) pair of a sidecar, in config order."""
    for container in sidecar.containers:
        for icept in container.intercepts:
            yield container, icept
