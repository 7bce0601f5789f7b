"""Logging of the served process, uvicorn's lines and the service's, as text or as JSON lines.

:func:`log_config` is the ``logging.config.dictConfig`` that ``python -m app`` (``sglora serve``)
hands to uvicorn:

* ``text``: uvicorn's own formats; the service's lines as ``INFO:     sglora.service: ...``. The access
  line of a request and the service's lines written while serving it end in / carry
  ``[request <id>]`` (the ``X-Request-ID`` it was answered with).
* ``json``: one JSON object per line (``time``, ``level``, ``logger``, ``message``, ``request_id`` inside a
  request, ``exception`` with a traceback; access lines add ``client``, ``method``, ``path``,
  ``http_version``, ``status``), for a log shipper. Everything else that logs (libraries, Python
  warnings) goes through the same formatter.

Access lines go to stdout and the rest to stderr, as with uvicorn's defaults. Under ``--workers N`` each
worker's lines say which worker wrote them: ``[worker 1]`` after the level, ``"worker": 1`` in JSON.
"""

from __future__ import annotations

import importlib.util
import json
import logging
from datetime import UTC, datetime
from typing import Any

FORMATS = ("text", "json")
LEVELS = ("critical", "error", "warning", "info", "debug", "trace")  # uvicorn's --log-level names


class JsonFormatter(logging.Formatter):
    def __init__(self, worker: int | None = None) -> None:
        super().__init__()
        self.worker = worker

    def format(self, record: logging.LogRecord) -> str:
        stamp = datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
        out: dict[str, Any] = {"time": stamp, "level": record.levelname, "logger": record.name}
        if self.worker is not None:
            out["worker"] = self.worker
        args = record.args
        if record.name == "uvicorn.access" and isinstance(args, tuple) and len(args) == 5:
            client, method, path, version, status = args
            out["message"] = f"{method} {path} {status}"
            out.update(client=client, method=method, path=path, http_version=version, status=status)
        else:
            out["message"] = record.getMessage()
        request_id = getattr(record, "request_id", None)
        if request_id:
            out["request_id"] = request_id
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False, default=str)


def route_library_output() -> None:
    """For JSON logs: transformers writes past the logging configuration, through a handler of its own
    ("[transformers] ..." lines) and progress bars while it loads weights. Its records go to the root
    logger's (JSON) handler instead, and its bars are off. (tqdm reads ``TQDM_DISABLE`` once, when imported,
    which torch has done before any setting is read, so the environment cannot turn the bars off.)"""
    if importlib.util.find_spec("transformers") is None:
        return
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.disable_default_handler()
    hf_logging.enable_propagation()


def log_config(fmt: str, level: str = "info", worker: int | None = None) -> dict[str, Any]:
    """The dictConfig of the service process for ``fmt`` (``text`` or ``json``) at ``level``; ``worker``: the
    index of a ``--workers N`` worker, named in each line."""
    if fmt not in FORMATS:
        raise ValueError(f"log format must be one of {FORMATS}, got {fmt!r}")
    level = level.upper()
    if fmt == "json":
        formatters: dict[str, Any] = {
            name: {"()": "app.logs.JsonFormatter", "worker": worker} for name in ("default", "access", "service")
        }
    else:
        tag = "" if worker is None else f"[worker {worker}] "
        formatters = {
            "default": {
                "()": "uvicorn.logging.DefaultFormatter",
                "fmt": f"%(levelprefix)s {tag}%(message)s",
                "use_colors": None,
            },
            "access": {
                "()": "uvicorn.logging.AccessFormatter",
                "fmt": f'%(levelprefix)s {tag}%(client_addr)s - "%(request_line)s" %(status_code)s%(request)s',
            },
            "service": {
                "()": "uvicorn.logging.DefaultFormatter",
                "fmt": f"%(levelprefix)s {tag}%(name)s:%(request)s %(message)s",
                "use_colors": None,
            },
        }
    handlers = {
        name: {
            "formatter": name,
            "class": "logging.StreamHandler",
            "stream": "ext://sys.stdout" if name == "access" else "ext://sys.stderr",
            "filters": ["request_id"],
        }
        for name in ("default", "access", "service")
    }
    config: dict[str, Any] = {
        "version": 1,
        "disable_existing_loggers": False,
        "filters": {"request_id": {"()": "app.request_id.RequestIdFilter"}},
        "formatters": formatters,
        "handlers": handlers,
        "loggers": {
            "uvicorn": {"handlers": ["default"], "level": "INFO", "propagate": False},
            "uvicorn.error": {"level": "INFO"},
            "uvicorn.access": {"handlers": ["access"], "level": "INFO", "propagate": False},
            "sglora": {"handlers": ["service"], "level": level, "propagate": False},
        },
    }
    if fmt == "json":  # library and Python-warning lines as JSON too
        config["root"] = {"handlers": ["default"], "level": "WARNING"}
    return config
