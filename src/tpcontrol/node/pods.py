"""One pod on the node, from binding to deletion (the kubelet's pod worker).

A pod gets its network namespace and address, its volumes written under the runner's work
directory, its init containers run one after the other to completion, then its containers
started through `tpcontrol.node.launch` and watched: readiness and liveness probes, restarts by
the pod's restartPolicy, and the status the API server shows (phase, podIP, conditions,
container states) patched back whenever it changes.

What cannot work is not retried: a command that is not there, an image with no local command,
a failing init container make the pod `Failed` with the reason. What can change is waited for,
as the kubelet does: a missing ConfigMap, Secret or key leaves the container waiting
(`CreateContainerConfigError`) until it appears. A pod's processes are all the processes in its
network namespace, so none outlives the pod, whatever session or parent it has.

Deviation, for speed: probe periods and initial delays are capped at `probe_period` seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import functools
import logging
import os
import shutil
import signal
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec

from tpcontrol.node import podspec
from tpcontrol.node.launch import LaunchSpec, Mount
from tpcontrol.node.netns import kill_all_in, open_connection_in, processes_in

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
    env: dict[str, str] = field(default_factory=dict)

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
        self.netns = runner.network.pod_namespace()
        self.ip = ""
        self.dir = runner.work / self.uid  # names can be longer than a file name may be
        self.phase = "Pending"
        self.reason = ""
        self.message = ""
        self.initialized = False
        self.start_time = now()
        spec = pod["spec"]
        self.hostname = str(spec.get("hostname") or self.name)[:63].rstrip("-.")
        self.inits = [Container(c, init=True) for c in spec.get("initContainers") or []]
        self.containers = [Container(c) for c in spec.get("containers") or []]
        self._config_generation = 0  # bumped on every ConfigMap/Secret/pod change
        self._config_waiters: list[asyncio.Future[None]] = []
        self._terminated = False
        self._reported: Json | None = None
        self._reporting = asyncio.Lock()
        self._retry: asyncio.TimerHandle | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = False
        self._released = False
        self._volume_files: dict[str, dict[str, bytes]] = {}
        self._adding: asyncio.Future[tuple[str, str]] | None = None
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
        # null removes what an earlier patch set (the patch merges into the stored status)
        status["reason"], status["message"] = self.reason or None, self.message or None
        return status

    async def report(self) -> None:
        """Patch the status when it changed (timestamps aside); a failed patch is retried.

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
            except Exception as exc:  # the API server is away or slow: try again shortly
                log.warning("pod %s: status not patched (%s); retrying", self, exc)
                self._reported = None
                if self._retry is None and not self._terminated:
                    self._retry = asyncio.get_running_loop().call_later(1.0, self._report_later)
                return
            self._reported = comparable

    def _report_later(self) -> None:
        self._retry = None
        task = asyncio.ensure_future(self.report())
        self._tasks.append(task)
        task.add_done_callback(self._forget_task)

    def _forget_task(self, task: asyncio.Future[None]) -> None:
        with contextlib.suppress(ValueError):
            self._tasks.remove(task)  # type: ignore[arg-type]

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
        """The pod cannot run: it is Failed with the reason, and its sandbox is released."""
        log.warning("pod %s failed: %s: %s", self, reason, message)
        self.phase, self.reason, self.message = "Failed", reason, message
        await self.report()  # first: endpoints drop the pod before its address is freed
        await self.stop_processes(grace=2)
        await self.release()

    async def _run(self) -> None:
        self._adding = asyncio.ensure_future(
            asyncio.to_thread(self.runner.network.add_pod, self.netns)
        )
        _, self.ip = await asyncio.shield(self._adding)
        self.pod.setdefault("status", {}).update(
            {"podIP": self.ip, "podIPs": [{"ip": self.ip}], "hostIP": self.runner.network.node_ip}
        )
        (self.dir / "logs").mkdir(parents=True, exist_ok=True)
        self.write_hosts()
        await self.report()
        await self._until_configured(None, self._write_current_volumes)
        for container in self.inits:
            await self._until_configured(container, functools.partial(self._launch, container))
            await self.report()
            assert container.process is not None
            code = await container.process.wait()
            self._exited(container, code)
            if code != 0:
                if container.state["terminated"]["reason"] == "StartError":
                    message = container.state["terminated"].get("message", "")
                    await self.fail("StartError", f"init container {container.name!r}: {message}")
                    return
                tail = self.log_tail(container.name)
                await self.fail(
                    "InitContainerFailed",
                    f"init container {container.name!r} exited with {code}: {tail}",
                )
                return
            await self.report()
        self.initialized = True
        for container in self.containers:
            await self._until_configured(container, functools.partial(self._launch, container))
        self.phase = "Running"
        await self.report()
        for container in self.containers:
            self._tasks.append(asyncio.create_task(self._supervise(container)))
            for kind in ("readinessProbe", "livenessProbe"):
                if container.spec.get(kind):
                    self._tasks.append(asyncio.create_task(self._probe_loop(container, kind)))
        await asyncio.gather(*self._tasks)

    async def _until_configured(
        self, container: Container | None, step: Callable[[], Awaitable[None] | None]
    ) -> None:
        """Run `step`; while it lacks a ConfigMap, Secret or key, wait for them to change."""
        while True:
            seen = self._config_generation
            try:
                result = step()
                if result is not None:
                    await result
                if self.reason == "CreateContainerConfigError" and not any(
                    c.state.get("waiting", {}).get("reason") == "CreateContainerConfigError"
                    for c in [*self.inits, *self.containers]
                    if c is not container
                ):
                    self.reason = self.message = ""
                return
            except podspec.PodSpecError as exc:
                if not exc.missing:
                    raise  # the spec itself is wrong: it will not change, the pod fails
                where = f"container {container.name!r}: " if container else ""
                self.reason, self.message = exc.reason, f"{where}{exc}"
                waiting = {"waiting": {"reason": exc.reason, "message": str(exc)}}
                for c in [container] if container else [*self.inits, *self.containers]:
                    c.state = waiting
                log.info("pod %s waits: %s", self, self.message)
                await self.report()
            if self._config_generation == seen:  # nothing changed meanwhile: wait for a change
                waiter = asyncio.get_running_loop().create_future()
                self._config_waiters.append(waiter)
                await waiter

    def _write_current_volumes(self) -> None:
        self.write_volumes(
            self.runner.volume_config_maps(self.namespace),
            self.runner.secrets(self.namespace, exact=True),
        )

    async def _launch(self, container: Container) -> None:
        """Start a container's process (raises PodSpecError when its spec cannot be met)."""
        # $(VAR) sees only what the pod declares; the image's own variables come underneath.
        declared = podspec.container_env(
            self.pod,
            container.spec,
            self.runner.config_maps(self.namespace),
            self.runner.secrets(self.namespace),
            {},
        )
        env = {"PATH": IMAGE_PATH, "HOSTNAME": self.hostname, "HOME": "/root", **declared}
        argv = podspec.argv(container.spec, self.runner.images, declared)
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
            hostname=self.hostname,
        )
        spec_file = self.dir / f"{container.name}.launch.json"
        spec_file.write_bytes(msgspec.json.encode(spec))
        container.env = env
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

    def _security(self, container: Json, field: str) -> int | None:
        """The container's securityContext value, else the pod's (as the kubelet merges them)."""
        for context in (container.get("securityContext"), self.pod["spec"].get("securityContext")):
            if context and context.get(field) is not None:
                return int(context[field])
        return None

    def _mounts(self, container: Json) -> list[Mount]:
        volumes = {v["name"]: v for v in self.pod["spec"].get("volumes") or []}
        mounts = []
        for mount in container.get("volumeMounts") or []:
            name = mount["name"]
            source = self.dir / "volumes" / name
            if name not in volumes or not source.is_dir():
                raise podspec.PodSpecError(
                    "CreateContainerConfigError", f"volumeMount {name!r}: no such volume"
                )
            sub = mount.get("subPath") or ""
            if sub.startswith("/") or ".." in Path(sub).parts:
                raise podspec.PodSpecError(
                    "CreateContainerConfigError",
                    f"volumeMount {name!r}: subPath {sub!r} must be a relative path without '..'",
                )
            if sub:
                source = source / sub
                if not source.exists():
                    if "emptyDir" not in volumes[name]:
                        raise podspec.PodSpecError(
                            "CreateContainerConfigError",
                            f"volumeMount {name!r}: subPath {sub!r} is not in the volume",
                            missing=True,  # until the ConfigMap or Secret has that key
                        )
                    source.mkdir(parents=True)  # as the kubelet does in an emptyDir
            target = mount["mountPath"]
            if not target.startswith("/") or ".." in Path(target).parts:
                raise podspec.PodSpecError(
                    "CreateContainerConfigError",
                    f"volumeMount {name!r}: mountPath {target!r} must be an absolute "
                    "path without '..'",
                )
            self.runner.mountpoint(target, directory=source.is_dir())
            # ConfigMap, Secret and downward-API content is the API server's: never writable.
            read_only = bool(mount.get("readOnly")) or any(
                k in volumes[name] for k in podspec.READ_ONLY_KINDS
            )
            mounts.append(Mount(str(source), target, read_only))
        return mounts

    def _exited(self, container: Container, code: int) -> None:
        error_file = self.dir / f"{container.name}.start-error"
        if error_file.exists():
            reason, message = "StartError", error_file.read_text(errors="replace")
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
        if container.process is not None:  # what the container left running goes with it
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(container.process.pid, signal.SIGKILL)
            self._sweep_leftovers()

    def _sweep_leftovers(self) -> None:
        """Kill the pod's processes that belong to no running container: what an exited
        container left behind, whatever its session (each container has a mount namespace of
        its own; exec probes join a running container's, so they are spared)."""
        running = set()
        for other in [*self.inits, *self.containers]:
            if other.process is not None and other.process.returncode is None:
                with contextlib.suppress(OSError):
                    running.add(os.stat(f"/proc/{other.process.pid}/ns/mnt").st_ino)
        for pid in processes_in(self.netns):
            with contextlib.suppress(OSError):
                if os.stat(f"/proc/{pid}/ns/mnt").st_ino not in running:
                    os.kill(pid, signal.SIGKILL)

    async def _supervise(self, container: Container) -> None:
        backoff = 1.0
        while not self._stopping:
            assert container.process is not None
            code = await container.process.wait()
            if self._stopping:
                return
            self._exited(container, code)
            terminated = container.state["terminated"]
            if terminated["reason"] == "StartError":
                await self.fail(
                    "StartError", f"container {container.name!r}: {terminated['message']}"
                )
                return
            log.info("pod %s: container %s exited with %d", self, container.name, code)
            policy = self.restart_policy
            if policy == "Never" or (policy == "OnFailure" and code == 0):
                if all("terminated" in c.state for c in self.containers):
                    failed = any(c.state["terminated"]["exitCode"] != 0 for c in self.containers)
                    self.phase = "Failed" if failed else "Succeeded"
                await self.report()
                if self.phase in ("Failed", "Succeeded"):
                    await self.release()
                return
            container.last_state = container.state
            container.state = {"waiting": {"reason": "CrashLoopBackOff", "message": f"exit {code}"}}
            await self.report()
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, self.runner.settings.restart_backoff_max)
            await self._until_configured(container, functools.partial(self._launch, container))
            container.restarts += 1
            await self.report()

    # -- probes ------------------------------------------------------------------------------

    async def _probe_loop(self, container: Container, kind: str) -> None:
        """Readiness sets `ready`; liveness kills the container after failureThreshold failures
        in a row (its restartPolicy then decides). A probe that errors counts as failed."""
        probe: Json = container.spec[kind]
        cap = self.runner.settings.probe_period
        period = min(float(probe.get("periodSeconds", 10)), cap)
        timeout = float(probe.get("timeoutSeconds", 1))
        failure_threshold = max(int(probe.get("failureThreshold", 3)), 1)
        delay = min(float(probe.get("initialDelaySeconds", 0)), cap)
        failures = 0
        probed: asyncio.subprocess.Process | None = None
        while not self._stopping:
            if "running" in container.state and container.process is not None:
                process = container.process
                if process is not probed:  # a (re)started container: counts start afresh
                    probed, failures = process, 0
                    await asyncio.sleep(delay)
                    continue
                try:
                    async with asyncio.timeout(timeout):
                        ok = await self._probe_once(container, probe)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # refused, timed out, a port name that is not there
                    log.debug("pod %s: %s of %s: %s", self, kind, container.name, exc)
                    ok = False
                failures = 0 if ok else failures + 1
                if kind == "readinessProbe":
                    if ok:
                        container.ready = True
                    elif failures >= failure_threshold or not container.ready:
                        container.ready = False
                    await self.report()
                elif failures >= failure_threshold and process is container.process:
                    log.info("pod %s: %s failed its liveness probe: killed", self, container.name)
                    failures = 0
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(process.pid, signal.SIGKILL)
            await asyncio.sleep(period if container.ready else min(period, 0.2))

    async def _probe_once(self, container: Container, probe: Json) -> bool:
        if "exec" in probe:
            assert container.process is not None
            command = probe["exec"].get("command") or []
            proc = await asyncio.create_subprocess_exec(
                "nsenter", "-t", str(container.process.pid), "-m", "-n", "-u", "--", *command,
                stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
                env=container.env, start_new_session=True,
            )  # fmt: skip
            try:
                return await proc.wait() == 0
            finally:
                if proc.returncode is None:  # timed out: the probe and all it started go
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(proc.pid, signal.SIGKILL)
                    await proc.wait()
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
            lines.append(f"{self.ip}\t{self.hostname}")
        for address, ns, names in self.runner.service_hosts():
            short = [n.removesuffix(f".{ns}") for n in names if n.endswith(f".{ns}")]
            shown = [*names, *short] if ns == self.namespace else names
            lines.append(f"{address}\t{' '.join(shown)}")
        text = "\n".join(lines) + "\n"
        path = self.dir / "hosts"
        if not path.exists() or path.read_text() != text:
            with path.open("w") as f:  # in place: the file is bind-mounted by inode
                f.write(text)

    def write_volumes(self, config_maps: podspec.Data, secrets: podspec.Data) -> None:
        """Write (or update) every volume's files; a changed file is replaced atomically.

        Files are staged outside the volume, so a reader never sees a half-written or stray
        file, and get the modes the volume asks for.
        """
        staging = self.dir / "staging"
        staging.mkdir(parents=True, exist_ok=True)
        for volume in self.pod["spec"].get("volumes") or []:
            files = podspec.volume_files(self.pod, volume, config_maps, secrets)
            base = self.dir / "volumes" / volume["name"]
            base.mkdir(parents=True, exist_ok=True)
            if self._volume_files.get(volume["name"]) == files:
                continue
            default_mode, modes = podspec.file_modes(volume)
            for relative, content in files.items():
                target = base / relative
                if ".." in Path(relative).parts or Path(relative).is_absolute():
                    raise podspec.PodSpecError(
                        "CreateContainerConfigError",
                        f"volume {volume['name']!r}: path {relative!r} leaves the volume",
                    )
                target.parent.mkdir(parents=True, exist_ok=True)
                temporary = staging / f"{volume['name']}.{target.name}"
                temporary.write_bytes(content)
                temporary.chmod(modes.get(relative, default_mode) & 0o7777)
                if target.is_dir():
                    shutil.rmtree(target)
                os.replace(temporary, target)
            for gone in set(self._volume_files.get(volume["name"], {})) - set(files):
                (base / gone).unlink(missing_ok=True)
            self._volume_files[volume["name"]] = files

    def refresh(self, pod: Json) -> None:
        """The API server's copy (or a ConfigMap or Secret) changed: keep volumes current."""
        self.pod["metadata"] = pod["metadata"]
        self._config_generation += 1
        waiters, self._config_waiters = self._config_waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)
        if self.ip and not self._released:
            try:
                self._write_current_volumes()
            except (podspec.PodSpecError, OSError) as exc:
                log.info("pod %s: volumes keep their last content: %s", self, exc)

    def log_tail(self, container: str, lines: int = 5) -> str:
        path = self.dir / "logs" / f"{container}.log"
        if not path.exists():
            return ""
        return " | ".join(path.read_text(errors="replace").strip().splitlines()[-lines:])

    # -- end ---------------------------------------------------------------------------------

    async def stop_processes(self, grace: float) -> None:
        """SIGTERM to each container, SIGKILL after `grace` to everything left in the pod."""
        self._stopping = True
        processes = [c.process for c in [*self.inits, *self.containers] if c.process]
        running = [p for p in processes if p.returncode is None]
        for process in running:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(grace):
                await asyncio.gather(*(p.wait() for p in running))
        for process in processes:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, signal.SIGKILL)
        await asyncio.to_thread(kill_all_in, self.netns)
        await asyncio.gather(*(p.wait() for p in running))

    async def release(self) -> None:
        """Free the sandbox of a pod that has finished (Failed, Succeeded): its processes and
        network namespace. The status keeps its podIP, as the kubelet's does."""
        if self._released:
            return
        self._released = True
        if self._adding is not None:
            with contextlib.suppress(Exception):
                await self._adding  # a namespace being made is finished before it is removed
        await asyncio.to_thread(self.runner.network.remove_pod, self.netns)

    async def terminate(self, grace: float) -> None:
        """Stop the containers (SIGTERM, then SIGKILL after `grace`) and free everything."""
        self._terminated = True
        if self._retry is not None:
            self._retry.cancel()
        current = asyncio.current_task()
        tasks = [t for t in [self.main, *self._tasks] if t is not current]
        for task in tasks:
            task.cancel()
        await self.stop_processes(grace)
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._released = False  # whatever happened before, make sure
        await self.release()
        await asyncio.to_thread(shutil.rmtree, self.dir, True)
