"""The local node on a real API server: pods bound and run from the spec the API server holds,
their status patched back, volumes kept current, the Service path, failures with reasons, and a
clean exit that leaves nothing behind (the runner's own namespaces only, ever)."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any, cast

from kubernetes_asyncio import client as k8s

from tpcontrol.localcluster import LocalControlPlane
from tpcontrol.node.netns import namespaces, processes_in

from .helpers import run
from .k8s_helpers import LABEL, deployment, make_namespace, service, unique
from .node_helpers import (
    Json,
    alive,
    answers,
    environ_of,
    phase,
    read_in_container,
    ready,
    require_root,
    running_node,
    wait_for_pod,
)

ECHO = "tpcontrol.example/http-echo:1"


def echo_container(name: str = "main", port: int = 8080, *args: str) -> Json:
    return {
        "name": name,
        "image": ECHO,
        "args": ["--port", str(port), *args],
        "ports": [{"name": "http", "containerPort": port}],
        "env": [{"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}],
        "readinessProbe": {"httpGet": {"path": "/healthz", "port": "http"}, "periodSeconds": 1},
    }


def pod(name: str, containers: list[Json], **spec: Any) -> Json:
    return {
        "metadata": {"name": name, "labels": {"app": name}},
        "spec": {"containers": containers, **spec},
    }


def root_network() -> tuple[str, str, str]:
    """The host namespace's interfaces, addresses and routes, to prove they are never touched."""

    def ip(*args: str) -> str:
        return subprocess.run(["ip", *args], capture_output=True, text=True, check=True).stdout

    links = "\n".join(sorted(line.split("link/")[0] for line in ip("-o", "link").splitlines()))
    return links, ip("-o", "addr"), ip("route")


