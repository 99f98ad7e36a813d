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


def test_ctrl_c_during_the_demo_tears_everything_down() -> None:
    require_root()
    if missing_binaries():
        pytest.skip("no control plane binaries (scripts/install-k8s-testbin.sh)")
    before = set(namespaces())
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
        assert set(namespaces()) - before  # the node's and the pods'
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err
    assert "interrupted: tearing everything down" in err
    assert "Traceback" not in err
    assert set(namespaces()) == before
    assert processes_mentioning(work) == []
    assert not Path(work).exists()
    assert processes_mentioning("examples/http_echo.py") == []
