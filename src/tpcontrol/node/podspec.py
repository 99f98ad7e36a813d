"""What the kubelet works out from a pod spec before it starts anything, as plain functions.

Images become local commands through an `ImageMap` (the node has no container runtime), and
everything else follows the Kubernetes rules: `command` replaces the image's entrypoint, `args`
its default arguments, `$(VAR)` expands from the container's env, `envFrom` comes before `env`,
fieldRefs read the pod, and ConfigMap, Secret, downward-API and emptyDir volumes become files.
No I/O here: the runner fetches the ConfigMaps and Secrets and writes what these return.
"""

from __future__ import annotations

import base64
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

Json = dict[str, Any]
Data = Mapping[str, Mapping[str, str]]  # ConfigMap or Secret name -> key -> value

EXAMPLES = Path(__file__).resolve().parents[3] / "examples"
AGENT_REPOSITORY = "docker.io/tpproxy/agent"


class PodSpecError(ValueError):
    """The pod cannot run as specified: `reason` is the kubelet's word, the message says why."""

    def __init__(self, reason: str, message: str, *, missing: bool = False) -> None:
        super().__init__(message)
        self.reason = reason
        self.missing = missing
        """True when an object the pod refers to is missing: it may yet be created, so the
        kubelet waits; anything else is in the (immutable) spec and will not change."""


def repository(image: str) -> str:
    """The image name without tag or digest: `a/b:1` and `a/b@sha256:..` are both `a/b`."""
    name = image.split("@", 1)[0]
    head, _, last = name.rpartition("/")
    last = last.split(":", 1)[0]
    return f"{head}/{last}" if head else last


@dataclass(frozen=True)
class ImageMap:
    """Image repository -> the command its entrypoint is on this machine."""

    entrypoints: Mapping[str, tuple[str, ...]] = field(default_factory=dict)

    @classmethod
    def default(cls, *agent_images: str) -> ImageMap:
        """The agent image (and any other names given for it) runs `tpproxy`; the example images
        run the apps in `examples/`."""
        python = sys.executable
        entries: dict[str, tuple[str, ...]] = {
            AGENT_REPOSITORY: (python, "-m", "tpproxy"),
            "tpcontrol.example/http-echo": (python, str(EXAMPLES / "http_echo.py")),
            "tpcontrol.example/tcp-echo": (python, str(EXAMPLES / "tcp_echo.py")),
        }
        for image in agent_images:
            entries[repository(image)] = (python, "-m", "tpproxy")
        return cls(entries)

    def entrypoint(self, image: str) -> tuple[str, ...]:
        """The command for `image`; short Docker Hub names match their full ones, as in a
        container runtime (`busybox`, `library/busybox`, `docker.io/library/busybox`)."""
        wanted = _normalized(repository(image))
        found = next((v for k, v in self.entrypoints.items() if _normalized(k) == wanted), None)
        if found is None:
            known = ", ".join(sorted(self.entrypoints)) or "none"
            raise PodSpecError(
                "ErrImagePull",
                f"image {image!r} has no local command on this node (known: {known})",
            )
        return found


def _normalized(repo: str) -> str:
    """A repository as the Docker reference library normalizes it: a lowercase first component
    without `.` or `:` (and not `localhost`) is no registry, so the registry is docker.io, whose
    single-component names are under `library/`."""
    first, slash, rest = repo.partition("/")
    registry = "." in first or ":" in first or first == "localhost" or first != first.lower()
    if not slash or not registry:
        first, rest = "docker.io", repo
    if first == "index.docker.io":
        first = "docker.io"
    if first == "docker.io" and "/" not in rest:
        rest = f"library/{rest}"
    return f"{first}/{rest}"


# As Kubernetes' expansion.Expand reads it: the name is everything up to the first `)` (env var
# names may be any printable ASCII but `=`), a `$(` without a `)` and a `$` before anything else
# are plain text.
_VAR = re.compile(r"\$(?:\$|\(([^)]*)\))")


def expand(text: str, env: Mapping[str, str]) -> str:
    """Kubernetes' `$(VAR)` expansion: unknown references stay as written, `$$` is a `$`."""

    def one(match: re.Match[str]) -> str:
        name = match.group(1)
        if name is None:
            return "$"
        return env.get(name, match.group(0))

    return _VAR.sub(one, text)


