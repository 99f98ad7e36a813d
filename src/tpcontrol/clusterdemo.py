"""`tpcontrol demo`: the whole 2.6 intercept flow on a control plane of this machine.

It starts etcd, kube-apiserver and kube-controller-manager (building them first when missing),
then the traffic-manager, the agent-injector webhook and a node that runs pods as local
processes in network namespaces of their own. It deploys examples/workloads.yaml and walks
through what a team does: plain traffic; Alice intercepts HTTP by header (the workload rolls out
with the agent the webhook injects); Bob intercepts the same port with another header; Carol
takes a TCP port; everybody leaves; the agent is uninstalled (another rollout). Each step checks
where every request went. Ctrl-C tears everything down. Exit 0 only when every step held.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import yaml
from kubernetes_asyncio import client as k8s

from tpcontrol.localcluster import (
    ControlPlaneError,
    LocalControlPlane,
    missing_binaries,
    wait_for_service_account,
)
from tpcontrol.localstack import Stack, running_stack
from tpcontrol.node.netns import NetworkError, open_connection_in
from tpcontrol.node.podspec import EXAMPLES

NAMESPACE = "shop"
SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "install-k8s-testbin.sh"


def preflight() -> list[str]:
    """What this machine lacks for the demo (empty: ready)."""
    found = []
    if os.geteuid() != 0:
        found.append("run as root: the node puts each pod in a network namespace of its own")
    for tool, package in (("ip", "iproute2"), ("iptables", "iptables"), ("nsenter", "util-linux")):
        if shutil.which(tool) is None:
            found.append(f"{tool} is missing (Debian package {package})")
    if not (EXAMPLES / "workloads.yaml").exists():
        found.append(f"{EXAMPLES / 'workloads.yaml'} is missing (run from a clone of the project)")
    return found


@dataclass
class Step:
    title: str
    lines: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    def say(self, line: str) -> None:
        self.lines.append(line)
        print(f"   {line}", flush=True)

    def check(self, ok: bool, line: str) -> None:
        self.say(("ok    " if ok else "WRONG ") + line)
        if not ok:
            self.failures.append(line)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Walkthrough:
    """The steps, in order, with the processes they start (stopped by `close`)."""

    def __init__(self, api: k8s.ApiClient, stack: Stack, requests: int) -> None:
        self.api = api
        self.core = k8s.CoreV1Api(api)
        self.stack = stack
        self.requests = requests
        self.steps: list[Step] = []
        self.processes: list[asyncio.subprocess.Process] = []
        self.clients: dict[str, asyncio.subprocess.Process] = {}
        self.service_ip = ""

    # -- plumbing ----------------------------------------------------------------------------

    async def step(self, title: str, body: Callable[[Step], Awaitable[None]]) -> None:
        step = Step(title)
        self.steps.append(step)
        print(f"\n== {len(self.steps)}. {title}", flush=True)
        try:
            await body(step)
        except (TimeoutError, OSError, RuntimeError, k8s.ApiException) as exc:
            step.check(False, f"{type(exc).__name__}: {exc}")

    async def start_local(self, script: str, name: str) -> int:
        """A developer's own process on this machine (one of the example apps)."""
        port = free_port()
        proc = await asyncio.create_subprocess_exec(
            sys.executable, str(EXAMPLES / script), "--host", "127.0.0.1", "--port", str(port),
            "--name", name, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
        self.processes.append(proc)
        assert proc.stdout is not None
        async with asyncio.timeout(10):
            line = await proc.stdout.readline()
        if b"listening" not in line:
            raise RuntimeError(f"{name}'s {script} did not start: {line.decode().strip()}")
        return port

    async def intercept(self, step: Step, name: str, *args: str) -> None:
        """Run `tpcontrol intercept ...` as the developer would, until it says ACTIVE."""
        command = [
            "intercept", "shop", "-n", NAMESPACE, "--name", name,
            "--manager", self.stack.manager_url, *args,
        ]  # fmt: skip
        step.say("$ tpcontrol " + " ".join(_quote(a) for a in command))
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "tpcontrol", *command,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
        self.clients[name] = proc
        assert proc.stdout is not None
        async with asyncio.timeout(120):
            while line := (await proc.stdout.readline()).decode():
                step.say("  | " + line.rstrip())
                if line.strip().startswith("ACTIVE"):
                    return
        raise RuntimeError(f"tpcontrol intercept {name} ended: exit {await proc.wait()}")

    async def leave(self, step: Step, name: str) -> None:
        proc = self.clients.pop(name)
        proc.send_signal(signal.SIGINT)
        assert proc.stdout is not None
        async with asyncio.timeout(30):
            rest = (await proc.stdout.read()).decode().strip().splitlines()
            code = await proc.wait()
        step.check(code == 0 and any("left intercept" in r for r in rest), f"{name}: {rest[-1:]}")

    async def http(self, port: int, *devs: str | None, path: str = "/cart") -> list[str]:
        """Requests on one keep-alive connection to the Service, one per `devs` (x-dev value)."""
        reader, writer = await open_connection_in(
            self.stack.node.network.node_ns, self.service_ip, port
        )
        answers = []
        try:
            for dev in devs:
                extra = f"x-dev: {dev}\r\n" if dev else ""
                writer.write(f"GET {path} HTTP/1.1\r\nHost: shop\r\n{extra}\r\n".encode())
                async with asyncio.timeout(10):
                    head = await reader.readuntil(b"\r\n\r\n")
                    length = next(
                        int(h.split(b":", 1)[1])
                        for h in head.split(b"\r\n")
                        if h.lower().startswith(b"content-length:")
                    )
                    answers.append((await reader.readexactly(length)).decode().strip())
        finally:
            writer.close()
        return answers

    async def tcp(self, port: int) -> str:
        reader, writer = await open_connection_in(
            self.stack.node.network.node_ns, self.service_ip, port
        )
        try:
            async with asyncio.timeout(10):
                greeting = (await reader.readline()).decode().strip()
                writer.write(b"ping\n")
                echo = (await reader.readline()).decode().strip()
        finally:
            writer.close()
        return f"{greeting} / {echo}"

    async def expect_http(
        self, step: Step, port: int, devs: list[str | None], wants: list[str]
    ) -> None:
        answers = await self.http(port, *devs)
        for dev, want, answer in zip(devs, wants, answers, strict=True):
            label = f"x-dev: {dev}" if dev else "no x-dev"
            step.check(want in answer, f"GET shop:{port} ({label}) -> {answer}")

    async def rollout(self, step: Step, *, agent: bool, within: float = 120) -> list[Json]:
        """Show the pods as they change until one pod, ready, with (or without) the agent."""
        shown = ""
        started = time.monotonic()
        async with asyncio.timeout(within):
            while True:
                listed = await self.core.list_namespaced_pod(NAMESPACE, label_selector="app=shop")
                pods = [self.api.sanitize_for_serialization(p) for p in listed.items]
                line = ", ".join(_describe(p) for p in pods) or "no pods yet"
                if line != shown:
                    shown = line
                    step.say(f"[{time.monotonic() - started:5.1f}s] pods: {line}")
                done = [
                    p for p in pods if _ready(p) and _has_agent(p) == agent and not _terminating(p)
                ]
                if len(done) == 1 and len(pods) == 1:
                    return done
                await asyncio.sleep(0.2)

    def pod_rules(self, pod: Json) -> list[str]:
        """The pod's iptables nat rules, read inside its network namespace."""
        worker = self.stack.node.workers.get((NAMESPACE, pod["metadata"]["name"]))
        if worker is None or not worker.netns:
            return []
        done = subprocess.run(
            ["ip", "netns", "exec", worker.netns, "iptables", "-t", "nat", "-S", "TEL_INBOUND_TCP"],
            capture_output=True,
            text=True,
            check=False,
        )
        return [r for r in done.stdout.splitlines() if "REDIRECT" in r]

    async def close(self) -> None:
        for proc in [*self.clients.values(), *self.processes]:
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(
                        signal.SIGINT if proc in self.clients.values() else signal.SIGTERM
                    )
        for proc in [*self.clients.values(), *self.processes]:
            try:
                async with asyncio.timeout(10):
                    await proc.wait()
            except TimeoutError:
                proc.kill()
                await proc.wait()

    # -- the steps ---------------------------------------------------------------------------

    async def run(self) -> None:
        local: dict[str, int] = {}

        async def deploy(step: Step) -> None:
            step.say(f"applying {EXAMPLES / 'workloads.yaml'} to namespace {NAMESPACE}")
            for doc in yaml.safe_load_all((EXAMPLES / "workloads.yaml").read_text()):
                await _create(self.api, doc)
                step.say(f"created {doc['kind']} {doc['metadata']['name']}")
            service = await self.core.read_namespaced_service("shop", NAMESPACE)
            self.service_ip = service.spec.cluster_ip
            (pod,) = await self.rollout(step, agent=False)
            step.check(
                [c["name"] for c in pod["spec"]["containers"]] == ["web", "stock"],
                f"pod {pod['metadata']['name']} runs web and stock at {pod['status']['podIP']}; "
                f"service shop is {self.service_ip}",
            )

        async def plain(step: Step) -> None:
            await self.expect_http(
                step, 80, [None] * self.requests, ["/web on port 8080"] * self.requests
            )
            await self.expect_http(step, 9090, [None], ["/web on port 9090"])
            answer = await self.tcp(7070)
            step.check("/stock" in answer, f"TCP shop:7070 -> {answer}")

        async def alice(step: Step) -> None:
            local["alice"] = await self.start_local("http_echo.py", "alice's laptop")
            step.say(f"alice runs her version of web on localhost:{local['alice']}")
            waiting = asyncio.create_task(self.rollout(step, agent=True))
            await self.intercept(
                step, "alice", "--port", "http", "--http-header", "x-dev=alice",
                "--to", str(local["alice"]),
            )  # fmt: skip
            (pod,) = await waiting
            names = [c["name"] for c in pod["spec"]["containers"]]
            step.check("traffic-agent" in names, f"the webhook injected the agent: {names}")
            for rule in self.pod_rules(pod):
                step.say(f"tel-agent-init installed in the pod: {rule}")
            await self.expect_http(
                step, 80, ["alice", None, "alice"], ["alice's laptop", "/web on", "alice's laptop"]
            )
            await self.expect_http(step, 9090, [None], ["/web on port 9090"])

        async def bob(step: Step) -> None:
            local["bob"] = await self.start_local("http_echo.py", "bob's laptop")
            step.say(f"bob runs his version of web on localhost:{local['bob']}")
            await self.intercept(
                step, "bob", "--port", "http", "--http-header", "x-dev=bob",
                "--to", str(local["bob"]),
            )  # fmt: skip
            step.say("three requests on one keep-alive connection, routed one by one:")
            await self.expect_http(
                step, 80, ["alice", "bob", None], ["alice's laptop", "bob's laptop", "/web on"]
            )

        async def carol(step: Step) -> None:
            local["carol"] = await self.start_local("tcp_echo.py", "carol's laptop")
            step.say(f"carol runs her version of stock on localhost:{local['carol']}")
            await self.intercept(
                step, "carol", "--port", "echo", "--mechanism", "tcp", "--to", str(local["carol"])
            )
            answer = await self.tcp(7070)
            step.check("carol's laptop" in answer, f"TCP shop:7070 -> {answer}")
            await self.expect_http(step, 80, ["bob", None], ["bob's laptop", "/web on"])

        async def leave(step: Step) -> None:
            for name in ("alice", "bob", "carol"):
                await self.leave(step, name)
            await self.expect_http(step, 80, ["alice", "bob", None], ["/web on"] * 3)
            answer = await self.tcp(7070)
            step.check("/stock" in answer, f"TCP shop:7070 -> {answer}")

        async def uninstall(step: Step) -> None:
            step.say(f"$ tpcontrol uninstall shop -n {NAMESPACE}")
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "tpcontrol", "uninstall", "shop", "-n", NAMESPACE,
                "--manager", self.stack.manager_url, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
            )  # fmt: skip
            out, _ = await proc.communicate()
            step.check(proc.returncode == 0, "  | " + out.decode().strip())
            (pod,) = await self.rollout(step, agent=False)
            names = [c["name"] for c in pod["spec"]["containers"]]
            step.check(names == ["web", "stock"], f"the new pod has no agent: {names}")
            await self.expect_http(step, 80, ["alice", None], ["/web on"] * 2)

        await self.step("deploy the example workload", deploy)
        await self.step("plain traffic through the Service reaches the app", plain)
        await self.step("alice intercepts HTTP port http for requests with x-dev: alice", alice)
        await self.step("bob intercepts the same port for x-dev: bob", bob)
        await self.step("carol intercepts TCP port echo (another container)", carol)
        await self.step("everybody leaves: all traffic goes back to the app", leave)
        await self.step("uninstall the agent: the workload rolls out without it", uninstall)


