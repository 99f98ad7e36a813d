"""tpproxy: the traffic-agent forwarding engine (multi-port TCP forwarding, hot route changes)."""

from tpproxy import hotpath  # first: it decides whether the compiled hot path is imported
from tpproxy.config import ConfigError, Container, Intercept, Sidecar
from tpproxy.engine import Engine, ListenError
from tpproxy.routing import PortRoutes, RouteConflict, TcpIntercept
from tpproxy.targets import Address, Connector, ConnectorTarget, Target

__version__ = "0.1.0"

__all__ = [
    "Address",
    "ConfigError",
    "Connector",
    "ConnectorTarget",
    "Container",
    "Engine",
    "Intercept",
    "ListenError",
    "PortRoutes",
    "RouteConflict",
    "Sidecar",
    "Target",
    "TcpIntercept",
    "__version__",
    "hotpath",
]
