"""`tpcontrol demo`: the whole 2.6 intercept flow on a Kubernetes cluster of this machine.

It builds the project's images from the checkout (`--source`), starts a real cluster (control
plane, kubelet, containerd, kube-proxy: `cluster.LocalCluster`), installs the product from
`deploy/` (the traffic-manager and the agent injector run as pods), deploys
examples/workloads.yaml and walks through what a team does: plain traffic; Alice intercepts HTTP
by header through a port-forward to the in-cluster manager (the workload rolls out with the agent
the webhook injects); Bob intercepts the same port with another header; Carol takes a TCP port;
everybody leaves; the agent is uninstalled (another rollout). Each step checks where every
request went; a failed step says which pod is in trouble and why. Ctrl-C tears everything down.
Exit 0 only when every step held.

Long on purpose: the demo's walk-through, step by step, as the README describes it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar, cast

import yaml
from kubernetes_asyncio import client as k8s

from tpcontrol.lifecycle import cancel_on_sigterm, child_options, wait_or_kill
from tpcontrol.localcluster import images as image_builder
from tpcontrol.localcluster.cluster import NAME, ClusterError, LocalCluster, missing_tools
from tpcontrol.localcluster.controlplane import ControlPlaneError, wait_for_service_account
from tpcontrol.localcluster.install import install
from tpcontrol.localcluster.network import NetworkError, open_connection_in
from tpcontrol.names import AGENT_CONTAINER, MANAGER_NAMESPACE

NAMESPACE = "shop"
EXAMPLES_IMAGE = "docker.io/tpproxy/examples:0.1.0"  # the name examples/workloads.yaml uses


def preflight(source: Path) -> list[str]:
    """What this machine or checkout lacks for the demo (empty: ready)."""
    found = []
    if os.geteuid() != 0:
        found.append("run as root: the cluster's node needs a network namespace and cgroups")
    for name in ("Containerfile", "deploy/kustomization.yaml", "examples/workloads.yaml"):
        if not (source / name).exists():
            found.append(f"{source / name} is missing (--source names the project's checkout)")
    if found:
        return found
    missing = missing_tools() + image_builder.missing_tools()
    if missing:
        found.append(
            "missing " + ", ".join(dict.fromkeys(missing)) + " (scripts/install-node-tools.sh "
            "and scripts/install-k8s-testbin.sh install them; ./dev demo runs both)"
        )
    return found


class ClosedUnanswered(ConnectionError):
    """The Service's pod closed a new connection before answering its first request."""