Json = dict[str, Any]


def _quote(word: str) -> str:
    return f"'{word}'" if " " in word or "'" in word else word


def _has_agent(pod: Json) -> bool:
    return any(c["name"] == "traffic-agent" for c in pod["spec"]["containers"])


def _terminating(pod: Json) -> bool:
    return bool(pod["metadata"].get("deletionTimestamp"))


def _ready(pod: Json) -> bool:
    conditions = (pod.get("status") or {}).get("conditions") or []
    return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)


def _describe(pod: Json) -> str:
    status = pod.get("status") or {}
    states = status.get("containerStatuses") or []
    ready = sum(1 for s in states if s.get("ready"))
    agent = " +agent" if _has_agent(pod) else ""
    phase = "Terminating" if _terminating(pod) else status.get("phase", "Pending")
    return f"{pod['metadata']['name']}{agent} {phase} {ready}/{len(pod['spec']['containers'])}"


async def _create(api: k8s.ApiClient, doc: Json) -> None:
    kind = doc["kind"]
    if kind == "Deployment":
        await k8s.AppsV1Api(api).create_namespaced_deployment(NAMESPACE, cast(Any, doc))
    elif kind == "Service":
        await k8s.CoreV1Api(api).create_namespaced_service(NAMESPACE, cast(Any, doc))
    elif kind == "ConfigMap":
        await k8s.CoreV1Api(api).create_namespaced_config_map(NAMESPACE, cast(Any, doc))
    else:
        raise RuntimeError(f"examples/workloads.yaml: unexpected kind {kind!r}")


