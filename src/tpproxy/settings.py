"""The one settings object of the `tpproxy` program, from defaults, `TPPROXY_*` env and flags.

Precedence: flag > environment > default. The agent configuration itself (listeners, intercepts)
comes from the file named by `config`; these settings are the deployment knobs around it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Annotated, Any, Literal

import msgspec

from tpproxy.config import ConfigError
from tpproxy.logs import LogFormat
from tpproxy.targets import Address

ENV_PREFIX = "TPPROXY_"
Positive = Annotated[float, msgspec.Meta(gt=0)]
NonNegative = Annotated[float, msgspec.Meta(ge=0)]


# A TCP connection that has moved this many bytes in large reads is joined with splice(2).
SPLICE_AFTER = 256 * 1024
ADMIN_PORT = 9180  # /livez (the injected liveness probe), /readyz, /metrics
# The agent container's readiness probe is `/bin/stat` of this file (the injector's probe).
READY_FILE = "/tmp/agent/ready"


class ProxySettings(msgspec.Struct, frozen=True, kw_only=True):
    """Every knob of `tpproxy run`; each is also `--flag-name` and `TPPROXY_FLAG_NAME`."""

    config: str = ""
    """Agent config file (the sidecar's config.yaml). Either this or `forward` is needed."""
    forward: tuple[str, ...] = ()
    """Extra plain forwards `LISTEN_PORT=HOST:PORT`, for use without a cluster."""
    listen_host: str = "0.0.0.0"
    """Address the agent ports are bound on."""
    app_host: str = "127.0.0.1"
    """Where the app containers listen (the pod's loopback)."""
    admin: str = f"0.0.0.0:{ADMIN_PORT}"
    """HOST:PORT of /livez, /readyz and /metrics; `off` disables it."""
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: LogFormat = "plain"
    drain_timeout: NonNegative = 20.0
    """Seconds to wait for open connections after SIGTERM before closing them."""
    connect_timeout: Positive = 5.0
    """Seconds to wait for a target to accept a connection."""
    backlog: Annotated[int, msgspec.Meta(ge=1)] = 1024
    mode: Literal["tcp", "http"] = "tcp"
    """`http`: parse HTTP/1.1 on every agent port and route each request on its own."""
    http_parser: Literal["httptools", "h11"] = "httptools"
    """HTTP request-head parser: httptools (fast) or h11 (strict)."""
    intercepts: str = ""
    """YAML file of intercept specs to apply at start (and on SIGHUP)."""
    splice_after: Annotated[int, msgspec.Meta(ge=0)] = SPLICE_AFTER
    """Bytes a TCP-mode connection moves in large reads before its two sockets are joined with
    splice(2) (no copies through Python); 0 never joins them."""
    max_head_size: Annotated[int, msgspec.Meta(ge=1024)] = 32 * 1024
    """Largest request head (request line and headers) in bytes; larger ones get 431."""
    header_timeout: Positive = 10.0
    """Seconds a client may take to send a request head once it has started."""
    idle_timeout: Positive = 60.0
    """Seconds an HTTP connection may stay idle (between requests, or in a stalled body)."""

    def admin_address(self) -> Address | None:
        """The admin listen address, or None when disabled."""
        if self.admin.lower() == "off":
            return None
        return Address.parse(self.admin)

    def forwards(self) -> list[tuple[int, Address]]:
        """`forward` parsed; errors name the flag and the bad value."""
        parsed = []
        for item in self.forward:
            port_text, sep, dest = item.partition("=")
            if not sep or not port_text.isdigit() or not 0 < int(port_text) < 65536:
                raise ConfigError(f"--forward {item!r}: expected LISTEN_PORT=HOST:PORT")
            try:
                parsed.append((int(port_text), Address.parse(dest)))
            except ValueError as exc:
                raise ConfigError(f"--forward {item!r}: {exc}") from None
        return parsed


FIELDS = ProxySettings.__struct_fields__


def env_overrides(environ: Mapping[str, str]) -> dict[str, Any]:
    """The `TPPROXY_*` variables that name a setting; `forward` takes a comma-separated list."""
    found: dict[str, Any] = {}
    for name in FIELDS:
        value = environ.get(ENV_PREFIX + name.upper())
        if value is not None:
            found[name] = [v for v in value.split(",") if v] if name == "forward" else value
    return found


def load_settings(
    flags: Mapping[str, Any], environ: Mapping[str, str] | None = None
) -> ProxySettings:
    """Merge defaults, environment and flags; a bad value is a ConfigError naming its source."""
    env = env_overrides(os.environ if environ is None else environ)
    merged: dict[str, Any] = dict(env)
    merged.update({k: v for k, v in flags.items() if v is not None and k in FIELDS})
    try:
        return msgspec.convert(merged, ProxySettings, strict=False)
    except msgspec.ValidationError as exc:
        message = str(exc)
        for name in FIELDS:
            if f"`$.{name}`" in message or f"`$.{name}[" in message:
                source = (
                    f"--{name.replace('_', '-')}"
                    if flags.get(name) is not None
                    else ENV_PREFIX + name.upper()
                )
                raise ConfigError(f"{source}: {message.split(' - at ')[0]}") from None
        raise ConfigError(message) from None
