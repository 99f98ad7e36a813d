"""Nobody gets in who does not belong: the traffic-manager against callers without credentials,
users of another namespace, stolen session ids, fake agents and forged certificates, on a real
API server (TokenReview, SubjectAccessReview, TokenRequest, the cluster's client CA). Each
refusal is a 401/403 whose message says what was missing, and the cluster is left unchanged."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, cast

import aiohttp
import msgspec
import pytest
from kubernetes_asyncio import client as k8s

from tpcontrol.certs import Authority
from tpcontrol.client.credentials import CredentialError, KubeUser, ManagerCredential
from tpcontrol.injector.webhook import AdmissionRequest, Injector, WebhookSettings
from tpcontrol.kube.agentconfig import GeneratorSettings, generate
from tpcontrol.kube.configmap import AgentConfigStore
from tpcontrol.kube.workloads import Workloads
from tpcontrol.localcluster import LocalControlPlane
from tpcontrol.localcluster.controlplane import client_certificate, client_certificate_for
from tpcontrol.manager.api import Manager, ManagerSettings
from tpcontrol.manager.state import MAX_SESSIONS_PER_OWNER
from tpproxy.tunnel import Hello, LineReader, Welcome

from .auth_helpers import (
    account_token,
    bind_client,
    bind_interceptor,
    ensure_user_role,
    service_account_subject,
    user_subject,
)
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
from .test_webhook_k8s import ANNOTATION, ECHO_CONTAINER, ECHO_PORTS, create, injected

Json = dict[str, Any]
CLIENT = {"name": "dev@laptop", "version": "0.1.0"}
AGENT_CONTAINER: Json = {"name": "traffic-agent", "image": IMAGE}


@dataclass
class Rig:
    plane: LocalControlPlane
    api: k8s.ApiClient
    manager: Manager
    url: str
    http: aiohttp.ClientSession
    team: str  # alice may intercept here
    other: str  # bob may intercept here
    alice: str
    bob: str

    @property
    def admin(self) -> str:
        return self.plane.tokens["admin"]

    async def call(
        self, method: str, path: str, token: str | None = None, body: Any = None,
        header: str | None = None,
    ) -> tuple[int, Any]:  # fmt: skip
        headers = {"authorization": header or f"Bearer {token}"} if (token or header) else {}
        async with self.http.request(
            method, self.url + path, json=body, headers=headers
        ) as r:  # fmt: skip
            raw = await r.read()
            return r.status, msgspec.json.decode(raw) if raw else {}

    async def arrive(self, token: str) -> str:
        status, answer = await self.call("POST", "/v1/clients", token, CLIENT)
        assert status == 201, answer
        return str(answer["sessionId"])

    async def alice_intercepts(self) -> tuple[str, Json]:
        """Alice prepares echo in her namespace and intercepts its http port: (session, it)."""
        prepare = {"workload": "echo", "namespace": self.team, "port": "http", "mechanism": "http"}
        status, answer = await self.call("POST", "/v1/prepare", self.alice, prepare)
        assert status == 200, answer
        sid = await self.arrive(self.alice)
        path = f"/v1/sessions/{sid}/intercepts"
        status, icept = await self.call("POST", path, self.alice, intercept_spec(self.team))
        assert status == 201, icept
        return sid, icept

    async def snapshot(self) -> Json:
        """What an attack must not change: the workloads' generations and the agent configs."""
        apps, core = k8s.AppsV1Api(self.api), k8s.CoreV1Api(self.api)
        seen: Json = {}
        for ns in (self.team, self.other):
            pods = await core.list_namespaced_pod(ns)
            seen[f"pods of {ns}"] = sorted(p.metadata.name for p in pods.items)
            found = await apps.read_namespaced_deployment("echo", ns)
            seen[ns] = (
                found.metadata.generation,
                dict(await AgentConfigStore(self.api).entries(ns)),
            )
        return seen


def intercept_spec(namespace: str, name: str = "echo-http") -> Json:
    return {
        "name": name, "workload": "echo", "namespace": namespace, "mechanism": "http",
        "serviceName": "echo", "containerPort": 8080, "agentPort": 9900, "targetPort": 8000,
    }  # fmt: skip


