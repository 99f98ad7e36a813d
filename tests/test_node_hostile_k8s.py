"""The local node against pods and situations that try to break it: processes that try to
outlive their pod, runners that die or share the machine, volumes with binary content and
modes, probes that cannot work, and specs a kubelet would wait on rather than fail."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, cast

import pytest
from kubernetes_asyncio import client as k8s

from tpcontrol.localcluster import LocalControlPlane
from tpcontrol.node.netns import namespaces, open_connection_in, processes_in
from tpcontrol.node.runner import NodeError, NodeRunner, NodeSettings

from .helpers import run
from .k8s_helpers import LABEL, make_namespace, service, unique
from .node_helpers import (
    Json,
    alive,
    answers,
    phase,
    read_in_container,
    ready,
    require_root,
    running_node,
    wait_for_pod,
    written_in_container,
)
from .test_node_k8s import echo_container, pod

ECHO = "tpcontrol.example/http-echo:1"


def sh(name: str, script: str, **extra: Any) -> Json:
    return {"name": name, "image": ECHO, "command": ["sh", "-c", script], **extra}


async def pids_when_started(netns: str, count: int) -> list[int]:
    """The pod's processes, once there are at least `count` of them."""
    async with asyncio.timeout(20):
        while len(found := processes_in(netns)) < count:
            await asyncio.sleep(0.05)
    return found


def test_no_process_outlives_its_pod(control_plane: LocalControlPlane) -> None:
    require_root()

    async def scenario() -> None:
        async with control_plane.api() as api:
            core = k8s.CoreV1Api(api)
            ns = await make_namespace(api, unique("hostile"))
            escaping = sh("main", "setsid sleep 301 & sleep 302 & trap '' TERM; sleep 303")
            forking = sh("main", "(sleep 304 &) ; exit 0")
            async with running_node(api, ns) as node:
                await core.create_namespaced_pod(
                    ns, cast(Any, pod("escaper", [escaping], terminationGracePeriodSeconds=1))
                )
                await core.create_namespaced_pod(
                    ns, cast(Any, pod("forker", [forking], restartPolicy="Never"))
                )
                await wait_for_pod(api, ns, "escaper", ready)
                escaper = node.workers[(ns, "escaper")]
                pids = await pids_when_started(escaper.netns, 4)  # sh and three sleeps

                # Succeeded: what it left running dies with it and its sandbox is released.
                await wait_for_pod(api, ns, "forker", phase("Succeeded"))
                forker = node.workers[(ns, "forker")]
                async with asyncio.timeout(10):
                    while forker.netns in namespaces():
                        await asyncio.sleep(0.05)

                await core.delete_namespaced_pod("escaper", ns)
                async with asyncio.timeout(20):
                    while (ns, "escaper") in node.workers or any(alive(p) for p in pids):
                        await asyncio.sleep(0.05)
                assert escaper.netns not in namespaces()

    run(scenario(), timeout=90)


