"""The local node: runs the pods the API server binds to it (the kubelet and kube-proxy parts)."""
