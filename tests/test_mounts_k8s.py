"""The developer's mounts on the real node: an intercepted pod with a ConfigMap volume, a Secret
volume, an emptyDir the app writes (a 100 MB file among them) and its service-account token;
`tpcontrol intercept -- COMMAND` mounts them with sshfs over the tunnel and the command reads
each under $TELEPRESENCE_ROOT, byte for byte; a second developer mounts the same agent at
once; nothing stays mounted afterwards, and what a killed client left is cleaned up by the
next one."""

from __future__ import annotations

import asyncio
import base64
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any, cast

import pytest
from kubernetes_asyncio import client as k8s

from .cluster_helpers import ClusterUnderTest, answers, has_agent, scratch_namespace, settled
from .helpers import free_port, run
from .http_servers import Upstream
from .k8s_helpers import deployment, service, wait_for_pods
from .test_e2e_k8s import echo_container

pytestmark = pytest.mark.timeout(1300)

# The app writes a first file, a 100 MB file with its hash, and a file a few seconds later.
APP_START = (
    "echo first > /data/first.txt && head -c 100000000 /dev/urandom > /data/big.bin && "
    "sha256sum /data/big.bin | cut -d' ' -f1 > /data/big.sha256 && "
    "(sleep 4; echo later > /data/later.txt) & exec python /examples/http_echo.py --port 8080"
)

PROBE = r"""
import hashlib, os, sys, time
root = os.environ["TELEPRESENCE_ROOT"]
def read(path):
    with open(root + path, "rb") as f:
        return f.read()
print("mounts=" + os.environ.get("TELEPRESENCE_MOUNTS", "?"))
print("greeting=" + read("/etc/config/greeting").decode())
print("password=" + read("/etc/secret/password").decode())
print("first=" + read("/data/first.txt").decode().strip())
deadline = time.monotonic() + 60
while not os.path.exists(root + "/data/later.txt") and time.monotonic() < deadline:
    time.sleep(0.2)
print("later=" + read("/data/later.txt").decode().strip())
token = read("/var/run/secrets/kubernetes.io/serviceaccount/token")
print("token=" + ("jwt" if token.count(b".") == 2 else repr(token[:20])))
if sys.argv[1:] == ["big"]:
    digest = hashlib.sha256(read("/data/big.bin")).hexdigest()
    print("big=" + ("intact" if digest == read("/data/big.sha256").decode().strip() else digest))
try:
    with open(root + "/etc/config/greeting", "w") as f:
        f.write("overwritten")
    print("readonly=WRITTEN")
except OSError as exc:
    print("readonly=refused " + type(exc).__name__)
with open(root + "/data/from-developer.txt", "w") as f:
    f.write("hello app")
print("private=" + str(os.path.exists(root + "/var/run/secrets/tpproxy")))
"""


async def deploy_with_volumes(
    cluster: ClusterUnderTest, api: k8s.ApiClient, ns: str, greeting_env: str = "hi"
) -> None:
    """The echo workload with a ConfigMap, a Secret and an emptyDir (and GREETING in its
    environment), once its pod is ready."""
    core = k8s.CoreV1Api(api)
    await core.create_namespaced_config_map(ns, cast(Any, {
        "metadata": {"name": "settings"}, "data": {"greeting": "hello from the ConfigMap"},
    }))  # fmt: skip
    await core.create_namespaced_secret(ns, cast(Any, {
        "metadata": {"name": "creds"},
        "data": {"password": base64.b64encode(b"s3cr3t").decode()},
    }))  # fmt: skip
    container = echo_container(
        cluster, "http_echo", 8080, ports=[{"name": "http", "containerPort": 8080}],
        readinessProbe={"httpGet": {"path": "/healthz", "port": "http"},
                        "periodSeconds": 1},
        volumeMounts=[
            {"name": "settings", "mountPath": "/etc/config", "readOnly": True},
            {"name": "creds", "mountPath": "/etc/secret", "readOnly": True},
            {"name": "data", "mountPath": "/data"},
        ],
    )  # fmt: skip
    container["command"] = ["sh", "-c", APP_START]
    container.pop("args")
    container["env"].append({"name": "GREETING", "value": greeting_env})
    workload = deployment("echo", [container])
    workload["spec"]["template"]["spec"]["volumes"] = [
        {"name": "settings", "configMap": {"name": "settings"}},
        {"name": "creds", "secret": {"secretName": "creds"}},
        {"name": "data", "emptyDir": {}},
    ]
    await k8s.AppsV1Api(api).create_namespaced_deployment(ns, cast(Any, workload))
    await core.create_namespaced_service(
        ns, cast(Any, service("echo", [{"name": "http", "port": 80, "targetPort": "http"}]))
    )
    await wait_for_pods(api, ns, "app=echo", 1, settled(agent=False), within=120)


