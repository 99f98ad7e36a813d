"""The traffic-manager: the service developers and agents call.

- `api`: its HTTP API (aiohttp) and its upkeep; the one place that does I/O for it.
- `state`: sessions, intercepts and their rules, plain Python (tested with a fake clock).
- `callers`: the gate every handler and tunnel stream goes through, built on `auth` (who
  calls: TokenReview, client-certificate logins) and `access` (what they may do:
  SubjectAccessReview per target namespace); `browsers`: the guard against browser pages.
- `prepare` (is the intercept unambiguous), `rollout` (the ConfigMap watcher that rolls
  workloads out), `images` (which agent image), `rendezvous` (the tunnel's pairing).

It uses `tpcontrol.kube` for Kubernetes objects, never the injector or the client.
"""
