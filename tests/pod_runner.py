"""Runs a container of a pod, as the API server holds it, as a local process (the kubelet's part
for one container): the image maps to a local command, env values and fieldRefs are resolved, and
ConfigMap and downward-API volumes are written as files under a root directory."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path
from typing import Any

from kubernetes_asyncio import client as k8s

Json = dict[str, Any]
AGENT_IMAGE_PREFIX = "docker.io/tpproxy/agent"


async def materialise(api: k8s.ApiClient, pod: Json, container: str, root: Path) -> dict[str, str]:
    """Write the container's ConfigMap and downward-API mounts under `root`; returns its env."""
    ns = pod["metadata"]["namespace"]
    spec = next(c for c in pod["spec"]["containers"] if c["name"] == container)
    volumes = {v["name"]: v for v in pod["spec"].get("volumes", [])}
    core = k8s.CoreV1Api(api)
    for mount in spec.get("volumeMounts", []):
        volume = volumes.get(mount["name"], {})
        target = root / mount["mountPath"].lstrip("/")
        target.mkdir(parents=True, exist_ok=True)
        if "configMap" in volume:
            cm = await core.read_namespaced_config_map(volume["configMap"]["name"], ns)
            for item in volume["configMap"].get("items") or [
                {"key": k, "path": k} for k in cm.data
            ]:
                (target / item["path"]).write_text(cm.data[item["key"]])
        elif "downwardAPI" in volume:
            annotations = pod["metadata"].get("annotations", {})
            text = "\n".join(f"{k}={json.dumps(v)}" for k, v in sorted(annotations.items()))
            (target / "annotations").write_text(text)
    env: dict[str, str] = {}
    fields = {
        "status.podIP": "127.0.0.1",
        "metadata.name": pod["metadata"]["name"],
        "metadata.namespace": ns,
    }
    for item in spec.get("env", []):
        if "value" in item:
            env[item["name"]] = item["value"]
        elif "fieldRef" in item.get("valueFrom", {}):
            env[item["name"]] = fields.get(item["valueFrom"]["fieldRef"]["fieldPath"], "")
    return env


async def run_agent_container(
    api: k8s.ApiClient, pod: Json, root: Path, manager_url: str
) -> asyncio.subprocess.Process:
    """Start the pod's traffic-agent container as `tpproxy <args>` with its env and mounts.

    The only translations: mount paths live under `root` (TPPROXY_CONFIG points at the mounted
    config.yaml), the manager's in-cluster name becomes `manager_url`, and the admin port is off.
    """
    spec = next(c for c in pod["spec"]["containers"] if c["name"] == "traffic-agent")
    assert spec["image"].startswith(AGENT_IMAGE_PREFIX), spec["image"]
    env = await materialise(api, pod, "traffic-agent", root)
    env.update(
        {
            "TPPROXY_CONFIG": str(root / "etc/traffic-agent/config.yaml"),
            "TPPROXY_MANAGER_URL": manager_url,
            "TPPROXY_ADMIN": "off",
            "TPPROXY_LISTEN_HOST": "127.0.0.1",
        }
    )
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tpproxy",
        *spec["args"],
        env={**os.environ, **env},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
