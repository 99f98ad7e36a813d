"""The traffic-manager at scale (issue 15): 1,000 agent sessions and 200 client sessions on a
real API server, every session with an open watch and heartbeating as the agent and the CLI do
(every 5 s); then what a developer waits for, and what each change costs the manager.

    .venv/bin/python benchmarks/manager_scale.py [--agents 1000] [--clients 200]
        [--intercepts 200] [--workloads 250] [--namespaces 10] [--rate 10] [--profile FILE]

Real parts only: kube-apiserver and etcd (`LocalControlPlane(controller_manager=False)`), the
manager as `python -m tpcontrol manager` in a process of its own (enforcing: an agent is its
pod's bound service-account token, checked by TokenReview and a look at the pod and its owners;
a client is a developer's service-account token, checked by TokenReview and
SubjectAccessReview), HTTP over loopback. This process is the load: one aiohttp session per
agent and per client, on uvloop.

The cluster holds `--namespaces` namespaces with `--workloads` Deployments in all, each with a
headless Service, one ReplicaSet and agents/workloads pods carrying the `traffic-agent`
container (made here directly: there is no controller-manager, scheduler or kubelet, so the
pods stay Pending, which the manager does not mind). Developers are service accounts of one
namespace, allowed by deploy/user-role.yaml's roles bound to their group.

Phases, each timed and with the CPU of every process read from /proc:
  setup      the objects, the manager, one prepare per workload (its entry is written)
  arrive     agents then clients arrive (POST /v1/agents, /v1/clients), open their watch
             (GET .../intercepts?watch=1, first line read), and start heartbeating
  steady     nothing but heartbeats: the manager's cores, and the cost of one heartbeat
  quiet      heartbeats paused (shorter than a TTL): housekeeping and idle watches alone
  prepare    PrepareIntercept on already-configured workloads, `--rate` per second
  create     CreateIntercept at `--rate` per second (open loop); each agent of the workload
             reviews it ACTIVE when its watch shows it WAITING, as the agent does; timed from
             the call to the line naming it on every agent's watch of that workload
  held       the intercepts held, nothing changing: the background the next phases are
             measured against (clients' heartbeats now re-authorize their intercepts)
  flip       `--flips` re-reviews in 6 bursts (`--flip-rate` per second) between 1-s gaps: the
             agent whose review won reviews again with a new message, a change whose handler
             makes no API call, so beyond a heartbeat's cost its CPU is the watch fan-out (the
             CPU of each burst beyond the mean rate of the gaps around it)
  churn      clients arriving and leaving: changes that no watcher's snapshot shows
  remove     the intercepts removed: timed to their disappearance from the agents' watches
Per-change CPU is the phase's manager CPU beyond its background (steady, held, or the gaps
around the flip bursts), divided by the changes, and by the watches held for "per watch". The
churn row is the plainest view of the fan-out: no watch's line changes, so whatever a change
costs there beyond its request is waking watches for nothing. `--manager-src DIR` runs the
manager from another `src` tree (e.g. one with the older manager) for before/after figures.

Every loop is bounded in count and time; waits are on events with timeouts. The machine may be
shared: before each measured phase the run waits (at most 10 s) for a second in which other
processes use under 0.1 cores, and the table shows what they used during each phase.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import os
import random
import resource
import signal
import socket
import ssl
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import uvloop
import yaml

from tpcontrol.localcluster import LocalControlPlane
from tpcontrol.names import AGENT_AUDIENCE, AGENT_CONTAINER, MANAGER_NAMESPACE
from tpproxy.agent import HEARTBEAT as AGENT_HEARTBEAT

Json = dict[str, Any]
ROOT = Path(__file__).resolve().parent.parent
USER_ROLE = ROOT / "deploy" / "user-role.yaml"
DEVS = "bench-devs"
DEV_GROUP = f"system:serviceaccounts:{DEVS}"
CLIENT_HEARTBEAT = 5.0  # tpcontrol.client.intercept.HEARTBEAT (not imported: the CLI's whole tree)
APP: Json = {
    "name": "app",
    "image": "bench/app:0",
    "ports": [{"name": "http", "containerPort": 8080}],
}
AGENT: Json = {"name": AGENT_CONTAINER, "image": "bench/agent:0"}
CALL = aiohttp.ClientTimeout(total=30, connect=10)
FOREVER = aiohttp.ClientTimeout(total=None, connect=10, sock_read=None)
FLIPPED = "re-applied"  # the message of an agent's later reviews of an ACTIVE intercept
DELIVERY_TIMEOUT = 15.0  # a change not seen on a watch by then counts as lost
CLK_TCK = os.sysconf("SC_CLK_TCK")


class Seen(msgspec.Struct, rename="camel"):
    """What the load needs of a watch line's intercept (the rest of it is skipped unread)."""

    id: str
    disposition: str
    message: str = ""
    mechanism_desc: str = ""  # the bench's agents put their pod's name here


SEEN = msgspec.json.Decoder(list[Seen])


