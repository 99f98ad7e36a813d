"""A real Kubernetes control plane on loopback: etcd, kube-apiserver and kube-controller-manager.

Used by the tests of the control modules and by `tpcontrol demo`. The binaries come from
`scripts/install-k8s-testbin.sh` (K8S_TESTBIN, default ~/.cache/k8s-testbin/v1.20.2) and Debian's
etcd. Every port is chosen by binding port 0, certificates are made with `cryptography`, and the
processes are stopped in order (API server before etcd). There is no kubelet or scheduler here.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import ssl
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from kubernetes_asyncio import client as k8s

from tpcontrol.certs import Authority

DEFAULT_BIN = Path.home() / ".cache/k8s-testbin/v1.20.2"
TOKEN = "tpcontrol-local-admin"
CONTROLLERS = (
    "*,-nodeipam,-nodelifecycle,-attachdetach,-persistentvolume-binder,"
    "-persistentvolume-expander,-cloud-node-lifecycle,-route,-service,-ttl"
)


class ControlPlaneError(RuntimeError):
    """The control plane cannot be started; the message says what is missing or what failed."""


def testbin() -> Path:
    """Where the API server and controller-manager binaries are expected."""
    return Path(os.environ.get("K8S_TESTBIN", DEFAULT_BIN))


def missing_binaries() -> list[str]:
    """What is not installed (empty when the control plane can start)."""
    missing = [
        str(testbin() / b)
        for b in ("kube-apiserver", "kube-controller-manager")
        if not (testbin() / b).exists()
    ]
    if shutil.which("etcd") is None:
        missing.append("etcd (Debian package etcd-server)")
    return missing


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class LocalControlPlane:
    """Start with `with LocalControlPlane() as cp:`; `cp.api()` gives an API client."""

    controller_manager: bool = True
    work: Path = field(init=False)
    url: str = field(init=False, default="")
    ca_file: Path = field(init=False)
    kubeconfig: Path = field(init=False)
    _procs: list[subprocess.Popen[bytes]] = field(init=False, default_factory=list)

    def __enter__(self) -> LocalControlPlane:
        self.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def start(self, timeout: float = 90.0) -> None:
        """Start etcd, the API server (wait until ready) and the controller-manager."""
        missing = missing_binaries()
        if missing:
            raise ControlPlaneError(
                "missing " + ", ".join(missing) + ": run scripts/install-k8s-testbin.sh"
            )
        base = "/dev/shm" if os.path.isdir("/dev/shm") else None
        self.work = Path(tempfile.mkdtemp(prefix="tpcontrol-k8s-", dir=base))
        pki = self.work / "pki"
        (self.work / "logs").mkdir()
        pki.mkdir()
        ca = Authority.create("tpcontrol-local-ca")
        self.ca_file = ca.write(pki)
        crt, key = ca.issue(
            "kube-apiserver",
            dns=["localhost", "kubernetes", "kubernetes.default", "kubernetes.default.svc"],
            ips=["127.0.0.1", "10.0.0.1"],
        )
        (pki / "apiserver.crt").write_bytes(crt)
        (pki / "apiserver.key").write_bytes(key)
        sa = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        (pki / "sa.key").write_bytes(
            sa.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.TraditionalOpenSSL,
                serialization.NoEncryption(),
            )
        )
        (pki / "sa.pub").write_bytes(
            sa.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )
        (pki / "tokens.csv").write_text(f"{TOKEN},admin,admin-uid,system:masters\n")
        etcd, peer, api = _free_port(), _free_port(), _free_port()
        self.url = f"https://127.0.0.1:{api}"
        try:
            self._spawn(
                "etcd",
                [
                    "etcd",
                    "--name",
                    "local",
                    "--data-dir",
                    str(self.work / "etcd"),
                    "--listen-client-urls",
                    f"http://127.0.0.1:{etcd}",
                    "--advertise-client-urls",
                    f"http://127.0.0.1:{etcd}",
                    "--listen-peer-urls",
                    f"http://127.0.0.1:{peer}",
                    "--initial-advertise-peer-urls",
                    f"http://127.0.0.1:{peer}",
                    "--initial-cluster",
                    f"local=http://127.0.0.1:{peer}",
                    "--log-level",
                    "warn",
                ],
            )
            self._spawn(
                "kube-apiserver",
                [
                    str(testbin() / "kube-apiserver"),
                    f"--etcd-servers=http://127.0.0.1:{etcd}",
                    "--bind-address=127.0.0.1",
                    "--advertise-address=127.0.0.1",
                    f"--secure-port={api}",
                    f"--tls-cert-file={pki}/apiserver.crt",
                    f"--tls-private-key-file={pki}/apiserver.key",
                    f"--client-ca-file={self.ca_file}",
                    f"--token-auth-file={pki}/tokens.csv",
                    "--authorization-mode=RBAC",
                    "--service-cluster-ip-range=10.0.0.0/24",
                    "--service-account-issuer=https://kubernetes.default.svc",
                    f"--service-account-key-file={pki}/sa.pub",
                    f"--service-account-signing-key-file={pki}/sa.key",
                    "--enable-admission-plugins=NamespaceLifecycle,ServiceAccount,"
                    "MutatingAdmissionWebhook,ValidatingAdmissionWebhook",
                    "--allow-privileged=true",
                ],
            )
            self.kubeconfig = self.work / "kubeconfig"
            self.kubeconfig.write_text(
                "apiVersion: v1\nkind: Config\ncurrent-context: local\n"
                f"clusters: [{{name: local, cluster: {{server: '{self.url}', "
                f"certificate-authority: '{self.ca_file}'}}}}]\n"
                f"users: [{{name: admin, user: {{token: {TOKEN}}}}}]\n"
                "contexts: [{name: local, context: {cluster: local, user: admin}}]\n"
            )
            self._wait_ready(timeout)
            if self.controller_manager:
                self._spawn(
                    "kube-controller-manager",
                    [
                        str(testbin() / "kube-controller-manager"),
                        f"--kubeconfig={self.kubeconfig}",
                        "--bind-address=127.0.0.1",
                        "--secure-port=0",
                        "--port=0",
                        "--leader-elect=false",
                        f"--service-account-private-key-file={pki}/sa.key",
                        f"--root-ca-file={self.ca_file}",
                        f"--controllers={CONTROLLERS}",
                    ],
                )
        except BaseException:
            self.stop()
            raise

    def _spawn(self, name: str, args: list[str]) -> None:
        log = (self.work / "logs" / f"{name}.log").open("wb")
        self._procs.append(subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT))

    def _wait_ready(self, timeout: float) -> None:
        context = ssl.create_default_context(cafile=str(self.ca_file))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for proc in self._procs:
                if proc.poll() is not None:
                    name = Path(str(proc.args[0])).name  # type: ignore[index]
                    tail = self.log_tail(name)
                    raise ControlPlaneError(f"{name} exited with {proc.returncode}:\n{tail}")
            request = urllib.request.Request(
                self.url + "/readyz", headers={"Authorization": f"Bearer {TOKEN}"}
            )
            try:
                with urllib.request.urlopen(request, context=context, timeout=2) as response:
                    if response.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.1)
        raise ControlPlaneError(f"kube-apiserver not ready after {timeout:.0f} s")

    def log_tail(self, name: str, lines: int = 20) -> str:
        """The end of a component's log, for error messages."""
        path = self.work / "logs" / f"{name}.log"
        if not path.exists():
            return ""
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self) -> None:
        """Stop everything in reverse order of start and remove the work directory."""
        for proc in reversed(self._procs):
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._procs.clear()
        if hasattr(self, "work"):
            shutil.rmtree(self.work, ignore_errors=True)

    def configuration(self) -> k8s.Configuration:
        """A kubernetes-asyncio configuration for this control plane."""
        config = k8s.Configuration(host=self.url)
        config.ssl_ca_cert = str(self.ca_file)
        config.api_key = {"BearerToken": TOKEN}
        config.api_key_prefix = {"BearerToken": "Bearer"}
        return config

    @asynccontextmanager
    async def api(self) -> AsyncIterator[k8s.ApiClient]:
        """An API client bound to the running event loop."""
        async with k8s.ApiClient(self.configuration()) as client:
            yield client


async def wait_for_service_account(api: k8s.ApiClient, namespace: str, within: float = 30) -> None:
    """Pods are refused until the namespace's `default` ServiceAccount has its token (1.20)."""
    core = k8s.CoreV1Api(api)
    async with asyncio.timeout(within):
        while True:
            try:
                account = await core.read_namespaced_service_account("default", namespace)
                if account.secrets:
                    return
            except k8s.ApiException as exc:
                if exc.status != 404:
                    raise
            await asyncio.sleep(0.1)