@asynccontextmanager
async def auth_rig(plane: LocalControlPlane, **settings: Any) -> AsyncIterator[Rig]:
    async with plane.api() as api:
        await ensure_user_role(api)
        team = await make_namespace(api, unique("team"))
        other = await make_namespace(api, unique("other"))
        for ns in (team, other):
            echo = deployment("echo", [ECHO_CONTAINER])
            echo["spec"]["strategy"] = {"type": "Recreate"}
            await create(api, ns, service("echo", ECHO_PORTS), echo)
        for ns, name in ((team, "alice"), (other, "bob")):
            await bind_interceptor(api, ns, service_account_subject(ns, name))
            await bind_client(api, service_account_subject(ns, name))
        alice = await account_token(api, team, "alice")
        bob = await account_token(api, other, "bob")
        manager = Manager(
            api,
            ManagerSettings(
                generator=GeneratorSettings(agent_image=IMAGE), login_port=0, **settings
            ),
        )
        runner, port = await manager.start()
        try:
            async with aiohttp.ClientSession() as http:
                yield Rig(
                    plane, api, manager, f"http://127.0.0.1:{port}", http, team, other, alice, bob
                )
        finally:
            await manager.stop()
            await runner.cleanup()


async def tunnel_hello(port: int, hello: Hello, within: float = 5) -> Welcome | None:
    """Open a tunnel stream; the manager's Welcome, or None if it parked the stream."""
    loop = asyncio.get_running_loop()
    transport, reader = await loop.create_connection(LineReader, "127.0.0.1", port)
    transport.write(msgspec.json.encode(hello) + b"\n")
    try:
        async with asyncio.timeout(within):
            line, _ = await reader.line
        return msgspec.json.decode(line, type=Welcome)
    except TimeoutError:
        return None
    finally:
        transport.abort()


def test_callers_without_credentials_are_refused_and_change_nothing(
    control_plane: LocalControlPlane,
) -> None:
    async def scenario() -> None:
        async with auth_rig(control_plane) as rig:
            before = await rig.snapshot()
            calls: list[tuple[str, str, Any]] = [
                ("POST", "/v1/clients", CLIENT),
                ("POST", "/v1/agents", {"name": "echo", "namespace": rig.team, "podName": "x",
                                        "podIp": "10.0.0.9", "version": "1", "mechanisms": ["tcp"]}),
                ("POST", "/v1/prepare", {"workload": "echo", "namespace": rig.team}),
                ("POST", "/v1/uninstall", {"namespace": rig.team}),
                ("POST", "/v1/upgrade", {"agentImage": "evil/agent:1"}),
                ("GET", "/v1/intercepts", None),
                ("GET", "/v1/info", None),
            ]  # fmt: skip
            for method, path, body in calls:
                status, answer = await rig.call(method, path, body=body)
                assert (status, answer["code"]) == (401, "unauthenticated"), (path, answer)
                assert "no credentials" in answer["error"], answer
                status, answer = await rig.call(method, path, "not-a-token", body)
                assert status == 401, (path, answer)
                assert "does not accept it" in answer["error"], (path, answer)
                status, answer = await rig.call(
                    method, path, header=f"Basic {rig.admin}", body=body
                )
                assert status == 401, (path, answer)
                assert "expected 'Bearer" in answer["error"], (path, answer)
            assert rig.manager.state.all_intercepts() == []
            assert await rig.snapshot() == before
            async with rig.http.get(rig.url + "/healthz") as r:  # probes need no credential
                assert r.status == 200

    run(scenario(), timeout=90)