@dataclass
class Step:
    title: str
    lines: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    why: list[str] = field(default_factory=list)  # what the pods said when a check failed

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

    def __init__(
        self, api: k8s.ApiClient, cluster: LocalCluster, source: Path, requests: int
    ) -> None:
        self.api = api
        self.core = k8s.CoreV1Api(api)
        self.cluster = cluster
        self.examples = source / "examples"
        self.requests = requests
        self.env = {**os.environ, "KUBECONFIG": str(cluster.kubeconfig)}
        self.developer_env: dict[str, dict[str, str]] = {}
        self.steps: list[Step] = []
        self.processes: list[asyncio.subprocess.Process] = []
        self.clients: dict[str, asyncio.subprocess.Process] = {}
        self.service_ip = ""
        self.examples_image = EXAMPLES_IMAGE
        self.manager_namespace = MANAGER_NAMESPACE
        self.outputs: dict[str, list[str]] = {}
        self.drains: dict[str, asyncio.Task[None]] = {}

    # -- plumbing ----------------------------------------------------------------------------

    async def step(self, title: str, body: Callable[[Step], Awaitable[None]]) -> None:
        step = Step(title)
        self.steps.append(step)
        print(f"\n== {len(self.steps)}. {title}", flush=True)
        try:
            await body(step)
        except (TimeoutError, OSError, EOFError, ValueError, RuntimeError, k8s.ApiException) as exc:
            step.check(False, f"{type(exc).__name__}: {exc or 'no answer in time'}")
        if step.failures:  # the workload's pods, and the manager's and injector's
            for namespace in (NAMESPACE, self.manager_namespace):
                why = await asyncio.to_thread(self.cluster.describe_pods, namespace)
                for line in why.splitlines():
                    step.say(f"pods in {namespace}: {line}")
                    step.why.append(f"{namespace}: {line}")

    async def start_local(self, script: str, name: str) -> int:
        """A developer's own process on this machine (one of the example apps)."""
        port = free_port()
        proc = await asyncio.create_subprocess_exec(
            sys.executable, str(self.examples / script), "--host", "127.0.0.1", "--port", str(port),
            "--name", name, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
            **child_options(),  # type: ignore[arg-type]
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
        command = ["intercept", "shop", "-n", NAMESPACE, "--name", name, *args]
        step.say(f"{name}$ tpcontrol " + " ".join(_quote(a) for a in command))
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "tpcontrol", *command, env=self.developer_env.get(name, self.env),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
            **child_options(),  # type: ignore[arg-type]
        )  # fmt: skip
        self.clients[name] = proc
        assert proc.stdout is not None
        async with asyncio.timeout(120):
            while line := (await proc.stdout.readline()).decode():
                step.say("  | " + line.rstrip())
                if line.strip().startswith("ACTIVE"):
                    # What it says from now on is kept (its pipe must never fill up).
                    self.outputs[name] = []
                    self.drains[name] = asyncio.create_task(_collect(proc, self.outputs[name]))
                    return
        raise RuntimeError(f"tpcontrol intercept {name} ended: exit {await proc.wait()}")

    async def mounted_at(self, name: str, within: float = 30) -> Path:
        """Where `name`'s intercept mounted the container's files (from what it says)."""
        async with asyncio.timeout(within):
            while True:
                for line in self.outputs.get(name, []):
                    if "files are mounted at " in line:
                        return Path(line.split("mounted at ", 1)[1].split(" (")[0])
                    if "tpcontrol: mounts:" in line:
                        raise RuntimeError(line)
                await asyncio.sleep(0.1)

    async def leave(self, step: Step, name: str) -> None:
        proc = self.clients[name]
        proc.send_signal(signal.SIGINT)
        async with asyncio.timeout(30):
            code = await proc.wait()
            await self.drains.pop(name)
        del self.clients[name]  # only once it has ended: `close` kills what did not
        rest = self.outputs.pop(name)
        step.check(code == 0 and any("left intercept" in r for r in rest), f"{name}: {rest[-1:]}")

    async def connect(
        self, port: int, within: float = 15
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """A connection to the Service from inside the cluster's network. kube-proxy programs a
        new endpoint a moment after the pod turns ready (until then the Service refuses), so a
        refusal (or a connection attempt that a stopping pod never answers) is retried for
        `within` seconds, as a client of a real cluster would."""
        deadline = time.monotonic() + within
        while True:
            try:
                return await open_connection_in(
                    self.cluster.network, self.service_ip, port, within=3
                )
            except (ConnectionRefusedError, TimeoutError):  # TimeoutError: a pod going away
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.1)

    async def endpoints(self) -> set[str]:
        """The pod addresses the Service `shop` sends to (ready or not)."""
        try:
            found = await self.core.read_namespaced_endpoints("shop", NAMESPACE)
        except k8s.ApiException:
            return set()
        return {
            a.ip
            for subset in found.subsets or []
            for a in [*(subset.addresses or []), *(subset.not_ready_addresses or [])]
        }

    async def http(self, port: int, *devs: str | None, path: str = "/cart") -> list[str]:
        """`one_connection`; a connection that a stopping pod closed before it answered the
        first request is tried again on a new one (as HTTP clients retry idempotent requests on
        a closed keep-alive connection): kube-proxy can still send to a pod that is going."""
        for attempt in range(3):
            try:
                return await self.one_connection(port, *devs, path=path)
            except ClosedUnanswered:
                if attempt == 2:
                    raise
                await asyncio.sleep(0.2)
        raise AssertionError("unreachable")

    async def one_connection(self, port: int, *devs: str | None, path: str = "/cart") -> list[str]:
        """Requests on one keep-alive connection to the Service, one per `devs` (x-dev value)."""
        reader, writer = await self.connect(port)
        answers: list[str] = []
        try:
            for dev in devs:
                extra = f"x-dev: {dev}\r\n" if dev else ""
                writer.write(f"GET {path} HTTP/1.1\r\nHost: shop\r\n{extra}\r\n".encode())
                async with asyncio.timeout(10):
                    try:
                        head = await reader.readuntil(b"\r\n\r\n")
                    except asyncio.IncompleteReadError as exc:
                        if answers or exc.partial:
                            raise
                        raise ClosedUnanswered(f"shop:{port} closed the connection") from None
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
        reader, writer = await self.connect(port)
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
        """Show the pods as they change until one pod, ready, with (or without) the agent, and
        no other pod but terminating ones (kubelet 1.20 confirms a deletion seconds after the
        containers have stopped; the Service has dropped them long before)."""
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
                serving = len(done) == 1 and sum(not _terminating(p) for p in pods) == 1
                going = {p["status"].get("podIP") for p in pods if _terminating(p)} - {None}
                if (
                    serving
                    and await self.endpoints() == {done[0]["status"]["podIP"]}
                    # kube-proxy applies the endpoint change a moment later: until its rules
                    # no longer send to a stopping pod, a connection may still reach one.
                    and not going & await asyncio.to_thread(self.cluster.service_destinations)
                ):
                    return done
                await asyncio.sleep(0.2)

    def pod_rules(self, pod: Json) -> list[str]:
        """The pod's iptables nat rules, read inside its network namespace."""
        return [
            r
            for r in self.cluster.pod_iptables(pod, "-t", "nat", "-S", "TEL_INBOUND_TCP")
            if "REDIRECT" in r
        ]

    async def close(self) -> None:
        for proc in [*self.clients.values(), *self.processes]:
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(
                        signal.SIGINT if proc in self.clients.values() else signal.SIGTERM
                    )
        for proc in [*self.clients.values(), *self.processes]:
            await wait_or_kill(proc, within=10)

    # -- the steps ---------------------------------------------------------------------------

    async def developers(self, step: Step) -> None:
        """alice and bob (token users) and carol (a client certificate of the cluster's CA),
        each bound to the documented role in the demo's namespace only."""
        plane = self.cluster.plane
        rbac = k8s.RbacAuthorizationV1Api(self.api)
        for name in ("alice", "bob", "carol"):
            if name == "carol":
                path = plane.write_certificate_kubeconfig(f"kubeconfig-{name}", name, "developers")
                how = "a client certificate of the cluster's CA"
            else:
                path = plane.write_kubeconfig(f"kubeconfig-{name}", name, plane.tokens[name])
                how = "a token"
            self.developer_env[name] = {**os.environ, "KUBECONFIG": str(path)}
            subject = [{"kind": "User", "name": name, "apiGroup": "rbac.authorization.k8s.io"}]
            for namespace, kind, role in [
                (NAMESPACE, "ClusterRole", "traffic-interceptor"),
                (self.manager_namespace, "Role", "traffic-manager-clients"),
            ]:
                binding = {
                    "metadata": {"name": f"{role}-{name}"},
                    "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": kind,
                                "name": role},
                    "subjects": subject,
                }  # fmt: skip
                await rbac.create_namespaced_role_binding(namespace, cast(Any, binding))
            step.check(True, f"{name}: {how}, {path.name}; may intercept in {NAMESPACE} only")

    async def refused(self, step: Step) -> None:
        """The manager enforces: alice is refused in a namespace where she has no role."""
        command = ["intercept", "shop", "-n", "default", "--port", "http", "--to", "1"]
        step.say("alice$ tpcontrol " + " ".join(command))
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "tpcontrol", *command, env=self.developer_env["alice"],
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
            **child_options(),  # type: ignore[arg-type]
        )  # fmt: skip
        async with asyncio.timeout(60):
            out, _ = await proc.communicate()
        said = out.decode().strip()
        step.check(
            proc.returncode == 2 and "may not create pods/portforward" in said,
            f"refused (exit {proc.returncode}): {said.splitlines()[-1] if said else ''}",
        )

    async def run(self) -> None:
        local: dict[str, int] = {}

        async def deploy(step: Step) -> None:
            step.say(f"applying {self.examples / 'workloads.yaml'} to namespace {NAMESPACE}")
            text = (self.examples / "workloads.yaml").read_text()
            for doc in yaml.safe_load_all(text.replace(EXAMPLES_IMAGE, self.examples_image)):
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
            try:
                await self.intercept(
                    step, "alice", "--port", "http", "--http-header", "x-dev=alice",
                    "--to", str(local["alice"]),
                )  # fmt: skip
                (pod,) = await waiting
            finally:  # interrupted (Ctrl-C) or failed: the watch of the rollout ends with us
                if not waiting.done():
                    waiting.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await waiting
            names = [c["name"] for c in pod["spec"]["containers"]]
            step.check(AGENT_CONTAINER in names, f"the webhook injected the agent: {names}")
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
            root = await self.mounted_at("carol")
            greeting = await asyncio.to_thread(_read, root / "etc/shop/greeting")
            step.check(
                greeting == "hello from the shop",
                f"carol's laptop reads $TELEPRESENCE_ROOT/etc/shop/greeting (the stock "
                f"container's ConfigMap, mounted at {root}): {greeting!r}",
            )

        async def leave(step: Step) -> None:
            for name in ("alice", "bob", "carol"):
                await self.leave(step, name)
            await self.expect_http(step, 80, ["alice", "bob", None], ["/web on"] * 3)
            answer = await self.tcp(7070)
            step.check("/stock" in answer, f"TCP shop:7070 -> {answer}")

        async def uninstall(step: Step) -> None:
            step.say(f"$ tpcontrol uninstall shop -n {NAMESPACE}")
            proc = await asyncio.create_subprocess_exec(
                # An admin's operation: `patch` on the workload, which the developers' role lacks.
            sys.executable, "-m", "tpcontrol", "uninstall", "shop", "-n", NAMESPACE,
                env=self.env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
            )  # fmt: skip
            out, _ = await proc.communicate()
            step.check(proc.returncode == 0, "  | " + out.decode().strip())
            (pod,) = await self.rollout(step, agent=False)
            names = [c["name"] for c in pod["spec"]["containers"]]
            step.check(names == ["web", "stock"], f"the new pod has no agent: {names}")
            await self.expect_http(step, 80, ["alice", None], ["/web on"] * 2)

        await self.step(
            "developers get the documented role in namespace shop (enforcing mode)",
            self.developers,
        )
        await self.step("deploy the example workload", deploy)
        await self.step("plain traffic through the Service reaches the app", plain)
        await self.step("alice intercepts HTTP port http for requests with x-dev: alice", alice)
        await self.step("alice may not intercept where she has no role", self.refused)
        await self.step("bob intercepts the same port for x-dev: bob", bob)
        await self.step("carol intercepts TCP port echo (another container)", carol)
        await self.step("everybody leaves: all traffic goes back to the app", leave)
        await self.step("uninstall the agent: the workload rolls out without it", uninstall)


