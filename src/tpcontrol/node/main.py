"""`tpcontrol node`: the node runner as a program, until SIGINT or SIGTERM, then clean up."""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import shutil
import sys

from tpcontrol.lifecycle import until_signalled


def problems(subnet: str) -> list[str]:
    """What keeps the runner from starting here (empty when it can)."""
    found = []
    if os.geteuid() != 0:
        found.append("must run as root (it creates network namespaces)")
    for tool in ("ip", "nsenter"):
        if shutil.which(tool) is None:
            found.append(f"{tool!r} not found (Debian packages iproute2, util-linux)")
    try:
        ipaddress.IPv4Network(subnet)
    except ValueError as exc:
        found.append(f"--subnet {subnet!r}: {exc}")
    return found


async def run_node(args: argparse.Namespace) -> int:
    from kubernetes_asyncio import client as k8s

    from tpcontrol.kube import api_client
    from tpcontrol.node.netns import NetworkError
    from tpcontrol.node.runner import NodeError, NodeRunner, NodeSettings

    labels = {}
    for item in args.namespace_label:
        label, sep, value = item.partition("=")
        if not sep or not label:
            print(
                f"tpcontrol: error: --namespace-label {item!r}: expected KEY=VALUE", file=sys.stderr
            )
            return 2
        labels[label] = value
    found = problems(args.subnet)
    if found:
        print("tpcontrol: error: node: " + "; ".join(found), file=sys.stderr)
        return 2
    settings = NodeSettings(
        node_name=args.node_name,
        namespace_labels=labels,
        subnet=args.subnet,
        agent_images=tuple(args.node_agent_images),
    )
    async with api_client(args.kubeconfig) as api:
        node = NodeRunner(api, settings)
        try:
            await node.start()
        except (NodeError, NetworkError, k8s.ApiException, TimeoutError) as exc:
            print(f"tpcontrol: error: node: {exc}", file=sys.stderr)
            return 1
        try:
            summary = {
                "node": node.name,
                "netns": node.network.node_ns,
                "nodeIP": node.network.node_ip,
            }
            print(json.dumps(summary), flush=True)
            await until_signalled()
        finally:
            await node.stop()
    return 0
