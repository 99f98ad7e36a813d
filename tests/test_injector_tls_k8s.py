"""The injector's own TLS on a real API server: the Secret, the caBundle, renewal, rotation."""

from __future__ import annotations

import asyncio
import base64
import datetime
import logging
import os
import ssl
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, cast

import pytest
from cryptography import x509
from kubernetes_asyncio import client as k8s

from tpcontrol.certs import issued_by, load_certificate, subject_alt_names
from tpcontrol.injector.tls import (
    CA_CERT,
    PREVIOUS_CA,
    SECRET_NAME,
    SERVICE_NAME,
    TLS_CERT,
    WEBHOOK_CONFIGURATION_NAME,
    InjectorTls,
    TlsBootstrapError,
    TlsSettings,
    TlsSettingsError,
)
from tpcontrol.injector.webhook import (
    Injector,
    SwitchingTls,
    WebhookServer,
    WebhookSettings,
    self_signed,
    start,
    webhook_configuration,
)
from tpcontrol.kube.agentconfig import GeneratorSettings
from tpcontrol.localcluster import LocalControlPlane

from .helpers import free_port, run
from .k8s_helpers import IMAGE, LABEL, make_namespace, unique, until_webhook_called

Json = dict[str, Any]
DAY = datetime.timedelta(days=1)


class Clock:
    """The real time moved by `offset`: certificates stay valid for real TLS clients."""

    def __init__(self, offset: datetime.timedelta = datetime.timedelta(0)) -> None:
        self.offset = offset

    def __call__(self) -> datetime.datetime:
        return datetime.datetime.now(datetime.UTC) + self.offset


def settings_for(ns: str, config: str, **overrides: Any) -> TlsSettings:
    return TlsSettings(namespace=ns, webhook_configuration=config, **overrides)


async def create_configuration(api: k8s.ApiClient, ns: str, *, url: str | None = None) -> str:
    """Two webhook entries without caBundle (as deploy/ has it), acting on `ns` only."""
    name = f"tls-{ns}"
    service = {"namespace": ns, "name": SERVICE_NAME, "path": "/traffic-agent", "port": 443}
    config = webhook_configuration(
        url=url, service=None if url else service, ca_bundle=None, name=name
    )
    first = config["webhooks"][0]
    first["namespaceSelector"] = {"matchLabels": {LABEL: ns}}
    second = {**first, "name": "second.tpcontrol.dev", "timeoutSeconds": 7}
    second["clientConfig"] = dict(first["clientConfig"])
    config["webhooks"] = [first, second]
    await k8s.AdmissionregistrationV1Api(api).create_mutating_webhook_configuration(
        cast(Any, config)
    )
    return name


async def read_configuration(api: k8s.ApiClient, name: str) -> Json:
    config = await k8s.AdmissionregistrationV1Api(api).read_mutating_webhook_configuration(name)
    result: Json = api.sanitize_for_serialization(config)
    return result


def bundles(config: Json) -> list[bytes]:
    return [base64.b64decode(h["clientConfig"].get("caBundle", "")) for h in config["webhooks"]]


async def read_secret(api: k8s.ApiClient, ns: str, name: str = SECRET_NAME) -> Json:
    secret = await k8s.CoreV1Api(api).read_namespaced_secret(name, ns)
    result: Json = api.sanitize_for_serialization(secret)
    return result


def data(secret: Json, key: str) -> bytes:
    return base64.b64decode(secret["data"].get(key, ""))


@asynccontextmanager
async def serving(api: k8s.ApiClient, tls: SwitchingTls) -> AsyncIterator[int]:
    server = WebhookServer(Injector(api, WebhookSettings(GeneratorSettings(agent_image=IMAGE))))
    runner, port = await start(server, "127.0.0.1", 0, tls)
    try:
        yield port
    finally:
        await runner.cleanup()


async def handshake(port: int, bundle: bytes, hostname: str) -> x509.Certificate:
    """Connect as the API server does: trust only `bundle`, verify `hostname`."""
    context = ssl.create_default_context(cadata=bundle.decode())
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", port, ssl=context, server_hostname=hostname
    )
    der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
    writer.close()
    await writer.wait_closed()
    return x509.load_der_x509_certificate(der)


