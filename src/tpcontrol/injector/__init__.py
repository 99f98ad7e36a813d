"""The agent injector: the mutating admission webhook that adds the traffic-agent to new pods.

- `webhook`: the AdmissionReview server and the decision of what to inject.
- `podpatch`: the RFC 6902 patch for a pod from its agent config (pure).
- `tls`: the injector's own CA and serving certificate in a Secret, and its caBundle.
"""