def test_a_runner_stopped_mid_grace_and_a_killed_runner_leave_nothing_running(
    control_plane: LocalControlPlane,
) -> None:
    require_root()

    async def scenario() -> None:
        async with control_plane.api() as api:
            core = k8s.CoreV1Api(api)
            ns = await make_namespace(api, unique("hostile"))
            stubborn = sh("main", "trap '' TERM; sleep 305 & wait")
            async with running_node(api, ns) as node:
                await core.create_namespaced_pod(
                    ns, cast(Any, pod("stubborn", [stubborn], terminationGracePeriodSeconds=30))
                )
                await wait_for_pod(api, ns, "stubborn", ready)
                pids = await pids_when_started(node.workers[(ns, "stubborn")].netns, 2)
                await core.delete_namespaced_pod("stubborn", ns)
                async with asyncio.timeout(10):
                    while (ns, "stubborn") in node.workers:
                        await asyncio.sleep(0.05)
            assert not [p for p in pids if alive(p)]  # the runner's stop finished the grace

            # A runner killed outright: its containers die with it (parent-death signal), and
            # the next runner reaps its namespaces and work directory.
            ns2 = await make_namespace(api, unique("hostile"))
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "tpcontrol", "node", "--kubeconfig",
                str(control_plane.kubeconfig), "--node-name", unique("killed"),
                "--namespace-label", f"{LABEL}={ns2}", stdout=asyncio.subprocess.PIPE,
            )  # fmt: skip
            assert proc.stdout is not None
            async with asyncio.timeout(30):
                started = json.loads(await proc.stdout.readline())
            await core.create_namespaced_pod(ns2, cast(Any, pod("web", [echo_container()])))
            await wait_for_pod(api, ns2, "web", ready)
            mine = [n for n in namespaces() if n.startswith(started["netns"] + "-")]
            pids = await pids_when_started(mine[0], 1)
            proc.kill()
            await proc.wait()
            async with asyncio.timeout(10):
                while any(alive(p) for p in pids):
                    await asyncio.sleep(0.05)
            assert started["netns"] in namespaces()  # left behind by the SIGKILL...
            async with running_node(api, ns):
                assert not [n for n in namespaces() if n.startswith(started["netns"])]  # reaped

    run(scenario(), timeout=120)


def test_two_runners_share_mount_points_and_never_reach_each_others_pods(
    control_plane: LocalControlPlane,
) -> None:
    require_root()

    async def scenario() -> None:
        async with control_plane.api() as api:
            core = k8s.CoreV1Api(api)
            ns_a = await make_namespace(api, unique("hostile"))
            ns_b = await make_namespace(api, unique("hostile"))
            shared = "/srv/tpnode-test-shared/conf"
            for ns in (ns_a, ns_b):
                await core.create_namespaced_config_map(
                    ns, cast(Any, {"metadata": {"name": "cfg"}, "data": {"f": ns}})
                )
            container = {
                **echo_container(),
                "volumeMounts": [{"name": "cfg", "mountPath": shared}],
            }
            volumes = [{"name": "cfg", "configMap": {"name": "cfg"}}]
            async with running_node(api, ns_b) as node_b:
                async with running_node(api, ns_a) as node_a:
                    for ns in (ns_a, ns_b):
                        await core.create_namespaced_pod(
                            ns, cast(Any, pod("web", [container], volumes=volumes))
                        )
                    pod_b = await wait_for_pod(api, ns_b, "web", ready)
                    await wait_for_pod(api, ns_a, "web", ready)
                    svc = await core.create_namespaced_service(
                        ns_b, cast(Any, service("web", [{"port": 80, "targetPort": 8080}]))
                    )
                    ip = svc.spec.cluster_ip
                    assert (await answers(node_b.network.node_ns, ip, 80)).startswith("served by")
                    # Runner A has no pod of that Service: it refuses, never dials B's address
                    # (which, in A's own network, may well be A's pod).
                    with pytest.raises(ConnectionRefusedError):
                        await open_connection_in(node_a.network.node_ns, ip, 80)
                # A stopped; B's container still sees its volume at the shared mount point.
                process = node_b.workers[(ns_b, "web")].containers[0].process
                assert process is not None
                assert read_in_container(process.pid, f"{shared}/f") == ns_b
                assert pod_b["status"]["podIP"]
                assert await asyncio.to_thread(Path(shared).is_dir)
            assert not await asyncio.to_thread(Path("/srv/tpnode-test-shared").exists)

            # One node name, one runner.
            name = unique("node")
            async with NodeRunner(
                api, NodeSettings(node_name=name, namespace_labels={LABEL: ns_a})
            ):
                second = NodeRunner(api, NodeSettings(node_name=name))
                with pytest.raises(NodeError, match="already run by process"):
                    await second.start()

    run(scenario(), timeout=120)