@asynccontextmanager
async def namespace_and_configuration(
    plane: LocalControlPlane, prefix: str
) -> AsyncIterator[tuple[k8s.ApiClient, str, str]]:
    async with plane.api() as api:
        ns = await make_namespace(api, unique(prefix))
        name = await create_configuration(api, ns)
        try:
            yield api, ns, name
        finally:
            await k8s.AdmissionregistrationV1Api(api).delete_mutating_webhook_configuration(name)


def without_bundle_and_version(config: Json) -> Json:
    hooks = [
        {**h, "clientConfig": {k: v for k, v in h["clientConfig"].items() if k != "caBundle"}}
        for h in config["webhooks"]
    ]
    return {"webhooks": hooks, "name": config["metadata"]["name"]}


def test_first_start_creates_the_secret_and_fills_every_ca_bundle(
    control_plane: LocalControlPlane,
) -> None:
    async def scenario() -> None:
        async with namespace_and_configuration(control_plane, "tls-first") as (api, ns, name):
            before = await read_configuration(api, name)
            boot = InjectorTls(api, settings_for(ns, name))
            await boot.reconcile()
            secret = await read_secret(api, ns)
            assert secret["type"] == "kubernetes.io/tls"
            assert sorted(secret["data"]) == ["ca.crt", "ca.key", "tls.crt", "tls.key"]
            ca, cert = (
                load_certificate(data(secret, CA_CERT)),
                load_certificate(data(secret, TLS_CERT)),
            )
            assert issued_by(cert, ca)
            assert subject_alt_names(cert) == {
                f"agent-injector.{ns}.svc",
                f"agent-injector.{ns}",
                f"agent-injector.{ns}.svc.cluster.local",
            }
            lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
            assert 365 * DAY < lifetime < 366 * DAY

            after = await read_configuration(api, name)
            assert bundles(after) == [data(secret, CA_CERT)] * 2  # every entry
            assert without_bundle_and_version(after) == without_bundle_and_version(before)
            assert boot.published

            async with serving(api, boot.tls) as port:
                for host in (f"agent-injector.{ns}.svc", f"agent-injector.{ns}.svc.cluster.local"):
                    served = await handshake(port, bundles(after)[0], host)
                    assert served == cert
                with pytest.raises(ssl.SSLCertVerificationError):
                    await handshake(port, bundles(after)[0], "agent-injector.elsewhere.svc")

            # Someone wipes the caBundle (an old `kubectl apply` of a file that had one): the next
            # check writes it again.
            wipe = [{"op": "remove", "path": "/webhooks/1/clientConfig/caBundle"}]
            await k8s.AdmissionregistrationV1Api(api).patch_mutating_webhook_configuration(
                name, wipe
            )
            await boot.reconcile()
            assert bundles(await read_configuration(api, name)) == [data(secret, CA_CERT)] * 2

    run(scenario(), timeout=60)


def test_a_second_start_reuses_the_secret_byte_for_byte(control_plane: LocalControlPlane) -> None:
    async def scenario() -> None:
        async with namespace_and_configuration(control_plane, "tls-again") as (api, ns, name):
            first = InjectorTls(api, settings_for(ns, name))
            await first.reconcile()
            secret = await read_secret(api, ns)
            config = await read_configuration(api, name)

            second = InjectorTls(api, settings_for(ns, name))
            await second.reconcile()
            again = await read_secret(api, ns)
            assert again["metadata"]["resourceVersion"] == secret["metadata"]["resourceVersion"]
            assert again["data"] == secret["data"]
            assert second.writes == 0
            assert second.tls.cert == first.tls.cert == data(secret, TLS_CERT)
            unchanged = await read_configuration(api, name)
            assert unchanged["metadata"]["resourceVersion"] == config["metadata"]["resourceVersion"]

    run(scenario(), timeout=60)


class RacingTls(InjectorTls):
    """Every racer reads the (missing) Secret before any of them writes it."""

    def __init__(self, api: k8s.ApiClient, settings: TlsSettings, barrier: asyncio.Barrier):
        super().__init__(api, settings)
        self.barrier = barrier
        self.first_read = True

    async def _read_secret(self) -> Json | None:
        secret = await super()._read_secret()
        if self.first_read:
            self.first_read = False
            await self.barrier.wait()
        return secret


