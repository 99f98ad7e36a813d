"""A whole Kubernetes cluster on this machine: a real control plane and a real node.

kubelet, kube-proxy (iptables mode) and kube-scheduler v1.20.2 built from Debian's source, with
Debian's containerd, runc and CNI plugins (bridge, host-local, loopback, portmap): the parts users
run, so restarts, CrashLoopBackOff, probes, exec, port-forward and Services behave as on any
cluster. Everything runs inside one network namespace (`network.NodeNetwork`), so the host's
interfaces, routes and iptables are never touched; the host reaches the API server at the node's
end of a veth pair and pods through the API.

What the cluster makes outside that namespace is in four places, all named after it and all
removed by `reap`: its state directory (etcd, containerd's content and snapshots, kubelet's
volumes), its run directory (sockets, runc's state, pod namespaces), cgroups under
`/sys/fs/cgroup/*/<name>`, and kubelet 1.20's hard-coded `/var/lib/kubelet/device-plugins`.
`reap` runs on exit, on Ctrl-C, and at the next start after a SIGKILL; a lock makes sure one
cluster at a time owns those places.

Long on purpose: one cluster's whole life (start in order, reap in reverse), whose steps share
its names and paths.
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import zlib
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from kubernetes_asyncio import client as k8s

from tpcontrol.localcluster.controlplane import (
    NODE_BINARIES,
    LocalControlPlane,
    NodeAccess,
    Started,
    missing_binaries,
    testbin,
)
from tpcontrol.localcluster.diagnose import pods_trouble
from tpcontrol.localcluster.hostshare import (
    LOCKS,
    clusters_running,
    machine_locked,
    remove_pod_traces,
    restore_machine,
    save_machine,
)
from tpcontrol.localcluster.network import NodeNetwork, kill_all_in

log = logging.getLogger("tpcontrol.localcluster")
Json = dict[str, Any]

CGROUP_ROOT = Path("/sys/fs/cgroup")
NAME = re.compile(r"(?!machine$)[a-z][a-z0-9]{0,9}")  # "machine": the machine-wide lock
DNS_IP = "10.96.0.10"
TOOLS = {
    "containerd": "containerd",
    "ctr": "containerd",
    "runc": "runc",
    "/usr/lib/cni/bridge": "containernetworking-plugins",
    "nsenter": "util-linux",
    "ip": "iproute2",
    "iptables": "iptables",
    "conntrack": "conntrack",
    "kubectl": "kubernetes-client",
}


def missing_tools() -> list[str]:
    """What this machine lacks for a cluster with a node (empty: ready)."""
    found = [f"{tool} (Debian package {pkg})" for tool, pkg in TOOLS.items() if not _have(tool)]
    if (CGROUP_ROOT / "cgroup.controllers").exists():
        found.append("cgroup v1 (this host has cgroup v2 only; kubelet 1.20 needs v1 or hybrid)")
    return found + missing_binaries(NODE_BINARIES)


def _have(tool: str) -> bool:
    return Path(tool).exists() if tool.startswith("/") else shutil.which(tool) is not None


@dataclass(frozen=True)
class ClusterPlaces:
    """Where a cluster named `name` keeps what it makes on the host."""

    name: str = "tpcontrol"

    def __post_init__(self) -> None:
        if not NAME.fullmatch(self.name):  # every path below is named after it
            raise ValueError(f"cluster name {self.name!r}: 1-10 lowercase letters and digits")

    @property
    def state(self) -> Path:
        return Path("/var/lib/tpcontrol-cluster") / self.name

    @property
    def run(self) -> Path:
        return Path("/run/tpcontrol-cluster") / self.name

    @property
    def lock(self) -> Path:
        return LOCKS / f"{self.name}.lock"

    @property
    def cgroup(self) -> str:
        return f"tpcontrol-{self.name}"

    @property
    def containerd_socket(self) -> Path:
        return self.run / "containerd" / "containerd.sock"

    def cgroup_dirs(self, *, unified: bool = True) -> list[Path]:
        """The cluster's parent cgroup in every hierarchy: kubelet wants it made in each v1
        one; runc also makes it in the (otherwise unused) unified one, so reaping looks there."""
        if not CGROUP_ROOT.is_dir():
            return []
        return [
            h / self.cgroup
            for h in sorted(CGROUP_ROOT.iterdir())
            if h.is_dir() and (unified or h.name != "unified") and (h / "cgroup.procs").exists()
        ]


class ClusterError(RuntimeError):
    """The cluster cannot start; the message says what is missing or which part failed."""


def reap(places: ClusterPlaces, network: NodeNetwork, within: float = 30) -> list[str]:
    """Remove everything a cluster of this name made, running or left by a killed run; returns
    what it found (for the log). Safe to call when nothing is there."""
    found: list[str] = []
    deadline = time.monotonic() + within
    # The cluster's own programs and containerd's shims share its network namespace; the pods'
    # processes are in the pods' namespaces but inside its cgroups. Kill both until none is left.
    while time.monotonic() < deadline:
        killed = kill_all_in(network) + _kill_cgroup_members(places)
        if not killed:
            break
        found.append(f"killed {killed} processes")
        time.sleep(0.1)
    for mount in _mounts_under(places.state, places.run):
        found.append(f"unmounted {mount}")
        done = subprocess.run(["umount", mount], capture_output=True, check=False, timeout=30)
        if done.returncode != 0:
            subprocess.run(["umount", "-l", mount], capture_output=True, check=False, timeout=30)
    for parent in places.cgroup_dirs():
        if parent.exists():
            found.append(f"removed cgroup {parent}")
            _rmdir_tree(parent, deadline)
    if network.exists():
        found.append(f"deleted network namespace {network.name}")
    network.delete()
    traces = remove_pod_traces(
        places.containerd_socket,
        places.run / "containerd" / "state" / "io.containerd.runtime.v2.task" / "k8s.io",
        places.state / "kubelet",
    )
    if traces:
        found.append(f"removed {traces} shim sockets, CNI results and pod logs")
    with machine_locked():
        if not clusters_running(except_name=places.name):
            found += restore_machine()
    left = _mounts_under(places.state, places.run)
    if left:
        raise ClusterError(f"cannot remove the cluster's mounts: {', '.join(left[:5])}")
    for tree in (places.state, places.run):
        if tree.exists():
            found.append(f"removed {tree}")
            shutil.rmtree(tree, ignore_errors=True)
    return found


def _kill_cgroup_members(places: ClusterPlaces) -> int:
    killed = 0
    for parent in places.cgroup_dirs():
        if not parent.exists():
            continue
        for procs in parent.rglob("cgroup.procs"):
            with contextlib.suppress(OSError):
                for line in procs.read_text().split():
                    with contextlib.suppress(ProcessLookupError, ValueError):
                        os.kill(int(line), signal.SIGKILL)
                        killed += 1
    return killed


def _rmdir_tree(top: Path, deadline: float) -> None:
    """Remove a cgroup directory tree, deepest first (cgroupfs only removes empty groups)."""
    while top.exists() and time.monotonic() < deadline:
        dirs = sorted((p for p in top.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts))
        for d in [*dirs, top]:
            with contextlib.suppress(OSError):
                d.rmdir()
        if top.exists():
            time.sleep(0.1)


def _mounts_under(*trees: Path) -> list[str]:
    """Mount points below `trees`, deepest first."""
    points = []
    with open("/proc/self/mounts") as mounts:
        for line in mounts:
            point = line.split()[1].replace("\\040", " ")
            if any(point == str(t) or point.startswith(f"{t}/") for t in trees):
                points.append(point)
    return sorted(points, key=lambda p: -p.count("/"))


@contextlib.contextmanager
def _locked(places: ClusterPlaces) -> Iterator[IO[str]]:
    """The cluster's name, held for its lifetime. Taken and given back under the machine lock,
    and the lock file is removed while still held, so no two processes own one name."""
    with machine_locked():
        lock = open(places.lock, "a+")  # noqa: SIM115 (held past this block, closed below)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            owner = lock.read().strip() or "?"
            lock.close()
            raise ClusterError(
                f"another local cluster {places.name!r} is running (pid {owner}); "
                "stop it first (one cluster of a name per machine)"
            ) from None
        lock.seek(0)
        lock.truncate()
        lock.write(str(os.getpid()))
        lock.flush()
    try:
        yield lock
    finally:
        with machine_locked():
            places.lock.unlink(missing_ok=True)
            lock.close()
            # Whoever gives its name back last puts the machine back (two clusters stopping at
            # once each see the other running while they reap; this check is serialised).
            if not clusters_running(except_name=places.name):
                restore_machine()


def reap_abandoned(except_name: str, progress: Callable[[str], None]) -> None:
    """Clusters of other names whose process is gone (killed, or a one-off name never started
    again): nobody else would ever remove what they left. Each one's lock is taken first, so
    that nobody starts it while it is being removed."""
    claimed: list[tuple[str, IO[str]]] = []
    with machine_locked():
        for path in LOCKS.glob("*.lock"):
            if path.stem == except_name or not NAME.fullmatch(path.stem) or path.stem == "machine":
                continue
            held = open(path, "a+")  # noqa: SIM115 (closed below)
            try:
                fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
                claimed.append((path.stem, held))
            except BlockingIOError:
                held.close()  # it runs
    for name, lock in claimed:
        try:
            gone = LocalCluster(name=name, progress=progress)
            found = reap(gone.places, gone.network)
            if found:
                progress(f"removed what cluster {name!r} (no longer running) left: {found[0]}")
        finally:
            with machine_locked():
                (LOCKS / f"{name}.lock").unlink(missing_ok=True)
                lock.close()


def _address_in_use(network: NodeNetwork) -> str:
    """What on the host already has the cluster's /30 (another cluster whose name lands on the
    same number, a VPN's route), if anything; asked under the machine lock."""
    mine = ipaddress.ip_network(f"{network.host_ip}/{network.prefix_len}", strict=False)
    for argv in (["ip", "-4", "-o", "addr"], ["ip", "-4", "route", "show", "table", "all"]):
        done = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=10)
        for line in done.stdout.splitlines():
            words = line.split()
            device = words[1] if argv[2] == "-o" else _after(words, "dev")
            if device == network.host_if:
                continue
            for word in words:
                with contextlib.suppress(ValueError):
                    if "." in word and ipaddress.ip_network(word, strict=False).overlaps(mine):
                        return line.strip()
    return ""


