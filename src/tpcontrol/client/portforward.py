"""How a developer's commands reach an in-cluster traffic-manager: `kubectl port-forward`.

The manager's API, tunnel and login ports are forwarded through the Kubernetes API with the user's
kubeconfig (the credentials the user already has; no Service needs to be exposed). kubectl
forwards to one pod of the Service: when that pod is replaced (a rollout, a deleted pod) the
forward stops carrying, so `ManagerForward.restart` starts a new kubectl on the *same* local
ports, and the client's open sessions and tunnel streams reconnect to the same addresses.
"""

from __future__ import annotations

import asyncio
import contextlib
import re

from tpcontrol import names
from tpcontrol.lifecycle import child_options, wait_or_kill
from tpcontrol.names import MANAGER_PORT

API_PORT, TUNNEL_PORT, LOGIN_PORT = MANAGER_PORT, names.TUNNEL_PORT, names.LOGIN_PORT
_FORWARDING = re.compile(r"Forwarding from 127\.0\.0\.1:(\d+) ->")


class ForwardError(RuntimeError):
    """kubectl is missing or the forward did not start; the message says which and why."""


def forwarded_port(line: str) -> int | None:
    """The local port in a `kubectl port-forward` line, e.g. `Forwarding from 127.0.0.1:41234
    -> 8081`; None for any other line."""
    match = _FORWARDING.search(line)
    return int(match[1]) if match else None


class ManagerForward:
    """`kubectl port-forward -n NAMESPACE svc/NAME LOCAL:8081 LOCAL:8082 LOCAL:8083`, kept
    running."""

    def __init__(self, target: str, kubeconfig: str | None = None, within: float = 20) -> None:
        namespace, _, name = target.partition("/")
        if not namespace or not name or "/" in name:
            raise ForwardError(f"--port-forward {target!r}: expected NAMESPACE/SERVICE")
        self.target = target
        self.namespace, self.service = namespace, name
        self.kubeconfig = kubeconfig
        self.within = within
        self.api_port = 0  # the local ends, chosen by kubectl the first time, then kept
        self.tunnel_port = 0
        self.login_port = 0
        self._proc: asyncio.subprocess.Process | None = None
        self._lock = asyncio.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    @property
    def login_url(self) -> str:
        return f"https://127.0.0.1:{self.login_port}"

    async def start(self) -> None:
        async with self._lock:
            await self._start()

    async def _start(self) -> None:
        local = [str(p or "") for p in (self.api_port, self.tunnel_port, self.login_port)]
        argv = ["kubectl", "port-forward", "-n", self.namespace, f"svc/{self.service}",
                f"{local[0]}:{API_PORT}", f"{local[1]}:{TUNNEL_PORT}",
                f"{local[2]}:{LOGIN_PORT}"]  # fmt: skip
        if self.kubeconfig:
            argv[1:1] = ["--kubeconfig", self.kubeconfig]
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
                # Not killed by the terminal's Ctrl-C with us: we still need it to leave.
                **child_options(),  # type: ignore[arg-type]
            )
        except FileNotFoundError:
            raise ForwardError(
                "reaching the traffic-manager through the cluster needs kubectl on the PATH "
                "(or give --manager URL)"
            ) from None
        assert proc.stdout is not None
        ports: list[int] = []
        said: list[str] = []
        try:
            async with asyncio.timeout(self.within):
                while line := (await proc.stdout.readline()).decode():
                    port = forwarded_port(line)
                    if port is None:
                        said.append(line.strip())
                    else:
                        ports.append(port)
                    if len(ports) == 3:  # kubectl prints the forwards in the order asked
                        self.api_port, self.tunnel_port, self.login_port = ports
                        self._proc = proc
                        asyncio.get_running_loop().create_task(_drain(proc))
                        return
        except TimeoutError:
            said.append(f"no forward after {self.within:.0f} s")
        with contextlib.suppress(ProcessLookupError):
            proc.kill()  # it may have ended by itself already
        await proc.wait()
        why = "; ".join(s for s in said if s)[-300:] or f"kubectl exited with {proc.returncode}"
        raise ForwardError(f"kubectl port-forward to {self.target}: {why}")

    async def restart(self) -> None:
        """A new kubectl on the same local ports (the pod behind the Service may have changed)."""
        async with self._lock:
            await self._stop()
            await self._start()

    async def stop(self) -> None:
        async with self._lock:
            await self._stop()

    async def _stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.terminate()
            await wait_or_kill(proc, within=5)

    async def __aenter__(self) -> ManagerForward:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


async def _drain(proc: asyncio.subprocess.Process) -> None:
    """Read kubectl's chatter ("Handling connection for ...") so its pipe never fills."""
    assert proc.stdout is not None
    with contextlib.suppress(OSError, ValueError):
        while await proc.stdout.readline():
            pass