def test_concurrent_starts_converge_on_one_secret(control_plane: LocalControlPlane) -> None:
    async def scenario() -> None:
        async with namespace_and_configuration(control_plane, "tls-race") as (api, ns, name):
            barrier = asyncio.Barrier(4)
            racers = [RacingTls(api, settings_for(ns, name), barrier) for _ in range(4)]
            await asyncio.gather(*(r.reconcile() for r in racers))
            assert sum(r.writes for r in racers) == 1
            assert sum(r.conflicts for r in racers) == 3  # the others got 409 and read the winner
            secret = await read_secret(api, ns)
            assert {r.tls.cert for r in racers} == {data(secret, TLS_CERT)}
            assert bundles(await read_configuration(api, name)) == [data(secret, CA_CERT)] * 2

            # Two more replicas start at once on a garbled Secret: one replaces it, one follows.
            secret["data"][TLS_CERT] = base64.b64encode(b"garbage").decode()
            await k8s.CoreV1Api(api).replace_namespaced_secret(SECRET_NAME, ns, cast(Any, secret))
            barrier = asyncio.Barrier(2)
            racers = [RacingTls(api, settings_for(ns, name), barrier) for _ in range(2)]
            await asyncio.gather(*(r.reconcile() for r in racers))
            assert sum(r.writes for r in racers) == 1
            fixed = await read_secret(api, ns)
            assert {r.tls.cert for r in racers} == {data(fixed, TLS_CERT)}
            assert data(fixed, CA_CERT) == data(secret, CA_CERT)  # a good CA is kept

    run(scenario(), timeout=60)


def test_a_near_expiry_certificate_is_renewed_and_served_without_restart(
    control_plane: LocalControlPlane,
) -> None:
    async def scenario() -> None:
        async with namespace_and_configuration(control_plane, "tls-renew") as (api, ns, name):
            clock = Clock(-300 * DAY)  # made 300 days ago: 65 of its 365 days left in real time
            settings = settings_for(ns, name, check_interval=0.2)
            boot = InjectorTls(api, settings, clock=clock)
            await boot.reconcile()
            old = await read_secret(api, ns)
            host = f"agent-injector.{ns}.svc"
            async with serving(api, boot.tls) as port:
                bundle = bundles(await read_configuration(api, name))[0]
                assert await handshake(port, bundle, host) == load_certificate(data(old, TLS_CERT))
                clock.offset = datetime.timedelta(0)  # now less than a third is left
                checks = asyncio.create_task(boot.run())
                try:
                    async with asyncio.timeout(20):
                        while (new := await read_secret(api, ns))["data"] == old["data"]:
                            await asyncio.sleep(0.1)
                        while boot.tls.cert != data(new, TLS_CERT):
                            await asyncio.sleep(0.05)
                finally:
                    checks.cancel()
                served = await handshake(port, bundle, host)  # the same server, the same bundle
                assert served == load_certificate(data(new, TLS_CERT))
                assert served != load_certificate(data(old, TLS_CERT))
                assert served.not_valid_after_utc - datetime.datetime.now(datetime.UTC) > 364 * DAY
            assert data(new, CA_CERT) == data(old, CA_CERT)  # the CA and the bundle stay
            assert bundles(await read_configuration(api, name)) == [data(old, CA_CERT)] * 2

    run(scenario(), timeout=60)