def test_a_user_of_one_namespace_is_refused_in_every_other(
    control_plane: LocalControlPlane,
) -> None:
    async def scenario() -> None:
        async with auth_rig(control_plane) as rig:
            before = await rig.snapshot()
            prepare = {"workload": "echo", "port": "http", "mechanism": "http"}
            for ns, missing in [
                (rig.other, f"may not create pods/portforward in namespace {rig.other!r}"),
                ("kube-system", "'kube-system' is a system namespace"),
                ("ambassador", "'ambassador' is the traffic-manager's own"),
            ]:
                status, answer = await rig.call(
                    "POST", "/v1/prepare", rig.alice, {**prepare, "namespace": ns}
                )
                assert (status, answer["code"]) == (403, "permission_denied"), answer
                assert missing in answer["error"], answer

            sid = await rig.arrive(rig.alice)
            status, answer = await rig.call(
                "POST", f"/v1/sessions/{sid}/intercepts", rig.alice, intercept_spec(rig.other)
            )
            assert status == 403, answer
            assert "pods/portforward" in answer["error"], answer
            status, answer = await rig.call(
                "POST", "/v1/uninstall", rig.alice, {"namespace": rig.team, "workload": "echo"}
            )
            assert status == 403, answer
            assert "may not patch deployments.apps 'echo'" in answer["error"], answer
            status, answer = await rig.call("POST", "/v1/upgrade", rig.alice, {})
            assert status == 403, answer
            assert "in every namespace" in answer["error"], answer
            assert await rig.snapshot() == before  # nothing was written or rolled

            # The positive half: in her own namespace she prepares and intercepts.
            status, answer = await rig.call(
                "POST", "/v1/prepare", rig.alice, {**prepare, "namespace": rig.team}
            )
            assert status == 200, answer
            status, mine = await rig.call(
                "POST", f"/v1/sessions/{sid}/intercepts", rig.alice, intercept_spec(rig.team)
            )
            assert status == 201, mine
            bob_sid = await rig.arrive(rig.bob)
            await rig.call("POST", "/v1/prepare", rig.bob, {**prepare, "namespace": rig.other})
            status, his = await rig.call(
                "POST", f"/v1/sessions/{bob_sid}/intercepts", rig.bob, intercept_spec(rig.other)
            )
            assert status == 201, his
            # Listing shows each what they may see; the admin sees both.
            for token, ids in [
                (rig.alice, {mine["id"]}),
                (rig.bob, {his["id"]}),
                (rig.admin, {mine["id"], his["id"]}),
            ]:
                status, listed = await rig.call("GET", "/v1/intercepts", token)
                assert status == 200
                assert {i["id"] for i in listed} & {mine["id"], his["id"]} == ids

    run(scenario(), timeout=120)


def test_a_stolen_session_id_is_worth_nothing(control_plane: LocalControlPlane) -> None:
    async def scenario() -> None:
        async with auth_rig(control_plane) as rig:
            sid, icept = await rig.alice_intercepts()
            # Bob has her session id (it is in the intercept id, the default routing header).
            assert sid in icept["id"]
            for method, path, body in [
                ("POST", f"/v1/sessions/{sid}/remain", None),
                ("GET", f"/v1/sessions/{sid}/intercepts", None),
                ("POST", f"/v1/sessions/{sid}/intercepts", intercept_spec(rig.team, "stolen")),
                ("DELETE", f"/v1/sessions/{sid}/intercepts/echo-http", None),
                ("DELETE", f"/v1/sessions/{sid}", None),
            ]:
                for token in (rig.bob, rig.admin):
                    status, answer = await rig.call(method, path, token, body)
                    assert status == 403, (path, answer)
                    assert "belongs to another identity" in answer["error"], answer
                status, answer = await rig.call(method, path, body=body)
                assert status == 401, (path, answer)
            # ... nor at the tunnel, where her intercept's traffic would arrive.
            port = rig.manager.tunnel_port
            for token in ("", rig.bob):
                hello = Hello(role="client", session=sid, intercept=icept["id"], token=token)
                welcome = await tunnel_hello(port, hello)
                assert welcome is not None
                assert not welcome.ok
                assert "refused" in welcome.error, welcome
            assert not rig.manager.tunnel.idle.get(("traffic", icept["id"]))
            own = Hello(role="client", session=sid, intercept=icept["id"], token=rig.alice)
            assert await tunnel_hello(port, own, within=1) is None  # parked: hers to use
            # Her session and intercept are intact.
            status, listed = await rig.call("GET", f"/v1/sessions/{sid}/intercepts", rig.alice)
            assert status == 200
            assert [i["id"] for i in listed] == [icept["id"]]

    run(scenario(), timeout=120)


