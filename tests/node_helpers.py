"""Helpers for tests on the local node: a runner for one test's namespace, requests from inside
the node's network, reading a container's files, waiting on a pod's status."""

from __future__ import annotations

import asyncio
import os
import subprocess
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any, cast

import pytest
from kubernetes_asyncio import client as k8s

from tpcontrol.node.netns import open_connection_in
from tpcontrol.node.runner import NodeRunner, NodeSettings

from .k8s_helpers import LABEL, unique

Json = dict[str, Any]


def require_root() -> None:
    """Node tests create network namespaces: root only. CI runs as root, so there they fail."""
    if os.geteuid() != 0:
        if os.environ.get("CI"):
            pytest.fail("the node tests need root (CI runs as root)")
        pytest.skip("the node tests need root (network namespaces)")


@asynccontextmanager
async def running_node(api: k8s.ApiClient, namespace: str) -> AsyncIterator[NodeRunner]:
    """A node that runs the pods of `namespace` only (made with `make_namespace`)."""
    settings = NodeSettings(node_name=unique("node"), namespace_labels={LABEL: namespace})
    async with NodeRunner(api, settings) as node:
        yield node


async def http_get(
    netns: str, host: str, port: int, path: str = "/", headers: dict[str, str] | None = None
) -> str:
    """One GET (Connection: close) from inside a network namespace; returns the body."""
    reader, writer = await open_connection_in(netns, host, port)
    extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
    writer.write(f"GET {path} HTTP/1.1\r\nHost: t\r\n{extra}Connection: close\r\n\r\n".encode())
    try:
        async with asyncio.timeout(10):
            response = await reader.read()
    finally:
        writer.close()
    head, _, body = response.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    return body.decode()


async def answers(netns: str, host: str, port: int, path: str = "/", **headers: str) -> str:
    """`http_get`, retried (bounded) while the far side is not there yet."""
    async with asyncio.timeout(30):
        while True:
            try:
                return await http_get(netns, host, port, path, headers)
            except (OSError, AssertionError, EOFError):
                await asyncio.sleep(0.2)


def read_in_container(pid: int, path: str) -> str:
    """A file as the container sees it (its own mount namespace)."""
    done = subprocess.run(
        ["nsenter", "-t", str(pid), "-m", "cat", path], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


async def written_in_container(pid: int, path: str, within: float = 10) -> str:
    """A file as the container sees it, once the container has written something to it."""
    async with asyncio.timeout(within):
        while True:
            done = await asyncio.create_subprocess_exec(
                "nsenter", "-t", str(pid), "-m", "cat", path,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
            )  # fmt: skip
            out, _ = await done.communicate()
            if done.returncode == 0 and out:
                return out.decode()
            await asyncio.sleep(0.05)


def environ_of(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/environ", "rb") as f:
        items = f.read().split(b"\0")
    return dict(i.decode().split("=", 1) for i in items if b"=" in i)


def cmdline(pid: int) -> list[str]:
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return [w.decode() for w in f.read().split(b"\0") if w]


def nat_rules(netns: str) -> str:
    """`iptables -t nat -S` inside a network namespace."""
    return subprocess.run(
        ["ip", "netns", "exec", netns, "iptables", "-t", "nat", "-S"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip


def alive(pid: int) -> bool:
    """Whether a process still runs (a zombie, dead but not yet reaped, does not)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


async def wait_for_pod(
    api: k8s.ApiClient,
    namespace: str,
    name: str,
    until: Callable[[Json], bool],
    within: float = 60,
) -> Json:
    """The pod as the API server holds it, once `until(pod)` holds."""
    core = k8s.CoreV1Api(api)
    last: Json = {}
    try:
        async with asyncio.timeout(within):
            while True:
                try:
                    pod = await core.read_namespaced_pod(name, namespace)
                    last = cast(Json, api.sanitize_for_serialization(pod))
                    if until(last):
                        return last
                except k8s.ApiException as exc:
                    if exc.status != 404:
                        raise
                await asyncio.sleep(0.1)
    except TimeoutError:
        raise AssertionError(f"pod {namespace}/{name}: still {last.get('status')}") from None


def ready(pod: Json) -> bool:
    conditions = (pod.get("status") or {}).get("conditions") or []
    return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)


def phase(value: str) -> Callable[[Json], bool]:
    return lambda pod: (pod.get("status") or {}).get("phase") == value