def pct(values: list[float], p: float) -> float:
    """Nearest-rank percentile (NaN for no values)."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


# -- CPU from /proc ---------------------------------------------------------------------------


def _proc_cpu(pid: int) -> float:
    """CPU seconds of a process, all threads: scheduler nanoseconds (schedstat), else ticks."""
    try:
        total = 0
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/schedstat", encoding="ascii") as f:
                total += int(f.read().split()[0])
        return total / 1e9
    except (OSError, ValueError):
        pass
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime, stime (all threads)


def _children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat", encoding="ascii") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        found.append(int(entry))
            except (OSError, IndexError, ValueError):
                continue
    return found


def _busy() -> float:
    with open("/proc/stat", encoding="ascii") as f:
        ticks = [int(v) for v in f.readline().split()[1:]]
    return (sum(ticks[:8]) - ticks[3] - ticks[4]) / CLK_TCK  # all but idle and iowait


def _rss_mib(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return math.nan


@dataclass
class Sample:
    wall: float
    manager: float
    load: float
    plane: float
    busy: float
    counters: dict[str, float]


@dataclass
class Phase:
    name: str
    seconds: float
    manager: float  # CPU seconds
    load: float
    plane: float
    foreign: float  # CPU of processes that are not this benchmark's (another engineer's)
    counts: dict[str, float]

    def cores(self, cpu: float) -> float:
        return cpu / self.seconds if self.seconds else math.nan


# -- the cluster's objects, through the API server's REST API ----------------------------------


class Kube:
    """Plain REST calls as the cluster admin, a bounded number at once."""

    def __init__(self, plane: LocalControlPlane, at_once: int = 24) -> None:
        self.url = plane.url
        self.ssl = ssl.create_default_context(cafile=str(plane.ca_file))
        self.headers = {"authorization": f"Bearer {plane.tokens['admin']}"}
        self.limit = asyncio.Semaphore(at_once)
        self.http = aiohttp.ClientSession(timeout=CALL, headers=self.headers)

    async def post(self, path: str, body: Json, exists_ok: bool = True) -> Json:
        async with self.limit, self.http.post(self.url + path, json=body, ssl=self.ssl) as r:
            answer: Json = await r.json()
            if r.status in (200, 201, 202) or (exists_ok and r.status == 409):
                return answer
            raise RuntimeError(f"POST {path}: {r.status} {answer.get('message', answer)}")

    async def token(self, namespace: str, account: str, spec: Json) -> str:
        answer = await self.post(
            f"/api/v1/namespaces/{namespace}/serviceaccounts/{account}/token",
            {"spec": {"expirationSeconds": 3600, **spec}},
            exists_ok=False,
        )
        return str(answer["status"]["token"])


@dataclass
class Workload:
    namespace: str
    name: str
    pods: list[str] = field(default_factory=list)
    agent_tokens: list[str] = field(default_factory=list)
    prepared: Json = field(default_factory=dict)


def _group() -> list[Json]:
    return [{"kind": "Group", "name": DEV_GROUP, "apiGroup": "rbac.authorization.k8s.io"}]


def prepare_body(namespace: str, workload: str) -> dict[str, str]:
    """A PrepareIntercept request for the workload's `http` port."""
    return {"workload": workload, "namespace": namespace, "port": "http", "mechanism": "http"}


