"""The agent-config watcher: when a workload's entry in `telepresence-agents` is created, changed
or removed, roll the workload out so that its new pods go through the webhook (spec 4.2).

The only change made to a workload is the `restartedAt` annotation on its pod template (a
ReplicaSet is scaled to zero and back instead). The watcher keeps a snapshot of every entry and
acts only on differences, so an entry written with the same value (a second prepare, the
webhook storing what it regenerated) rolls nothing out, and a manager restart starts from the
live ConfigMaps without rolling anything.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
from collections.abc import Callable
from typing import Any

from kubernetes_asyncio import client as k8s
from kubernetes_asyncio import watch

from tpcontrol.kube.configmap import CONFIGMAP_NAME
from tpcontrol.names import RESTARTED_AT
from tpproxy.config import ConfigError, Sidecar, decode_sidecar

log = logging.getLogger("tpcontrol.manager.rollout")


class Rollouts:
    """Restarts workloads the one way 2.6 does; counts what it did (for metrics and tests)."""

    def __init__(self, api: k8s.ApiClient) -> None:
        self.apps = k8s.AppsV1Api(api)
        self.done: list[tuple[str, str, str]] = []

    async def rollout(self, kind: str, name: str, namespace: str) -> bool:
        """Restart a workload's pods; False when it does not exist (nothing to do)."""
        # Microseconds: two rollouts within one second must still change the template.
        now = datetime.datetime.now(datetime.UTC).isoformat(timespec="microseconds")
        patch = {"spec": {"template": {"metadata": {"annotations": {RESTARTED_AT: now}}}}}
        try:
            if kind == "Deployment" or not kind:
                await self.apps.patch_namespaced_deployment(name, namespace, patch)
            elif kind == "StatefulSet":
                await self.apps.patch_namespaced_stateful_set(name, namespace, patch)
            elif kind == "ReplicaSet":
                current = await self.apps.read_namespaced_replica_set(name, namespace)
                replicas = current.spec.replicas or 0
                if replicas == 0:
                    return True
                for count in (0, replicas):
                    body = {"spec": {"replicas": count}}
                    await self.apps.patch_namespaced_replica_set(name, namespace, body)
            else:
                log.warning("cannot roll out %s %s.%s: unsupported kind", kind, name, namespace)
                return False
        except k8s.ApiException as exc:
            if exc.status == 404:
                return False
            raise
        self.done.append((kind or "Deployment", name, namespace))
        log.info("rolled out %s %s.%s", kind or "Deployment", name, namespace)
        return True


def _decode(namespace: str, key: str, text: str) -> Sidecar | None:
    try:
        return decode_sidecar(text, f"{namespace}/{CONFIGMAP_NAME}[{key}]")
    except ConfigError as exc:
        log.warning("ignoring entry: %s", exc)
        return None


class AgentConfigWatcher:
    """Watches every `telepresence-agents` ConfigMap and rolls out workloads whose entry changed."""

    def __init__(
        self,
        api: k8s.ApiClient,
        rollouts: Rollouts,
        on_entries: Callable[[str, dict[str, Sidecar]], None] | None = None,
        untouchable: frozenset[str] = frozenset(),
    ) -> None:
        self.core = k8s.CoreV1Api(api)
        self.rollouts = rollouts
        self.untouchable = untouchable  # namespaces whose entries are never rolled out
        self.snapshot: dict[str, dict[str, str]] = {}
        self.synced = asyncio.Event()
        self.on_entries = on_entries

    async def run(self) -> None:
        """List, then watch; relist whenever the watch ends or its history is gone."""
        selector = f"metadata.name={CONFIGMAP_NAME}"
        first = True
        while True:
            try:
                listed = await self.core.list_config_map_for_all_namespaces(field_selector=selector)
                current = {cm.metadata.namespace: dict(cm.data or {}) for cm in listed.items}
                if first:
                    self.snapshot = current  # a (re)started manager rolls nothing out
                    first = False
                else:
                    for namespace in set(self.snapshot) | set(current):
                        await self._apply(namespace, current.get(namespace, {}))
                for namespace, data in current.items():
                    self._notify(namespace, data)
                self.synced.set()
                version = listed.metadata.resource_version
                stream = watch.Watch()
                async with stream:
                    async for event in stream.stream(
                        self.core.list_config_map_for_all_namespaces,
                        field_selector=selector,
                        resource_version=version,
                        timeout_seconds=300,
                    ):
                        await self._event(event)
            except asyncio.CancelledError:
                raise
            except k8s.ApiException as exc:
                if exc.status != 410:  # 410 Gone: the history moved on; relisting catches up
                    log.warning("ConfigMap watch failed (%s); relisting", exc.reason)
                    await asyncio.sleep(1)
            except Exception:
                log.exception("ConfigMap watch failed; relisting in 1 s")
                await asyncio.sleep(1)

    async def _event(self, event: dict[str, Any]) -> None:
        kind = event["type"]
        obj = event["object"]
        if kind == "ERROR":
            raise k8s.ApiException(status=410, reason="watch error")
        namespace = obj.metadata.namespace
        data = {} if kind == "DELETED" else dict(obj.data or {})
        await self._apply(namespace, data)

    async def _apply(self, namespace: str, data: dict[str, str]) -> None:
        """Act on the difference between the snapshot and `data` for one namespace."""
        old = self.snapshot.get(namespace, {})
        self.snapshot[namespace] = data
        self._notify(namespace, data)
        for key in sorted(set(old) | set(data)):
            before, after = old.get(key), data.get(key)
            if before == after:
                continue
            entry = _decode(namespace, key, after if after is not None else before or "")
            if entry is None or entry.manual or entry.create:
                continue
            if (entry.workload_name or key) != key or namespace in self.untouchable:
                # Only the entry's own workload, and never where nothing is enrolled: whoever
                # may write a ConfigMap must not restart any workload at will through us.
                log.warning("entry %s.%s names workload %r: not rolled out", key, namespace,
                            entry.workload_name[:100])  # fmt: skip
                continue
            if before is not None and after is not None:
                old_entry = _decode(namespace, key, before)
                if old_entry == entry:
                    continue  # rewritten, not changed (key order, say): nothing to roll out
            what = "removed" if after is None else ("changed" if before else "added")
            log.info("agent config of %s.%s %s: rolling it out", key, namespace, what)
            await self.rollouts.rollout(entry.workload_kind, entry.workload_name or key, namespace)

    def _notify(self, namespace: str, data: dict[str, str]) -> None:
        if self.on_entries is None:
            return
        decoded = {k: s for k, v in data.items() if (s := _decode(namespace, k, v)) is not None}
        self.on_entries(namespace, decoded)
