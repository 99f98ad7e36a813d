"""Added latency and throughput of an intercept through agent + manager + client, against the
same requests sent straight to the developer's process, in one run.

Every part runs as its own process, as it would in use: a local control plane (for the manager),
`tpcontrol manager`, `tpproxy agent` (from the entry the manager stored), `tpcontrol intercept`
(the client, holding the tunnel), and the developer's process (nginx for HTTP, iperf3 for bulk).
Load: `wrk -c1` for latency, `iperf3` for throughput. Loopback only; every wait is bounded.

    .venv/bin/python benchmarks/tunnel.py [--duration 10] [--bulk 1G]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tpcontrol.kube.configmap import AgentConfigStore
from tpcontrol.localcluster import LocalControlPlane
from tpproxy.config import encode_sidecar

HOST = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        port: int = s.getsockname()[1]
        return port


def wait_port(port: int, within: float = 20) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            socket.create_connection((HOST, port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"port {port} never opened")


def wrk(url: str, seconds: int, header: str | None) -> tuple[float, float, float]:
    """req/s, p50 and p99 (us) at concurrency 1."""
    args = ["wrk", "-t1", "-c1", f"-d{seconds}s", "--latency", url]
    if header:
        args[1:1] = ["-H", header]
    out = subprocess.run(
        args, capture_output=True, text=True, timeout=seconds + 30, check=True
    ).stdout
    if "Non-2xx" in out or "Socket errors" in out:
        raise RuntimeError(f"wrk saw errors:\n{out}")
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out)[1])  # type: ignore[index]

    def pct(p: str) -> float:
        value, unit = re.search(rf"\s{p}%\s+([\d.]+)(us|ms|s)", out).groups()  # type: ignore[union-attr]
        return float(value) * {"us": 1, "ms": 1000, "s": 1e6}[unit]

    return rps, pct("50"), pct("99")


def iperf(port: int, size: str) -> float:
    out = subprocess.run(
        ["iperf3", "-c", HOST, "-p", str(port), "-n", size, "-J"],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    ).stdout
    return float(json.loads(out)["end"]["sum_received"]["bits_per_second"]) / 1e9


async def prepare_cluster(
    plane: LocalControlPlane, ns: str, http_port: int, bulk_port: int
) -> None:
    async with plane.api() as api:
        from kubernetes_asyncio import client as k8s

        await k8s.CoreV1Api(api).create_namespace({"metadata": {"name": ns}})  # type: ignore[arg-type]
        container = {
            "name": "app",
            "image": "app",
            "ports": [
                {"name": "http", "containerPort": http_port},
                {"name": "bulk", "containerPort": bulk_port},
            ],
        }
        await k8s.CoreV1Api(api).create_namespaced_service(
            ns,
            {  # type: ignore[arg-type]
                "metadata": {"name": "app"},
                "spec": {
                    "selector": {"app": "app"},
                    "ports": [
                        {"name": "http", "port": 80, "targetPort": "http"},
                        {"name": "bulk", "port": 5201, "targetPort": "bulk"},
                    ],
                },
            },
        )
        await k8s.AppsV1Api(api).create_namespaced_deployment(
            ns,
            {  # type: ignore[arg-type]
                "metadata": {"name": "app"},
                "spec": {
                    "selector": {"matchLabels": {"app": "app"}},
                    "template": {
                        "metadata": {"labels": {"app": "app"}},
                        "spec": {"containers": [container]},
                    },
                },
            },
        )


async def stored_entry(plane: LocalControlPlane, ns: str, path: Path) -> None:
    async with plane.api() as api:
        store = AgentConfigStore(api)
        async with asyncio.timeout(30):
            while (entry := await store.get(ns, "app")) is None:
                await asyncio.sleep(0.05)
        await asyncio.to_thread(path.write_bytes, encode_sidecar(entry))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=int, default=10)
    parser.add_argument("--bulk", default="1G")
    args = parser.parse_args()
    for tool in ("wrk", "iperf3", "nginx"):
        if shutil.which(tool) is None:
            print(f"missing {tool}: apt-get install -y {tool}", file=sys.stderr)
            return 2
    venv = Path(sys.executable).parent
    work = Path(tempfile.mkdtemp(prefix="tunnel-bench-"))
    procs: list[subprocess.Popen[bytes]] = []

    def spawn(
        name: str, argv: list[str], env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        log = (work / f"{name}.log").open("wb")
        proc = subprocess.Popen(
            argv, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}
        )
        procs.append(proc)
        return proc

    dev_http, dev_bulk = free_port(), free_port()
    app_http, app_bulk = free_port(), free_port()
    manager_port, agent_http, agent_bulk = free_port(), 0, 0
    ns = "bench"
    try:
        (work / "nginx.conf").write_text(
            f"worker_processes 1; daemon off; pid {work}/nginx.pid; error_log {work}/nginx.err;\n"
            "events { worker_connections 1024; }\n"
            f"http {{ access_log off; client_body_temp_path {work}; proxy_temp_path {work};\n"
            f"  fastcgi_temp_path {work}; uwsgi_temp_path {work}; scgi_temp_path {work};\n"
            f'  server {{ listen {HOST}:{dev_http}; keepalive_requests 10000000; return 200 "dev"; }}\n'
            f'  server {{ listen {HOST}:{app_http}; keepalive_requests 10000000; return 200 "app"; }} }}\n'
        )
        spawn("nginx", ["nginx", "-c", str(work / "nginx.conf")])
        spawn("iperf-dev", ["iperf3", "-s", "-B", HOST, "-p", str(dev_bulk)])
        spawn("iperf-app", ["iperf3", "-s", "-B", HOST, "-p", str(app_bulk)])
        for port in (dev_http, app_http, dev_bulk, app_bulk):
            wait_port(port)
        with LocalControlPlane(controller_manager=False) as plane:
            asyncio.run(prepare_cluster(plane, ns, app_http, app_bulk))
            spawn(
                "manager",
                [
                    str(venv / "tpcontrol"),
                    "manager",
                    "--listen",
                    f"{HOST}:{manager_port}",
                    "--kubeconfig",
                    str(plane.kubeconfig),
                    "--agent-port",
                    str(free_port()),
                    # The agent runs outside a pod (no kubelet here), so it has no pod-bound
                    # token: permissive lets it in. The clients present the admin kubeconfig's
                    # token as in use, so their calls and tunnel streams pay for the checks.
                    "--auth-mode",
                    "permissive",
                    "--login-port",
                    "-1",
                ],
            )
            wait_port(manager_port)
            manager = f"http://{HOST}:{manager_port}"
            spawn(
                "client-http",
                [
                    str(venv / "tpcontrol"),
                    "intercept",
                    "app",
                    "-n",
                    ns,
                    "--port",
                    "http",
                    "--to",
                    str(dev_http),
                    "--http-header",
                    "x-dev=me",
                    "--manager",
                    manager,
                    "--kubeconfig",
                    str(plane.kubeconfig),
                ],
            )
            asyncio.run(stored_entry(plane, ns, work / "config.yaml"))
            config = (work / "config.yaml").read_text()
            agent_http, agent_bulk = [int(p) for p in re.findall(r"agentPort: (\d+)", config)][:2]
            spawn(
                "agent",
                [
                    str(venv / "tpproxy"),
                    "agent",
                    "--config",
                    str(work / "config.yaml"),
                    "--manager-url",
                    manager,
                    "--listen-host",
                    HOST,
                    "--admin",
                    "off",
                    "--log-level",
                    "warning",
                ],
            )
            wait_port(agent_http)
            spawn(
                "client-bulk",
                [
                    str(venv / "tpcontrol"),
                    "intercept",
                    "app",
                    "-n",
                    ns,
                    "--port",
                    "bulk",
                    "--to",
                    str(dev_bulk),
                    "--manager",
                    manager,
                    "--kubeconfig",
                    str(plane.kubeconfig),
                ],
            )
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                listed = subprocess.run(
                    [str(venv / "tpcontrol"), "list", "--manager", manager],
                    capture_output=True,
                    text=True,
                    check=False,
                ).stdout
                if listed.count("ACTIVE") == 2:
                    break
                time.sleep(0.2)
            else:
                raise TimeoutError(f"intercepts not active:\n{listed}")
            rows = []
            for label, url, header in (
                ("direct to the developer's process", f"http://{HOST}:{dev_http}/", None),
                ("through agent, not intercepted (app)", f"http://{HOST}:{agent_http}/", None),
                (
                    "intercepted: agent + manager + client",
                    f"http://{HOST}:{agent_http}/",
                    "x-dev: me",
                ),
            ):
                rows.append((label, *wrk(url, args.duration, header)))
            direct_bulk = iperf(dev_bulk, args.bulk)
            tunnel_bulk = iperf(agent_bulk, args.bulk)
        print(f"# Intercept through the tunnel (wrk -c1 {args.duration}s; iperf3 {args.bulk})\n")
        print("| path | req/s c=1 | p50 (us) | p99 (us) | added p50 (us) |")
        print("|---|---:|---:|---:|---:|")
        for label, rps, p50, p99 in rows:
            print(f"| {label} | {rps:.0f} | {p50:.0f} | {p99:.0f} | {p50 - rows[0][2]:+.0f} |")
        print(
            f"\nbulk: direct {direct_bulk:.2f} Gbit/s, intercepted {tunnel_bulk:.2f} Gbit/s "
            f"({tunnel_bulk / direct_bulk:.2f}x)"
        )
        return 0
    finally:
        for proc in reversed(procs):
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
