"""PrepareIntercept's decisions that need no API (spec 4.3): is the workload interceptable, and
does the request name exactly one service port of its agent config?"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tpcontrol.names import ANNOTATION_DOMAIN, INJECT_ANNOTATION
from tpproxy.config import Container, Intercept, Sidecar

INJECT = INJECT_ANNOTATION
MANUAL = ANNOTATION_DOMAIN + "manually-injected"


class PrepareError(Exception):
    """A request the manager cannot prepare; `category` is `user` or `config`."""

    def __init__(self, message: str, category: str = "user") -> None:
        super().__init__(message)
        self.category = category


@dataclass(frozen=True)
class Match:
    """The service port an intercept will take, and where it lands in the pod."""

    container: Container
    intercept: Intercept


def check_interceptable(workload: dict[str, Any]) -> None:
    """The template annotations allow an agent (spec 4.3 step 3, without 2.6's dead branch)."""
    meta = workload.get("metadata") or {}
    where = f"{workload.get('kind', 'Workload')} {meta.get('name')}.{meta.get('namespace')}"
    template = ((workload.get("spec") or {}).get("template") or {}).get("metadata") or {}
    annotations = template.get("annotations") or {}
    manual = annotations.get(MANUAL) == "true"
    value = annotations.get(INJECT, "")
    if manual and value == "enabled":
        raise PrepareError(
            f"annotation {where}/{INJECT}=enabled cannot be combined with {MANUAL}=true"
        )
    if value in ("false", "disabled"):
        raise PrepareError(f"{where} is not interceptable: its pod template says {INJECT}={value}")
    if value not in ("", "enabled"):
        raise PrepareError(f"{value!r} is not a valid value for the {where}/{INJECT} annotation")


def find_intercept(sidecar: Sidecar, service: str = "", port: str = "") -> Match:
    """The single intercept the request names; errors list the candidates (spec 4.3 step 6)."""
    where = f"{sidecar.workload_kind} {sidecar.workload_name}.{sidecar.namespace}"
    found: list[Match] = []
    seen: set[tuple[str, str, str]] = set()
    for container in sidecar.containers:
        for icept in container.intercepts:
            if service and icept.service_name != service:
                continue
            if port and not icept.matches_port_identifier(port):
                continue
            key = (
                icept.service_name,
                icept.service_port_name or str(icept.service_port),
                icept.protocol,
            )
            if key in seen:
                continue  # the same service port reached twice (two containers): one choice
            seen.add(key)
            found.append(Match(container, icept))
    if len(found) == 1:
        return found[0]
    if not found:
        what = ""
        if service:
            what = f" matching service {service}" + (f", port {port}" if port else "")
        elif port:
            what = f" matching port {port}"
        raise PrepareError(f"{where} has no interceptable port{what}; {candidates(sidecar)}")
    if service and port:
        raise PrepareError(
            f"{where} intercept config is broken. Service {service}, port {port} is declared "
            "more than once",
            "config",
        )
    if port:
        ask = (
            f"has multiple interceptable services with port {port}.\nPlease specify the "
            "service you want to intercept by passing the --service=<svc> flag."
        )
    elif service:
        ask = (
            f"has multiple interceptable ports in service {service}.\nPlease specify the "
            "port you want to intercept by passing the --port=<local:svcPortName> flag."
        )
    else:
        ask = (
            "has multiple interceptable service ports.\nPlease specify the service and/or "
            "service port you want to intercept by passing the --service=<svc> and/or "
            "--port=<local:svcPortName> flag."
        )
    listed = ", ".join(_label(m.intercept) for m in found)
    raise PrepareError(f"{where} {ask}\nCandidates: {listed}")


def candidates(sidecar: Sidecar) -> str:
    """Every service port of the config, for error messages."""
    ports = [_label(i) for c in sidecar.containers for i in c.intercepts]
    return "candidates: " + (", ".join(ports) if ports else "none")


def _label(icept: Intercept) -> str:
    port = icept.service_port_name or str(icept.service_port)
    return (
        f"--service={icept.service_name} --port={port} ({icept.protocol}, container port "
        f"{icept.container_port})"
    )
