"""API clients: in-cluster when running in a pod, else from a kubeconfig file."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from kubernetes_asyncio import client as k8s
from kubernetes_asyncio import config as k8s_config


@asynccontextmanager
async def api_client(kubeconfig: str | None = None) -> AsyncIterator[k8s.ApiClient]:
    """An API client for the cluster: `kubeconfig` if given, in-cluster inside a pod, else
    $KUBECONFIG or ~/.kube/config."""
    configuration = k8s.Configuration()
    if kubeconfig is None and os.environ.get("KUBERNETES_SERVICE_HOST"):
        k8s_config.load_incluster_config(client_configuration=configuration)  # type: ignore[no-untyped-call]
    else:
        await k8s_config.load_kube_config(
            config_file=kubeconfig, client_configuration=configuration
        )
    async with k8s.ApiClient(configuration) as api:
        yield api
