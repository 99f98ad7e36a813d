"""The JSON Patch that injects the traffic-agent into a pod (spec §3.6). Pure code, no I/O.

`pod_patch` takes a pod as the API server sends it in an AdmissionReview (Kubernetes JSON,
camelCase) and the agent config of its workload, and returns RFC 6902 operations in the
spec's order:

a. the `tel-agent-init` init container (only when an intercept needs iptables),
b. the `traffic-agent` container,
c. the three agent volumes,
d. hidden (renamed) app ports and the probes that name them,
e. the `inject-traffic-agent: enabled` pod annotation,
f. `TELEPRESENCE_API_PORT` in the app containers (only when `apiPort` is set).

Applying the patch and asking again yields `[]`: the webhook may see a pod twice (reinvocation,
a re-created pod, a hand-injected template), and a second patch would fight the first.

Deliberate changes from 2.6, each because the 2.6 form is fragile or wrong:

1. `add` wherever 2.6 sends `replace` for a key the pod does not have (`/spec/initContainers`,
   `/spec/volumes`, `/spec/containers/<i>/env`). RFC 6902 requires `replace` targets to exist;
   only the Go patch library forgives it, `jsonpatch` (and other servers) reject it.
2. Every JSON-pointer segment is escaped (`~` -> `~0`, `/` -> `~1`). No map key is addressed
   today (annotations are replaced as a whole map, as in 2.6), so this is a safety net.
3. Config containers that the pod lacks are skipped (as in 2.6) for *every* step, ports included
   (§1.6 lists agent ports for every config container, matched or not). If no config container
   matches, or the config cannot work in this pod (an app already exposes an agent port, a
   hidden port name would collide), `PatchError` names the pod and the container instead of a
   patch the API server rejects later with a less helpful message, or an agent that cannot bind
   its port.
4. The three volumes are added one by one when missing by name; 2.6 skipped all three as soon
   as `traffic-annotations` existed, and duplicated the other two if only that one was missing.
5. `TELEPRESENCE_API_PORT` is checked per app container; 2.6 shared one "already present" flag
   across containers (§8.15), so later containers missed it. An existing entry with another value
   is replaced instead of getting a second, conflicting entry appended.
6. While `apiPort` is set, the app's own `TELEPRESENCE_API_PORT` (the one step f writes) is not
   copied into the agent as `_TEL_APP_<prefix>TELEPRESENCE_API_PORT`; copying it would make a
   second pass see a different agent container and replace it (2.6 is not idempotent there).
   The client still receives the variable from the agent's own env (§5.9).
7. The agent's ports are de-duplicated on (agentPort, protocol) across containers too (via
   `tpproxy.config.listeners`), so a config that gives two containers one agent port cannot produce
   a pod with a duplicated container port.
8. An empty `inject-traffic-agent` annotation counts as missing and is set to `enabled`, since the
   webhook marks every pod it injects (§Constants).
9. `agent_command` (not in 2.6) sets `command` on the agent *and* the init container: both run the
   same image, so an image whose entrypoint is not the agent binary needs it on both.
   2.6 relies on the image entrypoint (`traffic`) and sends only `args`.

Service-account token mounts (`kube-api-access-xxxxx` since K8s 1.21, `<sa>-token-xxxxx` before,
or anything under `/var/run/secrets/kubernetes.io/`) are ignored when comparing an existing agent or
init container: their names differ from pod to pod and the admission controller adds them to
containers it finds without one.

Long on purpose: it is spec section 3.6 end to end (init container, agent container, volumes,
hidden ports, probes), one pure function family whose steps share the same helpers.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Final

from tpcontrol.names import (
    AGENT_AUDIENCE,
    AGENT_CONTAINER,
    AGENTS_CONFIG_MAP,
    INIT_CONTAINER,
    INJECT_ANNOTATION,
)
from tpproxy.config import Container, Intercept, Listener, Sidecar, listeners
from tpproxy.settings import ADMIN_PORT, READY_FILE
from tpproxy.wire import MANAGER_TOKEN_FILE

__all__ = [
    "AGENT_CONTAINER",
    "INIT_CONTAINER",
    "INJECT_ANNOTATION",
    "PatchError",
    "agent_container",
    "agent_volumes",
    "hidden_port_name",
    "init_container",
    "pod_patch",
]

Json = dict[str, Any]
Op = dict[str, Any]


ANNOTATIONS_VOLUME: Final = "traffic-annotations"
CONFIG_VOLUME: Final = "traffic-config"
EXPORT_VOLUME: Final = "export-volume"
MANAGER_TOKEN_VOLUME: Final = "traffic-manager-token"
MANAGER_TOKEN_DIR: Final = MANAGER_TOKEN_FILE.rpartition("/")[0]
MANAGER_TOKEN_SECONDS: Final = 3600
POD_INFO_DIR: Final = "/tel_pod_info"
CONFIG_DIR: Final = "/etc/traffic-agent"
EXPORTS_DIR: Final = "/tel_app_exports"
APP_MOUNTS_ROOT: Final = "/tel_app_mounts"

API_PORT_ENV: Final = "TELEPRESENCE_API_PORT"
APP_ENV_PREFIX: Final = "_TEL_APP_"
HIDDEN_PORT_PREFIX: Final = "tm-"
MAX_PORT_NAME: Final = 15

SECRETS_DIR: Final = "/var/run/secrets/"
SERVICE_ACCOUNT_DIR: Final = "/var/run/secrets/kubernetes.io/"
_TOKEN_VOLUME: Final = re.compile(
    r"kube-api-access-[a-z0-9]+|[a-z0-9][-a-z0-9.]*-token-[a-z0-9]{5}"
)
PROBES: Final = ("livenessProbe", "readinessProbe", "startupProbe")
_IGNORED_AGENT_KEYS: Final = frozenset(
    {"imagePullPolicy", "resources", "terminationMessagePath", "terminationMessagePolicy"}
)


class PatchError(Exception):
    """The pod cannot be given this agent config; the message names the pod and the container."""


@dataclass(frozen=True)
class _App:
    """A config container and the pod container it matched, with its index in `spec.containers`."""

    index: int
    spec: Json
    config: Container


def pod_patch(
    pod: Json, sidecar: Sidecar, *, agent_command: Sequence[str] | None = None
) -> list[Op]:
    """The JSON Patch operations (steps a-f of §3.6, in order) that inject the agent into `pod`.

    `pod` is not modified and the returned values share nothing with it. `agent_command`, when
    given, becomes the `command` of the agent and init containers (e.g. `["tpproxy"]`, so that the
    agent runs `tpproxy agent`); without it the image entrypoint runs, as in 2.6.
    Raises `PatchError` when the config cannot be applied to this pod.
    """
    apps = _matched_apps(pod, sidecar)
    ports = _port_unique(apps)
    _check_agent_ports(pod, ports)
    ops = [
        *_init_container_ops(pod, apps, sidecar, agent_command),
        *_agent_container_ops(pod, apps, sidecar, agent_command),
        *_volume_ops(pod, sidecar),
        *_hide_port_ops(pod, apps, ports),
        *_annotation_ops(pod),
        *_api_port_ops(apps, sidecar.api_port),
    ]
    return copy.deepcopy(ops)


def init_container(sidecar: Sidecar, *, agent_command: Sequence[str] | None = None) -> Json:
    """The `tel-agent-init` container, which installs the iptables REDIRECT rules (§5.7)."""
    container: Json = {"name": INIT_CONTAINER, "image": sidecar.agent_image}
    if agent_command is not None:
        container["command"] = list(agent_command)
    container["args"] = ["agent-init"]
    container["volumeMounts"] = [{"name": CONFIG_VOLUME, "mountPath": CONFIG_DIR}]
    container["securityContext"] = {"capabilities": {"add": ["NET_ADMIN"]}}
    return container


def agent_container(
    pod: Json, sidecar: Sidecar, *, agent_command: Sequence[str] | None = None
) -> Json | None:
    """The `traffic-agent` container for `pod`, or None when the config gives it no port."""
    return _agent_container(_matched_apps(pod, sidecar), sidecar, agent_command)


def agent_volumes(sidecar: Sidecar) -> list[Json]:
    """The pod info, agent config and export volumes that the agent container mounts."""
    return [
        {
            "name": ANNOTATIONS_VOLUME,
            "downwardAPI": {
                "items": [
                    {
                        "path": "annotations",
                        "fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.annotations"},
                    }
                ]
            },
        },
        {
            "name": CONFIG_VOLUME,
            "configMap": {
                "name": AGENTS_CONFIG_MAP,
                "items": [{"key": sidecar.agent_name, "path": "config.yaml"}],
            },
        },
        {"name": EXPORT_VOLUME, "emptyDir": {}},
        # The agent's credential towards the manager: bound to the pod, for the manager only,
        # rotated by the kubelet (the agent reads it for every call).
        {
            "name": MANAGER_TOKEN_VOLUME,
            "projected": {
                "sources": [
                    {
                        "serviceAccountToken": {
                            "audience": AGENT_AUDIENCE,
                            "expirationSeconds": MANAGER_TOKEN_SECONDS,
                            "path": MANAGER_TOKEN_FILE.rpartition("/")[2],
                        }
                    }
                ]
            },
        },
    ]


def hidden_port_name(name: str) -> str:
    """The name an app port gets when the agent takes its name over: `tm-<name>`, max 15 chars."""
    return (HIDDEN_PORT_PREFIX + name)[:MAX_PORT_NAME]


# --- the pod and the config -------------------------------------------------------------------


def _pod_label(pod: Json) -> str:
    """`<name>.<namespace>` as 2.6 error messages print it; generateName stands in for a name."""
    meta = pod.get("metadata") or {}
    name = meta.get("name") or meta.get("generateName") or "<unnamed>"
    return f"{name}.{meta.get('namespace') or '<no namespace>'}"


def _containers(pod: Json) -> list[Json]:
    """The pod's `spec.containers`; a pod without them cannot be patched."""
    spec = pod.get("spec")
    containers = spec.get("containers") if isinstance(spec, dict) else None
    if not isinstance(containers, list) or not all(isinstance(c, dict) for c in containers):
        raise PatchError(f"pod {_pod_label(pod)}: spec.containers is missing or not a list")
    if not isinstance(pod.get("metadata"), dict):
        raise PatchError(f"pod {_pod_label(pod)}: metadata is missing")
    return containers