def test_mount_streams_are_the_owners_alone(control_plane: LocalControlPlane) -> None:
    """The developer's mount is reached only by a mount stream of the client that owns the
    intercept: no token, another user's token, a stolen session and a fake agent are refused,
    and a client cannot park where the agent parks (it would receive another client's mount)."""

    async def scenario() -> None:
        async with auth_rig(control_plane) as rig:
            sid, icept = await rig.alice_intercepts()
            port = rig.manager.tunnel_port
            for token in ("", rig.bob, rig.admin):
                for role in ("client", "agent"):
                    hello = Hello(role=role, session=sid, intercept=icept["id"], token=token,
                                  purpose="mount")  # fmt: skip
                    welcome = await tunnel_hello(port, hello)
                    assert welcome is not None, (role, token[:8])
                    assert not welcome.ok
                    assert "refused" in welcome.error, welcome
            # Her own mount stream is checked too: it waits for the agent's parked stream (none
            # here: no agent serves this workload), and parks nothing of its own.
            own = Hello(role="client", session=sid, intercept=icept["id"], token=rig.alice,
                        purpose="mount")  # fmt: skip
            welcome = await tunnel_hello(port, own, within=8)
            assert welcome is not None
            assert not welcome.ok
            assert "no agent stream" in welcome.error, welcome
            assert not rig.manager.tunnel.idle.get(("mount", icept["id"]))
            # A guessed intercept id of hers, with her token but another purpose's side.
            guessed = Hello(role="client", session=sid, intercept=icept["id"] + "x", token=rig.alice,
                            purpose="mount")  # fmt: skip
            welcome = await tunnel_hello(port, guessed)
            assert welcome is not None
            assert not welcome.ok
            assert "not one of this session's" in welcome.error

    run(scenario(), timeout=120)


def test_fake_agents_are_refused_and_a_real_agents_pod_is_its_identity(
    control_plane: LocalControlPlane,
) -> None:
    async def scenario() -> None:
        async with auth_rig(control_plane) as rig:
            # A pod of the team's workload carrying the agent container (as the webhook makes
            # them), and a pod of another workload without it.
            agented = deployment("agented", [ECHO_CONTAINER, AGENT_CONTAINER])
            plain = deployment("plain", [ECHO_CONTAINER])
            await create(rig.api, rig.team, agented, plain)
            (pod,) = await wait_for_pods(rig.api, rig.team, "app=agented", 1)
            (plain_pod,) = await wait_for_pods(rig.api, rig.team, "app=plain", 1)
            info = {"name": "agented", "namespace": rig.team, "podName": pod["metadata"]["name"],
                    "podIp": "6.6.6.6", "version": "1", "mechanisms": ["tcp", "http"],
                    "environment": {"GREETING": "hi"}}  # fmt: skip
            aud = "traffic-manager"
            unbound = await account_token(rig.api, rig.team, "default", audience=aud)
            plain_token = await account_token(
                rig.api, rig.team, "default", audience=aud, pod=plain_pod
            )
            token = await account_token(rig.api, rig.team, "default", audience=aud, pod=pod)
            for credential, body, status_wanted, missing in [
                (rig.admin, info, 401, "for audience 'traffic-manager'"),
                (rig.alice, info, 401, "for audience 'traffic-manager'"),
                (unbound, info, 401, "not bound to a pod"),
                (plain_token, {**info, "podName": ""}, 403, "has no traffic-agent container"),
                (token, {**info, "namespace": rig.other}, 403, "is not the namespace"),
                (token, {**info, "name": "echo"}, 403, "belongs to workload 'agented'"),
                (token, {**info, "podName": "someone-else"}, 403, "is not this token's pod"),
            ]:
                status, answer = await rig.call("POST", "/v1/agents", credential, body)
                assert status == status_wanted, answer
                assert missing in answer["error"], answer
            assert rig.manager.state.agents_of(rig.team, "agented") == []

            status, answer = await rig.call("POST", "/v1/agents", token, info)
            assert status == 201, answer
            agent_sid = answer["sessionId"]
            (arrived,) = rig.manager.state.agents_of(rig.team, "agented")
            assert arrived.pod_ip == ""  # the pod's own (none: no kubelet here), not 6.6.6.6
            # The agent's token is no client credential, and its session is the pod's alone.
            status, answer = await rig.call("POST", "/v1/clients", token, CLIENT)
            assert status == 401, answer
            status, answer = await rig.call("POST", f"/v1/sessions/{agent_sid}/remain", rig.alice)
            assert status == 401, answer  # a user token is checked as an agent's, and fails
            status, _ = await rig.call("POST", f"/v1/sessions/{agent_sid}/remain", token)
            assert status == 204

            # It reviews alice's intercept with the app's environment: she sees it, the admin's
            # listing shows the intercept without it.
            sid = await rig.arrive(rig.alice)
            spec = {**intercept_spec(rig.team), "workload": "agented", "serviceName": "echo"}
            status, icept = await rig.call(
                "POST", f"/v1/sessions/{sid}/intercepts", rig.alice, spec
            )
            assert status == 201, icept
            status, _ = await rig.call(
                "POST", f"/v1/sessions/{agent_sid}/reviews/{icept['id']}", token,
                {"disposition": "ACTIVE", "environment": {"DB_PASSWORD": "s3cret"}},
            )  # fmt: skip
            assert status == 204
            _, hers = await rig.call("GET", "/v1/intercepts", rig.alice)
            _, admins = await rig.call("GET", "/v1/intercepts", rig.admin)
            assert [i["environment"] for i in hers if i["id"] == icept["id"]] == [
                {"DB_PASSWORD": "s3cret"}
            ]
            assert [i.get("environment", {}) for i in admins if i["id"] == icept["id"]] == [{}]

    run(scenario(), timeout=120)


