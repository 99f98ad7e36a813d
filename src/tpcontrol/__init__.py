"""tpcontrol: agent config generation, the ConfigMap, the webhook, the manager, the client."""

__version__ = "0.1.0"