Json = dict[str, Any]
T = TypeVar("T")


def _quote(word: str) -> str:
    return f"'{word}'" if " " in word or "'" in word else word


def _has_agent(pod: Json) -> bool:
    return any(c["name"] == AGENT_CONTAINER for c in pod["spec"]["containers"])


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


async def run_cluster_demo(source: Path, requests: int = 3, name: str = "tpcontrol") -> int:
    """The whole demo; returns the exit code (0: every step held; 130: interrupted)."""
    found = preflight(source)
    if not NAME.fullmatch(name):
        found.append(f"--cluster-name {name!r}: 1-10 lowercase letters and digits")
    if found:
        for problem in found:
            print(f"tpcontrol demo: {problem}", file=sys.stderr)
        print(
            "(`tpcontrol demo --engine-only` runs the forwarding demo without a cluster)",
            file=sys.stderr,
        )
        return 2
    started = time.monotonic()

    def say(line: str) -> None:
        print(f"[{time.monotonic() - started:6.1f}s] {line}", flush=True)

    walk: Walkthrough | None = None
    cluster: LocalCluster | None = None
    uncatch = cancel_on_sigterm()  # `kill` (or a CI's timeout) tears down as Ctrl-C does
    try:
        say(f"building the images from {source} (cached by content)")
        built = await _in_thread(image_builder.build_images, source, None, say)
        cluster = LocalCluster(
            images=[built.pause.archive, built.product.archive, built.examples.archive],
            name=name,
            progress=say,
        )
        say("starting the cluster: control plane, containerd, kubelet, kube-proxy")
        await _in_thread(cluster.start)
        for line in cluster.kubectl("get", "nodes", "-o", "wide").stdout.splitlines():
            print(f"   {line}", flush=True)
        say(f"installing the product from {source / 'deploy'} (image {built.product.ref})")
        installed = await _in_thread(install, cluster, source, built.product.ref)
        say(
            f"traffic-manager and agent injector running in namespace {installed.namespace} "
            f"({installed.seconds:.1f} s); developers reach them with kubectl port-forward"
        )
        async with cluster.api() as api:
            await k8s.CoreV1Api(api).create_namespace(cast(Any, {"metadata": {"name": NAMESPACE}}))
            await wait_for_service_account(api, NAMESPACE)
            walk = Walkthrough(api, cluster, source, requests)
            walk.examples_image = built.examples.ref
            try:
                await walk.run()
            finally:
                await walk.close()
    except asyncio.CancelledError:
        print("\ninterrupted: tearing everything down", file=sys.stderr, flush=True)
        return 130
    except (
        ClusterError, ControlPlaneError, NetworkError, image_builder.ImageBuildError,
        k8s.ApiException, OSError, subprocess.SubprocessError,
    ) as exc:  # fmt: skip
        # Setting up failed (a step's own errors are in its result): say what, not a traceback.
        print(f"tpcontrol demo: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        return 1
    finally:
        if cluster is not None:
            try:
                await _in_thread(cluster.stop)
            except (ClusterError, NetworkError, OSError, subprocess.SubprocessError) as exc:
                print(f"tpcontrol demo: tearing down: {exc}", file=sys.stderr, flush=True)
        uncatch()
    return _summary(walk, time.monotonic() - started)


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError as exc:
        return f"unreadable: {exc}"


async def _collect(proc: asyncio.subprocess.Process, lines: list[str]) -> None:
    assert proc.stdout is not None
    while line := (await proc.stdout.readline()).decode():
        lines.append(line.rstrip())


async def _in_thread(work: Callable[..., T], *args: Any) -> T:
    """Run blocking set-up work in a thread; on Ctrl-C (one or several), let it finish before
    tearing down: a thread cannot be interrupted, and stopping a half-started cluster under it
    would race with what it still starts."""
    task = asyncio.ensure_future(asyncio.to_thread(work, *args))
    cancelled = False
    while not task.done():
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            cancelled = True
        except Exception:
            break
    if cancelled:
        raise asyncio.CancelledError
    return task.result()


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
        for line in step.why:
            print(f"              {line}")
    return 0 if walk.steps and all(not s.failures for s in walk.steps) else 1
