"""The node's network, made of namespaces the runner creates and nothing else.

One *node* namespace holds a bridge (the node's address is the bridge's) and the Services' cluster
IPs; each pod gets a namespace of its own joined to the bridge by a veth pair whose two ends are
created directly inside the node and pod namespaces. So no interface, address or route is ever
added to the namespace the runner was started in, and deleting the runner's namespaces removes
everything it made. Sockets are opened *inside* a namespace by a short-lived thread that joins it
(`setns` is per thread), which is how the runner, the tests and the demo reach cluster IPs and
pod IPs from the host.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import fcntl
import ipaddress
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

log = logging.getLogger("tpcontrol.node")

CLONE_NEWNET = 0x40000000
NETNS_DIR = Path("/run/netns")
OWNERS_DIR = Path("/run/tpcontrol-node")  # <prefix> -> the pid of the runner that owns it
T = TypeVar("T")

_libc = ctypes.CDLL(None, use_errno=True)


class NetworkError(RuntimeError):
    """An `ip` command failed; the message has the command and what it printed."""


def ip(*args: str) -> None:
    """Run one iproute2 command; raise `NetworkError` naming it when it fails."""
    done = subprocess.run(["ip", *args], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise NetworkError(f"ip {' '.join(args)}: {done.stderr.strip() or done.returncode}")


def setns(fd: int) -> None:
    """Move the calling thread into the network namespace open at `fd`."""
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


def inside(namespace: str, work: Callable[[], T]) -> T:
    """Run `work` on a thread that has joined `namespace`; sockets it makes stay in there."""
    result: list[T] = []
    failure: list[BaseException] = []

    def thread() -> None:
        try:
            with open(NETNS_DIR / namespace) as target:
                setns(target.fileno())
            result.append(work())  # the thread ends here: it never goes back to the host
        except BaseException as exc:  # handed to the caller below
            failure.append(exc)

    worker = threading.Thread(target=thread, name=f"netns-{namespace}")
    worker.start()
    worker.join()
    if failure:
        raise failure[0]
    return result[0]


def socket_in(namespace: str, *, nonblocking: bool = True) -> socket.socket:
    """A TCP socket that lives in `namespace`."""

    def make() -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(not nonblocking)
        return sock

    return inside(namespace, make)


def listen_in(namespace: str, host: str, port: int, backlog: int = 512) -> socket.socket:
    """A listening TCP socket bound to `host:port` inside `namespace`."""

    def make() -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
            sock.listen(backlog)
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        return sock

    return inside(namespace, make)


async def connect_in(namespace: str, host: str, port: int, within: float = 5.0) -> socket.socket:
    """A connected, non-blocking socket to `host:port` as seen from inside `namespace`."""
    sock = socket_in(namespace)
    try:
        async with asyncio.timeout(within):
            await asyncio.get_running_loop().sock_connect(sock, (host, port))
    except BaseException:
        sock.close()
        raise
    return sock


async def open_connection_in(
    namespace: str, host: str, port: int, within: float = 5.0
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """`asyncio.open_connection`, from inside `namespace`."""
    sock = await connect_in(namespace, host, port, within)
    return await asyncio.open_connection(sock=sock)


def processes_in(namespace: str) -> list[int]:
    """Every process whose network namespace is `namespace` (for a pod: all it started,
    whatever became of their sessions and parents)."""
    try:
        inode = (NETNS_DIR / namespace).stat().st_ino
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


def kill_all_in(namespace: str) -> int:
    """SIGKILL every process of `namespace`; returns how many were signalled."""
    killed = 0
    for pid in processes_in(namespace):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
            killed += 1
    return killed


def start_time(pid: int) -> str:
    """When a process started (clock ticks since boot), to tell a pid from its reuse."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    return stat.rsplit(")", 1)[1].split()[19]


def namespaces() -> list[str]:
    """The named network namespaces that exist now."""
    if not NETNS_DIR.is_dir():
        return []
    return sorted(p.name for p in NETNS_DIR.iterdir())


PREFIX = re.compile(r"tp[a-z]-[0-9a-f]{6}")  # a runner's prefix: `tpn-` and six hex digits