def argv(container: Json, images: ImageMap, env: Mapping[str, str]) -> list[str]:
    """The process to start: `command` replaces the entrypoint, `args` follow either."""
    command = [expand(w, env) for w in container.get("command") or []]
    head = command or list(images.entrypoint(container.get("image", "")))
    return head + [expand(a, env) for a in container.get("args") or []]


def field_value(pod: Json, path: str) -> str:
    """A downward-API `fieldRef.fieldPath` of the pod."""
    meta, spec, status = pod.get("metadata", {}), pod.get("spec", {}), pod.get("status", {})
    simple = {
        "metadata.name": meta.get("name", ""),
        "metadata.namespace": meta.get("namespace", ""),
        "metadata.uid": meta.get("uid", ""),
        "spec.nodeName": spec.get("nodeName", ""),
        "spec.serviceAccountName": spec.get("serviceAccountName", ""),
        "status.hostIP": status.get("hostIP", ""),
        "status.hostIPs": ",".join(i.get("ip", "") for i in status.get("hostIPs") or [])
        or status.get("hostIP", ""),
        "status.podIP": status.get("podIP", ""),
        "status.podIPs": ",".join(i.get("ip", "") for i in status.get("podIPs") or []),
    }
    if path in simple:
        return str(simple[path])
    if path in ("metadata.labels", "metadata.annotations"):
        return _map_file(meta.get(path.split(".")[1]) or {})
    keyed = re.fullmatch(r"metadata\.(labels|annotations)\['([^']*)'\]", path)
    if keyed:
        return str((meta.get(keyed.group(1)) or {}).get(keyed.group(2), ""))
    raise PodSpecError("CreateContainerConfigError", f"fieldRef {path!r} is not supported")


def _map_file(values: Mapping[str, str]) -> str:
    """Labels or annotations as the kubelet writes them: `key="value"` lines, sorted."""
    return "\n".join(f"{k}={_go_quote(v)}" for k, v in sorted(values.items()))


_GO_ESCAPES = {
    "\a": "\\a", "\b": "\\b", "\f": "\\f", "\n": "\\n", "\r": "\\r", "\t": "\\t", "\v": "\\v",
    "\\": "\\\\", '"': '\\"',
}  # fmt: skip


def _go_quote(text: str) -> str:
    """Go's `%q` (strconv.Quote), which the kubelet's FormatMap uses: printable characters stay
    as they are (non-ASCII too, unlike JSON's escapes), the rest become `\\xHH`/`\\uHHHH`."""
    out = []
    for ch in text:
        code = ord(ch)
        if ch in _GO_ESCAPES:
            out.append(_GO_ESCAPES[ch])
        elif ch.isprintable():  # Go's unicode.IsPrint: categories L, M, N, P, S and " "
            out.append(ch)
        elif code < 0x20 or code == 0x7F:
            out.append(f"\\x{code:02x}")
        elif code < 0x10000:
            out.append(f"\\u{code:04x}")
        else:
            out.append(f"\\U{code:08x}")
    return '"' + "".join(out) + '"'


def _keyed(source: Json, kind: str, data: Data) -> str | None:
    """A configMapKeyRef / secretKeyRef value, None when optional and missing."""
    name, key = source.get("name", ""), source.get("key", "")
    values = data.get(name)
    if values is None or key not in values:
        if source.get("optional"):
            return None
        what = f"{kind} {name!r}" if values is None else f"key {key!r} of {kind} {name!r}"
        raise PodSpecError("CreateContainerConfigError", f"{what} not found", missing=True)
    return values[key]


def container_env(
    pod: Json, container: Json, config_maps: Data, secrets: Data, base: Mapping[str, str]
) -> dict[str, str]:
    """The container's environment: `base` (the image's), then envFrom, then env."""
    env = dict(base)
    for source in container.get("envFrom") or []:
        prefix = source.get("prefix", "")
        for kind, data in (("configMapRef", config_maps), ("secretRef", secrets)):
            if kind in source:
                ref = source[kind]
                values = data.get(ref.get("name", ""))
                if values is None:
                    if ref.get("optional"):
                        continue
                    raise PodSpecError(
                        "CreateContainerConfigError",
                        f"{kind[:-3]} {ref.get('name')!r} not found",
                        missing=True,
                    )
                env.update({prefix + k: v for k, v in values.items()})
    for item in container.get("env") or []:
        name = item["name"]
        if "valueFrom" not in item:
            env[name] = expand(item.get("value", ""), env)
            continue
        source = item["valueFrom"]
        value: str | None
        if "fieldRef" in source:
            value = field_value(pod, source["fieldRef"]["fieldPath"])
        elif "configMapKeyRef" in source:
            value = _keyed(source["configMapKeyRef"], "configMap", config_maps)
        elif "secretKeyRef" in source:
            value = _keyed(source["secretKeyRef"], "secret", secrets)
        else:
            value = ""  # resourceFieldRef: this node sets no limits
        if value is not None:
            env[name] = value
    return env