async def until_said(proc: asyncio.subprocess.Process, text: str, within: float) -> str:
    """What `proc` prints until a line holds `text`; its stderr in the failure if it ends first."""
    assert proc.stdout is not None
    said = ""
    async with asyncio.timeout(within):
        while text not in said:
            line = await proc.stdout.readline()
            if not line:
                err = await proc.stderr.read() if proc.stderr is not None else b""
                raise AssertionError(said + err.decode())
            said += line.decode()
    return said


def fuse_mounts() -> list[str]:
    return [
        line.split(" ")[1]
        for line in Path("/proc/mounts").read_text().splitlines()
        if " fuse.sshfs " in line and "tpcontrol-mount-" in line
    ]


async def sshfs_processes() -> list[str]:
    proc = await asyncio.create_subprocess_exec(
        "pgrep", "-a", "sshfs", stdout=asyncio.subprocess.PIPE
    )
    out, _ = await proc.communicate()
    return [line for line in out.decode().splitlines() if "tpcontrol-mount-" in line]


def test_developer_reads_the_containers_files_through_the_mount(
    cluster: ClusterUnderTest,
) -> None:
    async def scenario() -> None:
        dev = await Upstream("dev").start()
        async with cluster.cluster.api() as api, scratch_namespace(api, "mnt") as ns:
            core = k8s.CoreV1Api(api)
            await deploy_with_volumes(cluster, api, ns)

            async def developer(header: str, *probe_args: str) -> tuple[int, str, str]:
                cli = await cluster.tpcontrol(
                    "intercept", "echo", "-n", ns, "--port", "http", "--to", str(dev.port),
                    "--http-header", f"x-dev={header}", "--name", f"echo-{header}",
                    "--wait", "240", "--", sys.executable, "-c", PROBE, *probe_args,
                )  # fmt: skip
                async with asyncio.timeout(300):
                    out, err = await cli.communicate()
                return cli.returncode or 0, out.decode(), err.decode()

            # Two developers at once; alice also reads the 100 MB file.
            (code_a, out_a, err_a), (code_b, out_b, err_b) = await asyncio.gather(
                developer("alice", "big"), developer("bob")
            )
            assert "big=intact" in out_a, out_a
            for code, out, err in ((code_a, out_a, err_a), (code_b, out_b, err_b)):
                assert code == 0, err[-3000:] + out[-3000:]
                lines = dict(line.split("=", 1) for line in out.splitlines() if "=" in line)
                assert lines["greeting"] == "hello from the ConfigMap", out
                assert lines["password"] == "s3cr3t"
                assert lines["first"] == "first"
                assert lines["later"] == "later"  # written by the app after the mount
                assert lines["token"] == "jwt"
                assert lines["readonly"].startswith("refused"), out
                assert lines["private"] == "False"  # the agent's own credential is not exported
                assert "/etc/config" in lines["mounts"]
                assert "/var/run/secrets/kubernetes.io" in lines["mounts"]
                assert "mounted at" in out
            pods = await wait_for_pods(api, ns, "app=echo", 1, settled(agent=True), within=60)
            assert any(has_agent(p) for p in pods)
            assert fuse_mounts() == []
            assert await sshfs_processes() == []

            # A client killed with its mount up leaves a dead mount; the next one removes it.
            killed = await cluster.tpcontrol(
                "intercept", "echo", "-n", ns, "--port", "http", "--to", str(dev.port),
                "--http-header", "x-dev=carol", "--name", "echo-carol", "--wait", "240",
            )  # fmt: skip
            await until_said(killed, "mounted at", 300)
            killed.send_signal(signal.SIGKILL)
            await killed.wait()
            async with asyncio.timeout(20):
                while await sshfs_processes():
                    await asyncio.sleep(0.1)
            assert len(fuse_mounts()) == 1  # dead, still in /proc/mounts
            code, out, err = await developer("dave")
            assert code == 0, err[-3000:]
            assert fuse_mounts() == []

            # The pod is deleted under a mounted client: the mount ends with it, nothing stays;
            # then Ctrl-C leaves as usual.
            erin = await cluster.tpcontrol(
                "intercept", "echo", "-n", ns, "--port", "http", "--to", str(dev.port),
                "--http-header", "x-dev=erin", "--name", "echo-erin", "--wait", "240",
            )  # fmt: skip
            try:
                said = await until_said(erin, "mounted at", 300)
                assert len(fuse_mounts()) == 1
                (pod,) = [p for p in await wait_for_pods(api, ns, "app=echo", 1) if has_agent(p)]
                await core.delete_namespaced_pod(pod["metadata"]["name"], ns)
                said += await until_said(erin, "ended", 120)
                assert fuse_mounts() == []
                assert await sshfs_processes() == []
                erin.send_signal(signal.SIGINT)
                async with asyncio.timeout(30):
                    rest, _ = await erin.communicate()
                assert erin.returncode == 0, said + rest.decode()
            finally:
                if erin.returncode is None:
                    erin.kill()
                    await erin.wait()
        dev.close()

    run(scenario(), timeout=1200)