def _matched_apps(pod: Json, sidecar: Sidecar) -> list[_App]:
    """The config containers found by name in the pod, in config order; at least one must match."""
    containers = _containers(pod)
    indexes: dict[str, int] = {}
    for i, container in enumerate(containers):
        indexes.setdefault(container.get("name", ""), i)
    indexes.pop(AGENT_CONTAINER, None)
    apps = [
        _App(indexes[cc.name], containers[indexes[cc.name]], cc)
        for cc in sidecar.containers
        if cc.name in indexes
    ]
    if not apps:
        wanted = ", ".join(repr(cc.name) for cc in sidecar.containers) or "no containers"
        raise PatchError(
            f"pod {_pod_label(pod)}: agent config {sidecar.agent_name!r} names {wanted}, "
            f"but the pod has none of them (it has {', '.join(map(repr, indexes)) or 'none'})"
        )
    return apps


def _port_unique(apps: Sequence[_App]) -> list[Listener]:
    """One entry per (agentPort, protocol) of the matched containers; its first intercept rules."""
    return listeners(Sidecar(containers=tuple(app.config for app in apps)))


def _check_agent_ports(pod: Json, ports: Iterable[Listener]) -> None:
    """Refuse a pod in which an app container already exposes a port the agent must listen on."""
    for listener in ports:
        for container in _containers(pod):
            if container.get("name") == AGENT_CONTAINER:
                continue
            for port in container.get("ports") or []:
                if (port.get("containerPort"), port.get("protocol") or "TCP") == (
                    listener.agent_port,
                    listener.protocol,
                ):
                    raise PatchError(
                        f"pod {_pod_label(pod)}: container {container.get('name')!r} exposes port "
                        f"{listener.agent_port}/{listener.protocol}, which the traffic-agent needs "
                        f"for container {listener.container_name!r}"
                    )


