"""The traffic-manager on a real API server: prepare writes the entry, the watcher rolls the
workload out, the webhook injects the agent; uninstall and upgrade go through the same path."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import aiohttp
from aiohttp import web
from kubernetes_asyncio import client as k8s

from tpcontrol.kube.agentconfig import GeneratorSettings
from tpcontrol.kube.configmap import AgentConfigStore
from tpcontrol.localcluster import LocalControlPlane
from tpcontrol.manager.api import Manager, ManagerSettings
from tpcontrol.names import RESTARTED_AT

from .helpers import run
from .k8s_helpers import (
    IMAGE,
    deployment,
    make_namespace,
    running_webhook,
    service,
    unique,
    wait_for_pods,
)
from .test_webhook_k8s import ECHO_CONTAINER, ECHO_PORTS, create, injected

Json = dict[str, Any]


@dataclass
class Rig:
    api: k8s.ApiClient
    ns: str
    manager: Manager
    url: str
    http: aiohttp.ClientSession

    async def post(self, path: str, body: Json) -> tuple[int, Json]:
        async with self.http.post(self.url + path, json=body) as r:
            return r.status, await r.json() if r.content_type == "application/json" else {}

    async def prepare(self, workload: str, **extra: str) -> tuple[int, Json]:
        return await self.post("/v1/prepare", {"workload": workload, "namespace": self.ns, **extra})

    async def entries(self) -> dict[str, Any]:
        return dict(await AgentConfigStore(self.api).entries(self.ns))


@asynccontextmanager
async def manager_rig(plane: LocalControlPlane, prefix: str, **settings: Any) -> AsyncIterator[Rig]:
    async with plane.api() as api:
        ns = await make_namespace(api, unique(prefix))
        async with running_webhook(api, ns):
            manager = Manager(
                api, ManagerSettings(generator=GeneratorSettings(agent_image=IMAGE), **settings)
            )
            runner, port = await manager.start()
            try:
                async with aiohttp.ClientSession(headers=admin_headers(plane)) as http:
                    yield Rig(api, ns, manager, f"http://127.0.0.1:{port}", http)
            finally:
                await manager.stop()
                await runner.cleanup()


def admin_headers(plane: LocalControlPlane) -> dict[str, str]:
    """The cluster admin's credential, as `tpcontrol` sends it from a kubeconfig."""
    return {"authorization": f"Bearer {plane.tokens['admin']}"}


def recreate(workload: Json) -> Json:
    """Recreate strategy: with no kubelet, pods never get ready, so a rolling update would wait."""
    workload["spec"]["strategy"] = {"type": "Recreate"}
    return workload


async def settle(rig: Rig) -> None:
    """Make sure the watcher has seen everything written so far: write a marker, wait for it."""
    marker = unique("marker")
    store = AgentConfigStore(rig.api)

    def edit(data: dict[str, str]) -> dict[str, str]:
        return {**data, marker: "manual: true\n"}

    await store.update(rig.ns, edit)
    async with asyncio.timeout(10):
        while marker not in rig.manager.watcher.snapshot.get(rig.ns, {}):
            await asyncio.sleep(0.02)
    await store.delete(rig.ns, marker)


def test_prepare_rolls_out_the_workload_with_the_agent(control_plane: LocalControlPlane) -> None:
    async def scenario() -> None:
        async with manager_rig(control_plane, "prep") as rig:
            echo = recreate(deployment("echo", [ECHO_CONTAINER], replicas=2))
            await create(rig.api, rig.ns, service("echo", ECHO_PORTS), echo)
            before = await wait_for_pods(rig.api, rig.ns, "app=echo", 2)
            assert not any(injected(p) for p in before)

            status, prepared = await rig.prepare("echo", port="http")
            assert status == 200, prepared
            assert prepared["entryChanged"] is True
            assert (prepared["serviceName"], prepared["servicePortName"]) == ("echo", "http")
            assert (prepared["containerName"], prepared["containerPort"]) == ("echo", 8080)
            assert prepared["agentPort"] == 9900
            assert prepared["agentRunning"] is False
            assert "echo" in await rig.entries()

            # The watcher rolled the workload out; the new pods carry the agent, the old are gone.
            pods = await wait_for_pods(
                rig.api, rig.ns, "app=echo", 2, lambda ps: all(injected(p) for p in ps)
            )
            old = {p["metadata"]["name"] for p in before}
            assert not old & {p["metadata"]["name"] for p in pods}
            workload = await k8s.AppsV1Api(rig.api).read_namespaced_deployment("echo", rig.ns)
            assert RESTARTED_AT in workload.spec.template.metadata.annotations
            assert rig.manager.rollouts.done == [("Deployment", "echo", rig.ns)]

            # A second prepare (another port, same entry) changes nothing and rolls nothing.
            status, again = await rig.prepare("echo", port="grpc")
            assert status == 200
            assert again["entryChanged"] is False
            assert again["agentPort"] == 9901
            await settle(rig)
            assert rig.manager.rollouts.done == [("Deployment", "echo", rig.ns)]

            # Uninstall removes the entry; the rollout brings pods back without the agent.
            status, answer = await rig.post(
                "/v1/uninstall", {"namespace": rig.ns, "workload": "echo"}
            )
            assert (status, answer) == (200, {"removed": ["echo"]})
            await wait_for_pods(
                rig.api, rig.ns, "app=echo", 2, lambda ps: not any(injected(p) for p in ps)
            )
            assert "echo" not in await rig.entries()

    run(scenario(), timeout=180)