def _build_control_plane() -> bool:
    missing = missing_binaries()
    if not missing:
        return True
    print(f"control plane binaries missing ({', '.join(missing)}): building with {SCRIPT}")
    print("(once; about 5-10 minutes on 2 cores, cached in ~/.cache/k8s-testbin)", flush=True)
    return (
        subprocess.run(["bash", str(SCRIPT)], check=False).returncode == 0
        and not missing_binaries()
    )


async def run_cluster_demo(requests: int = 3) -> int:
    """The whole demo; returns the exit code (0: every step held; 130: interrupted)."""
    found = preflight()
    if found:
        for problem in found:
            print(f"tpcontrol demo: {problem}", file=sys.stderr)
        print(
            "(`tpcontrol demo --engine-only` runs the forwarding demo without a cluster)",
            file=sys.stderr,
        )
        return 2
    if not await asyncio.to_thread(_build_control_plane):
        print("tpcontrol demo: the control plane could not be built", file=sys.stderr)
        return 2
    plane = LocalControlPlane()
    walk: Walkthrough | None = None
    started = time.monotonic()
    try:
        print(
            "starting etcd, kube-apiserver and kube-controller-manager on 127.0.0.1 ...", flush=True
        )
        await asyncio.to_thread(plane.start)
        print(f"control plane ready at {plane.url} (kubeconfig {plane.kubeconfig})", flush=True)
        async with plane.api() as api:
            await k8s.CoreV1Api(api).create_namespace(cast(Any, {"metadata": {"name": NAMESPACE}}))
            await wait_for_service_account(api, NAMESPACE)
            async with running_stack(api, probe_namespace=NAMESPACE) as stack:
                print(
                    f"traffic-manager on {stack.manager_url}, agent injector registered, node "
                    f"{stack.node.name} up (pods in network namespaces "
                    f"{stack.node.network.node_ns}-*)",
                    flush=True,
                )
                walk = Walkthrough(api, stack, requests)
                try:
                    await walk.run()
                finally:
                    await walk.close()
    except asyncio.CancelledError:
        print("\ninterrupted: tearing everything down", file=sys.stderr, flush=True)
        await asyncio.to_thread(plane.stop)
        return 130
    except (ControlPlaneError, NetworkError, k8s.ApiException, OSError) as exc:
        # Setting up failed (a step's own errors are in its result): say what, not a traceback.
        print(f"tpcontrol demo: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        return 1
    finally:
        await asyncio.to_thread(plane.stop)
    return _summary(walk, time.monotonic() - started)


def _summary(walk: Walkthrough | None, seconds: float) -> int:
    print(f"\n== summary ({seconds:.0f} s)")
    if walk is None:
        print("   the demo did not get to its first step")
        return 1
    for number, step in enumerate(walk.steps, 1):
        checks = sum(1 for line in step.lines if line.startswith(("ok", "WRONG")))
        verdict = "ok    " if not step.failures else "FAILED"
        print(
            f"   {verdict} {number}. {step.title} ({checks - len(step.failures)}/{checks} checks)"
        )
        for failure in step.failures:
            print(f"            {failure}")
    return 0 if walk.steps and all(not s.failures for s in walk.steps) else 1
