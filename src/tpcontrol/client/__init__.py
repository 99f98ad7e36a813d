"""The developer's side: what `tpcontrol intercept` runs on their machine.

- `intercept`: prepare, create, keep and leave an intercept; hand the environment to a command.
- `tunnel`: idle streams to the manager's tunnel, each delivered to the local port.
- `portforward`: the `kubectl port-forward` to the in-cluster manager, restarted on the same ports.
- `credentials`: the kubeconfig's user as the manager wants it (a token, or a certificate login).
- `localenv`: the container's environment made safe for a local process and an env file.
"""
