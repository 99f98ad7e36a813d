"""Shared test set-up: enough file descriptors for 1,000 connections, and a control plane."""

from __future__ import annotations

import logging
import os
import resource
from collections.abc import Iterator
from pathlib import Path

import pytest

from tpcontrol.localcluster import LocalControlPlane, missing_binaries

from .cluster_helpers import ClusterUnderTest

ROOT = Path(__file__).resolve().parents[1]
CLUSTER_NAME = "tests"  # its own name, network and paths: a demo may run beside the tests

# Each test's layer, as a marker (`./dev test -m unit` runs the pure ones in seconds):
#   unit     no socket, no subprocess beyond a fake, no API server
#   proxy    the engine on real loopback sockets (proxies, servers, clients)
#   control  a real API server (the session's `control_plane`)
#   e2e      the real node (the session's `cluster`) or the images it runs
# and, across layers: k8s (an API server of some kind), root, slow.
PROXY_MODULES = {
    "test_engine", "test_http", "test_http_differential", "test_http_memory", "test_admin",
    "test_cli", "test_demo", "test_grpc", "test_h2_hostile", "test_mounts",
}  # fmt: skip
E2E_FIXTURES = {"cluster", "built"}
ROOT_FIXTURES = {"cluster", "built", "netns"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        fixtures = set(getattr(item, "fixturenames", ()))
        module = item.module.__name__.rsplit(".", 1)[-1] if item.module else ""  # type: ignore[attr-defined]
        if fixtures & E2E_FIXTURES:
            layer = "e2e"
        elif "control_plane" in fixtures:
            layer = "control"
        elif module in PROXY_MODULES or "netns" in fixtures:
            layer = "proxy"
        else:
            layer = "unit"
        item.add_marker(layer)
        if layer in ("control", "e2e") and "built" not in fixtures:
            item.add_marker("k8s")
        if fixtures & ROOT_FIXTURES:
            item.add_marker("root")
        if layer == "e2e":
            item.add_marker("slow")


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


@pytest.fixture(scope="session")
def cluster() -> Iterator[ClusterUnderTest]:
    """A real cluster for the whole session: control plane, kubelet, containerd, kube-proxy,
    the project's images, and the product installed from deploy/. One namespace per test.

    Missing tools, binaries or root skip these tests on a developer's machine but fail them
    under CI, whose .ci/run installs everything (scripts/install-*.sh) and runs as root."""
    from tpcontrol.localcluster import images
    from tpcontrol.localcluster.cluster import LocalCluster, missing_tools
    from tpcontrol.localcluster.install import install

    missing = [] if os.geteuid() == 0 else ["root"]
    missing += missing_tools() + images.missing_tools()
    if missing:
        message = "no local cluster: missing " + ", ".join(dict.fromkeys(missing))
        if os.environ.get("CI"):
            pytest.fail(message + " (CI must install them: scripts/install-*.sh, as root)")
        pytest.skip(message + " (run scripts/install-node-tools.sh and install-k8s-testbin.sh)")
    say = logging.getLogger("tests.cluster").info
    built = images.build_images(ROOT, progress=say)
    archives = [built.pause.archive, built.product.archive, built.examples.archive]
    with LocalCluster(images=archives, name=CLUSTER_NAME, progress=say) as local:
        install(local, ROOT, built.product.ref)
        yield ClusterUnderTest(local, built)
