"""One pod on the node, from binding to deletion (the kubelet's pod worker).

A pod gets its network namespace and address, its volumes written under the runner's work
directory, its init containers run one after the other to completion, then its containers
started through `tpcontrol.node.launch` and watched: readiness probes, restarts by the pod's
restartPolicy, and the status the API server shows (phase, podIP, conditions, container states)
patched back whenever it changes. A container that cannot be started (its command is missing,
its image has no local command, its config refers to a missing key) makes the pod `Failed` with
the reason, rather than retrying what cannot work.

Deviation, for speed: probe periods and initial delays are capped at `probe_period` seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
import os
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec

from tpcontrol.node import podspec
from tpcontrol.node.launch import LaunchSpec, Mount
from tpcontrol.node.netns import open_connection_in

if TYPE_CHECKING:
    from tpcontrol.node.runner import NodeRunner

log = logging.getLogger("tpcontrol.node")

Json = dict[str, Any]
IMAGE_PATH = (
    f"{Path(sys.executable).parent}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
)


def now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class Container:
    """A container's process and what its status shows."""

    spec: Json
    init: bool = False
    process: asyncio.subprocess.Process | None = None
    ready: bool = False
    started_at: str = ""
    restarts: int = 0
    state: Json = field(default_factory=lambda: {"waiting": {"reason": "ContainerCreating"}})
    last_state: Json = field(default_factory=dict)
    failures: int = 0

    @property
    def name(self) -> str:
        return str(self.spec["name"])

    def status(self) -> Json:
        running = "running" in self.state
        if self.init:
            done = self.state.get("terminated", {})
            ready = bool(done) and done.get("exitCode") == 0
        else:
            ready = running and (self.ready or not self.spec.get("readinessProbe"))
        status: Json = {
            "name": self.name,
            "image": self.spec.get("image", ""),
            "imageID": "",
            "ready": ready,
            "restartCount": self.restarts,
            "started": running,
            "state": self.state,
            "lastState": self.last_state,
        }
        return status