async def make_cluster(kube: Kube, args: argparse.Namespace) -> tuple[list[Workload], list[str]]:
    """Namespaces, RBAC, workloads with their pods, and every token: (workloads, dev tokens)."""
    namespaces = [f"bench-{i}" for i in range(args.namespaces)]
    for ns in [MANAGER_NAMESPACE, DEVS, *namespaces]:
        await kube.post("/api/v1/namespaces", {"metadata": {"name": ns}})
    rbac = "/apis/rbac.authorization.k8s.io/v1"
    for doc in yaml.safe_load_all(USER_ROLE.read_text()):
        if doc and doc["kind"] == "ClusterRole":
            await kube.post(f"{rbac}/clusterroles", doc)
        elif doc and doc["kind"] == "Role":
            await kube.post(f"{rbac}/namespaces/{MANAGER_NAMESPACE}/roles", doc)
    binding = {"metadata": {"name": "bench-clients"}, "subjects": _group(),
               "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                           "name": "traffic-manager-clients"}}  # fmt: skip
    await kube.post(f"{rbac}/namespaces/{MANAGER_NAMESPACE}/rolebindings", binding)
    setup = []
    for ns in namespaces:
        interceptors = {"metadata": {"name": "bench-interceptors"}, "subjects": _group(),
                        "roleRef": {"apiGroup": "rbac.authorization.k8s.io",
                                    "kind": "ClusterRole", "name": "traffic-interceptor"}}  # fmt: skip
        setup.append(kube.post(f"{rbac}/namespaces/{ns}/rolebindings", interceptors))
        setup.append(kube.post(f"/api/v1/namespaces/{ns}/serviceaccounts",
                               {"metadata": {"name": "agent"}}))  # fmt: skip
    await asyncio.gather(*setup)

    workloads = [
        Workload(namespaces[i % len(namespaces)], f"app-{i}") for i in range(args.workloads)
    ]
    replicas = [args.agents // args.workloads + (i < args.agents % args.workloads)
                for i in range(args.workloads)]  # fmt: skip
    await asyncio.gather(*(_workload(kube, w, n) for w, n in zip(workloads, replicas, strict=True)))

    devs = [f"dev-{k}" for k in range(args.clients)]
    await asyncio.gather(*(
        kube.post(f"/api/v1/namespaces/{DEVS}/serviceaccounts", {"metadata": {"name": d}})
        for d in devs
    ))  # fmt: skip
    tokens = await asyncio.gather(*(kube.token(DEVS, d, {}) for d in devs))
    return workloads, list(tokens)


async def _workload(kube: Kube, w: Workload, replicas: int) -> None:
    """A Deployment, its headless Service, a ReplicaSet it owns and pods the ReplicaSet owns,
    with the agent container as the webhook would have injected it; one bound token per pod."""
    ns, name = w.namespace, w.name
    labels = {"app": name}
    template = {"metadata": {"labels": labels}, "spec": {"containers": [APP]}}
    deployment = await kube.post(f"/apis/apps/v1/namespaces/{ns}/deployments", {
        "metadata": {"name": name, "labels": labels},
        "spec": {"replicas": replicas, "selector": {"matchLabels": labels}, "template": template},
    }, exists_ok=False)  # fmt: skip
    await kube.post(f"/api/v1/namespaces/{ns}/services", {
        "metadata": {"name": name},
        "spec": {"clusterIP": "None", "selector": labels,
                 "ports": [{"name": "http", "port": 80, "targetPort": "http"}]},
    }, exists_ok=False)  # fmt: skip

    def owner(obj: Json, kind: str) -> list[Json]:
        meta = obj["metadata"]
        return [{"apiVersion": "apps/v1" if kind != "Pod" else "v1", "kind": kind,
                 "name": meta["name"], "uid": meta["uid"], "controller": True,
                 "blockOwnerDeletion": True}]  # fmt: skip

    rs_labels = {**labels, "pod-template-hash": "bench"}
    replicaset = await kube.post(f"/apis/apps/v1/namespaces/{ns}/replicasets", {
        "metadata": {"name": f"{name}-bench", "labels": rs_labels,
                     "ownerReferences": owner(deployment, "Deployment")},
        "spec": {"replicas": replicas, "selector": {"matchLabels": rs_labels},
                 "template": {"metadata": {"labels": rs_labels}, "spec": {"containers": [APP]}}},
    }, exists_ok=False)  # fmt: skip

    async def pod(k: int) -> tuple[str, str]:
        made = await kube.post(f"/api/v1/namespaces/{ns}/pods", {
            "metadata": {"name": f"{name}-bench-{k}", "labels": rs_labels,
                         "ownerReferences": owner(replicaset, "ReplicaSet")},
            "spec": {"serviceAccountName": "agent", "automountServiceAccountToken": False,
                     "containers": [APP, AGENT]},
        }, exists_ok=False)  # fmt: skip
        bound = {"kind": "Pod", "apiVersion": "v1", "name": made["metadata"]["name"],
                 "uid": made["metadata"]["uid"]}  # fmt: skip
        token = await kube.token(
            ns, "agent", {"audiences": [AGENT_AUDIENCE], "boundObjectRef": bound}
        )
        return made["metadata"]["name"], token

    for pod_name, token in await asyncio.gather(*(pod(k) for k in range(replicas))):
        w.pods.append(pod_name)
        w.agent_tokens.append(token)


# -- the manager in its own process -----------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@contextlib.asynccontextmanager
async def manager_process(
    plane: LocalControlPlane, log: Path, source: str | None = None
) -> AsyncIterator[tuple[int, str]]:
    """`python -m tpcontrol manager` on a free port: (pid, url), stopped by SIGTERM at the end.
    `source`: a `src` directory to run it from instead (an older tree, to compare)."""
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("TPCONTROL_")}
    if source:
        env["PYTHONPATH"] = source
    with log.open("wb") as errors:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "tpcontrol", "manager", "--listen", f"127.0.0.1:{port}",
            "--kubeconfig", str(plane.kubeconfig), "--tunnel-port", "0", "--login-port", "-1",
            "--agent-image", "bench/agent:0", "--auth-mode", "enforcing",
            stdout=asyncio.subprocess.PIPE, stderr=errors, env=env,
        )  # fmt: skip
    try:
        assert proc.stdout is not None
        async with asyncio.timeout(60):
            line = await proc.stdout.readline()
        if b"listening on" not in line:
            raise RuntimeError(f"the manager did not start: {line!r}; see {log}")
        yield proc.pid, f"http://127.0.0.1:{port}"
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            try:
                async with asyncio.timeout(15):
                    await proc.wait()
            except TimeoutError:
                proc.kill()
                await proc.wait()


# -- the load ---------------------------------------------------------------------------------


@dataclass
class Tracker:
    """What the watches showed, by intercept id."""

    expected: dict[str, int] = field(default_factory=dict)  # agents that must show it
    created: dict[str, float] = field(default_factory=dict)  # perf_counter at the create call
    delivered: dict[str, list[float]] = field(default_factory=dict)  # seconds, per agent
    shown: dict[str, asyncio.Event] = field(default_factory=dict)  # on all of its agents
    active: dict[str, float] = field(default_factory=dict)  # create -> ACTIVE on the client's
    active_seen: dict[str, asyncio.Event] = field(default_factory=dict)
    reviewer: dict[str, str] = field(default_factory=dict)  # the pod whose review won
    flip_message: dict[str, str] = field(default_factory=dict)  # of its latest re-review
    flipping: dict[str, float] = field(default_factory=dict)  # perf_counter at the re-review
    flipped: list[float] = field(default_factory=list)  # re-review -> the client's line
    flipped_seen: dict[str, asyncio.Event] = field(default_factory=dict)
    removing: dict[str, float] = field(default_factory=dict)
    gone: dict[str, list[float]] = field(default_factory=dict)
    gone_all: dict[str, asyncio.Event] = field(default_factory=dict)


