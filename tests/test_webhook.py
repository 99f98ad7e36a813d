"""The webhook's HTTPS surface: bad input, non-pods, certificate reload, and the config it prints."""

from __future__ import annotations

import base64
import json
import ssl
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tpcontrol.certs import Authority
from tpcontrol.injector.webhook import (
    Injector,
    ReloadingTls,
    WebhookServer,
    WebhookSettings,
    self_signed,
    start,
)
from tpcontrol.kube.agentconfig import GeneratorSettings
from tpcontrol.localcluster import LocalControlPlane

from .helpers import run

Json = dict[str, Any]


@asynccontextmanager
async def serving(
    plane: LocalControlPlane, tmp: Path
) -> AsyncIterator[tuple[str, aiohttp.ClientSession, ReloadingTls]]:
    cert, key, ca = self_signed(tmp, "127.0.0.1", ["localhost"])
    tls = ReloadingTls(cert, key)
    async with plane.api() as api:
        server = WebhookServer(Injector(api, WebhookSettings(GeneratorSettings(agent_image="img"))))
        runner, port = await start(server, "127.0.0.1", 0, tls)
        context = ssl.create_default_context(cadata=ca.decode())
        try:
            async with aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(ssl=context)
            ) as session:
                yield f"https://127.0.0.1:{port}", session, tls
        finally:
            await runner.cleanup()


def review(
    obj: Json | None,
    *,
    kind: str = "Pod",
    group: str = "",
    namespace: str = "nowhere",
    operation: str = "CREATE",
) -> Json:
    return {
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": "0a1b",
            "kind": {"group": group, "version": "v1", "kind": kind},
            "resource": {"group": group, "version": "v1", "resource": kind.lower() + "s"},
            "namespace": namespace,
            "operation": operation,
            "object": obj,
        },
    }


def test_bad_bodies_get_400_with_the_reason_and_non_pods_are_allowed(
    control_plane: LocalControlPlane,
    tmp_path: Path,
) -> None:
    async def scenario() -> None:
        async with serving(control_plane, tmp_path) as (url, session, _):
            hook = url + "/traffic-agent"
            cases = [
                (b"{not json", "application/json", "not JSON"),
                (
                    b'{"request": {"uid": 5}}',
                    "application/json",
                    "Expected `str`, got `int` - at `$.request.uid`",
                ),
                (b'{"request": {}}', "application/json", "missing required field `uid`"),
                (b'{"kind": "AdmissionReview"}', "application/json", "no `request`"),
                (b"[]", "application/json", "Expected `object`, got `array`"),
                (b"{}", "text/plain", "content type must be application/json"),
            ]
            for body, ctype, reason in cases:
                async with session.post(hook, data=body, headers={"content-type": ctype}) as r:
                    assert r.status == 400, body
                    assert reason in await r.text()
            # A ConfigMap review is allowed untouched.
            async with session.post(
                hook, json=review({"metadata": {"name": "x"}}, kind="ConfigMap")
            ) as r:
                answer = await r.json()
            assert answer["response"] == {"uid": "0a1b", "allowed": True}
            assert answer["kind"] == "AdmissionReview"
            # Pods in system namespaces, or annotated disabled, too.
            pod = {
                "metadata": {"name": "p", "namespace": "kube-system"},
                "spec": {"containers": []},
            }
            async with session.post(hook, json=review(pod)) as r:
                assert (await r.json())["response"] == {"uid": "0a1b", "allowed": True}
            async with session.get(url + "/healthz") as r:
                assert r.status == 200
            async with session.get(url + "/metrics") as r:
                text = await r.text()
            assert 'tpcontrol_admission_requests_total{result="bad_request"} 6.0' in text
            assert 'tpcontrol_admission_requests_total{result="unchanged"} 2.0' in text

    run(scenario())


