"""What a page in a developer's browser can send to the local end of a port-forward, refused
before any handler runs: requests the browser marks as its own, and requests for a DNS name that
is not this manager's (DNS rebinding)."""

from __future__ import annotations

import ipaddress
from collections.abc import Awaitable, Callable

import msgspec
from aiohttp import web
from aiohttp.typedefs import Middleware

from tpproxy.wire import ErrorBody

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

BROWSER_HEADERS = ("origin", "sec-fetch-site", "sec-fetch-mode", "sec-fetch-dest")


def host_allowed(host: str, namespace: str) -> bool:
    """Whether a request's Host names this manager as its callers do: an address (the local end
    of a port-forward, the pod's IP), `localhost`, or the Service's names. Any other name is a
    page in a browser that rebound its own DNS name to the port-forward (it sends no Origin)."""
    name = host.rsplit(":", 1)[0] if host.count(":") == 1 or host.startswith("[") else host
    name = name.strip("[]").rstrip(".").lower()
    service = f"traffic-manager.{namespace}"
    if name in {"localhost", "traffic-manager", service, f"{service}.svc",
                f"{service}.svc.cluster.local"}:  # fmt: skip
        return True
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def browser_guard(namespace: str) -> Middleware:
    """Refuse, before any handler runs, what a page in a developer's browser can send to the
    local end of a port-forward: requests the browser marks (Origin, Sec-Fetch-*), and requests
    for a DNS name that is not this manager's (DNS rebinding)."""

    @web.middleware
    async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
        marked = [h for h in BROWSER_HEADERS if h in request.headers]
        host = request.headers.get("host", "")
        if marked or not host_allowed(host, namespace):
            why = f"header {marked[0]}" if marked else f"Host {printable_host(host)}"
            refusal = ErrorBody(
                f"refused: a browser's request ({why}); the traffic-manager is called by "
                "tpcontrol and its agents only",
                "forbidden",
            )
            return web.Response(
                body=msgspec.json.encode(refusal), status=403, content_type="application/json"
            )
        return await handler(request)

    return guard


def printable_host(host: str) -> str:
    return repr(host[:100])