def test_volumes_keep_bytes_and_modes_and_are_read_only(control_plane: LocalControlPlane) -> None:
    require_root()

    async def scenario() -> None:
        async with control_plane.api() as api:
            core = k8s.CoreV1Api(api)
            ns = await make_namespace(api, unique("hostile"))
            blob = bytes(range(256))
            await core.create_namespaced_secret(
                ns,
                cast(
                    Any,
                    {"metadata": {"name": "blob"}, "data": {"b": base64.b64encode(blob).decode()}},
                ),
            )
            await core.create_namespaced_config_map(
                ns,
                cast(
                    Any,
                    {
                        "metadata": {"name": "scripts"},
                        "data": {"run.sh": "#!/bin/sh\necho ran\n"},
                        "binaryData": {"raw": base64.b64encode(b"\xff\x00\xfe").decode()},
                    },
                ),
            )
            container = sh(
                "main",
                "/scripts/run.sh > /tmp/out; echo x 2>/tmp/err >/scripts/run.sh; sleep 300",
                volumeMounts=[
                    {"name": "scripts", "mountPath": "/scripts"},
                    {"name": "blob", "mountPath": "/secret"},
                ],
            )
            volumes = [
                {"name": "scripts", "configMap": {"name": "scripts", "defaultMode": 0o755}},
                {"name": "blob", "secret": {"secretName": "blob"}},
            ]
            async with running_node(api, ns) as node:
                await core.create_namespaced_pod(
                    ns, cast(Any, pod("vols", [container], volumes=volumes))
                )
                await wait_for_pod(api, ns, "vols", ready)
                process = node.workers[(ns, "vols")].containers[0].process
                assert process is not None
                err = await written_in_container(process.pid, "/tmp/err")
                assert "Read-only file system" in err
                assert read_in_container(process.pid, "/tmp/out") == "ran\n"  # mode 0755
                assert read_in_container(process.pid, "/scripts/run.sh").startswith("#!/bin/sh")
                raw = await asyncio.to_thread(read_bytes_in, process.pid, "/secret/b")
                assert raw == blob
                raw = await asyncio.to_thread(read_bytes_in, process.pid, "/scripts/raw")
                assert raw == b"\xff\x00\xfe"

    run(scenario(), timeout=90)


def read_bytes_in(pid: int, path: str) -> bytes:
    done = subprocess.run(["nsenter", "-t", str(pid), "-m", "cat", path], capture_output=True)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_probes_and_specs_that_cannot_work(control_plane: LocalControlPlane) -> None:
    require_root()

    async def scenario() -> None:
        async with control_plane.api() as api:
            core = k8s.CoreV1Api(api)
            ns = await make_namespace(api, unique("hostile"))
            bad_port = {
                **echo_container(),
                "readinessProbe": {"tcpSocket": {"port": "no-such-port"}, "periodSeconds": 1},
            }
            never_alive = {
                **sh("main", "sleep 300"),
                "livenessProbe": {
                    "exec": {"command": ["sh", "-c", 'test "$PROBE_ME" = never']},
                    "periodSeconds": 1,
                    "failureThreshold": 1,
                },
                "env": [{"name": "PROBE_ME", "value": "yes"}],
            }
            env_probe = {
                **sh("main", "sleep 300"),
                "readinessProbe": {
                    "exec": {"command": ["sh", "-c", 'test "$PROBE_ME" = yes']},
                    "periodSeconds": 1,
                },
                "env": [{"name": "PROBE_ME", "value": "yes"}],
            }
            no_workdir = {**sh("main", "true"), "workingDir": "/no/such/dir"}
            named = {**sh("main", "hostname > /tmp/h; sleep 300")}
            async with running_node(api, ns) as node:
                for spec in (
                    pod("badport", [bad_port]),
                    pod("liveness", [never_alive]),
                    pod("envprobe", [env_probe]),
                    pod("workdir", [no_workdir]),
                    pod("named", [named], hostname="my-host"),
                    pod(
                        "hostpath",
                        [
                            {
                                **sh("main", "true"),
                                "volumeMounts": [{"name": "h", "mountPath": "/h"}],
                            }
                        ],
                        volumes=[{"name": "h", "hostPath": {"path": "/etc"}}],
                    ),
                ):
                    await core.create_namespaced_pod(ns, cast(Any, spec))
                await wait_for_pod(api, ns, "envprobe", ready)  # the probe sees the env

                def restarted(p: Json) -> bool:
                    states = (p.get("status") or {}).get("containerStatuses") or []
                    return bool(states) and states[0]["restartCount"] >= 1

                await wait_for_pod(api, ns, "liveness", restarted, within=30)
                failed = await wait_for_pod(api, ns, "workdir", phase("Failed"))
                assert failed["status"]["reason"] == "StartError"
                assert "workingDir '/no/such/dir'" in failed["status"]["message"]
                # A spec that cannot change fails at once (no waiting on it, unlike a missing
                # ConfigMap), and the host's files are never offered to a pod.
                hostpath = await wait_for_pod(api, ns, "hostpath", phase("Failed"))
                assert hostpath["status"]["reason"] == "CreateContainerConfigError"
                assert "hostPath" in hostpath["status"]["message"]
                # A probe on a port that does not exist: not ready, still running.
                badport = await wait_for_pod(api, ns, "badport", phase("Running"))
                assert not ready(badport)
                await wait_for_pod(api, ns, "named", ready)
                process = node.workers[(ns, "named")].containers[0].process
                assert process is not None
                assert await written_in_container(process.pid, "/tmp/h") == "my-host\n"
                assert os.uname().nodename != "my-host"
                latest = await core.read_namespaced_pod("badport", ns)
                assert latest.status.phase == "Running"

    run(scenario(), timeout=90)


