"""Helpers shared by the in-process service tests."""

import asyncio
import json
import threading
import time
from contextlib import asynccontextmanager

import httpx
import uvicorn

from app.main import create_app
from app.processes import free_port


@asynccontextmanager
async def serving(settings):
    """The app with its lifespan, in this event loop, behind an in-process httpx client."""
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://sglora") as client:
            yield app.state.service, client


def uvicorn_in_thread(app, start_s: float = 60, **config):
    """Yields the port of ``app`` served by uvicorn on a thread of this process (a real socket; the app's
    objects stay reachable from the test), and stops it afterwards. ``config``: more ``uvicorn.Config``."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", **config))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    end = time.monotonic() + start_s
    while not server.started:
        assert thread.is_alive(), "the server stopped before it started"
        assert time.monotonic() < end, "the server did not start"
        time.sleep(0.01)
    try:
        yield port
    finally:
        server.should_exit = True
        thread.join(30)


async def until(predicate, timeout=5.0):
    """Polls ``predicate`` until true; fails the test after ``timeout`` seconds."""
    end = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < end, "condition not reached"
        await asyncio.sleep(0.005)


def file_metadata(data: bytes) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors file, read from its header here rather than by the service."""
    n = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + n])["__metadata__"]


def block_worker(worker) -> tuple[threading.Event, asyncio.Task]:
    """Occupies a worker's model thread until the returned event is set."""
    gate = threading.Event()
    return gate, asyncio.create_task(worker.run(gate.wait, 10))
