"""The `telepresence-agents` ConfigMap: one agent config (a `Sidecar` YAML) per workload.

Several writers share a namespace's ConfigMap (the manager preparing intercepts for different
workloads, the webhook storing regenerated entries), so every write is a compare-and-swap on the
ConfigMap's resourceVersion, retried on 409 Conflict. The map is created on demand.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable, Mapping

from kubernetes_asyncio import client as k8s

from tpproxy.config import ConfigError, Sidecar, decode_sidecar, encode_sidecar

CONFIGMAP_NAME = "telepresence-agents"
MAX_ATTEMPTS = 20

log = logging.getLogger("tpcontrol.kube.configmap")

Edit = Callable[[dict[str, str]], dict[str, str] | None]


class StoreConflict(RuntimeError):
    """A write that kept conflicting with other writers; names the namespace and attempts."""


class AgentConfigStore:
    """Reads and writes entries of the namespace ConfigMaps through one API client."""

    def __init__(self, api: k8s.ApiClient, *, created_by_labels: Mapping[str, str] | None = None):
        self.core = k8s.CoreV1Api(api)
        self.labels = dict(created_by_labels or {})

    async def read(self, namespace: str) -> tuple[dict[str, str], str | None]:
        """The raw entries and resourceVersion (None when the ConfigMap does not exist)."""
        cm = await self._configmap(namespace)
        if cm is None:
            return {}, None
        return dict(cm.data or {}), cm.metadata.resource_version

    async def _configmap(self, namespace: str) -> k8s.V1ConfigMap | None:
        try:
            return await self.core.read_namespaced_config_map(CONFIGMAP_NAME, namespace)
        except k8s.ApiException as exc:
            if exc.status == 404:
                return None
            raise

    async def entries(self, namespace: str) -> dict[str, Sidecar]:
        """Every entry that decodes; broken ones are logged with the key and left alone."""
        data, _ = await self.read(namespace)
        found = {}
        for key, text in data.items():
            try:
                found[key] = decode_sidecar(text, f"{namespace}/{CONFIGMAP_NAME}[{key}]")
            except ConfigError as exc:
                log.warning("ignoring entry: %s", exc)
        return found

    async def get(self, namespace: str, name: str) -> Sidecar | None:
        """One entry, or None; a broken entry raises ConfigError naming the key."""
        data, _ = await self.read(namespace)
        text = data.get(name)
        if text is None:
            return None
        return decode_sidecar(text, f"{namespace}/{CONFIGMAP_NAME}[{name}]")

    async def put(self, sidecar: Sidecar) -> bool:
        """Store the entry for `sidecar.agent_name`; False when it was already identical."""
        text = encode_sidecar(sidecar).decode()
        key = sidecar.agent_name

        def edit(data: dict[str, str]) -> dict[str, str] | None:
            if data.get(key) == text:
                return None
            return {**data, key: text}

        return await self.update(sidecar.namespace, edit)

    async def create(self, sidecar: Sidecar) -> bool:
        """Store the entry only if the key is absent (or a `create` placeholder); False if not."""
        text = encode_sidecar(sidecar).decode()
        key = sidecar.agent_name

        def edit(data: dict[str, str]) -> dict[str, str] | None:
            current = data.get(key)
            if current is not None and not _is_placeholder(current):
                return None
            return {**data, key: text}

        return await self.update(sidecar.namespace, edit)

    async def delete(self, namespace: str, name: str) -> bool:
        """Remove one entry; False when it was not there."""

        def edit(data: dict[str, str]) -> dict[str, str] | None:
            if name not in data:
                return None
            return {k: v for k, v in data.items() if k != name}

        return await self.update(namespace, edit, create=False)

    async def update(self, namespace: str, edit: Edit, *, create: bool = True) -> bool:
        """Apply `edit` (old data -> new data, or None for no change) as a compare-and-swap."""
        for attempt in range(MAX_ATTEMPTS):
            cm = await self._configmap(namespace)
            new = edit(dict(cm.data or {}) if cm is not None else {})
            if new is None:
                return False
            try:
                if cm is None:
                    if not create:
                        return False
                    meta = k8s.V1ObjectMeta(name=CONFIGMAP_NAME, labels=self.labels or None)
                    body = k8s.V1ConfigMap(metadata=meta, data=new)
                    await self.core.create_namespaced_config_map(namespace, body)
                else:
                    # The read's metadata (labels, resourceVersion) goes back with the new data:
                    # the API server refuses the write if anyone else wrote since the read.
                    cm.data = new
                    await self.core.replace_namespaced_config_map(CONFIGMAP_NAME, namespace, cm)
                return True
            except k8s.ApiException as exc:
                if exc.status != 409:  # 409 Conflict; on create: AlreadyExists, also 409
                    raise
                # Someone else wrote in between: read again and redo the edit on their result.
                await asyncio.sleep(random.uniform(0, 0.01 * (attempt + 1)))
        raise StoreConflict(
            f"{namespace}/{CONFIGMAP_NAME}: still conflicting after {MAX_ATTEMPTS} attempts"
        )


def _is_placeholder(text: str) -> bool:
    try:
        return decode_sidecar(text).create
    except ConfigError:
        return False