def volume_files(pod: Json, volume: Json, config_maps: Data, secrets: Data) -> dict[str, bytes]:
    """The files a volume holds (relative path -> content); empty for an emptyDir."""
    if "configMap" in volume:
        return _projected(volume["configMap"], config_maps, "configMap")
    if "secret" in volume:
        source = {**volume["secret"], "name": volume["secret"].get("secretName", "")}
        return _projected(source, secrets, "secret")
    if "downwardAPI" in volume:
        return {
            item["path"]: field_value(pod, item["fieldRef"]["fieldPath"]).encode()
            for item in volume["downwardAPI"].get("items") or []
            if "fieldRef" in item
        }
    if "projected" in volume:
        files: dict[str, bytes] = {}
        for source in volume["projected"].get("sources") or []:
            if "configMap" in source:
                files.update(_projected(source["configMap"], config_maps, "configMap"))
            elif "secret" in source:
                files.update(_projected(source["secret"], secrets, "secret"))
            elif "downwardAPI" in source:
                files.update(volume_files(pod, source, config_maps, secrets))
        return files
    if "emptyDir" in volume:
        return {}
    kinds = sorted(k for k in volume if k != "name")
    raise PodSpecError(
        "CreateContainerConfigError", f"volume {volume.get('name')!r}: {kinds} is not supported"
    )


def _projected(source: Json, data: Data, kind: str) -> dict[str, bytes]:
    values = data.get(source.get("name", ""))
    if values is None:
        if source.get("optional"):
            return {}
        raise PodSpecError(
            "CreateContainerConfigError", f"{kind} {source.get('name')!r} not found", missing=True
        )
    items = source.get("items") or [{"key": k, "path": k} for k in values]
    files = {}
    for item in items:
        if item["key"] not in values:
            if source.get("optional"):
                continue
            raise PodSpecError(
                "CreateContainerConfigError",
                f"key {item['key']!r} of {kind} {source.get('name')!r} not found",
                missing=True,
            )
        files[item["path"]] = values[item["key"]].encode(errors="surrogateescape")
    return files


def secret_values(secret: Json, *, exact: bool = False) -> dict[str, str]:
    """A Secret's data, base64-decoded (stringData is merged into data by the API server).

    With `exact`, bytes that are not UTF-8 survive the round trip to a volume's files
    (surrogateescape); without, they become U+FFFD, which is what an environment can carry.
    """
    errors = "surrogateescape" if exact else "replace"
    return {
        k: base64.b64decode(v).decode(errors=errors) for k, v in (secret.get("data") or {}).items()
    }


def config_map_files(config_map: Json) -> dict[str, str]:
    """A ConfigMap's keys as a volume holds them: `data`, and `binaryData` byte for byte."""
    files = dict(config_map.get("data") or {})
    for key, value in (config_map.get("binaryData") or {}).items():
        files[key] = base64.b64decode(value).decode(errors="surrogateescape")
    return files


READ_ONLY_KINDS = ("configMap", "secret", "downwardAPI", "projected")


def file_modes(volume: Json) -> tuple[int, dict[str, int]]:
    """A volume's default file mode and the modes its items set (path -> mode)."""
    for kind in READ_ONLY_KINDS:
        if kind in volume:
            source = volume[kind]
            items: list[Json] = list(source.get("items") or [])
            for projected in source.get("sources") or []:
                for part in projected.values():
                    if isinstance(part, dict):
                        items.extend(part.get("items") or [])
            modes = {i["path"]: int(i["mode"]) for i in items if i.get("mode") is not None}
            return int(source.get("defaultMode", 0o644)), modes
    return 0o644, {}


def container_port(pod: Json, port: int | str, container: Json | None = None) -> int:
    """A probe's or a Service's port: a number, or a named port of the container (or pod)."""
    if isinstance(port, int) or str(port).isdigit():
        return int(port)
    candidates = [container] if container is not None else pod["spec"].get("containers", [])
    for c in candidates:
        for p in c.get("ports") or []:
            if p.get("name") == port:
                return int(p["containerPort"])
    raise PodSpecError("InvalidPort", f"no container port named {port!r}")
