"""Starting an in-process traffic-agent for tests: the engine from a config file, not yet
talking to the manager (the test runs `agent.run()` when it wants the session)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from tpproxy.agent import Agent
from tpproxy.server import Proxy, load
from tpproxy.settings import load_settings


async def start_agent(
    config: Path,
    manager_url: str,
    pod: str = "p",
    ip: str = "10.0.0.1",
    environ: Mapping[str, str] | None = None,
) -> tuple[Agent, Proxy]:
    """The agent of `config` and its proxy, the ports listening on 127.0.0.1."""
    settings = load_settings(
        {"config": str(config), "listen_host": "127.0.0.1", "admin": "off"}, {}
    )
    proxy = Proxy(settings)
    sidecar, routes = load(settings)
    assert sidecar is not None
    await proxy.start(routes)
    return Agent(proxy, sidecar, routes, manager_url, pod, ip, environ or {}), proxy
