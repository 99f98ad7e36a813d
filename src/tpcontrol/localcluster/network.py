"""The local cluster's network: one namespace, one veth pair to the host, nothing else.

Every process of the cluster (etcd, the API server, containerd, kubelet, kube-proxy, the DNS)
runs inside the namespace `NodeNetwork.name`, with the CNI bridge and the pods behind it. The host
gets one interface, the host end of the veth with a /30 on it, and no route, iptables rule or
sysctl: it reaches the API server at the node's end of the veth, and pods only through the API
(port-forward). Deleting the namespace removes the veth, so a crashed run leaves nothing that the
next start's `NodeNetwork.delete` does not remove.

Sockets are opened *inside* the namespace by a short-lived thread that joins it (`setns` is per
thread); that is how the demo and the tests reach cluster IPs from the host.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

CLONE_NEWNET = 0x40000000
NETNS_DIR = Path("/run/netns")
T = TypeVar("T")

_libc = ctypes.CDLL(None, use_errno=True)


class NetworkError(RuntimeError):
    """An `ip` or `sysctl` command failed; the message has the command and what it printed."""


def run(*argv: str) -> str:
    """Run one command (iproute2, sysctl); raise `NetworkError` naming it when it fails."""
    done = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=30)
    if done.returncode != 0:
        raise NetworkError(f"{' '.join(argv)}: {done.stderr.strip() or done.returncode}")
    return done.stdout


@dataclass(frozen=True)
class NodeNetwork:
    """The names and addresses of the cluster's namespace and veth pair."""

    name: str = "tpcontrol"
    host_if: str = "tpcontrol0"
    host_ip: str = "10.250.0.1"
    node_ip: str = "10.250.0.2"
    prefix_len: int = 30
    pod_cidr: str = "10.244.0.0/24"
    service_cidr: str = "10.96.0.0/24"

    @classmethod
    def numbered(cls, name: str, number: int) -> NodeNetwork:
        """The network of cluster `name`: its own namespace, veth name and /30 (10.250.N.0),
        so clusters of different names on one machine never share an address."""
        if not 0 <= number <= 255:
            raise ValueError(f"cluster network number {number}: must be from 0 to 255")
        return cls(
            name=f"tpc-{name}"[:15],
            host_if=f"tpc-{name}"[:15],
            host_ip=f"10.250.{number}.1",
            node_ip=f"10.250.{number}.2",
        )

    @property
    def path(self) -> Path:
        return NETNS_DIR / self.name

    @property
    def prefix(self) -> list[str]:
        """The command prefix that runs a program in the namespace and nowhere else: `ip netns
        exec` would also give it a mount namespace with a remounted /sys, hiding the cgroups
        that kubelet and containerd must share with the host."""
        return ["nsenter", f"--net={self.path}", "--"]

    def exists(self) -> bool:
        return self.path.exists()

    def create(self) -> None:
        """The namespace, the veth pair, the node's sysctls and its one route."""
        run("ip", "netns", "add", self.name)
        try:
            run("ip", "link", "add", self.host_if, "type", "veth", "peer", "name", "eth0",
                "netns", self.name)  # fmt: skip
            run("ip", "addr", "add", f"{self.host_ip}/{self.prefix_len}", "dev", self.host_if)
            run("ip", "link", "set", self.host_if, "up")
            run("ip", "-n", self.name, "link", "set", "lo", "up")
            run("ip", "-n", self.name, "addr", "add", f"{self.node_ip}/{self.prefix_len}",
                "dev", "eth0")  # fmt: skip
            run("ip", "-n", self.name, "link", "set", "eth0", "up")
            # No default route: nothing in the cluster can head anywhere but the host's end of
            # the veth. Cluster IPs need a route for locally generated packets, because the
            # route lookup comes before kube-proxy's OUTPUT DNAT.
            run("ip", "-n", self.name, "route", "add", self.service_cidr, "dev", "eth0")
            run(*self.prefix, "sysctl", "-qw", "net.ipv4.ip_forward=1")
            if not Path("/proc/sys/net/bridge").is_dir():
                raise NetworkError(
                    "the kernel's br_netfilter is not loaded (`modprobe br_netfilter`): "
                    "kube-proxy's rules would not see the pods' bridged traffic"
                )
            run(*self.prefix, "sysctl", "-qw", "net.bridge.bridge-nf-call-iptables=1")
            # Pods reach the API server (the node's own address) but nothing on the host.
            run(*self.prefix, "iptables", "-w", "-I", "FORWARD", "-s", self.pod_cidr,
                "-d", self.host_ip, "-j", "REJECT")  # fmt: skip
        except BaseException:
            self.delete()
            raise

    def delete(self) -> None:
        """Remove the namespace (and with it the veth); killing what still runs in it first,
        since a namespace with processes outlives its name."""
        kill_all_in(self)
        if self.exists():
            run("ip", "netns", "del", self.name)
        with contextlib.suppress(NetworkError):
            run("ip", "link", "del", self.host_if)  # only if a half-made pair was left


def processes_in(network: NodeNetwork) -> list[int]:
    """Every process whose network namespace is the cluster's: the cluster's own programs and
    the containerd shims they started (pods' processes are in their pods' namespaces)."""
    try:
        inode = network.path.stat().st_ino
    except OSError:
        return []
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if (entry / "ns" / "net").stat().st_ino == inode:
                    found.append(int(entry.name))
            except OSError:
                continue  # gone meanwhile
    return found


def kill_all_in(network: NodeNetwork) -> int:
    """SIGKILL every process of the namespace; returns how many were signalled."""
    killed = 0
    for pid in processes_in(network):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
            killed += 1
    return killed


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


def inside(network: NodeNetwork, work: Callable[[], T]) -> T:
    """Run `work` on a thread that has joined the namespace; sockets it makes stay in there."""
    result: list[T] = []
    failure: list[BaseException] = []

    def thread() -> None:
        try:
            with open(network.path) as target:
                _setns(target.fileno())
            result.append(work())  # the thread ends here: it never goes back to the host
        except BaseException as exc:  # handed to the caller below
            failure.append(exc)

    worker = threading.Thread(target=thread, name=f"netns-{network.name}")
    worker.start()
    worker.join()
    if failure:
        raise failure[0]
    return result[0]


async def open_connection_in(
    network: NodeNetwork, host: str, port: int, within: float = 5.0
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """`asyncio.open_connection` to `host:port` as seen from inside the cluster's namespace
    (cluster IPs go through kube-proxy's rules there)."""

    def make() -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        return sock

    sock = inside(network, make)
    try:
        async with asyncio.timeout(within):
            await asyncio.get_running_loop().sock_connect(sock, (host, port))
    except BaseException:
        sock.close()
        raise
    return await asyncio.open_connection(sock=sock)
