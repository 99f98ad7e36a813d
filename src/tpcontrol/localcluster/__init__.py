"""The local cluster the demo and the tests run on: a real control plane, a real node
(kubelet, containerd, kube-proxy) in a network namespace of its own, the project's images built
without a registry, and the product installed from `deploy/`. Nothing in the product imports it.
"""

from tpcontrol.localcluster.controlplane import (
    ControlPlaneError,
    LocalControlPlane,
    missing_binaries,
    testbin,
    wait_for_service_account,
)

__all__ = [
    "ControlPlaneError",
    "LocalControlPlane",
    "missing_binaries",
    "testbin",
    "wait_for_service_account",
]