def test_ambiguous_or_wrong_requests_get_clear_errors_and_write_nothing(
    control_plane: LocalControlPlane,
) -> None:
    async def scenario() -> None:
        async with manager_rig(control_plane, "ambig") as rig:
            echo = recreate(deployment("echo", [ECHO_CONTAINER]))
            await create(rig.api, rig.ns, service("echo", ECHO_PORTS), echo)
            status, error = await rig.prepare("echo")
            assert status == 422
            assert "has multiple interceptable service ports" in error["error"]
            assert "--service=echo --port=http" in error["error"]
            assert "--service=echo --port=grpc" in error["error"]
            status, error = await rig.prepare("echo", port="nope")
            assert status == 422
            assert "has no interceptable port matching port nope" in error["error"]
            status, error = await rig.prepare("ghost", port="http")
            assert status == 422
            assert "'ghost' not found in namespace" in error["error"]
            status, error = await rig.post(
                "/v1/prepare", {"workload": "echo", "namespace": "no-such-ns"}
            )
            assert status == 422
            assert "'no-such-ns'" in error["error"]
            status, error = await rig.post("/v1/prepare", {"workload": "echo"})
            assert status == 400
            assert "missing required field `namespace`" in error["error"]
            status, error = await rig.post("/v1/prepare", {"workload": 3, "namespace": rig.ns})
            assert status == 400
            assert "`$.workload`" in error["error"]
            async with rig.http.post(rig.url + "/v1/prepare", data=b"{oops") as r:
                assert r.status == 400
                assert "not JSON" in (await r.json())["error"]
            assert await rig.entries() == {}  # nothing was written
            await settle(rig)
            assert rig.manager.rollouts.done == []

    run(scenario(), timeout=120)


def test_concurrent_prepares_resolver_once_upgrade_and_restart(
    control_plane: LocalControlPlane,
) -> None:
    async def scenario() -> None:
        calls: list[int] = []

        async def preferred(_request: web.Request) -> web.Response:
            calls.append(1)
            return web.json_response({"image": "registry.example/smart-agent:1.2"})

        resolver = web.Application()
        resolver.router.add_get("/preferred", preferred)
        resolver_runner = web.AppRunner(resolver)
        await resolver_runner.setup()
        await web.TCPSite(resolver_runner, "127.0.0.1", 0).start()
        url = f"http://127.0.0.1:{resolver_runner.addresses[0][1]}/preferred"
        try:
            async with manager_rig(control_plane, "many", image_resolver_url=url) as rig:
                names = [f"svc{i}" for i in range(4)]
                for name in names:
                    await create(
                        rig.api,
                        rig.ns,
                        service(name, ECHO_PORTS[:1]),
                        recreate(deployment(name, [ECHO_CONTAINER])),
                    )
                answers = await asyncio.gather(
                    *(rig.prepare(n, mechanism="http") for n in names for _ in range(2))
                )
                assert all(status == 200 for status, _ in answers), answers
                assert len(calls) == 1  # the resolver is asked once, then cached
                entries = await rig.entries()
                assert sorted(entries) == names  # every concurrent write landed
                assert {e.agent_image for e in entries.values()} == {
                    "registry.example/smart-agent:1.2"
                }

                # The image never comes from a request: upgrading to another is refused.
                status, refused = await rig.post(
                    "/v1/upgrade", {"agentImage": "registry.example/agent:2.0"}
                )
                assert status == 403, refused
                assert "agentImage" in refused["error"], refused
                entries = await rig.entries()
                assert {e.agent_image for e in entries.values()} == {
                    "registry.example/smart-agent:1.2"
                }

                # A restarted manager (its image setting changed) starts from the ConfigMap as
                # it is and rolls nothing out; an upgrade then writes its image into every entry.
                fresh = Manager(
                    rig.api,
                    ManagerSettings(
                        generator=GeneratorSettings(agent_image="registry.example/agent:2.0")
                    ),
                )
                runner, port = await fresh.start()
                try:
                    await settle(Rig(rig.api, rig.ns, fresh, rig.url, rig.http))
                    assert fresh.rollouts.done == []
                    seen = sorted(
                        k for k in fresh.watcher.snapshot[rig.ns] if not k.startswith("marker")
                    )
                    assert seen == names
                    fresh_rig = Rig(rig.api, rig.ns, fresh, f"http://127.0.0.1:{port}", rig.http)
                    status, upgraded = await fresh_rig.post("/v1/upgrade", {})
                    assert status == 200, upgraded
                    assert sorted(
                        u for u in upgraded["updated"] if u.startswith(rig.ns + "/")
                    ) == sorted(f"{rig.ns}/{n}" for n in names)
                    entries = await rig.entries()
                    assert {e.agent_image for e in entries.values()} == {
                        "registry.example/agent:2.0"
                    }
                finally:
                    await fresh.stop()
                    await runner.cleanup()
        finally:
            await resolver_runner.cleanup()

    run(scenario(), timeout=180)


