"""A real Kubernetes control plane: etcd, kube-apiserver, kube-controller-manager (and, for a
cluster with a node, kube-scheduler).

On its own (the tests of the control modules that need no pods) it runs on loopback, every port
chosen by binding port 0, with no scheduler and no node controllers. `LocalCluster` runs it inside
the cluster's network namespace on the node's address, with Node authorization for the kubelet,
the node-lifecycle controller and the scheduler. The binaries come from
`scripts/install-k8s-testbin.sh` (K8S_TESTBIN, default ~/.cache/k8s-testbin/v1.20.2) and Debian's
etcd; certificates are made with `cryptography`; processes stop in order (API server before etcd).
"""

from __future__ import annotations

import asyncio
import base64
import datetime
import os
import secrets
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
from typing import Self

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from kubernetes_asyncio import client as k8s

from tpcontrol.certs import Authority, cert_pem, key_pem, new_key

DEFAULT_BIN = Path.home() / ".cache/k8s-testbin/v1.20.2"
CONTROLLERS = (
    "*,-nodeipam,-nodelifecycle,-attachdetach,-persistentvolume-binder,"
    "-persistentvolume-expander,-cloud-node-lifecycle,-route,-service,-ttl"
)
# With a node: node-lifecycle removes the not-ready taint; nodeipam stays off (the CNI config
# holds the pod range).
NODE_CONTROLLERS = (
    "*,-nodeipam,-attachdetach,-persistentvolume-binder,-persistentvolume-expander,"
    "-cloud-node-lifecycle,-route,-service,-ttl"
)


class ControlPlaneError(RuntimeError):
    """The control plane cannot be started; the message says what is missing or what failed."""


def testbin() -> Path:
    """Where the API server and controller-manager binaries are expected."""
    return Path(os.environ.get("K8S_TESTBIN", DEFAULT_BIN))


NODE_BINARIES = ("kube-scheduler", "kubelet", "kube-proxy", "pause")
# The static-token identities (user,uid,groups) of a cluster's programs; NODE is the node's name.
IDENTITIES = {
    "admin": "admin,admin-uid,system:masters",
    "kubelet": "system:node:NODE,node-uid,system:nodes",
    "proxy": "system:kube-proxy,proxy-uid",
    "scheduler": "system:kube-scheduler,scheduler-uid",
    "dns": "system:tpcontrol-dns,dns-uid",  # may only read Services and Endpoints (cluster.py)
    # Developers for the demo and the tests: users with a token and no grant of their own.
    "alice": "alice,alice-uid,developers",
    "bob": "bob,bob-uid,developers",
}