def test_ca_rotation_keeps_the_old_ca_in_the_bundle_until_the_new_one_is_served(
    control_plane: LocalControlPlane,
) -> None:
    async def scenario() -> None:
        async with namespace_and_configuration(control_plane, "tls-ca") as (api, ns, name):
            clock = Clock(-210 * DAY)
            settings = settings_for(ns, name, ca_lifetime=300 * DAY, cert_lifetime=300 * DAY)
            boot = InjectorTls(api, settings, clock=clock)
            host = f"agent-injector.{ns}.svc"
            await boot.reconcile()
            s0 = await read_secret(api, ns)
            old_ca = data(s0, CA_CERT)
            async with serving(api, boot.tls) as port:

                async def check(expect_bundle: list[bytes], signer: bytes) -> None:
                    configured = bundles(await read_configuration(api, name))
                    assert configured == [b"".join(expect_bundle)] * 2
                    served = await handshake(port, configured[0], host)
                    assert issued_by(served, load_certificate(signer))

                await check([old_ca], old_ca)

                clock.offset = datetime.timedelta(0)  # 90 of the CA's 300 days left
                await boot.reconcile()
                s1 = await read_secret(api, ns)
                new_ca = data(s1, CA_CERT)
                assert new_ca != old_ca
                assert data(s1, PREVIOUS_CA) == old_ca
                assert data(s1, TLS_CERT) == data(s0, TLS_CERT)  # still the old CA's
                await check([new_ca, old_ca], old_ca)

                await boot.reconcile()  # within the overlap: nothing moves
                assert (await read_secret(api, ns))["data"] == s1["data"]

                clock.offset = datetime.timedelta(minutes=11)  # overlap (10 min) passed
                await boot.reconcile()
                s2 = await read_secret(api, ns)
                assert data(s2, TLS_CERT) != data(s1, TLS_CERT)
                await check([new_ca, old_ca], new_ca)

                # A replica that restarts now resumes the rotation where it is.
                restarted = InjectorTls(api, settings, clock=clock)
                await restarted.reconcile()
                assert restarted.writes == 0
                assert restarted.tls.cert == data(s2, TLS_CERT)

                clock.offset = datetime.timedelta(minutes=22)
                await boot.reconcile()
                s3 = await read_secret(api, ns)
                assert PREVIOUS_CA not in s3["data"]
                assert data(s3, TLS_CERT) == data(s2, TLS_CERT)
                await check([new_ca], new_ca)

    run(scenario(), timeout=60)


def test_garbage_in_the_secret_is_replaced_with_a_warning(
    control_plane: LocalControlPlane, caplog: pytest.LogCaptureFixture
) -> None:
    async def scenario() -> None:
        async with namespace_and_configuration(control_plane, "tls-junk") as (api, ns, name):
            junk = {
                "metadata": {"name": SECRET_NAME, "annotations": {"kept": "yes"}},
                "type": "Opaque",
                "data": {
                    "ca.crt": base64.b64encode(b"-----BEGIN CERTIFICATE-----\nnope").decode(),
                    "ca.key": base64.b64encode(b"not a key").decode(),
                    "tls.crt": base64.b64encode(b"\x00\x01").decode(),
                    "other": base64.b64encode(b"x").decode(),
                },
            }
            await k8s.CoreV1Api(api).create_namespaced_secret(ns, cast(Any, junk))
            boot = InjectorTls(api, settings_for(ns, name))
            with caplog.at_level(logging.WARNING, "tpcontrol.injector.tls"):
                await boot.reconcile()
            assert f"Secret {ns}/{SECRET_NAME}: ca.crt/ca.key: CA certificate: unreadable" in (
                caplog.text
            )
            secret = await read_secret(api, ns)
            assert secret["type"] == "Opaque"  # a Secret's type cannot change; it is kept
            assert sorted(secret["data"]) == ["ca.crt", "ca.key", "tls.crt", "tls.key"]
            assert secret["metadata"]["annotations"]["kept"] == "yes"
            ca, cert = (
                load_certificate(data(secret, CA_CERT)),
                load_certificate(data(secret, TLS_CERT)),
            )
            assert issued_by(cert, ca)
            assert boot.tls.cert == data(secret, TLS_CERT)
            assert bundles(await read_configuration(api, name)) == [data(secret, CA_CERT)] * 2

            # A certificate for other names (the Service was renamed) is re-issued; the CA stays.
            caplog.clear()
            renamed = InjectorTls(api, settings_for(ns, name, service="injector"))
            with caplog.at_level(logging.WARNING, "tpcontrol.injector.tls"):
                await renamed.reconcile()
            assert f"tls.crt: not valid for injector.{ns}" in caplog.text
            again = await read_secret(api, ns)
            assert data(again, CA_CERT) == data(secret, CA_CERT)
            assert f"injector.{ns}.svc" in subject_alt_names(
                load_certificate(data(again, TLS_CERT))
            )

    run(scenario(), timeout=60)


