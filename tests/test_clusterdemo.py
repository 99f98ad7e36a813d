"""`tpcontrol demo` (the README's first command; CI runs it whole): Ctrl-C in the middle of a
step tears everything down, the control plane, the node's namespaces and the developers'
processes included."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tpcontrol.localcluster import missing_binaries
from tpcontrol.node.netns import namespaces

from .node_helpers import require_root


def processes_mentioning(text: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if text.encode() in (entry / "cmdline").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def leftovers(output: str) -> list[str]:
    """The network namespaces of the demo's node (named in its output) that still exist."""
    found = re.search(r"pods in network namespaces (tpn-[0-9a-f]+)-", output)
    assert found, output
    return [n for n in namespaces() if n.startswith(found.group(1))]


def test_ctrl_c_during_the_demo_tears_everything_down() -> None:
    require_root()
    if missing_binaries():
        pytest.skip("no control plane binaries (scripts/install-k8s-testbin.sh)")
    proc = subprocess.Popen(
        [sys.executable, "-m", "tpcontrol", "demo"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    seen: list[str] = []
    work = ""
    deadline = time.monotonic() + 120
    try:
        for line in proc.stdout:  # ends when the demo does, or at the step it is stopped in
            seen.append(line)
            found = re.search(r"kubeconfig (/\S+)/kubeconfig", line)
            if found:
                work = found.group(1)
            if line.startswith("== 3.") or time.monotonic() > deadline:
                break
        assert work, "".join(seen)
        assert seen[-1].startswith("== 3."), "".join(seen)
        assert processes_mentioning(work)  # etcd, kube-apiserver, controller-manager
        assert leftovers("".join(seen))  # the node's and the pods' namespaces exist
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err
    assert "interrupted: tearing everything down" in err
    assert "Traceback" not in err
    assert leftovers("".join(seen)) == []
    assert processes_mentioning(work) == []
    assert not Path(work).exists()
    assert processes_mentioning("examples/http_echo.py") == []


def test_the_demo_runs_every_step_and_leaves_nothing() -> None:
    require_root()
    if missing_binaries():
        pytest.skip("no control plane binaries (scripts/install-k8s-testbin.sh)")
    done = subprocess.run(
        [sys.executable, "-m", "tpcontrol", "demo", "--requests", "2"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    summary = done.stdout.split("== summary", 1)[1].splitlines()[1:]
    assert len(summary) == 7
    assert all(line.strip().startswith("ok") for line in summary), summary
    assert "served by alice's laptop" in done.stdout
    assert "served by bob's laptop" in done.stdout
    assert "hello from carol's laptop" in done.stdout
    assert "REDIRECT --to-ports" in done.stdout  # tel-agent-init's rules, read in the pod
    assert "WRONG" not in done.stdout
    assert leftovers(done.stdout) == []