def missing_binaries(node_binaries: tuple[str, ...] = ()) -> list[str]:
    """What is not installed (empty when the control plane can start); with `NODE_BINARIES`,
    what a cluster with a node lacks."""
    missing = [
        str(testbin() / b)
        for b in ("kube-apiserver", "kube-controller-manager", *node_binaries)
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


@dataclass(frozen=True)
class NodeAccess:
    """What a control plane needs to serve a real node: the node's name (its kubelet's identity
    under Node authorization), where its kubelet is, the Service range, and the command prefix
    that puts the control plane's processes in the cluster's network namespace."""

    node_name: str
    host: str
    prefix: tuple[str, ...]
    work: Path
    service_cidr: str = "10.96.0.0/24"
    kubernetes_ip: str = "10.96.0.1"


class Started:
    """`with thing:` starts it and stops it again, however the block ends (the control plane
    and the whole cluster both run this way)."""

    def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


@dataclass
class LocalControlPlane(Started):
    """Start with `with LocalControlPlane() as cp:`; `cp.api()` gives an API client."""

    controller_manager: bool = True
    node: NodeAccess | None = None
    work: Path = field(init=False)
    url: str = field(init=False, default="")
    ca_file: Path = field(init=False)
    authority: Authority = field(init=False)  # the cluster CA: serving and client certificates
    kubeconfig: Path = field(init=False)
    _procs: list[subprocess.Popen[bytes]] = field(init=False, default_factory=list)
    _names: dict[int, str] = field(init=False, default_factory=dict)
    tokens: dict[str, str] = field(init=False, default_factory=dict)

    def start(self, timeout: float = 90.0) -> None:
        """Start etcd, the API server (wait until ready) and the controller-manager."""
        missing = missing_binaries()
        if missing:
            raise ControlPlaneError(
                "missing " + ", ".join(missing) + ": run scripts/install-k8s-testbin.sh"
            )
        node = self.node
        if node is None:
            base = "/dev/shm" if os.path.isdir("/dev/shm") else None
            self.work = Path(tempfile.mkdtemp(prefix="tpcontrol-k8s-", dir=base))
        else:
            self.work = node.work
            self.work.mkdir(parents=True, exist_ok=True)
        host = node.host if node else "127.0.0.1"
        pki = self.work / "pki"
        (self.work / "logs").mkdir()
        pki.mkdir()
        ca = self.authority = Authority.create("tpcontrol-local-ca")
        self.ca_file = ca.write(pki)
        (pki / "ca.key").write_bytes(key_pem(ca.key))
        crt, key = ca.issue(
            "kube-apiserver",
            dns=[
                "localhost", "kubernetes", "kubernetes.default", "kubernetes.default.svc",
                "kubernetes.default.svc.cluster.local",
            ],
            ips=["127.0.0.1", host, node.kubernetes_ip if node else "10.0.0.1"],
        )  # fmt: skip
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
        # Fresh tokens at every start: the API server is reachable from the host's users and
        # from pods, and whoever has the admin token could run a privileged pod.
        self.tokens = {user: secrets.token_urlsafe(32) for user in IDENTITIES}
        users = IDENTITIES if node else {"admin": IDENTITIES["admin"]}
        tokens = [f"{self.tokens[u]},{identity}" for u, identity in users.items()]
        if node:
            tokens = [t.replace("NODE", node.node_name) for t in tokens]
            client_crt, client_key = client_certificate(
                ca, "kube-apiserver-kubelet-client", "system:masters"
            )
            (pki / "kubelet-client.crt").write_bytes(client_crt)
            (pki / "kubelet-client.key").write_bytes(client_key)
        (pki / "tokens.csv").write_text("\n".join(tokens) + "\n")
        if node:  # its own namespace: fixed ports cannot collide with the host's
            etcd, peer, api = 2379, 2380, 6443
        else:
            etcd, peer, api = _free_port(), _free_port(), _free_port()
        self.url = f"https://{host}:{api}"
        prefix = list(node.prefix) if node else []
        node_flags = []
        if node:
            node_flags = [
                "--authorization-mode=Node,RBAC",
                "--enable-admission-plugins=NamespaceLifecycle,ServiceAccount,NodeRestriction,"
                "MutatingAdmissionWebhook,ValidatingAdmissionWebhook",
                "--kubelet-preferred-address-types=InternalIP",
                f"--kubelet-client-certificate={pki}/kubelet-client.crt",
                f"--kubelet-client-key={pki}/kubelet-client.key",
                "--insecure-port=0",
            ]
        try:
            self.spawn(
                "etcd",
                [
                    *prefix,
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
            self.spawn(
                "kube-apiserver",
                [
                    *prefix,
                    str(testbin() / "kube-apiserver"),
                    f"--etcd-servers=http://127.0.0.1:{etcd}",
                    f"--bind-address={host}",
                    f"--advertise-address={host}",
                    f"--secure-port={api}",
                    f"--tls-cert-file={pki}/apiserver.crt",
                    f"--tls-private-key-file={pki}/apiserver.key",
                    f"--client-ca-file={self.ca_file}",
                    f"--token-auth-file={pki}/tokens.csv",
                    *(node_flags or ["--authorization-mode=RBAC"]),
                    f"--service-cluster-ip-range={node.service_cidr if node else '10.0.0.0/24'}",
                    "--service-account-issuer=https://kubernetes.default.svc",
                    f"--service-account-key-file={pki}/sa.pub",
                    f"--service-account-signing-key-file={pki}/sa.key",
                    *(
                        []
                        if node
                        else [
                            "--enable-admission-plugins=NamespaceLifecycle,ServiceAccount,"
                            "MutatingAdmissionWebhook,ValidatingAdmissionWebhook"
                        ]
                    ),
                    "--allow-privileged=true",
                ],
            )
            self.kubeconfig = self.write_kubeconfig("kubeconfig", "admin", self.tokens["admin"])
            self._wait_ready(timeout)
            if self.controller_manager:
                self.spawn(
                    "kube-controller-manager",
                    [
                        *prefix,
                        str(testbin() / "kube-controller-manager"),
                        f"--kubeconfig={self.kubeconfig}",
                        "--bind-address=127.0.0.1",
                        "--secure-port=0",
                        "--port=0",
                        "--leader-elect=false",
                        f"--service-account-private-key-file={pki}/sa.key",
                        f"--root-ca-file={self.ca_file}",
                        f"--controllers={NODE_CONTROLLERS if node else CONTROLLERS}",
                    ],
                )
            if node:
                scheduler = self.write_kubeconfig(
                    "kubeconfig-scheduler", "scheduler", self.tokens["scheduler"]
                )
                self.spawn(
                    "kube-scheduler",
                    [
                        *prefix,
                        str(testbin() / "kube-scheduler"),
                        f"--kubeconfig={scheduler}",
                        "--leader-elect=false",
                        "--bind-address=127.0.0.1",
                        "--secure-port=0",
                        "--port=0",
                    ],
                )
        except BaseException:
            self.stop()
            raise

    def write_kubeconfig(
        self, name: str, user: str, bearer: str, where: Path | None = None
    ) -> Path:
        """A kubeconfig for this control plane that authenticates with a token (a static one,
        or a service account's), written as `name` in the work directory (or `where`)."""
        return self._kubeconfig((where or self.work) / name, user, f"{{token: {bearer}}}")

    def write_certificate_kubeconfig(
        self, name: str, user: str, group: str, where: Path | None = None
    ) -> Path:
        """A kubeconfig whose user is a client certificate of this cluster's CA for `user` in
        `group`: the kind of user kubeadm and kind make."""
        cert, key = client_certificate(self.authority, user, group)
        data = (
            f"{{client-certificate-data: {base64.b64encode(cert).decode()}, "
            f"client-key-data: {base64.b64encode(key).decode()}}}"
        )
        return self._kubeconfig((where or self.work) / name, user, data)

    def _kubeconfig(self, path: Path, user: str, credential: str) -> Path:
        path.write_text(
            "apiVersion: v1\nkind: Config\ncurrent-context: local\n"
            f"clusters: [{{name: local, cluster: {{server: '{self.url}', "
            f"certificate-authority: '{self.ca_file}'}}}}]\n"
            f"users: [{{name: {user}, user: {credential}}}]\n"
            f"contexts: [{{name: local, context: {{cluster: local, user: {user}}}}}]\n"
        )
        path.chmod(0o600)
        return path

    def spawn(self, name: str, args: list[str]) -> subprocess.Popen[bytes]:
        """Start one of the cluster's programs, logging to `logs/NAME.log`; stopped by `stop`
        in reverse order of start."""
        with (self.work / "logs" / f"{name}.log").open("wb") as log:
            proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
        self._procs.append(proc)
        self._names[proc.pid] = name
        return proc

    def _wait_ready(self, timeout: float) -> None:
        context = ssl.create_default_context(cafile=str(self.ca_file))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for proc in self._procs:
                if proc.poll() is not None:
                    name = self._names.get(proc.pid, "?")
                    tail = self.log_tail(name)
                    raise ControlPlaneError(f"{name} exited with {proc.returncode}:\n{tail}")
            request = urllib.request.Request(
                self.url + "/readyz", headers={"Authorization": f"Bearer {self.tokens['admin']}"}
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
        if hasattr(self, "work") and self.node is None:  # a cluster removes its own tree
            shutil.rmtree(self.work, ignore_errors=True)

    def configuration(self) -> k8s.Configuration:
        """A kubernetes-asyncio configuration for this control plane."""
        config = k8s.Configuration(host=self.url)
        config.ssl_ca_cert = str(self.ca_file)
        config.api_key = {"BearerToken": self.tokens["admin"]}
        config.api_key_prefix = {"BearerToken": "Bearer"}
        return config

    @asynccontextmanager
    async def api(self) -> AsyncIterator[k8s.ApiClient]:
        """An API client bound to the running event loop."""
        async with k8s.ApiClient(self.configuration()) as client:
            yield client


def client_certificate(ca: Authority, name: str, group: str) -> tuple[bytes, bytes]:
    """A client certificate (PEM cert, key) for `name` in `group`, signed by the cluster's CA:
    the API server's identity towards the kubelet, a developer's in the demo."""
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, group),
            x509.NameAttribute(NameOID.COMMON_NAME, name),
        ]
    )
    return client_certificate_for(ca, subject)


def client_certificate_for(ca: Authority, subject: x509.Name) -> tuple[bytes, bytes]:
    """A client certificate (PEM cert, key) with this subject, signed by the cluster's CA."""
    key = new_key()
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .sign(ca.key, hashes.SHA256())
    )
    return cert_pem(cert), key_pem(key)


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