def test_sessions_intercepts_reviews_and_watch_over_http(control_plane: LocalControlPlane) -> None:
    async def scenario() -> None:
        # Permissive: the agent here is this test, with no pod token (test_auth_k8s has those).
        async with manager_rig(control_plane, "sess", auth_mode="permissive") as rig:
            status, client = await rig.post(
                "/v1/clients", {"name": "alice@laptop", "version": "0.1.0"}
            )
            assert status == 201
            alice = client["sessionId"]
            _, other = await rig.post("/v1/clients", {"name": "bob@laptop", "version": "0.1.0"})
            bob = other["sessionId"]
            agent_info = {
                "name": "echo",
                "namespace": rig.ns,
                "podName": "echo-1",
                "podIp": "10.1.0.5",
                "version": "0.1.0",
                "mechanisms": ["tcp", "http"],
            }
            status, agent = await rig.post("/v1/agents", agent_info)
            assert status == 201
            agent_sid = agent["sessionId"]

            spec = {
                "name": "echo-http",
                "workload": "echo",
                "namespace": rig.ns,
                "mechanism": "http",
                "serviceName": "echo",
                "servicePortIdentifier": "http",
                "containerPort": 8080,
                "agentPort": 9900,
                "targetPort": 7000,
                "headers": [{"name": "x-dev", "value": "alice"}],
            }

            # The agent watches its intercepts: one JSON line per change.
            async with rig.http.get(
                f"{rig.url}/v1/sessions/{agent_sid}/intercepts?watch=1"
            ) as stream:
                assert json_line(await stream.content.readline()) == []
                status, created = await rig.post(f"/v1/sessions/{alice}/intercepts", spec)
                assert status == 201, created
                assert created["disposition"] == "WAITING"
                (seen,) = json_line(await stream.content.readline())
                assert seen["id"] == created["id"]
                status, _ = await rig.post(
                    f"/v1/sessions/{agent_sid}/reviews/{created['id']}",
                    {"disposition": "ACTIVE", "message": "serving"},
                )
                assert status == 204
                (active,) = json_line(await stream.content.readline())
                assert active["disposition"] == "ACTIVE"
                assert active["podIp"] == "10.1.0.5"

            # A second client with the same rules on the same port conflicts, naming both.
            status, error = await rig.post(
                f"/v1/sessions/{bob}/intercepts", {**spec, "name": "mine"}
            )
            assert status == 409
            assert created["id"] in error["error"]
            status, ok = await rig.post(
                f"/v1/sessions/{bob}/intercepts",
                {**spec, "name": "mine", "headers": [{"name": "x-dev", "value": "bob"}]},
            )
            assert status == 201  # different rules coexist
            status, error = await rig.post(
                f"/v1/sessions/{bob}/intercepts", {**spec, "containerPort": "x"}
            )
            assert status == 400
            assert "`$.containerPort`" in error["error"]
            # Only the owner removes an intercept: bob naming alice's intercept finds nothing of his.
            async with rig.http.delete(f"{rig.url}/v1/sessions/{bob}/intercepts/echo-http") as r:
                assert r.status == 404
            async with rig.http.delete(f"{rig.url}/v1/sessions/{alice}/intercepts/echo-http") as r:
                assert r.status == 204
            async with rig.http.get(f"{rig.url}/v1/sessions/{alice}/intercepts") as r:
                assert await r.json() == []

            # A restarted manager has no sessions: heartbeats get 404, and agents arrive again.
            fresh = Manager(
                rig.api,
                ManagerSettings(
                    auth_mode="permissive", generator=GeneratorSettings(agent_image=IMAGE)
                ),
            )
            runner, port = await fresh.start()
            try:
                async with rig.http.post(
                    f"http://127.0.0.1:{port}/v1/sessions/{agent_sid}/remain"
                ) as r:
                    assert r.status == 404
                    assert "not found" in (await r.json())["error"]
                async with rig.http.post(
                    f"http://127.0.0.1:{port}/v1/agents", json=agent_info
                ) as r:
                    assert r.status == 201
            finally:
                await fresh.stop()
                await runner.cleanup()

    run(scenario(), timeout=120)