def test_client_certificates_log_in_and_forgeries_do_not(control_plane: LocalControlPlane) -> None:
    async def scenario() -> None:
        async with auth_rig(control_plane) as rig:
            assert rig.manager.login_port
            login = f"https://127.0.0.1:{rig.manager.login_port}"
            await bind_interceptor(rig.api, rig.team, user_subject("carol"))
            await bind_client(rig.api, user_subject("carol"))
            cert, key = client_certificate(rig.plane.authority, "carol", "devs")
            credential = ManagerCredential(KubeUser("carol", cert=cert, key=key), login)
            token = await credential.token()
            assert token.startswith("tpm1.")
            prepare = {"workload": "echo", "port": "http", "mechanism": "http"}
            status, answer = await rig.call(
                "POST", "/v1/prepare", token, {**prepare, "namespace": rig.team}
            )
            assert status == 200, answer
            status, answer = await rig.call(
                "POST", "/v1/prepare", token, {**prepare, "namespace": rig.other}
            )
            assert status == 403
            assert "carol may not create pods/portforward" in answer["error"]

            # A certificate of another CA does not get through the handshake.
            stranger_cert, stranger_key = client_certificate(
                Authority.create("not-the-cluster"), "admin", "system:masters"
            )
            stranger = ManagerCredential(
                KubeUser("mallory", cert=stranger_cert, key=stranger_key), login
            )
            with pytest.raises(CredentialError, match="login with the client certificate"):
                await stranger.token()
            # A manager token altered by one character, or signed by another manager, fails.
            head, _, mac = token.rpartition(".")
            forged = f"{head}.{'A' if mac[0] != 'A' else 'B'}{mac[1:]}"
            status, answer = await rig.call("POST", "/v1/clients", forged, CLIENT)
            assert status == 401
            assert "not signed by this traffic-manager" in answer["error"]
            # No certificate, or the plain port: no token.
            status, answer = await rig.call("POST", "/v1/login", rig.alice)
            assert status == 401
            assert "client certificate" in answer["error"]

    run(scenario(), timeout=120)


