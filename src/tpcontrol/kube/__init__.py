"""The Kubernetes-object layer shared by the manager and the injector.

- `agentconfig`: a workload's agent config generated from its services and containers (pure).
- `configmap`: the `telepresence-agents` ConfigMaps, written by compare-and-swap.
- `workloads`: workloads, services and owner references (followed by UID).
- `client`: an API client from a kubeconfig or the pod's service account.
"""