JSONISH = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=10),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=12,
)
POD_KEYS = st.fixed_dictionaries(
    {},
    optional={
        "metadata": st.fixed_dictionaries(
            {},
            optional={
                "name": JSONISH,
                "namespace": st.sampled_from(["default", "kube-system", "", "nope"]) | JSONISH,
                "annotations": st.dictionaries(
                    st.sampled_from(["telepresence.getambassador.io/inject-traffic-agent", "x"]),
                    st.sampled_from(["enabled", "disabled", "false", "maybe", ""]),
                    max_size=2,
                )
                | JSONISH,
                "ownerReferences": JSONISH,
            },
        ),
        "spec": JSONISH,
    },
)


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(pod=POD_KEYS | JSONISH, operation=st.sampled_from(["CREATE", "DELETE", "", "UPDATE"]))
def test_nothing_the_webhook_receives_crashes_it(
    control_plane: LocalControlPlane,
    tmp_path_factory: Any,
    pod: Any,
    operation: str,
) -> None:
    async def scenario() -> None:
        async with serving(control_plane, tmp_path_factory.mktemp("tls")) as (url, session, _):
            body = review(None, operation=operation)
            body["request"]["object"] = pod
            async with session.post(url + "/traffic-agent", json=body) as r:
                assert r.status in (200, 400)
                if r.status == 200:
                    answer = await r.json()
                    assert answer["response"]["allowed"] is True
                    assert "patch" not in answer["response"]  # nothing here is injectable
            async with session.get(url + "/healthz") as r:
                assert r.status == 200

    run(scenario())


def test_certificate_is_reloaded_from_disk_without_restart(
    control_plane: LocalControlPlane,
    tmp_path: Path,
) -> None:
    async def scenario() -> None:
        async with serving(control_plane, tmp_path) as (url, _session, tls):
            other = Authority.create("rotated-ca")
            cert, key = other.issue("agent-injector", ips=["127.0.0.1"])
            # Write the key first, then the certificate (a rotation as a Secret update does it).
            (tmp_path / "tls.key").write_bytes(key)
            (tmp_path / "tls.crt").write_bytes(cert)
            context = ssl.create_default_context(cadata=other.pem.decode())
            connector = aiohttp.TCPConnector(ssl=context)
            async with (
                aiohttp.ClientSession(connector=connector) as fresh,
                fresh.get(url + "/healthz") as r,
            ):
                assert r.status == 200  # the new CA verifies the server: the new cert is served
            assert tls.loads >= 2

    run(scenario())


def test_webhook_config_command(tmp_path: Path) -> None:
    _, _, ca = self_signed(tmp_path, "127.0.0.1", [])
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "tpcontrol",
            "webhook-config",
            "--service",
            "ambassador/agent-injector",
            "--ca-file",
            str(tmp_path / "ca.crt"),
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    config = json.loads(result.stdout)
    (hook,) = config["webhooks"]
    assert hook["failurePolicy"] == "Ignore"
    assert hook["timeoutSeconds"] == 5
    assert hook["sideEffects"] == "NoneOnDryRun"
    assert base64.b64decode(hook["clientConfig"]["caBundle"]) == ca
    assert hook["clientConfig"]["service"] == {
        "namespace": "ambassador",
        "name": "agent-injector",
        "path": "/traffic-agent",
        "port": 443,
    }
    assert "ambassador" in hook["namespaceSelector"]["matchExpressions"][0]["values"]
    # Without --ca-file: no caBundle, as in deploy/ (the injector writes its own CA there).
    bare = subprocess.run(
        [
            sys.executable,
            "-m",
            "tpcontrol",
            "webhook-config",
            "--service",
            "ambassador/agent-injector",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    (hook,) = json.loads(bare.stdout)["webhooks"]
    assert "caBundle" not in hook["clientConfig"]
    bad = subprocess.run(
        [
            sys.executable,
            "-m",
            "tpcontrol",
            "webhook-config",
            "--url",
            "http://x",
            "--ca-file",
            str(tmp_path / "ca.crt"),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert bad.returncode == 2
    assert "must be an https:// URL" in bad.stderr
