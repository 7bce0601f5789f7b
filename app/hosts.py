"""``SGLORA_ALLOWED_HOSTS``: a request whose ``Host`` is not an allowed name is answered 400.

Against DNS rebinding: a web page can make a browser on the service's machine resolve the page's own
name to 127.0.0.1 and then read the service's answers as its own (the browser's same-origin rule looks at
names, not addresses), which a port published on the loopback alone does not stop and API keys do. Such a
request carries the page's name in ``Host``. Starlette's ``TrustedHostMiddleware`` does this with a plain
text answer and splits an IPv6 ``Host`` at its first colon; this one answers the service's JSON error,
reads ``[::1]:8000`` as ``[::1]`` and ``localhost.`` as ``localhost``, and refuses a request with no
``Host`` or two.

``/health``, ``/ready`` and ``/metrics`` answer any ``Host``: probes and scrapers (Kubernetes', a
container's HEALTHCHECK, Prometheus) address a replica by its IP. They carry no LoRA and no description;
a page that rebinds a name can read them (versions, counts, timings).
"""

from __future__ import annotations

import ipaddress
import re

from starlette.types import ASGIApp, Receive, Scope, Send

from app.limits import refuse, route_path

OPEN_PATHS = frozenset(("/health", "/ready", "/metrics"))

_LABEL = r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?"
_NAME = re.compile(rf"{_LABEL}(?:\.{_LABEL})*")  # a DNS name or a dotted IPv4 address, lower-case
_HEADER = re.compile(r"(\[[0-9a-f:.]+\]|[^:\[\]]+)(?::[0-9]{0,5})?")  # name or [IPv6], then an optional port (may be empty)


def canonical_host(name: str) -> str | None:
    """``name`` (no port) lower-cased, without a trailing dot, an IPv6 address in brackets in its short form;
    None when it is neither a host name, nor an IPv4 or a bracketed IPv6 address."""
    name = name.strip().lower()
    if name.startswith("["):
        try:
            return f"[{ipaddress.IPv6Address(name[1:-1]).compressed}]" if name.endswith("]") else None
        except ValueError:
            return None
    name = name.removesuffix(".")
    return name if _NAME.fullmatch(name) else None


def host_of(header: str) -> str | None:
    """The canonical name of a ``Host`` header's value (its port dropped); None when malformed."""
    m = _HEADER.fullmatch(header.strip().lower())
    return canonical_host(m.group(1)) if m else None


def host_allowed(name: str, allowed: list[str]) -> bool:
    """``allowed`` holds canonical names, ``*`` (any) and ``*.domain`` (the domain's subdomains, not itself)."""
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

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or route_path(scope) in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        hosts = [v.decode("latin-1") for k, v in scope["headers"] if k == b"host"]
        if len(hosts) != 1:
            await refuse(400, "Host", f"{'no' if not hosts else len(hosts)} Host headers: one is required", scope, receive, send)
            return
        name = host_of(hosts[0])
        if name is None or not host_allowed(name, self.allowed):
            await refuse(400, "Host", f"{hosts[0][:100]!r} is not one of SGLORA_ALLOWED_HOSTS", scope, receive, send)
            return
        await self.app(scope, receive, send)