class PodWorker:
    """Runs one pod; `terminate()` stops it and frees what it used."""

    def __init__(self, runner: NodeRunner, pod: Json) -> None:
        self.runner = runner
        self.pod = pod
        meta = pod["metadata"]
        self.namespace, self.name, self.uid = meta["namespace"], meta["name"], meta["uid"]
        self.netns = ""
        self.ip = ""
        self.dir = runner.work / self.uid  # names can be longer than a file name may be
        self.phase = "Pending"
        self.reason = ""
        self.message = ""
        self.initialized = False
        self.start_time = now()
        spec = pod["spec"]
        self.inits = [Container(c, init=True) for c in spec.get("initContainers") or []]
        self.containers = [Container(c) for c in spec.get("containers") or []]
        self._reported: Json | None = None
        self._reporting = asyncio.Lock()
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = False
        self._volume_files: dict[str, dict[str, bytes]] = {}
        self.main: asyncio.Task[None] = asyncio.create_task(self._guarded(), name=f"pod {self}")

    def __str__(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def restart_policy(self) -> str:
        return str(self.pod["spec"].get("restartPolicy", "Always"))

    # -- status -----------------------------------------------------------------------------

    def status(self) -> Json:
        ready = self.phase == "Running" and all(c.status()["ready"] for c in self.containers)
        stamp = now()

        def condition(kind: str, value: bool) -> Json:
            return {
                "type": kind,
                "status": "True" if value else "False",
                "lastTransitionTime": stamp,
            }

        status: Json = {
            "phase": self.phase,
            "hostIP": self.runner.network.node_ip,
            "startTime": self.start_time,
            "conditions": [
                condition("PodScheduled", True),
                condition("Initialized", self.initialized),
                condition("ContainersReady", ready),
                condition("Ready", ready),
            ],
            "containerStatuses": [c.status() for c in self.containers],
        }
        if self.inits:
            status["initContainerStatuses"] = [c.status() for c in self.inits]
        if self.ip:
            status["podIP"] = self.ip
            status["podIPs"] = [{"ip": self.ip}]
        if self.reason:
            status["reason"], status["message"] = self.reason, self.message
        return status

    async def report(self) -> None:
        """Patch the status when it changed (timestamps aside).

        One report at a time, each computed once the previous patch is done: two patches in
        flight could reach the API server out of order and leave an older status in place.
        """
        async with self._reporting:
            status = self.status()
            conditions = [(c["type"], c["status"]) for c in status["conditions"]]
            comparable = {**status, "conditions": conditions}
            if comparable == self._reported or (self._stopping and self.phase == "Running"):
                return
            try:
                await self.runner.patch_status(self.namespace, self.name, status)
            except Exception:
                self._reported = None  # the next report tries again
                raise
            self._reported = comparable

    # -- life --------------------------------------------------------------------------------

    async def _guarded(self) -> None:
        try:
            await self._run()
        except asyncio.CancelledError:
            raise
        except podspec.PodSpecError as exc:
            await self.fail(exc.reason, str(exc))
        except Exception as exc:  # a bug or a failing host command: the pod shows it
            log.exception("pod %s failed", self)
            await self.fail("NodeError", f"{type(exc).__name__}: {exc}")

    async def fail(self, reason: str, message: str) -> None:
        log.warning("pod %s failed: %s: %s", self, reason, message)
        self.phase, self.reason, self.message = "Failed", reason, message
        await self.stop_processes(grace=2)
        with contextlib.suppress(Exception):
            await self.report()

    async def _run(self) -> None:
        self.netns, self.ip = await asyncio.to_thread(self.runner.network.add_pod)
        self.pod.setdefault("status", {}).update(
            {"podIP": self.ip, "podIPs": [{"ip": self.ip}], "hostIP": self.runner.network.node_ip}
        )
        (self.dir / "logs").mkdir(parents=True, exist_ok=True)
        self.write_hosts()
        await self.report()
        self.write_volumes(
            self.runner.config_maps(self.namespace), self.runner.secrets(self.namespace)
        )
        for container in self.inits:
            if await self._start(container) is not None:
                return  # could not be started: the pod has failed with that reason
            assert container.process is not None
            code = await container.process.wait()
            self._exited(container, code)
            if code != 0:
                tail = self.log_tail(container.name)
                await self.fail(
                    "InitContainerFailed",
                    f"init container {container.name!r} exited with {code}: {tail}",
                )
                return
            await self.report()
        self.initialized = True
        for container in self.containers:
            if await self._start(container) is not None:
                return
        self.phase = "Running"
        await self.report()
        for container in self.containers:
            self._tasks.append(asyncio.create_task(self._supervise(container)))
            if container.spec.get("readinessProbe"):
                self._tasks.append(asyncio.create_task(self._probe_loop(container)))
        await asyncio.gather(*self._tasks)

    async def _start(self, container: Container) -> int | None:
        """Start a container; returns None when it runs, else the exit code of a failed start."""
        # $(VAR) sees only what the pod declares; the image's own variables come underneath.
        declared = podspec.container_env(
            self.pod,
            container.spec,
            self.runner.config_maps(self.namespace),
            self.runner.secrets(self.namespace),
            {},
        )
        env = {"PATH": IMAGE_PATH, "HOSTNAME": self.name, "HOME": "/root", **declared}
        try:
            argv = podspec.argv(container.spec, self.runner.images, declared)
        except podspec.PodSpecError as exc:
            container.state = {"waiting": {"reason": exc.reason, "message": str(exc)}}
            await self.fail(exc.reason, f"container {container.name!r}: {exc}")
            return 1
        error_file = self.dir / f"{container.name}.start-error"
        error_file.unlink(missing_ok=True)
        spec = LaunchSpec(
            netns=self.netns,
            argv=argv,
            env=env,
            error_file=str(error_file),
            hosts_file=str(self.dir / "hosts"),
            workdir=container.spec.get("workingDir", ""),
            mounts=self._mounts(container.spec),
            run_as_user=self._security(container.spec, "runAsUser"),
            run_as_group=self._security(container.spec, "runAsGroup"),
        )
        spec_file = self.dir / f"{container.name}.launch.json"
        spec_file.write_bytes(msgspec.json.encode(spec))
        with (self.dir / "logs" / f"{container.name}.log").open("ab") as logfile:
            container.process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "tpcontrol.node.launch",
                str(spec_file),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=logfile,
                stderr=asyncio.subprocess.STDOUT,
                start_new_session=True,
            )
        container.started_at = now()
        container.state = {"running": {"startedAt": container.started_at}}
        if container.init:
            return None
        # A start error shows within moments: wait for it briefly so the status says so at once.
        try:
            async with asyncio.timeout(0.3):
                code = await container.process.wait()
        except TimeoutError:
            return None
        if error_file.exists():
            self._exited(container, code)
            await self.fail("StartError", f"container {container.name!r}: {error_file.read_text()}")
            return code
        return None  # exited, but started: the supervisor restarts it by policy

    def _security(self, container: Json, field: str) -> int | None:
        """The container's securityContext value, else the pod's (as the kubelet merges them)."""
        for context in (container.get("securityContext"), self.pod["spec"].get("securityContext")):
            if context and context.get(field) is not None:
                return int(context[field])
        return None

    def _mounts(self, container: Json) -> list[Mount]:
        mounts = []
        for mount in container.get("volumeMounts") or []:
            source = self.dir / "volumes" / mount["name"]
            if not source.is_dir():
                raise podspec.PodSpecError(
                    "CreateContainerConfigError", f"volumeMount {mount['name']!r}: no such volume"
                )
            sub = mount.get("subPath") or ""
            if sub.startswith("/") or ".." in Path(sub).parts:
                raise podspec.PodSpecError(
                    "CreateContainerConfigError",
                    f"volumeMount {mount['name']!r}: subPath {sub!r} must be a relative path "
                    "without '..'",
                )
            if sub:
                source = source / sub
                if not source.exists():
                    source.mkdir(parents=True)  # as the kubelet does for a missing subPath
            target = mount["mountPath"]
            if not target.startswith("/") or ".." in Path(target).parts:
                raise podspec.PodSpecError(
                    "CreateContainerConfigError",
                    f"volumeMount {mount['name']!r}: mountPath {target!r} must be an absolute "
                    "path without '..'",
                )
            self.runner.mountpoint(target, directory=source.is_dir())
            mounts.append(Mount(str(source), target, bool(mount.get("readOnly"))))
        return mounts

    def _exited(self, container: Container, code: int) -> None:
        error_file = self.dir / f"{container.name}.start-error"
        if error_file.exists():
            reason, message = "StartError", error_file.read_text()
            code = 128
        else:
            reason, message = ("Completed" if code == 0 else "Error"), ""
        terminated: Json = {
            "exitCode": code,
            "reason": reason,
            "startedAt": container.started_at or now(),
            "finishedAt": now(),
        }
        if message:
            terminated["message"] = message
        container.state = {"terminated": terminated}
        container.ready = False

    async def _supervise(self, container: Container) -> None:
        backoff = 1.0
        while not self._stopping:
            assert container.process is not None
            code = await container.process.wait()
            if self._stopping:
                return
            self._exited(container, code)
            log.info("pod %s: container %s exited with %d", self, container.name, code)
            policy = self.restart_policy
            if policy == "Never" or (policy == "OnFailure" and code == 0):
                if all("terminated" in c.state for c in self.containers):
                    failed = any(c.state["terminated"]["exitCode"] != 0 for c in self.containers)
                    self.phase = "Failed" if failed else "Succeeded"
                await self.report()
                return
            container.last_state = container.state
            container.state = {"waiting": {"reason": "CrashLoopBackOff", "message": f"exit {code}"}}
            await self.report()
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, self.runner.settings.restart_backoff_max)
            container.restarts += 1
            if await self._start(container) is not None:
                return
            await self.report()

    # -- probes ------------------------------------------------------------------------------

    async def _probe_loop(self, container: Container) -> None:
        probe: Json = container.spec["readinessProbe"]
        cap = self.runner.settings.probe_period
        period = min(float(probe.get("periodSeconds", 10)), cap)
        timeout = float(probe.get("timeoutSeconds", 1))
        failure_threshold = int(probe.get("failureThreshold", 3))
        await asyncio.sleep(min(float(probe.get("initialDelaySeconds", 0)), cap))
        while not self._stopping:
            if "running" in container.state:
                try:
                    async with asyncio.timeout(timeout):
                        ok = await self._probe_once(container, probe)
                except (TimeoutError, OSError):
                    ok = False
                if ok:
                    container.failures = 0
                    container.ready = True
                else:
                    container.failures += 1
                    if container.failures >= failure_threshold or not container.ready:
                        container.ready = False
                await self.report()
            await asyncio.sleep(period if container.ready else min(period, 0.2))

    async def _probe_once(self, container: Container, probe: Json) -> bool:
        if "exec" in probe:
            assert container.process is not None
            command = probe["exec"].get("command") or []
            proc = await asyncio.create_subprocess_exec(
                "nsenter", "-t", str(container.process.pid), "-m", "-n", "--", *command,
                stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
            )  # fmt: skip
            try:
                return await proc.wait() == 0
            finally:
                if proc.returncode is None:
                    proc.kill()
        action = probe.get("tcpSocket") or probe.get("httpGet")
        if action is None:
            return True  # a probe of a kind this node does not run counts as passing
        port = podspec.container_port(self.pod, action.get("port", 0), container.spec)
        reader, writer = await open_connection_in(self.runner.network.node_ns, self.ip, port)
        try:
            if "tcpSocket" in probe:
                return True
            path = action.get("path", "/")
            writer.write(
                f"GET {path} HTTP/1.1\r\nHost: {self.ip}:{port}\r\nUser-Agent: kube-probe/1.20\r\n"
                "Connection: close\r\n\r\n".encode()
            )
            line = await reader.readline()
            parts = line.split()
            return len(parts) >= 2 and parts[1].isdigit() and 200 <= int(parts[1]) < 400
        finally:
            writer.close()

    # -- files -------------------------------------------------------------------------------

    def write_hosts(self) -> None:
        """The pod's /etc/hosts: itself, and every Service by its DNS names (no DNS server here)."""
        lines = ["127.0.0.1\tlocalhost", "::1\tlocalhost ip6-localhost"]
        if self.ip:
            lines.append(f"{self.ip}\t{self.name}")
        for (ns, name), address in sorted(self.runner.service_ips().items()):
            names = [f"{name}.{ns}.svc.cluster.local", f"{name}.{ns}.svc", f"{name}.{ns}"]
            if ns == self.namespace:
                names.append(name)
            lines.append(f"{address}\t{' '.join(names)}")
        text = "\n".join(lines) + "\n"
        path = self.dir / "hosts"
        if not path.exists() or path.read_text() != text:
            with path.open("w") as f:  # in place: the file is bind-mounted by inode
                f.write(text)

    def write_volumes(self, config_maps: podspec.Data, secrets: podspec.Data) -> None:
        """Write (or update) every volume's files; a changed file is replaced atomically."""
        for volume in self.pod["spec"].get("volumes") or []:
            files = podspec.volume_files(self.pod, volume, config_maps, secrets)
            base = self.dir / "volumes" / volume["name"]
            base.mkdir(parents=True, exist_ok=True)
            if self._volume_files.get(volume["name"]) == files:
                continue
            for relative, content in files.items():
                target = base / relative
                target.parent.mkdir(parents=True, exist_ok=True)
                temporary = target.with_name(f".{target.name}.tmp")
                temporary.write_bytes(content)
                os.replace(temporary, target)
            for gone in set(self._volume_files.get(volume["name"], {})) - set(files):
                (base / gone).unlink(missing_ok=True)
            self._volume_files[volume["name"]] = files

    def refresh(self, pod: Json) -> None:
        """The API server's copy changed: keep labels/annotations for the downward API current."""
        self.pod["metadata"] = pod["metadata"]
        if self.ip:
            try:
                self.write_volumes(
                    self.runner.config_maps(self.namespace), self.runner.secrets(self.namespace)
                )
            except podspec.PodSpecError as exc:
                log.info("pod %s: volumes keep their last content: %s", self, exc)

    def log_tail(self, container: str, lines: int = 5) -> str:
        path = self.dir / "logs" / f"{container}.log"
        if not path.exists():
            return ""
        return " | ".join(path.read_text(errors="replace").strip().splitlines()[-lines:])

    # -- end ---------------------------------------------------------------------------------

    async def stop_processes(self, grace: float) -> None:
        self._stopping = True
        processes = [c.process for c in [*self.inits, *self.containers] if c.process]
        running = [p for p in processes if p.returncode is None]
        for process in running:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
        try:
            async with asyncio.timeout(grace):
                await asyncio.gather(*(p.wait() for p in running))
        except TimeoutError:
            for process in running:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
            await asyncio.gather(*(p.wait() for p in running))

    async def terminate(self, grace: float) -> None:
        """Stop the containers (SIGTERM, then SIGKILL after `grace`) and free the namespace."""
        current = asyncio.current_task()
        for task in [self.main, *self._tasks]:
            if task is not current:
                task.cancel()
        await self.stop_processes(grace)
        for task in [self.main, *self._tasks]:
            if task is not current:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        if self.netns:
            await asyncio.to_thread(self.runner.network.remove_pod, self.netns)
            self.netns = ""