def _after(words: list[str], key: str) -> str:
    return words[words.index(key) + 1] if key in words[:-1] else ""


@dataclass
class LocalCluster(Started):
    """`with LocalCluster() as cluster:` a Ready node; `cluster.api()` gives an API client.

    `progress` gets one line per phase with its elapsed time. Images are imported into
    containerd from docker-archive tarballs (`images`: paths), so pods run them with no
    registry; the pause image must be among them.
    """

    images: list[Path] = field(default_factory=list)
    name: str = "tpcontrol"
    places: ClusterPlaces = field(init=False)
    network: NodeNetwork = field(init=False)
    node_name: str = "tpcontrol-node"
    progress: Callable[[str], None] = print
    plane: LocalControlPlane = field(init=False)
    _lock: contextlib.ExitStack = field(init=False, default_factory=contextlib.ExitStack)
    _locked: bool = field(init=False, default=False)

    def __post_init__(self) -> None:
        if not NAME.fullmatch(self.name):
            raise ClusterError(f"cluster name {self.name!r}: 1-10 lowercase letters and digits")
        self.places = ClusterPlaces(self.name)
        # The default cluster is number 0; others get a number of their own from their name.
        number = 0 if self.name == "tpcontrol" else zlib.crc32(self.name.encode()) % 250 + 1
        self.network = NodeNetwork.numbered(self.name, number)

    # -- start ---------------------------------------------------------------------------------

    def start(self, timeout: float = 120) -> None:
        missing = missing_tools()
        if missing:
            raise ClusterError(
                "missing " + ", ".join(missing) + ": run scripts/install-node-tools.sh and "
                "scripts/install-k8s-testbin.sh"
            )
        self._lock.enter_context(_locked(self.places))
        self._locked = True
        try:
            leftovers = reap(self.places, self.network)
            if leftovers:
                self.progress("removed what an earlier run left: " + "; ".join(leftovers[:4]))
            reap_abandoned(self.name, self.progress)
            with machine_locked():  # no other start takes the same address meanwhile
                used = _address_in_use(self.network)
                if used:
                    raise ClusterError(
                        f"{self.network.host_ip}/30 is in use on this host ({used}); give the "
                        "cluster another name (its address comes from its name)"
                    )
                self.network.create()
                save_machine()  # before our kubelet changes anything shared
            self._start(timeout)
        except BaseException:
            self.stop()
            raise

    def _phase(self, what: str, started: float) -> None:
        self.progress(f"{what} ({time.monotonic() - started:.1f} s)")

    def _start(self, timeout: float) -> None:
        started = time.monotonic()
        p = self.places
        for d in (p.state, p.run):
            d.mkdir(parents=True, exist_ok=True)
            d.chmod(0o700)
        self._phase(f"network namespace {self.network.name} with veth {self.network.host_if} "
                    f"({self.network.host_ip} <-> {self.network.node_ip})", started)  # fmt: skip
        self.plane = LocalControlPlane(
            node=NodeAccess(
                node_name=self.node_name,
                host=self.network.node_ip,
                prefix=tuple(self.network.prefix),
                work=p.state,
                service_cidr=self.network.service_cidr,
            )
        )
        self.plane.start(timeout)
        self._phase(f"control plane ready at {self.plane.url}", started)
        self._start_containerd(timeout)
        self._phase(f"containerd up ({len(self.images)} images imported)", started)
        self._start_dns(timeout)
        self._start_node()
        self._wait_node_ready(timeout)
        self._phase(f"node {self.node_name} Ready", started)

    def _spawn(self, name: str, args: list[str]) -> subprocess.Popen[bytes]:
        return self.plane.spawn(name, [*self.network.prefix, *args])

    def _start_containerd(self, timeout: float) -> None:
        p = self.places
        state, run = p.state / "containerd", p.run / "containerd"
        cni = p.state / "cni"
        for d in (state, run, cni / "net.d", cni / "ipam"):
            d.mkdir(parents=True, exist_ok=True)
        (cni / "net.d" / "10-tpcontrol.conflist").write_text(
            json.dumps(
                {
                    "cniVersion": "0.4.0",
                    "name": f"tpc-{self.name}-pods",  # CNI caches results by this name
                    "plugins": [
                        {
                            "type": "bridge",
                            "bridge": "cni0",
                            "isGateway": True,
                            "ipMasq": True,
                            "hairpinMode": True,
                            "ipam": {
                                "type": "host-local",
                                "ranges": [[{"subnet": self.network.pod_cidr}]],
                                "routes": [{"dst": "0.0.0.0/0"}],
                                "dataDir": str(cni / "ipam"),
                            },
                        },
                        {"type": "portmap", "capabilities": {"portMappings": True}},
                    ],
                },
                indent=2,
            )
        )
        config = state / "config.toml"
        config.write_text(CONTAINERD_CONFIG.format(state=state, run=run, cni=cni))
        self._spawn("containerd", ["containerd", "--config", str(config)])
        sock = p.containerd_socket
        deadline = time.monotonic() + timeout
        while not self._ctr_ready(sock):
            self._check_alive()
            if time.monotonic() > deadline:
                raise ClusterError(f"containerd not up after {timeout:.0f} s")
            time.sleep(0.1)
        for archive in self.images:
            done = subprocess.run(
                ["ctr", "-a", str(sock), "-n", "k8s.io", "images", "import", str(archive)],
                capture_output=True, text=True, check=False, timeout=300,
            )  # fmt: skip
            if done.returncode != 0:
                raise ClusterError(f"ctr images import {archive}: {done.stderr.strip()[-500:]}")

    @staticmethod
    def _ctr_ready(sock: Path) -> bool:
        if not sock.exists():
            return False
        done = subprocess.run(
            ["ctr", "-a", str(sock), "version"], capture_output=True, check=False, timeout=10
        )
        return done.returncode == 0

    def _start_dns(self, timeout: float) -> None:
        """The cluster DNS (a stand-in for CoreDNS, see `dns`) on the node's address, and the
        `kube-dns` Service at the address kubelet gives pods as their nameserver."""
        # Its own identity, which may only read Services and Endpoints.
        self.kubectl("apply", "-f", "-", stdin=json.dumps(DNS_RBAC))
        kubeconfig = self.plane.write_kubeconfig("kubeconfig-dns", "dns", self.plane.tokens["dns"])
        proc = self._spawn(
            "dns",
            [sys.executable, "-m", "tpcontrol.localcluster.dns",
             f"--kubeconfig={kubeconfig}", f"--listen={self.network.node_ip}:53"],
        )  # fmt: skip
        log_file = self.places.state / "logs" / "dns.log"
        deadline = time.monotonic() + timeout
        while "listening on" not in log_file.read_text(errors="replace"):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise ClusterError(f"the cluster DNS did not start:\n{self.log_tail('dns')}")
            time.sleep(0.05)
        ports = [
            {"name": "dns", "port": 53, "protocol": "UDP"},
            {"name": "dns-tcp", "port": 53, "protocol": "TCP"},
        ]
        service = {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": "kube-dns", "namespace": "kube-system"},
            "spec": {"clusterIP": DNS_IP, "ports": [{**p, "targetPort": 53} for p in ports]},
        }
        endpoints = {
            "apiVersion": "v1",
            "kind": "Endpoints",
            "metadata": {"name": "kube-dns", "namespace": "kube-system"},
            "subsets": [{"addresses": [{"ip": self.network.node_ip}], "ports": ports}],
        }
        listed = {"apiVersion": "v1", "kind": "List", "items": [service, endpoints]}
        self.kubectl("apply", "-f", "-", stdin=json.dumps(listed))

    def _start_node(self) -> None:
        p, net, plane = self.places, self.network, self.plane
        for parent in p.cgroup_dirs(unified=False):  # cgroup v1: the pods' parent everywhere
            parent.mkdir(exist_ok=True)
            for name in ("cpuset.cpus", "cpuset.mems"):
                if (parent.parent / name).exists():
                    (parent / name).write_text((parent.parent / name).read_text())
        resolv = p.state / "resolv.conf"
        resolv.write_text("nameserver 127.0.0.1\n")  # the node itself resolves nothing outside
        kubelet_dir = p.state / "kubelet"
        kubelet_dir.mkdir(exist_ok=True)
        kubelet_config = p.state / "kubelet.yaml"
        kubelet_config.write_text(
            json.dumps(
                {
                    "apiVersion": "kubelet.config.k8s.io/v1beta1",
                    "kind": "KubeletConfiguration",
                    "address": net.node_ip,
                    "port": 10250,
                    "readOnlyPort": 0,
                    "healthzBindAddress": "127.0.0.1",
                    "healthzPort": 10248,
                    "authentication": {
                        "anonymous": {"enabled": False},
                        "webhook": {"enabled": False},
                        "x509": {"clientCAFile": str(plane.ca_file)},
                    },
                    "authorization": {"mode": "AlwaysAllow"},
                    "cgroupDriver": "cgroupfs",
                    "cgroupRoot": f"/{p.cgroup}",
                    "cgroupsPerQOS": True,
                    "enforceNodeAllocatable": ["pods"],
                    "failSwapOn": False,
                    "resolvConf": str(resolv),
                    "clusterDomain": "cluster.local",
                    "clusterDNS": [DNS_IP],
                    "serializeImagePulls": False,
                    "nodeStatusUpdateFrequency": "4s",
                    "syncFrequency": "10s",
                    "fileCheckFrequency": "20s",
                    "evictionHard": {
                        "memory.available": "100Mi",
                        "nodefs.available": "2%",
                        "imagefs.available": "2%",
                        "nodefs.inodesFree": "2%",
                    },
                    "imageGCHighThresholdPercent": 95,
                    "imageGCLowThresholdPercent": 90,
                    "makeIPTablesUtilChains": True,
                    "maxPods": 60,
                }
            )
        )
        kubelet_kubeconfig = plane.write_kubeconfig(
            "kubeconfig-kubelet", "kubelet", plane.tokens["kubelet"]
        )
        self._spawn(
            "kubelet",
            [
                str(testbin() / "kubelet"),
                f"--config={kubelet_config}",
                f"--kubeconfig={kubelet_kubeconfig}",
                "--container-runtime=remote",
                f"--container-runtime-endpoint=unix://{p.containerd_socket}",
                f"--image-service-endpoint=unix://{p.containerd_socket}",
                "--runtime-request-timeout=2m",
                f"--root-dir={kubelet_dir}",
                f"--cert-dir={kubelet_dir / 'pki'}",
                f"--volume-plugin-dir={kubelet_dir / 'volume-plugins'}",
                f"--hostname-override={self.node_name}",
                f"--node-ip={net.node_ip}",
                "--register-node=true",
                "--pod-infra-container-image=localhost/pause:3.4",
                "--v=1",
            ],
        )
        proxy_kubeconfig = plane.write_kubeconfig(
            "kubeconfig-proxy", "proxy", plane.tokens["proxy"]
        )
        proxy_config = p.state / "kube-proxy.yaml"
        proxy_config.write_text(
            json.dumps(
                {
                    "apiVersion": "kubeproxy.config.k8s.io/v1alpha1",
                    "kind": "KubeProxyConfiguration",
                    "clientConnection": {"kubeconfig": str(proxy_kubeconfig)},
                    "mode": "iptables",
                    "hostnameOverride": self.node_name,
                    "bindAddress": net.node_ip,
                    "clusterCIDR": net.pod_cidr,
                    "healthzBindAddress": "127.0.0.1:10256",
                    "metricsBindAddress": "127.0.0.1:10249",
                    "nodePortAddresses": [f"{net.node_ip}/32"],
                    # nf_conntrack_max can only be written in the host's namespace: leave all.
                    "conntrack": {
                        "maxPerCore": 0,
                        "min": 0,
                        "tcpEstablishedTimeout": "0s",
                        "tcpCloseWaitTimeout": "0s",
                    },
                    "iptables": {"syncPeriod": "30s", "minSyncPeriod": "0s"},
                }
            )
        )
        self._spawn("kube-proxy", [str(testbin() / "kube-proxy"), f"--config={proxy_config}"])

    def _check_alive(self) -> None:
        for proc in self.plane._procs:
            if proc.poll() is not None:
                name = self.plane._names.get(proc.pid, "?")
                raise ClusterError(
                    f"{name} exited with {proc.returncode}:\n{self.plane.log_tail(name)}"
                )

    def _wait_node_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._check_alive()
            if self.node_condition() == "True":
                return
            time.sleep(0.25)
        raise ClusterError(
            f"node {self.node_name} not Ready after {timeout:.0f} s:\n"
            + self.plane.log_tail("kubelet")
        )

    def node_condition(self) -> str:
        done = self.kubectl(
            "get", "node", self.node_name, "-o",
            "jsonpath={.status.conditions[?(@.type==\"Ready\")].status}", check=False,
        )  # fmt: skip
        return done.stdout.strip()

    def kubectl(self, *args: str, check: bool = True, stdin: str | None = None,
                timeout: float = 60) -> subprocess.CompletedProcess[str]:  # fmt: skip
        """kubectl with the admin kubeconfig; `check` raises ClusterError naming the command."""
        try:
            done = subprocess.run(
                ["kubectl", f"--kubeconfig={self.kubeconfig}", *args],
                capture_output=True, text=True, check=False, input=stdin, timeout=timeout,
            )  # fmt: skip
        except subprocess.TimeoutExpired:
            raise ClusterError(f"kubectl {' '.join(args)}: no answer in {timeout:.0f} s") from None
        if check and done.returncode != 0:
            raise ClusterError(f"kubectl {' '.join(args)}: {done.stderr.strip()}")
        return done

    @staticmethod
    def kubectl_offline(*args: str, timeout: float = 60) -> str:
        """kubectl for what needs no cluster (`kustomize`); its output."""
        done = subprocess.run(
            ["kubectl", *args], capture_output=True, text=True, check=False, timeout=timeout
        )
        if done.returncode != 0:
            raise ClusterError(f"kubectl {' '.join(args)}: {done.stderr.strip()}")
        return done.stdout

    def describe_pods(self, namespace: str, selector: str = "") -> str:
        """Why the namespace's pods (matching `selector`) are not running, in a few lines."""
        try:
            return self._describe_pods(namespace, selector)
        except ClusterError as exc:
            return str(exc)

    def _describe_pods(self, namespace: str, selector: str) -> str:
        pods = self.kubectl(
            "-n", namespace, "get", "pods", "-o", "json", *(["-l", selector] if selector else []),
            check=False, timeout=10,
        )  # fmt: skip
        if pods.returncode != 0:
            return f"cannot list pods: {pods.stderr.strip()[-200:]}"
        events = self.kubectl(
            "-n", namespace, "get", "events", "-o", "json", check=False, timeout=10
        )
        try:
            items = json.loads(pods.stdout)["items"]
            happened = json.loads(events.stdout)["items"] if events.returncode == 0 else []
        except (ValueError, KeyError):
            return pods.stderr.strip()
        return pods_trouble(items, happened)

    def service_destinations(self) -> set[str]:
        """The pod addresses kube-proxy's rules send Service traffic to right now (its DNAT
        targets in the node's namespace)."""
        done = subprocess.run(
            [*self.network.prefix, "iptables-save", "-t", "nat"],
            capture_output=True, text=True, check=False, timeout=30,
        )  # fmt: skip
        return set(re.findall(r"--to-destination (\d+\.\d+\.\d+\.\d+):", done.stdout))

    def container_pid(self, container_id: str) -> int | None:
        """The host pid of a running container (`containerd://ID` as the pod status says)."""
        wanted = container_id.removeprefix("containerd://")
        done = subprocess.run(
            ["ctr", "-a", str(self.places.containerd_socket), "-n", "k8s.io", "tasks", "ls"],
            capture_output=True, text=True, check=False, timeout=30,
        )  # fmt: skip
        for line in done.stdout.splitlines()[1:]:
            fields = line.split()
            if len(fields) >= 3 and fields[0] == wanted and fields[2] == "RUNNING":
                return int(fields[1])
        return None

    def pod_iptables(self, pod: Json, *args: str) -> list[str]:
        """`iptables ARGS` in a pod's network namespace, as lines (empty if it is not running)."""
        for status in (pod.get("status") or {}).get("containerStatuses") or []:
            pid = self.container_pid(status.get("containerID") or "")
            if pid is not None:
                done = subprocess.run(
                    ["nsenter", f"--net=/proc/{pid}/ns/net", "--", "iptables", *args],
                    capture_output=True, text=True, check=False, timeout=30,
                )  # fmt: skip
                return done.stdout.splitlines()
        return []

    # -- use -----------------------------------------------------------------------------------

    @property
    def kubeconfig(self) -> Path:
        return self.plane.kubeconfig

    @property
    def url(self) -> str:
        return self.plane.url

    def configuration(self) -> k8s.Configuration:
        return self.plane.configuration()

    @asynccontextmanager
    async def api(self) -> AsyncIterator[k8s.ApiClient]:
        async with self.plane.api() as client:
            yield client

    def log_tail(self, name: str, lines: int = 20) -> str:
        return self.plane.log_tail(name, lines)

    # -- stop ----------------------------------------------------------------------------------

    def stop(self) -> None:
        """Stop the node's programs, then the control plane, then remove everything. Nothing
        if this process never got the cluster's name: it belongs to another one then."""
        if not self._locked:
            return
        with contextlib.suppress(AttributeError):
            self.plane.stop()
        try:
            reap(self.places, self.network)
        finally:
            self._lock.close()
            self._locked = False
            with machine_locked():
                for parent in (self.places.state.parent, self.places.run.parent):
                    with contextlib.suppress(OSError):  # only when no other cluster is there
                        parent.rmdir()