def _needs_init_container(apps: Iterable[_App]) -> bool:
    """Numeric target ports and headless services reach the agent only through iptables."""
    return any(
        icept.target_port_numeric or icept.headless
        for app in apps
        for icept in app.config.intercepts
    )


# --- JSON Patch building blocks -----------------------------------------------------------------


def _pointer(*segments: str | int) -> str:
    """An RFC 6901 JSON pointer; `~` and `/` inside a segment are escaped."""
    return "".join("/" + str(s).replace("~", "~0").replace("/", "~1") for s in segments)


def _op(op: str, path: str, value: Any = None) -> Op:
    """One patch operation; `remove` carries no value."""
    return {"op": op, "path": path} if op == "remove" else {"op": op, "path": path, "value": value}


def _index_of(items: Sequence[Json], name: str) -> int | None:
    """Index of the first item whose `name` is `name`."""
    return next((i for i, item in enumerate(items) if item.get("name") == name), None)


def _is_token_mount(mount: Json) -> bool:
    """A service-account token mount, whose volume name is random per pod."""
    return bool(_TOKEN_VOLUME.fullmatch(mount.get("name", ""))) or mount.get(
        "mountPath", ""
    ).startswith(SERVICE_ACCOUNT_DIR)


def _without_tokens(mounts: Sequence[Json] | None) -> list[Json]:
    """Volume mounts as compared: the admission controller's token mounts left out."""
    return [m for m in mounts or [] if not _is_token_mount(m)]