class Load:
    """Every participant's sessions, and the counters the phases read."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.stopping = asyncio.Event()
        self.paused = False
        self.tracker = Tracker()
        self.counters: dict[str, float] = dict.fromkeys(
            ("heartbeats", "watch_bytes", "watch_lines", "reviews", "errors"), 0
        )
        self.heartbeat_latency: list[float] = []
        self.tasks: set[asyncio.Task[None]] = set()
        self.errors: list[str] = []

    def spawn(self, coro: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def error(self, what: str) -> None:
        self.counters["errors"] += 1
        if len(self.errors) < 20:
            self.errors.append(what)


class Party:
    """One agent (a pod) or one client (a developer): its own HTTP session, as in real life."""

    def __init__(self, load: Load, token: str, info: Json, workload: Workload | None) -> None:
        self.load = load
        self.info = info
        self.workload = workload
        self.http = aiohttp.ClientSession(
            timeout=CALL, headers={"authorization": f"Bearer {token}"}
        )
        self.sid = ""
        self.ids: set[str] = set()
        self.reviewed: set[str] = set()

    @property
    def is_agent(self) -> bool:
        return self.workload is not None

    async def call(self, method: str, path: str, body: Json | None = None) -> tuple[int, Any]:
        async with self.http.request(method, self.load.url + path, json=body) as r:
            raw = await r.read()
            return r.status, msgspec.json.decode(raw) if raw else None

    async def arrive(self, heartbeat_phase: float) -> None:
        """Arrive, open the watch (its first line read) and start heartbeating."""
        status, answer = await self.call(
            "POST", "/v1/agents" if self.is_agent else "/v1/clients", self.info
        )
        if status != 201:
            raise RuntimeError(f"arrival refused: {status} {answer}")
        self.sid = answer["sessionId"]
        if self.is_agent:
            status, _ = await self.call("GET", "/v1/info")
            assert status == 200
        opened = asyncio.Event()
        self.load.spawn(self._watch(opened))
        async with asyncio.timeout(30):
            await opened.wait()
        self.load.spawn(self._heartbeats(heartbeat_phase))

    async def _watch(self, opened: asyncio.Event) -> None:
        url = f"{self.load.url}/v1/sessions/{self.sid}/intercepts?watch=1"
        try:
            async with self.http.get(url, timeout=FOREVER) as stream:
                if stream.status != 200:
                    self.load.error(f"watch refused: {stream.status}")
                    return
                while True:
                    line = await stream.content.readuntil(b"\n", max_size=1 << 24)
                    if not line:
                        break
                    self.load.counters["watch_bytes"] += len(line)
                    self.load.counters["watch_lines"] += 1
                    self._line(SEEN.decode(line))
                    opened.set()
        except (aiohttp.ClientError, OSError) as exc:
            if not self.load.stopping.is_set():
                self.load.error(f"watch of {self.sid}: {exc!r}")
        if not self.load.stopping.is_set():
            self.load.error(f"a watch ended: {self.sid}")

    def _line(self, items: list[Seen]) -> None:
        now = time.perf_counter()
        t = self.load.tracker
        ids = {i.id for i in items}
        for item in items:
            started = t.created.get(item.id)
            if started is None:
                continue
            if self.is_agent:
                if item.id not in self.ids:
                    seen = t.delivered.setdefault(item.id, [])
                    seen.append(now - started)
                    if len(seen) == t.expected[item.id]:
                        t.shown[item.id].set()
                if item.disposition == "WAITING" and item.id not in self.reviewed:
                    self.reviewed.add(item.id)  # the agent reviews what waits for it, once
                    self.load.spawn(self._review(item.id))
            elif item.disposition == "ACTIVE" and item.id not in t.active:
                t.active[item.id] = now - started
                t.reviewer[item.id] = item.mechanism_desc
                t.active_seen[item.id].set()
            elif (
                item.message == t.flip_message.get(item.id) and not t.flipped_seen[item.id].is_set()
            ):
                t.flipped.append(now - t.flipping[item.id])
                t.flipped_seen[item.id].set()
        for gone in self.ids - ids:
            removing = t.removing.get(gone)
            if removing is not None and self.is_agent:
                left = t.gone.setdefault(gone, [])
                left.append(now - removing)
                if len(left) == t.expected[gone]:
                    t.gone_all[gone].set()
        self.ids = ids

    async def _review(self, intercept_id: str, message: str = "") -> None:
        body = {"disposition": "ACTIVE", "message": message, "mechanismDesc": self.info["podName"]}
        try:
            status, answer = await self.call(
                "POST", f"/v1/sessions/{self.sid}/reviews/{intercept_id}", body
            )
            self.load.counters["reviews"] += 1
            if status != 204:
                self.load.error(f"review: {status} {answer}")
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            self.load.error(f"review: {exc!r}")

    async def _heartbeats(self, phase: float) -> None:
        """`POST .../remain` every HEARTBEAT seconds on a fixed schedule (no catching up)."""
        every = AGENT_HEARTBEAT if self.is_agent else CLIENT_HEARTBEAT
        loop = asyncio.get_running_loop()
        due = loop.time() + phase * every
        while not self.load.stopping.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(0.0, due - loop.time())):
                    await self.load.stopping.wait()
            due += every
            if self.load.stopping.is_set() or self.load.paused:
                continue
            started = time.perf_counter()
            try:
                status, _ = await self.call("POST", f"/v1/sessions/{self.sid}/remain")
            except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                self.load.error(f"heartbeat: {exc!r}")
                continue
            if status != 204:
                self.load.error(f"heartbeat: {status}")
            self.load.counters["heartbeats"] += 1
            self.load.heartbeat_latency.append(time.perf_counter() - started)

    async def close(self) -> None:
        await self.http.close()


async def bounded(
    items: list[Any], work: Callable[[Any], Awaitable[Any]], at_once: int
) -> list[Any]:
    limit = asyncio.Semaphore(at_once)

    async def one(item: Any) -> Any:
        async with limit:
            return await work(item)

    return list(await asyncio.gather(*(one(i) for i in items)))


async def paced(
    count: int, rate: float, work: Callable[[int], Awaitable[None]], within: float
) -> None:
    """Start work(i) at i/rate seconds (open loop: a slow answer delays nothing else)."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    tasks = []
    for i in range(count):
        await asyncio.sleep(max(0.0, start + i / rate - loop.time()))  # pacing, not waiting
        tasks.append(asyncio.ensure_future(work(i)))
    async with asyncio.timeout(within):
        await asyncio.gather(*tasks)


