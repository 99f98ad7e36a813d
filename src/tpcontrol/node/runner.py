"""A node for the local control plane: the scheduler's binding, the kubelet and kube-proxy in one.

It registers a Node, binds every pending pod it may run to it, runs the pods bound to it (see
`pods.PodWorker`), finishes their graceful deletion, keeps their ConfigMap and Secret volumes and
/etc/hosts current, and serves the Services' cluster IPs (see `services`). Everything is driven
by level: watches fill local copies (`watching.Reflector`) and any change triggers one reconcile
pass over all of them. `stop()` stops the pods and deletes every namespace, mount point and file
the runner made; nothing it did outlives it except the Node object and the pods' last status.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import os
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Any, cast

import msgspec
from kubernetes_asyncio import client as k8s

from tpcontrol.node import mountpoints, podspec
from tpcontrol.node.netns import NodeNetwork, live_owner
from tpcontrol.node.pods import PodWorker
from tpcontrol.node.services import ServiceProxy, service_backends
from tpcontrol.node.watching import Json, Key, Reflector

log = logging.getLogger("tpcontrol.node")


RUNNER_ANNOTATION = "tpcontrol.dev/node-runner"


class NodeError(RuntimeError):
    """The node cannot start; the message says why."""


class NodeSettings(msgspec.Struct, frozen=True, kw_only=True):
    """What kind of node to be. `namespace_labels` limits the pods it takes (empty: all)."""

    node_name: str = "tpcontrol-node"
    namespace_labels: dict[str, str] = {}
    subnet: str = "10.244.0.0/16"
    probe_period: float = 1.0
    restart_backoff_max: float = 10.0
    termination_grace_max: float = 10.0
    agent_images: tuple[str, ...] = ()


class NodeRunner:
    """Use as `async with NodeRunner(api, settings) as node:`."""

    def __init__(self, api: k8s.ApiClient, settings: NodeSettings | None = None) -> None:
        self.api = api
        self.core = k8s.CoreV1Api(api)
        self.settings = settings or NodeSettings()
        self.images = podspec.ImageMap.default(*self.settings.agent_images)
        self.work = Path(tempfile.mkdtemp(prefix="tpcontrol-node-", dir=_scratch()))
        self.network = NodeNetwork(
            f"tpn-{os.urandom(3).hex()}",
            str(self.work),
            ipaddress.IPv4Network(self.settings.subnet),
        )
        self.workers: dict[Key, PodWorker] = {}
        self.proxy = ServiceProxy(self.network)
        self.changed = asyncio.Event()
        core = self.core
        self.pods = Reflector("pods", core.list_pod_for_all_namespaces, self.changed)
        self.services = Reflector("services", core.list_service_for_all_namespaces, self.changed)
        self.endpoints = Reflector(
            "endpoints", core.list_endpoints_for_all_namespaces, self.changed
        )
        self.config_maps_store = Reflector(
            "configmaps", core.list_config_map_for_all_namespaces, self.changed
        )
        self.secrets_store = Reflector("secrets", core.list_secret_for_all_namespaces, self.changed)
        self.namespaces = Reflector("namespaces", core.list_namespace, self.changed)
        self._tasks: list[asyncio.Task[None]] = []
        self._binding: set[str] = set()
        self._bind_tasks: set[asyncio.Task[None]] = set()
        self._deleting: dict[Key, asyncio.Task[None]] = {}
        self._volume_versions: tuple[str, ...] = ()
        self._service_hosts: list[tuple[str, str, list[str]]] = []

    @property
    def name(self) -> str:
        return self.settings.node_name

    async def __aenter__(self) -> NodeRunner:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def start(self) -> None:
        """Make the network, register the Node and start reconciling."""
        try:
            stale = await asyncio.to_thread(NodeNetwork.reap_stale)
            if stale:
                log.warning("removed namespaces left by a runner that died: %s", stale)
            await asyncio.to_thread(mountpoints.release, "")  # those of dead runners
            await asyncio.to_thread(self.network.create)
            await self._register()
            reflectors = [
                self.pods,
                self.services,
                self.endpoints,
                self.config_maps_store,
                self.secrets_store,
                self.namespaces,
            ]
            self._tasks = [asyncio.create_task(r.run(), name=r.kind) for r in reflectors]
            async with asyncio.timeout(30):
                for reflector in reflectors:
                    await reflector.synced.wait()
            self._tasks.append(asyncio.create_task(self._reconcile_loop(), name="reconcile"))
        except BaseException:
            await self.stop()
            raise
        log.info(
            "node %s ready: network namespace %s, node IP %s",
            self.name,
            self.network.node_ns,
            self.network.node_ip,
        )

    async def stop(self) -> None:
        """Stop every pod and remove everything made for them."""
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks.clear()
        workers = list(self.workers.values())
        self.workers.clear()
        await asyncio.gather(*(w.terminate(grace=5) for w in workers), return_exceptions=True)
        # Pods in their grace period finish it (bounded by termination_grace_max).
        await asyncio.gather(*self._deleting.values(), return_exceptions=True)
        self.proxy.close()
        await asyncio.to_thread(self.network.destroy)
        await asyncio.to_thread(mountpoints.release, self.network.prefix)
        shutil.rmtree(self.work, ignore_errors=True)

    # -- what pods read ----------------------------------------------------------------------

    def config_maps(self, namespace: str) -> dict[str, dict[str, str]]:
        return {
            name: dict(obj.get("data") or {})
            for (ns, name), obj in self.config_maps_store.objects.items()
            if ns == namespace
        }

    def volume_config_maps(self, namespace: str) -> dict[str, dict[str, str]]:
        """ConfigMaps as volumes see them (binaryData included, byte for byte)."""
        return {
            name: podspec.config_map_files(obj)
            for (ns, name), obj in self.config_maps_store.objects.items()
            if ns == namespace
        }

    def secrets(self, namespace: str, *, exact: bool = False) -> dict[str, dict[str, str]]:
        return {
            name: podspec.secret_values(obj, exact=exact)
            for (ns, name), obj in self.secrets_store.objects.items()
            if ns == namespace
        }

    def service_hosts(self) -> list[tuple[str, str, list[str]]]:
        """(address, namespace, DNS names) for /etc/hosts: a Service's cluster IP, or for a
        headless Service each ready endpoint (and `<hostname>.<service>` when it has one)."""
        return list(self._service_hosts)

    def mountpoint(self, target: str, *, directory: bool) -> None:
        """Make sure a mount path exists on the host (outside /tmp, which pods get fresh)."""
        if Path(target).is_relative_to("/tmp"):
            return
        try:
            mountpoints.claim(target, self.network.prefix, directory=directory)
        except mountpoints.MountPointError as exc:
            raise podspec.PodSpecError("CreateContainerConfigError", str(exc)) from None
        except OSError as exc:
            raise podspec.PodSpecError(
                "CreateContainerConfigError", f"mountPath {target!r}: {exc.strerror or exc}"
            ) from None

    async def patch_status(self, namespace: str, name: str, status: Json) -> None:
        worker = self.workers.get((namespace, name))
        body = {"metadata": {"uid": worker.uid}} if worker else {}
        try:
            await self.core.patch_namespaced_pod_status(
                name, namespace, cast(Any, {**body, "status": status})
            )
        except k8s.ApiException as exc:
            if exc.status not in (404, 409):
                raise

    # -- reconcile ---------------------------------------------------------------------------

    async def _register(self) -> None:
        labels = {
            "kubernetes.io/hostname": self.name,
            "kubernetes.io/os": "linux",
            "node.kubernetes.io/tpcontrol": "true",
        }
        owner = {"prefix": self.network.prefix, "pid": os.getpid(), "host": socket.gethostname()}
        annotations = {RUNNER_ANNOTATION: json.dumps(owner)}
        node = {
            "metadata": {"name": self.name, "labels": labels, "annotations": annotations},
            "spec": {},
        }
        try:
            await self.core.create_node(cast(Any, node))
        except k8s.ApiException as exc:
            if exc.status != 409:
                raise
            existing = await self.core.read_node(self.name)
            try:
                previous = json.loads(
                    (existing.metadata.annotations or {}).get(RUNNER_ANNOTATION, "{}")
                )
            except ValueError:
                previous = {}
            if not isinstance(previous, dict):
                previous = {}  # whatever it is, it names no live runner
            prefix = str(previous.get("prefix", ""))
            if previous.get("host") == owner["host"] and prefix and live_owner(prefix):
                raise NodeError(
                    f"node {self.name!r} is already run by process {previous.get('pid')} on this "
                    "machine: give another node name"
                ) from None
            # Taken over only if nobody else took it meanwhile (the resourceVersion we read).
            patch = {
                "metadata": {
                    "labels": labels,
                    "annotations": annotations,
                    "resourceVersion": existing.metadata.resource_version,
                }
            }
            try:
                await self.core.patch_node(self.name, cast(Any, patch))
            except k8s.ApiException as conflict:
                if conflict.status == 409:
                    raise NodeError(
                        f"node {self.name!r} was taken by another runner just now"
                    ) from None
                raise
        status = {
            "conditions": [
                {"type": "Ready", "status": "True", "reason": "KubeletReady",
                 "message": "tpcontrol node runner is ready"}
            ],
            "addresses": [
                {"type": "InternalIP", "address": self.network.node_ip},
                {"type": "Hostname", "address": self.name},
            ],
            "capacity": {"cpu": "2", "memory": "8Gi", "pods": "110"},
            "allocatable": {"cpu": "2", "memory": "8Gi", "pods": "110"},
        }  # fmt: skip
        await self.core.patch_node_status(self.name, cast(Any, {"status": status}))

    async def _reconcile_loop(self) -> None:
        while True:
            await self.changed.wait()
            self.changed.clear()
            try:
                await self._reconcile()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("reconcile failed; trying again on the next change")
                await asyncio.sleep(0.5)
                self.changed.set()

    def _may_run(self, pod: Json) -> bool:
        wanted = self.settings.namespace_labels
        if wanted:
            namespace = self.namespaces.objects.get(("", pod["metadata"]["namespace"]), {})
            labels = namespace.get("metadata", {}).get("labels") or {}
            if any(labels.get(k) != v for k, v in wanted.items()):
                return False
        selector = pod["spec"].get("nodeSelector") or {}
        mine = {"kubernetes.io/hostname": self.name, "kubernetes.io/os": "linux"}
        return all(mine.get(k) == v for k, v in selector.items())

    async def _reconcile(self) -> None:
        ours: dict[Key, Json] = {}
        for pod_key, pod in list(self.pods.objects.items()):
            node = pod["spec"].get("nodeName")
            if not node:
                uid = pod["metadata"]["uid"]
                if uid not in self._binding and self._may_run(pod):
                    self._binding.add(uid)
                    task = asyncio.create_task(self._bind(pod))
                    self._bind_tasks.add(task)
                    task.add_done_callback(self._bind_tasks.discard)
            elif node == self.name:
                ours[pod_key] = pod
        for pod_key, worker in list(self.workers.items()):
            current = ours.get(pod_key)
            if current is None or current["metadata"]["uid"] != worker.uid:
                self._finish(pod_key, worker, None)
        for pod_key, pod in ours.items():
            existing = self.workers.get(pod_key)
            if pod["metadata"].get("deletionTimestamp"):
                if pod_key not in self._deleting:
                    self._finish(pod_key, existing, pod)
            elif existing is None:
                if pod_key in self._deleting:
                    continue  # the old pod of this name is still stopping
                if (pod.get("status") or {}).get("phase") in ("Succeeded", "Failed"):
                    continue
                self.workers[pod_key] = PodWorker(self, pod)
            elif existing.pod["metadata"].get("resourceVersion") != pod["metadata"].get(
                "resourceVersion"
            ):
                existing.refresh(pod)
        versions = tuple(
            sorted(
                f"{k}@{o['metadata'].get('resourceVersion')}"
                for store in (self.config_maps_store, self.secrets_store)
                for k, o in store.objects.items()
            )
        )
        if versions != self._volume_versions:
            self._volume_versions = versions
            for worker in self.workers.values():
                worker.refresh(worker.pod)
        # Last: the pods that stop in this pass are no longer anyone's endpoint.
        await self._sync_services()

    async def _sync_services(self) -> None:
        hosts: list[tuple[str, str, list[str]]] = []
        for (ns, name), svc in sorted(self.services.objects.items()):
            names = [f"{name}.{ns}.svc.cluster.local", f"{name}.{ns}.svc", f"{name}.{ns}"]
            cluster_ip = svc.get("spec", {}).get("clusterIP")
            if cluster_ip and cluster_ip != "None":
                hosts.append((cluster_ip, ns, names))
            elif cluster_ip == "None":  # headless: the ready endpoints themselves
                subsets = self.endpoints.objects.get((ns, name), {}).get("subsets") or []
                for subset in subsets:
                    for address in subset.get("addresses") or []:
                        hosts.append((address["ip"], ns, names))
                        if address.get("hostname"):
                            own = [f"{address['hostname']}.{n}" for n in names]
                            hosts.append((address["ip"], ns, own))
        # Only this node's pods (and the host) are reachable from its namespace; an endpoint
        # of another node, or another runner's pod with the same address, is never dialled.
        local = {worker.uid: worker.ip for worker in self.workers.values() if worker.ip}

        def reachable(address: Json) -> bool:
            if self.proxy.is_host(address["ip"]):
                return True
            target = address.get("targetRef") or {}
            return bool(local.get(target.get("uid", "")) == address["ip"])  # our pod, by uid

        endpoints = self.endpoints.objects
        table = service_backends(self.services.objects.values(), endpoints, reachable)
        await self.proxy.sync(table)
        if hosts != self._service_hosts:
            self._service_hosts = hosts
            for worker in self.workers.values():
                if worker.ip:
                    worker.write_hosts()

    async def _bind(self, pod: Json) -> None:
        meta = pod["metadata"]
        binding = {
            "apiVersion": "v1",
            "kind": "Binding",
            "metadata": {"name": meta["name"], "uid": meta["uid"]},
            "target": {"apiVersion": "v1", "kind": "Node", "name": self.name},
        }
        try:
            response = await self.core.create_namespaced_pod_binding(
                meta["name"], meta["namespace"], cast(Any, binding), _preload_content=False
            )
            cast(Any, response).release()
            log.info("bound pod %s/%s to %s", meta["namespace"], meta["name"], self.name)
        except k8s.ApiException as exc:
            if exc.status not in (404, 409):
                log.warning("cannot bind %s/%s: %s", meta["namespace"], meta["name"], exc.reason)
        finally:
            self._binding.discard(meta["uid"])

    def _finish(self, pod_key: Key, worker: PodWorker | None, pod: Json | None) -> None:
        """Stop a pod's worker; when the API server is waiting for it, confirm the deletion."""
        if worker is not None and self.workers.get(pod_key) is worker:
            del self.workers[pod_key]

        async def finish() -> None:
            try:
                if worker is not None:
                    grace = self.settings.termination_grace_max
                    if pod is not None:
                        grace = min(
                            float(pod["metadata"].get("deletionGracePeriodSeconds") or 30), grace
                        )
                    await worker.terminate(grace)
                if pod is not None:
                    meta = pod["metadata"]
                    body = {"gracePeriodSeconds": 0, "preconditions": {"uid": meta["uid"]}}
                    try:
                        await self.core.delete_namespaced_pod(
                            meta["name"], meta["namespace"], body=cast(Any, body)
                        )
                    except k8s.ApiException as exc:
                        if exc.status not in (404, 409):
                            raise
            finally:
                self._deleting.pop(pod_key, None)
                self.changed.set()

        self._deleting[pod_key] = asyncio.create_task(finish())


def _scratch() -> str | None:
    """Pod files live in memory when possible (and never under /tmp, which pods get fresh)."""
    return "/dev/shm" if os.path.isdir("/dev/shm") else "/var/tmp"