# --- a: init container --------------------------------------------------------------------------


def _init_container_ops(
    pod: Json, apps: Sequence[_App], sidecar: Sidecar, agent_command: Sequence[str] | None
) -> list[Op]:
    """Add, replace or remove `tel-agent-init` so that it exists exactly when iptables is needed."""
    existing: list[Json] = pod["spec"].get("initContainers") or []
    index = _index_of(existing, INIT_CONTAINER)
    if not _needs_init_container(apps):
        return [] if index is None else [_op("remove", _pointer("spec", "initContainers", index))]
    wanted = init_container(sidecar, agent_command=agent_command)
    if not existing:
        return [_op("add", _pointer("spec", "initContainers"), [wanted])]
    if index is None:
        return [_op("add", _pointer("spec", "initContainers", "-"), wanted)]
    if _init_essentials(existing[index]) == _init_essentials(wanted):
        return []
    return [_op("replace", _pointer("spec", "initContainers", index), wanted)]


def _init_essentials(container: Json) -> Json:
    """What makes two init containers the same (§3.6a); defaults added by the API server are not."""
    security = container.get("securityContext") or {}
    return {
        "image": container.get("image"),
        "command": container.get("command"),
        "args": container.get("args"),
        "volumeMounts": _without_tokens(container.get("volumeMounts")),
        "capabilities": security.get("capabilities"),
    }


# --- b: agent container -------------------------------------------------------------------------


def _agent_container_ops(
    pod: Json, apps: Sequence[_App], sidecar: Sidecar, agent_command: Sequence[str] | None
) -> list[Op]:
    """Add the agent container, or replace an existing one that differs from the wanted one."""
    wanted = _agent_container(apps, sidecar, agent_command)
    if wanted is None:
        return []
    containers = _containers(pod)
    index = _index_of(containers, AGENT_CONTAINER)
    if index is None:
        return [_op("add", _pointer("spec", "containers", "-"), wanted)]
    if _agent_essentials(containers[index]) == _agent_essentials(wanted):
        return []
    return [_op("replace", _pointer("spec", "containers", index), wanted)]


def _agent_container(
    apps: Sequence[_App], sidecar: Sidecar, agent_command: Sequence[str] | None
) -> Json | None:
    """The wanted agent container; None when the matched containers give it no port."""
    ports = [_agent_port(listener.intercepts[0]) for listener in _port_unique(apps)]
    if not ports:
        return None
    container: Json = {"name": AGENT_CONTAINER, "image": sidecar.agent_image}
    if agent_command is not None:
        container["command"] = list(agent_command)
    container["args"] = ["agent"]
    container["ports"] = ports
    container["env"] = _agent_env(apps, sidecar.api_port)
    env_from = [item for app in apps for item in _app_env_from_copies(app)]
    if env_from:
        container["envFrom"] = env_from
    container["volumeMounts"] = [*_app_mounts(apps), *_agent_own_mounts()]
    container["readinessProbe"] = {"exec": {"command": ["/bin/stat", READY_FILE]}}
    # Answered on the agent's event loop: a loop that is stuck fails it and the kubelet
    # restarts the agent, instead of a Ready pod that forwards nothing.
    # No capability, no escalation; its redirects are the init container's job (NET_ADMIN).
    container["securityContext"] = {
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
    }
    container["resources"] = {
        "requests": {"cpu": "10m", "memory": "48Mi"},
        "limits": {"memory": "256Mi"},
    }
    container["livenessProbe"] = {
        "httpGet": {"path": "/livez", "port": ADMIN_PORT},
        "periodSeconds": 10,
        "timeoutSeconds": 3,
        "failureThreshold": 3,
    }
    return container