def running(netns: str, argv: bytes) -> list[int]:
    """The pod's processes whose command line is `argv` (NUL-separated)."""
    found = []
    for pid in processes_in(netns):
        try:
            if Path(f"/proc/{pid}/cmdline").read_bytes() == argv:
                found.append(pid)
        except OSError:
            continue  # gone meanwhile
    return found


def test_restarts_leave_nothing_behind_and_pods_cannot_reach_the_runners_state(
    control_plane: LocalControlPlane,
) -> None:
    require_root()

    async def scenario() -> None:
        async with control_plane.api() as api:
            core = k8s.CoreV1Api(api)
            ns = await make_namespace(api, unique("hostile"))
            await core.create_namespaced_config_map(
                ns, cast(Any, {"metadata": {"name": "cm"}, "data": {"k": "v"}})
            )
            # A node annotation that is not what a runner writes names no live runner.
            name = unique("node")
            await core.create_node(
                cast(
                    Any,
                    {"metadata": {"name": name, "annotations": {"tpcontrol.dev/node-runner": "7"}}},
                )
            )
            leaky = sh("main", "setsid sleep 1001 & sleep 0.3; exit 1")
            sneaky = {
                **sh("main", "sleep 300"),
                "volumeMounts": [
                    {"name": "cm", "mountPath": "/run/tpcontrol-node/tpn", "subPath": "k"}
                ],
            }
            settings = NodeSettings(node_name=name, namespace_labels={LABEL: ns})
            async with NodeRunner(api, settings) as node:
                await core.create_namespaced_pod(ns, cast(Any, pod("leaky", [leaky])))
                await core.create_namespaced_pod(
                    ns,
                    cast(
                        Any,
                        pod(
                            "sneaky",
                            [sneaky],
                            volumes=[{"name": "cm", "configMap": {"name": "cm"}}],
                        ),
                    ),
                )
                failed = await wait_for_pod(api, ns, "sneaky", phase("Failed"))
                assert "is not allowed on this node" in failed["status"]["message"]
                assert not await asyncio.to_thread(Path("/run/tpcontrol-node/tpn").exists)

                def restarted_twice(p: Json) -> bool:
                    states = (p.get("status") or {}).get("containerStatuses") or []
                    return bool(states) and states[0]["restartCount"] >= 2

                await wait_for_pod(api, ns, "leaky", restarted_twice, within=30)
                netns = node.workers[(ns, "leaky")].netns
                # At most the current run's sleeper: the earlier runs' are gone.
                assert len(await asyncio.to_thread(running, netns, b"sleep\x001001\x00")) <= 1

    run(scenario(), timeout=90)
