"""The local cluster leaves the host as it found it: after `tpcontrol demo` (the README's first
command) is stopped with Ctrl-C in the middle of a step, and after a cluster whose process was
SIGKILLed is reaped by the next start of the same name. Compared: links, addresses, routes,
iptables and ip6tables rules, mounts, network namespaces, cgroups, processes and directories."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tpcontrol.localcluster.cluster import ClusterPlaces, LocalCluster
from tpcontrol.localcluster.hostshare import CNI_RESULTS, PROC_SYS, TUNABLES

from .cluster_helpers import ClusterUnderTest
from .conftest import CLUSTER_NAME, ROOT

SESSION = ClusterPlaces(CLUSTER_NAME)  # the tests' own cluster may run meanwhile: not compared


# Cluster tests wait on kubelet and rollouts; the first one also pays for the session's
# cluster (images, start, install): a longer bound than the suite's default.
pytestmark = pytest.mark.timeout(600)


def host_state() -> dict[str, list[str]]:
    """What a cluster must not change on the host (packet counters left out)."""

    def lines(*argv: str) -> list[str]:
        done = subprocess.run(argv, capture_output=True, text=True, check=True, timeout=30)
        return [re.sub(r"\[\d+:\d+\]", "", line) for line in done.stdout.splitlines()
                if not line.startswith("#")]  # fmt: skip

    mounts = [
        line for line in Path("/proc/self/mounts").read_text().splitlines()
        if not any(str(t) in line for t in (SESSION.state, SESSION.run))
    ]  # fmt: skip
    return {
        "tunables": [f"{t}={(PROC_SYS / t).read_text().strip()}" for t in TUNABLES],
        "links": lines("ip", "-o", "link"),
        "addresses": lines("ip", "-o", "addr"),
        "routes": lines("ip", "route"),
        "iptables": lines("iptables-save"),
        "ip6tables": lines("ip6tables-save"),
        "mounts": mounts,
        "netns": lines("ip", "netns", "list"),
    }


def traces(places: ClusterPlaces) -> list[str]:
    """What of cluster `places` is still on the host: its folders, cgroups, mounts, processes
    (by their command line or by cgroup membership), CNI results and network namespace."""
    found = [str(p) for p in (places.state, places.run) if p.exists()]
    found += [str(p) for p in places.cgroup_dirs() if p.exists()]
    for parent in places.cgroup_dirs():
        for procs in parent.rglob("cgroup.procs") if parent.exists() else []:
            found += [f"process {pid} in {procs.parent}" for pid in procs.read_text().split()]
    found += [
        line.split()[1] for line in Path("/proc/self/mounts").read_text().splitlines()
        if str(places.state) in line or str(places.run) in line
    ]  # fmt: skip
    found += [str(p) for p in CNI_RESULTS.glob(f"tpc-{places.name}-pods-*")]
    if Path(f"/run/netns/tpc-{places.name}").exists():
        found.append(f"network namespace tpc-{places.name}")
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            line = _cmdline(entry)
            if str(places.state).encode() in line or str(places.run).encode() in line:
                found.append(f"process {entry.name}: {line[:80]!r}")
    return found


# The step's title line, once alice's intercept (and her local app) is under way.
ALICE_STEP = "== 4. alice intercepts"


def until_line(proc: subprocess.Popen[str], starts: str, within: float) -> list[str]:
    """The demo's output up to the first line that starts with `starts`, read (bounded) on a
    thread, so a demo that goes silent fails the test instead of hanging it."""
    seen: list[str] = []
    found = threading.Event()

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            seen.append(line)
            if line.startswith(starts):
                found.set()
                return

    threading.Thread(target=read, daemon=True).start()
    assert found.wait(within), f"no {starts!r} within {within:.0f} s:\n" + "".join(seen)
    return seen


def dev_processes() -> list[str]:
    """The demo's developer-side processes (its local apps run from this checkout)."""
    app = str(ROOT / "examples" / "http_echo.py").encode()
    return [e.name for e in Path("/proc").iterdir() if e.name.isdigit() and app in _cmdline(e)]


def test_ctrl_c_during_the_demo_tears_everything_down(cluster: ClusterUnderTest) -> None:
    """(The session's cluster is asked for so that the demo's images are built already.)"""
    name = "demotest"
    places = ClusterPlaces(name)
    before = host_state()
    proc = demo(name)
    try:
        until_line(proc, ALICE_STEP, within=240)
        assert traces(places)  # the cluster runs: its programs, mounts, cgroups
        assert host_state()["links"] != before["links"]  # its veth
        assert dev_processes()  # alice's local app
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err
    assert "interrupted: tearing everything down" in err
    assert "Traceback" not in err
    assert traces(places) == []
    assert host_state() == before
    assert dev_processes() == []  # the developers' local processes are stopped too


def test_a_sigkilled_demo_is_reaped_by_the_next_start(cluster: ClusterUnderTest) -> None:
    """SIGKILL leaves the cluster's programs running (nothing can stop them then); the
    developers' processes die with the demo; the next start of the name removes the rest."""
    name = "killtest"
    places = ClusterPlaces(name)
    before = host_state()
    proc = demo(name)
    try:
        until_line(proc, ALICE_STEP, within=240)
    finally:
        proc.kill()
        proc.wait()
    left = traces(places)
    assert any(t.startswith("process") for t in left), left  # kubelet, containerd, pods...
    assert any("in /sys/fs/cgroup" in t for t in left), left  # the pods' processes
    deadline = time.monotonic() + 10
    while dev_processes() and time.monotonic() < deadline:  # their parent-death signal
        time.sleep(0.1)
    assert dev_processes() == []
    said: list[str] = []
    again = LocalCluster(images=[cluster.images.pause.archive], name=name, progress=said.append)
    again.start()
    try:
        assert any("removed what an earlier run left" in s for s in said), said
        assert again.node_condition() == "True"
    finally:
        again.stop()
    assert traces(places) == []
    assert host_state() == before


def demo(name: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "tpcontrol", "demo", "--source", str(ROOT), "--cluster-name", name],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def _cmdline(entry: Path) -> bytes:
    try:
        return (entry / "cmdline").read_bytes()
    except OSError:
        return b""