def json_line(line: bytes) -> Any:
    import json

    assert line.endswith(b"\n"), line
    return json.loads(line)


def test_nothing_sent_to_the_manager_makes_it_fail(control_plane: LocalControlPlane) -> None:
    """Random JSON at every endpoint: answers are 2xx or 4xx with an error naming the problem,
    never a 5xx, and the manager keeps serving."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    values = st.recursive(
        st.none() | st.booleans() | st.integers(-2, 70000) | st.text(max_size=12),
        lambda inner: (
            st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=10), inner, max_size=4)
        ),
        max_leaves=10,
    )
    fields = st.sampled_from(
        [
            "name",
            "version",
            "workload",
            "namespace",
            "mechanism",
            "port",
            "service",
            "containerPort",
            "agentPort",
            "targetPort",
            "headers",
            "disposition",
            "agentImage",
            "kind",
            "mechanisms",
            "podName",
        ]
    )
    bodies = st.dictionaries(fields, values, max_size=6) | values
    paths = st.sampled_from(
        [
            "/v1/clients",
            "/v1/agents",
            "/v1/prepare",
            "/v1/uninstall",
            "/v1/upgrade",
            "/v1/sessions/nope/intercepts",
            "/v1/sessions/nope/reviews/x:y",
            "/v1/sessions/nope/remain",
        ]
    )

    async def scenario(cases: list[tuple[str, Any]]) -> None:
        async with control_plane.api() as api:
            manager = Manager(api, ManagerSettings(generator=GeneratorSettings(agent_image=IMAGE)))
            runner, port = await manager.start()
            try:
                async with aiohttp.ClientSession(headers=admin_headers(control_plane)) as http:
                    for path, body in cases:
                        async with http.post(f"http://127.0.0.1:{port}{path}", json=body) as r:
                            assert r.status < 500, (path, body, await r.text())
                            if r.status >= 400:
                                assert (await r.json())["error"]
                    async with http.get(f"http://127.0.0.1:{port}/healthz") as r:
                        assert r.status == 200
            finally:
                await manager.stop()
                await runner.cleanup()

    examples = int(os.environ.get("TPPROXY_FUZZ_EXAMPLES", "25"))

    @settings(max_examples=examples, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(st.lists(st.tuples(paths, bodies), min_size=1, max_size=8))
    def check(cases: list[tuple[str, Any]]) -> None:
        run(scenario(cases), timeout=60)

    check()


def test_a_browsers_request_is_refused_before_anything_happens(
    control_plane: LocalControlPlane,
) -> None:
    """A page in the developer's browser can reach the local end of the port-forward; what a
    browser marks as its own (Origin, Sec-Fetch-*) or sends for a DNS name rebound to it gets
    403 and changes nothing; the names and addresses real callers use still work."""

    async def scenario() -> None:
        async with manager_rig(control_plane, "browser") as rig:
            for header in ({"Origin": "http://evil.example"}, {"Sec-Fetch-Site": "cross-site"},
                           {"Sec-Fetch-Mode": "no-cors"}):  # fmt: skip
                async with rig.http.post(
                    rig.url + "/v1/clients", json={"name": "x", "version": "1"}, headers=header
                ) as r:
                    assert r.status == 403
                    body = await r.json()
                    assert body["code"] == "forbidden"
                    assert f"header {next(iter(header)).lower()}" in body["error"]
                async with rig.http.get(rig.url + "/v1/intercepts", headers=header) as r:
                    assert r.status == 403
            for rebound in ("evil.example:8081", "traffic-manager.ambassador.evil.example"):
                async with rig.http.post(
                    rig.url + "/v1/clients", json={"name": "x", "version": "1"},
                    headers={"Host": rebound},
                ) as r:  # fmt: skip
                    assert r.status == 403
                    assert "Host" in (await r.json())["error"]
            assert rig.manager.state.version == 0  # no session was made
            for legit in (
                "localhost:8081",
                "traffic-manager.ambassador:8081",
                "[::1]:1",
                "10.244.0.7:8081",
                "traffic-manager.ambassador.svc.cluster.local",
            ):
                async with rig.http.get(rig.url + "/healthz", headers={"Host": legit}) as r:
                    assert r.status == 200, legit  # fmt: skip
            status, made = await rig.post("/v1/clients", {"name": "dev", "version": "1"})
            assert status == 201, made  # the same call from a client

    run(scenario(), timeout=60)