def test_a_pod_runs_as_its_spec_says_and_sees_its_configmap_change(
    control_plane: LocalControlPlane,
) -> None:
    require_root()

    async def scenario() -> None:
        async with control_plane.api() as api:
            core = k8s.CoreV1Api(api)
            ns = await make_namespace(api, unique("node"))
            await core.create_namespaced_config_map(
                ns, cast(Any, {"metadata": {"name": "cfg"}, "data": {"greeting": "hello"}})
            )
            container = echo_container("main", 8080, "--name", "$(GREETING)-$(POD_NAME)")
            container["env"] = [
                *container["env"],
                {
                    "name": "GREETING",
                    "valueFrom": {"configMapKeyRef": {"name": "cfg", "key": "greeting"}},
                },
                {"name": "MY_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
            ]
            container["volumeMounts"] = [
                {"name": "cfg", "mountPath": "/etc/tpnode-test-cfg"},
                {"name": "info", "mountPath": "/etc/tpnode-test-info"},
            ]
            volumes = [
                {"name": "cfg", "configMap": {"name": "cfg"}},
                {
                    "name": "info",
                    "downwardAPI": {
                        "items": [{"path": "labels", "fieldRef": {"fieldPath": "metadata.labels"}}]
                    },
                },
            ]
            async with running_node(api, ns) as node:
                await core.create_namespaced_pod(
                    ns, cast(Any, pod("web", [container], volumes=volumes))
                )
                seen = await wait_for_pod(api, ns, "web", ready)
                status = seen["status"]
                assert seen["spec"]["nodeName"] == node.name
                assert status["phase"] == "Running"
                assert status["hostIP"] == node.network.node_ip
                assert ipaddress.ip_address(status["podIP"]) in node.network.subnet
                (state,) = status["containerStatuses"]
                assert state["ready"]
                assert "running" in state["state"]

                body = await answers(node.network.node_ns, status["podIP"], 8080, "/x")
                assert body.startswith("served by hello-web on port 8080: GET /x"), body

                worker = node.workers[(ns, "web")]
                assert worker.containers[0].process is not None
                pid = worker.containers[0].process.pid
                assert environ_of(pid)["MY_IP"] == status["podIP"]
                assert read_in_container(pid, "/etc/tpnode-test-cfg/greeting") == "hello"
                assert 'app="web"' in read_in_container(pid, "/etc/tpnode-test-info/labels")
                assert not await asyncio.to_thread(Path("/etc/tpnode-test-cfg/greeting").exists)

                await core.patch_namespaced_config_map("cfg", ns, {"data": {"greeting": "bye"}})
                async with asyncio.timeout(20):
                    while read_in_container(pid, "/etc/tpnode-test-cfg/greeting") != "bye":
                        await asyncio.sleep(0.1)
                netns = worker.netns
                assert netns in namespaces()
            assert netns not in namespaces()
            assert not alive(pid)
            assert not await asyncio.to_thread(Path("/etc/tpnode-test-cfg").exists)  # removed

    run(scenario(), timeout=120)


def test_pods_that_cannot_start_fail_with_the_reason_and_others_keep_serving(
    control_plane: LocalControlPlane,
) -> None:
    require_root()

    async def scenario() -> None:
        async with control_plane.api() as api:
            core = k8s.CoreV1Api(api)
            ns = await make_namespace(api, unique("node"))
            async with running_node(api, ns) as node:
                await core.create_namespaced_pod(ns, cast(Any, pod("good", [echo_container()])))
                missing = {"name": "main", "image": ECHO, "command": ["no-such-command-tp"]}
                unknown = {"name": "main", "image": "registry.example/nothing:1"}
                failing_init = {
                    "name": "init",
                    "image": ECHO,
                    "command": ["sh", "-c", "echo the init broke >&2; exit 3"],
                }
                bad_ref = {
                    **echo_container(),
                    "env": [
                        {
                            "name": "X",
                            "valueFrom": {"configMapKeyRef": {"name": "absent", "key": "k"}},
                        }
                    ],
                }
                for _name, spec in (
                    ("missing", pod("missing", [missing])),
                    ("unknown", pod("unknown", [unknown])),
                    ("init", pod("init", [echo_container()], initContainers=[failing_init])),
                    ("badref", pod("badref", [bad_ref])),
                ):
                    await core.create_namespaced_pod(ns, cast(Any, spec))

                failed = {
                    name: (await wait_for_pod(api, ns, name, phase("Failed")))["status"]
                    for name in ("missing", "unknown", "init")
                }
                state = failed["missing"]["containerStatuses"][0]["state"]["terminated"]
                assert state["reason"] == "StartError"
                assert '"no-such-command-tp": executable file not found' in state["message"]
                assert failed["missing"]["reason"] == "StartError"
                assert failed["unknown"]["reason"] == "ErrImagePull"
                assert "registry.example/nothing:1" in failed["unknown"]["message"]
                assert failed["init"]["reason"] == "InitContainerFailed"
                assert "exited with 3" in failed["init"]["message"]
                assert "the init broke" in failed["init"]["message"]
                init_state = failed["init"]["initContainerStatuses"][0]["state"]["terminated"]
                assert init_state["exitCode"] == 3

                # A missing ConfigMap is waited for, as the kubelet does, then the pod runs.
                def waiting(p: Json) -> bool:
                    return (p.get("status") or {}).get("reason") == "CreateContainerConfigError"

                pending = (await wait_for_pod(api, ns, "badref", waiting))["status"]
                assert pending["phase"] == "Pending"
                assert "configMap 'absent' not found" in pending["message"]
                (state,) = pending["containerStatuses"]
                assert state["state"]["waiting"]["reason"] == "CreateContainerConfigError"
                await core.create_namespaced_config_map(
                    ns, cast(Any, {"metadata": {"name": "absent"}, "data": {"k": "v"}})
                )
                late = await wait_for_pod(api, ns, "badref", ready)
                assert "reason" not in late["status"]

                good = await wait_for_pod(api, ns, "good", ready)
                body = await answers(node.network.node_ns, good["status"]["podIP"], 8080)
                assert body.startswith("served by")

    run(scenario(), timeout=120)


def test_containers_restart_by_policy(control_plane: LocalControlPlane) -> None:
    require_root()

    async def scenario() -> None:
        async with control_plane.api() as api:
            core = k8s.CoreV1Api(api)
            ns = await make_namespace(api, unique("node"))
            crash = {"name": "main", "image": ECHO, "command": ["sh", "-c", "exit 4"]}
            done = {"name": "main", "image": ECHO, "command": ["true"]}
            async with running_node(api, ns):
                await core.create_namespaced_pod(ns, cast(Any, pod("crash", [crash])))
                await core.create_namespaced_pod(
                    ns, cast(Any, pod("done", [done], restartPolicy="Never"))
                )

                def restarted(p: Json) -> bool:
                    states = (p.get("status") or {}).get("containerStatuses") or []
                    return bool(states) and states[0]["restartCount"] >= 1

                crashed = await wait_for_pod(api, ns, "crash", restarted, within=30)
                (state,) = crashed["status"]["containerStatuses"]
                assert state["lastState"]["terminated"]["exitCode"] == 4
                assert crashed["status"]["phase"] == "Running"
                finished = await wait_for_pod(api, ns, "done", phase("Succeeded"))
                (state,) = finished["status"]["containerStatuses"]
                assert state["state"]["terminated"]["exitCode"] == 0

    run(scenario(), timeout=90)


def test_services_reach_ready_pods_by_cluster_ip_and_by_name_from_a_pod(
    control_plane: LocalControlPlane,
) -> None:
    require_root()

    async def scenario() -> None:
        async with control_plane.api() as api:
            core, apps = k8s.CoreV1Api(api), k8s.AppsV1Api(api)
            ns = await make_namespace(api, unique("node"))
            async with running_node(api, ns) as node:
                await apps.create_namespaced_deployment(
                    ns, cast(Any, deployment("web", [echo_container("web", 8080)], replicas=2))
                )
                created = await core.create_namespaced_service(
                    ns,
                    cast(Any, service("web", [{"name": "http", "port": 80, "targetPort": "http"}])),
                )
                cluster_ip = created.spec.cluster_ip
                names: set[str] = set()
                async with asyncio.timeout(60):
                    while len(names) < 2:  # round robin over the two ready pods
                        body = await answers(node.network.node_ns, cluster_ip, 80)
                        names.add(body.split()[2])
                assert all(n.startswith("web-") for n in names)

                # From inside a pod: the Service's DNS name comes from the pod's /etc/hosts.
                worker = next(iter(node.workers.values()))
                assert worker.containers[0].process is not None
                pid = worker.containers[0].process.pid
                fetch = (
                    "import urllib.request;"
                    f"print(urllib.request.urlopen('http://web.{ns}/in', timeout=5).read().decode())"
                )
                done = await asyncio.create_subprocess_exec(
                    "nsenter", "-t", str(pid), "-m", "-n", sys.executable, "-c", fetch,
                    stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
                )  # fmt: skip
                async with asyncio.timeout(20):
                    out, err = await done.communicate()
                assert done.returncode == 0, err.decode()
                assert out.decode().startswith("served by web-"), out

                # A deleted pod stops: its process, its namespace, then its API object.
                name, pid, netns = worker.name, pid, worker.netns
                await core.delete_namespaced_pod(name, ns)
                async with asyncio.timeout(30):
                    while True:
                        listed = await core.list_namespaced_pod(ns)
                        if name not in [p.metadata.name for p in listed.items]:
                            break
                        await asyncio.sleep(0.1)
                assert not alive(pid)
                assert netns not in namespaces()

    run(scenario(), timeout=150)


def test_node_command_removes_everything_it_made_after_ctrl_c(
    control_plane: LocalControlPlane,
) -> None:
    require_root()

    async def scenario() -> None:
        async with control_plane.api() as api:
            core = k8s.CoreV1Api(api)
            ns = await make_namespace(api, unique("node"))
            before = root_network()
            bad = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "tpcontrol", "node", "--kubeconfig",
                str(control_plane.kubeconfig), "--namespace-label", "no-equals-sign",
                stderr=asyncio.subprocess.PIPE,
            )  # fmt: skip
            _, err = await bad.communicate()
            assert bad.returncode == 2
            assert b"--namespace-label 'no-equals-sign'" in err

            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "tpcontrol", "node", "--kubeconfig",
                str(control_plane.kubeconfig), "--node-name", unique("cli-node"),
                "--namespace-label", f"{LABEL}={ns}",
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            )  # fmt: skip
            try:
                assert proc.stdout is not None
                async with asyncio.timeout(30):
                    started = json.loads(await proc.stdout.readline())
                await core.create_namespaced_pod(ns, cast(Any, pod("web", [echo_container()])))
                running = await wait_for_pod(api, ns, "web", ready)
                body = await answers(started["netns"], running["status"]["podIP"], 8080)
                assert body.startswith("served by")
                made = {n for n in namespaces() if n.startswith(started["netns"])}
                assert started["netns"] in made
                assert len(made) == 2  # the node's and the pod's
                assert root_network() == before  # nothing added to the host's namespace
                (pod_ns,) = made - {started["netns"]}
                children = processes_in(pod_ns)
                assert children

                proc.send_signal(signal.SIGINT)  # Ctrl-C
                async with asyncio.timeout(30):
                    _, err = await proc.communicate()
                assert proc.returncode == 0, err.decode()
            finally:
                if proc.returncode is None:
                    proc.kill()
                    await proc.wait()
            assert [n for n in namespaces() if n.startswith(started["netns"])] == []
            assert root_network() == before
            assert not [p for p in children if alive(p)]

    run(scenario(), timeout=120)


