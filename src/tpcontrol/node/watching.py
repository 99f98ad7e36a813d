"""A local copy of one kind of object, kept current by list-then-watch (a client-go reflector).

Objects stay plain JSON: the runner reads a handful of fields and must see what the API server
holds, fields this client's models do not know included. Any change sets `changed`, so the
runner reconciles on the level (the whole copy), never on single events; a watch that ends or
fails is followed by a new list, and a failing API server is retried with a bounded delay.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from typing import Any

import aiohttp
from kubernetes_asyncio import client as k8s

log = logging.getLogger("tpcontrol.node")

Json = dict[str, Any]
Key = tuple[str, str]


def key(obj: Json) -> Key:
    meta = obj.get("metadata", {})
    return meta.get("namespace", ""), meta.get("name", "")


class Reflector:
    """`objects` mirrors what `list_call` (e.g. `list_pod_for_all_namespaces`) returns."""

    def __init__(self, kind: str, list_call: Callable[..., Any], changed: asyncio.Event) -> None:
        self.kind = kind
        self.list_call = list_call
        self.changed = changed
        self.objects: dict[Key, Json] = {}
        self.synced = asyncio.Event()

    async def run(self) -> None:
        delay = 0.2
        while True:
            try:
                version = await self._list()
                delay = 0.2
                await self._watch(version)
            except asyncio.CancelledError:
                raise
            except (k8s.ApiException, aiohttp.ClientError, TimeoutError, ValueError) as exc:
                log.warning("%s: watch failed (%s); listing again in %.1f s", self.kind, exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    async def _list(self) -> str:
        response = await self.list_call(_preload_content=False, _request_timeout=30)
        listed = json.loads(await response.read())
        self.objects = {key(o): o for o in listed.get("items") or []}
        self.synced.set()
        self.changed.set()
        return str(listed["metadata"]["resourceVersion"])

    async def _watch(self, version: str) -> None:
        response = await self.list_call(
            watch=True,
            resource_version=version,
            timeout_seconds=50,
            _preload_content=False,
            _request_timeout=70,
        )
        try:
            while line := await response.content.readline():
                event = json.loads(line)
                obj = event.get("object") or {}
                if event.get("type") == "ERROR":
                    log.debug("%s: watch ended: %s", self.kind, obj.get("message"))
                    return  # e.g. 410 Gone: list again
                if event.get("type") == "DELETED":
                    self.objects.pop(key(obj), None)
                elif event.get("type") in ("ADDED", "MODIFIED"):
                    self.objects[key(obj)] = obj
                else:
                    continue
                self.changed.set()
        finally:
            response.release()