def _agent_port(icept: Intercept) -> Json:
    """The agent's container port; it takes over the app port's name so Services resolve to it."""
    port: Json = {"name": icept.container_port_name} if icept.container_port_name else {}
    port["containerPort"] = icept.agent_port
    port["protocol"] = icept.protocol
    return port


def _agent_env(apps: Sequence[_App], api_port: int) -> list[Json]:
    """The app env copies, the API port and the agent's own downward-API variables."""
    env = [item for app in apps for item in _app_env_copies(app, api_port)]
    if api_port:
        env.append({"name": API_PORT_ENV, "value": str(api_port)})
    env.append(_field_env("_TEL_AGENT_POD_IP", "status.podIP"))
    env.append(_field_env("_TEL_AGENT_NAME", "metadata.name"))
    return env


def _field_env(name: str, field_path: str) -> Json:
    """An env var filled from a pod field by the downward API."""
    return {"name": name, "valueFrom": {"fieldRef": {"apiVersion": "v1", "fieldPath": field_path}}}


def _app_env_copies(app: _App, api_port: int) -> list[Json]:
    """The app's env as `_TEL_APP_<prefix><NAME>`; value/valueFrom verbatim (§5.9 strips it back).

    While an API port is configured the app's `TELEPRESENCE_API_PORT` is the one step f wrote,
    so it is not copied (deviation 6).
    """
    prefix = APP_ENV_PREFIX + app.config.env_prefix
    return [
        {**item, "name": prefix + item.get("name", "")}
        for item in app.spec.get("env") or []
        if not (api_port and item.get("name") == API_PORT_ENV)
    ]


def _app_env_from_copies(app: _App) -> list[Json]:
    """The app's envFrom sources with `_TEL_APP_<prefix>` put before their own prefix."""
    prefix = APP_ENV_PREFIX + app.config.env_prefix
    return [
        {**item, "prefix": prefix + item.get("prefix", "")}
        for item in app.spec.get("envFrom") or []
    ]


def _app_mounts(apps: Sequence[_App]) -> list[Json]:
    """Every app volume mount, moved under the container's mount point for the client's sshfs.

    Secrets under `/var/run/secrets/` (the service-account token above all) stay where client
    libraries look for them, and are mounted once: a container cannot mount one path twice.
    """
    mounts: list[Json] = []
    secret_paths: set[str] = set()
    for app in apps:
        for mount in app.spec.get("volumeMounts") or []:
            path = mount.get("mountPath", "")
            if not path.startswith(SECRETS_DIR):
                mounts.append({**mount, "mountPath": _under_mount_point(app.config, path)})
            elif path not in secret_paths:
                secret_paths.add(path)
                mounts.append(dict(mount))
    return mounts


def _under_mount_point(config: Container, path: str) -> str:
    """`<mountPoint>/<path without leading />`; an empty mountPoint means the 2.6 default."""
    mount_point = config.mount_point or f"{APP_MOUNTS_ROOT}/{config.name}"
    return f"{mount_point.rstrip('/')}/{path.lstrip('/')}"


def _agent_own_mounts() -> list[Json]:
    """The agent's pod info, config file and export directory."""
    return [
        {"name": ANNOTATIONS_VOLUME, "mountPath": POD_INFO_DIR},
        {"name": CONFIG_VOLUME, "mountPath": CONFIG_DIR},
        {"name": EXPORT_VOLUME, "mountPath": EXPORTS_DIR},
        {"name": MANAGER_TOKEN_VOLUME, "mountPath": MANAGER_TOKEN_DIR, "readOnly": True},
    ]


def _agent_essentials(container: Json) -> Json:
    """An agent container as compared (§3.6b): without the fields the API server defaults.

    Pull policy, resources (LimitRanges add them) and termination-message fields are dropped,
    probes reduce to their exec command, token mounts are left out, empty values count as absent.
    """
    essentials: Json = {}
    for key, value in container.items():
        if key in _IGNORED_AGENT_KEYS or value in (None, [], {}):
            continue
        if key in PROBES:
            value = (value.get("exec") or {}).get("command") or (value.get("httpGet") or {}).get(
                "path"
            )
        elif key == "volumeMounts":
            value = _without_tokens(value)
        essentials[key] = value
    return essentials