def ids_of(pid: int) -> dict[str, str]:
    """The real user and group ids of a process."""
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return {
        line.split(":")[0]: line.split()[1] for line in lines if line.startswith(("Uid:", "Gid:"))
    }


def test_containers_run_as_the_security_context_says(control_plane: LocalControlPlane) -> None:
    require_root()

    async def scenario() -> None:
        async with control_plane.api() as api:
            core = k8s.CoreV1Api(api)
            ns = await make_namespace(api, unique("node"))
            nobody = {
                "name": "main",
                "image": ECHO,
                "command": ["sleep", "300"],
                "securityContext": {"runAsUser": 65534},
            }
            async with running_node(api, ns) as node:
                spec = pod("nobody", [nobody], securityContext={"runAsGroup": 65533})
                await core.create_namespaced_pod(ns, cast(Any, spec))
                await wait_for_pod(api, ns, "nobody", ready)
                process = node.workers[(ns, "nobody")].containers[0].process
                assert process is not None
                # Ready means started: the launcher may not have switched user and exec'd yet.
                async with asyncio.timeout(10):
                    while ids_of(process.pid) != {"Uid": "65534", "Gid": "65533"}:
                        await asyncio.sleep(0.05)
                assert (
                    await asyncio.to_thread(Path(f"/proc/{process.pid}/exe").resolve)
                ).name == "sleep"

    run(scenario(), timeout=60)
