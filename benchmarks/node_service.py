"""The local node's Service path against a direct connection to the pod and against kube-proxy's
own mechanism (an iptables DNAT rule in the kernel), in one run.

A local control plane and node run one pod with nginx (configured from a ConfigMap volume) and
an iperf3 server. From inside the node's network namespace, `wrk -c1` (latency), `wrk -c50`
(request rate) and iperf3 (bulk) go three ways: to the pod's IP, to the Service's cluster IP
(the runner's tpproxy relays), and to a second address that an iptables DNAT rule in the node's
namespace sends to the pod (what kube-proxy does). Rounds alternate the three; medians are
printed with ratios to the direct path. Root only; nothing touches the host's namespace.

    .venv/bin/python benchmarks/node_service.py [--rounds 3] [--duration 5] [--bulk 1G]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import shutil
import statistics
import subprocess
import sys
import time
from typing import Any, cast

import uvloop
from kubernetes_asyncio import client as k8s

from tpcontrol.localcluster import LocalControlPlane, wait_for_service_account
from tpcontrol.node.runner import NodeRunner, NodeSettings

NGINX = """
worker_processes 1;
pid /tmp/nginx.pid;
error_log /dev/stderr;
events { worker_connections 1024; }
http {
  access_log off;
  client_body_temp_path /tmp; proxy_temp_path /tmp; fastcgi_temp_path /tmp;
  uwsgi_temp_path /tmp; scgi_temp_path /tmp;
  server { listen 8080; location / { return 200 "ok\\n"; } }
}
"""
DNAT_IP = "10.96.99.99"


def in_node(netns: str, *argv: str, timeout: float) -> str:
    done = subprocess.run(
        ["ip", "netns", "exec", netns, *argv],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=True,
    )
    return done.stdout


def wrk(netns: str, url: str, connections: int, seconds: int) -> tuple[float, float]:
    """req/s and p50 (us)."""
    out = in_node(
        netns, "wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--latency", url,
        timeout=seconds + 30,
    )  # fmt: skip
    if "Non-2xx" in out or "Socket errors" in out:
        raise RuntimeError(f"wrk saw errors:\n{out}")
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out)[1])  # type: ignore[index]
    value, unit = re.search(r"\s50%\s+([\d.]+)(us|ms|s)", out).groups()  # type: ignore[union-attr]
    return rps, float(value) * {"us": 1, "ms": 1000, "s": 1e6}[unit]


def iperf(netns: str, host: str, port: int, size: str) -> float:
    """Gbit/s received; an iperf3 server still finishing the last test says "busy": retried."""
    for _attempt in range(10):
        try:
            out = in_node(
                netns, "iperf3", "-c", host, "-p", str(port), "-n", size, "-J", timeout=300
            )
        except subprocess.CalledProcessError as exc:
            out = exc.stdout or "{}"
        report = json.loads(out)
        if "sum_received" in report.get("end", {}):
            return float(report["end"]["sum_received"]["bits_per_second"]) / 1e9
        time.sleep(0.5)
    raise RuntimeError(f"iperf3 to {host}:{port} kept failing: {report.get('error')}")


async def measure(args: argparse.Namespace) -> int:
    with LocalControlPlane() as plane:
        async with plane.api() as api:
            core, apps = k8s.CoreV1Api(api), k8s.AppsV1Api(api)
            await core.create_namespace(cast(Any, {"metadata": {"name": "bench"}}))
            await wait_for_service_account(api, "bench")
            async with NodeRunner(api, NodeSettings(node_name="bench-node")) as node:
                netns = node.network.node_ns
                await core.create_namespaced_config_map(
                    "bench",
                    cast(Any, {"metadata": {"name": "nginx"}, "data": {"nginx.conf": NGINX}}),
                )
                image = "tpcontrol.example/http-echo:1"  # any mapped image: commands are given
                containers = [
                    {
                        "name": "nginx",
                        "image": image,
                        "command": ["nginx", "-c", "/etc/bench/nginx.conf", "-g", "daemon off;"],
                        "ports": [{"name": "http", "containerPort": 8080}],
                        "volumeMounts": [{"name": "conf", "mountPath": "/etc/bench"}],
                        "readinessProbe": {"tcpSocket": {"port": 8080}, "periodSeconds": 1},
                    },
                    {
                        "name": "iperf",
                        "image": image,
                        "command": ["iperf3", "-s", "-p", "5201"],
                        "ports": [{"name": "bulk", "containerPort": 5201}],
                        "readinessProbe": {"tcpSocket": {"port": 5201}, "periodSeconds": 1},
                    },
                ]
                template = {
                    "metadata": {"labels": {"app": "bench"}},
                    "spec": {
                        "containers": containers,
                        "volumes": [{"name": "conf", "configMap": {"name": "nginx"}}],
                    },
                }
                deployment = {
                    "metadata": {"name": "bench"},
                    "spec": {"selector": {"matchLabels": {"app": "bench"}}, "template": template},
                }
                await apps.create_namespaced_deployment("bench", cast(Any, deployment))
                service = {
                    "metadata": {"name": "bench"},
                    "spec": {
                        "selector": {"app": "bench"},
                        "ports": [
                            {"name": "http", "port": 80, "targetPort": "http"},
                            {"name": "bulk", "port": 5201, "targetPort": "bulk"},
                        ],
                    },
                }
                created = await core.create_namespaced_service("bench", cast(Any, service))
                cluster_ip = created.spec.cluster_ip
                async with asyncio.timeout(60):
                    while not all(node.proxy.frontends.get((cluster_ip, p)) for p in (80, 5201)):
                        await asyncio.sleep(0.1)
                (pod,) = list(node.workers.values())
                pod_ip = pod.ip
                # kube-proxy's way: the virtual IP routes locally, then DNAT sends it to the pod.
                in_node(netns, "ip", "addr", "add", f"{DNAT_IP}/32", "dev", "lo", timeout=10)
                for port, target in ((80, 8080), (5201, 5201)):
                    in_node(
                        netns, "iptables", "-t", "nat", "-A", "OUTPUT", "-d", DNAT_IP, "-p", "tcp",
                        "--dport", str(port), "-j", "DNAT", "--to-destination",
                        f"{pod_ip}:{target}", timeout=10,
                    )  # fmt: skip
                paths = {
                    "direct (pod IP)": (pod_ip, 8080, 5201),
                    "iptables DNAT (kube-proxy)": (DNAT_IP, 80, 5201),
                    "tpcontrol node Service": (cluster_ip, 80, 5201),
                }
                results: dict[str, dict[str, list[float]]] = {
                    p: {"p50": [], "c50": [], "bulk": []} for p in paths
                }
                for round_ in range(args.rounds):
                    for name, (host, http, bulk) in paths.items():
                        _, p50 = await asyncio.to_thread(
                            wrk, netns, f"http://{host}:{http}/", 1, args.duration
                        )
                        rps, _ = await asyncio.to_thread(
                            wrk, netns, f"http://{host}:{http}/", 50, args.duration
                        )
                        gbit = await asyncio.to_thread(iperf, netns, host, bulk, args.bulk)
                        results[name]["p50"].append(p50)
                        results[name]["c50"].append(rps)
                        results[name]["bulk"].append(gbit)
                        print(
                            f"round {round_ + 1} {name:<28} p50 {p50:7.0f} us  "
                            f"c50 {rps:9.0f} req/s  bulk {gbit:6.2f} Gbit/s",
                            flush=True,
                        )
    med = {p: {k: statistics.median(v) for k, v in r.items()} for p, r in results.items()}
    base = med["direct (pod IP)"]
    print(f"\nmedians of {args.rounds} rounds (ratios to direct):")
    print(
        f"{'path':<28} {'p50 us':>8} {'added':>7} {'c50 req/s':>10} {'ratio':>6} {'Gbit/s':>7} {'ratio':>6}"
    )
    for name, m in med.items():
        print(
            f"{name:<28} {m['p50']:8.0f} {m['p50'] - base['p50']:+7.0f} {m['c50']:10.0f} "
            f"{m['c50'] / base['c50']:6.2f} {m['bulk']:7.2f} {m['bulk'] / base['bulk']:6.2f}"
        )
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=int, default=5)
    parser.add_argument("--bulk", default="1G")
    args = parser.parse_args()
    for tool in ("wrk", "iperf3", "nginx", "iptables"):
        if shutil.which(tool) is None:
            print(f"missing {tool}: apt-get install -y {tool}", file=sys.stderr)
            return 2
    return uvloop.run(measure(args))  # as `tpcontrol node` runs


if __name__ == "__main__":
    raise SystemExit(main())