def test_the_api_server_calls_the_injector_through_the_bundle_it_wrote(
    control_plane: LocalControlPlane,
) -> None:
    """The real proof: kube-apiserver verifies the served certificate against the caBundle."""

    async def scenario() -> None:
        async with control_plane.api() as api:
            ns = await make_namespace(api, unique("tls-call"))
            name = f"tls-{ns}"
            settings = settings_for(ns, name, extra_names=("127.0.0.1",))
            boot = InjectorTls(api, settings)
            await boot.reconcile()  # the configuration does not exist yet: not fatal
            assert not boot.published
            server = WebhookServer(
                Injector(api, WebhookSettings(GeneratorSettings(agent_image=IMAGE)))
            )
            runner, port = await start(server, "127.0.0.1", 0, boot.tls)
            registration = k8s.AdmissionregistrationV1Api(api)
            try:
                await create_configuration(api, ns, url=f"https://127.0.0.1:{port}/traffic-agent")
                await boot.reconcile()  # it appeared: its caBundle is written
                assert boot.published
                await until_webhook_called(api, server, ns)
            finally:
                await registration.delete_mutating_webhook_configuration(name)
                await runner.cleanup()

    run(scenario(), timeout=60)


def test_a_forbidden_secret_is_a_clear_error(control_plane: LocalControlPlane) -> None:
    async def scenario() -> None:
        async with control_plane.api() as api:
            ns = await make_namespace(api, unique("tls-denied"))
            api.set_default_header("Impersonate-User", f"system:serviceaccount:{ns}:default")
            boot = InjectorTls(api, settings_for(ns, ""))
            with pytest.raises(TlsBootstrapError) as caught:
                await boot.reconcile()
            message = str(caught.value)
            assert f"cannot get Secret {ns}/{SECRET_NAME}: 403" in message
            assert "needs get, create and update" in message
            assert "deploy/rbac.yaml" in message

    run(scenario(), timeout=30)


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"namespace": ""}, "TlsSettings.namespace"),
        ({"service": "Agent_Injector"}, "TlsSettings.service"),
        ({"secret": "no/slash"}, "TlsSettings.secret"),
        ({"extra_names": ("bad name",)}, "TlsSettings.extra_names"),
        ({"cert_lifetime": datetime.timedelta(0)}, "TlsSettings.cert_lifetime"),
        ({"renew_fraction": 1.5}, "TlsSettings.renew_fraction"),
        ({"check_interval": 900.0}, "TlsSettings.overlap"),
    ],
)
def test_settings_name_the_field_they_refuse(overrides: dict[str, Any], field: str) -> None:
    with pytest.raises(TlsSettingsError, match=field):
        TlsSettings(**{"namespace": "ambassador", **overrides})


def test_the_command_bootstraps_and_own_files_win(
    control_plane: LocalControlPlane, tmp_path: Path
) -> None:
    """`tpcontrol webhook` as deploy/ runs it makes the Secret; with files in --tls-dir it
    serves those and writes nothing."""

    async def scenario() -> None:
        async with namespace_and_configuration(control_plane, "tls-cli") as (api, ns, name):
            env = {
                **os.environ,
                "TPCONTROL_MANAGER_NAMESPACE": ns,
                "TPCONTROL_WEBHOOK_CONFIGURATION": name,
            }
            listen = f"127.0.0.1:{free_port()}"
            base = [sys.executable, "-m", "tpcontrol", "webhook", "--listen", listen]
            base += ["--kubeconfig", str(control_plane.kubeconfig)]

            async def started(*extra: str) -> None:
                proc = await asyncio.create_subprocess_exec(
                    *base, *extra, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
                )
                assert proc.stdout is not None
                assert proc.stderr is not None
                try:
                    async with asyncio.timeout(30):
                        line = (await proc.stdout.readline()).decode()
                finally:
                    if proc.returncode is None:
                        proc.terminate()
                    errors = (await proc.stderr.read()).decode()
                    await proc.wait()
                assert "agent injector listening on https://127.0.0.1:" in line, errors

            with tempfile.TemporaryDirectory() as empty:
                await started("--tls-dir", empty)
            secret = await read_secret(api, ns)
            assert bundles(await read_configuration(api, name)) == [data(secret, CA_CERT)] * 2

            mine = tmp_path / "mine"
            self_signed(mine, "127.0.0.1", ["localhost"])
            await k8s.CoreV1Api(api).delete_namespaced_secret(SECRET_NAME, ns)
            await started("--tls-dir", str(mine))
            with pytest.raises(k8s.ApiException) as missing:
                await read_secret(api, ns)
            assert missing.value.status == 404

    run(scenario(), timeout=90)


def test_help_names_the_defaults() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "tpcontrol", "webhook", "--help"],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    )
    text = " ".join(result.stdout.split())
    for name in (SECRET_NAME, WEBHOOK_CONFIGURATION_NAME, SERVICE_NAME):
        assert f"default {name}" in text
