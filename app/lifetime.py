"""A request's lifetime as the model sees it: one deadline for its model waits, and cancellation when its
client hangs up.

Deadline: once the request's body is read, every wait of the request for the model ends within
``request_timeout_s`` of that moment, all of them together (:data:`app.worker.REQUEST_DEADLINE`): a
/retrieve by description waits for its LoRA, then for the retrieval, and each wait had the whole timeout.

Hang-ups: uvicorn lets a handler run on after its client went away, so a request waiting for the model
kept its admission slot, its job ran for nobody (a client that times out and retries doubles the load it
was timing out on), and it was counted as answered. The connection is watched once the body is read and
the request is still running ``after_s`` later (a cache hit is answered before that and costs no
watcher task): a disconnect before the answer begins cancels the request's task. The worker then skips
its job if it has not begun (an expert change that has begun still runs to its end, see
:meth:`app.worker.ModelWorker.run`), and the request is counted with status 499, "client closed
request", as nginx logs it. No answer is sent: there is nobody to read it.

Only POST requests are handled (every endpoint that waits for the model); a handler that reads the
connection itself after the body (streaming responses) would compete with the watcher.
"""

from __future__ import annotations

import asyncio
import logging

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.limits import CLIENT_CLOSED
from app.worker import REQUEST_DEADLINE, Deadline

log = logging.getLogger("sglora.app")


class RequestLifetimeMiddleware:
    def __init__(self, app: ASGIApp, request_timeout_s: float | None = None, after_s: float = 0.005) -> None:
        self.app = app
        self.request_timeout_s = request_timeout_s
        self.after_s = after_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None
        deadline = Deadline()
        token = REQUEST_DEADLINE.set(deadline)  # the handler's tasks (a batch's items) share the holder
        responded = gone = False
        timer: asyncio.TimerHandle | None = None
        watcher: asyncio.Task | None = None

        async def watch() -> None:
            nonlocal gone
            message = await receive()  # the next message after the body: a disconnect, or the answer's end
            if message["type"] == "http.disconnect" and not responded:
                gone = True
                task.cancel()

        def start_watching() -> None:
            nonlocal watcher
            if not responded:
                watcher = loop.create_task(watch())

        async def receive_body() -> Message:
            nonlocal timer, gone
            message = await receive()
            if message["type"] == "http.disconnect" and timer is None:  # gone while sending its body
                gone = True  # counted 499, not the 400 ("error parsing the body") the framework answers
            if timer is None and (message["type"] != "http.request" or not message.get("more_body", False)):
                if self.request_timeout_s is not None:
                    deadline.at = loop.time() + self.request_timeout_s
                timer = loop.call_later(self.after_s, start_watching)  # the body is read: watch, if still running
            return message

        async def send_answer(message: Message) -> None:
            nonlocal responded
            if message["type"] == "http.response.start":
                responded = True
                if gone:  # nobody reads it; the metrics middleware counts what the client did
                    message = {**message, "status": CLIENT_CLOSED}
            await send(message)

        try:
            await self.app(scope, receive_body, send_answer)
        except asyncio.CancelledError:
            if not gone:  # a shutdown's cancellation: the outer middleware answers it
                raise
            task.uncancel()
            # Dropped by the server (the connection is closed); the metrics middleware counts it.
            await send({"type": "http.response.start", "status": CLIENT_CLOSED, "headers": []})
        finally:
            if gone:  # uvicorn writes no access line for an answer to a closed connection: this is its line
                path = scope.get("path", "")
                log.info("%s %s %d: the client closed the connection before the answer", scope["method"], path, CLIENT_CLOSED)
            REQUEST_DEADLINE.reset(token)
            if timer is not None:
                timer.cancel()
            if watcher is not None and not watcher.done():
                watcher.cancel()
