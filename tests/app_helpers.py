"""Helpers shared by the in-process service tests."""

import asyncio
import socket
import subprocess
import time
from contextlib import asynccontextmanager

import httpx

from app.main import create_app


@asynccontextmanager
async def serving(settings):
    """The app with its lifespan, in this event loop, behind an in-process httpx client."""
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://sglora") as client:
            yield app.state.service, client


async def until(predicate, timeout=5.0):
    """Polls ``predicate`` until true; fails the test after ``timeout`` seconds."""
    end = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < end, "condition not reached"
        await asyncio.sleep(0.005)


def free_port() -> int:
    """A free TCP port on the loopback interface."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(base: str, proc: subprocess.Popen, timeout: float = 90.0) -> None:
    """Polls ``base``/ready of a server subprocess until 200; fails with its stderr if it dies first."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        try:
            if httpx.get(f"{base}/ready", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise AssertionError("the server did not become ready")