def test_one_identity_stops_at_the_session_cap(control_plane: LocalControlPlane) -> None:
    async def scenario() -> None:
        async with auth_rig(control_plane) as rig:
            made, refusal = 0, None
            for _ in range(10_000):  # bounded: the cap must stop it long before
                status, answer = await rig.call("POST", "/v1/clients", rig.alice, CLIENT)
                if status != 201:
                    refusal = (status, answer)
                    break
                made += 1
            assert made == MAX_SESSIONS_PER_OWNER
            assert refusal is not None, refusal
            assert refusal[0] == 429, refusal
            assert "sessions per identity" in refusal[1]["error"]
            assert f"({MAX_SESSIONS_PER_OWNER})" in refusal[1]["error"]
            await rig.arrive(rig.bob)  # another identity is not held back

    run(scenario(), timeout=120)


def test_permissive_mode_logs_what_it_would_refuse(
    control_plane: LocalControlPlane, caplog: pytest.LogCaptureFixture
) -> None:
    async def scenario() -> None:
        async with auth_rig(control_plane, auth_mode="permissive") as rig:
            with caplog.at_level(logging.WARNING, "tpcontrol"):
                status, _ = await rig.call(
                    "POST",
                    "/v1/prepare",
                    body={"workload": "echo", "namespace": rig.team, "port": "http"},
                )
                assert status == 200
                status, _ = await rig.call(
                    "POST",
                    "/v1/prepare",
                    rig.alice,
                    {"workload": "echo", "namespace": rig.other, "port": "http"},
                )
                assert status == 200
                # System namespaces stay refused in every mode.
                status, answer = await rig.call(
                    "POST", "/v1/prepare", body={"workload": "x", "namespace": "kube-system"}
                )
                assert status == 403, answer
            logged = [r.getMessage() for r in caplog.records]
            assert any(
                "permissive: would refuse POST /v1/prepare: no credentials" in m for m in logged
            )
            assert any(
                f"may not create pods/portforward in namespace {rig.other!r}" in m for m in logged
            )

    run(scenario(), timeout=90)


async def _stored(api: k8s.ApiClient, ns: str, workload: Json, **changes: Any) -> None:
    """An entry as someone who may write the namespace's ConfigMap could store it."""
    workload = {**workload, "metadata": {**workload["metadata"], "namespace": ns}}
    services = await Workloads(api).services(ns)
    sidecar = generate(workload, services, GeneratorSettings(agent_image=IMAGE))
    assert await AgentConfigStore(api).put(msgspec.structs.replace(sidecar, **changes))


def test_a_configmap_writer_chooses_neither_the_image_nor_the_manager(
    control_plane: LocalControlPlane,
) -> None:
    async def scenario() -> None:
        async with control_plane.api() as api:
            ns = await make_namespace(api, unique("writer"))
            async with running_webhook(api, ns):
                await create(api, ns, service("echo", ECHO_PORTS), service("lured", ECHO_PORTS))
                echo = deployment("echo", [ECHO_CONTAINER])
                await _stored(api, ns, echo, agent_image="evil.example/agent:1")
                await create(api, ns, echo)
                (pod,) = await wait_for_pods(api, ns, "app=echo", 1)
                images = {c["name"]: c["image"] for c in pod["spec"]["containers"]}
                assert images["traffic-agent"] == IMAGE  # the injector's setting, not the entry's
                assert {c["image"] for c in pod["spec"]["initContainers"]} == {IMAGE}

                lured = deployment("lured", [ECHO_CONTAINER])
                await _stored(api, ns, lured, manager_host="collector.evil.example")
                await create(api, ns, lured)
                (pod,) = await wait_for_pods(api, ns, "app=lured", 1)
                assert not injected(pod)  # an agent pointed elsewhere is never injected

    run(scenario(), timeout=120)