def _owner(marker: Path) -> dict[str, object]:
    try:
        found = json.loads(marker.read_text())
    except (OSError, ValueError):
        return {}
    if isinstance(found, int) and not isinstance(found, bool):  # the first format: a bare pid
        return {"pid": found, "started": start_time(found)}
    return found if isinstance(found, dict) else {}


@contextlib.contextmanager
def _owners_locked() -> Iterator[None]:
    """One runner at a time registers or reaps (a half-written marker is never judged)."""
    OWNERS_DIR.mkdir(parents=True, exist_ok=True)
    with (OWNERS_DIR / ".owners.lock").open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def owner_alive(owner: dict[str, object]) -> bool:
    """Whether the runner a marker names still runs (same pid, same start time)."""
    pid = owner.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return False
    return start_time(pid) == owner.get("started") != ""


def live_owner(prefix: str) -> dict[str, object] | None:
    """The marker of a runner that still runs under `prefix`, if any."""
    owner = _owner(OWNERS_DIR / prefix)
    return owner if owner_alive(owner) else None


@dataclass
class NodeNetwork:
    """The node namespace, its bridge and the pod namespaces attached to it.

    `prefix` names every namespace this network makes (`<prefix>` for the node, `<prefix>-p<n>`
    for pods), so what a runner owns can be told apart from anything else on the machine.
    """

    prefix: str
    work: str = ""  # the runner's work directory, removed by `reap_stale` if the runner dies
    subnet: ipaddress.IPv4Network = field(
        default_factory=lambda: ipaddress.IPv4Network("10.244.0.0/16")
    )
    node_ns: str = field(init=False)
    node_ip: str = field(init=False)
    _hosts: ipaddress.IPv4Network = field(init=False)
    _free: list[ipaddress.IPv4Address] = field(init=False, default_factory=list)
    _next: int = field(init=False, default=2)
    _pods: dict[str, str] = field(init=False, default_factory=dict)  # namespace -> pod IP
    _cluster_ips: set[str] = field(init=False, default_factory=set)
    _lock: threading.Lock = field(init=False, default_factory=threading.Lock)
    _counter: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        self.node_ns = self.prefix
        self.node_ip = str(self.subnet.network_address + 1)

    def create(self) -> None:
        """Make the node namespace with its bridge; the bridge has the node's address."""
        owner = {"pid": os.getpid(), "started": start_time(os.getpid()), "work": self.work}
        with _owners_locked():
            temporary = OWNERS_DIR / f".{self.prefix}.tmp"
            temporary.write_text(json.dumps(owner))
            temporary.replace(OWNERS_DIR / self.prefix)
        ip("netns", "add", self.node_ns)
        try:
            ns = self.node_ns
            ip("-n", ns, "link", "set", "lo", "up")
            ip("-n", ns, "link", "add", "br0", "type", "bridge")
            ip("-n", ns, "addr", "add", f"{self.node_ip}/{self.subnet.prefixlen}", "dev", "br0")
            ip("-n", ns, "link", "set", "br0", "up")
        except BaseException:
            self.destroy()
            raise

    def pod_namespace(self) -> str:
        """The name the next pod's namespace gets (reserved: `add_pod(name)` makes it)."""
        with self._lock:
            self._counter += 1
            return f"{self.prefix}-p{self._counter}"

    def add_pod(self, pod_ns: str | None = None) -> tuple[str, str]:
        """A new pod namespace joined to the bridge: returns (namespace name, pod IP)."""
        pod_ns = pod_ns or self.pod_namespace()
        number = pod_ns.rsplit("-p", 1)[1]
        with self._lock:
            # Fresh addresses first: a reused one would meet the node's cached neighbour entry
            # for the old pod's MAC (flushed on removal too, but new is simplest and safest).
            address = self.subnet.network_address + self._next
            if address < self.subnet.broadcast_address:
                self._next += 1
            elif self._free:
                address = self._free.pop(0)
            else:
                raise NetworkError(f"no pod address left in {self.subnet}")
        veth = f"vp{number}"
        ip("netns", "add", pod_ns)
        try:
            ip("-n", self.node_ns, "link", "add", veth, "type", "veth", "peer", "name", "eth0",
               "netns", pod_ns)  # fmt: skip
            ip("-n", self.node_ns, "link", "set", veth, "master", "br0", "up")
            ip("-n", pod_ns, "link", "set", "lo", "up")
            ip("-n", pod_ns, "addr", "add", f"{address}/{self.subnet.prefixlen}", "dev", "eth0")
            ip("-n", pod_ns, "link", "set", "eth0", "up")
            ip("-n", pod_ns, "route", "add", "default", "via", self.node_ip)
        except BaseException:
            self._delete_ns(pod_ns)
            with self._lock:
                self._free.append(address)
            raise
        self._pods[pod_ns] = str(address)
        return pod_ns, str(address)

    def remove_pod(self, pod_ns: str) -> None:
        """Kill what still runs in a pod namespace, delete it (its veth goes with it) and free
        its address."""
        address = self._pods.pop(pod_ns, None)
        kill_all_in(pod_ns)
        self._delete_ns(pod_ns)
        if address is not None:
            with contextlib.suppress(NetworkError):  # the node forgets the old pod's MAC
                ip("-n", self.node_ns, "neigh", "flush", "to", address)
            with self._lock:
                self._free.append(ipaddress.IPv4Address(address))

    def add_cluster_ip(self, address: str) -> None:
        """Make a Service's cluster IP an address of the node (on the node namespace's lo)."""
        if address not in self._cluster_ips:
            ip("-n", self.node_ns, "addr", "add", f"{address}/32", "dev", "lo")
            self._cluster_ips.add(address)

    def remove_cluster_ip(self, address: str) -> None:
        if address in self._cluster_ips:
            self._cluster_ips.discard(address)
            with contextlib.suppress(NetworkError):  # already gone with the namespace
                ip("-n", self.node_ns, "addr", "del", f"{address}/32", "dev", "lo")

    def owned(self) -> list[str]:
        """The namespaces of this network that exist now."""
        return [n for n in namespaces() if n == self.prefix or n.startswith(self.prefix + "-")]

    def destroy(self) -> None:
        """Delete every namespace this network made (pods first, then the node)."""
        for name in sorted(self.owned(), key=lambda n: n == self.node_ns):
            kill_all_in(name)
            self._delete_ns(name)
        (OWNERS_DIR / self.prefix).unlink(missing_ok=True)
        self._pods.clear()
        self._cluster_ips.clear()

    @staticmethod
    def reap_stale() -> list[str]:
        """Delete the namespaces of runners that died without cleaning up (SIGKILL, a crash).

        Each runner records its pid under its prefix; a prefix whose runner is gone is removed
        with every namespace it named. Returns the namespaces deleted.
        """
        removed: list[str] = []
        if not OWNERS_DIR.is_dir():
            return removed
        with _owners_locked():
            for marker in OWNERS_DIR.iterdir():
                if not marker.is_file() or not PREFIX.fullmatch(marker.name):
                    continue  # not a runner's marker (whatever else put it there)
                owner = _owner(marker)
                if not isinstance(owner.get("pid"), int) or owner_alive(owner):
                    continue  # unreadable: not judged; alive: not ours to reap
                mine = re.compile(re.escape(marker.name) + r"(-p\d+)?")
                for name in namespaces():
                    if mine.fullmatch(name):
                        kill_all_in(name)
                        NodeNetwork._delete_ns(name)
                        removed.append(name)
                work = str(owner.get("work") or "")
                if re.fullmatch(r"/(dev/shm|var/tmp)/tpcontrol-node-[^/]+", work):
                    shutil.rmtree(work, ignore_errors=True)
                marker.unlink(missing_ok=True)
        return removed

    @staticmethod
    def _delete_ns(name: str) -> None:
        """Delete a namespace's name; retried briefly (the kernel can answer EBUSY while the
        last of its processes are still being torn down), then logged if it stays."""
        error = ""
        for attempt in range(20):
            if not (NETNS_DIR / name).exists():
                return
            done = subprocess.run(["ip", "netns", "del", name], capture_output=True, text=True)
            if done.returncode == 0:
                return
            error = done.stderr.strip()
            time.sleep(0.05 * (attempt + 1))
        log.warning("network namespace %s could not be deleted: %s", name, error)