class LoopLag:
    """How late this process's event loop wakes up: the load's own share of any latency."""

    def __init__(self) -> None:
        self.samples: list[float] = []
        self.task: asyncio.Task[None] | None = None

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            before = loop.time()
            await asyncio.sleep(0.02)
            self.samples.append(loop.time() - before - 0.02)


# -- the run ----------------------------------------------------------------------------------


class Meter:
    def __init__(self, manager_pid: int, load: Load) -> None:
        self.manager_pid = manager_pid
        self.load = load
        self.phases: list[Phase] = []
        self.extra: dict[str, float] = {}
        self.plane_pids = [p for p in _children(os.getpid()) if p != manager_pid]
        self.plane_names = [Path(f"/proc/{p}/comm").read_text().strip() for p in self.plane_pids]

    def sample(self) -> Sample:
        own = resource.getrusage(resource.RUSAGE_SELF)
        return Sample(
            time.perf_counter(),
            _proc_cpu(self.manager_pid),
            own.ru_utime + own.ru_stime,
            sum(_proc_cpu(p) for p in self.plane_pids),
            _busy(),
            dict(self.load.counters),
        )

    def foreign(self, a: Sample, b: Sample) -> float:
        """CPU seconds between two samples of processes that are not this benchmark's."""
        ours = (b.manager - a.manager) + (b.load - a.load) + (b.plane - a.plane)
        return max(0.0, b.busy - a.busy - ours)

    async def quiet_machine(self, within: float = 10.0, below: float = 0.1) -> None:
        """Wait (at most `within` s) for a second in which other processes used less than
        `below` cores: the machine is shared, and what they use is not the manager's."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        while True:
            before = self.sample()
            await asyncio.sleep(1.0)  # a one-second CPU sample, bounded by the deadline
            others = self.foreign(before, self.sample())
            if others < below:
                return
            if loop.time() >= deadline:
                print(
                    f"  (others still use {others:.2f} cores after {within:.0f} s: measuring anyway)"
                )
                return

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        before = self.sample()
        yield
        after = self.sample()
        phase = Phase(
            name,
            after.wall - before.wall,
            after.manager - before.manager,
            after.load - before.load,
            after.plane - before.plane,
            self.foreign(before, after),
            {k: after.counters[k] - before.counters.get(k, 0) for k in after.counters},
        )
        self.phases.append(phase)
        print(f"  {name:8s} {phase.seconds:6.1f} s   manager {phase.cores(phase.manager):.2f} cores"
              f"   load {phase.cores(phase.load):.2f}   api server+etcd {phase.cores(phase.plane):.2f}"
              f"   others {phase.cores(phase.foreign):.2f}", flush=True)  # fmt: skip

    def get(self, name: str) -> Phase:
        return next(p for p in self.phases if p.name == name)


async def run(plane: LocalControlPlane, args: argparse.Namespace) -> int:
    started = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="manager-scale-"))
    kube = Kube(plane)
    try:
        workloads, dev_tokens = await make_cluster(kube, args)
    finally:
        await kube.http.close()
    print(f"cluster: {args.namespaces} namespaces, {len(workloads)} workloads, {args.agents} pods, "
          f"{args.clients} developers ({time.perf_counter() - started:.0f} s)", flush=True)  # fmt: skip
    async with manager_process(plane, work / "manager.log", args.manager_src) as (pid, url):
        load = Load(url)
        meter = Meter(pid, load)
        print(f"manager pid {pid}; control plane: {', '.join(meter.plane_names)}", flush=True)
        lag = LoopLag()
        lag_task = asyncio.ensure_future(lag.run())
        profiler: list[asyncio.subprocess.Process] = []
        parties: list[Party] = []
        try:
            code = await _phases(
                args, load, meter, lag, workloads, dev_tokens, parties, pid, profiler.append
            )
        finally:
            load.stopping.set()
            for task in list(load.tasks):
                task.cancel()
            await asyncio.gather(*load.tasks, return_exceptions=True)
            await asyncio.gather(*(p.close() for p in parties), return_exceptions=True)
            lag_task.cancel()
            for spy in profiler:  # py-spy writes its profile on SIGINT
                if spy.returncode is None:
                    spy.send_signal(signal.SIGINT)
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(30):
                            await spy.wait()
    print(f"manager log: {work / 'manager.log'}; whole run {time.perf_counter() - started:.0f} s")
    return code


async def _phases(
    args: argparse.Namespace,
    load: Load,
    meter: Meter,
    lag: LoopLag,
    workloads: list[Workload],
    dev_tokens: list[str],
    parties: list[Party],
    pid: int,
    on_profiler: Callable[[asyncio.subprocess.Process], None],
) -> int:
    rng = random.Random(15)
    devs = [Party(load, t, {"name": f"dev-{k}@laptop", "version": "0.1.0"}, None)
            for k, t in enumerate(dev_tokens)]  # fmt: skip
    parties.extend(devs)

    with meter.phase("setup"):

        async def prepare(i: int) -> None:
            w = workloads[i]
            body = prepare_body(w.namespace, w.name)
            status, answer = await devs[i % len(devs)].call("POST", "/v1/prepare", body)
            if status != 200:
                raise RuntimeError(f"prepare {w.namespace}/{w.name}: {status} {answer}")
            w.prepared = answer

        await bounded(list(range(len(workloads))), prepare, 8)
        await _settle(pid, within=30)

    agents = [
        Party(
            load,
            token,
            {
                "name": w.name,
                "namespace": w.namespace,
                "podName": pod,
                "podIp": "",
                "version": "0.1.0",
                "mechanisms": ["tcp", "http"],
                "environment": {"GREETING": "hi"},
            },
            w,
        )
        for w in workloads
        for pod, token in zip(w.pods, w.agent_tokens, strict=True)
    ]
    parties.extend(agents)
    with meter.phase("arrive"):
        await bounded(agents, lambda a: a.arrive(rng.random()), 32)
        await bounded(devs, lambda d: d.arrive(rng.random()), 32)
    watchers = len(agents) + len(devs)
    print(f"  {len(agents)} agents and {len(devs)} clients hold a watch each; manager RSS "
          f"{_rss_mib(pid):.0f} MiB", flush=True)  # fmt: skip

    # One whole heartbeat round first, so that the steady phase sees every session's rate.
    await asyncio.sleep(max(AGENT_HEARTBEAT, CLIENT_HEARTBEAT))
    if args.profile:
        on_profiler(await asyncio.create_subprocess_exec(
            str(Path(sys.executable).parent / "py-spy"), "record", "--pid", str(pid),
            "--rate", "200", "--format", "raw", "--output", args.profile, "--nonblocking",
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
        ))  # fmt: skip
    await meter.quiet_machine()
    lag.samples.clear()
    with meter.phase("steady"):
        await asyncio.sleep(args.steady)
    steady_lag = list(lag.samples)
    load.paused = True
    with meter.phase("quiet"):
        await asyncio.sleep(args.quiet)
    load.paused = False

    count = args.intercepts
    targets = [workloads[i % len(workloads)] for i in range(count)]
    owners = [devs[i % len(devs)] for i in range(count)]
    prepare_latency: list[float] = []

    await meter.quiet_machine()
    with meter.phase("prepare"):

        async def prepare_one(i: int) -> None:
            w = targets[i]
            body = prepare_body(w.namespace, w.name)
            begun = time.perf_counter()
            status, answer = await owners[i].call("POST", "/v1/prepare", body)
            prepare_latency.append(time.perf_counter() - begun)
            if status != 200 or answer["entryChanged"]:
                load.error(f"prepare {w.name}: {status} {answer}")

        await paced(count, args.rate, prepare_one, within=count / args.rate + 60)

    t = load.tracker
    create_latency: list[float] = []
    await meter.quiet_machine()
    lag.samples.clear()
    with meter.phase("create"):

        async def create_one(i: int) -> None:
            w, owner = targets[i], owners[i]
            p = w.prepared
            iid = f"{owner.sid}:bench-{i}"
            t.expected[iid] = len(w.pods)
            t.shown[iid], t.active_seen[iid] = asyncio.Event(), asyncio.Event()
            body = {"name": f"bench-{i}", "workload": w.name, "namespace": w.namespace,
                    "mechanism": "http", "serviceName": p["serviceName"],
                    "servicePortIdentifier": "http", "containerPort": p["containerPort"],
                    "agentPort": p["agentPort"], "targetPort": 9000 + i % 1000,
                    "headers": [{"name": "x-dev", "value": f"dev-{i % len(devs)}-{i}"}]}  # fmt: skip
            t.created[iid] = begun = time.perf_counter()
            status, answer = await owner.call("POST", f"/v1/sessions/{owner.sid}/intercepts", body)
            create_latency.append(time.perf_counter() - begun)
            if status != 201:
                load.error(f"create: {status} {answer}")
                return
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(DELIVERY_TIMEOUT):
                    await t.shown[iid].wait()
                    await t.active_seen[iid].wait()

        await paced(count, args.rate, create_one, within=count / args.rate + DELIVERY_TIMEOUT + 30)
    create_lag = list(lag.samples)

    await meter.quiet_machine()
    with meter.phase("held"):  # the intercepts held, nothing changing: the background now
        await asyncio.sleep(args.steady)

    by_pod = {a.info["podName"]: a for a in agents}
    flips = [iid for iid in t.created if iid in t.reviewer and t.reviewer[iid] in by_pod]
    cycles = 6
    per_burst = min(args.flips // cycles, len(flips))
    with meter.phase("flip"):

        async def flip_one(i: int) -> None:
            iid = flips[i % len(flips)]
            if i >= len(flips):  # the same intercept's previous re-review first (a round ago)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(DELIVERY_TIMEOUT):
                        await t.flipped_seen[iid].wait()
            t.flip_message[iid] = f"{FLIPPED} {i}"
            t.flipped_seen[iid] = asyncio.Event()
            t.flipping[iid] = time.perf_counter()
            await by_pod[t.reviewer[iid]]._review(iid, t.flip_message[iid])
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(DELIVERY_TIMEOUT):
                    await t.flipped_seen[iid].wait()

        # Bursts of re-reviews between one-second gaps without any: the manager's CPU in a burst
        # beyond the mean rate of the gaps on either side is the changes' own, however the
        # background drifts (agents' TokenReviews, cached 30 s, come in waves after arrival).
        gaps: list[float] = []
        bursts: list[tuple[float, float]] = []  # (manager CPU seconds, seconds)
        mark = meter.sample()
        for c in range(cycles + 1):
            await asyncio.sleep(1.0)  # a gap: the background only
            gap_end = meter.sample()
            gaps.append((gap_end.manager - mark.manager) / (gap_end.wall - mark.wall))
            if c == cycles or not per_burst:
                break

            def one(j: int, c: int = c) -> Awaitable[None]:
                return flip_one(c * per_burst + j)

            await paced(per_burst, args.flip_rate, one, within=per_burst / args.flip_rate + 30)
            mark = meter.sample()
            bursts.append((mark.manager - gap_end.manager, mark.wall - gap_end.wall))
        above = sum(
            cpu - (gaps[k] + gaps[k + 1]) / 2 * secs for k, (cpu, secs) in enumerate(bursts)
        )
        meter.extra["flip_above"] = max(0.0, above)
        meter.extra["flips"] = per_burst * len(bursts)

    churn = args.churn
    await meter.quiet_machine()
    with meter.phase("churn"):

        async def come_and_go(i: int) -> None:
            dev = devs[i % len(devs)]
            status, answer = await dev.call(
                "POST", "/v1/clients", {"name": f"churn-{i}", "version": "0"}
            )
            if status != 201:
                load.error(f"churn arrival: {status} {answer}")
                return
            status, _ = await dev.call("DELETE", f"/v1/sessions/{answer['sessionId']}")
            if status != 204:
                load.error(f"churn departure: {status}")

        await paced(churn, args.rate, come_and_go, within=churn / args.rate + 60)

    await meter.quiet_machine()
    with meter.phase("remove"):
        ids = [iid for iid in t.created if iid in t.shown]

        async def remove_one(i: int) -> None:
            iid = ids[i]
            owner = owners[int(iid.rsplit("-", 1)[1])]
            t.gone_all[iid] = asyncio.Event()
            t.removing[iid] = time.perf_counter()
            status, _ = await owner.call(
                "DELETE", f"/v1/sessions/{owner.sid}/intercepts/{iid.split(':', 1)[1]}"
            )
            if status != 204:
                load.error(f"remove: {status}")
                return
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(DELIVERY_TIMEOUT):
                    await t.gone_all[iid].wait()

        await paced(
            len(ids), args.rate, remove_one, within=len(ids) / args.rate + DELIVERY_TIMEOUT + 30
        )

    return report(args, meter, load, watchers, prepare_latency, create_latency, steady_lag,
                  create_lag, pid)  # fmt: skip


async def _settle(pid: int, within: float, below: float = 0.15) -> None:
    """Until the manager has used less than `below` cores for a second (its rollouts done)."""
    async with asyncio.timeout(within):
        while True:
            before = _proc_cpu(pid)
            await asyncio.sleep(1.0)  # a one-second CPU sample, bounded by the timeout
            if _proc_cpu(pid) - before < below:
                return


def report(
    args: argparse.Namespace,
    meter: Meter,
    load: Load,
    watchers: int,
    prepare_latency: list[float],
    create_latency: list[float],
    steady_lag: list[float],
    create_lag: list[float],
    pid: int,
) -> int:
    t = load.tracker
    steady, quiet, held = meter.get("steady"), meter.get("quiet"), meter.get("held")
    # Manager cores while nothing changes: heartbeats, housekeeping, and with intercepts held
    # each client heartbeat's re-authorization of them (SubjectAccessReviews, cached 10 s).
    idle = {"steady": steady.cores(steady.manager), "held": held.cores(held.manager)}
    idle["between"] = (idle["steady"] + idle["held"]) / 2  # intercepts growing or shrinking
    background = {"create": "between", "flip": "gaps", "churn": "held", "remove": "between"}

    def above(name: str) -> float:
        """The phase's manager CPU seconds beyond what the same phase costs with no changes."""
        if name == "flip":
            return meter.extra.get("flip_above", 0.0)  # against the gaps around each burst
        phase = meter.get(name)
        return max(0.0, phase.manager - idle[background[name]] * phase.seconds)

    first = [min(v) for v in t.delivered.values() if v]
    every = [max(v) for k, v in t.delivered.items() if len(v) == t.expected[k]]
    lost = len(t.created) - len(every)
    active = list(t.active.values())
    flipped = t.flipped
    gone = [max(v) for k, v in t.gone.items() if len(v) == t.expected[k]]
    heartbeat_us = (
        (steady.manager - quiet.manager / quiet.seconds * steady.seconds)
        / max(1, steady.counts["heartbeats"])
        * 1e6
    )
    n = len(t.created)
    # Changes of the state per phase: create = the intercept + the review that made it ACTIVE.
    flips = int(meter.extra.get("flips", 0))
    changes = {"create": 2 * n, "flip": flips, "churn": 2 * args.churn, "remove": n}
    per_change = {k: above(k) / max(1, c) * 1e6 for k, c in changes.items()}
    per_bytes = {k: meter.get(k).counts["watch_bytes"] / max(1, c) for k, c in changes.items()}
    # A re-review is a request like a heartbeat (the same authentication, TokenReview renewals
    # included) plus one change: what it costs beyond a heartbeat is the change and its fan-out.
    fan_out = max(0.0, per_change["flip"] - heartbeat_us)
    shown_to = [t.expected[k] + 1 for k in t.flipping]  # its workload's agents and its client
    affected = statistics.mean(shown_to) if shown_to else math.nan
    what = {
        "create": "CreateIntercept + the agent's review (2 SubjectAccessReviews, 1 ConfigMap read)",
        "flip": "an agent re-reviews an ACTIVE intercept (no API call): the fan-out probe",
        "churn": "a client arrives and leaves (a SubjectAccessReview); no watch shows it",
        "remove": "RemoveIntercept",
    }

    def ms(values: list[float], p: float) -> str:
        return f"{pct(values, p) * 1e3:.1f}"

    def line(label: str, values: list[float]) -> None:
        print(f"{label}: p50 {ms(values, 50)} ms, p99 {ms(values, 99)} ms, "
              f"max {ms(values, 100)} ms ({len(values)})")  # fmt: skip

    print()
    line("create -> the line naming it on every agent of the workload", every)
    print(f"  ({lost} of {n} not on every agent within {DELIVERY_TIMEOUT:.0f} s)")
    line("create -> the line naming it on the first agent", first)
    line("create -> ACTIVE on the client's watch (an agent reviewed it)", active)
    line("CreateIntercept answered", create_latency)
    line("PrepareIntercept (configured workload) answered", prepare_latency)
    line("re-review -> the line on the client's watch", flipped)
    line("remove -> gone from every agent's watch", gone)
    line(f"heartbeats ({steady.counts['heartbeats'] / steady.seconds:.0f}/s) answered",
         load.heartbeat_latency)  # fmt: skip
    print(f"manager CPU per heartbeat {heartbeat_us:.0f} us; housekeeping and idle watches "
          f"(heartbeats paused) {quiet.cores(quiet.manager) * 1e3:.1f} ms CPU per second; "
          f"{idle['held']:.2f} cores with the intercepts held")  # fmt: skip
    for k in changes:
        print(f"{k:6s} {changes[k]:4d} changes: {per_change[k]:6.0f} us manager CPU per change "
              f"above the {background[k]} rate = {per_change[k] / watchers:5.2f} us per change per watch; "
              f"{per_bytes[k]:5.0f} watch bytes per change  [{what[k]}]")  # fmt: skip
    print(f"fan-out: a re-review costs {fan_out:.0f} us more than a heartbeat: "
          f"{fan_out / watchers:.2f} us per watch held ({watchers}), "
          f"{fan_out / affected:.0f} us per watch shown the change ({affected:.1f} on average)")  # fmt: skip
    print(f"load generator's loop lag: steady p99 {ms(steady_lag, 99)} ms, create p99 "
          f"{ms(create_lag, 99)} ms (included in every latency above)")  # fmt: skip
    print(f"manager RSS {_rss_mib(pid):.0f} MiB; errors {load.counters['errors']:.0f}")
    for e in load.errors:
        print(f"  error: {e}")

    print()
    print("| agents | clients | manager cores, steady | create->watch p50 / p99 ms "
          "| prepare p50 / p99 ms | fan-out CPU us per change per watch held "
          "| watch bytes per change | heartbeat us CPU |")  # fmt: skip
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    print(f"| {args.agents} | {args.clients} | {steady.cores(steady.manager):.2f} "
          f"| {ms(every, 50)} / {ms(every, 99)} "
          f"| {ms(prepare_latency, 50)} / {ms(prepare_latency, 99)} "
          f"| {fan_out / watchers:.2f} | {per_bytes['flip']:.0f} | {heartbeat_us:.0f} |")  # fmt: skip
    print()
    print(
        "| phase | seconds | manager cores | load cores | api server+etcd cores | others' cores |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    for p in meter.phases:
        noisy = " (noisy)" if p.cores(p.foreign) > 0.1 else ""
        print(f"| {p.name} | {p.seconds:.1f} | {p.cores(p.manager):.2f} | {p.cores(p.load):.2f} "
              f"| {p.cores(p.plane):.2f} | {p.cores(p.foreign):.2f}{noisy} |")  # fmt: skip
    measured = meter.phases[2:]  # every phase after the arrivals
    busiest = max(p.cores(p.manager) for p in measured)
    met = {
        "create->watch p99 < 100 ms": pct(every, 99) < 0.1 and lost == 0,
        "prepare p50 < 50 ms": pct(prepare_latency, 50) < 0.05,
        f"one core (manager at most {busiest:.2f} cores in a measured phase)": busiest < 1.0,
    }
    print()
    for claim, ok in met.items():
        print(f"{'met   ' if ok else 'MISSED'}  {claim}")
    return 0 if all(met.values()) and not load.counters["errors"] else 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--agents", type=int, default=1000)
    parser.add_argument("--clients", type=int, default=200)
    parser.add_argument("--intercepts", type=int, default=200)
    parser.add_argument("--workloads", type=int, default=250)
    parser.add_argument("--namespaces", type=int, default=10)
    parser.add_argument(
        "--rate", type=float, default=10.0, help="prepares, creates, re-reviews, removes per second"
    )
    parser.add_argument("--churn", type=int, default=100, help="clients that arrive and leave")
    parser.add_argument("--flips", type=int, default=600, help="re-reviews in the burst")
    parser.add_argument("--flip-rate", type=float, default=200.0, help="re-reviews per second")
    parser.add_argument("--steady", type=float, default=10.0, help="seconds of heartbeats only")
    parser.add_argument("--quiet", type=float, default=4.0, help="seconds without heartbeats")
    parser.add_argument("--profile", help="py-spy raw (collapsed) profile of the manager, to FILE")
    parser.add_argument(
        "--manager-src", help="run the manager from this src directory (before/after comparisons)"
    )
    args = parser.parse_args()
    if not 0 < args.workloads <= args.agents or args.clients < 1 or args.quiet >= 10:
        parser.error("need 0 < workloads <= agents, clients >= 1, and quiet < 10 s (the agent TTL)")
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # ~2 sockets per session, both ends
    with LocalControlPlane(controller_manager=False) as plane:
        code = uvloop.run(run(plane, args))
    sys.exit(code)


if __name__ == "__main__":
    main()
