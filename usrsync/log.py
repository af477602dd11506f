"""structlog set-up: readable lines on a terminal, one JSON object per event for cron and shippers."""

from __future__ import annotations

import logging
import sys
from typing import Literal

import structlog

_TIMESTAMPER = structlog.processors.TimeStamper(fmt="iso", utc=True)
# With --log-format json, third-party stdlib logging (asyncssh) is rendered as JSON lines too.
_STDLIB_JSON = logging.StreamHandler()
_STDLIB_JSON.setFormatter(structlog.stdlib.ProcessorFormatter(
    processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, structlog.processors.JSONRenderer()],
    foreign_pre_chain=[structlog.stdlib.add_logger_name, structlog.processors.add_log_level, _TIMESTAMPER],
))
_json = False


def json_mode() -> bool:
    """Whether stderr carries JSON log lines (render writes errors as an event there too)."""
    return _json


def configure(fmt: Literal["console", "json"] = "console", verbose: bool = False, quiet: bool = False) -> None:
    global _json
    _json = fmt == "json"
    root = logging.getLogger()
    root.removeHandler(_STDLIB_JSON)
    if _json:
        _STDLIB_JSON.setStream(sys.stderr)
        _STDLIB_JSON.setLevel(logging.ERROR if quiet else logging.WARNING)
        root.addHandler(_STDLIB_JSON)
        level = logging.DEBUG if verbose else logging.INFO
        renderer: structlog.typing.Processor = structlog.processors.JSONRenderer()
    else:
        level = logging.DEBUG if verbose else logging.WARNING
        renderer = structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    if quiet:
        level = logging.ERROR
    logging.getLogger("sh").setLevel(logging.WARNING)  # it logs every process start at INFO
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            _TIMESTAMPER,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )
