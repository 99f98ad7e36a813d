"""The names and defaults that the manager, the injector, the client and deploy/ must agree
on, each written once. (What the agent must agree on too lives in tpproxy: `tpproxy.settings`
for its ready file and admin port, `tpproxy.wire` for its token's path.)"""

from __future__ import annotations

from typing import Final

ANNOTATION_DOMAIN: Final = "telepresence.getambassador.io/"
INJECT_ANNOTATION: Final = ANNOTATION_DOMAIN + "inject-traffic-agent"
RESTARTED_AT: Final = ANNOTATION_DOMAIN + "restartedAt"

AGENT_CONTAINER: Final = "traffic-agent"
INIT_CONTAINER: Final = "tel-agent-init"
AGENTS_CONFIG_MAP: Final = "telepresence-agents"

MANAGER_NAMESPACE: Final = "ambassador"
MANAGER_SERVICE: Final = "traffic-manager"
MANAGER_PORT: Final = 8081  # the API
TUNNEL_PORT: Final = 8082
LOGIN_PORT: Final = 8083  # TLS, client certificates; loopback in the manager's pod
AGENT_PORT: Final = 9900  # the first agent port of a pod
# The audience of the agent's projected token: a token for the manager and nothing else.
AGENT_AUDIENCE: Final = "traffic-manager"

# Clients heartbeat every 5 s: one silent this long has vanished and its intercepts end, so
# traffic goes back to the app (2.6 waited 24 h). Agents heartbeat every 5 s too.
CLIENT_TTL: Final = 60.0
AGENT_TTL: Final = 15.0
