"""The node's network on its own (root, no API server): pods reach each other through the node's
bridge, sockets opened inside namespaces, nothing added to the host, and namespaces of a runner
that died are reaped by the next one."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tpcontrol.node import netns
from tpcontrol.node.netns import NodeNetwork, listen_in, namespaces, open_connection_in

from .helpers import run
from .node_helpers import require_root
from .test_node_k8s import root_network


def test_pods_talk_through_the_node_and_nothing_reaches_the_host() -> None:
    require_root()
    before = root_network()
    network = NodeNetwork(f"tpt-{os.urandom(3).hex()}")
    network.create()
    try:
        pod_a, ip_a = network.add_pod()
        pod_b, ip_b = network.add_pod()
        assert ip_a != ip_b
        network.add_cluster_ip("10.0.0.77")
        assert root_network() == before

        async def scenario() -> None:
            async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
                writer.write(b"from b: " + await reader.readline())
                await writer.drain()
                writer.close()

            sock = listen_in(pod_b, "0.0.0.0", 7000)
            server = await asyncio.start_server(answer, sock=sock)
            async with server:
                # pod a -> pod b, across the bridge
                reader, writer = await open_connection_in(pod_a, ip_b, 7000)
                writer.write(b"hi\n")
                assert await asyncio.wait_for(reader.readline(), 5) == b"from b: hi\n"
                writer.close()

        run(scenario(), timeout=30)
        network.remove_pod(pod_a)
        assert pod_a not in namespaces()
        _, fresh = network.add_pod()
        assert fresh not in (ip_a, ip_b)  # fresh addresses first: no stale neighbour entries
    finally:
        network.destroy()
    assert network.owned() == []
    assert root_network() == before


def test_inside_reports_a_missing_namespace() -> None:
    require_root()
    with pytest.raises(FileNotFoundError):
        netns.socket_in("tpt-no-such-namespace")


def test_namespaces_of_a_dead_runner_are_reaped_and_live_ones_kept() -> None:
    require_root()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale, live = f"tpt-{os.urandom(3).hex()}", f"tpt-{os.urandom(3).hex()}"
    netns.OWNERS_DIR.mkdir(parents=True, exist_ok=True)
    (netns.OWNERS_DIR / stale).write_text(json.dumps({"pid": dead.pid, "started": "1"}))
    me = {"pid": os.getpid(), "started": netns.start_time(os.getpid())}
    (netns.OWNERS_DIR / live).write_text(json.dumps(me))
    made = [stale, f"{stale}-p1", live]
    try:
        for name in made:
            subprocess.run(["ip", "netns", "add", name], check=True)
        removed = NodeNetwork.reap_stale()
        assert sorted(removed) == [stale, f"{stale}-p1"]
        assert live in namespaces()
        assert stale not in namespaces()
        assert not (netns.OWNERS_DIR / stale).exists()
    finally:
        for name in made:
            subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False)
        (netns.OWNERS_DIR / live).unlink(missing_ok=True)
        (netns.OWNERS_DIR / stale).unlink(missing_ok=True)


def test_mount_points_are_shared_between_runners_and_forbidden_places_refused() -> None:
    require_root()
    from tpcontrol.node import mountpoints

    users = [f"tpt-{os.urandom(3).hex()}" for _ in range(2)]
    me = json.dumps({"pid": os.getpid(), "started": netns.start_time(os.getpid())})
    base = Path(f"/srv/tpmp-{os.urandom(3).hex()}")
    try:
        for user in users:
            (netns.OWNERS_DIR / user).parent.mkdir(parents=True, exist_ok=True)
            (netns.OWNERS_DIR / user).write_text(me)
        a, b = users
        mountpoints.claim(str(base / "inner"), a, directory=True)
        mountpoints.claim(str(base), b, directory=True)  # exists already: made by a
        assert sorted(mountpoints.release(a)) == [str(base / "inner")]
        assert base.is_dir()  # b still uses it: never removed under b's container
        assert mountpoints.release(b) == [str(base)]
        assert not base.exists()
        for forbidden in ("/", "/proc/x", "/run/netns/x", str(netns.OWNERS_DIR / "tpn"), "/dev/x"):
            with pytest.raises(mountpoints.MountPointError, match="not allowed"):
                mountpoints.claim(forbidden, a, directory=True)
        with pytest.raises(mountpoints.MountPointError, match="needs an existing file"):
            mountpoints.claim(str(base / "file"), a, directory=False)
        assert not base.exists()  # nothing made for a refused file mount
    finally:
        for user in users:
            mountpoints.release(user)
            (netns.OWNERS_DIR / user).unlink(missing_ok=True)