# --- c: volumes ---------------------------------------------------------------------------------


def _volume_ops(pod: Json, sidecar: Sidecar) -> list[Op]:
    """Add each agent volume the pod lacks (by name); the whole list if the pod has no volumes."""
    existing: list[Json] = pod["spec"].get("volumes") or []
    names = {volume.get("name") for volume in existing}
    missing = [volume for volume in agent_volumes(sidecar) if volume["name"] not in names]
    if not missing:
        return []
    if not existing:
        return [_op("add", _pointer("spec", "volumes"), missing)]
    return [_op("add", _pointer("spec", "volumes", "-"), volume) for volume in missing]


# --- d: hidden ports ----------------------------------------------------------------------------


def _hide_port_ops(pod: Json, apps: Sequence[_App], ports: Iterable[Listener]) -> list[Op]:
    """Rename the app ports whose names the agent takes over (named target ports only)."""
    by_name = {app.config.name: app for app in apps}
    ops: list[Op] = []
    for listener in ports:
        icept = listener.intercepts[0]
        if icept.target_port_numeric or icept.headless or not icept.container_port_name:
            continue
        app = by_name[listener.container_name]
        ops += _rename_port_ops(pod, app, icept.container_port_name)
        ops += _rename_probe_ops(app, icept.container_port_name)
    return ops


def _rename_port_ops(pod: Json, app: _App, name: str) -> list[Op]:
    """Rename the first port called `name` to its hidden name; already hidden -> nothing."""
    ports: list[Json] = app.spec.get("ports") or []
    index = _index_of(ports, name)
    if index is None:
        return []
    hidden = hidden_port_name(name)
    clash = _index_of(ports, hidden)
    if clash is not None and clash != index:
        raise PatchError(
            f"pod {_pod_label(pod)}: container {app.config.name!r} has ports named both "
            f"{name!r} and {hidden!r}; cannot hide {name!r} from the traffic-agent"
        )
    path = _pointer("spec", "containers", app.index, "ports", index, "name")
    return [_op("replace", path, hidden)]


def _rename_probe_ops(app: _App, name: str) -> list[Op]:
    """Point the probes that name the port at its hidden name, so they keep reaching the app."""
    ops: list[Op] = []
    for probe in PROBES:
        handlers = app.spec.get(probe) or {}
        for handler in ("httpGet", "tcpSocket"):
            if (handlers.get(handler) or {}).get("port") == name:
                path = _pointer("spec", "containers", app.index, probe, handler, "port")
                ops.append(_op("replace", path, hidden_port_name(name)))
    return ops


# --- e: annotation ------------------------------------------------------------------------------


def _annotation_ops(pod: Json) -> list[Op]:
    """Mark the pod `inject-traffic-agent: enabled`, replacing the whole annotations map.

    Replacing the map avoids addressing a key that contains `/` and works whether or not the
    pod had annotations (`add` then, as `replace` needs an existing target).
    """
    annotations: dict[str, str] | None = pod["metadata"].get("annotations")
    if annotations and annotations.get(INJECT_ANNOTATION):
        return []
    value = {**(annotations or {}), INJECT_ANNOTATION: "enabled"}
    return [_op("add" if annotations is None else "replace", "/metadata/annotations", value)]


# --- f: API port env ----------------------------------------------------------------------------


def _api_port_ops(apps: Sequence[_App], api_port: int) -> list[Op]:
    """Tell each intercepted app where the agent's REST API listens (§5.8)."""
    if not api_port:
        return []
    wanted = {"name": API_PORT_ENV, "value": str(api_port)}
    return [op for app in apps for op in _api_port_env_ops(app, wanted)]


def _api_port_env_ops(app: _App, wanted: Json) -> list[Op]:
    """Create the env list if needed and add the variable, or replace a different value."""
    env: list[Json] | None = app.spec.get("env")
    path = _pointer("spec", "containers", app.index, "env")
    if not env:
        return [_op("add", path, []), _op("add", path + "/-", wanted)]
    index = _index_of(env, API_PORT_ENV)
    if index is None:
        return [_op("add", path + "/-", wanted)]
    if env[index] == wanted:
        return []
    return [_op("replace", _pointer("spec", "containers", app.index, "env", index), wanted)]