def test_dry_runs_and_forged_owners_write_nothing(control_plane: LocalControlPlane) -> None:
    async def scenario() -> None:
        async with control_plane.api() as api:
            ns = await make_namespace(api, unique("dry"))
            settings = WebhookSettings(GeneratorSettings(agent_image=IMAGE))
            injector = Injector(api, settings)
            await create(api, ns, service("echo", ECHO_PORTS))
            echo = deployment("echo", [ECHO_CONTAINER], replicas=0)
            echo["spec"]["template"]["metadata"]["annotations"] = {ANNOTATION: "enabled"}
            await create(api, ns, echo)
            apps = k8s.AppsV1Api(api)
            async with asyncio.timeout(30):
                while not (sets := (await apps.list_namespaced_replica_set(ns)).items):
                    await asyncio.sleep(0.1)
            owner = sets[0].metadata

            def pod(uid: str) -> Json:
                return {
                    "metadata": {
                        "generateName": "echo-", "namespace": ns,
                        "annotations": {ANNOTATION: "enabled"}, "labels": {"app": "echo"},
                        "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet",
                                             "name": owner.name, "uid": uid, "controller": True}],
                    },
                    "spec": {"containers": [ECHO_CONTAINER]},
                }  # fmt: skip

            def review(uid: str, dry_run: bool) -> AdmissionRequest:
                return AdmissionRequest(
                    uid="r1", namespace=ns, operation="CREATE", object=pod(uid), dry_run=dry_run
                )

            store = AgentConfigStore(api)
            dry = await injector.admit(review(owner.uid, dry_run=True))
            assert dry.patch  # a dry run answers as a real one would ...
            assert await store.entries(ns) == {}  # ... and stores nothing
            forged = await injector.admit(review("0000-not-the-owner", dry_run=False))
            assert not forged.patch  # an owner reference is followed only to that very object
            assert await store.entries(ns) == {}
            real = await injector.admit(review(owner.uid, dry_run=False))
            assert real.patch
            assert list(await store.entries(ns)) == ["echo"]

    run(scenario(), timeout=90)


def test_a_pod_token_opens_no_session_and_a_lost_grant_ends_intercepts(
    control_plane: LocalControlPlane,
) -> None:
    async def scenario() -> None:
        async with auth_rig(control_plane) as rig:
            # Any pod's own token is a Kubernetes identity, but not one allowed to call us.
            pod_token = await account_token(rig.api, rig.team, "default")
            status, answer = await rig.call("POST", "/v1/clients", pod_token, CLIENT)
            assert status == 403, answer
            assert "traffic-manager-clients" in answer["error"]

            sid, icept = await rig.alice_intercepts()
            own = Hello(role="client", session=sid, intercept=icept["id"], token=rig.alice)
            assert await tunnel_hello(rig.manager.tunnel_port, own, within=0.5) is None
            # The namespace admin removes her binding: her next heartbeat ends the intercept.
            await k8s.RbacAuthorizationV1Api(rig.api).delete_namespaced_role_binding(
                "intercepts-alice", rig.team
            )
            rig.manager.access.forget()  # not wait out the cache's seconds
            status, _ = await rig.call("POST", f"/v1/sessions/{sid}/remain", rig.alice)
            assert status == 204
            assert rig.manager.state.all_intercepts() == []
            # ... and the stream she had parked for it is dropped by the housekeeping.
            async with asyncio.timeout(10):
                while rig.manager.tunnel.parked():
                    await asyncio.sleep(0.05)

    run(scenario(), timeout=120)


