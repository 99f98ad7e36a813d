"""The developer's mounts on the real node: an intercepted pod with a ConfigMap volume, a Secret
volume, an emptyDir the app writes (a 100 MB file among them) and its service-account token;
`tpcontrol intercept -- COMMAND` mounts them with sshfs over the tunnel and the command reads
each under $TELEPRESENCE_ROOT, byte for byte; a second developer mounts the same agent at
once; nothing stays mounted afterwards, and what a killed client left is cleaned up by the
next one."""

from __future__ import annotations

import asyncio
import base64
import signal
import sys
from pathlib import Path
from typing import Any, cast

import pytest
from kubernetes_asyncio import client as k8s

from .cluster_helpers import ClusterUnderTest, has_agent, scratch_namespace, settled
from .helpers import run
from .http_servers import Upstream
from .k8s_helpers import deployment, service, wait_for_pods
from .test_e2e_k8s import echo_container

pytestmark = pytest.mark.timeout(900)

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

            async def developer(header: str) -> tuple[int, str, str]:
                cli = await cluster.tpcontrol(
                    "intercept", "echo", "-n", ns, "--port", "http", "--to", str(dev.port),
                    "--http-header", f"x-dev={header}", "--name", f"echo-{header}",
                    "--wait", "120", "--", sys.executable, "-c", PROBE,
                )  # fmt: skip
                async with asyncio.timeout(300):
                    out, err = await cli.communicate()
                return cli.returncode or 0, out.decode(), err.decode()

            (code_a, out_a, err_a), (code_b, out_b, err_b) = await asyncio.gather(
                developer("alice"), developer("bob")
            )
            for code, out, err in ((code_a, out_a, err_a), (code_b, out_b, err_b)):
                assert code == 0, err[-3000:] + out[-3000:]
                lines = dict(line.split("=", 1) for line in out.splitlines() if "=" in line)
                assert lines["greeting"] == "hello from the ConfigMap", out
                assert lines["password"] == "s3cr3t"
                assert lines["first"] == "first"
                assert lines["later"] == "later"  # written by the app after the mount
                assert lines["token"] == "jwt"
                assert lines["big"] == "intact"
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
                "--http-header", "x-dev=carol", "--name", "echo-carol", "--wait", "120",
            )  # fmt: skip
            assert killed.stdout is not None
            said = ""
            async with asyncio.timeout(180):
                while "mounted at" not in said:
                    line = await killed.stdout.readline()
                    assert line, said
                    said += line.decode()
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
                "--http-header", "x-dev=erin", "--name", "echo-erin", "--wait", "120",
            )  # fmt: skip
            assert erin.stdout is not None
            said = ""
            try:
                async with asyncio.timeout(180):
                    while "mounted at" not in said:
                        line = await erin.stdout.readline()
                        assert line, said
                        said += line.decode()
                assert len(fuse_mounts()) == 1
                (pod,) = [p for p in await wait_for_pods(api, ns, "app=echo", 1) if has_agent(p)]
                await core.delete_namespaced_pod(pod["metadata"]["name"], ns)
                async with asyncio.timeout(120):
                    while "ended" not in said:
                        line = await erin.stdout.readline()
                        assert line, said
                        said += line.decode()
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

    run(scenario(), timeout=800)