# The local version as a container: it answers with what it got from the cluster.
CONTAINER_APP = r"""
import http.server, os
class Answer(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        greeting = open("/etc/config/greeting").read()
        body = f"container {os.environ.get('GREETING')} {greeting} {open('/etc/secret/password').read()}"
        self.send_response(200)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body.encode())
http.server.HTTPServer(("0.0.0.0", 8080), Answer).serve_forever()
"""


def test_docker_run_gets_the_environment_mounts_and_requests(
    cluster: ClusterUnderTest, tmp_path: Path
) -> None:
    if shutil.which("podman") is None and shutil.which("docker") is None:
        pytest.skip("neither podman nor docker is installed")

    async def scenario() -> None:
        conf = tmp_path / "containers.conf"
        conf.write_text("[containers]\ndefault_ulimits = []\n")  # this machine's rlimits
        env = {**cluster.env, "CONTAINERS_CONF": str(conf), "TPCONTROL_CONTAINER_ENGINE": "podman"}
        async with cluster.cluster.api() as api, scratch_namespace(api, "run") as ns:
            await deploy_with_volumes(cluster, api, ns, greeting_env="from the cluster")
            local_port = free_port()
            cli = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "tpcontrol", "intercept", "echo", "-n", ns,
                "--port", "http", "--to", str(local_port), "--http-header", "x-dev=alice",
                "--docker-run", "--", cluster.images.examples.ref, "python", "-c", CONTAINER_APP,
                env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            )  # fmt: skip
            name = ""
            try:
                said = await until_said(cli, "running the local version as container", 180)
                name = said.split("as container ")[1].split()[0]
                svc = await k8s.CoreV1Api(api).read_namespaced_service("echo", ns)
                body = ""
                async with asyncio.timeout(90):
                    while not body.startswith("container"):
                        try:
                            body = await answers(
                                cluster.network, svc.spec.cluster_ip, 80, "/", **{"x-dev": "alice"}
                            )
                        except (OSError, AssertionError):
                            await asyncio.sleep(0.5)
                assert body == "container from the cluster hello from the ConfigMap s3cr3t"
                plain = await answers(cluster.network, svc.spec.cluster_ip, 80, "/")
                assert plain.startswith("served by"), plain  # everyone else: the app
                cli.send_signal(signal.SIGINT)
                async with asyncio.timeout(60):
                    await cli.communicate()
                ps = await asyncio.create_subprocess_exec(
                    "podman", "ps", "-a", "--format", "{{.Names}}", env=env,
                    stdout=asyncio.subprocess.PIPE,
                )  # fmt: skip
                names, _ = await ps.communicate()
                assert name not in names.decode().split()  # stopped and removed
                assert fuse_mounts() == []
            finally:
                if cli.returncode is None:
                    cli.kill()
                    await cli.wait()
                if name:  # a failed test leaves no container behind either
                    rm = await asyncio.create_subprocess_exec("podman", "rm", "-f", name, env=env)
                    await rm.wait()

    run(scenario(), timeout=400)


def test_the_next_docker_run_removes_what_a_killed_client_left(
    cluster: ClusterUnderTest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A client killed while its container ran leaves it running: its name carries the dead
    client's pid, and the next `--docker-run` removes it (live clients' are left alone)."""
    if shutil.which("podman") is None:
        pytest.skip("podman is not installed")
    from tpcontrol.client.container import remove_stale

    conf = tmp_path / "containers.conf"
    conf.write_text("[containers]\ndefault_ulimits = []\n")
    env = {**os.environ, "CONTAINERS_CONF": str(conf)}
    dead = f"tpcontrol-echo-http-{2**22 + 12345}"  # above pid_max's default: never a live pid
    live = f"tpcontrol-echo-http-{os.getpid()}"
    for name in (dead, live):
        subprocess.run(["podman", "rm", "-f", name], env=env, capture_output=True, timeout=60)
        subprocess.run(
            ["podman", "create", "--name", name, cluster.images.examples.ref, "true"],
            env=env, capture_output=True, timeout=60, check=True,
        )  # fmt: skip
    monkeypatch.setenv("CONTAINERS_CONF", str(conf))
    try:
        assert remove_stale("podman") == [dead]
        names = subprocess.run(
            ["podman", "ps", "-a", "--format", "{{.Names}}"], env=env, capture_output=True,
            text=True, timeout=60, check=True,
        ).stdout.split()  # fmt: skip
        assert dead not in names
        assert live in names
    finally:
        subprocess.run(["podman", "rm", "-f", live], env=env, capture_output=True, timeout=60)