DNS_RBAC = {
    "apiVersion": "v1",
    "kind": "List",
    "items": [
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRole",
            "metadata": {"name": "tpcontrol:cluster-dns"},
            "rules": [
                {
                    "apiGroups": [""],
                    "resources": ["services", "endpoints"],
                    "verbs": ["get", "list", "watch"],
                },
            ],
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRoleBinding",
            "metadata": {"name": "tpcontrol:cluster-dns"},
            "roleRef": {
                "apiGroup": "rbac.authorization.k8s.io",
                "kind": "ClusterRole",
                "name": "tpcontrol:cluster-dns",
            },
            "subjects": [
                {
                    "apiGroup": "rbac.authorization.k8s.io",
                    "kind": "User",
                    "name": "system:tpcontrol-dns",
                }
            ],
        },
    ],
}

CONTAINERD_CONFIG = """\
# containerd for the local cluster: private root, state and socket; CRI for kubelet 1.20.
version = 2
root = "{state}/root"
state = "{run}/state"
[grpc]
  address = "{run}/containerd.sock"
[ttrpc]
  address = "{run}/containerd.sock.ttrpc"
[debug]
  level = "warn"
[plugins."io.containerd.internal.v1.opt"]
  path = "{state}/opt"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "localhost/pause:3.4"
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  disable_apparmor = true
  # Where processes lack CAP_SYS_RESOURCE (this VM drops it from root too), runc cannot lower
  # oom_score_adj and every sandbox fails with "can't get final child's PID from pipe": clamp
  # the score at containerd's own.
  restrict_oom_score_adj = true
  enable_selinux = false
  max_container_log_line_size = 16384
  netns_mounts_under_state_dir = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
        BinaryName = "/usr/sbin/runc"
        Root = "{run}/runc"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "{cni}/net.d"
    max_conf_num = 1
"""