def test_the_environment_needs_exec_rights(control_plane: LocalControlPlane) -> None:
    async def scenario() -> None:
        async with auth_rig(control_plane) as rig:
            # dave may port-forward and read workloads in the team's namespace, not exec.
            rbac = k8s.RbacAuthorizationV1Api(rig.api)
            role = {
                "metadata": {"name": "no-exec"},
                "rules": [
                    {"apiGroups": [""], "resources": ["pods/portforward"], "verbs": ["create"]},
                    {"apiGroups": ["apps"], "resources": ["deployments"], "verbs": ["get"]},
                ],
            }
            await rbac.create_namespaced_role(rig.team, cast(Any, role))
            dave_subject = service_account_subject(rig.team, "dave")
            binding = {
                "metadata": {"name": "dave"},
                "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                            "name": "no-exec"},
                "subjects": [dave_subject],
            }  # fmt: skip
            await rbac.create_namespaced_role_binding(rig.team, cast(Any, binding))
            await bind_client(rig.api, dave_subject)
            dave = await account_token(rig.api, rig.team, "dave")
            agent_sid = await _real_agent(rig)
            ids = {}
            for who, token in (("alice", rig.alice), ("dave", dave)):
                sid = await rig.arrive(token)
                spec = {**intercept_spec(rig.team, f"{who}-http"), "workload": "agented"}
                status, icept = await rig.call(
                    "POST", f"/v1/sessions/{sid}/intercepts", token, spec
                )
                assert status == 201, icept
                ids[who] = (sid, token, icept["id"])
                status, _ = await rig.call(
                    "POST", f"/v1/sessions/{agent_sid[0]}/reviews/{icept['id']}", agent_sid[1],
                    {"disposition": "ACTIVE", "environment": {"DB_PASSWORD": "s3cret"}},
                )  # fmt: skip
                assert status == 204
            seen = {}
            for who, (sid, token, iid) in ids.items():
                status, listed = await rig.call("GET", f"/v1/sessions/{sid}/intercepts", token)
                assert status == 200
                seen[who] = [i.get("environment", {}) for i in listed if i["id"] == iid]
            assert seen == {"alice": [{"DB_PASSWORD": "s3cret"}], "dave": [{}]}

    run(scenario(), timeout=120)


async def _real_agent(rig: Rig) -> tuple[str, str]:
    """An agent session for a pod of workload `agented` (it carries the agent container), by
    the pod's projected token; returns (session id, token)."""
    await create(rig.api, rig.team, deployment("agented", [ECHO_CONTAINER, AGENT_CONTAINER]))
    (pod,) = await wait_for_pods(rig.api, rig.team, "app=agented", 1)
    token = await account_token(rig.api, rig.team, "default", audience="traffic-manager", pod=pod)
    info = {"name": "agented", "namespace": rig.team, "podName": pod["metadata"]["name"],
            "podIp": "", "version": "1", "mechanisms": ["tcp", "http"]}  # fmt: skip
    status, answer = await rig.call("POST", "/v1/agents", token, info)
    assert status == 201, answer
    return str(answer["sessionId"]), token


def test_a_certificate_with_two_common_names_buys_no_token(
    control_plane: LocalControlPlane,
) -> None:
    async def scenario() -> None:
        async with auth_rig(control_plane) as rig:
            login = f"https://127.0.0.1:{rig.manager.login_port}"
            cert, key = _two_names(rig.plane.authority, "admin", "bob")
            credential = ManagerCredential(KubeUser("twice", cert=cert, key=key), login)
            with pytest.raises(CredentialError, match="2 common names; exactly one"):
                await credential.token()

    run(scenario(), timeout=60)


def _two_names(ca: Authority, first: str, last: str) -> tuple[bytes, bytes]:
    """A client certificate whose subject has two CNs: Go's API server reads the last, a naive
    reader the first."""
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    names = [x509.NameAttribute(NameOID.COMMON_NAME, cn) for cn in (first, last)]
    return client_certificate_for(ca, x509.Name(names))


def test_a_configmap_writer_cannot_restart_other_workloads(
    control_plane: LocalControlPlane,
) -> None:
    async def scenario() -> None:
        async with auth_rig(control_plane) as rig:
            before = await rig.snapshot()
            store = AgentConfigStore(rig.api)

            def lure(data: dict[str, str]) -> dict[str, str]:
                # Key `decoy`, but naming the workload `echo`: a restart of echo at will.
                return {**data, "decoy": f"agentName: decoy\nnamespace: {rig.team}\n"
                        "workloadName: echo\nworkloadKind: Deployment\n"}  # fmt: skip

            await store.update(rig.team, lure)
            async with asyncio.timeout(10):  # the watcher has seen it ...
                while "decoy" not in rig.manager.watcher.snapshot.get(rig.team, {}):
                    await asyncio.sleep(0.02)
            assert rig.manager.rollouts.done == []  # ... and rolled nothing out
            after = await rig.snapshot()
            assert after[rig.team][0] == before[rig.team][0]  # echo's generation

    run(scenario(), timeout=60)
