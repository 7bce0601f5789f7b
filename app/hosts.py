"""``SGLORA_ALLOWED_HOSTS``: a request whose ``Host`` is not an allowed name is answered 400.

Against DNS rebinding: a web page can make a browser on the service's machine resolve the page's own
name to 127.0.0.1 and then read the service's answers as its own (the browser's same-origin rule looks at
names, not addresses), which a port published on the loopback alone does not stop and API keys do. Such a
request carries the page's name in ``Host``. Starlette's ``TrustedHostMiddleware`` does this with a plain
text answer and splits an IPv6 ``Host`` at its first colon; this one answers the service's JSON error and
takes ``[::1]:8000`` as ``[::1]``.

``/health``, ``/ready`` and ``/metrics`` answer any ``Host``: probes and scrapers (Kubernetes', a
container's HEALTHCHECK, Prometheus) address a replica by its IP, and these say nothing of any request.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Receive, Scope, Send

from app.limits import refuse, route_path

OPEN_PATHS = frozenset(("/health", "/ready", "/metrics"))


def host_name(header: str) -> str:
    """The name of a ``Host`` header without its port, lower-cased; an IPv6 address keeps its brackets."""
    header = header.strip().lower()
    if header.startswith("["):
        end = header.find("]")
        return header[: end + 1] if end > 0 else header
    return header.partition(":")[0]


def host_allowed(name: str, allowed: list[str]) -> bool:
    for pattern in allowed:
        if pattern == "*" or name == pattern:
            return True
        if pattern.startswith("*.") and name.endswith(pattern[1:]) and len(name) > len(pattern) - 1:
            return True
    return False


class AllowedHostsMiddleware:
    def __init__(self, app: ASGIApp, allowed_hosts: list[str]) -> None:
        self.app = app
        self.allowed = list(allowed_hosts)
        self.any = "*" in self.allowed

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.any or scope["type"] != "http" or route_path(scope) in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        header = dict(scope["headers"]).get(b"host", b"").decode("latin-1")
        if not host_allowed(host_name(header), self.allowed):
            shown = header[:100] if header else "(none)"
            await refuse(400, "Host", f"{shown!r} is not one of SGLORA_ALLOWED_HOSTS", scope, receive, send)
            return
        await self.app(scope, receive, send)
