"""``python -m app --artifacts DIR``: the service under uvicorn, exit status 0 after a graceful stop.

One server process; with ``--workers N`` a supervisor runs N of them behind the address (app/workers.py).

uvicorn catches SIGTERM/SIGINT, drains (stops accepting, lets in-flight requests finish for
``--graceful-timeout`` seconds, then runs the lifespan shutdown: accepted model jobs finish, Redis closes)
and then re-raises the signal so that its default action ends the process: status -15 (143 in a shell)
even though nothing was lost. Here the handlers active at that moment only ask the server to stop, so a
drained shutdown exits 0, and a signal that arrives before uvicorn took over still stops the start-up.

uvicorn looks at a stop request only once the lifespan start-up is done, and start-up can take minutes
(hashing a large checkpoint, open_clip fetching weights, the warm-up on a cold device). A signal before
the server is ready ends the process at once, also with status 0: no request has been accepted, and
start-up only reads the artefacts (their writes are atomic, a killed writer's temporary files are tidied
on the next start).
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import logging
import os
import resource
import signal
import socket
import sys

import uvicorn
from pydantic import ValidationError
from uvicorn.config import STARTUP_FAILURE

from app.http_protocol import BoundedHttpToolsProtocol
from app.logs import FORMATS, LEVELS, log_config, route_library_output
from app.metrics import single_process_metrics
from app.settings import Settings, StartupError, settings_error
from app.workers import WORKER_FD, WORKER_INDEX, HandedConnections, supervise
from sglora.cli import EXIT_USAGE, port_number, seconds
from sglora.devices import resolve_device


def root_path(value: str) -> str:
    """A ``--root-path``: empty, or a path that starts with "/" (its trailing "/" dropped)."""
    if value and not value.startswith("/"):
        raise argparse.ArgumentTypeError(f"must start with '/' (e.g. /{value}), got {value!r}")
    return value.rstrip("/")


# Files the process holds besides its connections: model and artefact files, the Redis pool, logs, torch's own.
OTHER_FILES = 512


def allow_open_files(max_connections: int) -> None:
    """Raises the soft limit on open files (often 1,024) towards the hard one where the connections allowed
    need more; else a flood of connections met ``accept()`` failing (EMFILE) before the 503s of the bound,
    and files the service opens (an expert's upload) failed with them. Says so where it cannot."""
    if not max_connections:
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = max_connections + OTHER_FILES
    if soft == resource.RLIM_INFINITY or soft >= need:
        return
    target = need if hard == resource.RLIM_INFINITY else min(need, hard)
    if target > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    if soft < need:
        logging.getLogger("sglora.app").warning(
            "open files are limited to %d (ulimit -n), fewer than SGLORA_MAX_CONNECTIONS=%d needs (%d): connections "
            "beyond the limit fail at accept() rather than get a 503; raise the limit or lower SGLORA_MAX_CONNECTIONS",
            soft,
            max_connections,
            need,
        )


def worker_count(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        n = 0
    if not 1 <= n <= 64:
        raise argparse.ArgumentTypeError(f"must be a whole number from 1 to 64, got {value!r}")
    return n


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m app", description="Run the SG-LoRA HTTP service.")
    p.add_argument("--artifacts", help="artefact directory (default: $SGLORA_ARTIFACTS)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=port_number, default=8000)
    p.add_argument("--device", default=None, help="auto, cpu, cuda, cuda:1 (default: $SGLORA_DEVICE or auto)")
    p.add_argument(
        "--workers",
        type=worker_count,
        default=None,
        help="server processes behind the address, one copy of the weights each (default: $SGLORA_WORKERS or 1; "
        "see docs/service.md)",
    )
    p.add_argument("--graceful-timeout", type=seconds, default=30.0, help="seconds in-flight requests get after SIGTERM")
    p.add_argument(
        "--root-path",
        type=root_path,
        default="",
        help="the path prefix a proxy serves the service under and strips (uvicorn's --root-path), e.g. /sglora",
    )
    p.add_argument("--no-access-log", action="store_true", help="no line per request (load tests)")
    p.add_argument("--log-level", default="info", choices=LEVELS)
    p.add_argument(
        "--log-format",
        choices=FORMATS,
        default=os.environ.get("SGLORA_LOG_FORMAT", "text"),
        help="text, or json: one JSON object per line (default: $SGLORA_LOG_FORMAT or text)",
    )
    return p


def bind_problem(host: str, port: int) -> str | None:
    """Why ``host:port`` cannot be bound (in use, an unknown host, no permission), found in a moment, before the
    artefacts load; None where it can. The check binds as uvicorn will (asyncio's ``create_server``: every
    address ``host`` resolves to, ``SO_REUSEADDR``) without listening, and lets go at once: connections are
    still refused until the service is ready. Port 0 (any free one) cannot clash. Were the port taken between
    this check and uvicorn's bind, uvicorn's own error would still stop the start with status 2."""
    if port == 0:
        return None

    async def probe() -> None:
        server = await asyncio.get_running_loop().create_server(asyncio.Protocol, host, port, start_serving=False)
        server.close()
        await server.wait_closed()

    try:
        asyncio.run(probe())
    except OSError as e:  # socket.gaierror (an unknown host) is an OSError too
        reason = e.strerror or str(e)
        if e.errno == errno.EADDRINUSE:
            reason = "address already in use (another server listens there)"
        where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"  # an IPv6 address in brackets, as in a URL
        return f"cannot listen on {where}: {reason}"
    return None


class _KnownStartupFailure(logging.Filter):
    """Drops the traceback Starlette attaches to a failed start-up when the cause is an ArtifactError or a
    StartupError: the app has already logged what is wrong ("cannot start: ..."), and the exit status says
    it failed."""

    KNOWN = ("sglora.artifacts.ArtifactError: ", "app.settings.StartupError: ")

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not (message.startswith("Traceback") and any(k in message for k in self.KNOWN))


class _Server(uvicorn.Server):
    """uvicorn's server, stopped at once by a signal that arrives before it is ready (see above). A worker of
    ``--workers N`` listens on nothing: it serves the connections its supervisor hands it (``handed``)."""

    handed: HandedConnections | None = None

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        if self.handed is not None and self.started:
            config, server_state, app_state = self.config, self.server_state, self.lifespan.state

            def protocol() -> asyncio.Protocol:  # as uvicorn's startup makes them for the sockets it serves
                return config.http_protocol_class(config=config, server_state=server_state, app_state=app_state)

            self.handed.start(protocol)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        if self.handed is not None:
            self.handed.drain()
        await super().shutdown(sockets=sockets)

    def handle_exit(self, sig: int, frame: object) -> None:
        if not self.started:
            logging.getLogger("uvicorn.error").info("%s during start-up: stopped", signal.Signals(sig).name)
            logging.shutdown()
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(0)  # the start-up's thread (loading, warm-up) cannot be interrupted, and need not be
        super().handle_exit(sig, frame)


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    parser = build_parser()
    if prog:
        parser.prog = prog
    args = parser.parse_args(argv)
    if args.log_format not in FORMATS:  # from the environment: argparse checks only the flag's value
        parser.error(f"SGLORA_LOG_FORMAT must be one of {', '.join(FORMATS)}, got {args.log_format!r}")
    if args.log_format == "json":
        route_library_output()  # no progress bars (model loading) or lines of transformers' own between the JSON lines
        logging.captureWarnings(True)  # Python warnings through the JSON formatter too
    logging.getLogger("uvicorn.error").addFilter(_KnownStartupFailure())
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads (see docs/service.md)
    if args.artifacts:
        os.environ["SGLORA_ARTIFACTS"] = str(args.artifacts)
    if args.device:
        os.environ["SGLORA_DEVICE"] = args.device
    if args.workers:
        os.environ["SGLORA_WORKERS"] = str(args.workers)
    worker_fd = os.environ.get(WORKER_FD)  # one of --workers N's, started by its supervisor
    try:
        settings = Settings()  # checked here, before uvicorn loads the app: a bad value is a message, not a traceback
        single_process_metrics()
    except ValidationError as e:
        print(f"{parser.prog}: error: {settings_error(e)}", file=sys.stderr)
        return EXIT_USAGE
    except StartupError as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    if settings.artifacts is None:  # before uvicorn, the app and torch load: nothing to serve
        print(f"{parser.prog}: error: no artefact directory: pass --artifacts DIR or set SGLORA_ARTIFACTS", file=sys.stderr)
        return EXIT_USAGE
    if args.device:  # named as given (the start-up check names SGLORA_DEVICE, which --device sets)
        try:
            resolve_device(args.device, "--device")
        except ValueError as e:
            print(f"{parser.prog}: error: {e}", file=sys.stderr)
            return EXIT_USAGE
    problem = None if worker_fd else bind_problem(args.host, args.port)
    if problem:  # before torch and the artefacts load, which for a real CLIP takes many seconds
        print(f"{parser.prog}: error: {problem}", file=sys.stderr)
        return EXIT_USAGE
    config = uvicorn.Config(
        "app.main:create_app",
        factory=True,
        host=args.host,
        port=args.port,
        workers=1,
        # httptools, with bounds on a request's head and on how slowly a head or a body may arrive
        http=BoundedHttpToolsProtocol.with_timeouts(
            settings.client_header_timeout_s,
            settings.client_body_timeout_s,
            settings.max_connections,
            settings.retry_after_s,
            settings.max_client_connections,
        ),
        timeout_keep_alive=settings.keep_alive_timeout_s,
        timeout_graceful_shutdown=args.graceful_timeout,
        root_path=args.root_path,
        access_log=not args.no_access_log,
        log_level=args.log_level,
        log_config=log_config(args.log_format, args.log_level, int(os.environ[WORKER_INDEX]) if worker_fd else None),
    )
    allow_open_files(settings.max_connections)  # after uvicorn.Config, which configures the logs: its warning in their format
    if settings.workers > 1 and not worker_fd:
        # The supervisor: binds the address (as uvicorn would, and says so), starts the workers, hands them its connections.
        argv = sys.argv[1:] if argv is None else argv
        return supervise(argv, config.bind_socket(), settings.workers, args.graceful_timeout, config.backlog)
    server = _Server(config)
    sockets = None
    if worker_fd:
        server.handed, sockets = HandedConnections(socket.socket(fileno=int(worker_fd))), []

    def stop(signum: int, frame: object) -> None:
        server.should_exit = True

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    failed = False
    try:
        server.run(sockets=sockets)
    except SystemExit as e:  # a failed start-up: uvicorn >= 0.53 exits with STARTUP_FAILURE, earlier ones 1 or return
        if e.code != STARTUP_FAILURE and server.started:
            raise
        failed = True
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if failed or getattr(server.lifespan, "startup_failed", False) or not (server.started or server.should_exit):
        # The lifespan refused to start (artefacts missing, corrupt or mismatched), or the address could not be
        # bound (in use, or no such host); uvicorn logged why: an error like the CLI's others, status 2, not
        # uvicorn's 3 (nor 0, which a bind failure gave, and which a supervisor restarting on failure ignores).
        return EXIT_USAGE
    from app.worker import abandoned_threads  # here: torch loads with the app, after the checks above

    if abandoned_threads():
        # A job ran past SGLORA_SHUTDOWN_TIMEOUT_S (logged): Python would join its thread at exit and keep the
        # process alive until the job ends (a hung device: until the orchestrator's SIGKILL). End it now.
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    # Stopped gracefully: a second SIGTERM while Python exits (a second or two: torch's teardown) made the
    # status 143 instead of 0.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)
    return 0


if __name__ == "__main__":
    sys.exit(main())
