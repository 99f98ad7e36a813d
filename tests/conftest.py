"""Shared test set-up: enough file descriptors for 1,000 connections, and a control plane."""

from __future__ import annotations

import os
import resource
from collections.abc import Iterator

import pytest

from tpcontrol.localcluster import LocalControlPlane, missing_binaries

soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
if soft != resource.RLIM_INFINITY and soft < 8192:
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(8192, hard), hard))


@pytest.fixture(scope="session")
def control_plane() -> Iterator[LocalControlPlane]:
    """A real etcd + kube-apiserver + kube-controller-manager for the whole session.

    Missing binaries skip these tests on a developer's machine but fail them under CI, whose
    .ci/run installs them (scripts/install-k8s-testbin.sh).
    """
    missing = missing_binaries()
    if missing:
        message = "no control plane: missing " + ", ".join(missing)
        if os.environ.get("CI"):
            pytest.fail(message + " (CI must install them: scripts/install-k8s-testbin.sh)")
        pytest.skip(message + " (run scripts/install-k8s-testbin.sh)")
    with LocalControlPlane() as plane:
        yield plane
